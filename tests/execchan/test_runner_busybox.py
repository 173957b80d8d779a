"""The guest runner as the test images embed it (images/build/guest/exec-runner.sh, real busybox), driven by
the real host client over a unix socket that stands in for QEMU's chardev (tests/execchan/guestsim.py).
The same checks on a real TCG guest are in tests/qemu_e2e/test_stream_qemu.py."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioner.errors import ConflictError, UnavailableError
from provisioner.execchan.client import StreamResult, run_in_guest, same_file, stream_in_guest
from tests.conftest import wait_until
from tests.execchan.guestsim import BUSYBOX, GuestSim

pytestmark = pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox (the test images' shell)")


class Collect:
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.cursor = ""

    def progress(self, text: str) -> None:
        self.cursor = text


def start(fn: Callable[[], StreamResult]) -> tuple[threading.Thread, dict[str, object]]:
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["res"] = fn()
        except Exception as e:
            box["exc"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_output_streams_binary_exact_with_stderr_and_exit_code(guest: GuestSim) -> None:
    c = Collect()
    script = ("printf 'a\\000\\377\\n'; echo to-err >&2; head -c 2400000 /dev/urandom > /tmp/.blob; "
              "cat /tmp/.blob; md5sum < /tmp/.blob >&2; rm /tmp/.blob; exit 42")
    res = stream_in_guest(guest.path, script=script, timeout=120, out=c.out.extend, err=c.err.extend)
    assert res.exit_code == 42 and res.out_bytes == len(c.out) == 4 + 2400000
    assert c.out[:4] == b"a\x00\xff\n"
    digest = hashlib.md5(bytes(c.out[4:])).hexdigest()
    assert bytes(c.err) == f"to-err\n{digest}  -\n".encode()
    assert (res.duplicates, res.gaps) == (0, 0)


def test_a_line_arrives_while_the_payload_still_runs(guest: GuestSim, tmp_path: Path) -> None:
    go = tmp_path / "go"
    c = Collect()
    t, box = start(lambda: stream_in_guest(
        guest.path, script=f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo second",
        out=c.out.extend, err=c.err.extend))
    wait_until(lambda: bytes(c.out) == b"first\n", 30, what="the first line")
    assert "res" not in box  # it arrived before the payload ended: the payload is waiting for us
    go.touch()
    t.join(30)
    res = box["res"]
    assert isinstance(res, StreamResult) and res.exit_code == 0 and bytes(c.out) == b"first\nsecond\n"


def test_a_client_that_dies_resumes_from_its_cursor_without_gap_or_duplicate(guest: GuestSim,
                                                                             tmp_path: Path) -> None:
    go = tmp_path / "go"
    c = Collect()
    script = (f"i=0; while [ $i -lt 300 ]; do echo line-$i; i=$((i+1)); done; echo half >&2; "
              f"while [ ! -e {go} ]; do sleep 0.05; done; "
              "head -c 3000000 /dev/zero | tr '\\0' x; i=300; "
              "while [ $i -lt 600 ]; do echo line-$i; i=$((i+1)); done; exit 3")
    t, box = start(lambda: stream_in_guest(guest.path, script=script, out=c.out.extend, err=c.err.extend,
                                           on_progress=c.progress))
    wait_until(lambda: bytes(c.err) == b"half\n", 30, what="the first half")
    guest.drop_client()  # the wrapper dies
    t.join(30)
    assert isinstance(box.get("exc"), UnavailableError) and "--attach" in str(box["exc"])
    go.touch()  # the payload goes on writing 3 MB with nobody reading: it must block, not buffer it all
    run_dir = guest.state / ".dynvm-run"
    wait_until(lambda: len(list(run_dir.glob("o.[0-9]*"))) >= 8, 30, what="the guest's window to fill")
    # Not synchronisation: the property is that nothing more happens.  A pump ignoring its full window
    # writes a 64 KiB frame every few forks (~10-50 ms on a loaded 2-core host): 0.5 s is ample to pass 10.
    time.sleep(0.5)
    frames = list(run_dir.glob("o.[0-9]*"))
    assert len(frames) <= 10 and sum(f.stat().st_size for f in frames) < 1_000_000
    assert not (run_dir / "x").exists()  # the payload is blocked on its pipe, not finished
    res = stream_in_guest(guest.path, attach=c.cursor, out=c.out.extend, err=c.err.extend,
                          on_progress=c.progress, timeout=120)
    expected = "".join(f"line-{i}\n" for i in range(300)) + "x" * 3000000 + \
        "".join(f"line-{i}\n" for i in range(300, 600))
    assert res.exit_code == 3 and bytes(c.out) == expected.encode() and bytes(c.err) == b"half\n"
    wait_until(lambda: not run_dir.exists(), 30, what="the collected run to be forgotten")


def test_a_second_run_while_one_runs_is_refused_and_one_shot_exec_still_works(guest: GuestSim,
                                                                              tmp_path: Path) -> None:
    go = tmp_path / "go"
    c = Collect()
    script = f"echo up; while [ ! -e {go} ]; do sleep 0.05; done"
    t, _ = start(lambda: stream_in_guest(guest.path, script=script, out=c.out.extend, err=c.err.extend,
                                         on_progress=c.progress))
    wait_until(lambda: bytes(c.out) == b"up\n", 30, what="the first run")
    guest.drop_client()
    t.join(30)
    with pytest.raises(ConflictError, match="still running"):
        stream_in_guest(guest.path, ["true"], out=c.out.extend, err=c.err.extend, timeout=30)
    assert run_in_guest(guest.path, ["echo", "probe"], timeout=30).stdout == "probe\n"
    go.touch()
    assert stream_in_guest(guest.path, attach=c.cursor, out=c.out.extend, err=c.err.extend).exit_code == 0
    run_dir = guest.state / ".dynvm-run"
    wait_until(lambda: not run_dir.exists(), 30, what="the collected run to be forgotten")
    # Attaching to a collected run: refused, or (when an exit frame resent for an attach is still in the
    # channel) the same exit again; never any output twice.
    try:
        again = stream_in_guest(guest.path, attach=c.cursor, out=c.out.extend, err=c.err.extend, timeout=30)
        assert again.exit_code == 0 and again.out_bytes == 0
    except UnavailableError as e:
        assert "knows no run" in str(e)
    assert bytes(c.out) == b"up\n"


def test_lost_chunk_messages_are_sent_again_and_the_output_stays_exact(guest: GuestSim) -> None:
    guest.drop_chunks = {1, 2, 5}  # three chunk messages vanish on the way (first a run of two)
    c = Collect()
    script = "i=0; while [ $i -lt 30 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); sleep 0.02; done; exit 9"
    res = stream_in_guest(guest.path, script=script, out=c.out.extend, err=c.err.extend, timeout=120)
    assert res.exit_code == 9
    assert bytes(c.out) == "".join(f"out-{i}\n" for i in range(30)).encode()
    assert bytes(c.err) == "".join(f"err-{i}\n" for i in range(30)).encode()
    assert res.gaps >= 1  # the losses were noticed (and mended by resends), not lucky


def test_merged_output_keeps_print_order_across_stdout_and_stderr(guest: GuestSim, tmp_path: Path) -> None:
    c = Collect()
    script = "i=0; while [ $i -lt 50 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done; exit 2"
    res = stream_in_guest(guest.path, script=script, out=c.out.extend, err=c.err.extend, timeout=120,
                          merge=True)
    assert res.exit_code == 2 and bytes(c.err) == b""
    assert bytes(c.out) == "".join(f"out-{i}\nerr-{i}\n" for i in range(50)).encode()
    with (tmp_path / "f").open("w") as f, (tmp_path / "g").open("w") as g:
        assert same_file(f.fileno(), os.dup(f.fileno())) and not same_file(f.fileno(), g.fileno())
