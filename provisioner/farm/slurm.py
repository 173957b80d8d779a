"""A private, real Slurm cluster on this machine: its own munged, slurmctld and N slurmd (n1..nN), own config
dir, ports, state and logs under one base directory; SlurmUser=root; deploy/slurm's hooks installed as its
README describes.  ``dynvm demo`` runs one beside the local farm, the batch-hook tests run theirs.

Clients use SLURM_CONF (see ``SlurmCluster.env``).  Daemons are started here and stopped by their pids
(never by name: other sessions may run Slurm on this machine too).  A farm's cluster (``dynvm demo``), its
recorded pids and the pool accounts are provisioner.farm.slurm_demo's.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from provisioner.errors import DeadlineExceeded, PermanentError, UnavailableError

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue")
HOOKS = ("prolog-slurmctld", "epilog-slurmctld", "task-prolog", "payload")
HOOK_USER = "dynvm-hook"
T = TypeVar("T")


class SlurmStartError(UnavailableError):
    """The private cluster did not come up (the message carries the daemons' diagnostics)."""


def missing_programs() -> list[str]:
    """The Slurm and munge programs this module needs that are not on PATH."""
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None]


def shipped_hooks_dir() -> Path | None:
    """deploy/slurm: the checkout's in a source tree, else the copy an installed wheel ships
    (``provisioner/data/deploy/slurm``); None if its hooks are not all there."""
    from provisioner.catalogue.shipped import deploy_dir

    d = deploy_dir() / "slurm"
    return d if all((d / n).is_file() for n in (*HOOKS, "slurm.conf.dynvm")) else None


def _no_hooks() -> PermanentError:
    from provisioner.catalogue.shipped import deploy_dir

    return PermanentError(f"deploy/slurm (the shipped hooks) is not part of this installation "
                          f"(looked in {deploy_dir() / 'slurm'})")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (all held open together while chosen, so they cannot repeat)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def trusted_hook_rules(prefix: str, password: str) -> list[str]:
    """What deploy/slurm/README.md gives the controller hooks: push requests, read their replies."""
    return ["reset", "on", f">{password}", f"~{prefix}:hooks", f"~{prefix}:hookreply:*", "-@all",
            "+lpush", "+blpop", "+time", "+ping", "+auth"]


def install_hooks(dest: Path, env: Mapping[str, str], task_env: Mapping[str, str],
                  source: Path | None = None) -> list[Path]:
    """Copy the shipped hook scripts and write their site files (dynvm-hooks.env, dynvm-task.env)."""
    src = source or shipped_hooks_dir()
    if src is None:
        raise _no_hooks()
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in HOOKS:
        target = dest / name
        shutil.copy(src / name, target)
        target.chmod(0o755)
        out.append(target)
    hooks_env = dest / "dynvm-hooks.env"
    hooks_env.touch(mode=0o600)
    hooks_env.chmod(0o600)  # holds the trusted hook's Redis password: root only
    hooks_env.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    (dest / "dynvm-task.env").write_text("".join(f"{k}={v}\n" for k, v in task_env.items()))
    (dest / "dynvm-task.env").chmod(0o644)
    dest.chmod(0o755)
    return out


def parse_show_job(out: str) -> dict[str, str]:
    """Split one ``scontrol show job -o`` line into fields.  Comment, AdminComment and friends may contain
    spaces: a key is only taken where ``Word=`` follows a space, which a value can fake, so callers only
    read fields whose values they control (or Slurm sets)."""
    fields: dict[str, str] = {}
    for m in re.finditer(r"(?:^| )([A-Za-z:_/]+)=(.*?)(?= [A-Za-z:_/]+=|$)", out.strip()):
        fields.setdefault(m.group(1), m.group(2))
    return fields


