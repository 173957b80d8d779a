"""``dynvm``: the command line.  Each group lives in ``provisioner.cli.<group>`` and registers itself.

A group module exposes ``register(subparsers) -> None``; each of its commands sets
``func=handler`` with ``def handler(ctx: CliContext, args: argparse.Namespace) -> int``.  Group modules
import heavy libraries (libvirt, celery, redis) inside their handlers only.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from provisioner.cli.argtypes import nonempty
from provisioner.cli.context import CliContext
from provisioner.cli.output import Mode, Output
from provisioner.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_USAGE,
    DynvmError,
    UsageError,
)

__all__ = ["GROUPS", "CliContext", "build_parser", "main"]

# Others append their groups here (a short name means provisioner.cli.<name>; a dotted name is used
# as is); a module that does not exist (yet) is skipped.
GROUPS: list[str] = [
    "image", "vo", "host", "vm", "events", "farm", "demo", "execcmd", "daemons", "ha.cli", "hook", "pool",
]

EPILOG = """\
exit codes:
  0  ok
  1  internal error (a bug: set DYNVM_DEBUG=1 for a traceback)
  2  usage error or invalid input (bad argument, malformed file, validation error)
  3  not found (unknown image, VO, host, instance)
  4  conflict or no capacity (immutable version reused, invalid state change, nothing fits)
  5  unavailable (Redis, libvirt or a host cannot be reached)
  6  timeout
  130 interrupted (Ctrl-C)

configuration: --config PATH, else $DYNVM_CONFIG, else /etc/dynvm/dynvm.yaml, else a running farm's
config, else the embedded default (libvirt test driver, the shipped images/), which serves `farm up`,
`demo` and the catalogue commands; a command that needs Redis then exits 5 (no farm, no configuration).

files: a YAML file dynvm reads (configuration, catalogue, `image add`) must be a regular file of at most
1 MiB and 100,000 YAML nodes; FIFOs, devices and directories are refused without being opened for reading.

logs: `dynvm agent` and `dynvm worker` write one line per operation to stderr (operation, instance, host,
VO, duration; failures with their cause), as text or, with --log-format json, one JSON object per line.
"""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _add_globals(p: argparse.ArgumentParser, top: bool) -> None:
    # Sub-parsers use SUPPRESS so an option given before the sub-command is not overwritten by a default.
    default: Any = argparse.SUPPRESS
    try:
        p.add_argument(
            "--config",
            metavar="PATH",
            type=nonempty("--config"),  # '' used to be dropped silently (and the default read instead)
            default=None if top else default,
            help="configuration file",
        )
        p.add_argument(
            "-o",
            "--output",
            choices=["table", "json"],
            default="table" if top else default,
            help="output format (default: table)",
        )
    except argparse.ArgumentError:
        pass  # a group defined an option of the same name on purpose


def _sub_parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out: list[argparse.ArgumentParser] = []
    for action in p._actions:  # argparse has no public API to walk sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                out.append(sub)
                out.extend(_sub_parsers(sub))
    return out


def build_parser(groups: Sequence[str] | None = None) -> ArgumentParser:
    parser = ArgumentParser(
        prog="dynvm",
        description="Batch-integrated VM provisioner with HA for grid sites.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_globals(parser, top=True)
    from provisioner import __version__

    parser.add_argument("--version", action="version", version=f"dynvm {__version__}")
    subparsers = parser.add_subparsers(dest="group", metavar="GROUP")
    for name in GROUPS if groups is None else groups:
        modname = name if "." in name else f"provisioner.cli.{name}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue  # another part of dynvm will add it
            raise
        module.register(subparsers)
    for sub in _sub_parsers(parser):
        _add_globals(sub, top=False)
    return parser


def _mode_from_argv(argv: Sequence[str]) -> Mode:
    """Best guess of -o before parsing succeeded, so even a usage error is JSON when asked."""
    mode: Mode = "table"
    it = iter(argv)
    for a in it:
        if a == "--":
            break
        if a in ("-o", "--output"):
            mode = "json" if next(it, "") == "json" else "table"
        elif a in ("-ojson", "--output=json"):
            mode = "json"
    return mode


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script does ``sys.exit(main())``)."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    out = Output(_mode_from_argv(args_in))
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(args_in)
        except SystemExit as exc:  # --help / --version
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        out = Output(args.output)
        func = getattr(args, "func", None)
        if func is None:
            target = _deepest_parser(parser, args)
            target.print_help(sys.stderr)
            return EXIT_USAGE
        return int(func(CliContext(args, out), args))
    except DynvmError as err:
        out.error(err)
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("dynvm: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (`dynvm ... | head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("DYNVM_DEBUG") == "1":
            traceback.print_exc()
        out.internal_error(exc)
        return EXIT_INTERNAL


def _deepest_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the group the user typed (for 'dynvm image' without a command)."""
    group = getattr(args, "group", None)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and group in action.choices:
            return action.choices[group]  # type: ignore[no-any-return]
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
