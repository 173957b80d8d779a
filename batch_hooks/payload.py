"""The payload wrapper: a job's unmodified batch script runs inside its own VM (light path).

Runs with the job's privileges, as the job's batch script (deploy/slurm/job_submit.lua replaces the script
by ``payload --hex`` with the original, hex-encoded, on stdin).  Its one credential is the job's own
(DYNVM_JOB_CRED, exported by the TaskProlog): a Redis ACL user that can read only this job's VM record and
take only that VM's run token.  So it accepts only its own job's VM; the VM's exec channel is opened
directly (owned by the job's uid since the prolog, see batch_hooks.server._grant_exec) and no queue carries
the payload, which may run for days.  The run token makes a second start of the same attempt fail.

Output streams: the script's stdout and stderr arrive in chunks while it runs (provisioner.execchan.frames)
and are written to the wrapper's own stdout/stderr (the job's output files) as they come, byte for byte,
with no size cap; memory stays bounded (the guest blocks the script when the wrapper falls behind).  No
output crosses Redis, so the job's ACL user needs nothing new and can read no other job's output.
With DYNVM_PAYLOAD_CURSOR=PATH the wrapper keeps its cursor there; a wrapper started again after one died
finds it, takes no run token (nothing starts twice) and resumes the same run's output exactly where the
job's output files stand (provisioner.execchan.resume).

Exit status: the script's own; dynvm's errors print one line prefixed ``dynvm payload:`` and exit with
dynvm's codes (2 usage/invalid, 4 already started, 5 unavailable).
"""

from __future__ import annotations

import binascii
import codecs
import re
import sys
from collections.abc import Callable, Mapping
from typing import TextIO
from urllib.parse import quote, urlsplit

from provisioner.errors import DynvmError, ValidationError

CRED_RE = re.compile(r"^([A-Za-z0-9_.:-]{1,200}):([0-9a-f]{32})$")
MAX_INPUT = 256 * 1024


def _job_redis(env: Mapping[str, str]) -> tuple[str, str, str]:
    """(url with the job's credential, prefix, job key) from the job's environment."""
    from batch_hooks.hookcfg import prefix

    m = CRED_RE.fullmatch(env.get("DYNVM_JOB_CRED", ""))
    if m is None:
        raise ValidationError("DYNVM_JOB_CRED is missing or malformed (no VM was provisioned for this job?)")
    base = urlsplit(env.get("DYNVM_JOB_REDIS", ""))
    if base.scheme != "redis" or not base.hostname or base.username or base.password:
        raise ValidationError("DYNVM_JOB_REDIS must be redis://HOST:PORT/DB without credentials")
    pfx = prefix(env)
    user, password = m.group(1), m.group(2)
    if not user.startswith(f"{pfx}-job:"):
        raise ValidationError("DYNVM_JOB_CRED does not name a job of this dynvm")
    netloc = f"{quote(user, safe='')}:{password}@{base.hostname}:{base.port or 6379}"
    return f"redis://{netloc}{base.path}", pfx, user[len(pfx) + 1 :]


def _read_script(source: TextIO, hex_encoded: bool) -> str:
    text = source.read(MAX_INPUT + 1)
    if len(text) > MAX_INPUT:
        raise ValidationError(f"the job script is longer than {MAX_INPUT} bytes")
    if not hex_encoded:
        return text
    try:
        return binascii.unhexlify("".join(text.split())).decode("utf-8")
    except (binascii.Error, ValueError):
        raise ValidationError("the wrapped job script is not valid hex") from None


def sink(stream: TextIO) -> Callable[[bytes], object]:
    """Chunks to a text stream: straight to its binary buffer (the job's output file, byte-exact, flushed
    per chunk so the file grows while the job runs), or decoded for a stream that has none."""
    buf = getattr(stream, "buffer", None)
    if buf is not None:
        stream.flush()

        def write(data: bytes) -> None:
            buf.write(data)
            buf.flush()

        return write
    dec = codecs.getincrementaldecoder("utf-8")("replace")

    def decode(data: bytes) -> None:
        stream.write(dec.decode(data))
        stream.flush()

    return decode


def _fd(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO: UnsupportedOperation is an OSError
        return None


def run(env: Mapping[str, str], script: str, out: TextIO, err: TextIO) -> int:
    from batch_hooks.proto import jobvm_key
    from batch_hooks.resp import LightRedis
    from provisioner.execchan.client import exec_socket, same_file, stream_in_guest
    from provisioner.execchan.once import take_run_token

    url, pfx, key = _job_redis(env)
    out_sink, err_sink = sink(out), sink(err)
    progress: Callable[[str], None] | None = None
    attach = cf = None
    if env.get("DYNVM_PAYLOAD_CURSOR"):
        from provisioner.execchan.resume import CursorFile

        cf = CursorFile(env["DYNVM_PAYLOAD_CURSOR"], out.fileno(), err.fileno())
        attach = cf.load()  # a cursor: this wrapper restarts after an earlier one died mid-run
        out_sink, err_sink, progress = cf.wrap("o", out_sink), cf.wrap("e", err_sink), cf.save
    with LightRedis(url) as r:
        vm = r.hgetall(jobvm_key(pfx, key))
        if not vm.get("instance"):
            raise ValidationError(f"no VM is recorded for this job ({key})")
        if attach is None:
            take_run_token(r, pfx, vm["instance"], vm.get("attempt", "0"))
    sock = exec_socket(vm["shared_dir"], vm["instance"], vm["host"])
    # One output file for both (Slurm's default): the script gets one descriptor for both, as on the node.
    fo, fe = _fd(out), _fd(err)
    merge = fo is not None and fe is not None and same_file(fo, fe)
    res = stream_in_guest(sock, script=None if attach else script, timeout=None, out=out_sink, err=err_sink,
                          attach=attach, on_progress=progress, merge=merge)
    if cf is not None:
        cf.remove()
    return res.exit_code


def main(argv: list[str], env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    hex_encoded = "--hex" in argv
    rest = [a for a in argv if a != "--hex"]
    try:
        if rest[:1] == ["--script"] and len(rest) == 2 and rest[1] != "-":
            with open(rest[1], encoding="utf-8") as f:
                script = _read_script(f, hex_encoded)
        elif rest in ([], ["--script", "-"]):
            script = _read_script(sys.stdin, hex_encoded)
        else:
            raise ValidationError("usage: payload [--hex] [--script FILE|-]")
        return run(env, script, out, err)
    except DynvmError as exc:
        err.write(f"dynvm payload: {exc}\n")
        return exc.exit_code
    except OSError as exc:
        err.write(f"dynvm payload: {exc.strerror or exc}\n")
        return 5
