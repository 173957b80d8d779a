#!/usr/bin/env bash
# Install everything and run the whole test suite (unit, Redis, libvirt test driver, QEMU farm).
# Extra arguments go to pytest, e.g. `deploy/test.sh -m "not qemu"`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
./deploy/install.sh
# libvirtd re-probes QEMU on every call when /dev/kvm is root-only (FARM-NOTES.md).  This changes the host
# and is not undone (the QEMU farm does the same; README, "What the tests change on the host"): say so.
if [ -e /dev/kvm ] && [ "$(id -u)" -eq 0 ]; then
  was=$(stat -c '%U:%G %a' /dev/kvm)
  if [ "$was" != "root:kvm 660" ]; then
    getent group kvm >/dev/null || groupadd -r kvm
    chown root:kvm /dev/kvm && chmod 660 /dev/kvm
    echo "dynvm test: /dev/kvm: $was -> root:kvm 660 (left so; see README)" >&2
  fi
fi
# Lint and types are part of the suite (STYLE.md 14): a red ruff or mypy fails the run.
echo "dynvm test: ruff" >&2
.venv/bin/ruff check provisioner batch_hooks ha tests benchmarks images/build
echo "dynvm test: mypy --strict" >&2
.venv/bin/mypy
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "dynvm test: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
