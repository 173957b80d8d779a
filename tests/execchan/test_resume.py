"""A client that dies between writing a chunk and saving its cursor resumes without a duplicate: the cursor
file (provisioner.execchan.resume) against the real guest runner under busybox (tests/execchan/guestsim)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from provisioner.errors import ValidationError
from provisioner.execchan.client import stream_in_guest
from provisioner.execchan.resume import CursorFile
from tests.execchan.guestsim import BUSYBOX, GuestSim

pytestmark = pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox (the test images' shell)")


class Died(Exception):
    pass


def file_sink(fd: int, die_after: list[int] | None = None) -> tuple[list[int], Callable[[bytes], None]]:
    calls = [0]

    def write(data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])  # a chunk can be cut anywhere by the death
        if die_after is not None and calls[0] == die_after[0]:
            raise Died()
        os.write(fd, data[len(data) // 2 :])
        calls[0] += 1

    return calls, write


@pytest.mark.parametrize("merged", [True, False])
def test_a_chunk_half_written_when_the_client_died_is_completed_not_repeated(guest: GuestSim, tmp_path: Path,
                                                                             merged: bool) -> None:
    out_path, err_path = tmp_path / "job.out", tmp_path / ("job.out" if merged else "job.err")
    cursor = str(tmp_path / "cursor")
    script = ("i=0; while [ $i -lt 40 ]; do echo out-$i; echo err-$i >&2; "
              "[ $i = 20 ] && head -c 200000 /dev/zero | tr '\\0' z; i=$((i+1)); sleep 0.01; done; exit 4")
    fo = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    fe = fo if merged else os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    cf = CursorFile(cursor, fo, fe)
    assert cf.load() is None  # a fresh start
    _, out = file_sink(fo, die_after=[5])
    _, err = file_sink(fe)
    with pytest.raises(Died):
        stream_in_guest(guest.path, script=script, out=cf.wrap("o", out), err=cf.wrap("e", err),
                        on_progress=cf.save, timeout=120)
    assert " o " in Path(cursor).read_text()  # it died with a stdout chunk in flight
    again = CursorFile(cursor, fo, fe)
    resume = again.load()
    assert resume is not None and again.skip["o"] > 0
    _, out2 = file_sink(fo)
    _, err2 = file_sink(fe)
    res = stream_in_guest(guest.path, attach=resume, out=again.wrap("o", out2), err=again.wrap("e", err2),
                          on_progress=again.save, timeout=120)
    assert res.exit_code == 4
    text = out_path.read_text()
    outs = "".join(f"out-{i}\n" + ("z" * 200000 if i == 20 else "") for i in range(40))
    errs = "".join(f"err-{i}\n" for i in range(40))
    if merged:  # one file, both streams interleaved: each stream's bytes in order, every byte once
        assert re.findall(r"err-[0-9]+\n", text) == errs.splitlines(keepends=True)
        assert re.sub(r"err-[0-9]+\n", "", text) == outs
    else:
        assert text == outs and err_path.read_text() == errs
    again.remove()
    assert not Path(cursor).exists()


@pytest.mark.parametrize("content", ["junk!", "r1:0:0 x 5", "r1:0:0 o", "r 1:0:0", "r1:0:0 o 5 extra"])
def test_a_garbled_cursor_file_is_a_one_line_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "c").write_text(content)
    with pytest.raises(ValidationError, match="cursor file"):
        CursorFile(str(tmp_path / "c"), 1, 2).load()
