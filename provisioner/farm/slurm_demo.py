"""``dynvm demo``'s private Slurm beside a farm (provisioner.farm.slurm's cluster, deploy/slurm's hooks as
shipped): its base directory and job-side python path, the trusted hook's ACL user, its daemons' pids with
their identities recorded in ``<farm>/slurm.json`` so that ``dynvm farm down`` stops exactly those
processes; and the pool accounts (cms001, ...) its jobs run as.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from provisioner.errors import PermanentError, UnavailableError
from provisioner.farm.slurm import (
    HOOK_USER,
    SlurmCluster,
    cancel_jobs,
    install_hooks,
    stop_steps,
    trusted_hook_rules,
)

POOL_ACCOUNTS = {"cms": "cms001", "atlas": "atlas001", "lhcb": "lhcb001"}  # group (= VO) -> pool account
STATE_FILE = "slurm.json"
SOCKET_MAX = 100  # a unix socket path (munge's) must stay below 108 bytes


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
