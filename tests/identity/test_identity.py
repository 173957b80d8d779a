"""Identity -> VO from trusted sources only; VO -> image never crosses VOs; job strings validated."""

from __future__ import annotations

import os
import pickle
import pwd
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner.catalogue.checksums import ChecksumCache
from provisioner.catalogue.model import VO_RE
from provisioner.catalogue.store import Catalogue
from provisioner.config import Config, IdentityConfig, IdentitySource, VOConfig
from provisioner.configload import default_config
from provisioner.errors import DynvmError, IdentityError, UnknownImageError, UnknownVOError, ValidationError
from provisioner.identity import JOB_ID_RE, USER_RE, JobIdentity, image_for_vo, resolve_vo, validate_token
from tests.catalogue.helpers import IMAGES

CAT = Catalogue.load(IMAGES, Path("/nonexistent"), ChecksumCache(None))
ALL_SOURCES = IdentityConfig(sources=list(IdentitySource))


def config(**vos: VOConfig) -> Config:
    base = {
        "cms": VOConfig(image="cms-wn", groups=["cms", "cmsprd"], accounts=["cms-acct"]),
        "atlas": VOConfig(image="atlas-wn", groups=["atlas"], accounts=["atlas-acct"]),
        "lhcb": VOConfig(image="lhcb-wn", groups=["lhcb"]),
    }
    return Config(vos={**base, **vos}, identity=ALL_SOURCES)


# -- validate_token --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        "cms;rm",
        "cms`id`",
        "$(id)",
        "a|b",
        "a&b",
        "<vo/>",
        "a>b",
        "x'y",
        'x"y',
        "a b",
        "a\nb",
        "a\x00",
        "a\x1b[31m",
        "a\\b",
        "a{b}",
        "*",
    ],
)
def test_metacharacters_are_rejected_naming_field_and_value(value: str) -> None:
    with pytest.raises(ValidationError) as ei:
        validate_token(value, "vo", VO_RE, 32)
    msg = str(ei.value)
    assert msg.startswith("vo: ") and repr(value)[:20] in msg and "\n" not in msg


def test_token_length_type_and_pattern() -> None:
    with pytest.raises(ValidationError, match=r"vo: value 'aaaa.*\.\.\. is longer than 32"):
        validate_token("a" * 1000, "vo", VO_RE, 32)
    with pytest.raises(ValidationError, match="job_id: expected a string, got int"):
        validate_token(12, "job_id", JOB_ID_RE)
    with pytest.raises(ValidationError, match="empty value"):
        validate_token("", "user", USER_RE)
    with pytest.raises(ValidationError, match="does not match"):
        validate_token("CMS", "vo", VO_RE)
    assert validate_token("cms", "vo", VO_RE) == "cms"
    assert validate_token("schedd.example.org#12.0#1700000000", "job_id", JOB_ID_RE, 128)
    assert validate_token("4711_3", "job_id", r"^[0-9_+]+$")


def test_errors_pickle() -> None:
    with pytest.raises(ValidationError) as ei:
        validate_token("a;b", "vo", VO_RE)
    assert str(pickle.loads(pickle.dumps(ei.value))) == str(ei.value)


# -- resolve_vo ------------------------------------------------------------------------------------------
def test_unix_group_maps_to_vo() -> None:
    assert resolve_vo(JobIdentity(1001, "cms001", "cms"), config()) == "cms"
    assert resolve_vo(JobIdentity(1002, "cmsprd01", "cmsprd"), config()) == "cms"


def test_unknown_group_is_unknown_vo_naming_group() -> None:
    with pytest.raises(UnknownVOError, match="unix_group 'alice' maps to no VO"):
        resolve_vo(JobIdentity(1001, "alice001", "alice"), config())


def test_unenforced_slurm_account_is_ignored() -> None:
    ident = JobIdentity(1001, "bob", None, slurm_account="atlas-acct", account_enforced=False)
    with pytest.raises(IdentityError, match="not enforced"):
        resolve_vo(ident, config())
    enforced = JobIdentity(1001, "bob", None, slurm_account="atlas-acct", account_enforced=True)
    assert resolve_vo(enforced, config()) == "atlas"


def test_sources_are_tried_in_configured_order() -> None:
    ident = JobIdentity(
        1001, "x", "cms", slurm_account="atlas-acct", account_enforced=True, condor_proxy_vo="lhcb"
    )
    assert resolve_vo(ident, config()) == "cms"
    cfg = config().model_copy(update={"identity": IdentityConfig(sources=[IdentitySource.CONDOR_PROXY_VO])})
    assert resolve_vo(ident, cfg) == "lhcb"
    cfg = config().model_copy(update={"identity": IdentityConfig(sources=[IdentitySource.SLURM_ACCOUNT])})
    assert resolve_vo(ident, cfg) == "atlas"


