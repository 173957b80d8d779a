"""Peer heartbeats over real UDP sockets on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ha.peers import PeerHeartbeat, decode, encode
from tests.conftest import free_port, wait_until


def test_codec_rejects_forgery_and_garbage() -> None:
    secret = b"s3cret"
    assert decode(encode("hv1", 7, secret), secret) == "hv1"
    assert decode(encode("hv1", 7, None), None) == "hv1"
    assert decode(encode("hv1", 7, b"other"), secret) is None  # wrong key
    assert decode(encode("hv1", 7, None), secret) is None  # unsigned where a signature is required
    for junk in (b"", b"dynvm-hb1", b"dynvm-hb1 hv1 x", b"hello hv1 1", b"dynvm-hb1 \xff 1", b"x" * 600):
        assert decode(junk, None) is None


@pytest.fixture
def trio() -> Iterator[dict[str, PeerHeartbeat]]:
    ports = {h: free_port() for h in ("hv1", "hv2", "hv3")}
    addrs = {h: ("127.0.0.1", p) for h, p in ports.items()}
    hbs = {h: PeerHeartbeat(h, addrs[h], addrs, interval_s=0.05, secret=b"k") for h in addrs}
    for hb in hbs.values():
        hb.start()
    yield hbs
    for hb in hbs.values():
        hb.stop()


def test_peers_hear_each_other_and_notice_one_going_silent(trio: dict[str, PeerHeartbeat]) -> None:
    wait_until(lambda: all(hb.heard(0.5) == 2 for hb in trio.values()), timeout=5, what="all peers heard")
    trio["hv3"].stop()
    wait_until(lambda: trio["hv1"].heard(0.3) == 1, timeout=5, what="hv1 to miss hv3")
    assert trio["hv2"].heard(30.0) == 2  # a long timeout still counts hv3's last beat
    assert "hv3" in trio["hv1"].last_heard
