"""``dynvm agent --host NAME`` and ``dynvm worker``: the long-running processes."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the host agent of one hypervisor (serves queue host.NAME)")
    p.add_argument("--host", required=True, help="host name from the configuration")
    p.add_argument("--concurrency", type=int, default=8, help="parallel operations on this host")
    p.set_defaults(func=agent)
    w = sub.add_parser("worker", help="run a control worker (serves queue provision; never talks to libvirt)")
    w.add_argument("--concurrency", type=int, default=8)
    w.set_defaults(func=worker)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def agent(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.agent.main import run_agent

    _logging()
    run_agent(ctx.state_config, args.host, concurrency=args.concurrency)
    return EXIT_OK


def worker(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.control.worker import run_worker

    _logging()
    run_worker(ctx.state_config, concurrency=args.concurrency)
    return EXIT_OK
