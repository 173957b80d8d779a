#!/bin/sh
# build-test-images.sh OUTDIR -- build dynvm's test images (kernel + busybox initramfs per image) from Debian
# packages into OUTDIR/test/ and write OUTDIR/manifest.json; cached by content hash (a re-run with the same
# inputs is a no-op).  Needs apt-get/dpkg-deb, busybox-static and python3 (standard library only).
# Environment: DYNVM_DEB_CACHE (where the kernel .deb is kept; default OUTDIR/.debs),
#              DYNVM_KERNEL_PKG (pin linux-image-6.1.*-amd64), DYNVM_BUSYBOX (default /bin/busybox).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
exec python3 "$HERE/build_test_images.py" "$@"
