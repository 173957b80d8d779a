"""Where the default catalogue and the test-image build scripts are, in a checkout and in an installed wheel.

A checkout keeps them at the top level (``images/*.yaml``, ``images/build/``); a wheel carries a copy inside
the package (``provisioner/data/images``, put there by ``setup.py``'s build step), because an installed
package has no source tree around it.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # .../provisioner


def images_dir() -> Path:
    """The checkout's ``images/`` in a source tree (editable install), else the shipped copy."""
    root = _PACKAGE.parent
    if (root / "pyproject.toml").is_file() and (root / "images").is_dir():
        return root / "images"
    return _PACKAGE / "data" / "images"


def build_scripts_dir() -> Path:
    """``images/build``: ``build-test-images.sh`` and the guest files it packs into the test initramfs."""
    return images_dir() / "build"
