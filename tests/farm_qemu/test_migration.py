"""Live migration keeps the guest running; services keep their data and address when they move."""

from __future__ import annotations

import http.client
import re
import time

import pytest

from provisioner.execchan import run_in_guest
from provisioner.interfaces import DomainState
from provisioner.probes import TcpProbe, netns_socket, wait_ready
from tests.conftest import wait_until
from tests.farm_qemu.guests import Guest, Guests, make_raw_disk

pytestmark = pytest.mark.qemu


def uptime(guests: Guests, g: Guest) -> float:
    res = run_in_guest(guests.farm.channel_path(g.host, g.name), ["cut", "-d", " ", "-f1", "/proc/uptime"],
                       timeout=30)
    return float(res.stdout)


def ticks(guests: Guests, g: Guest) -> list[int]:
    text = guests.farm.serial_log_path(g.host, g.name).read_text()
    return [int(n) for n in re.findall(r"DYNVM_TICK (\d+) ", text)]


def http_get(guests: Guests, ip: str, path: str) -> str:
    sock = netns_socket(guests.farm.netns)  # the farm LAN is reachable only inside its namespace
    sock.settimeout(5)
    sock.connect((ip, 80))
    conn = http.client.HTTPConnection(ip, 80)
    conn.sock = sock
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read().decode()
    conn.close()
    assert resp.status == 200, f"GET {path} -> {resp.status}"
    return body


def test_live_migration_keeps_guest_running(guests: Guests) -> None:
    g = Guest("mig-wn", "cms-wn", "hv1")
    guests.start(g)
    guests.wait_marker(g, "DYNVM_TICK 1 ")
    run_in_guest(guests.farm.channel_path("hv1", g.name), script="echo kept-in-ram > /tmp/token", timeout=30)
    before = uptime(guests, g)
    last_tick = max(ticks(guests, g))
    guests.migrate(g, "hv2")
    assert guests.conn("hv2").state(g.name) is DomainState.RUNNING
    assert guests.conn("hv1").state(g.name) is DomainState.MISSING
    token = run_in_guest(guests.farm.channel_path("hv2", g.name), ["cat", "/tmp/token"], timeout=30)
    assert token.stdout == "kept-in-ram\n"  # same RAM: no reboot
    assert uptime(guests, g) > before
    # The tick counter continues on hv2's serial log where it stopped on hv1 (a reboot would restart at 1).
    wait_until(lambda: ticks(guests, g), timeout=30, what="a tick on hv2")
    assert min(ticks(guests, g)) > last_tick


def test_se_data_survives_destroy_and_start_elsewhere(guests: Guests) -> None:
    disk = make_raw_disk(guests.farm.shared_dir / "move-se.raw")
    g = Guest("move-se", "se", "hv1", ip="10.77.0.21", mac="52:54:00:77:00:21", disk=disk)
    guests.start(g)
    guests.wait_marker(g)
    wrote = run_in_guest(guests.farm.channel_path("hv1", g.name),
                         script="echo precious-42 > /data/www/proof.txt && sync", timeout=30)
    assert wrote.exit_code == 0
    guests.conn("hv1").destroy(g.name)  # a hard stop, as when a host dies
    guests.conn("hv1").undefine(g.name)
    guests.start(g, "hv3")
    guests.wait_marker(g)
    log = guests.farm.serial_log_path("hv3", g.name).read_text()
    assert "DYNVM_FORMAT" not in log  # the disk was kept, not re-formatted
    assert http_get(guests, "10.77.0.21", "/proof.txt") == "precious-42\n"


def test_ce_answers_on_same_ip_after_moving(guests: Guests) -> None:
    disk = make_raw_disk(guests.farm.shared_dir / "move-ce.raw")
    g = Guest("move-ce", "ce", "hv1", ip="10.77.0.10", mac="52:54:00:77:00:10", disk=disk)
    guests.start(g)
    guests.wait_marker(g)
    assert http_get(guests, "10.77.0.10", "/whoami.txt") == "ce ce\n"
    guests.migrate(g, "hv3")
    assert guests.conn("hv3").state(g.name) is DomainState.RUNNING
    wait_ready(TcpProbe("10.77.0.10", 80, guests.farm.netns), time.monotonic() + 30)
    assert http_get(guests, "10.77.0.10", "/whoami.txt") == "ce ce\n"
    assert "DYNVM_READY ce" not in guests.farm.serial_log_path("hv3", g.name).read_text()  # not rebooted
