"""The agent's answers to request/reply calls (inventory, exec): run here, reply through provisioner.rpc."""

from __future__ import annotations

from typing import Any

from provisioner.errors import ConflictError, DynvmError, ValidationError
from provisioner.rpc import reply, reply_error
from provisioner.runtime import Runtime, resolve_image


def answer_inventory(rt: Runtime, request_id: str) -> None:
    """Agent side: list the domains and publish them."""
    assert rt.hypervisor is not None
    doms = [
        {
            "name": d.name,
            "state": d.state.value,
            "instance_id": d.metadata.get("instance_id"),
            "vo": d.metadata.get("vo"),
            "image": d.metadata.get("image"),
        }
        for d in rt.hypervisor.list_domains()
    ]
    reply(rt, request_id, {"host": rt.host, "domains": doms})


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
