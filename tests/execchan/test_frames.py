"""The streaming exec protocol's framing and sequence rules (pure: provisioner.execchan.frames)."""

from __future__ import annotations

import pytest

from provisioner.execchan import frames as fr


def test_a_chunk_round_trips_any_bytes() -> None:
    data = bytes(range(256)) * 3 + b"\n\r DYNVM-OUT x o 1 AAAA\n"
    line = fr.chunk_line("r1", "e", 7, data)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # base64: the framing survives any output
    assert fr.parse_line(line[:-1], "r1") == fr.Chunk("e", 7, data)


@pytest.mark.parametrize("line", [
    b"DYNVM-OUT r2 o 0 aGk=",  # another run's chunk
    b"DYNVM-OUT r1 x 0 aGk=",  # no such stream
    b"DYNVM-OUT r1 o -1 aGk=",
    b"DYNVM-OUT r1 o 0 aGk",  # base64 cut short (the tail of a frame cut by a reconnect)
    b"aGVsbG8gd29ybGQ=",
    b"DYNVM-EXIT r1 x 0 0",
    b"DYNVM-OUT r1 o 0 " + __import__("base64").b64encode(b"x" * (fr.CHUNK_MAX + 1)),
    b"",
])
def test_anything_but_a_well_formed_frame_of_this_run_is_ignored(line: bytes) -> None:
    assert fr.parse_line(line, "r1") is None


def test_control_frames_parse() -> None:
    assert fr.parse_line(fr.exit_line("r1", 3, 4, 5)[:-1], "r1") == fr.Exit(3, 4, 5)
    assert fr.parse_line(b"DYNVM-BUSY r1 other9", "r1") == fr.Refusal("busy", other="other9")
    assert fr.parse_line(b"DYNVM-NORUN r1", "r1") == fr.Refusal("norun")
    assert fr.parse_line(b"DYNVM-LOST r1 o 4", "r1") == fr.Refusal("lost", stream="o", seq=4)
    assert fr.ack_line("r1", "o", 3) == b"DYNVM-ACK r1 o 3\n"
    assert fr.attach_line("r1", 2, 0) == b"DYNVM-ATTACH r1 2 0\n"
    assert fr.run_line("r1", 60, b"echo hi\n") == b"DYNVM-RUN r1 60 ZWNobyBoaQo=\n"
    assert fr.run_line("r1", 60, b"echo hi\n", merge=True) == b"DYNVM-RUN r1 60 ZWNobyBoaQo= merge\n"


@pytest.mark.parametrize("bad", ["", "a b", "a;b", "x" * 33, "ü"])
def test_run_ids_are_validated_before_any_line_is_built(bad: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        fr.done_line(bad)


def test_line_splitter_joins_feeds_and_drops_over_long_lines_with_bounded_memory() -> None:
    s = fr.LineSplitter(max_line=10)
    assert s.feed(b"ab") == [] and s.feed(b"c\nde") == [b"abc"] and s.feed(b"\n") == [b"de"]
    assert s.feed(b"x" * 25) == [] and len(s._buf) == 0  # over-long: not kept
    assert s.feed(b"yyy\nok\n") == [b"ok"] and s.dropped == 1  # resynchronised at the next newline
    assert s.feed(b"0123456789ABC\nfine\n") == [b"fine"] and s.dropped == 2


def chunk(stream: str, seq: int, data: bytes = b"d") -> fr.Chunk:
    return fr.Chunk(stream, seq, data)


def test_chunks_are_delivered_in_order_once_and_acknowledged() -> None:
    rx = fr.Receiver(fr.Cursor("r1"))
    s = rx.feed(chunk("o", 0, b"a"), 0.0)
    assert (s.stream, s.data, s.reply) == ("o", b"a", b"DYNVM-ACK r1 o 0\n")
    assert rx.feed(chunk("e", 0, b"E"), 0.0).reply == b"DYNVM-ACK r1 e 0\n"
    assert rx.feed(chunk("o", 0, b"a"), 0.0) == fr.Step()  # a duplicate (a resend) is dropped silently
    assert rx.duplicates == 1 and rx.cursor.text() == "r1:1:1"


def test_a_gap_asks_for_a_resend_once_then_again_after_a_while() -> None:
    rx = fr.Receiver(fr.Cursor("r1"))
    rx.feed(chunk("o", 0), 0.0)
    assert rx.feed(chunk("o", 2), 1.0).reply == b"DYNVM-ATTACH r1 1 0\n"  # chunk 1 was lost
    assert rx.feed(chunk("o", 3), 1.1).reply == b""  # the resend is on its way: do not ask again
    assert rx.feed(chunk("o", 4), 1.0 + fr.RESEND_AFTER_S).reply == b"DYNVM-ATTACH r1 1 0\n"
    assert rx.feed(chunk("o", 1, b"late"), 7.0).data == b"late"
    assert rx.feed(chunk("o", 2), 7.0).data == b"d" and rx.gaps == 3
    assert rx.feed(chunk("o", 5), 7.0).reply == b"DYNVM-ATTACH r1 3 0\n"  # a new position: ask at once


def test_the_exit_is_accepted_only_once_every_chunk_arrived() -> None:
    rx = fr.Receiver(fr.Cursor("r1"))
    rx.feed(chunk("o", 0), 0.0)
    early = rx.feed(fr.Exit(3, 2, 0), 0.0)  # the last stdout chunk was lost on the way
    assert early.exit_code is None and early.reply == b"DYNVM-ATTACH r1 1 0\n"
    rx.feed(chunk("o", 1), 0.1)
    done = rx.feed(fr.Exit(3, 2, 0), 0.2)
    assert done.exit_code == 3 and done.reply == b"DYNVM-DONE r1\n"
    with pytest.raises(fr.ProtocolError, match="arrived"):
        fr.Receiver(fr.Cursor("r2", 5, 0)).feed(fr.Exit(0, 1, 0), 0.0)


def test_a_resumed_cursor_skips_what_it_already_wrote() -> None:
    rx = fr.Receiver(fr.Cursor.parse("r1:2:1"))
    assert rx.feed(chunk("o", 1), 0.0) == fr.Step() and rx.feed(chunk("e", 0), 0.0) == fr.Step()
    assert rx.feed(chunk("o", 2, b"new"), 0.0).data == b"new"


@pytest.mark.parametrize("refusal,kind", [(fr.Refusal("busy", other="x"), "busy"),
                                          (fr.Refusal("norun"), "norun"),
                                          (fr.Refusal("lost", stream="e", seq=0), "lost")])
def test_refusals_end_the_run_with_their_reason(refusal: fr.Refusal, kind: str) -> None:
    with pytest.raises(fr.ProtocolError) as info:
        fr.Receiver(fr.Cursor("r1")).feed(refusal, 0.0)
    assert info.value.kind == kind


def test_a_lost_marker_for_a_chunk_already_held_is_harmless() -> None:
    assert fr.Receiver(fr.Cursor("r1", 3, 0)).feed(fr.Refusal("lost", stream="o", seq=1), 0.0) == fr.Step()


@pytest.mark.parametrize("text", ["", "r1:1", "r1:a:0", "r1:1:2:3", "r 1:0:0", "r1:-1:0"])
def test_cursor_text_is_validated(text: str) -> None:
    with pytest.raises(ValueError):
        fr.Cursor.parse(text)
    assert fr.Cursor.parse("abc") == fr.Cursor("abc", 0, 0)
