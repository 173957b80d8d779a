"""StateStore: the Redis state store of dynvm (hosts, instances, claims, leases, events).

Key layout (prefix ``dynvm``): ``host:NAME`` hash + ``hosts`` set; ``inst:ID`` hash + ``insts`` set +
``idx:host:NAME`` / ``idx:state:STATE`` / ``idx:role:ROLE`` sets (hot: live records; ended ones move to
``ended`` + ``history``, provisioner.state.retention); ``claims:NAME`` hash; ``idem:KEY`` ->
instance id; ``lease:host:NAME`` (PX TTL, value = agent token); ``events`` stream; ``notify:ID`` wake-ups.
Every id is validated (keys.ID_RE) before it becomes part of a key.  Redis unreachable raises
UnavailableError naming the URL, at first use or from ping().
"""

from __future__ import annotations

import time
from typing import cast

from provisioner.model import Host, InstanceState
from provisioner.scheduler.types import Snapshot
from provisioner.state.base import guarded
from provisioner.state.claims import ClaimsMixin
from provisioner.state.codec import host_from_fields, instance_from_fields
from provisioner.state.hosts import HostsMixin
from provisioner.state.instances import InstancesMixin
from provisioner.state.outbox import OutboxMixin
from provisioner.state.retention import RetentionMixin

_LIVE_STATES = [s.value for s in InstanceState if s is not InstanceState.GONE]


def _with_lease(host: Host, holder: object) -> Host:
    host.lease_alive = holder is not None
    return host


class StateStore(HostsMixin, InstancesMixin, ClaimsMixin, RetentionMixin, OutboxMixin):
    """One object per process; thread-safe (redis-py's connection pool)."""

    @guarded
    def snapshot(self, instances: bool = True) -> Snapshot:
        """Hosts with their used resources and (unless ``instances=False``) every instance not gone.

        A request without anti-affinity, VO quota or need to preempt only needs the hosts: reading every
        instance costs O(instances) per placement, which dominated provisioning under load.

        Two pipelined round trips, not one transaction: a snapshot may be a moment stale, which is safe
        because claims re-check capacity atomically.
        """
        pipe = self.r.pipeline(transaction=False)
        pipe.smembers(self.keys.hosts)
        if instances:
            pipe.sunion([self.keys.by_state(s) for s in _LIVE_STATES])
        got = cast(list[set[str]], pipe.execute())
        names, ids = got[0], (got[1] if instances else set())
        names_l, ids_l = sorted(names), sorted(ids)
        for n in names_l:
            pipe.hgetall(self.keys.host(n))
        if names_l:  # lease liveness (one MGET): placement skips hosts whose agent is not renewing
            pipe.mget([self.keys.lease(n) for n in names_l])
        for iid in ids_l:
            pipe.hgetall(self.keys.inst(iid))
        raw = pipe.execute()
        nh = len(names_l)
        leases = raw[nh] if nh else []
        hosts = tuple(_with_lease(host_from_fields(h), a) for h, a in zip(raw[:nh], leases, strict=True) if h)
        insts = tuple(instance_from_fields(i) for i in raw[nh + (1 if nh else 0) :] if i)
        return Snapshot(hosts=hosts, instances=insts, taken_at=time.time())
