"""``dynvm agent --host NAME`` and ``dynvm worker``: the long-running processes.

Every argument is checked at parse time and Redis is asked once before the process does anything: an agent
runs its start-up reconcile (which may destroy domains) as soon as it starts, so it must not start on a
command line or a configuration it would refuse a moment later.
"""

from __future__ import annotations

import argparse
from typing import Any

from provisioner.cli.argtypes import int_range
from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK

MAX_CONCURRENCY = 256


def register(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the host agent of one hypervisor (serves queue host.NAME)")
    p.add_argument("--host", required=True, help="host name from the configuration")
    w = sub.add_parser("worker", help="run a control worker (serves queue provision; never talks to libvirt)")
    for parser, what in ((p, "parallel operations on this host"), (w, "parallel placements")):
        parser.add_argument(
            "--concurrency",
            type=int_range(1, MAX_CONCURRENCY),
            default=8,
            help=f"{what} (1..{MAX_CONCURRENCY}, default 8)",
        )
        add_log_format(parser)
    p.set_defaults(func=agent)
    w.set_defaults(func=worker)


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` for a long-running process (agent, worker, monitor, watchdog)."""
    from provisioner.oplog import FORMATS

    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="one line per operation on stderr, as text or one JSON object (default text)",
    )


def agent(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.agent.main import run_agent
    from provisioner.cli.common import check_redis
    from provisioner.errors import NotFoundError
    from provisioner.oplog import setup
    from provisioner.yamlio import short_repr

    config = ctx.state_config
    if config.host(args.host) is None:
        raise NotFoundError(f"host {short_repr(args.host)} is not in the configuration ({config.source})")
    check_redis(config)
    setup(args.log_format)
    run_agent(config, args.host, concurrency=args.concurrency)
    return EXIT_OK


def worker(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.cli.common import check_redis
    from provisioner.control.worker import run_worker
    from provisioner.oplog import setup

    config = ctx.state_config
    check_redis(config)
    setup(args.log_format)
    run_worker(config, concurrency=args.concurrency)
    return EXIT_OK