def wait_for(cond: Callable[[], T | None], timeout: float, what: str) -> T:
    """``cond()`` until it is truthy (OS and subprocess errors count as not yet); DeadlineExceeded after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = cond()
        except (OSError, subprocess.SubprocessError):
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class SlurmCluster:
    base: Path
    name: str = "dynvmt"
    nodes: tuple[str, ...] = ("n1", "n2", "n3")
    detach: bool = False  # daemons in their own session: they outlive the process that started them
    on_spawn: Callable[[], None] | None = None  # called after each daemon starts (to record its pid)
    scheduler_type: str = "sched/builtin"
    scheduler_parameters: str = "sched_interval=1"
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(
        self, *argv: str, user: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = list(argv)
        if user is not None:
            gid = pwd.getpwnam(user).pw_gid
            cmd = ["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups", *argv]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60,
                              cwd="/tmp")

    def sbatch(self, user: str, script: str, *opts: str) -> str:
        """Submit ``script`` as ``user`` with plain sbatch; its output goes to ``<base>/jobs/<id>.out``."""
        path = self.base / "jobs" / f"{user}-{time.monotonic_ns()}.sh"
        path.write_text(script)
        path.chmod(0o755)
        out = self.run("sbatch", "--parsable", f"--output={self.base}/jobs/%j.out", *opts, str(path),
                       user=user).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (see parse_show_job for what may be trusted)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return parse_show_job(out)

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job slurmctld knows, by job id (one scontrol call)."""
        out = self.run("scontrol", "show", "job", "-o", check=False).stdout
        found = (parse_show_job(ln) for ln in out.splitlines() if ln.startswith("JobId="))
        return {j["JobId"]: j for j in found}

    def output(self, job_id: str) -> str:
        return (self.base / "jobs" / f"{job_id}.out").read_text(errors="replace")

    def write_files(self, prolog_ctld: Path, epilog_ctld: Path, task_prolog: Path, *rest: Path,
                    wrap_payload: bool, hooks_source: Path | None = None) -> None:
        """slurm.conf with deploy/slurm's lines; ``wrap_payload`` adds its job_submit.lua (the batch script
        then runs inside the VM, which needs guests with an exec channel: the QEMU farm)."""
        src = hooks_source or shipped_hooks_dir()
        if src is None:
            raise _no_hooks()
        etc = self.base / "etc"
        for d in ("etc", "state", "log", "spool", "jobs", "run"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.base / "spool" / n).mkdir(parents=True, exist_ok=True)
        (self.base / "jobs").chmod(0o1777)  # the pool accounts write their outputs here
        host = socket.gethostname().split(".")[0]
        shipped = (src / "slurm.conf.dynvm").read_text()
        shipped = shipped.replace("/usr/local/libexec/dynvm", str(prolog_ctld.parent))
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        lines = [
            f"ClusterName={self.name}", f"SlurmctldHost={host}", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.base}/run/munge.sock",
            f"StateSaveLocation={self.base}/state", f"SlurmdSpoolDir={self.base}/spool/%n",
            f"SlurmctldPidFile={self.base}/run/slurmctld.pid", f"SlurmdPidFile={self.base}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.base}/log/slurmctld.log", f"SlurmdLogFile={self.base}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            f"SchedulerType={self.scheduler_type}",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
            "MpiDefault=none", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "SlurmdTimeout=30", "MessageTimeout=20",
            f"SchedulerParameters={self.scheduler_parameters}", "MinJobAge=600",
            "SlurmdParameters=config_overrides",
            *(ln for ln in shipped.splitlines() if wrap_payload or not ln.startswith("JobSubmitPlugins")),
        ]
        if wrap_payload:
            lua = (src / "job_submit.lua").read_text()
            lua = lua.replace("/usr/local/libexec/dynvm", str(prolog_ctld.parent))
            (etc / "job_submit.lua").write_text(lua)
        for n, port in zip(self.nodes, node_ports, strict=True):
            lines.append(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         "CPUs=4 RealMemory=4000 Feature=cms,atlas,lhcb State=UNKNOWN")
        nodes = ",".join(self.nodes)
        lines.append(f"PartitionName=batch Nodes={nodes} Default=YES MaxTime=INFINITE State=UP")
        (etc / "slurm.conf").write_text("\n".join(ln for ln in lines if ln and not ln.startswith("#")) + "\n")

    def start(self) -> None:
        """Start munged, slurmctld and the slurmd.  A daemon that dies while the cluster comes up (a port
        taken between choosing it and binding it, on a loaded machine) gets one more try on fresh ports;
        a second failure raises with the daemons' log tails."""
        try:
            self._start_once()
        except (SlurmStartError, DeadlineExceeded) as first:
            if all(p.poll() is None for p in self.procs):
                self._fail(f"{first}\n{self.diagnostics()}")
            self.stop(cancel=False)
            self._fresh_ports()
            try:
                self._start_once()
            except (SlurmStartError, DeadlineExceeded) as second:
                self._fail(f"{second} (second try)\n{self.diagnostics()}")

    def _fail(self, message: str) -> None:
        self.stop(cancel=False)
        raise SlurmStartError(f"slurm in {self.base} did not come up: {message}")

    def _fresh_ports(self) -> None:
        ports = iter(free_ports(1 + len(self.nodes)))
        text = re.sub(r"^SlurmctldPort=\d+", lambda _: f"SlurmctldPort={next(ports)}", self.conf.read_text(),
                      flags=re.M)
        text = re.sub(r" Port=\d+ ", lambda _: f" Port={next(ports)} ", text)
        self.conf.write_text(text)

    def diagnostics(self) -> str:
        exited = [(n, p.returncode) for n, p in zip(self.names, self.procs, strict=True)
                  if p.poll() is not None]
        out = [f"exited: {exited}",
               "sinfo: " + self.run("sinfo", "-h", "-N", "-o", "%N %t %E", check=False).stdout.strip()]
        for log in sorted((self.base / "log").glob("*.log")):
            out.append(f"--- {log.name}: " + "\n".join(log.read_text(errors="replace").splitlines()[-8:]))
        return "\n".join(out)

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.procs.append(subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=self.detach))
        self.names.append(name)
        if self.on_spawn is not None:
            self.on_spawn()

    def _start_once(self) -> None:
        key = self.base / "etc" / "munge.key"
        key.touch(mode=0o600)
        key.chmod(0o600)
        key.write_bytes(os.urandom(128))
        sock = self.base / "run" / "munge.sock"
        sock.unlink(missing_ok=True)
        self._spawn("munged", [
            "munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
            f"--pid-file={self.base}/run/munged.pid", f"--log-file={self.base}/log/munged.log",
            f"--seed-file={self.base}/run/munged.seed"])
        wait_for(lambda: self._alive() and sock.exists(), 10, "munged")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        wait_for(lambda: self._alive() and "UP" in self.run("scontrol", "ping", check=False).stdout, 60,
                 "slurmctld")
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        wait_for(lambda: self._alive() and self.idle_nodes() == len(self.nodes), 90, "slurmd nodes idle")

    def _alive(self) -> bool:
        dead = [n for n, p in zip(self.names, self.procs, strict=True) if p.poll() is not None]
        if dead:
            raise SlurmStartError(f"daemon exited while the cluster came up: {dead}")
        return True

    def idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        return sum(1 for ln in out.splitlines() if ln.split()[-1:] == ["idle"])

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout
        return dict(ln.split() for ln in out.splitlines() if ln.strip())

    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in zip(self.names, self.procs, strict=True) if p.poll() is None}

    def stop(self, cancel: bool = True) -> None:
        """Cancel the cluster's jobs (``cancel`` and slurmctld up), SIGTERM each daemon this object started
        (slurmd first), then wait; SIGKILL after 15 s; then the job steps of this cluster that are left."""
        ctld = [p for n, p in zip(self.names, self.procs, strict=True) if n == "slurmctld"]
        if cancel and ctld and ctld[0].poll() is None:
            cancel_jobs(self.conf)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self.procs:
            stop_steps(self.conf)
        self.procs.clear()
        self.names.clear()


