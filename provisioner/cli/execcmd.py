"""``dynvm exec ID -- COMMAND...``: run a command inside a VM (through its image's exec method)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from provisioner.cli.argtypes import seconds
from provisioner.cli.common import runtime
from provisioner.cli.context import CliContext

MAX_EXEC_SECONDS = 366 * 24 * 3600.0  # payloads run for days; a year is a bound, not a limit anyone meets


def register(sub: Any) -> None:
    p = sub.add_parser(
        "exec",
        help="run a command inside a VM; exits with the command's own exit code",
        description="Run COMMAND inside VM ID, straight through the VM's exec channel on its host (run this "
        "on the VM's host; no queue is involved). dynvm exits with the command's exit code; dynvm's own "
        "errors (unknown VM, VM not ready, not on its host, timeout, run token taken) are reported on stderr "
        "with the usual exit codes. Output streams while the command runs (no size cap); with --json it is "
        "collected and returned at the end (capped at 1 MiB per stream). If dynvm exec dies while the "
        "command runs, the command goes on (blocked once the guest's window is full) and "
        "`dynvm exec ID --attach CURSOR` resumes its output exactly where it stopped (the cursor is in "
        "the error line).",
    )
    p.add_argument("id")
    p.add_argument(
        "--timeout",
        type=seconds(hi=MAX_EXEC_SECONDS, allow_lo=True),
        default=60.0,
        help="seconds the command may run (default 60; 0 = no limit, for payloads of days)",
    )
    p.add_argument(
        "--once",
        metavar="ATTEMPT",
        default=None,
        help="start the command at most once for (VM, ATTEMPT); a second start exits 4",
    )
    p.add_argument(
        "--attach",
        metavar="CURSOR",
        default=None,
        help="resume the output of a streaming run at RUN:NEXT_OUT:NEXT_ERR (no command)",
    )
    p.add_argument(
        "--cursor-file",
        metavar="PATH",
        default=None,
        help="keep the streaming run's cursor in PATH (rewritten around each chunk); given without a "
        "command, resume that run exactly where the killed dynvm exec left its output files",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=exec_cmd)


def _own_options(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """argparse's REMAINDER swallows options written after ID (``exec ID --timeout 0 -- cmd``): take ours
    back from the front of the remainder, up to ``--``; everything after ``--`` is the command's."""
    from provisioner.errors import UsageError

    while rest and rest[0] in ("--timeout", "--once", "--attach", "--cursor-file"):
        if len(rest) < 2:
            raise UsageError(f"exec: {rest[0]} needs a value")
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--once":
            args.once = value
        elif flag == "--attach":
            args.attach = value
        elif flag == "--cursor-file":
            args.cursor_file = value
        else:
            try:
                args.timeout = float(value)
            except ValueError:
                raise UsageError(f"exec: --timeout {value[:32]!r} is not a number") from None
    return rest[1:] if rest[:1] == ["--"] else rest


def exec_cmd(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.control.execjob import exec_in_vm
    from provisioner.errors import ValidationError

    argv = _own_options(args, list(args.command))
    if args.timeout < 0:
        raise ValidationError(f"--timeout: {args.timeout} is negative (0 = no limit)")
    timeout = None if args.timeout == 0 else args.timeout
    if ctx.out.json:
        if args.attach is not None:
            raise ValidationError("exec: --attach streams; it cannot be combined with --json")
        res = exec_in_vm(runtime(ctx), args.id, argv, timeout, run_token=args.once)
        ctx.out.obj(res)
        return int(res["exit_code"])
    out, err = _writer(sys.stdout), _writer(sys.stderr)
    progress = None
    if args.cursor_file is not None:
        from provisioner.execchan.resume import CursorFile

        fds = (_fileno(sys.stdout), _fileno(sys.stderr))
        if fds[0] is None or fds[1] is None:
            raise ValidationError("exec: --cursor-file needs stdout and stderr to be files (they are not)")
        cf = CursorFile(args.cursor_file, fds[0], fds[1])
        if not argv and args.attach is None:  # no command: resume where the cursor file says, exactly
            args.attach = cf.load()
            if args.attach is None:
                raise ValidationError(f"exec: no command, and no cursor in {args.cursor_file} to resume")
        out, err, progress = cf.wrap("o", out), cf.wrap("e", err), cf.save
    from provisioner.execchan.client import same_file

    # stdout and stderr on one file or terminal: the command gets one descriptor for both (print order).
    fo, fe = _fileno(sys.stdout), _fileno(sys.stderr)
    merge = fo is not None and fe is not None and same_file(fo, fe)
    res = exec_in_vm(runtime(ctx), args.id, argv, timeout, run_token=args.once, out=out, err=err,
                     attach=args.attach, on_progress=progress, merge=merge)
    return int(res["exit_code"])


def _writer(stream: Any) -> Callable[[bytes], object]:
    """Each chunk straight to the stream's bytes, flushed: output appears as the command prints it."""
    stream.flush()
    buf = getattr(stream, "buffer", None)
    if buf is None:  # a text-only stream (redirected in-process): the bytes as text, undecodable ones escaped
        def write_text(data: bytes) -> None:
            stream.write(data.decode("utf-8", errors="backslashreplace"))
            stream.flush()

        return write_text

    def write(data: bytes) -> None:
        buf.write(data)
        buf.flush()

    return write


def _fileno(stream: Any) -> int | None:
    try:
        return int(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        return None
