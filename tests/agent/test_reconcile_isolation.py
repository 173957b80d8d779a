"""One instance's unexpected exception in a reconcile pass does not starve the others of that pass (real
Redis, libvirt's real test driver; the host raises a non-dynvm error for one domain, as a libvirt binding
or a bug could)."""

from __future__ import annotations

import pytest

from provisioner.agent.reconcile import reconcile_host
from provisioner.runtime import Runtime
from tests.agent.world import RacingHost, events, running_here, start_domain

pytestmark = [pytest.mark.redis, pytest.mark.libvirt]


class HostFailingOneDestroy(RacingHost):
    """The real test-driver host whose destroy of one domain raises a RuntimeError (not a DynvmError)."""

    broken = "dynvm-o1"

    def destroy(self, name: str) -> None:
        if name == self.broken:
            raise RuntimeError(f"unexpected failure destroying {name}")
        super().destroy(name)


def test_an_exception_in_one_action_leaves_the_rest_of_the_pass_done(rt: Runtime) -> None:
    assert rt.hypervisor is not None
    rt.hypervisor.close()
    rt.hypervisor = HostFailingOneDestroy(rt.config.hosts[0].uri)
    o1, o2 = start_domain(rt, "o1"), start_domain(rt, "o2")  # dynvm domains no record wants: orphans
    d = reconcile_host(rt)  # before: the RuntimeError ended the pass at o1, o2 was never looked at
    assert d.failed == ["o1"] and d.orphans == [o2]
    assert running_here(rt, o1) and not running_here(rt, o2)
    assert "reconcile_error" in events(rt.store, "o1")
    assert "orphan_destroyed" in events(rt.store, "o2")
    # The next pass tries o1 again (and keeps failing on it without giving up on the loop).
    assert reconcile_host(rt).failed == ["o1"]

