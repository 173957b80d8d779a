"""``dynvm demo``: bring the local farm up and play the main job with a readable timeline."""

from __future__ import annotations

import argparse
import time
from typing import Any

from provisioner.cli.argtypes import int_range, seconds
from provisioner.cli.context import CliContext
from provisioner.cli.demo_jobs import Say, play_hook_pair, play_slurm, side_by_side, slurm_unavailable
from provisioner.cli.farm import farm_dir_arg
from provisioner.errors import EXIT_CONFLICT, EXIT_OK

DEMO_VOS = ("cms", "atlas", "lhcb")
MAX_PER_VO = 20  # a demo, not a load test (benchmarks/bench_provision.py is one)


def register(sub: Any) -> None:
    d = sub.add_parser(
        "demo",
        help="bring up the local farm; jobs of three VOs (through a private Slurm when installed) get VMs "
        "of their own images; a warm-pool hit beside a cold start",
    )
    d.add_argument("--hosts", type=int_range(1, 64), default=3, help="hypervisor hosts (1..64, default 3)")
    d.add_argument("--driver", choices=["test", "qemu"], default="test")
    d.add_argument("--dir", type=farm_dir_arg, default=None, help="farm directory (as for `dynvm farm up`)")
    d.add_argument(
        "--per-vo", type=int_range(1, MAX_PER_VO), default=1,
        help=f"Slurm jobs (or, without Slurm, VMs) per VO (1..{MAX_PER_VO}, default 1)",
    )
    d.add_argument(
        "--no-slurm", action="store_true",
        help="request the VMs directly even when slurm-wlm and munge are installed",
    )
    d.add_argument("--timeout", type=seconds(), default=300.0)
    d.add_argument(
        "--failover", action="store_true",
        help="then kill a host carrying a CE, an SE and a WMS and watch them come back (timeline)",
    )
    d.set_defaults(func=demo)


def demo(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.cli.common import runtime
    from provisioner.configload import load_config
    from provisioner.farm.local import default_layout, farm_up

    t0 = time.monotonic()
    def say(text: str) -> None:
        if not ctx.out.json:
            ctx.out.message(f"[{time.monotonic() - t0:6.2f}s] {text}")

    layout = default_layout(args.dir)
    say(f"bringing up a {args.hosts}-host farm ({args.driver} driver) in {layout.base}")
    farm_up(layout, args.hosts, args.driver)
    ctx._config = load_config(layout.config_file)
    ctx._catalogue = None
    rt = runtime(ctx)
    findings = rt.catalogue.validate()
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity != "error"]
    say(
        f"catalogue {ctx.config.catalogue_dir}: {len(rt.catalogue.families())} image families, "
        f"{plural(len(errors), 'error')}, {plural(len(warnings), 'warning')}"
    )
    for line in [f"  {f}" for f in errors] + explain_warnings(warnings, args.driver):
        say(line)
    say(
        "farm up: " + ", ".join(f"{h.name} ({h.capacity.vcpus} vCPU)" for h in rt.store.list_hosts())
    )
    why_not = slurm_unavailable(args.no_slurm)
    if why_not is None:
        failed = _jobs(ctx, rt, layout, say, args)
    else:
        say(why_not)
        failed = _direct(ctx, rt, say, args)
    if not ctx.out.json:
        ctx.out.message(
            "The farm keeps running: try `dynvm vm list`, `dynvm events`, `dynvm pool list`; "
            "stop it with `dynvm farm down`."
        )
    if args.failover:
        from provisioner.cli.demo_failover import play

        if args.hosts < 2:
            ctx.out.message("--failover needs at least 2 hosts (a survivor)")
            return EXIT_CONFLICT
        if not play(ctx, rt, layout, say, args.timeout):
            return EXIT_CONFLICT
    return EXIT_CONFLICT if failed else EXIT_OK


def _jobs(ctx: CliContext, rt: Any, layout: Any, say: Say, args: argparse.Namespace) -> bool:
    """Slurm: one sbatch job per VO (and --per-vo) from its pool account, a warm pool for cms; True if
    anything failed."""
    runs, cold, warm = play_slurm(rt, layout.base, say, DEMO_VOS, args.per_vo, args.timeout)
    bad = [r for r in runs if r.problem]
    for r in bad:
        say(f"job {r.job} ({r.vo}) FAILED: {r.problem}")
    if not warm:
        say("no job took the warm-pool VM")
    say(side_by_side(cold, warm))
    say("  (from Slurm starting the job, when its PrologSlurmctld asks dynvm, to the job's VM handed over; "
        "sbatch -> RUNNING per job in the table)")
    rows = [r.row() for r in runs]
    if ctx.out.json:
        ctx.out.obj({"mode": "slurm", "jobs": rows, "latency_s": {"cold": dict(cold), "warm": dict(warm)}})
    else:
        cols = ["job", "user", "vo", "vm", "image", "host", "node", "start", "vm_ready_ms",
                "sbatch_to_running_ms", "state", "exit"]
        ctx.out.table(rows, cols, title="demo jobs (plain sbatch by each VO's pool account)")
    return bool(bad) or not warm


def _direct(ctx: CliContext, rt: Any, say: Say, args: argparse.Namespace) -> bool:
    """No Slurm: VMs of each VO requested through the client, then the warm/cold pair through the hook
    path; True if anything failed."""
    from provisioner.cli.common import instance_row
    from provisioner.control.client import choose_image, submit, wait

    pending = []
    for vo in DEMO_VOS:
        image, vo_ = choose_image(rt, None, vo)
        for _ in range(args.per_vo):
            inst, _created = submit(rt, image, vo_, owner="demo")
            pending.append(inst.id)
            say(f"requested {article(vo)} {vo} worker VM ({image.ref}) -> {inst.id}")
    done = []
    for iid in pending:
        inst = wait(rt, iid, args.timeout)
        done.append(inst)
        say(f"{iid}: {inst.state.value} on {inst.host} {inst.reason}".rstrip())
    pair = play_hook_pair(rt, say, args.timeout)
    if pair is not None:
        say(side_by_side(pair["cold"], pair["warm"]))
    rows = [instance_row(i.to_dict()) for i in done]
    if ctx.out.json:
        latency = None if pair is None else {"cold": dict(pair["cold"]), "warm": dict(pair["warm"])}
        ctx.out.obj({"mode": "direct", "vms": rows, "latency_s": latency})
    else:
        ctx.out.table(rows, ["id", "state", "vo", "image", "host"], title="demo VMs")
    failed = [i for i in done if i.state.value != "ready"]
    return bool(failed) or (pair is not None and not pair["warm"])


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def article(word: str) -> str:
    """"a cms", "an atlas": by the first letter (VO names are short acronyms)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def explain_warnings(warnings: list[Any], driver: str) -> list[str]:
    """Each warning, except the kernels and initrds not built yet on the test driver: those are expected
    (its domains boot no kernel; `dynvm farm up --driver qemu` builds them) and are summed up in one line."""
    expected = [w for w in warnings if driver == "test" and "missing artefact" in w.message]
    lines = [f"  {w}" for w in warnings if w not in expected]
    if expected:
        lines.append(
            f"  {plural(len(expected), 'warning')}: kernel/initrd artefacts not built on this machine; the "
            "test driver boots no kernel so it does not need them (`dynvm image validate` lists them)"
        )
    return lines
