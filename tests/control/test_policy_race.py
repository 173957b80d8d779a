"""Several real control workers race over a VO quota and an anti-affinity group: no violation, ever.

Three `dynvm worker` processes (4 threads each) and three test-driver agents on a real Redis.  Each worker
plans against its own snapshot; only the atomic claim sees the others' commits, so this is where a policy
checked against the snapshot alone breaks (two CEs on one host, a fourth cms VM).  A sampler watches the
records and Redis's books for the whole run.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from provisioner.control.client import choose_image, submit
from provisioner.model import CLAIMING_STATES, InstanceState
from tests.conftest import wait_until
from tests.control.ministack import Stack, mini_stack, stack_config

pytestmark = [pytest.mark.redis, pytest.mark.libvirt, pytest.mark.slow]

QUOTA = 3
N_CMS = 10
N_CE = 6
SETTLED = frozenset({InstanceState.READY, InstanceState.FAILED})


def violations(stack: Stack) -> list[str]:
    """What breaks the policy right now, in the records or in Redis's books."""
    store = stack.rt.store
    found = []
    held = [i for i in store.list_instances() if i.state in CLAIMING_STATES]
    cms = [i for i in held if i.vo == "cms"]
    if len(cms) > QUOTA or sum(i.vcpus for i in cms) > QUOTA:
        found.append(f"cms holds {len(cms)} instances: {sorted(i.id for i in cms)}")
    ce_hosts = Counter(i.host for i in held if i.anti_affinity == "ce")
    found += [f"{n} CEs on {h}" for h, n in ce_hosts.items() if n > 1]
    n, v = store.vo_usage("cms")
    if n > QUOTA or v > QUOTA:
        found.append(f"redis books: cms uses {n} instances, {v} vCPU")
    for h in stack.hosts:
        found += [
            f"redis books: {ids} of {g} on {h}" for g, ids in store.group_members(h).items() if len(ids) > 1
        ]
    return found


def test_racing_workers_never_overrun_a_quota_or_break_anti_affinity(redis_url: str, tmp_path: Path) -> None:
    cfg = stack_config(tmp_path, redis_url, ["hv1", "hv2", "hv3"], cpus=4)
    cfg["vos"]["cms"].update(max_instances=QUOTA, max_vcpus=QUOTA)
    with mini_stack(tmp_path / "stack", cfg, workers=3) as stack:
        rt = stack.rt
        cms_img, _ = choose_image(rt, "cms-wn", "cms")
        ce_img, _ = choose_image(rt, "ce", None)
        seen: list[str] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                seen.extend(violations(stack))

        sampler = threading.Thread(target=sample)
        sampler.start()
        ids: dict[str, list[str]] = defaultdict(list)
        try:
            # Interleaved and sent at once: every worker thread gets some of both kinds.
            for k in range(max(N_CMS, N_CE)):
                if k < N_CMS:
                    ids["cms"].append(submit(rt, cms_img, "cms", owner=f"job{k}", vcpus=1)[0].id)
                if k < N_CE:
                    ids["ce"].append(submit(rt, ce_img, None, service=f"ce-{k}", vcpus=1)[0].id)

            def settled() -> bool:
                return all(
                    (i := rt.store.get_instance(iid)) is not None and i.state in SETTLED
                    for iid in ids["cms"] + ids["ce"]
                )

            wait_until(settled, timeout=120, interval=0.2, what="every request to be ready or failed")
        finally:
            done.set()
            sampler.join(timeout=30)
        assert not seen, f"policy violated during the race: {sorted(set(seen))[:10]}"
        cms = [rt.store.require_instance(i) for i in ids["cms"]]
        ce = [rt.store.require_instance(i) for i in ids["ce"]]
        # The quota was used fully (a burst above it must not block everyone) and never exceeded.
        assert sum(i.state is InstanceState.READY for i in cms) == QUOTA, [
            (i.id, i.state, i.reason) for i in cms
        ]
        assert all("quota" in i.reason for i in cms if i.state is InstanceState.FAILED), [
            i.reason for i in cms
        ]
        ready_ce = [i for i in ce if i.state is InstanceState.READY]
        assert sorted(str(i.host) for i in ready_ce) == ["hv1", "hv2", "hv3"]
        assert all("anti" in i.reason for i in ce if i.state is InstanceState.FAILED), [i.reason for i in ce]
        assert rt.store.vo_usage("cms") == (QUOTA, QUOTA)
        assert not violations(stack)
