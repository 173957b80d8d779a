"""``dynvm service`` on the real Redis: declarations, one address per service, export/apply round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.redis


def test_declare_defaults_from_the_image_and_lists(cli, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["-o", "json", "service", "declare", "ce-01", "--image", "ce", "--address", "10.9.0.10"]
    rc, out, err = cli(capsys, *argv)
    assert rc == 0, err
    d = json.loads(out)
    assert d["priority"] == "critical" and d["anti_affinity"] == "ce"  # ce.yaml's HA policy
    argv = ["-o", "json", "service", "declare", "se-01", "--image", "se:stable", "--priority", "high"]
    rc, out, _ = cli(capsys, *argv, "--after", "ce-01")
    assert rc == 0
    rc, out, _ = cli(capsys, "-o", "json", "service", "list")
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["ce-01", "se-01"]
    assert rows[1]["after"] == ["ce-01"] and rows[1]["priority"] == "high"


def test_one_address_one_service(cli, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli(capsys, "service", "declare", "ce-01", "--image", "ce", "--address", "10.9.0.10")[0] == 0
    rc, _, err = cli(capsys, "service", "declare", "ce-02", "--image", "ce", "--address", "10.9.0.10")
    assert rc == 4 and "10.9.0.10 is declared by ce-01" in err and len(err.strip().splitlines()) == 1
    # the same service may change its own address, and frees the old one
    assert cli(capsys, "service", "declare", "ce-01", "--image", "ce", "--address", "10.9.0.11")[0] == 0
    assert cli(capsys, "service", "declare", "ce-02", "--image", "ce", "--address", "10.9.0.10")[0] == 0


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["declare", "CE!", "--image", "ce"], 2, "is not a service name"),
        (["declare", "ce-01", "--image", "cms-wn"], 2, "is a worker image"),
        (["declare", "ce-01", "--image", "nosuch"], 3, "nosuch"),
        (["declare", "ce-01", "--image", "ce", "--address", "10.0.0.300"], 2, "not an IPv4 address"),
        (["declare", "ce-01", "--image", "ce", "--after", "ghost"], 2, "unknown service 'ghost'"),
        (["declare", "ce-01", "--image", "ce", "--after", "ce-01"], 2, "not another service's name"),
        (["show", "nosuch"], 3, "not declared"),
        (["remove", "nosuch"], 3, "not declared"),
        (["show", "x" * 5000], 2, "malformed"),
    ],
)
def test_bad_declarations_are_one_line_errors(cli, capsys, argv, code, needle) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = cli(capsys, "service", *argv)
    assert rc == code, err
    assert needle in err and len(err.strip().splitlines()) == 1 and len(err) < 1000


def test_export_apply_round_trip_and_prune(cli, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cli(capsys, "service", "declare", "ce-01", "--image", "ce", "--address", "10.9.0.10")
    cli(capsys, "service", "declare", "wms-01", "--image", "wms")
    rc, exported, _ = cli(capsys, "service", "export")
    assert rc == 0 and "ce-01" in exported
    f = tmp_path / "services.yaml"
    f.write_text(exported.replace("wms-01", "wms-02"))
    rc, out, err = cli(capsys, "-o", "json", "service", "apply", str(f), "--prune")
    assert rc == 0, err
    assert json.loads(out) == {"declared": ["ce-01", "wms-02"], "removed": ["wms-01"]}
    rc, out, _ = cli(capsys, "-o", "json", "service", "list")
    assert [r["name"] for r in json.loads(out)] == ["ce-01", "wms-02"]
    f.write_text(
        "services:\n"
        "  - {name: a1, image: ce, address: 10.9.0.1}\n"
        "  - {name: a2, image: ce, address: 10.9.0.1}\n"
    )
    rc, _, err = cli(capsys, "service", "apply", str(f))
    assert rc == 2 and "also a1's" in err
    rc, out, _ = cli(capsys, "-o", "json", "service", "list")
    assert [r["name"] for r in json.loads(out)] == ["ce-01", "wms-02"]  # nothing applied from a bad file
