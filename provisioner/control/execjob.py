"""Run a command inside a VM through its image's exec method: straight to the VM's exec channel.

No Celery task, no queue: the caller connects to the guest's virtio-serial socket itself, so a payload can
run for days, holds no agent thread, and nothing can redeliver it.  The socket is local to the VM's host
(QEMU binds it there), so this runs on that host: in the WNoDeS model the batch job already runs on the
dynvm host its VM was placed on (the farm's hosts all share one machine).  Elsewhere it is refused with a
one-line error naming the host.  ``run_token`` (a job's attempt) makes a replayed start fail instead of
running the payload twice (provisioner.execchan.once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from provisioner.errors import ConflictError, NotFoundError, UnavailableError, ValidationError
from provisioner.model import InstanceState
from provisioner.runtime import Runtime

MAX_ARGS = 256
Sink = Callable[[bytes], object]


def exec_in_vm(
    rt: Runtime,
    instance_id: str,
    argv: list[str],
    timeout_s: float | None = 60.0,
    run_token: str | None = None,
    *,
    out: Sink | None = None,
    err: Sink | None = None,
    attach: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    merge: bool = False,
) -> dict[str, Any]:
    """Returns {exit_code, stdout, stderr, duration_s, host}.  ``timeout_s=None``: no limit (a payload).

    With ``out`` and ``err`` the output streams to them chunk by chunk while the command runs (no size
    cap; stdout/stderr in the result are then empty, out_bytes/err_bytes/run_id are added); without, it
    is collected and returned at the end (capped at 1 MiB per stream: short commands).  ``attach`` (with
    sinks, no argv) resumes a streaming run an earlier client left at cursor ``RUN:NEXT_OUT:NEXT_ERR``."""
    from provisioner.execchan.client import exec_socket, run_in_guest, stream_in_guest

    streaming = out is not None and err is not None
    if attach is not None:
        if not streaming or argv or run_token is not None:
            raise ValidationError("exec --attach resumes a streaming run: no command and no --once with it")
    else:
        ok = isinstance(argv, list) and 0 < len(argv) <= MAX_ARGS and all(isinstance(a, str) for a in argv)
        if not ok:
            raise ValidationError(f"exec: give a command (1..{MAX_ARGS} arguments)")
    inst = rt.store.get_instance(instance_id)
    if inst is None:
        raise NotFoundError(f"vm {instance_id!r} not found")
    if inst.state is not InstanceState.READY or inst.host is None:
        raise ConflictError(f"vm {inst.id} is {inst.state.value}; exec needs a ready VM")
    path = exec_socket(rt.config.storage.shared_dir, inst.id, inst.host)
    if not path.exists():
        raise UnavailableError(
            f"vm {inst.id}: its exec channel {path} is not on this machine; run on its host {inst.host}"
        )
    if run_token is not None:
        from provisioner.execchan.once import take_run_token

        take_run_token(rt.store.r, rt.store.keys.prefix, inst.id, run_token)
    if out is not None and err is not None:
        sres = stream_in_guest(path, None if attach else argv, timeout=timeout_s, out=out, err=err,
                               attach=attach, on_progress=on_progress, merge=merge)
        return {
            "exit_code": sres.exit_code,
            "stdout": "",
            "stderr": "",
            "duration_s": round(sres.duration_s, 3),
            "host": inst.host,
            "run_id": sres.run_id,
            "out_bytes": sres.out_bytes,
            "err_bytes": sres.err_bytes,
        }
    res = run_in_guest(path, argv, timeout=timeout_s)
    return {
        "exit_code": res.exit_code,
        "stdout": res.stdout,
        "stderr": res.stderr,
        "duration_s": round(res.duration_s, 3),
        "host": inst.host,
    }
