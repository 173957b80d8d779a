"""Build a real catalogue + artefact root in a temp dir from the shipped images/ entries."""

from __future__ import annotations

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
DATA = REPO / "tests" / "data" / "catalogue"
PLACEHOLDER = "local"  # the shipped files do not pin the test artefacts (built on each machine)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_artefacts(root: Path) -> dict[str, str]:
    """Small real artefact files for every path the shipped catalogue names; returns path -> sha256."""
    sums: dict[str, str] = {}
    for text in (p.read_text() for p in sorted(IMAGES.glob("*.yaml"))):
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("path: "):
                rel = line.removeprefix("path: ").strip()
                data = f"artefact {rel}\n".encode()
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
                sums[rel] = sha(data)
    return sums


def make_catalogue(tmp: Path, real_checksums: bool = True) -> tuple[Path, Path]:
    """(catalogue dir, artefact root): a copy of images/ whose checksums are pinned to the artefacts (with
    ``real_checksums=False``: left as shipped, ``sha256: local``)."""
    cat, root = tmp / "catalogue", tmp / "artefacts"
    cat.mkdir()
    root.mkdir()
    sums = make_artefacts(root)
    for src in sorted(IMAGES.glob("*.yaml")):
        lines = src.read_text().splitlines(keepends=True)
        out = []
        current = None
        for line in lines:
            s = line.strip()
            if s.startswith("path: "):
                current = s.removeprefix("path: ").strip()
            if real_checksums and s.startswith("sha256: ") and current is not None:
                line = line.replace(PLACEHOLDER, f'"{sums[current]}"')
            out.append(line)
        (cat / src.name).write_text("".join(out))
    return cat, root


def write_config(tmp: Path, cat: Path, root: Path, extra: str = "") -> Path:
    cfg = tmp / "dynvm.yaml"
    cfg.write_text(
        f"domain_type: test\ncatalogue_dir: {cat}\nstorage:\n  shared_dir: {tmp}\n  artefact_dir: {root}\n"
        "vos:\n  cms: {image: cms-wn, groups: [cms]}\n  atlas: {image: atlas-wn, groups: [atlas]}\n"
        "  lhcb: {image: lhcb-wn, groups: [lhcb]}\n" + extra
    )
    return cfg
