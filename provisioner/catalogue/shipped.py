"""Where the default catalogue, the test-image build scripts and the batch-system hooks are, in a checkout
and in an installed wheel.

A checkout keeps them at the top level (``images/*.yaml``, ``images/build/``, ``deploy/slurm``,
``deploy/htcondor``); a wheel carries a copy inside the package (``provisioner/data/images``,
``provisioner/data/deploy/{slurm,htcondor}``, put there by ``setup.py``'s build step), because an installed
package has no source tree around it.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # .../provisioner


def _checkout(name: str) -> Path | None:
    """``name`` at the top of the source tree this package runs from (editable install), else None."""
    root = _PACKAGE.parent
    if (root / "pyproject.toml").is_file() and (root / name).is_dir():
        return root / name
    return None


def images_dir() -> Path:
    """The checkout's ``images/`` in a source tree (editable install), else the shipped copy."""
    return _checkout("images") or _PACKAGE / "data" / "images"


def build_scripts_dir() -> Path:
    """``images/build``: ``build-test-images.sh`` and the guest files it packs into the test initramfs."""
    return images_dir() / "build"


def deploy_dir() -> Path:
    """The checkout's ``deploy/`` in a source tree (editable install), else the shipped copy, which holds
    only the batch-system hooks (``slurm/``, ``htcondor/``): what a site installs on its batch machines."""
    return _checkout("deploy") or _PACKAGE / "data" / "deploy"
