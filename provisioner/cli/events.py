"""``dynvm events [--follow]`` and ``dynvm status``."""

from __future__ import annotations

import argparse
from typing import Any

from provisioner.cli.argtypes import int_range
from provisioner.cli.common import runtime
from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK

COLUMNS = ["ts", "kind", "instance", "host", "message"]
MAX_COUNT = 100_000  # the stream keeps ~10,000 (events_maxlen); more is never there to read


def register(sub: Any) -> None:
    ev = sub.add_parser("events", help="the event stream (newest last)")
    ev.add_argument(
        "-n",
        "--count",
        type=int_range(1, MAX_COUNT),
        default=50,
        help=f"how many (1..{MAX_COUNT}, default 50)",
    )
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.set_defaults(func=events)
    st = sub.add_parser("status", help="hosts, VMs and processes at a glance")
    st.set_defaults(func=status)


def events(ctx: CliContext, args: argparse.Namespace) -> int:
    rt = runtime(ctx)
    evs = [e.to_dict() for e in rt.store.read_events(count=args.count)]
    if not args.follow:
        ctx.out.table(evs, COLUMNS, title="events")
        return EXIT_OK
    for e in evs:
        ctx.out.stream(e) if ctx.out.json else ctx.out.message(_line(e))
    for ev in rt.store.follow_events(evs[-1]["id"] if evs else None, block_ms=1000):
        e = ev.to_dict()
        ctx.out.stream(e) if ctx.out.json else ctx.out.message(_line(e))
    return EXIT_OK


def _line(e: dict[str, Any]) -> str:
    return (
        f"{e.get('ts', '')}  {e.get('kind', ''):<16} {e.get('instance', '') or '-':<13} "
        f"{e.get('host', '') or '-':<6} {e.get('message', '')}"
    )


def status(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.redisurl import redact

    rt = runtime(ctx)
    hosts = rt.store.list_hosts()
    insts = rt.store.list_instances()
    by_state: dict[str, int] = {}
    for i in insts:
        by_state[i.state.value] = by_state.get(i.state.value, 0) + 1
    ctx.out.obj(
        {
            "config": ctx.config.source,
            "redis": redact(ctx.config.redis_url),  # never print a password
            "hosts": {
                h.name: f"{h.state.value}, lease {'alive' if rt.store.lease_alive(h.name) else 'expired'}, "
                f"{h.used_vcpus}/{h.capacity.vcpus} vCPU"
                for h in hosts
            },
            "instances": by_state,
            "catalogue": "; ".join(str(p) for p in rt.catalogue.problems) or "ok",
            **_pools_summary(rt),  # issue 9: the pool watcher's last run, tripped image breakers
        },
        title="dynvm status",
    )
    return EXIT_OK


def _pools_summary(rt: Any) -> dict[str, str]:
    from batch_hooks.watcher import status_summary

    return status_summary(rt)

