"""``dynvm image``: list, show, add, promote, retire, validate the image catalogue."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from provisioner.cli.context import CliContext
from provisioner.errors import EXIT_OK, EXIT_USAGE


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "image", help="the image catalogue", description="Inspect and edit the catalogue."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ls = sub.add_parser("list", help="list image families")
    ls.add_argument("--all", action="store_true", help="include retired versions")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="show one image version")
    show.add_argument("ref", metavar="REF", help="NAME, NAME:VERSION or NAME:CHANNEL (bare name = stable)")
    show.set_defaults(func=cmd_show)

    add = sub.add_parser("add", help="add a family or new versions from a YAML file")
    add.add_argument("file", metavar="FILE", type=Path)
    add.set_defaults(func=cmd_add)

    promote = sub.add_parser("promote", help="point a channel at a version")
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--channel", required=True, metavar="C", help="e.g. stable, testing")
    promote.set_defaults(func=cmd_promote)

    retire = sub.add_parser("retire", help="retire a version (not while a channel points at it)")
    retire.add_argument("name", metavar="NAME")
    retire.add_argument("version", metavar="VERSION")
    retire.set_defaults(func=cmd_retire)

    val = sub.add_parser(
        "validate",
        help="check the catalogue (exit 0 if only warnings, 2 on any error)",
        description="Check schema, cross-references and artefacts (missing = warning, bad checksum = error).",
    )
    val.add_argument("path", metavar="PATH", nargs="?", type=Path, help="catalogue dir or one file")
    val.add_argument("--artefact-root", type=Path, metavar="DIR", help="default: storage.artefact_dir")
    val.set_defaults(func=cmd_validate)
    _register_breaker(sub)


def cmd_list(ctx: CliContext, args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for fam in ctx.catalogue.families():
        versions = [v.version for v in fam.versions if args.all or not v.retired]
        rows.append(
            {
                "name": fam.name,
                "kind": fam.kind,
                "vos": fam.vos,
                "versions": versions,
                "retired": [v.version for v in fam.versions if v.retired],
                "channels": dict(fam.channels),
                "priority": fam.ha.priority if fam.ha else None,
                "description": fam.description,
            }
        )
    ctx.out.table(rows, ["name", "kind", "vos", "versions", "channels", "priority"], title="images")
    return EXIT_OK


def cmd_show(ctx: CliContext, args: argparse.Namespace) -> int:
    cat = ctx.catalogue
    img = cat.resolve(args.ref, allow_retired=True)
    spec = img.spec.model_dump(mode="json", exclude_none=True)
    ctx.out.obj(
        {
            "ref": img.ref,
            "name": img.name,
            "kind": img.kind,
            "vos": img.vos,
            "channels": cat.channels_of(img.name, img.spec.version),
            "ha": img.ha.model_dump(mode="json") if img.ha else None,
            "file": str(cat.entry(img.name).file),
            **spec,
        }
    )
    return EXIT_OK


def cmd_add(ctx: CliContext, args: argparse.Namespace) -> int:
    result = ctx.catalogue.add(args.file)
    if ctx.out.json:
        ctx.out.obj(_as_dict(result))
    else:
        what = "created" if result.created else "updated"
        added = ", ".join(result.added) or "none"
        same = f"; unchanged: {', '.join(result.unchanged)}" if result.unchanged else ""
        ctx.out.message(f"{what} {result.file}: image {result.name}, added version(s): {added}{same}")
    return EXIT_OK


def _as_dict(result: Any) -> dict[str, Any]:
    return {k: getattr(result, k) for k in ("name", "file", "created", "added", "unchanged", "channels")}


def cmd_promote(ctx: CliContext, args: argparse.Namespace) -> int:
    fam = ctx.catalogue.promote(args.name, args.version, args.channel)
    if ctx.out.json:
        ctx.out.obj({"name": fam.name, "channels": dict(fam.channels)})
    else:
        ctx.out.message(f"{fam.name}:{args.channel} -> {args.version}")
    return EXIT_OK


def cmd_retire(ctx: CliContext, args: argparse.Namespace) -> int:
    fam = ctx.catalogue.retire(args.name, args.version)
    if ctx.out.json:
        ctx.out.obj({"name": fam.name, "version": args.version, "retired": True})
    else:
        ctx.out.message(f"retired {fam.name}:{args.version}")
    return EXIT_OK


def cmd_validate(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.catalogue.store import Catalogue, Severity

    path: Path = args.path if args.path is not None else ctx.config.catalogue_dir
    root: Path = args.artefact_root if args.artefact_root is not None else ctx.config.storage.artefacts
    cat, findings = Catalogue.check(path, root)
    if args.path is None:  # the configured catalogue: the VOs' images must resolve in it too
        from provisioner.validate import check_config_against_catalogue

        findings += check_config_against_catalogue(ctx.config, cat)
    errors = sum(1 for f in findings if f.severity is Severity.ERROR)
    rows = [{"severity": f.severity, "file": f.file, "line": f.line, "message": f.message} for f in findings]
    if ctx.out.json:
        ctx.out.table(rows, [])
    else:
        for f in findings:
            print(str(f))
        n_versions = sum(len(fam.versions) for fam in cat.families())
        warnings = len(findings) - errors
        status = "FAILED" if errors else "OK"
        ctx.out.message(
            f"catalogue {path}: {status}: {len(cat.families())} families, {n_versions} versions, "
            f"{errors} error(s), {warnings} warning(s)"
        )
    return EXIT_USAGE if errors else EXIT_OK


# -- circuit breakers per image version (provisioner.breaker; issue 9) -------------------------------------


def _register_breaker(sub: Any) -> None:
    br = sub.add_parser("breaker", help="circuit breakers: images whose boots keep failing",
                        description="An image's breaker opens after N consecutive failed boots.")
    bsub = br.add_subparsers(dest="breaker_command", metavar="COMMAND")
    bl = bsub.add_parser("list", help="every image whose breaker has a record")
    bl.set_defaults(func=cmd_breaker_list)
    brs = bsub.add_parser("reset", help="close an image's breaker (after fixing the image)")
    brs.add_argument("image", metavar="IMAGE", help="NAME:VERSION, or NAME / NAME:CHANNEL of the catalogue")
    brs.set_defaults(func=cmd_breaker_reset)


def _breaker_row(image: str, b: Any, now: float) -> dict[str, Any]:
    from datetime import UTC, datetime

    retry = datetime.fromtimestamp(b.retry_at, UTC).isoformat() if b.state.value == "open" else None
    return {"image": image, "state": b.state.value, "failures": b.failures, "backoff_s": b.backoff_s,
            "retry_at": retry, "retry_in_s": max(0, round(b.retry_at - now)) if retry else None,
            "opened": b.opened, "reason": b.last_reason}


def cmd_breaker_list(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.breaker import redis_errors, store_of
    from provisioner.cli.common import runtime

    bs = store_of(runtime(ctx))
    with redis_errors(ctx.config.redis_url):
        now = bs.now()
        rows = [_breaker_row(image, b, now) for image, b in bs.list().items()]
    ctx.out.table(rows, ["image", "state", "failures", "retry_in_s", "opened", "reason"], title="breakers")
    return EXIT_OK


def cmd_breaker_reset(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.breaker import redis_errors, reset, store_of
    from provisioner.cli.common import runtime
    from provisioner.errors import DynvmError, NotFoundError

    rt = runtime(ctx)
    bs = store_of(rt)
    with redis_errors(ctx.config.redis_url):
        known = bs.list()
    image = args.image
    if image not in known:
        try:
            image = ctx.catalogue.resolve(args.image, allow_retired=True).ref
        except DynvmError:
            raise NotFoundError(f"image {args.image[:80]!r}: no breaker and not in the catalogue") from None
    b = reset(rt, image)
    with redis_errors(ctx.config.redis_url):
        now = bs.now()
    ctx.out.obj(_breaker_row(image, b, now), title=f"breaker {image}")
    return EXIT_OK

