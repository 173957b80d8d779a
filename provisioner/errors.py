"""The one error hierarchy of dynvm.

Every error is picklable (all constructor arguments go to ``super().__init__``) because errors cross
Celery.  Library code raises; only the CLI turns an error into one line on stderr and an exit code.

Exit codes (the CLI contract, DESIGN.md):
    0 ok, 1 internal error, 2 usage / invalid input, 3 not found, 4 conflict / no capacity,
    5 unavailable (a server or host cannot be reached), 6 timeout.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAVAILABLE = 5
EXIT_TIMEOUT = 6


class DynvmError(Exception):
    """Base of every error dynvm raises on purpose."""

    exit_code = EXIT_INTERNAL
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TransientError(DynvmError):
    """May succeed when retried (host unreachable, Redis blip, capacity freed later)."""

    exit_code = EXIT_UNAVAILABLE
    code = "unavailable"


class PermanentError(DynvmError):
    """Retrying cannot help (bad input, unknown VO, missing image)."""

    exit_code = EXIT_USAGE
    code = "invalid"


class UsageError(PermanentError):
    """A bad command-line argument."""


class ValidationError(PermanentError):
    """Malformed input; the message names the culprit (file:line, dotted field path or value)."""


class ConfigError(ValidationError):
    """The configuration file is malformed."""

    code = "config"


class CatalogueError(ValidationError):
    """An image catalogue file is malformed or inconsistent."""

    code = "catalogue"


class NotFoundError(PermanentError):
    exit_code = EXIT_NOT_FOUND
    code = "not_found"


class UnknownVOError(NotFoundError):
    code = "unknown_vo"


class UnknownImageError(NotFoundError):
    code = "unknown_image"


class IdentityError(PermanentError):
    """A job's identity does not map to a VO from a trusted source, or a VO/image mismatch."""

    code = "identity"


class ConflictError(PermanentError):
    exit_code = EXIT_CONFLICT
    code = "conflict"


class InvalidTransition(ConflictError):
    code = "invalid_transition"


class NoCapacityError(TransientError):
    """Nothing fits now; the message carries the scheduler's explanation."""

    exit_code = EXIT_CONFLICT
    code = "no_capacity"


class UnavailableError(TransientError):
    """A server (Redis, libvirt, the farm) cannot be reached."""


class HypervisorError(TransientError):
    """libvirt failed in a way that may pass (connection lost, host busy)."""

    code = "hypervisor"


class HypervisorPermanentError(PermanentError):
    """libvirt refused in a way a retry cannot fix (bad XML, missing disk, lease held elsewhere)."""

    code = "hypervisor"


class DeadlineExceeded(TransientError):
    exit_code = EXIT_TIMEOUT
    code = "timeout"


class NotReadyError(PermanentError):
    """A guest did not pass its image's readiness probe by the image's deadline: the image (or its
    configuration) is broken, so booting it again would only fail again."""

    exit_code = EXIT_TIMEOUT
    code = "not_ready"


def printable(text: str, limit: int | None = None) -> str:
    """Untrusted text (a guest's console, a job's string) made safe to show in one line: printable ASCII
    only (anything else becomes ``?``, so no terminal escape gets through), at most ``limit`` characters."""
    clean = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return clean if limit is None else clean[:limit]
