"""Overlays and blank disks with the real qemu-img (and qemu-io to write through an overlay)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from provisioner.errors import ConflictError, NotFoundError, ValidationError
from provisioner.storage.overlay import (
    StorageError,
    backing_file,
    create_blank,
    create_overlay,
    image_info,
    list_overlays,
    overlay_path,
    remove_overlay,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io(image: Path, fmt: str, command: str) -> str:
    out = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(image)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    out = {}
    for fmt in ("qcow2", "raw"):
        p = d / f"base.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(p), "4M"], check=True, timeout=30)
        qemu_io(p, fmt, "write -P 0x5a 0 64k")
        out[fmt] = p
    return out


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "instances"
    r.mkdir()
    return r


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_base_is_never_written(bases: dict[str, Path], root: Path, fmt: str) -> None:
    base = bases[fmt]
    digest, mtime = sha256(base), base.stat().st_mtime_ns
    ov = create_overlay(base, fmt, overlay_path(root, "i-1"))
    assert backing_file(ov) == base
    assert "pattern verification failed" not in qemu_io(ov, "qcow2", "read -P 0x5a 0 64k")
    qemu_io(ov, "qcow2", "write -P 0xa5 0 64k")
    assert "pattern verification failed" not in qemu_io(ov, "qcow2", "read -P 0xa5 0 64k")
    assert "pattern verification failed" not in qemu_io(base, fmt, "read -P 0x5a 0 64k")
    assert sha256(base) == digest
    assert base.stat().st_mtime_ns == mtime


def test_create_overlay_is_idempotent(bases: dict[str, Path], root: Path) -> None:
    dest = overlay_path(root, "i-2")
    create_overlay(bases["qcow2"], "qcow2", dest)
    qemu_io(dest, "qcow2", "write -P 0x11 0 4k")
    digest = sha256(dest)
    assert create_overlay(bases["qcow2"], "qcow2", dest) == dest
    assert sha256(dest) == digest  # reused, not recreated
    with pytest.raises(ConflictError, match=str(dest)):
        create_overlay(bases["raw"], "raw", dest)


def test_overlay_size(bases: dict[str, Path], root: Path) -> None:
    ov = create_overlay(bases["qcow2"], "qcow2", overlay_path(root, "i-3"), size_gib=1)
    assert image_info(ov)["virtual-size"] == 1024**3


def test_overlay_input_errors(bases: dict[str, Path], root: Path) -> None:
    with pytest.raises(NotFoundError, match=r"missing\.qcow2"):
        create_overlay(root / "missing.qcow2", "qcow2", overlay_path(root, "i-4"))
    with pytest.raises(ValidationError, match="vmdk"):
        create_overlay(bases["qcow2"], "vmdk", overlay_path(root, "i-4"))
    with pytest.raises(NotFoundError, match="nodir"):
        create_overlay(bases["qcow2"], "qcow2", root / "nodir" / "i-4.qcow2")
    with pytest.raises(ValidationError, match="size_gib"):
        create_overlay(bases["qcow2"], "qcow2", overlay_path(root, "i-4"), size_gib=0)


def test_qemu_img_failure_is_one_line_and_leaves_nothing(bases: dict[str, Path], root: Path) -> None:
    dest = overlay_path(root, "i-5")
    with pytest.raises(StorageError) as info:
        create_overlay(bases["raw"], "qcow2", dest)  # wrong backing format: qemu-img refuses
    assert str(dest) in str(info.value) and "\n" not in str(info.value)
    assert list(root.iterdir()) == []


def test_create_blank_keeps_existing_data(bases: dict[str, Path], root: Path) -> None:
    dest = overlay_path(root, "svc-1", disk="data")
    assert dest.name == "svc-1.data.qcow2"
    create_blank(dest, 16)
    assert image_info(dest)["virtual-size"] == 16 * 1024**2
    assert backing_file(dest) is None
    qemu_io(dest, "qcow2", "write -P 0x42 0 4k")
    create_blank(dest, 16)
    assert "pattern verification failed" not in qemu_io(dest, "qcow2", "read -P 0x42 0 4k")
    ov = create_overlay(bases["qcow2"], "qcow2", overlay_path(root, "svc-2"))
    with pytest.raises(ConflictError):
        create_blank(ov, 16)
    raw = create_blank(root / "r.raw", 1, fmt="raw")
    assert json.loads(json.dumps(image_info(raw)))["format"] == "raw"


@pytest.mark.parametrize("bad", ["../x", "A", "", "x/y", "x" * 65, "i-1\n", "é"])
def test_overlay_path_refuses_bad_ids(root: Path, bad: str) -> None:
    with pytest.raises(ValidationError, match="instance_id"):
        overlay_path(root, bad)


def test_list_and_remove(bases: dict[str, Path], root: Path, tmp_path: Path) -> None:
    a = create_overlay(bases["qcow2"], "qcow2", overlay_path(root, "a"))
    b = create_overlay(bases["qcow2"], "qcow2", overlay_path(root, "b"))
    (root / ".c.qcow2.tmp-1").write_bytes(b"")  # an unfinished creation is not an overlay
    assert list_overlays(root) == [a, b]
    assert remove_overlay(a, root) is True
    assert remove_overlay(a, root) is False
    assert list_overlays(root) == [b]
    assert list_overlays(tmp_path / "absent") == []


def test_remove_refuses_outside_root(bases: dict[str, Path], root: Path) -> None:
    with pytest.raises(ValidationError, match="refusing"):
        remove_overlay(bases["qcow2"], root)
    with pytest.raises(ValidationError):
        remove_overlay(root / ".." / "x.qcow2", root)
    assert bases["qcow2"].exists()
