"""load_config: the embedded default, the documented example, and one-line errors for bad files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from provisioner import config as config_module
from provisioner.config import Config, DomainType, IdentitySource, Strict, checkout_images_dir
from provisioner.configload import default_config, load_config
from provisioner.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "config"


def test_none_gives_the_embedded_default() -> None:
    cfg = load_config(None)
    assert cfg.domain_type is DomainType.TEST
    assert cfg.catalogue_dir == checkout_images_dir()
    assert {vo: (vc.image, vc.groups) for vo, vc in cfg.vos.items()} == {
        "cms": ("cms-wn", ["cms"]),
        "atlas": ("atlas-wn", ["atlas"]),
        "lhcb": ("lhcb-wn", ["lhcb"]),
    }
    assert cfg == default_config()


def test_documented_example_is_valid_and_uses_every_section() -> None:
    path = REPO / "deploy" / "dynvm.example.yaml"
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert cfg.hosts and cfg.hosts[0].fence_command
    assert cfg.identity.sources == list(IdentitySource)
    assert cfg.vos["cms"].accounts == ["cms", "cms-prod"]
    # Every field of every section of the schema is documented (present) in the example.
    text = path.read_text()
    for field in Config.model_fields:
        if field != "source":
            assert f"\n{field}:" in text, field
    sections = [m for m in vars(config_module).values() if isinstance(m, type) and issubclass(m, Strict)]
    for model in sections:
        for field in set(model.model_fields) - {"source"}:
            assert re.search(rf"[\s{{]{field}:", text), f"{model.__name__}.{field} is not in the example"


def test_error_names_file_line_and_dotted_path() -> None:
    path = DATA / "bad_host_uri.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value).startswith(f"{path}:10: hosts[2].uri: ")
    assert "42" in str(ei.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("colour: blue\n", ":1: colour: unknown key"),
        ("storage:\n  shared: /x\n", ":2: storage.shared: unknown key"),
        ("domain_type: xen\n", ":1: domain_type: Input should be 'kvm', 'qemu' or 'test'"),
        ("schema_version: 2\n", ":1: schema_version: "),
        ("vos:\n  cms:\n    image: cms-wn\n    groups: cms\n", ":4: vos.cms.groups: "),
        ("vos:\n  'cms;rm':\n    image: cms-wn\n", ":2: vos.<unrecognised key> (key): String should match"),
        (
            "hosts:\n  - {name: a, uri: 'test:///default'}\n  - {name: a, uri: 'test:///default'}\n",
            ":3: hosts[1].name: duplicate host name 'a'",
        ),
        (
            "vos:\n  cms: {image: a, groups: [g]}\n  atlas: {image: b, groups: [g]}\n",
            ":3: vos.atlas.groups[0]: 'g' is already mapped to VO 'cms'",
        ),
        ("source: /etc/x\n", ":1: source: unknown key"),
        ("redis_url: [1, 2]\n", ":1: redis_url: Input should be a valid string"),
    ],
)
def test_bad_values(tmp_path: Path, text: str, fragment: str) -> None:
    p = tmp_path / "dynvm.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(str(p)), msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_relative_paths_resolve_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # must not matter
    cfg = load_config(DATA / "relative.yaml")
    assert cfg.catalogue_dir == DATA / "cat"
    assert cfg.storage.shared_dir == DATA / "shared"
    assert cfg.storage.artefacts == DATA / "shared" / "images"
    assert cfg.storage.overlays == Path("/abs/overlays")


def test_malformed_and_non_utf8(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("hosts:\n  - name: a\n   uri: x\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: malformed YAML"):
        load_config(p)
    p.write_bytes(b"redis_url: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:1: not valid UTF-8 at byte offset 11"):
        load_config(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
