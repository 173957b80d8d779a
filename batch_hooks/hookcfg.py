"""Hook-process settings, from the environment the site's hook script sets (deploy/slurm/*.env):

DYNVM_HOOK_REDIS   redis://USER:PASS@HOST:PORT/DB of the trusted hook user (root-only file)
DYNVM_PREFIX       the key prefix of the dynvm installation (default ``dynvm``)
DYNVM_PROLOG_TIMEOUT  seconds a prolog waits for its VM (default 300)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from batch_hooks.resp import LightRedis
from provisioner.errors import ValidationError

PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def connect(env: Mapping[str, str]) -> LightRedis:
    url = env.get("DYNVM_HOOK_REDIS")
    if not url:
        raise ValidationError("DYNVM_HOOK_REDIS is not set (see deploy/slurm/README.md)")
    return LightRedis(url)


def prefix(env: Mapping[str, str]) -> str:
    value = env.get("DYNVM_PREFIX", "dynvm")
    if not PREFIX_RE.fullmatch(value):
        raise ValidationError(f"DYNVM_PREFIX {value[:32]!r} is malformed")
    return value


def prolog_timeout(env: Mapping[str, str]) -> float:
    text = env.get("DYNVM_PROLOG_TIMEOUT", "300")
    try:
        value = float(text)
    except ValueError:
        raise ValidationError(f"DYNVM_PROLOG_TIMEOUT {text[:32]!r} is not a number") from None
    if not 1 <= value <= 3600:
        raise ValidationError("DYNVM_PROLOG_TIMEOUT must be in 1..3600 s")
    return value