def cancel_jobs(conf: Path, timeout_s: float = 15.0) -> None:
    """scancel every job of the cluster whose config is ``conf`` and wait (up to ``timeout_s``) until none
    runs: a job step's slurmstepd is nobody's child (slurmd double-forks it), stopping the daemons does
    not stop it, and a cancelled job's EpilogSlurmctld releases its VM while dynvm still answers."""
    env = {**os.environ, "SLURM_CONF": str(conf)}

    def live() -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i", "-t", "PD,CF,R,CG,S"], env=env, capture_output=True,
                             text=True, timeout=30, check=False)
        ids = [j for j in out.stdout.split() if re.fullmatch(r"[0-9_]{1,24}", j)]
        return ids if out.returncode == 0 else []

    try:
        jobs = live()
        if not jobs:
            return
        subprocess.run(["scancel", "--quiet", *jobs], env=env, capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + timeout_s
        while live() and time.monotonic() < deadline:
            time.sleep(0.1)
    except (OSError, subprocess.SubprocessError):
        pass  # slurmctld gone or hung: stop_steps is the backstop


def steps_of(conf: Path) -> list[int]:
    """slurmstepd processes of the cluster whose config is ``conf``: those whose environment names it
    (slurmd hands its own SLURM_CONF on); another cluster's steps on this machine are never matched."""
    want = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if Path(f"/proc/{entry.name}/comm").read_text().strip() != "slurmstepd":
                continue
            env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env:
            found.append(int(entry.name))
    return found


def stop_steps(conf: Path, timeout_s: float = 5.0) -> list[int]:
    """SIGKILL what is left of the cluster's job steps once its daemons are gone (a step whose job could
    not be cancelled keeps retrying a dead slurmctld); returns their pids."""
    from provisioner.farm.qemu.procs import pid_alive

    steps = steps_of(conf)
    for pid in steps:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in steps) and time.monotonic() < deadline:
        time.sleep(0.02)
    return steps
