"""Job identity -> VO -> image, from trusted sources only (DESIGN.md, "Identity and trust").

A job's VO comes from what its user cannot choose: the Unix group of the pool account (looked up here from
the uid, never read from job text), a Slurm account only when slurmdbd enforces it, or the VO the HTCondor
schedd recorded from the proxy.  A job only ever gets an image that serves its VO.

Every job-supplied string goes through :func:`validate_token` before it is used anywhere.
"""

from __future__ import annotations

import grp
import pwd
import re
from dataclasses import dataclass

from provisioner.catalogue.files import REF_RE
from provisioner.catalogue.model import VO_RE, ImageKind, ResolvedImage
from provisioner.catalogue.store import Catalogue
from provisioner.config import Config, IdentitySource
from provisioner.errors import IdentityError, UnknownImageError, UnknownVOError, ValidationError

USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")
GROUP_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
ACCOUNT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Slurm ids ("123", "123_4" array, "123+1" het) and HTCondor GlobalJobIds ("schedd#12.0#1700000000").
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+#@:-]{0,127}$")
IMAGE_REF_RE = REF_RE
# Characters a shell, an XML document or a log line would interpret.
_METACHARS = set("`$;&|<>(){}[]*?!~'\"\\ \t\n\r\x00")
MAX_REPR = 40


def _short(value: object) -> str:
    r = repr(value)
    return r if len(r) <= MAX_REPR else r[: MAX_REPR - 3] + "..."


def validate_token(value: object, field: str, pattern: re.Pattern[str] | str, max_len: int = 64) -> str:
    """``value`` if it is a safe token for ``field``; ValidationError naming field and value otherwise."""
    if not isinstance(value, str):
        raise ValidationError(f"{field}: expected a string, got {type(value).__name__} {_short(value)}")
    if len(value) > max_len:
        raise ValidationError(f"{field}: value {_short(value)} is longer than {max_len} characters")
    if not value:
        raise ValidationError(f"{field}: empty value")
    bad = next((c for c in value if c in _METACHARS or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValidationError(f"{field}: value {_short(value)} contains the forbidden character {bad!r}")
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    if not regex.fullmatch(value):
        raise ValidationError(f"{field}: value {_short(value)} does not match {regex.pattern}")
    return value


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """What the trusted side knows about a job's owner.  Never filled from job text."""

    uid: int
    user: str
    unix_group: str | None = None  # primary group of the pool account, from the uid via pwd/grp
    slurm_account: str | None = None
    account_enforced: bool = False  # slurmdbd enforces associations (AccountingStorageEnforce)
    condor_proxy_vo: str | None = None  # x509UserProxyVOName from the schedd's copy of the ad

    @classmethod
    def from_uid(
        cls,
        uid: int,
        *,
        slurm_account: str | None = None,
        account_enforced: bool = False,
        condor_proxy_vo: str | None = None,
    ) -> JobIdentity:
        """Look the user and primary group up in the system databases (IdentityError if unknown)."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise IdentityError(f"uid {uid} has no passwd entry on this machine") from None
        try:
            group: str | None = grp.getgrgid(pw.pw_gid).gr_name
        except KeyError:
            group = None
        return cls(uid, pw.pw_name, group, slurm_account, account_enforced, condor_proxy_vo)


def _lookup(config: Config, source: IdentitySource, identity: JobIdentity) -> tuple[str | None, str, bool]:
    """(VO or None, why not, whether the source had a trusted value) for one source."""
    if source is IdentitySource.UNIX_GROUP:
        if identity.unix_group is None:
            return None, "unix_group: none known", False
        group = validate_token(identity.unix_group, "unix_group", GROUP_RE, 32)
        vo = next((v for v, vc in config.vos.items() if group in vc.groups), None)
        return vo, f"unix_group {group!r} maps to no VO", True
    if source is IdentitySource.SLURM_ACCOUNT:
        if identity.slurm_account is None:
            return None, "slurm_account: none", False
        if not identity.account_enforced:
            return None, "slurm_account: ignored, not enforced by slurmdbd", False
        account = validate_token(identity.slurm_account, "slurm_account", ACCOUNT_RE, 64)
        vo = next((v for v, vc in config.vos.items() if account in vc.accounts), None)
        return vo, f"slurm_account {account!r} maps to no VO", True
    if identity.condor_proxy_vo is None:
        return None, "condor_proxy_vo: none", False
    proxy_vo = validate_token(identity.condor_proxy_vo, "condor_proxy_vo", VO_RE, 32)
    vo = proxy_vo if proxy_vo in config.vos else None
    return vo, f"condor_proxy_vo {proxy_vo!r} is not a configured VO", True


def resolve_vo(identity: JobIdentity, config: Config) -> str:
    """The job's VO from the first configured trusted source that yields one.

    UnknownVOError if a trusted value maps to no VO; IdentityError if no trusted source had a value.
    """
    validate_token(identity.user, "user", USER_RE, 32)
    reasons: list[str] = []
    unmapped = False
    for source in config.identity.sources:
        vo, why, had_value = _lookup(config, source, identity)
        if vo is not None:
            return vo
        reasons.append(why)
        unmapped = unmapped or had_value
    detail = "; ".join(reasons) or "no identity sources configured"
    who = f"user {identity.user!r} (uid {identity.uid})"
    if unmapped:
        raise UnknownVOError(f"no VO for {who}: {detail}")
    raise IdentityError(f"no trusted identity for {who}: {detail}")


def image_for_vo(
    vo: str, catalogue: Catalogue, config: Config, requested: str | None = None
) -> ResolvedImage:
    """The image a job of ``vo`` gets: the VO's configured image, or ``requested`` only if it is a worker
    image serving ``vo``.  Never another VO's image."""
    vo = validate_token(vo, "vo", VO_RE, 32)
    vc = config.vos.get(vo)
    if vc is None:
        known = ", ".join(sorted(config.vos)) or "none"
        raise UnknownVOError(f"unknown VO {vo!r} (configured: {known})")
    if requested is None:
        try:
            image = catalogue.resolve(vc.image)
        except UnknownImageError as err:  # the configuration is at fault: say where
            raise UnknownImageError(f"vos.{vo}.image in {config.source}: {err.message}") from None
        what = f"configured image {vc.image!r} of VO {vo!r}"
    else:
        ref = validate_token(requested, "image", IMAGE_REF_RE, 128)
        image = catalogue.resolve(ref)
        what = f"requested image {ref!r}"
    if image.kind is not ImageKind.WORKER:
        raise IdentityError(f"{what} resolves to {image.ref}, a {image.kind} image, not a worker image")
    if vo not in image.vos:
        raise IdentityError(f"{what} resolves to {image.ref}, which does not serve VO {vo!r}")
    return image
