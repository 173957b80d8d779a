"""Properties over random sites: a plan never overbooks, never uses a non-up host, never preempts up."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.model import PLACEABLE_HOST_STATES, HostState, InstanceState, Tier
from provisioner.scheduler import PlacementRequest, SchedulerPolicy, Snapshot, schedule
from tests.scheduler.factory import host, snap, vm

TIERS = list(Tier)
STATES = [InstanceState.READY, InstanceState.BOOTING, InstanceState.STOPPING, InstanceState.GONE]


@st.composite
def sites(draw: st.DrawFn) -> tuple[Snapshot, list[PlacementRequest], SchedulerPolicy]:
    n_hosts = draw(st.integers(0, 6))
    hosts = [
        host(
            f"h{i}",
            vcpus=draw(st.integers(0, 16)),
            mem=draw(st.integers(0, 32)) * 512,
            state=draw(st.sampled_from(list(HostState))),
            rack=draw(st.sampled_from(["r1", "r2"])),
        )
        for i in range(n_hosts)
    ]
    instances = []
    for j in range(draw(st.integers(0, 12)) if hosts else 0):
        h = draw(st.sampled_from(hosts))
        instances.append(
            vm(
                f"i{j}",
                h.name,
                draw(st.integers(1, 4)),
                draw(st.integers(1, 8)) * 512,
                tier=draw(st.sampled_from(TIERS)),
                vo=draw(st.sampled_from([None, "cms", "atlas"])),
                group=draw(st.sampled_from([None, "g1", "g2"])),
                state=draw(st.sampled_from(STATES)),
            )
        )
    s = snap(hosts, instances)  # may already overbook a host: the plan must not make it worse
    reqs = [
        PlacementRequest(
            f"r{k}",
            draw(st.integers(1, 6)),
            draw(st.integers(1, 8)) * 512,
            draw(st.sampled_from(TIERS)),
            draw(st.sampled_from([None, "cms", "atlas"])),
            draw(st.sampled_from([{}, {"rack": "r1"}])),
            anti_affinity=draw(st.sampled_from([None, "g1", "g2"])),
            pinned_host=draw(st.sampled_from([None, "h0", "h1"])),
        )
        for k in range(draw(st.integers(1, 8)))
    ]
    policy = SchedulerPolicy(
        weigher=draw(st.sampled_from(["least_loaded", "pack"])),
        cpu_overcommit=draw(st.sampled_from([1.0, 1.5])),
        vo_quotas={"cms": (draw(st.integers(0, 20)), draw(st.integers(0, 6)))},
    )
    return s, reqs, policy


@settings(max_examples=300, deadline=None)
@given(sites())
def test_plan_invariants(site: tuple[Snapshot, list[PlacementRequest], SchedulerPolicy]) -> None:
    s, reqs, policy = site
    plan = schedule(reqs, s, policy)
    hosts = {h.name: h for h in s.hosts}
    insts = {i.id: i for i in s.instances}
    by_id = {r.instance_id: r for r in reqs}
    # Every request is either placed or explained, never both.
    assert set(plan.placements) | set(plan.unplaced) == set(by_id)
    assert not set(plan.placements) & set(plan.unplaced)
    used = {n: [h.used_vcpus, h.used_memory_mib] for n, h in hosts.items()}
    for victim, where in plan.victim_hosts.items():
        used[where][0] -= insts[victim].vcpus
        used[where][1] -= insts[victim].memory_mib
    touched = set()
    for iid, where in plan.placements.items():
        r = by_id[iid]
        assert hosts[where].state in PLACEABLE_HOST_STATES
        assert r.pinned_host in (None, where)
        assert all(hosts[where].labels.get(k) == v for k, v in r.labels.items())
        used[where][0] += r.vcpus
        used[where][1] += r.memory_mib
        touched.add(where)
    for name in touched:
        cap = hosts[name].capacity
        assert used[name][0] <= int(cap.vcpus * policy.cpu_overcommit), name
        assert used[name][1] <= int(cap.memory_mib * policy.memory_overcommit), name
    # Preemption only of strictly lower tiers, on the host the preemptor went to.
    for victim, where in plan.victim_hosts.items():
        assert insts[victim].host == where
        assert any(
            by_id[i].tier.rank > insts[victim].tier.rank for i, h in plan.placements.items() if h == where
        )
    assert set(plan.preemptions) == set(plan.victim_hosts)
    # Anti-affinity: no host ends with two live members of a group that a placement joined.
    for iid, where in plan.placements.items():
        g = by_id[iid].anti_affinity
        if g is None:
            continue
        others = [
            i.id
            for i in s.instances
            if i.anti_affinity == g
            and i.host == where
            and i.id not in plan.preemptions
            and i.state in (InstanceState.READY, InstanceState.BOOTING, InstanceState.STOPPING)
            and i.id not in by_id
        ] + [o for o, h in plan.placements.items() if h == where and by_id[o].anti_affinity == g and o != iid]
        assert others == [], (iid, where, others)
