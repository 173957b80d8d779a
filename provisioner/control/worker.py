"""``dynvm worker``: a control worker on the ``provision`` queue (plans and places, never uses libvirt)."""

from __future__ import annotations

import os
import re

from provisioner.config import Config
from provisioner.control import tasks
from provisioner.messaging import PROVISION_QUEUE, make_app
from provisioner.runtime import build_runtime, serve


def run_worker(config: Config, concurrency: int = 8) -> None:
    rt = build_runtime(config)
    rt.app = make_app(config)
    tasks.register(rt.app)
    rt.app.dynvm_runtime = rt
    from batch_hooks.server import start_thread

    start_thread(rt)  # the batch hooks' requests (<prefix>:hooks): light hooks, trusted work done here
    name = f"worker-{os.getpid()}"
    from provisioner.control.sweeper import start_sweeper

    # The outbox sweeper: re-drives requests and placements whose message was lost (survives any error).
    start_sweeper(rt, re.sub(r"[^A-Za-z0-9_.-]", "-", f"{name}.{os.uname().nodename}")[:128])
    if config.pools.batch == "slurm":
        # Jobs whose worker VM was lost (host death, preemption, crash) are requeued by dynvm itself.
        import threading

        from batch_hooks.requeue import SlurmRequeue, run_forever

        requeuers = {"slurm": SlurmRequeue()}
        threading.Thread(
            target=run_forever, args=(rt, requeuers, threading.Event()), name="lost-vm-requeue", daemon=True
        ).start()
    serve(rt, PROVISION_QUEUE, name, concurrency)
