"""Placement policy enforced inside the atomic claim: agent lease, anti-affinity and VO quotas (real Redis).

The scheduler checks the same policy against a snapshot, but only the claim sees every concurrent worker's
commits; these tests drive the claim script directly, the race of real control workers is in
tests/control/test_policy_race.py.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, cast

import pytest

from provisioner.model import Capacity, Host, Instance, InstanceState, Role
from provisioner.state import ClaimRequest, StateStore
from tests.conftest import wait_until
from tests.state.test_claims import check_books, race, store  # noqa: F401 - the fixture

pytestmark = pytest.mark.redis


def q(host: str, iid: str, vcpus: int = 1, **kw: Any) -> ClaimRequest:
    return ClaimRequest(host, iid, vcpus, 256, **kw)


def code(s: StateStore, c: ClaimRequest) -> str:
    return s.claim_batch([c]).codes[c.instance_id]


def test_no_claim_on_a_host_whose_agent_holds_no_lease(store: StateStore) -> None:  # noqa: F811
    store.register_host(Host("hv04", "test:///default", capacity=Capacity(8, 8192)))
    assert code(store, q("hv04", "a")) == "no_lease"
    store.r.set(store.keys.lease("hv04"), "t", px=300)
    assert code(store, q("hv04", "a")) == "ok"
    wait_until(lambda: not store.lease_alive("hv04"), timeout=5, what="the lease to expire")
    assert code(store, q("hv04", "b")) == "no_lease"
    assert store.claims_on("hv04") == {"a": (1, 256)}
    assert store.claim_batch([q("hv04", "b")], require_lease=False).committed  # explicit opt-out only


def test_anti_affinity_is_checked_in_the_claim(store: StateStore) -> None:  # noqa: F811
    assert code(store, q("hv01", "a", group="ce")) == "ok"
    assert code(store, q("hv01", "b", group="ce")) == "anti_affinity"
    assert code(store, q("hv01", "c", group="se")) == "ok"  # another group
    assert code(store, q("hv01", "a", 2, group="ce")) == "ok"  # a repeated claim is not its own rival
    assert code(store, q("hv02", "b", group="ce")) == "ok"
    assert store.group_members("hv01") == {"ce": ["a"], "se": ["c"]}
    # A migration of b onto hv01 is refused while a is there; once a is gone it goes through.
    assert code(store, q("hv01", "b", group="ce")) == "anti_affinity"
    assert store.release_claim("hv01", "a")
    assert code(store, q("hv01", "b", group="ce")) == "ok"
    assert store.group_members("hv01") == {"ce": ["b"], "se": ["c"]}
    check_books(store)


def test_vo_quota_is_checked_in_the_claim_and_counts_instances_once(store: StateStore) -> None:  # noqa: F811
    lim: dict[str, Any] = {"vo": "cms", "max_instances": 2, "max_vcpus": 5}
    assert code(store, q("hv01", "a", 2, **lim)) == "ok"
    assert code(store, q("hv02", "b", 2, **lim)) == "ok"
    assert code(store, q("hv03", "c", 1, **lim)) == "quota"  # third instance
    assert store.vo_usage("cms") == (2, 4)
    # A's live migration: the second claim does not count a second instance, its release neither.
    assert code(store, q("hv03", "a", 2, **lim)) == "ok"
    assert store.vo_usage("cms") == (2, 4)
    assert store.release_claim("hv01", "a")
    assert store.vo_usage("cms") == (2, 4)
    assert store.release_claim("hv03", "a")
    assert store.vo_usage("cms") == (1, 2)
    assert code(store, q("hv03", "c", 4, **lim)) == "quota"  # 2 + 4 > 5 vCPU
    assert code(store, q("hv03", "c", 3, **lim)) == "ok"
    assert code(store, q("hv03", "d", 1, vo="lhcb", max_instances=1)) == "ok"  # another VO's own quota
    assert store.vo_usage("cms") == (2, 5) and store.vo_usage("lhcb") == (1, 1)


def test_a_batch_sees_its_releases_and_earlier_claims(store: StateStore) -> None:  # noqa: F811
    lim: dict[str, Any] = {"vo": "cms", "max_instances": 1}
    assert code(store, q("hv01", "pool1", group="ce", **lim)) == "ok"
    batch = [q("hv01", "x", group="ce"), q("hv02", "y", **lim)]
    res = store.claim_batch(batch)
    assert not res.committed and res.failed == {"x": "anti_affinity", "y": "quota"}
    res = store.claim_batch(batch, releases=[("hv01", "pool1")])  # preempting pool1 frees both
    assert res.committed, res.codes
    assert store.vo_usage("cms") == (1, 1) and store.group_members("hv01") == {"ce": ["x"]}
    res = store.claim_batch([q("hv02", "z", group="g"), q("hv02", "w", group="g")])
    assert res.codes == {"z": "ok", "w": "anti_affinity"} and store.group_members("hv02") == {}


@pytest.mark.parametrize("end", [InstanceState.FAILED, InstanceState.LOST, None])
def test_leaving_the_claim_by_transition_or_delete_keeps_the_books(
    store: StateStore,  # noqa: F811
    end: InstanceState | None,
) -> None:
    store.create_instance(Instance("i1", Role.SERVICE, "ce:1", 2, 256, vo="cms", anti_affinity="ce"))
    assert code(store, q("hv01", "i1", 2, vo="cms", group="ce", max_instances=1)) == "ok"
    store.transition("i1", InstanceState.PLACED, host="hv01")
    if end is None:
        assert store.delete_instance("i1")
    else:
        store.transition("i1", end)
    assert store.vo_usage("cms") == (0, 0) and store.group_members("hv01") == {}
    assert code(store, q("hv01", "i2", 2, vo="cms", group="ce", max_instances=1)) == "ok"
    check_books(store)


def test_racing_claims_never_break_quota_or_anti_affinity(store: StateStore) -> None:  # noqa: F811
    hosts = ["hv01", "hv02", "hv03"]
    limits = {"cms": (5, 9), "atlas": (3, None)}

    def worker(t: int) -> None:
        rnd = random.Random(t)
        for k in range(40):
            iid = f"t{t}-{k}"
            vo = rnd.choice(["cms", "atlas"])
            n, v = limits[vo]
            c = q(
                rnd.choice(hosts),
                iid,
                rnd.randint(1, 3),
                vo=vo,
                group=rnd.choice(["g1", "g2", None]),
                max_instances=n,
                max_vcpus=v,
            )
            if store.claim_batch([c]).committed and rnd.random() < 0.3:
                assert store.release_claim(c.host, iid)

    race(12, worker)
    check_books(store)
    members: dict[str, dict[str, int]] = defaultdict(dict)
    for h in hosts:
        for iid, value in cast(dict[str, str], store.r.hgetall(store.keys.claims(h))).items():
            vcpus, _, vo, group = value.split(",")
            members[vo][iid] = int(vcpus)
        for group, ids in store.group_members(h).items():
            assert len(ids) == 1, (h, group, ids)
    for vo, (max_n, max_v) in limits.items():
        got = members[vo]
        assert store.vo_usage(vo) == (len(got), sum(got.values()))  # the books match the claims
        assert len(got) <= max_n and (max_v is None or sum(got.values()) <= max_v)
    # 480 claims for at most 8 places: the race really ran at the quota limit.
    assert len(members["atlas"]) == 3


def test_removing_a_host_gives_back_its_quota_and_group_slots(store: StateStore) -> None:  # noqa: F811
    assert code(store, q("hv01", "a", 2, vo="cms", group="ce", max_instances=1)) == "ok"
    store.remove_host("hv01")
    assert store.vo_usage("cms") == (0, 0) and store.group_members("hv01") == {}
    assert code(store, q("hv02", "b", 2, vo="cms", group="ce", max_instances=1)) == "ok"
