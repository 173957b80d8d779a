"""Property-based: whatever bytes or mutated documents the catalogue holds, loading either succeeds or
raises one of our errors naming the file; no other exception type escapes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioner.catalogue.checksums import ChecksumCache
from provisioner.catalogue.store import Catalogue
from provisioner.errors import CatalogueError, DynvmError
from tests.catalogue.helpers import IMAGES

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = yaml.safe_load((IMAGES / "cms-wn.yaml").read_text())
VALID_BYTES = (IMAGES / "cms-wn.yaml").read_bytes()

YAMLISH = st.text(
    alphabet=st.sampled_from(list("abcmsw-_:[]{},'\"#&*!|>%@`\n\t -0123456789.\\/<>;$\x00é")),
    max_size=200,
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["cms;rm -rf /", "<vo/>", "../../etc/passwd", "/abs", "a" * 300, "stable", "2026.11.0"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def catdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("propcat")
    (d / "se.yaml").write_bytes((IMAGES / "se.yaml").read_bytes())  # a good neighbour file
    return d


def check_load(d: Path, target: Path) -> None:
    try:
        cat = Catalogue.load(d, d, ChecksumCache(None))
    except CatalogueError as err:
        msg = str(err)
        assert msg.startswith(str(target)), msg  # names the culprit file (and line where known)
        assert "\n" not in msg
        return
    except DynvmError as err:  # pragma: no cover - would be a wrong error class
        pytest.fail(f"unexpected {type(err).__name__}: {err}")
    for fam in cat.families():
        for ref in [fam.name, *(f"{fam.name}:{v.version}" for v in fam.versions)]:
            try:
                cat.resolve(ref)
            except DynvmError as err:
                assert fam.name in str(err) or repr(ref) in str(err)


@SETTINGS
@given(text=YAMLISH)
def test_random_text(catdir: Path, text: str) -> None:
    target = catdir / "cms-wn.yaml"
    target.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_load(catdir, target)


@SETTINGS
@given(data=st.binary(max_size=300), pos=st.integers(min_value=0, max_value=len(VALID_BYTES)))
def test_bytes_spliced_into_a_valid_file(catdir: Path, data: bytes, pos: int) -> None:
    target = catdir / "cms-wn.yaml"
    target.write_bytes(VALID_BYTES[:pos] + data + VALID_BYTES[pos:])
    check_load(catdir, target)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, path: tuple[Any, ...], op: str, value: Any) -> Any:
    if not path:
        return value if op == "set" else doc
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "set":
        parent[last] = copy.deepcopy(value)  # the same object twice would make a cycle
    elif op == "add_key" and isinstance(parent[last], dict):
        parent[last]["unexpected_key"] = copy.deepcopy(value)
    return doc


@SETTINGS
@given(
    choice=st.data(),
    op=st.sampled_from(["delete", "set", "add_key"]),
    value=VALUES,
    n=st.integers(min_value=1, max_value=3),
)
def test_mutated_valid_documents(catdir: Path, choice: st.DataObject, op: str, value: Any, n: int) -> None:
    doc = copy.deepcopy(VALID)
    for _ in range(n):
        paths = _paths(doc)
        path = choice.draw(st.sampled_from(paths))
        doc = _mutate(doc, path, op, value)
    target = catdir / "cms-wn.yaml"
    target.write_text(yaml.safe_dump(doc, allow_unicode=True))
    check_load(catdir, target)