def test_default_config_uses_only_the_unix_group() -> None:
    ident = JobIdentity(
        1001, "x", "nogroup", slurm_account="cms", account_enforced=True, condor_proxy_vo="cms"
    )
    with pytest.raises(UnknownVOError, match="'nogroup'"):
        resolve_vo(ident, default_config())


def test_metacharacters_in_trusted_fields_are_still_rejected() -> None:
    with pytest.raises(ValidationError, match="condor_proxy_vo: value 'cms;id'"):
        resolve_vo(JobIdentity(1, "u", None, condor_proxy_vo="cms;id"), config())
    with pytest.raises(ValidationError, match="user: "):
        resolve_vo(JobIdentity(1, "u<x>", "cms"), config())


def test_no_identity_at_all() -> None:
    with pytest.raises(IdentityError, match="no trusted identity for user 'u' \\(uid 7\\)"):
        resolve_vo(JobIdentity(7, "u"), config())


def test_from_uid_reads_the_system_databases() -> None:
    me = JobIdentity.from_uid(os.getuid())
    assert me.user == pwd.getpwuid(os.getuid()).pw_name and me.unix_group is not None
    with pytest.raises(IdentityError, match="uid 2147483000 has no passwd entry"):
        JobIdentity.from_uid(2147483000)


# -- image_for_vo ----------------------------------------------------------------------------------------
def test_configured_image() -> None:
    assert image_for_vo("cms", CAT, config()).ref == "cms-wn:2026.11.0"
    assert image_for_vo("atlas", CAT, config()).name == "atlas-wn"


def test_requested_image_only_if_it_serves_the_vo() -> None:
    assert image_for_vo("cms", CAT, config(), "cms-wn:testing").name == "cms-wn"
    with pytest.raises(IdentityError, match="does not serve VO 'cms'"):
        image_for_vo("cms", CAT, config(), "atlas-wn")
    with pytest.raises(IdentityError, match="a service image, not a worker image"):
        image_for_vo("cms", CAT, config(), "ce")
    with pytest.raises(UnknownImageError):
        image_for_vo("cms", CAT, config(), "cms-wn:nightly")
    with pytest.raises(ValidationError, match="image: value 'cms-wn;reboot'"):
        image_for_vo("cms", CAT, config(), "cms-wn;reboot")


def test_misconfigured_vo_never_gets_another_vos_image() -> None:
    cfg = config(lhcb=VOConfig(image="cms-wn", groups=["lhcb"]))
    with pytest.raises(IdentityError, match=r"cms-wn.*does not serve VO 'lhcb'"):
        image_for_vo("lhcb", CAT, cfg)


def test_unknown_and_malformed_vo() -> None:
    with pytest.raises(UnknownVOError, match="unknown VO 'alice'"):
        image_for_vo("alice", CAT, config())
    with pytest.raises(ValidationError, match="vo: value '<cms/>'"):
        image_for_vo("<cms/>", CAT, config())


# -- properties ------------------------------------------------------------------------------------------
TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["cms", "atlas", "lhcb", "cms-wn", "ce", "cms-wn:testing", "atlas-wn", "se:stable"]),
)


@settings(max_examples=300, deadline=None)
@given(vo=TEXT, requested=st.one_of(st.none(), TEXT))
def test_image_for_vo_never_crosses_vos(vo: str, requested: str | None) -> None:
    try:
        img = image_for_vo(vo, CAT, config(), requested)
    except DynvmError as err:
        msg = str(err)
        assert "\n" not in msg
        named = [repr(vo)[:30], "vo:", "image:", repr(requested)[:30] if requested else "\0", "image "]
        assert any(n in msg for n in named), msg
        return
    assert img.kind == "worker" and vo in img.vos


@settings(max_examples=300, deadline=None)
@given(
    user=st.one_of(st.sampled_from(["cms001", "bob"]), st.text(max_size=40)),
    group=st.one_of(st.none(), st.sampled_from(["cms", "atlas", "alice"]), st.text(max_size=40)),
    account=st.one_of(st.none(), st.sampled_from(["cms-acct", "x"]), st.text(max_size=80)),
    enforced=st.booleans(),
    proxy=st.one_of(st.none(), st.sampled_from(["lhcb", "cms", "nope"]), st.text(max_size=40)),
)
def test_resolve_vo_yields_a_configured_vo_or_our_error(
    user: str, group: str | None, account: str | None, enforced: bool, proxy: str | None
) -> None:
    cfg = config()
    ident = JobIdentity(1000, user, group, account, enforced, proxy)
    try:
        vo = resolve_vo(ident, cfg)
    except DynvmError as err:
        msg = str(err)
        assert "\n" not in msg
        assert any(f in msg for f in ("user", "unix_group", "slurm_account", "condor_proxy_vo")), msg
        return
    assert vo in cfg.vos
    # The VO came from a trusted value that maps to it, never from an unenforced account.
    assert (
        (group is not None and group in cfg.vos[vo].groups)
        or (enforced and account in cfg.vos[vo].accounts)
        or proxy == vo
    )
