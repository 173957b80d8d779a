"""``dynvm worker``: a control worker on the ``provision`` queue (plans and places, never uses libvirt)."""

from __future__ import annotations

import os
import re
import threading

from provisioner.config import Config
from provisioner.control import tasks
from provisioner.messaging import PROVISION_QUEUE, make_app
from provisioner.runtime import Runtime, build_runtime, serve


def run_worker(config: Config, concurrency: int = 8) -> None:
    rt = build_runtime(config)
    rt.app = make_app(config)
    tasks.register(rt.app)
    rt.app.dynvm_runtime = rt
    from batch_hooks.server import start_thread

    start_thread(rt)  # the batch hooks' requests (<prefix>:hooks): light hooks, trusted work done here
    name = f"worker-{os.getpid()}"
    member = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{name}.{os.uname().nodename}")[:128]
    from provisioner.control.sweeper import start_sweeper

    # The outbox sweeper: re-drives requests and placements whose message was lost (survives any error).
    start_sweeper(rt, member)
    stop = threading.Event()
    loops = start_batch_loops(rt, member, stop)
    try:
        serve(rt, PROVISION_QUEUE, name, concurrency)
    finally:
        stop.set()  # a worker shutting down hands the watcher lease over at once instead of letting it expire
        for t in loops:
            t.join(timeout=5)


def start_batch_loops(rt: Runtime, member: str, stop: threading.Event) -> list[threading.Thread]:
    """The batch side's long-lived loops of a control worker (each survives any error and records its last
    run in Redis for ``dynvm status``): with ``pools.batch`` set, the demand watcher (run by one worker of
    the farm at a time, by lease; the others stand by); with Slurm or HTCondor, the lost-VM requeue."""
    pools = rt.config.pools
    threads = []
    if pools.batch != "none" and pools.watcher:
        from batch_hooks.demand import source_for
        from batch_hooks.watcher import serve as serve_watcher

        source = source_for(rt.config)
        threads.append(threading.Thread(target=serve_watcher, args=(rt, source, member, stop),
                                        name="pool-watcher", daemon=True))
    from batch_hooks.requeue import requeuers_for, run_forever

    requeuers = requeuers_for(pools.batch)
    if requeuers:
        # Jobs whose worker VM was lost (host death, preemption, crash) are requeued by dynvm itself.
        threads.append(threading.Thread(target=run_forever, args=(rt, requeuers, stop),
                                        kwargs={"worker": member}, name="lost-vm-requeue", daemon=True))
    for t in threads:
        t.start()
    return threads
