"""``dynvm demo --failover``: a host carrying a CE, an SE and a WMS dies (``farm kill``); the farm's
monitors fence it and bring the services back on the survivors; the timeline is printed step by step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from provisioner.errors import ConflictError, DeadlineExceeded
from provisioner.farm.layout import FarmLayout

SERVICES = (
    ("ce", "ce-demo", "10.77.0.60"),
    ("se", "se-demo", "10.77.0.61"),
    ("wms", "wms-demo", "10.77.0.62"),
)


def play(ctx: Any, rt: Any, layout: FarmLayout, say: Callable[[str], None], timeout_s: float) -> bool:
    """True when every service came back ready on a survivor."""
    from ha.recovery import RecoveryStore, Step
    from ha.timeline import build
    from provisioner.control.client import choose_image, submit, wait
    from provisioner.farm.hostkill import farm_kill
    from provisioner.model import HostState, InstanceState

    up = [h.name for h in rt.store.list_hosts() if h.state is HostState.UP and rt.store.lease_alive(h.name)]
    if len(up) < 2:
        raise ConflictError(f"demo --failover: needs two hosts up with a live agent (have {up})")
    victim = up[0]
    insts = []
    for image, name, ip in SERVICES:
        img, _ = choose_image(rt, image, None)
        inst, _ = submit(rt, img, None, service=name, ip=ip, host=victim)
        insts.append(inst)
        say(f"service {name} ({img.ref}, {ip}) requested on {victim} -> {inst.id}")
    for inst in insts:
        got = wait(rt, inst.id, timeout_s)
        say(f"{got.service}: {got.state.value} on {got.host}")
    recs = RecoveryStore(rt.store.r, rt.store.keys.prefix)
    sec, usec = rt.store.r.time()
    t0 = sec + usec / 1e6
    say(
        f"killing {victim}: SIGKILL for its agent, libvirtd, virtlockd and guests "
        f"(`dynvm farm kill {victim}`)"
    )
    farm_kill(layout, victim)
    seen: Step | None = None
    deadline = time.monotonic() + timeout_s
    while True:
        rec = recs.get(victim)
        if rec is not None and rec.times.get("open", 0) >= t0 and rec.step is not seen:
            seen = rec.step
            say(f"recovery of {victim}: {rec.step.value}")
            if rec.step is Step.CLOSED:
                break
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"demo: {victim}'s recovery not closed after {timeout_s:.0f} s")
        time.sleep(0.05)
    rows, base = build(rt.store.read_events(count=5000), victim)
    ctx.out.table(
        [r.to_dict(base) for r in rows],
        ["after_s", "step", "instance", "host", "message"],
        title=f"failover of {victim} (seconds since its last lease renewal)",
    )
    back = [rt.store.require_instance(i.id) for i in insts]
    for b in back:
        say(f"{b.service}: {b.state.value} on {b.host}, address {b.ip}, MAC {b.mac}")
    say(f"{victim} stays down and fenced: `dynvm farm revive {victim}` then `dynvm host rejoin {victim}`")
    return all(b.state is InstanceState.READY and b.host != victim for b in back)
