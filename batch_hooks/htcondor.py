"""HTCondor starter hooks (``STARTER_JOB_HOOK_KEYWORD = DYNVM``; deploy/htcondor/) and the job wrapper.

All of them run with the job's own privileges, so everything they send is a *claim*.  Two routes:

* **node daemon** (``DYNVM_CONDOR_SOCKET`` set; what deploy/htcondor ships): the hooks and the
  USER_JOB_WRAPPER (batch_hooks.condor_wrapper) ask the execute node's root daemon
  (batch_hooks.condor_daemon) over a unix socket; it identifies the caller by the kernel (uid, pid,
  process ancestry under a condor_starter) and checks the job against the schedd's copy, so the wrapper
  may receive its own job's credential and the payload runs inside the job's VM.
* **Redis starter user** (older): the hooks push onto ``<prefix>:hooks:condor`` as an ACL user that may
  do nothing else; the trusted side checks the owner against the schedd; no credential comes back, so
  this route provisions and releases but cannot run the payload inside the VM.

PREPARE_JOB: job ad on stdin -> on success print ``DynvmVM = "..."``, ``DynvmVMHost = "..."`` and exit 0.
             On failure one line on stderr and exit 1; through the daemon also ``HookStatusCode`` /
             ``HookStatusMessage``: permanent (no VO, no image, over a limit, not this job's caller) ->
             190, the job is held with dynvm's reason; transient -> 300, the job goes back to idle.
JOB_EXIT:    ``exit|remove|hold|evict`` as argument, final ad on stdin -> release; exit 0 (ignored anyway).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from batch_hooks.context import JobContext
from provisioner.errors import DynvmError, ValidationError, printable

GLOBAL_ID_RE = re.compile(r"^([A-Za-z0-9_.@-]{1,128})#([0-9]{1,10})\.([0-9]{1,7})#([0-9]{1,12})$")
MAX_AD_BYTES = 1024 * 1024
EXIT_REASONS = ("exit", "remove", "hold", "evict")


def read_ad(source: TextIO) -> Any:
    """The job ad as the starter writes it (old ClassAd syntax, one attribute per line)."""
    import classad2

    text = source.read(MAX_AD_BYTES + 1)
    if len(text) > MAX_AD_BYTES:
        raise ValidationError(f"job ad on stdin is longer than {MAX_AD_BYTES} bytes")
    try:
        return classad2.parseOne(text)
    except Exception as exc:  # classad2 raises ValueError/ClassAdException variants for junk
        raise ValidationError(f"job ad on stdin does not parse: {str(exc)[:100]}") from None


def _int_attr(ad: Any, name: str, default: int | None) -> int | None:
    value = ad.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = ad.eval(name)
        except Exception:
            value = None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(f"job ad: {name} is not an integer")
    return value


def split_global_id(global_id: object) -> tuple[str, str]:
    """(cluster = schedd name, job id = cluster.proc.qdate) from ``schedd#12.0#1700000000``."""
    if not isinstance(global_id, str) or not (m := GLOBAL_ID_RE.fullmatch(global_id)):
        raise ValidationError(f"job ad: GlobalJobId {str(global_id)[:64]!r} is malformed")
    schedd = re.sub(r"[^A-Za-z0-9_.-]", "_", m.group(1))[:64]
    return schedd, f"{m.group(2)}.{m.group(3)}.{m.group(4)}"


def context_from_ad(ad: Any) -> tuple[JobContext, str]:
    """The job as its ad claims it (the daemon checks the owner against the schedd) + its GlobalJobId."""
    import pwd

    global_id = ad.get("GlobalJobId")
    schedd, job_id = split_global_id(global_id)
    owner = ad.get("Owner")
    if not isinstance(owner, str):
        raise ValidationError("job ad: Owner is missing")
    try:
        pw = pwd.getpwnam(owner)
    except KeyError:
        raise ValidationError(f"job ad: Owner {owner[:32]!r} has no passwd entry here") from None
    memory = _int_attr(ad, "RequestMemory", None)
    ctx = JobContext(
        batch="htcondor", cluster=schedd, job_id=job_id, attempt=_int_attr(ad, "NumJobStarts", 0) or 0,
        user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid, cpus=_int_attr(ad, "RequestCpus", 1) or 1,
        memory_mib=memory or None,
    )
    return ctx, str(global_id)


# PREPARE_JOB's HookStatusCode (HTCondor >= 10): 1..299 puts the job on hold with HookStatusMessage as
# the hold reason, >= 300 sends it back to idle (a new attempt later).
HOLD_STATUS = 190
IDLE_STATUS = 300


