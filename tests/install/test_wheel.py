"""A site installs dynvm from a wheel (``pip install .``, not editable): it must find its default catalogue,
the test-image build scripts and the batch-system hooks (deploy/slurm, deploy/htcondor) without a checkout
around it, and ``dynvm demo`` must run from anywhere (through Slurm with the shipped hooks where Slurm is
installed and it runs as root).

How the fresh environment gets its dependencies without downloading them again: the wheel is built from a
copy of the tree with ``--no-build-isolation`` (.venv has the build requirements, install.sh puts them
there) and installed with ``--no-deps`` into a new venv that has no pip of its own (``pip --python``);
only THEN a ``.pth`` line appends .venv's site-packages to the new venv's path.  A plain path line does not
run the ``.pth`` files inside that directory, so .venv's editable dynvm never activates: dynvm comes from
the wheel, its dependencies from .venv.  (Declared dependencies are not exercised this way; the editable
install in install.sh resolves them from the same pyproject.toml.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.farm.slurm import missing_programs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SKIP = {".venv", ".git", "build", "dist", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "var"}


@dataclass
class Installed:
    wheel: Path
    venv: Path
    cwd: Path  # a directory outside the checkout
    env: dict[str, str]
    site: Path  # the fresh venv's site-packages

    def dynvm(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / "dynvm"), *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )

    def python(self, code: str) -> str:
        p = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", code],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60, check=True,
        )
        return p.stdout.strip()


def _copy_tree(dest: Path) -> None:
    def ignore(d: str, names: list[str]) -> set[str]:
        top = Path(d) == REPO
        return {n for n in names if (top and n in SKIP) or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)


def _run(cmd: list[str], **kw: object) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, **kw)  # type: ignore[call-overload]
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("wheel")
    src, dist, venv = base / "src", base / "dist", base / "venv"
    _copy_tree(src)
    py = sys.executable
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("dynvm-*.whl")
    _run([py, "-m", "venv", "--without-pip", str(venv)])
    vpy = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "--python", vpy, "install", "-q", "--no-deps", str(wheel)])
    site = Path(
        subprocess.run(
            [vpy, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    ).resolve()
    (site / "_dynvm_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    cwd = base / "elsewhere"
    (cwd / "home").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNVM_") and k != "PYTHONPATH"}
    env.update(
        HOME=str(cwd / "home"),
        XDG_CACHE_HOME=str(cwd / "home" / ".cache"),
        DYNVM_FARM_DIR=str(base / "farm"),
        PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    )
    yield Installed(wheel, venv, cwd, env, site)


def test_wheel_ships_the_catalogue_and_the_image_build_scripts(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        script = z.getinfo("provisioner/data/images/build/build-test-images.sh")
        mode = script.external_attr >> 16
    data = "provisioner/data/images/"
    shipped = {Path(n).name for n in names if n.startswith(data) and n.endswith(".yaml")}
    assert shipped == {p.name for p in (REPO / "images").glob("*.yaml")}
    for rel in ("build/build_test_images.py", "build/guest/init", "build/guest/exec-runner.sh"):
        assert f"provisioner/data/images/{rel}" in names
    assert mode & 0o111, "the build script must stay executable (the farm runs it directly)"
    hooks = ("provisioner/data/deploy/slurm/", "provisioner/data/deploy/htcondor/")
    assert not [n for n in names if n.startswith("provisioner/data/") and not n.startswith((data, *hooks))]


def test_wheel_ships_the_batch_system_hooks_executable(installed: Installed) -> None:
    """deploy/slurm and deploy/htcondor, every file, each script still executable (a site copies them as they
    are; the demo's private Slurm runs them)."""
    with zipfile.ZipFile(installed.wheel) as z:
        modes = {i.filename: i.external_attr >> 16 for i in z.infolist()}
    for system in ("slurm", "htcondor"):
        src = REPO / "deploy" / system
        prefix = f"provisioner/data/deploy/{system}/"
        assert {n[len(prefix):] for n in modes if n.startswith(prefix)} == {p.name for p in src.iterdir()}
        for f in src.iterdir():
            executable = bool(f.stat().st_mode & 0o111)
            assert bool(modes[prefix + f.name] & 0o111) == executable, f"{system}/{f.name}"
    assert modes["provisioner/data/deploy/slurm/prolog-slurmctld"] & 0o111  # the check above is not vacuous
    for system in ("slurm", "htcondor"):
        p = installed.dynvm("hook", "files", system)
        assert p.returncode == 0, p.stderr
        where = Path(p.stdout.strip())
        assert where == installed.site / "provisioner" / "data" / "deploy" / system, where
    found = installed.python("import provisioner.farm.slurm as s; print(s.shipped_hooks_dir())")
    assert Path(found) == installed.site / "provisioner" / "data" / "deploy" / "slurm"
    for name in ("prolog-slurmctld", "epilog-slurmctld", "task-prolog", "payload"):
        assert os.access(Path(found) / name, os.X_OK), f"{name} lost its executable bit on install"
    assert os.access(where / "condor-job-wrapper", os.X_OK)


def test_installed_dynvm_finds_its_catalogue_outside_the_checkout(installed: Installed) -> None:
    where = installed.python(
        "import provisioner, provisioner.config as c; "
        "print(provisioner.__file__); print(c.checkout_images_dir())"
    )
    pkg, images = where.splitlines()
    assert pkg.startswith(str(installed.venv)), f"dynvm imported from {pkg}, not from the installed wheel"
    assert images.startswith(str(installed.venv)) and Path(images, "build", "build-test-images.sh").is_file()
    p = installed.dynvm("-o", "json", "image", "list")
    assert p.returncode == 0, p.stderr
    names = {row["name"] for row in json.loads(p.stdout)}
    assert names == {"atlas-wn", "ce", "cms-wn", "lhcb-wn", "se", "wms"}
    v = installed.dynvm("image", "validate")
    assert v.returncode == 0, v.stdout + v.stderr


def test_installed_dynvm_runs_the_demo_outside_the_checkout(installed: Installed) -> None:
    """Where Slurm is installed (CI installs it) and this runs as root, the demo must take the Slurm path with
    the wheel's hooks: one plain sbatch job per VO, each COMPLETED and its VM released by EpilogSlurmctld.
    Elsewhere it requests the VMs directly."""
    slurm = os.geteuid() == 0 and not missing_programs()
    try:
        p = installed.dynvm("demo", "--per-vo", "1", timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr
        text = p.stdout
        if slurm:
            assert str(installed.site / "provisioner" / "data" / "deploy" / "slurm") in text, text
            for vo in ("cms", "atlas", "lhcb"):
                assert f"submitted by {vo}001 (VO {vo}) with plain sbatch" in text, text
            assert text.count(": COMPLETED (exit 0:0)") == 3, text
            assert text.count("released by EpilogSlurmctld") == 3, text
        else:
            assert "requesting the VMs directly" in text and text.count(": ready on hv") == 3, text
    finally:
        down = installed.dynvm("farm", "down", timeout=120)
    assert down.returncode == 0, down.stderr
    st = installed.dynvm("-o", "json", "farm", "status")
    assert st.returncode == 0 and json.loads(st.stdout)["up"] is False, st.stdout
