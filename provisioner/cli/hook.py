"""``dynvm hook ...``: the batch-system hooks and their trusted server.

  dynvm hook serve                         serve hook requests (what every control worker also does)
  dynvm hook watch-lost                    requeue jobs whose worker VM was lost
  dynvm hook slurm prolog-slurmctld|epilog-slurmctld|task-prolog
  dynvm hook generic prolog|epilog --job-id J --user U [--cpus N ...]   LSF, PBS/Torque, Grid Engine
  dynvm hook payload [--script FILE]       run a job's script inside its own VM (the job's privileges)
  dynvm hook condor-daemon [--socket PATH]  HTCondor execute node's root daemon (hooks + job wrapper)
  dynvm hook files slurm|htcondor           print the directory of the hook scripts a site installs

Hook processes start for every job: deploy/ ships scripts that run ``python -m batch_hooks ...`` (no
pydantic, Celery or catalogue import); these commands are the same code behind the full CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from provisioner.cli.context import CliContext


def register(sub: Any) -> None:
    p = sub.add_parser("hook", help="batch-system hooks (Slurm, HTCondor, generic) and their server")
    hs = p.add_subparsers(dest="hook_cmd", metavar="COMMAND")
    s = hs.add_parser("serve", help="serve hook requests from Redis (control workers do this too)")
    s.add_argument("--threads", type=int, default=256, help="parallel prologs (default 256)")
    s.set_defaults(func=serve)
    w = hs.add_parser("watch-lost", help="requeue jobs whose worker VM was lost (scontrol requeue); runs "
                      "until stopped, one pass with --once")
    w.add_argument("--interval", type=float, default=5.0, help="seconds between sweeps (default 5)")
    w.add_argument("--once", action="store_true", help="one sweep, print the requeued job keys")
    w.set_defaults(func=watch_lost)
    sl = hs.add_parser("slurm", help="Slurm hooks (see deploy/slurm)")
    sl.add_argument("op", choices=["prolog-slurmctld", "epilog-slurmctld", "task-prolog"])
    sl.set_defaults(func=slurm)
    g = hs.add_parser("generic", help="prolog/epilog for LSF, PBS/Torque, Grid Engine (root hooks)")
    g.add_argument("op", choices=["prolog", "epilog"])
    g.add_argument("--system", choices=["lsf", "pbs", "sge"], default=None,
                   help="read the job from this system's environment variables")
    for name in ("job-id", "user", "cluster", "queue", "node"):
        g.add_argument(f"--{name}", default=None)
    for name in ("attempt", "cpus", "memory-mib", "walltime-s"):
        g.add_argument(f"--{name}", type=int, default=None)
    g.set_defaults(func=generic)
    cd = hs.add_parser("condor-daemon", help="HTCondor execute node: the root daemon that the starter hooks "
                       "and the USER_JOB_WRAPPER ask for their own job's VM (see deploy/htcondor)")
    cd.add_argument("--socket", default="/run/dynvm/condor.sock", help="unix socket (default %(default)s)")
    cd.add_argument("--startd-name", default=None,
                    help="the startd's name as the schedd's RemoteHost spells it (default: the FQDN)")
    cd.add_argument("--node", default=None, help="this node's dynvm host name when it is a hypervisor too "
                    "(WNoDeS: the job's VM goes here)")
    cd.add_argument("--starter-exe", default=None,
                    help="require callers' starter to run this binary (e.g. /usr/sbin/condor_starter)")
    cd.add_argument("--schedd-timeout", type=float, default=10.0, help="seconds per schedd query")
    cd.add_argument("--max-clients", type=int, default=256, help="requests served at once (default 256)")
    cd.set_defaults(func=condor_daemon)
    pay = hs.add_parser("payload", help="run the job's script inside its own VM, straight through the VM's "
                        "exec channel (uses DYNVM_JOB_CRED; exits with the script's exit code)")
    pay.add_argument("--script", default="-", help="script file (default: stdin)")
    pay.set_defaults(func=payload)
    f = hs.add_parser("files", help="print the directory holding the hook scripts and configuration to "
                      "install (deploy/slurm, deploy/htcondor; inside the package in a wheel install)")
    f.add_argument("system", choices=["slurm", "htcondor"])
    f.set_defaults(func=files)


def serve(ctx: CliContext, args: argparse.Namespace) -> int:
    import threading

    from batch_hooks.server import serve as serve_hooks
    from provisioner.cli.common import runtime

    stop = threading.Event()
    try:
        serve_hooks(runtime(ctx), stop, workers=max(1, min(args.threads, 1024)))
    except KeyboardInterrupt:
        stop.set()
    return 0


def watch_lost(ctx: CliContext, args: argparse.Namespace) -> int:
    import threading

    from batch_hooks.requeue import requeuers_for, run_forever, sweep
    from provisioner.cli.common import runtime
    from provisioner.errors import ValidationError

    if not 0.5 <= args.interval <= 3600:
        raise ValidationError("--interval must be in 0.5..3600 s")
    requeuers = {**requeuers_for("slurm"), **requeuers_for("htcondor")}  # each job by its own batch system
    if args.once:
        for key in sweep(runtime(ctx), requeuers):
            print(key)
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        run_forever(runtime(ctx), requeuers, threading.Event(), args.interval)
    return 0


def slurm(ctx: CliContext, args: argparse.Namespace) -> int:
    from batch_hooks import slurm as slurm_hooks

    return slurm_hooks.main([args.op])


def generic(ctx: CliContext, args: argparse.Namespace) -> int:
    import batch_hooks.generic as generic_hooks

    return generic_hooks.run(args.op, vars(args), os.environ, args.system)


def payload(ctx: CliContext, args: argparse.Namespace) -> int:
    from batch_hooks import payload as payload_hook

    return payload_hook.main(["--script", args.script], os.environ, sys.stdout, sys.stderr)


def condor_daemon(ctx: CliContext, args: argparse.Namespace) -> int:
    import logging
    import signal
    import socket
    import threading

    from batch_hooks.condor_daemon import CondorNodeDaemon, DaemonSettings
    from batch_hooks.condor_verify import Htcondor2Schedd
    from provisioner.errors import ValidationError

    if not 0.5 <= args.schedd_timeout <= 120:
        raise ValidationError("--schedd-timeout must be in 0.5..120 s")
    if not args.socket.startswith("/"):
        raise ValidationError("--socket must be an absolute path")
    settings = DaemonSettings(args.socket, args.startd_name or socket.getfqdn(), dict(os.environ),
                              node=args.node, starter_exe=args.starter_exe, max_clients=args.max_clients)
    daemon = CondorNodeDaemon(settings, Htcondor2Schedd(args.schedd_timeout))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        daemon.serve(stop)
    return 0


def files(ctx: CliContext, args: argparse.Namespace) -> int:
    from provisioner.catalogue.shipped import deploy_dir
    from provisioner.errors import PermanentError

    d = deploy_dir() / args.system
    if not d.is_dir():
        raise PermanentError(f"the {args.system} hooks are not part of this installation (looked in {d})")
    print(d)
    return 0
