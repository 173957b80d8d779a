"""Run a command inside a VM through its image's exec method, via the VM's host agent."""

from __future__ import annotations

from typing import Any

from provisioner.errors import ConflictError, NotFoundError, ValidationError
from provisioner.model import InstanceState
from provisioner.rpc import call_agent
from provisioner.runtime import Runtime

MAX_ARGS = 256


def exec_in_vm(rt: Runtime, instance_id: str, argv: list[str], timeout_s: float = 60.0) -> dict[str, Any]:
    """Client side: returns {exit_code, stdout, stderr, duration_s, host}."""
    from provisioner.messaging import EXEC

    if not argv or len(argv) > MAX_ARGS or not all(isinstance(a, str) for a in argv):
        raise ValidationError(f"exec: give a command (1..{MAX_ARGS} arguments)")
    inst = rt.store.get_instance(instance_id)
    if inst is None:
        raise NotFoundError(f"vm {instance_id!r} not found")
    if inst.state is not InstanceState.READY or inst.host is None:
        raise ConflictError(f"vm {inst.id} is {inst.state.value}; exec needs a ready VM")
    return call_agent(rt, inst.host, EXEC, [inst.id, argv, timeout_s], timeout_s + 15)
