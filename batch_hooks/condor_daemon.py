"""The HTCondor execute node's trusted daemon (root): the only way an HTCondor job reaches its VM.

Why a node daemon: HTCondor runs every starter hook and the USER_JOB_WRAPPER with the *job's*
privileges (HTCondor manual, "Job hooks that fetch work": "runs with the same privileges as the job
itself"), and hands them no credential of the job's.  So nothing the job's side can send is proof of
anything, and no secret may be given to all of them alike.  The daemon listens on a unix socket and
believes only the kernel and the schedd:

1. the caller's uid and pid (``SO_PEERCRED``) and its ancestry: it must run under a root
   ``condor_starter`` whose command line names its slot (batch_hooks.condor_peer);
2. the schedd's own copy of the job the caller names (GlobalJobId; batch_hooks.condor_verify, bounded in
   time): its ``Owner`` must be the caller's user and its ``RemoteHost`` exactly ``<that slot>@<this
   startd>`` -- the job runs in the very starter the caller descends from;
3. then, with the trusted hook user's Redis credential (``DYNVM_HOOK_REDIS``, root-only), the same
   ``prolog``/``epilog`` requests Slurm's PrologSlurmctld sends: the VO comes from the pool account's
   group (never from the ad), the idempotency key is (schedd, job, attempt = the schedd's
   ``NumShadowStarts``), and the answer carries the per-job Redis ACL user (its own VM record and run
   token, nothing else).

Operations (one JSON line in, one JSON line out):
  prepare     (PREPARE_JOB hook)      provision and wait; answer the VM (no credential)
  credential  (USER_JOB_WRAPPER)      the same, idempotent; answer the VM and the per-job credential
                                      (refused, transient, if the VM PREPARE_JOB got is gone meanwhile)
  exit        (JOB_EXIT hook)         release the job's VM

A caller can therefore get only its own job's VM: another job's GlobalJobId fails the RemoteHost or the
Owner check, a process outside any starter fails the ancestry check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import socket
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batch_hooks.condor_peer import PeerProcess, Starter, boot_ticks, find_starter, peer_of
from batch_hooks.condor_verify import ScheddLookup
from batch_hooks.context import NAME_RE, JobContext
from batch_hooks.htcondor import split_global_id
from provisioner.errors import (
    DynvmError,
    IdentityError,
    NotFoundError,
    TransientError,
    UnavailableError,
    ValidationError,
)

log = logging.getLogger("dynvm.condor_daemon")
OPS = ("prepare", "credential", "exit")
MAX_LINE = 16 * 1024
READ_TIMEOUT_S = 10.0
RUNNING = 2  # JobStatus per the schedd


@dataclass(frozen=True)
class DaemonSettings:
    socket_path: str
    startd: str  # the startd's name as RemoteHost spells it after the '@'
    hook_env: Mapping[str, str]  # DYNVM_HOOK_REDIS, DYNVM_PREFIX, DYNVM_PROLOG_TIMEOUT
    node: str | None = None  # this node's dynvm host name (WNoDeS: the VM goes here)
    starter_exe: str | None = None
    max_clients: int = 256
    proc: str = "/proc"

    def __post_init__(self) -> None:
        if not self.hook_env.get("DYNVM_HOOK_REDIS"):
            raise ValidationError("DYNVM_HOOK_REDIS is not set (the trusted hook user's URL; "
                                  "see deploy/htcondor/README.md)")
        if not 0 < len(self.startd) <= 255 or any(c.isspace() or c == "@" for c in self.startd):
            raise ValidationError(f"startd name {self.startd[:64]!r} is malformed")
        if self.node is not None and not NAME_RE.fullmatch(self.node):
            raise ValidationError(f"node name {self.node[:64]!r} is malformed")
        if not 1 <= self.max_clients <= 4096:
            raise ValidationError("max clients must be in 1..4096")


def _int(ad: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = ad.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


@dataclass
class DaemonStatus:
    started: float = field(default_factory=time.time)
    served: int = 0
    refused: int = 0
    last_error: str = ""
    last_error_at: float = 0.0


class CondorNodeDaemon:
    def __init__(self, settings: DaemonSettings, lookup: ScheddLookup) -> None:
        self.settings = settings
        self.lookup = lookup
        self.status = DaemonStatus()
        self._slots = threading.BoundedSemaphore(settings.max_clients)
        self._lock = threading.Lock()
        # job key -> the VM its PREPARE_JOB got: the wrapper's credential must name the same VM (a VM lost
        # in between is not silently replaced under a running attempt).  Memory only: after a daemon
        # restart the check is skipped.
        self._prepared: dict[str, str] = {}

    # -- the checks (decide) ------------------------------------------------------------------------
    def job_context(self, uid: int, starter: Starter, global_id: str, op: str) -> JobContext:
        """The caller's job as the schedd knows it, once the schedd confirms it is the caller's."""
        schedd, job_id = split_global_id(global_id)
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise IdentityError(f"uid {uid} has no passwd entry on this node") from None
        ad = self.lookup.job(schedd, global_id)
        if ad is None:
            raise NotFoundError(f"htcondor: the schedd has no job {global_id[:80]!r}")
        owner = ad.get("Owner")
        if owner != pw.pw_name:
            raise IdentityError(f"htcondor: job {global_id[:80]!r} belongs to {str(owner)[:32]!r} per the "
                                f"schedd, not to the caller {pw.pw_name!r}")
        here = f"{starter.slot}@{self.settings.startd}"
        remote = ad.get("RemoteHost")
        if remote != here:
            raise IdentityError(f"htcondor: job {global_id[:80]!r} runs in {str(remote)[:80]!r} per the "
                                f"schedd, not in the caller's starter ({here})")
        if op != "exit" and ad.get("JobStatus") != RUNNING:
            raise IdentityError(f"htcondor: job {global_id[:80]!r} is not running per the schedd "
                                f"(JobStatus {str(ad.get('JobStatus'))[:8]})")
        memory = _int(ad, "RequestMemory")
        return JobContext(
            batch="htcondor", cluster=schedd, job_id=job_id,
            attempt=_int(ad, "NumShadowStarts", "JobRunCount", "NumJobStarts") or 0,
            user=pw.pw_name, uid=uid, gid=pw.pw_gid, cpus=_int(ad, "RequestCpus") or 1,
            memory_mib=memory or None, node=self.settings.node,
        )

    # -- one request (do) ---------------------------------------------------------------------------
    def _request(self, conn: socket.socket) -> tuple[str, str]:
        conn.settimeout(READ_TIMEOUT_S)
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                raise ValidationError("request: nothing complete within 10 s") from None
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_LINE:
                raise ValidationError(f"request longer than {MAX_LINE} bytes")
        try:
            body = json.loads(buf.split(b"\n", 1)[0])
        except ValueError:
            raise ValidationError("request: not one JSON line") from None
        if not isinstance(body, dict):
            raise ValidationError("request: expected an object")
        op, global_id = body.get("op"), body.get("global_id")
        if op not in OPS:
            raise ValidationError(f"request: unknown operation {str(op)[:32]!r}")
        if not isinstance(global_id, str):
            raise ValidationError("request: global_id missing")
        split_global_id(global_id)  # validated before it reaches a log line or the schedd
        return str(op), global_id

    def answer(self, conn: socket.socket, accepted_ticks: int) -> dict[str, Any]:
        """The reply for one connection; never raises."""
        from batch_hooks.hookcfg import connect, prefix, prolog_timeout
        from batch_hooks.proto import call

        try:
            peer = peer_of(conn)
            op, global_id = self._request(conn)
            with PeerProcess(peer, accepted_ticks, self.settings.proc) as pinned:
                starter = find_starter(peer.pid, self.settings.proc, self.settings.starter_exe)
                ctx = self.job_context(peer.uid, starter, global_id, op)
                if not pinned.still_alive():
                    raise IdentityError(f"process {peer.pid} exited during the checks")
            env = self.settings.hook_env
            with connect(env) as r:
                if op == "exit":
                    done = call(r, prefix(env), "epilog", ctx, 60.0)
                    reply: dict[str, Any] = {"released": bool(done.get("released"))}
                    self._remember(ctx.key, None)
                else:
                    vm = call(r, prefix(env), "prolog", ctx, prolog_timeout(env))
                    reply = {k: vm.get(k, "") for k in ("instance", "host", "vo", "attempt")}
                    if op == "prepare":
                        self._remember(ctx.key, str(vm["instance"]))
                    else:
                        was = self._prepared.get(ctx.key)
                        if was is not None and was != vm["instance"]:
                            raise TransientError(f"job {global_id[:80]}: its VM {was} is gone (now "
                                                 f"{vm['instance']}); this attempt goes back to idle")
                        reply["cred"] = f"{vm['job_user']}:{vm['job_password']}"
            log.info("%s %s for uid %d (pid %d, %s): ok", op, global_id, peer.uid, peer.pid, starter.slot)
            with self._lock:
                self.status.served += 1
            return reply
        except DynvmError as err:
            self._note(f"refused: {err}")
            return {"error": err.code, "transient": isinstance(err, TransientError), "message": str(err)}
        except Exception as err:  # a bug: still one answer (transient: the job goes back to idle)
            log.exception("condor daemon request failed")
            self._note(f"internal error: {err}")
            return {"error": "internal", "transient": True, "message": f"internal error: {err}"[:200]}

    def _remember(self, key: str, instance: str | None) -> None:
        with self._lock:
            self._prepared.pop(key, None)
            if instance is not None:
                self._prepared[key] = instance
                while len(self._prepared) > 100_000:  # jobs whose JOB_EXIT never came
                    self._prepared.pop(next(iter(self._prepared)))

    def _note(self, text: str) -> None:
        log.warning("%s", text[:300])
        with self._lock:
            self.status.refused += 1
            self.status.last_error, self.status.last_error_at = text[:300], time.time()

    def _serve_one(self, conn: socket.socket, accepted_ticks: int) -> None:
        try:
            with conn:
                reply = self.answer(conn, accepted_ticks)
                conn.settimeout(READ_TIMEOUT_S)
                conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the caller went away; its job's starter decides what happens next
        finally:
            self._slots.release()

    # -- the loop -----------------------------------------------------------------------------------
    def bind(self) -> socket.socket:
        path = self.settings.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a previous daemon's
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise UnavailableError(f"condor daemon: cannot bind {path}: {exc.strerror or exc}") from None
        os.chmod(path, 0o666)  # any local process may ask; the checks decide who gets what
        sock.listen(128)
        sock.settimeout(1.0)
        return sock

    def serve(self, stop: threading.Event, sock: socket.socket | None = None) -> None:
        """Accept until ``stop`` is set; each request runs in its own thread (a prolog waits for a boot).
        The loop survives any exception and records it in ``status``."""
        sock = sock or self.bind()
        with sock:
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                except Exception as exc:
                    self._note(f"accept: {exc}")
                    stop.wait(0.5)
                    continue
                accepted = boot_ticks()
                if not self._slots.acquire(blocking=False):
                    busy = {"error": "unavailable", "transient": True, "message": "condor daemon busy"}
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps(busy).encode() + b"\n")
                    conn.close()
                    continue
                try:
                    threading.Thread(target=self._serve_one, args=(conn, accepted), daemon=True,
                                     name="condor-client").start()
                except Exception as exc:
                    self._slots.release()
                    conn.close()
                    self._note(f"thread: {exc}")

    def start_thread(self) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        sock = self.bind()
        t = threading.Thread(target=self.serve, args=(stop, sock), name="dynvm-condor-daemon", daemon=True)
        t.start()
        return t, stop
