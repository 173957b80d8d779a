"""HTCondor's USER_JOB_WRAPPER: the job's unmodified executable runs inside its own VM (light path).

The starter runs the wrapper *as the job* (the job's user, a child of its condor_starter) with the job's
executable and arguments as argv (HTCondor manual, USER_JOB_WRAPPER).  The wrapper asks the node daemon
(batch_hooks.condor_daemon) for its job's credential -- the daemon checks, from the kernel and the
schedd, that the caller runs under the starter of the job it names -- then runs the executable through
the VM's exec channel exactly as Slurm's payload wrapper does (batch_hooks.payload.run: its own VM record,
the run token, no queue in between).  stdout, stderr and the exit code are the script's.

Failures: transient (dynvm or Redis unreachable, no capacity, boot too slow) -> the message goes to
``_CONDOR_WRAPPER_ERROR_FILE`` and the wrapper exits 1: HTCondor puts the job back to idle and runs it
again (a new attempt, a fresh VM).  Permanent ones (an executable that is not a script, a payload started
twice) -> one ``dynvm wrapper:`` line on stderr and dynvm's exit code; the job ends with it.  Permanent
identity failures (no VO, no image) hold the job earlier, in PREPARE_JOB.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TextIO

from provisioner.errors import DynvmError, TransientError, ValidationError

MAX_SCRIPT = 256 * 1024


def job_script(path: str, args: list[str]) -> str:
    """The executable as a guest shell script, its arguments set as the positional parameters."""
    import shlex

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SCRIPT + 1)
    except OSError as exc:
        raise ValidationError(f"cannot read the job's executable {path[:120]!r}: {exc.strerror}") from None
    if len(raw) > MAX_SCRIPT:
        raise ValidationError(f"the job's executable is longer than {MAX_SCRIPT} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if not text.strip() or "\x00" in text:
        raise ValidationError("the job's executable is not a text script: only scripts run inside the VM")
    if not args:
        return text
    line = "set -- " + " ".join(shlex.quote(a) for a in args) + "\n"
    if text.startswith("#!"):
        first, _, rest = text.partition("\n")
        return f"{first}\n{line}{rest}"
    return line + text


def _fail(env: Mapping[str, str], err: TextIO, exc: DynvmError) -> int:
    message = f"dynvm wrapper: {exc}"
    err.write(message + "\n")
    error_file = env.get("_CONDOR_WRAPPER_ERROR_FILE")
    if isinstance(exc, TransientError) and error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                f.write(message + "\n")
        except OSError:
            pass
        return 1
    return exc.exit_code


def wrap(argv: list[str], env: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    from batch_hooks.hookcfg import prefix, prolog_timeout
    from batch_hooks.htcondor import ask_daemon, read_global_id
    from batch_hooks.payload import run

    try:
        script = job_script(argv[0], argv[1:])
        ad_path = env.get("_CONDOR_JOB_AD", "")
        if not ad_path:
            raise ValidationError("_CONDOR_JOB_AD is not set (not run as HTCondor's USER_JOB_WRAPPER?)")
        try:
            with open(ad_path, encoding="utf-8") as f:
                global_id = read_global_id(f)
        except OSError as exc:
            raise ValidationError(f"cannot read the job ad {ad_path[:120]!r}: {exc.strerror}") from None
        vm = ask_daemon(env.get("DYNVM_CONDOR_SOCKET", ""), {"op": "credential", "global_id": global_id},
                        prolog_timeout(env) + 15)
        job_env = {"DYNVM_JOB_CRED": str(vm.get("cred", "")), "DYNVM_PREFIX": prefix(env),
                   "DYNVM_JOB_REDIS": env.get("DYNVM_JOB_REDIS", "")}
        return run(job_env, script, out, err)
    except DynvmError as exc:
        return _fail(env, err, exc)
    except OSError as exc:
        from provisioner.errors import UnavailableError

        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(env, err, UnavailableError(f"{exc.strerror or exc}{where}"))
