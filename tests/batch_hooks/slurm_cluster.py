"""A private, real Slurm cluster for tests: its own munged, slurmctld and three slurmd (n1..n3) on one
machine, own config dir, ports and state dir; SlurmUser=root; the shipped deploy/slurm hooks installed.

Everything lives under one directory; clients use SLURM_CONF (see ``env``).  Daemons are started here and
stopped by their pids (never by name: other sessions may run Slurm on this machine too).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

POOL = {"cms": "cms001", "atlas": "atlas001", "lhcb": "lhcb001", "alice": "alice001"}  # alice: no VO
NODES = ("n1", "n2", "n3")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    return free_ports(1)[0]


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


def ensure_pool_accounts() -> dict[str, int]:
    """Pool accounts cms001/atlas001/lhcb001 (+ alice001: no VO maps its group) and groups; idempotent."""
    uids: dict[str, int] = {}
    for group, user in POOL.items():
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", group], check=True)
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "-M", "-N", "-g", group, "-s", "/bin/sh", "-d", "/tmp", user],
                           check=True)
        uids[user] = pwd.getpwnam(user).pw_uid
    return uids


@dataclass
class SlurmCluster:
    base: Path
    hook_env: dict[str, str]
    name: str = "dynvmt"
    pids: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

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

    def write_files(self, prolog_ctld: Path, epilog_ctld: Path, task_prolog: Path, *rest: Path,
                    wrap_payload: bool) -> None:
        """slurm.conf with deploy/slurm's lines; ``wrap_payload`` adds its job_submit.lua (the batch script
        then runs inside the VM, which needs guests with an exec channel: the QEMU farm)."""
        etc = self.base / "etc"
        for d in ("etc", "state", "log", "spool", "jobs", "run"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        for n in NODES:
            (self.base / "spool" / n).mkdir(parents=True, exist_ok=True)
        (self.base / "jobs").chmod(0o1777)  # the pool accounts write their outputs here
        host = socket.gethostname().split(".")[0]
        shipped = (REPO / "deploy" / "slurm" / "slurm.conf.dynvm").read_text()
        shipped = shipped.replace("/usr/local/libexec/dynvm", str(prolog_ctld.parent))
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        lines = [
            f"ClusterName={self.name}", f"SlurmctldHost={host}", f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.base}/run/munge.sock",
            f"StateSaveLocation={self.base}/state", f"SlurmdSpoolDir={self.base}/spool/%n",
            f"SlurmctldPidFile={self.base}/run/slurmctld.pid", f"SlurmdPidFile={self.base}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.base}/log/slurmctld.log", f"SlurmdLogFile={self.base}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
            "MpiDefault=none", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "SlurmdTimeout=30", "MessageTimeout=20",
            "SchedulerParameters=sched_interval=1", "MinJobAge=600", "SlurmdParameters=config_overrides",
            *(ln for ln in shipped.splitlines() if wrap_payload or not ln.startswith("JobSubmitPlugins")),
        ]
        if wrap_payload:
            lua = (REPO / "deploy" / "slurm" / "job_submit.lua").read_text()
            lua = lua.replace("/usr/local/libexec/dynvm", str(prolog_ctld.parent))
            (etc / "job_submit.lua").write_text(lua)
        for n, port in zip(NODES, node_ports, strict=True):
            lines.append(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         "CPUs=4 RealMemory=4000 Feature=cms,atlas,lhcb State=UNKNOWN")
        lines.append(f"PartitionName=batch Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        (etc / "slurm.conf").write_text("\n".join(ln for ln in lines if ln and not ln.startswith("#")) + "\n")

    def start(self) -> None:
        """Start munged, slurmctld and the slurmd.  A daemon that dies while the cluster comes up (a port
        taken between choosing it and binding it, on a loaded machine) gets one more try on fresh ports;
        a second failure raises with the daemons' log tails."""
        try:
            self._start_once()
        except AssertionError as first:
            if all(p.poll() is None for p in self.procs):
                raise AssertionError(f"{first}\n{self.diagnostics()}") from None
            self.stop()
            self.procs.clear()
            self._fresh_ports()
            try:
                self._start_once()
            except AssertionError as second:
                raise AssertionError(f"{second} (second try)\n{self.diagnostics()}") from None

    def _fresh_ports(self) -> None:
        ports = iter(free_ports(1 + len(NODES)))
        text = re.sub(r"^SlurmctldPort=\d+", lambda _: f"SlurmctldPort={next(ports)}", self.conf.read_text(),
                      flags=re.M)
        text = re.sub(r" Port=\d+ ", lambda _: f" Port={next(ports)} ", text)
        self.conf.write_text(text)

    def diagnostics(self) -> str:
        out = [f"exited: {[(p.args[0], p.args[-3:], p.returncode) for p in self.procs if p.poll() is not None]}",
               "sinfo: " + self.run("sinfo", "-h", "-N", "-o", "%N %t %E", check=False).stdout.strip()]
        for log in sorted((self.base / "log").glob("slurm*.log")):
            out.append(f"--- {log.name}: " + "\n".join(log.read_text(errors="replace").splitlines()[-8:]))
        return "\n".join(out)

    def _start_once(self) -> None:
        key = self.base / "etc" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        (self.base / "run" / "munge.sock").unlink(missing_ok=True)
        munge = subprocess.Popen(
            ["munged", "-F", "--force", f"--socket={self.base}/run/munge.sock", f"--key-file={key}",
             f"--pid-file={self.base}/run/munged.pid", f"--log-file={self.base}/log/munged.log",
             f"--seed-file={self.base}/run/munged.seed"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(munge)
        wait_for(lambda: (self.base / "run" / "munge.sock").exists(), 10, "munged")
        ctld = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(ctld)
        wait_for(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, 60, "slurmctld")
        for n in NODES:
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", n, "-f", str(self.conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: self._alive() and self.idle_nodes() == len(NODES), 90, "slurmd nodes idle")

    def _alive(self) -> bool:
        dead = [p.args for p in self.procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"daemon exited while the cluster came up: {dead}")
        return True

    def idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        return sum(1 for ln in out.splitlines() if ln.split()[-1:] == ["idle"])

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout
        return dict(ln.split() for ln in out.splitlines() if ln.strip())

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)


def parse_show_job(out: str) -> dict[str, str]:
    """Split ``scontrol show job -o`` into fields.  Comment, AdminComment and friends may contain spaces:
    a key is only taken where ``Word=`` follows a space, which a value can fake, so tests only read fields
    whose values they control."""
    fields: dict[str, str] = {}
    for m in re.finditer(r"(?:^| )([A-Za-z:_/]+)=(.*?)(?= [A-Za-z:_/]+=|$)", out.strip()):
        fields.setdefault(m.group(1), m.group(2))
    return fields


def wait_for(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = cond()
        except (OSError, subprocess.SubprocessError):
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def install_hooks(dest: Path, env: dict[str, str], task_env: dict[str, str]) -> list[Path]:
    """Copy the shipped hook scripts and write their site files (dynvm-hooks.env, dynvm-task.env)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("prolog-slurmctld", "epilog-slurmctld", "task-prolog", "payload"):
        target = dest / name
        shutil.copy(REPO / "deploy" / "slurm" / name, target)
        target.chmod(0o755)
        out.append(target)
    lines = [f"{k}={v}" for k, v in env.items()]
    (dest / "dynvm-hooks.env").write_text("\n".join(lines) + "\n")
    (dest / "dynvm-hooks.env").chmod(0o600)  # holds the trusted hook's Redis password: root only
    (dest / "dynvm-task.env").write_text("".join(f"{k}={v}\n" for k, v in task_env.items()))
    (dest / "dynvm-task.env").chmod(0o644)
    dest.chmod(0o755)
    return out
