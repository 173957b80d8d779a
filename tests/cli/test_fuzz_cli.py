"""Property test over the whole argument surface of ``dynvm`` (issue 11).

Every command the parser knows (found by walking it, so groups added later are covered) is run with drawn
arguments: hostile numbers (NaN, infinities, negatives, 20-digit integers), empty, long and metacharacter
strings, FIFOs and directories as files, unknown options, missing positionals.  Whatever comes in:

- the exit code is one of the documented ones (0 ok, 2 usage, 3 not found, 4 conflict, 5 unavailable,
  6 timeout, 130 interrupted) - never 1, "internal error";
- a failing command prints exactly ONE line on stderr, and no traceback anywhere.

Fixed seed (derandomize) and a bounded number of examples, so CI runs the same cases every time.  The
commands run in-process against a real private Redis database with no agents or workers: nothing waits
long (``--wait`` gets a short timeout) and long-running commands (daemons, ``farm up``, ``demo``) only
get arguments that must be refused before they start.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioner.cli.main import build_parser, main
from tests.catalogue.helpers import make_catalogue, write_config

pytestmark = pytest.mark.redis

DOCUMENTED = {0, 2, 3, 4, 5, 6, 130}
DB = 12  # a database of the session Redis no other test uses
# Commands that would run until stopped: they are fuzzed only with an argument that must be refused first.
LONG_RUNNING = {("agent",), ("worker",), ("monitor",), ("watchdog",), ("demo",), ("farm", "up"),
                ("hook", "serve"), ("hook", "watch-lost"), ("hook", "condor-daemon")}
EXAMPLES = int(os.environ.get("DYNVM_FUZZ_EXAMPLES", "300"))
RETURN_WITHIN_S = 60.0  # every command here answers in well under a second; this only catches a hang


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sp in dict(subs[0].choices).items():
        yield from leaves(sp, (*path, name))


LEAVES = sorted(leaves(build_parser()), key=lambda x: x[0])

NASTY_INTS = ["0", "-1", "1", "3", "99999999999999999999", "-99999999999999999999", "ten", "1e3", " 7", ""]
NASTY_FLOATS = ["nan", "NaN", "inf", "-inf", "1e999", "-1", "0", "0.2", "1e308", "abc", ""]
FUZZ_PATHS: list[str] = []  # filled by the fixture: a FIFO, a directory, /etc/shadow-like file...
words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)
strings = st.one_of(
    words,
    st.sampled_from(
        [
            "",
            "-",
            "--",
            "cms",
            "cms-wn",
            "cms-wn:stable",
            "ce",
            "hv1",
            "a;rm -rf /",
            "$(id)",
            "<x/>",
            "../..",
            "x" * 5000,
            "é",
            "\n",
            "0",
            "-1",
            "nan",
        ]
    ),
)


def _is_int(action: argparse.Action) -> bool:
    return getattr(action.type, "__name__", "") == "int" or action.type is int


def _is_float(action: argparse.Action) -> bool:
    return getattr(action.type, "__name__", "") == "seconds" or action.type is float


def value_for(action: argparse.Action) -> st.SearchStrategy[str]:
    if action.choices:
        return st.one_of(st.sampled_from([str(c) for c in action.choices]), strings)
    if _is_int(action):
        return st.one_of(st.sampled_from(NASTY_INTS), st.integers(-(10**25), 10**25).map(str))
    if _is_float(action):
        return st.one_of(st.sampled_from(NASTY_FLOATS), st.floats(allow_nan=True).map(repr))
    return st.one_of(strings, st.sampled_from(FUZZ_PATHS or ["/"]))


@st.composite
def command(draw: st.DrawFn) -> list[str]:
    path, parser = draw(st.sampled_from(LEAVES))
    argv = list(path)
    tail: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in ("follow",):
            continue
        if not action.option_strings:  # positional
            if action.nargs == argparse.REMAINDER:
                tail = ["--", *draw(st.lists(strings, max_size=3))]
            elif draw(st.integers(0, 9)) > 0:  # mostly given; sometimes missing
                argv.append(draw(value_for(action)))
            continue
        if not draw(st.booleans()):
            continue
        opt = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(opt)
        else:
            argv += [opt, draw(value_for(action))]
    if draw(st.integers(0, 9)) == 0:
        argv.append(draw(st.sampled_from(["--bogus", "-o", "-o json", "--output=yaml", "--config"])))
    if draw(st.booleans()):
        argv[:0] = ["-o", "json"]
    if "--wait" in argv:
        argv += ["--timeout", "0.2"]  # nothing here will ever be ready: bound the wait
    if tuple(path) in LONG_RUNNING:
        bad = {
            "agent": "--concurrency",
            "worker": "--concurrency",
            "monitor": "--bogus",
            "watchdog": "--bogus",
        }.get(path[0])
        argv += [bad, "-1"] if bad else ["--hosts", "0"]
    return argv + tail


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: str) -> Iterator[None]:
    url = redis_server.rsplit("/", 1)[0] + f"/{DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    cat, root = make_catalogue(tmp_path)
    cfg = write_config(tmp_path, cat, root, extra=f"redis_url: {url}\n")
    monkeypatch.setenv("DYNVM_CONFIG", str(cfg))
    monkeypatch.setenv("DYNVM_FARM_DIR", str(tmp_path / "farm"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DYNVM_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$y$j9T$SALT$HASH:20228:0:99999:7:::\n")
    FUZZ_PATHS[:] = [
        str(tmp_path / "fifo"),
        str(tmp_path),
        str(shadow),
        str(cat),
        "/dev/null",
        "",
        "nope.yaml",
    ]
    yield
    FUZZ_PATHS.clear()
    r.flushdb()


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=command())
def test_any_command_line_is_answered_in_one_line(world: None, argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    box: list[int] = []
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        # In a thread: a command that does not return (a new daemon not listed in LONG_RUNNING) fails
        # this test with its command line instead of hanging the run.
        t = threading.Thread(target=lambda: box.append(main(argv)), daemon=True)
        t.start()
        t.join(RETURN_WITHIN_S)
    assert box, f"dynvm {argv} did not return within {RETURN_WITHIN_S} s (long-running? see LONG_RUNNING)"
    rc = box[0]
    text = err.getvalue()
    assert rc in DOCUMENTED, (argv, rc, text)
    assert "internal error" not in text and "Traceback" not in text, (argv, text)
    if rc != 0:
        assert len(text.rstrip("\n").split("\n")) == 1, (argv, text)


def test_every_leaf_command_is_fuzzed() -> None:
    """The walk finds the commands (a parser change that hid them would make the property vacuous)."""
    names = {" ".join(p) for p, _ in LEAVES}
    assert {"vm provision", "events", "image add", "agent", "worker", "host drain", "status"} <= names
