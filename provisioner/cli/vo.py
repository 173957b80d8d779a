"""``dynvm vo``: the VOs the site supports and the image each one gets."""

from __future__ import annotations

import argparse
from typing import Any

from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK, DynvmError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("vo", help="virtual organisations", description="VOs and their images.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    ls = sub.add_parser("list", help="list configured VOs and the image each resolves to")
    ls.set_defaults(func=cmd_list)
    res = sub.add_parser("resolve", help="show the image a VO's jobs get (exit 3 if the VO is unknown)")
    res.add_argument("vo", metavar="VO")
    res.add_argument("--image", metavar="REF", help="a requested image: accepted only if it serves the VO")
    res.set_defaults(func=cmd_resolve)


def cmd_list(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.identity import image_for_vo

    cfg = ctx.config
    rows: list[dict[str, Any]] = []
    for vo, vc in sorted(cfg.vos.items()):
        try:
            resolved: str | None = image_for_vo(vo, ctx.catalogue, cfg).ref
            problem: str | None = None
        except DynvmError as err:  # shown per row: one broken VO must not hide the others
            resolved, problem = None, err.message
        rows.append(
            {
                "vo": vo,
                "image": vc.image,
                "resolves_to": resolved,
                "problem": problem,
                "groups": vc.groups,
                "accounts": vc.accounts,
                "max_vcpus": vc.max_vcpus,
                "max_instances": vc.max_instances,
            }
        )
    ctx.out.table(rows, ["vo", "image", "resolves_to", "groups", "accounts", "problem"], title="VOs")
    return EXIT_OK


def cmd_resolve(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.catalogue.model import VO_RE
    from provisioner.identity import image_for_vo, validate_token

    vo = validate_token(args.vo, "vo", VO_RE, 32)
    cfg = ctx.config
    img = image_for_vo(vo, ctx.catalogue, cfg, args.image)
    vc = cfg.vos[vo]
    ctx.out.obj(
        {
            "vo": vo,
            "image": img.ref,
            "configured_image": vc.image,
            "kind": img.kind,
            "groups": vc.groups,
            "accounts": vc.accounts,
            "max_vcpus": vc.max_vcpus,
            "max_instances": vc.max_instances,
            "vcpus": img.spec.vcpus.model_dump(),
            "memory_mib": img.spec.memory_mib.model_dump(),
            "identity_sources": cfg.identity.sources,
        }
    )
    return EXIT_OK