def ask_daemon(socket_path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One request to the node's trusted daemon (batch_hooks.condor_daemon); errors as DynvmErrors."""
    import json
    import socket

    from batch_hooks.proto import decode_reply
    from provisioner.errors import DeadlineExceeded, UnavailableError

    if not socket_path.startswith("/") or "\0" in socket_path:
        raise ValidationError("DYNVM_CONDOR_SOCKET must be an absolute path")
    buf = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(socket_path)
            sock.sendall(json.dumps(body).encode() + b"\n")
            while b"\n" not in buf and len(buf) < 64 * 1024:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise DeadlineExceeded(f"the dynvm node daemon did not answer in {timeout_s:.0f} s") from None
        except OSError as exc:
            raise UnavailableError(f"dynvm node daemon {socket_path}: {exc.strerror or exc}") from None
    if b"\n" not in buf:
        raise UnavailableError("the dynvm node daemon closed the connection without an answer")
    try:
        return decode_reply(buf.split(b"\n", 1)[0])
    except ValueError:
        raise UnavailableError("the dynvm node daemon sent a garbled answer") from None


GLOBAL_ID_LINE = re.compile(r'^[ \t]*GlobalJobId[ \t]*=[ \t]*"([^"\\\n]{1,200})"[ \t]*$', re.I | re.M)


def read_global_id(source: TextIO) -> str:
    """The GlobalJobId of a job ad as the starter writes it (stdin of a hook, ``_CONDOR_JOB_AD``), without
    classad2: the job's side runs on the node's plain python3.  Only a claim, checked by the daemon."""
    text = source.read(MAX_AD_BYTES + 1)
    if len(text) > MAX_AD_BYTES:
        raise ValidationError(f"job ad is longer than {MAX_AD_BYTES} bytes")
    found = GLOBAL_ID_LINE.findall(text)
    if len(found) != 1:
        raise ValidationError("job ad: no single GlobalJobId = \"...\" line")
    split_global_id(found[0])
    return str(found[0])


def ad_string(text: str) -> str:
    """A ClassAd string literal of printable ASCII."""
    clean = printable(text)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def prepare_job_daemon(env: Mapping[str, str], stdin: TextIO, out: TextIO, err: TextIO) -> int:
    """PREPARE_JOB through the node daemon: the VM is provisioned before the job starts; a permanent
    failure holds the job with dynvm's reason, a transient one sends it back to idle."""
    from batch_hooks.hookcfg import prolog_timeout
    from provisioner.errors import PermanentError

    try:
        body = {"op": "prepare", "global_id": read_global_id(stdin)}
        vm = ask_daemon(env.get("DYNVM_CONDOR_SOCKET", ""), body, prolog_timeout(env) + 15)
        out.write(f"DynvmVM = {ad_string(str(vm['instance']))}\nDynvmVMHost = {ad_string(str(vm['host']))}\n")
        return 0
    except DynvmError as exc:
        code = HOLD_STATUS if isinstance(exc, PermanentError) else IDLE_STATUS
        out.write(f"HookStatusCode = {code}\nHookStatusMessage = {ad_string(f'dynvm: {exc}'[:400])}\n")
        err.write(f"dynvm prepare_job: {exc}\n")
        return 1


def job_exit_daemon(reason: str, env: Mapping[str, str], stdin: TextIO, err: TextIO) -> int:
    try:
        if reason not in EXIT_REASONS:
            known = ", ".join(EXIT_REASONS)
            raise ValidationError(f"job_exit: unknown reason {reason[:16]!r} (expected {known})")
        body = {"op": "exit", "global_id": read_global_id(stdin), "reason": reason}
        ask_daemon(env.get("DYNVM_CONDOR_SOCKET", ""), body, 60.0)
    except DynvmError as exc:
        err.write(f"dynvm job_exit: {exc}\n")
    return 0


def prepare_job(env: Mapping[str, str], stdin: TextIO, out: TextIO, err: TextIO) -> int:
    from batch_hooks.hookcfg import connect, prefix, prolog_timeout
    from batch_hooks.proto import call

    if env.get("DYNVM_CONDOR_SOCKET"):
        return prepare_job_daemon(env, stdin, out, err)
    try:
        ctx, global_id = context_from_ad(read_ad(stdin))
        with connect(env) as r:
            vm = call(r, prefix(env), "condor_prepare", ctx, prolog_timeout(env), global_id=global_id)
        out.write(f'DynvmVM = "{vm["instance"]}"\nDynvmVMHost = "{vm["host"]}"\n')
        return 0
    except DynvmError as exc:
        err.write(f"dynvm prepare_job: {exc}\n")
        return 1


def job_exit(reason: str, env: Mapping[str, str], stdin: TextIO, err: TextIO) -> int:
    from batch_hooks.hookcfg import connect, prefix
    from batch_hooks.proto import call

    if env.get("DYNVM_CONDOR_SOCKET"):
        return job_exit_daemon(reason, env, stdin, err)
    try:
        if reason not in EXIT_REASONS:
            known = ", ".join(EXIT_REASONS)
            raise ValidationError(f"job_exit: unknown reason {reason[:16]!r} (expected {known})")
        ctx, global_id = context_from_ad(read_ad(stdin))
        with connect(env) as r:
            call(r, prefix(env), "condor_exit", ctx, 60.0, global_id=global_id)
    except DynvmError as exc:
        err.write(f"dynvm job_exit: {exc}\n")
    return 0


def main(argv: list[str], env: Mapping[str, str]) -> int:
    if argv[:1] == ["prepare-job"] and len(argv) == 1:
        return prepare_job(env, sys.stdin, sys.stdout, sys.stderr)
    if argv[:1] == ["job-exit"] and len(argv) == 2:
        return job_exit(argv[1], env, sys.stdin, sys.stderr)
    sys.stderr.write("usage: python -m batch_hooks htcondor prepare-job | job-exit REASON | wrap EXE [ARG...]"
                     "\n")
    return 2
