"""The demo's timeline reads right: articles, and warnings shown or explained (issue 11)."""

from __future__ import annotations

from provisioner.catalogue.store import Finding, Severity
from provisioner.cli.demo import article, explain_warnings


def test_articles() -> None:
    assert [f"{article(v)} {v}" for v in ("cms", "atlas", "lhcb", "alice")] == [
        "a cms",
        "an atlas",
        "a lhcb",
        "an alice",
    ]


def missing(name: str) -> Finding:
    return Finding(
        Severity.WARNING,
        f"images/{name}.yaml",
        17,
        f"versions[0].boot.kernel.path: missing artefact 'x/{name}'",
    )


def test_test_driver_missing_artefacts_are_explained_in_one_line() -> None:
    other = Finding(Severity.WARNING, "images/ce.yaml", 3, "channel 'testing' names a retired version")
    lines = explain_warnings([missing("cms-wn"), missing("ce"), other], "test")
    assert lines[0] == f"  {other}"  # any other warning is shown as it is
    assert lines[1].startswith("  2 warnings: kernel/initrd artefacts not built on this machine")
    assert "test driver boots no kernel" in lines[1] and len(lines) == 2


def test_on_qemu_every_warning_is_shown() -> None:
    ws = [missing("cms-wn"), missing("ce")]
    assert explain_warnings(ws, "qemu") == [f"  {w}" for w in ws]
