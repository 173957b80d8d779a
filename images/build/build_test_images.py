#!/usr/bin/env python3
"""Build dynvm's test images from Debian packages only (called by build-test-images.sh).

Artefacts, under OUTDIR/test/:
  vmlinux                 the uncompressed, PVH-bootable kernel (xz payload of Debian's bzImage; the bzImage
                          itself when the payload cannot be extracted)
  <image>.initrd.gz       busybox-static initramfs per image: workers cms-wn, atlas-wn, lhcb-wn (/etc/vo
                          differs) and services ce, se, wms (httpd on :80 from their own data disk)
and OUTDIR/manifest.json with the sha256 of every artefact.

Builds are cached by content hash: the key covers this script, the guest scripts, the busybox binary and the
kernel package's name and version.  Re-running with the same key is a no-op.  Output is reproducible (fixed
cpio/gzip timestamps), so the same inputs give the same checksums.

Only the standard library is used, so it runs before any virtualenv exists.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUEST = HERE / "guest"
BUSYBOX = Path(os.environ.get("DYNVM_BUSYBOX", "/bin/busybox"))
EXEC_PORT = "org.dynvm.exec.0"
WORKERS = {"cms-wn": "cms", "atlas-wn": "atlas", "lhcb-wn": "lhcb"}
SERVICES = ("ce", "se", "wms")
# Roots of the guest's module set; their dependencies come from each module's own modinfo `depends=`.
MODULE_ROOTS = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_console", "crc32c_generic", "ext4")


def log(msg: str) -> None:
    print(f"build-test-images: {msg}", file=sys.stderr)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(argv: list[str], cwd: Path | None = None) -> str:
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"build-test-images: {' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


APT_LISTS = Path("/var/lib/apt/lists")


def apt_state() -> str:
    """A cheap fingerprint of apt's package lists: the candidate kernel can only change when they do."""
    h = hashlib.sha256(os.environ.get("DYNVM_KERNEL_PKG", "").encode())
    for p in sorted(APT_LISTS.glob("*_Packages*")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_kernel() -> tuple[str, str]:
    """(package, version) of the Debian 6.1 amd64 kernel; DYNVM_KERNEL_PKG pins the package name."""
    pkg = os.environ.get("DYNVM_KERNEL_PKG", "")
    if not pkg:
        show = run(["apt-cache", "show", "--no-all-versions", "linux-image-amd64"])
        m = re.search(r"^Depends:.*?\b(linux-image-6\.1\.\S+-amd64) \(= (\S+)\)", show, re.M)
        if m is None:
            raise SystemExit("build-test-images: linux-image-amd64 has no linux-image-6.1.*-amd64 dependency")
        return m.group(1), m.group(2)
    if not re.fullmatch(r"linux-image-6\.1\.[0-9]+-[0-9]+-amd64", pkg):
        raise SystemExit(f"build-test-images: DYNVM_KERNEL_PKG={pkg!r} is no linux-image-6.1.*-amd64")
    m = re.search(r"^Version: (\S+)$", run(["apt-cache", "show", "--no-all-versions", pkg]), re.M)
    if m is None:
        raise SystemExit(f"build-test-images: apt-cache show {pkg} has no Version")
    return pkg, m.group(1)


def kernel_package(out: Path) -> tuple[str, str]:
    """resolve_kernel(), remembered in OUTDIR/.kernel.json while apt's lists stay the same (apt-cache
    takes ~0.5 s per call, which alone would break the < 1 s no-op rebuild)."""
    memo = out / ".kernel.json"
    state = apt_state()
    try:
        saved = json.loads(memo.read_text())
        if saved["apt_state"] == state:
            return str(saved["package"]), str(saved["version"])
    except (OSError, ValueError, KeyError):
        pass
    pkg, version = resolve_kernel()
    memo.write_text(json.dumps({"apt_state": state, "package": pkg, "version": version}) + "\n")
    return pkg, version


def fetch_deb(pkg: str, version: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    deb = cache / f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"
    if not deb.exists():
        log(f"apt-get download {pkg}={version}")
        run(["apt-get", "download", f"{pkg}={version}"], cwd=cache)
    return deb


def extract_vmlinux(bzimage: bytes) -> tuple[bytes, str]:
    """The ELF inside the bzImage's xz payload (boots PVH, ~2x faster under TCG) or the bzImage itself."""
    i = bzimage.find(b"\xfd7zXZ\x00")
    if i >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(bzimage[i:])
            if elf[:4] == b"\x7fELF":
                return elf, "vmlinux-pvh"
        except lzma.LZMAError:
            pass
    log("WARNING: no xz-compressed ELF in the bzImage; falling back to the bzImage (slower boots)")
    return bzimage, "bzimage"


def module_order(moddir: Path) -> list[tuple[str, Path]]:
    """MODULE_ROOTS and their dependencies, dependencies first (a depth-first topological order)."""
    files = {p.name.split(".ko")[0]: p for p in moddir.rglob("*.ko")}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path = files.get(name) or files.get(name.replace("-", "_"))
        if path is None:
            raise SystemExit(f"build-test-images: kernel module {name} not found under {moddir}")
        m = re.search(rb"\x00depends=([A-Za-z0-9_,-]*)\x00", path.read_bytes())
        for dep in (m.group(1).decode().split(",") if m else []):
            if dep:
                visit(dep)
        order.append((path.name.split(".ko")[0], path))

    for root in MODULE_ROOTS:
        visit(root)
    return order


class Cpio:
    """A deterministic newc archive (uid/gid 0, mtime 0, sorted by insertion order)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        nb = name.encode() + b"\x00"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        self.ino += 1
        self.buf.write(hdr.encode() + nb)
        self.buf.write(b"\x00" * (-(110 + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\x00" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.buf.getvalue()


def initramfs(image: str, role: str, vo: str | None, modules: list[tuple[str, Path]]) -> bytes:
    c = Cpio()
    for d in ("bin", "dev", "etc", "etc/dynvm", "lib", "lib/modules", "proc", "sys", "tmp", "run", "data"):
        c.dir(d)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    c.file("init", (GUEST / "init").read_bytes(), 0o755)
    for script in ("exec-runner.sh", "service.sh"):
        c.file(f"etc/dynvm/{script}", (GUEST / script).read_bytes(), 0o755)
    c.file("etc/dynvm/image", f"{image}\n".encode())
    c.file("etc/dynvm/role", f"{role}\n".encode())
    c.file("etc/dynvm/exec-port", f"{EXEC_PORT}\n".encode())
    c.file("etc/dynvm/modules", "".join(f"{n}\n" for n, _ in modules).encode())
    c.file("etc/vo", f"{vo or 'none'}\n".encode())
    c.file("etc/hostname", f"{image}\n".encode())
    for name, path in modules:
        c.file(f"lib/modules/{name}.ko", path.read_bytes())
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(c.finish())
    return out.getvalue()


def build_key(pkg: str, version: str) -> str:
    h = hashlib.sha256()
    for p in sorted([Path(__file__).resolve(), *GUEST.iterdir()]):
        h.update(p.name.encode() + b"\x00" + p.read_bytes())
    h.update(sha256_file(BUSYBOX).encode())
    h.update(f"{pkg}={version}".encode())
    return h.hexdigest()


def up_to_date(out: Path, key: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("build_key") != key:
        return False
    arts = manifest.get("artefacts", {})
    return bool(arts) and all((out / rel).is_file() and (out / rel).stat().st_size == a["size"]
                              for rel, a in arts.items())


def build(out: Path, pkg: str, version: str, key: str) -> dict[str, object]:
    deb = fetch_deb(pkg, version, Path(os.environ.get("DYNVM_DEB_CACHE", str(out / ".debs"))))
    (out / "test").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dynvm-kx-") as tmp:
        x = Path(tmp)
        run(["dpkg-deb", "-x", str(deb), str(x)])
        bz = next((x / "boot").glob("vmlinuz-*"))
        kernel, kind = extract_vmlinux(bz.read_bytes())
        moddir = next((x / "lib" / "modules").iterdir())
        modules = module_order(moddir)
        files: dict[str, bytes] = {"test/vmlinux": kernel}
        for image, vo in WORKERS.items():
            files[f"test/{image}.initrd.gz"] = initramfs(image, "worker", vo, modules)
        for image in SERVICES:
            files[f"test/{image}.initrd.gz"] = initramfs(image, "service", None, modules)
    artefacts: dict[str, dict[str, object]] = {}
    for rel, data in files.items():
        tmpf = out / f"{rel}.tmp"
        tmpf.write_bytes(data)
        os.replace(tmpf, out / rel)  # atomic: a reader never sees half an artefact
        artefacts[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    images: dict[str, dict[str, object]] = {}
    for image, vo in WORKERS.items():
        images[image] = {"kind": "worker", "vo": vo, "kernel": "test/vmlinux",
                         "initrd": f"test/{image}.initrd.gz"}
    for image in SERVICES:
        images[image] = {"kind": "service", "kernel": "test/vmlinux", "initrd": f"test/{image}.initrd.gz"}
    return {
        "build_key": key, "kernel_package": pkg, "kernel_version": version, "kernel_kind": kind,
        "modules": [n for n, _ in modules], "exec_port": EXEC_PORT,
        "artefacts": artefacts, "images": images,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: build-test-images.sh OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not BUSYBOX.is_file():
        raise SystemExit(f"build-test-images: {BUSYBOX} missing (apt-get install busybox-static)")
    pkg, version = kernel_package(out)
    key = build_key(pkg, version)
    if up_to_date(out, key):
        log(f"up to date ({pkg} {version}, key {key[:12]})")
        return 0
    manifest = build(out, pkg, version, key)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "manifest.json")
    log(f"built {len(manifest['artefacts'])} artefacts from {pkg} {version} into {out}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
