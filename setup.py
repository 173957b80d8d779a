"""Build hook (the rest of the metadata is in pyproject.toml).

The default catalogue (``images/*.yaml``) and the test-image build scripts (``images/build/``) live at the
top of the repository, outside the ``provisioner`` package.  A wheel holds only packages and their data,
so this copies ``images/`` into the built package as ``provisioner/data/images``; an installed dynvm finds
it there (``provisioner.catalogue.shipped``).  An editable install reads the checkout's ``images/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithImages(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "provisioner" / "data" / "images"
        if dest.exists():
            shutil.rmtree(dest)  # a stale copy would ship files deleted from images/
        shutil.copytree(HERE / "images", dest, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]", ".*"))


setup(cmdclass={"build_py": BuildPyWithImages})
