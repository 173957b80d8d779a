#!/usr/bin/env bash
# Install everything dynvm needs on a Debian 12 machine: system packages and a Python venv in .venv.
# Idempotent; safe to re-run.  Needs root (or sudo) for apt-get.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

PKGS=(redis-server libvirt-daemon-system libvirt-clients libvirt-dev pkg-config qemu-system-x86 qemu-utils
      busybox-static cpio iproute2 xz-utils python3-venv python3-dev gcc slurm-wlm munge redis-sentinel)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# CI always refreshes the package lists: the test-image build downloads the current Debian kernel package.
if [ ${#missing[@]} -gt 0 ] || [ -n "${CI:-}" ]; then
  $SUDO apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "dynvm install: apt-get install ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts these via systemd on a normal machine; we start our own private instances, so stop
# nothing and start nothing here.

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.dynvm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  log=$(mktemp)
  # The build requirements go into .venv too, so the wheel test (tests/install) builds offline with
  # --no-build-isolation.
  if ! .venv/bin/pip install -q "setuptools>=77" wheel >"$log" 2>&1 ||
     ! .venv/bin/pip install -q -e ".[test]" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "dynvm install: pip install failed (output above)" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
echo "dynvm install: ok ($(.venv/bin/dynvm --version 2>/dev/null || echo dynvm))" >&2
