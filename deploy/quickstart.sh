#!/usr/bin/env bash
# Install everything, bring up the embedded default farm and run dynvm's main job on it.
# DRIVER=qemu runs real QEMU guests instead of libvirt's test driver (root only).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
./deploy/install.sh
exec .venv/bin/dynvm demo --driver "${DRIVER:-test}" --hosts "${HOSTS:-3}"
