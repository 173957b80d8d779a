"""Write the farm's catalogue: the checked-in images/*.yaml with the checksums of what was really built.

The checked-in files carry placeholder checksums for the test artefacts (``test/vmlinux``,
``test/<image>.initrd.gz``); the build's manifest knows the real ones, so a new Debian kernel release changes
the farm's catalogue instead of turning CI red.  Artefacts the manifest does not know are left untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError as PydanticValidationError

from provisioner.catalogue.model import ImageFamily
from provisioner.errors import CatalogueError, NotFoundError


def _load_manifest(manifest: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(manifest.read_text())
        arts = data["artefacts"]
    except FileNotFoundError:
        raise NotFoundError(f"{manifest}: no build manifest (run build-test-images.sh)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CatalogueError(f"{manifest}: not a build manifest ({e})") from None
    if not isinstance(arts, dict):
        raise CatalogueError(f"{manifest}: 'artefacts' is not a mapping")
    return arts


def _patch(node: Any, arts: dict[str, dict[str, Any]], artefact_dir: Path, where: str) -> int:
    """Replace sha256 of every {path, sha256} mapping whose path the manifest knows; count them."""
    n = 0
    if isinstance(node, dict):
        path = node.get("path")
        if isinstance(path, str) and "sha256" in node and path in arts:
            if not (artefact_dir / path).is_file():
                raise NotFoundError(f"{where}: artefact {path} is in the manifest but not in {artefact_dir}")
            node["sha256"] = arts[path]["sha256"]
            n += 1
        for key, value in node.items():
            n += _patch(value, arts, artefact_dir, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            n += _patch(value, arts, artefact_dir, f"{where}[{i}]")
    return n


def write_farm_catalogue(src: Path, artefact_dir: Path, manifest: Path, dest: Path) -> dict[str, int]:
    """Copy ``src``/*.yaml into ``dest`` with the manifest's checksums; returns {file: artefacts patched}.

    Each written file is validated against the catalogue schema and replaced atomically.
    """
    arts = _load_manifest(manifest)
    files = sorted(src.glob("*.yaml"))
    if not files:
        raise NotFoundError(f"{src}: no catalogue files (*.yaml)")
    dest.mkdir(parents=True, exist_ok=True)
    patched: dict[str, int] = {}
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text())
        except yaml.YAMLError as e:
            raise CatalogueError(f"{f}: not YAML ({str(e).splitlines()[0]})") from None
        n = _patch(doc, arts, artefact_dir, f.name)
        try:
            ImageFamily.model_validate(doc)
        except PydanticValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise CatalogueError(f"{f}: {loc}: {err['msg']}") from None
        tmp = dest / f".{f.name}.tmp"
        if n:
            header = f"# Written by dynvm from {f} with the checksums of {manifest}.\n"
            tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False))
        else:
            shutil.copyfile(f, tmp)
        os.replace(tmp, dest / f.name)
        patched[f.name] = n
    return patched
