"""One QEMU farm (3 hosts) and one image build per test session (marker ``qemu``; root only).

Images are built into DYNVM_TEST_CACHE (default /var/cache/dynvm-test; a warm re-run is a no-op) and the
farm lives under it too, so each host's libvirt capabilities cache survives between runs (the first define
on a fresh host costs ~4 s).  Only one test session may use the farm at a time.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.farm.qemu import QemuFarm
from tests.farm_qemu.guests import Guests

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DYNVM_TEST_CACHE", "/var/cache/dynvm-test"))


@pytest.fixture(scope="session")
def qemu_images() -> Path:
    if os.geteuid() != 0:
        pytest.fail("the QEMU farm tests need root (deselect them with -m 'not qemu')")
    out = CACHE / "images"
    p = subprocess.run(
        [str(REPO / "images" / "build" / "build-test-images.sh"), str(out)],
        env={**os.environ, "DYNVM_DEB_CACHE": str(CACHE / "debs")},
        capture_output=True, text=True, timeout=600, check=False,
    )
    if p.returncode != 0:
        pytest.fail(f"image build failed: {p.stderr.strip()}")
    return out


@pytest.fixture(scope="session")
def qemu_farm(qemu_images: Path) -> Iterator[QemuFarm]:
    farm = QemuFarm(CACHE / "farm", 3)
    farm.up()
    yield farm
    farm.down()
    assert farm.leftovers() == []


@pytest.fixture()
def guests(qemu_farm: QemuFarm, qemu_images: Path) -> Iterator[Guests]:
    g = Guests(qemu_farm, qemu_images)
    yield g
    g.cleanup()
