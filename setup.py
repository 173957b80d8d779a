"""Build hook (the rest of the metadata is in pyproject.toml).

The default catalogue (``images/*.yaml``), the test-image build scripts (``images/build/``) and the
batch-system hooks (``deploy/slurm/``, ``deploy/htcondor/``) live at the top of the repository, outside the
``provisioner`` package.  A wheel holds only packages and their data, so this copies them into the built
package as ``provisioner/data/images`` and ``provisioner/data/deploy/{slurm,htcondor}`` (file modes kept:
the hook scripts and the build script stay executable); an installed dynvm finds them there
(``provisioner.catalogue.shipped``).  An editable install reads the checkout's ``images/`` and ``deploy/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# source (relative to the checkout) -> destination (relative to the built provisioner package)
SHIPPED = {
    "images": "data/images",
    "deploy/slurm": "data/deploy/slurm",
    "deploy/htcondor": "data/deploy/htcondor",
}
IGNORE = shutil.ignore_patterns("__pycache__", "*.py[co]", ".*")


class BuildPyWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        package = Path(self.build_lib) / "provisioner"
        for src, dest in SHIPPED.items():
            target = package / dest
            if target.exists():
                shutil.rmtree(target)  # a stale copy would ship files deleted from the checkout
            shutil.copytree(HERE / src, target, ignore=IGNORE)  # copy2: modes kept


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
