"""``dynvm demo``: bring the local farm up and play the main job with a readable timeline."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_CONFLICT, EXIT_OK

DEMO_VOS = ("cms", "atlas", "lhcb")


def register(sub: Any) -> None:
    d = sub.add_parser("demo", help="bring up the local farm and provision VMs of three VOs on it")
    d.add_argument("--hosts", type=int, default=3)
    d.add_argument("--driver", choices=["test", "qemu"], default="test")
    d.add_argument("--dir", type=Path, default=None)
    d.add_argument("--per-vo", type=int, default=2, help="VMs per VO (default 2)")
    d.add_argument("--timeout", type=float, default=300.0)
    d.set_defaults(func=demo)


def demo(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.cli.common import instance_row, runtime
    from provisioner.configload import load_config
    from provisioner.control.client import choose_image, submit, wait
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
    say(
        f"catalogue {ctx.config.catalogue_dir}: {len(rt.catalogue.families())} image families, "
        f"{len(errors)} errors, {len(findings) - len(errors)} warnings"
    )
    for f in errors:
        say(f"  {f}")
    say(
        "farm up: " + ", ".join(f"{h.name} ({h.capacity.vcpus} vCPU)" for h in rt.store.list_hosts())
    )
    pending = []
    for vo in DEMO_VOS:
        image, vo_ = choose_image(rt, None, vo)
        for _ in range(args.per_vo):
            inst, _created = submit(rt, image, vo_, owner="demo")
            pending.append(inst.id)
            say(f"requested a {vo} worker VM ({image.ref}) -> {inst.id}")
    done = []
    for iid in pending:
        inst = wait(rt, iid, args.timeout)
        done.append(inst)
        say(f"{iid}: {inst.state.value} on {inst.host} {inst.reason}".rstrip())
    rows = [instance_row(i.to_dict()) for i in done]
    ctx.out.table(rows, ["id", "state", "vo", "image", "host"], title="demo VMs")
    if not ctx.out.json:
        ctx.out.message(
            "The farm keeps running: try `dynvm vm list`, `dynvm events`, `dynvm host list`; "
            "stop it with `dynvm farm down`."
        )
    failed = [i for i in done if i.state.value != "ready"]
    return EXIT_CONFLICT if failed else EXIT_OK
