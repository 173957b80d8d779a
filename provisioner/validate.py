"""Checks that span the configuration and the catalogue (each alone is validated where it is loaded)."""

from __future__ import annotations

from provisioner.catalogue.store import Catalogue, Finding, Severity
from provisioner.config import Config
from provisioner.errors import DynvmError
from provisioner.identity import image_for_vo


def check_config_against_catalogue(config: Config, catalogue: Catalogue) -> list[Finding]:
    """Every configured VO must resolve to a worker image that serves it (else its jobs would fail)."""
    findings: list[Finding] = []
    for vo in sorted(config.vos):
        try:
            image_for_vo(vo, catalogue, config)
        except DynvmError as err:
            findings.append(Finding(Severity.ERROR, config.source, None, f"vos.{vo}.image: {err.message}"))
    return findings
