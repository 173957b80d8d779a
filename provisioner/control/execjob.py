"""Run a command inside a VM through its image's exec method, via the VM's host agent."""

from __future__ import annotations

from typing import Any

from provisioner.control.rpc import call_agent, reply, reply_error
from provisioner.control.runtime import Runtime, resolve_image
from provisioner.errors import ConflictError, DynvmError, NotFoundError, ValidationError
from provisioner.model import InstanceState

MAX_ARGS = 256


def answer_exec(rt: Runtime, request_id: str, instance_id: str, argv: list[str], timeout_s: float) -> None:
    """Agent side."""
    try:
        reply(rt, request_id, _run(rt, instance_id, argv, timeout_s))
    except DynvmError as err:
        reply_error(rt, request_id, err)


def _run(rt: Runtime, instance_id: str, argv: list[str], timeout_s: float) -> dict[str, Any]:
    from provisioner.agent.domain import exec_socket_path
    from provisioner.execchan.client import run_in_guest

    inst = rt.store.require_instance(instance_id)
    if inst.host != rt.host:
        raise ConflictError(f"vm {inst.id} is not on {rt.host} (record says {inst.host})")
    image = resolve_image(rt, inst.image)
    if image.spec.exec.method.value != "serial":
        raise ValidationError(
            f"image {image.ref}: exec method {image.spec.exec.method.value} is not served "
            "by the agent (only 'serial')"
        )
    res = run_in_guest(exec_socket_path(rt, inst, rt.host), argv, timeout=timeout_s)
    return {
        "exit_code": res.exit_code,
        "stdout": res.stdout,
        "stderr": res.stderr,
        "duration_s": round(res.duration_s, 3),
        "host": rt.host,
    }


def exec_in_vm(rt: Runtime, instance_id: str, argv: list[str], timeout_s: float = 60.0) -> dict[str, Any]:
    """Client side: returns {exit_code, stdout, stderr, duration_s, host}."""
    from provisioner.control.tasks import EXEC

    if not argv or len(argv) > MAX_ARGS or not all(isinstance(a, str) for a in argv):
        raise ValidationError(f"exec: give a command (1..{MAX_ARGS} arguments)")
    inst = rt.store.get_instance(instance_id)
    if inst is None:
        raise NotFoundError(f"vm {instance_id!r} not found")
    if inst.state is not InstanceState.READY or inst.host is None:
        raise ConflictError(f"vm {inst.id} is {inst.state.value}; exec needs a ready VM")
    return call_agent(rt, inst.host, EXEC, [inst.id, argv, timeout_s], timeout_s + 15)
