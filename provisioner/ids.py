"""The one gate every id passes before it becomes part of a Redis key (re-exported by state.keys).

Light on purpose (stdlib and provisioner.errors only): the batch hooks, which start for every job, build
their keys with it without importing the state store.
"""

from __future__ import annotations

import re

from provisioner.errors import ValidationError

ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_id(value: object, what: str) -> str:
    """Return ``value`` if it is a well-formed id, else raise ValidationError naming it."""
    if not isinstance(value, str) or not ID_RE.match(value):
        # Cut what is echoed: an id can come from a job, and a 100 kB id must not make a 100 kB error.
        shown = repr(value)[:64] + ("..." if len(repr(value)) > 64 else "")
        raise ValidationError(f"{what} {shown} is malformed (expected {ID_RE.pattern})")
    return value
