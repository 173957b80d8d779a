"""A job runs inside a CMS worker VM through the serial exec channel; output and exit code come back."""

from __future__ import annotations

import pytest

from provisioner.execchan import run_in_guest
from tests.farm_qemu.guests import Guest, Guests

pytestmark = pytest.mark.qemu


def test_job_in_cms_worker(guests: Guests) -> None:
    g = Guest("job-cms", "cms-wn", "hv1")
    other = Guest("job-atlas", "atlas-wn", "hv1")
    guests.start(g)
    guests.start(other)
    guests.wait_marker(g)
    sock = guests.farm.channel_path("hv1", g.name)
    ok = run_in_guest(sock, ["sh", "-c", 'cat /etc/vo; echo "arg with space"'], timeout=30)
    assert (ok.exit_code, ok.stdout) == (0, "cms\narg with space\n")
    bad = run_in_guest(sock, script="echo partial; echo oops >&2; exit 42", timeout=30)
    assert (bad.exit_code, bad.stdout, bad.stderr) == (42, "partial\n", "oops\n")
    missing = run_in_guest(sock, ["/no/such/program"], timeout=30)
    assert missing.exit_code == 127
    # Each guest has its own channel: the other guest answers as itself, never with cms's data.
    guests.wait_marker(other)
    mine = run_in_guest(guests.farm.channel_path("hv1", other.name), ["cat", "/etc/vo"], timeout=30)
    assert mine.stdout == "atlas\n"


def test_job_timeout_in_guest(guests: Guests) -> None:
    g = Guest("job-slow", "lhcb-wn", "hv2")
    guests.start(g)
    guests.wait_marker(g)
    sock = guests.farm.channel_path("hv2", g.name)
    res = run_in_guest(sock, ["sleep", "30"], timeout=1)
    assert res.timed_out and res.exit_code == 143
    assert run_in_guest(sock, ["true"], timeout=10).exit_code == 0  # the runner is free again
