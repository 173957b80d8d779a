"""Per-instance copy-on-write disks on the shared storage.

Each instance boots from ``<overlay root>/<instance id>.qcow2``, a qcow2 overlay whose backing file is the
catalogue image (absolute path: every host mounts the shared storage at the same place), so the instance can
start on any host with its data and the base image is only ever read.  All qemu-img calls go through
``run_qemu_img`` (list arguments, never a shell, always a timeout).  Files are created under a temporary
name and renamed, so a crash never leaves a half-written overlay under the final name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from provisioner.errors import (
    ConflictError,
    DeadlineExceeded,
    NotFoundError,
    TransientError,
    UnavailableError,
    ValidationError,
)

QEMU_IMG = "qemu-img"
DEFAULT_TIMEOUT_S = 60.0
FORMATS = frozenset({"qcow2", "raw"})
INSTANCE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DISK_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
OVERLAY_SUFFIX = ".qcow2"


class StorageError(TransientError):
    """qemu-img failed (disk full, shared storage hiccup): a retry may pass."""

    code = "storage"


def run_qemu_img(args: list[str], timeout_s: float = DEFAULT_TIMEOUT_S, culprit: str = "") -> str:
    """Run ``qemu-img ARGS`` and return its stdout; one-line dynvm errors naming ``culprit``."""
    what = culprit or (args[-1] if args else "")
    try:
        proc = subprocess.run(
            [QEMU_IMG, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise UnavailableError(f"{what}: {QEMU_IMG} is not installed") from None
    except subprocess.TimeoutExpired:
        raise DeadlineExceeded(f"{what}: qemu-img {args[0]} did not finish within {timeout_s:g}s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise StorageError(f"{what}: qemu-img {args[0]} failed: {reason}")
    return proc.stdout


def _check_format(fmt: str, where: str) -> str:
    if fmt not in FORMATS:
        raise ValidationError(f"{where}: format {fmt!r} is not one of {sorted(FORMATS)}")
    return fmt


def _check_path(path: Path, where: str) -> Path:
    text = str(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in text) or ".." in path.parts:
        raise ValidationError(f"{where}: unsafe path {text!r}")
    return path.absolute()


def image_info(path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """``qemu-img info --output=json`` of one file (-U: readable while a running guest holds its lock)."""
    path = _check_path(path, "image")
    if not path.is_file():
        raise NotFoundError(f"{path}: no such image file")
    out = run_qemu_img(["info", "--output=json", "-U", str(path)], timeout_s, culprit=str(path))
    try:
        info = json.loads(out)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{path}: qemu-img info printed no JSON: {exc}") from None
    if not isinstance(info, dict):
        raise StorageError(f"{path}: qemu-img info printed {type(info).__name__}, not an object")
    return info


def backing_file(path: Path, timeout_s: float = DEFAULT_TIMEOUT_S) -> Path | None:
    """The absolute backing file of an image, or None if it has none."""
    info = image_info(path, timeout_s)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if not backing:
        return None
    p = Path(backing)
    return p if p.is_absolute() else (Path(path).absolute().parent / p)


def _tmp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}")


def _create_atomically(dest: Path, options: list[str], size: str | None, timeout_s: float) -> None:
    tmp = _tmp_name(dest)
    try:
        args = ["create", "-q", *options, str(tmp), *([size] if size else [])]
        run_qemu_img(args, timeout_s, culprit=str(dest))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def create_overlay(
    base: Path,
    base_format: str,
    dest: Path,
    size_gib: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Create ``dest`` as a qcow2 overlay over ``base``; reuse it if it already has that backing file."""
    base = _check_path(base, "base")
    dest = _check_path(dest, "dest")
    _check_format(base_format, "base")
    if size_gib is not None and not 1 <= size_gib <= 65536:
        raise ValidationError(f"{dest}: size_gib {size_gib} is not in [1, 65536]")
    if not base.is_file():
        raise NotFoundError(f"{base}: base image does not exist")
    if dest.exists():
        current = backing_file(dest, timeout_s)
        if current is not None and current.resolve() == base.resolve():
            return dest
        raise ConflictError(f"{dest}: exists with backing file {current}, not {base}")
    if not dest.parent.is_dir():
        raise NotFoundError(f"{dest.parent}: overlay directory does not exist")
    size = f"{size_gib}G" if size_gib is not None else None
    _create_atomically(dest, ["-f", "qcow2", "-b", str(base), "-F", base_format], size, timeout_s)
    return dest


def create_blank(dest: Path, size_mib: int, fmt: str = "qcow2", timeout_s: float = DEFAULT_TIMEOUT_S) -> Path:
    """Create an empty disk (a service's own data disk); an existing one of that format is kept as is."""
    dest = _check_path(dest, "dest")
    _check_format(fmt, "dest")
    if not 1 <= size_mib <= 64 * 1024 * 1024:
        raise ValidationError(f"{dest}: size_mib {size_mib} is not in [1, {64 * 1024 * 1024}]")
    if dest.exists():
        info = image_info(dest, timeout_s)
        if info.get("format") == fmt and not info.get("backing-filename"):
            return dest  # keep the service's data
        backing = info.get("backing-filename")
        raise ConflictError(f"{dest}: exists as {info.get('format')} (backing {backing}), not a blank {fmt}")
    if not dest.parent.is_dir():
        raise NotFoundError(f"{dest.parent}: directory does not exist")
    _create_atomically(dest, ["-f", fmt], f"{size_mib}M", timeout_s)
    return dest


def overlay_path(overlay_root: Path, instance_id: str, disk: str | None = None) -> Path:
    """``<root>/<id>.qcow2`` (the root disk) or ``<root>/<id>.<disk>.qcow2`` (another disk)."""
    if not INSTANCE_ID_RE.fullmatch(instance_id):
        raise ValidationError(f"instance_id: invalid value {instance_id!r}")
    if disk is not None and not DISK_NAME_RE.fullmatch(disk):
        raise ValidationError(f"disk: invalid value {disk!r}")
    stem = instance_id if disk is None else f"{instance_id}.{disk}"
    return _check_path(overlay_root, "overlay_root") / f"{stem}{OVERLAY_SUFFIX}"


def list_overlays(root: Path) -> list[Path]:
    """Every overlay under ``root`` (temporary files of unfinished creations excluded)."""
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.absolute().iterdir()
        if p.is_file() and p.name.endswith(OVERLAY_SUFFIX) and not p.name.startswith(".")
    )


def remove_overlay(path: Path, overlay_root: Path) -> bool:
    """Delete an overlay; False if it was already gone.  Refuses anything outside ``overlay_root``."""
    path = _check_path(path, "path")
    root = _check_path(overlay_root, "overlay_root").resolve()
    resolved = path.parent.resolve() / path.name  # a symlinked file is removed, not its target
    if resolved.parent != root or not path.name.endswith(OVERLAY_SUFFIX):
        raise ValidationError(f"{path}: not an overlay directly under {root}; refusing to remove it")
    try:
        resolved.unlink()
    except FileNotFoundError:
        return False
    return True
