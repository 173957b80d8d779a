"""The YAML reader: line numbers, one-line errors, and every malformed input a located error."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from provisioner import yamlio
from provisioner.errors import ConfigError


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str
    port: int = 1


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hosts: list[Inner]


def write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "dynvm.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def err_of(path: Path, model: type[BaseModel] = Outer) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        yamlio.validate_model(yamlio.load(path, ConfigError), model, ConfigError)
    return ei.value


def test_lines_are_recorded_for_keys_and_items(tmp_path: Path) -> None:
    doc = yamlio.load(write(tmp_path, "hosts:\n  - uri: a\n  - uri: b\n    port: 2\n"), ConfigError)
    assert doc.line(("hosts",)) == 1
    assert doc.line(("hosts", 1)) == 3
    assert doc.line(("hosts", 1, "port")) == 4
    assert doc.line(("hosts", 1, "nothing", "deeper")) == 3  # longest known prefix


def test_validation_error_names_file_line_and_dotted_path(tmp_path: Path) -> None:
    p = write(tmp_path, "hosts:\n  - uri: a\n  - uri: b\n  - uri: c\n    port: many\n")
    err = err_of(p)
    assert str(err).startswith(f"{p}:5: hosts[2].port: ")
    assert "'many'" in str(err)
    assert "\n" not in str(err)
    assert yamlio.where(err) == (str(p), 5)


def test_unknown_key_and_missing_key(tmp_path: Path) -> None:
    err = err_of(write(tmp_path, "hosts:\n  - uri: a\n    colour: red\n"))
    assert ":3: hosts[0].colour: unknown key" in str(err)
    err = err_of(write(tmp_path, "hosts:\n  - port: 3\n"))
    assert ":2: hosts[0].uri: required key is missing" in str(err)


def test_several_problems_are_counted_in_one_line(tmp_path: Path) -> None:
    err = err_of(write(tmp_path, "hosts:\n  - port: x\n  - port: y\n"))
    assert "more problem" in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("hosts: [a, b\n", 2, "malformed YAML"),
        ("hosts:\n\t- uri: a\n", 2, "malformed YAML"),
        ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a' (first at line 1)"),
        ("x:\n  'k': 1\n  k: 2\n", 3, "x.k: duplicate key"),
        ("- a\n- b\n", 1, "top level must be a mapping, got list"),
        ("just a string\n", 1, "top level must be a mapping, got str"),
        ("a: !!python/object:os.system x\n", 1, "malformed YAML"),
    ],
)
def test_malformed_documents_are_located(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        yamlio.load(p, ConfigError)
    assert str(ei.value).startswith(f"{p}:{line}: ")
    assert fragment in str(ei.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match="empty file"):
        yamlio.load(p, ConfigError)


def test_non_utf8_names_byte_offset_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, b"a: 1\nb: caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        yamlio.load(p, ConfigError)
    assert str(ei.value).startswith(f"{p}:2: not valid UTF-8 at byte offset 11")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        yamlio.load(tmp_path / "nope.yaml", ConfigError)
    with pytest.raises(ConfigError, match=r"not a regular file \(a directory\)"):
        yamlio.load(tmp_path, ConfigError)


def test_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    with pytest.raises(ConfigError, match="nodes"):
        yamlio.load(write(tmp_path, "\n".join(lines) + "\n"), ConfigError)


def test_errors_pickle_with_their_location(tmp_path: Path) -> None:
    err = err_of(write(tmp_path, "hosts:\n  - uri: 3\n    port: x\n"))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ConfigError
    assert str(back) == str(err)
    assert yamlio.where(back) == yamlio.where(err)


def test_dotted() -> None:
    assert yamlio.dotted(("hosts", 2, "uri")) == "hosts[2].uri"
    assert yamlio.dotted(("vos", "cms", "groups", 0)) == "vos.cms.groups[0]"
    assert yamlio.dotted(()) == ""


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = 'base: &b {uri: "qemu:///system", port: 7}\nhosts:\n  - <<: *b\n    uri: "test:///default"\n'
    doc = yamlio.load(write(tmp_path, text), ConfigError)
    assert doc.data["hosts"] == [{"uri": "test:///default", "port": 7}]
    assert doc.line(("hosts", 0, "uri")) == 4


# -- hostile files (issue 11) ------------------------------------------------------------------------------
def _load_in_thread(path: Path) -> BaseException | None:
    """Load ``path`` in a daemon thread so a hang fails the test instead of blocking the run."""
    import threading

    box: list[BaseException | None] = []

    def go() -> None:
        try:
            yamlio.load(path, ConfigError)
            box.append(None)
        except BaseException as exc:  # handed to the test
            box.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(10)
    assert box, f"loading {path} blocked"
    return box[0]


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "dynvm.yaml"
    os.mkfifo(fifo)
    err = _load_in_thread(fifo)
    assert isinstance(err, ConfigError) and "not a regular file (a FIFO)" in str(err)


def test_size_is_bounded_before_reading(tmp_path: Path) -> None:
    p = write(tmp_path, "- 1\n" * 950_000)  # 3.8 MB: 10 s and 630 MB to reject before the bound
    err = _load_in_thread(p)
    assert isinstance(err, ConfigError) and f"file larger than {yamlio.MAX_FILE_BYTES} bytes" in str(err)
    assert yamlio.MAX_FILE_BYTES == 1024 * 1024


def test_node_count_is_bounded_before_building_the_tree(tmp_path: Path) -> None:
    p = write(tmp_path, "- 1\n" * 200_000)  # 800 kB, under the size bound
    err = _load_in_thread(p)
    assert isinstance(err, ConfigError) and f"over {yamlio.MAX_NODES} YAML nodes" in str(err)


def test_foreign_file_content_is_not_echoed(tmp_path: Path) -> None:
    secret = "root:$y$j9T$abcdefgh$SECRETHASHSECRETHASH:20228:0:99999:7:::"
    p = write(tmp_path, f"{secret}\ndaemon:*:20228:0:99999:7:::\n")
    from provisioner.configload import load_config

    with pytest.raises(ConfigError) as ei:
        load_config(p)
    err = str(ei.value)
    assert "SECRETHASH" not in err and "daemon" not in err and "\n" not in err
    assert err.startswith(f"{p}:1: <unrecognised key>: unknown key"), err


def test_duplicate_foreign_key_is_not_echoed(tmp_path: Path) -> None:
    p = write(tmp_path, "pass:word$x: 1\npass:word$x: 2\n")
    with pytest.raises(ConfigError) as ei:
        yamlio.load(p, ConfigError)
    assert "word" not in str(ei.value) and ":2: <unrecognised key>: duplicate key" in str(ei.value)
