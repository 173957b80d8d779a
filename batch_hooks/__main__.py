"""``python -m batch_hooks SYSTEM OP``: the hooks' light entry point (what deploy/slurm's scripts run).

Kept apart from the ``dynvm`` CLI so a hook process imports no pydantic, Celery or catalogue.  Exit codes
are the hook protocol's, documented per system in batch_hooks.slurm.  No traceback on any input.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["slurm"]:
            from batch_hooks import slurm

            return slurm.main(argv[1:])
        if argv[:1] == ["generic"] and len(argv) >= 2:
            import os

            from batch_hooks import generic

            return generic.run(argv[1], generic.parse_flags(argv[2:]), os.environ, None)
        if argv[:2] == ["htcondor", "wrap"] and len(argv) >= 3:  # USER_JOB_WRAPPER (deploy/htcondor)
            import os

            from batch_hooks.condor_wrapper import wrap

            return wrap(argv[2:], os.environ, sys.stdout, sys.stderr)
        if argv[:1] == ["htcondor"]:
            import os

            from batch_hooks import htcondor

            return htcondor.main(argv[1:], os.environ)
        if argv[:1] == ["payload"]:
            import os

            from batch_hooks import payload

            return payload.main(argv[1:], os.environ, sys.stdout, sys.stderr)
        sys.stderr.write("usage: python -m batch_hooks slurm OP | generic prolog|epilog --FLAG VALUE... | "
                         "payload [--hex]\n")
        return 2
    except Exception as exc:  # a bug must still not print a traceback into a batch system's log
        sys.stderr.write(f"dynvm hook: internal error: {type(exc).__name__}: {str(exc)[:200]}\n")
        return 1


sys.exit(main(sys.argv[1:]))
