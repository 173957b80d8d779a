"""A private, real Slurm cluster on this machine: its own munged, slurmctld and N slurmd (n1..nN), own config
dir, ports, state and logs under one base directory; SlurmUser=root; deploy/slurm's hooks installed as its
README describes.  ``dynvm demo`` runs one beside the local farm, the batch-hook tests run theirs.

Clients use SLURM_CONF (see ``SlurmCluster.env``).  Daemons are started here and stopped by their pids
(never by name: other sessions may run Slurm on this machine too); a farm's cluster records its pids with
their identities in ``<farm>/slurm.json`` so that ``dynvm farm down`` stops exactly those processes.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from provisioner.errors import DeadlineExceeded, PermanentError, UnavailableError

POOL_ACCOUNTS = {"cms": "cms001", "atlas": "atlas001", "lhcb": "lhcb001"}  # group (= VO) -> pool account
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "squeue")
HOOKS = ("prolog-slurmctld", "epilog-slurmctld", "task-prolog", "payload")
HOOK_USER = "dynvm-hook"
STATE_FILE = "slurm.json"
SOCKET_MAX = 100  # a unix socket path (munge's) must stay below 108 bytes
T = TypeVar("T")


class SlurmStartError(UnavailableError):
    """The private cluster did not come up (the message carries the daemons' diagnostics)."""


def missing_programs() -> list[str]:
    """The Slurm and munge programs this module needs that are not on PATH."""
    return [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None]


def shipped_hooks_dir() -> Path | None:
    """deploy/slurm of the checkout this dynvm runs from (an installed wheel does not carry it)."""
    d = Path(__file__).resolve().parents[2] / "deploy" / "slurm"
    return d if all((d / n).is_file() for n in (*HOOKS, "slurm.conf.dynvm")) else None


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


def ensure_pool_accounts(pool: Mapping[str, str] = POOL_ACCOUNTS) -> dict[str, int]:
    """Pool accounts (``group -> user``, e.g. cms -> cms001, primary group = the VO's) and their groups,
    created where missing (root only); idempotent.  Returns user -> uid."""
    uids: dict[str, int] = {}
    for group, user in pool.items():
        if not _known(grp.getgrnam, group):
            _create(["groupadd", group], f"group {group}")
        if not _known(pwd.getpwnam, user):
            _create(["useradd", "-M", "-N", "-g", group, "-s", "/bin/sh", "-d", "/tmp", user],
                    f"pool account {user} (group {group})")
        uids[user] = pwd.getpwnam(user).pw_uid
    return uids


def _known(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _create(argv: list[str], what: str) -> None:
    if os.geteuid() != 0:
        raise PermanentError(f"{what} is missing: create it as root")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UnavailableError(f"{argv[0]} {argv[-1]}: {done.stderr.strip()[:200]}")


def trusted_hook_rules(prefix: str, password: str) -> list[str]:
    """What deploy/slurm/README.md gives the controller hooks: push requests, read their replies."""
    return ["reset", "on", f">{password}", f"~{prefix}:hooks", f"~{prefix}:hookreply:*", "-@all",
            "+lpush", "+blpop", "+time", "+ping", "+auth"]


def install_hooks(dest: Path, env: Mapping[str, str], task_env: Mapping[str, str],
                  source: Path | None = None) -> list[Path]:
    """Copy the shipped hook scripts and write their site files (dynvm-hooks.env, dynvm-task.env)."""
    src = source or shipped_hooks_dir()
    if src is None:
        raise PermanentError("deploy/slurm (the shipped hooks) is not part of this installation")
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
            raise PermanentError("deploy/slurm (the shipped hooks) is not part of this installation")
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


# -- a farm's cluster (dynvm demo): started beside the farm, recorded, stopped by `dynvm farm down` --------


def _world_reachable(path: Path) -> bool:
    """Every directory from / down to ``path`` is searchable by others, and ``path`` readable."""
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in [path, *path.parents])
    except OSError:
        return False


def _job_side_pythonpath(base: Path) -> str:
    """Where the job's user imports batch_hooks from (the job-side hooks run with its privileges): this
    installation's packages if others can read them, else a copy under the cluster's base directory."""
    import batch_hooks

    root = Path(batch_hooks.__file__).resolve().parents[1]
    if _world_reachable(root) and _world_reachable(root / "batch_hooks"):
        return str(root)
    lib = base / "lib"
    skip = shutil.ignore_patterns("__pycache__", "data", "*.pyc")
    for pkg in ("batch_hooks", "provisioner"):
        shutil.copytree(root / pkg, lib / pkg, ignore=skip, dirs_exist_ok=True)
    for d, _dirs, files in os.walk(lib):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return str(lib)


def _base_dir(farm: Path) -> tuple[Path, bool]:
    """(base directory, created under /tmp): ``<farm>/slurm`` when the pool accounts can reach it and its
    socket paths stay short, else a fresh temporary directory."""
    want = farm / "slurm"
    if _world_reachable(farm) and len(str(want / "run" / "munge.sock")) < SOCKET_MAX:
        shutil.rmtree(want, ignore_errors=True)
        want.mkdir(mode=0o755)
        want.chmod(0o755)
        return want, False
    tmp = Path(tempfile.mkdtemp(prefix="dynvm-slurm-"))
    tmp.chmod(0o755)
    return tmp, True


def hook_url(redis_url: str, user: str, password: str) -> str:
    """``redis_url`` with the hook user's credentials (replacing any it had)."""
    parts = urlsplit(redis_url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise PermanentError("a private Slurm needs the farm's Redis as a redis:// URL")
    hostport = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{hostport}"))


def start_farm_slurm(farm: Path, redis_url: str, r: Any, prefix: str, nodes: int = 3,
                     prolog_timeout_s: float = 60.0, name: str = "demo") -> SlurmCluster:
    """A private cluster whose hooks are deploy/slurm's as shipped, talking to the farm's Redis (``r``: an
    admin client of it, which creates the trusted hook's ACL user); its pids recorded in
    ``<farm>/slurm.json``.  An earlier cluster of this farm is stopped first."""
    stop_farm_slurm(farm)
    base, temporary = _base_dir(farm)
    # Backfill every second starts a submitted job within about a second (sched/builtin took 2.5-2.8 s here).
    cluster = SlurmCluster(base, name=name, nodes=tuple(f"n{i}" for i in range(1, nodes + 1)), detach=True,
                           scheduler_type="sched/backfill",
                           scheduler_parameters="sched_interval=1,bf_interval=1")
    cluster.on_spawn = lambda: record(farm, cluster, temporary)  # each pid recorded as soon as it exists
    try:
        password = secrets.token_hex(16)
        r.execute_command("ACL", "SETUSER", HOOK_USER, *trusted_hook_rules(prefix, password))
        common = {"SLURM_CONF": str(cluster.conf)}
        ctld = {**common, "DYNVM_PYTHON": sys.executable, "DYNVM_PREFIX": prefix,
                "DYNVM_HOOK_REDIS": hook_url(redis_url, HOOK_USER, password),
                "DYNVM_PROLOG_TIMEOUT": f"{prolog_timeout_s:.0f}"}
        parts = urlsplit(redis_url)
        job_redis = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
        # The job-side hooks are stdlib-only by design: any python3 the job's user can run will do.
        job_python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
        task = {**common, "DYNVM_PYTHON": job_python, "PYTHONPATH": _job_side_pythonpath(base),
                "DYNVM_JOB_REDIS": job_redis}
        hooks = install_hooks(base / "hooks", ctld, task)
        cluster.write_files(*hooks, wrap_payload=False)
        cluster.start()
    except BaseException:
        cluster.stop()
        (farm / STATE_FILE).unlink(missing_ok=True)
        if temporary:
            shutil.rmtree(base, ignore_errors=True)
        raise
    return cluster


def record(farm: Path, cluster: SlurmCluster, remove_base: bool) -> None:
    from provisioner.farm.qemu.procs import identity

    pids = cluster.pids()
    idents = {n: i for n, p in pids.items() if (i := identity(p)) is not None}
    doc = {"base": str(cluster.base), "remove_base": remove_base, "name": cluster.name,
           "conf": str(cluster.conf), "pids": pids, "idents": idents}
    tmp = farm / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, farm / STATE_FILE)


def recorded(farm: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((farm / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def stop_farm_slurm(farm: Path, timeout_s: float = 15.0) -> list[int]:
    """Stop the farm's recorded cluster: SIGTERM to each recorded pid that is still the very process
    recorded (pid + identity), SIGKILL after ``timeout_s``; remove its files.  Returns the pids signalled."""
    from provisioner.farm.qemu.procs import is_ours, pid_alive

    doc = recorded(farm)
    if doc is None:
        (farm / STATE_FILE).unlink(missing_ok=True)
        return []
    pids, idents = doc.get("pids"), doc.get("idents")
    if not isinstance(pids, dict) or not isinstance(idents, dict):
        pids, idents = {}, {}  # unreadable: nothing is proven ours (the steps below still are, by config)
    live = {n: p for n, p in pids.items() if isinstance(p, int) and is_ours(p, str(idents.get(n, "")))}
    ours = list(live.values())
    conf = Path(str(doc.get("conf", "")))
    if conf.is_absolute() and "slurmctld" in live:
        cancel_jobs(conf)
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        for pid in ours:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while any(pid_alive(p) for p in ours) and time.monotonic() < deadline:
            time.sleep(0.05)
    if conf.is_absolute():
        ours += stop_steps(conf)
    base = Path(str(doc.get("base", "")))
    if base.is_absolute() and (base == farm / "slurm" or (doc.get("remove_base") and
                                                          base.name.startswith("dynvm-slurm-"))):
        shutil.rmtree(base, ignore_errors=True)
    (farm / STATE_FILE).unlink(missing_ok=True)
    return ours
