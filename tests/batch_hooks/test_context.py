"""The hook contract's validation: every job-supplied value is refused cleanly before it reaches a key,
a log line or a shell (table tests, no services)."""

from __future__ import annotations

import pytest

from batch_hooks.context import JobContext, job_key
from batch_hooks.slurm import context_from_env, parse_memory, parse_walltime
from provisioner.errors import ValidationError
from provisioner.state.keys import ID_RE

GOOD = {"batch": "slurm", "cluster": "c1", "job_id": "123", "attempt": 0, "user": "cms001", "uid": 1001,
        "gid": 1001}


@pytest.mark.parametrize("field, value", [
    ("job_id", "1;reboot"), ("job_id", "1 2"), ("job_id", "$(id)"), ("job_id", "x" * 129), ("job_id", ""),
    ("job_id", "1:2"), ("cluster", "a/b"), ("cluster", "-x"), ("user", "Root"), ("user", "a\nb"),
    ("uid", -1), ("uid", "12a"), ("uid", True), ("attempt", 10**7), ("cpus", 0), ("cpus", 10**6),
    ("memory_mib", -5), ("walltime_s", 0), ("partition", "p q"), ("node", "n1,n2"), ("batch", "torque"),
])
def test_hostile_values_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field.split("_")[0]):
        JobContext.from_dict({**GOOD, field: value})


def test_unknown_or_missing_fields_are_validation_errors() -> None:
    with pytest.raises(ValidationError, match="unknown field 'vo'"):
        JobContext.from_dict({**GOOD, "vo": "atlas"})  # the VO is never a job field
    with pytest.raises(ValidationError):
        JobContext.from_dict({"batch": "slurm"})
    with pytest.raises(ValidationError):
        JobContext.from_dict(["not", "a", "dict"])


def test_job_keys_are_valid_ids_and_distinct_per_attempt_and_kind_of_id() -> None:
    keys = {job_key("c", j, a) for j in ("123", "123_1", "123+1", "123.0", "x@y") for a in (0, 1)}
    assert len(keys) == 10 and all(ID_RE.fullmatch(k) for k in keys)


@pytest.mark.parametrize("text, mib", [("0", None), ("2000M", 2000), ("4G", 4096), ("1T", 1024 * 1024),
                                       ("2048", 2048), ("512K", None)])
def test_squeue_memory(text: str, mib: int | None) -> None:
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text, secs", [("UNLIMITED", None), ("30:00", 1800), ("1:00:00", 3600),
                                        ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5)])
def test_squeue_walltime(text: str, secs: int | None) -> None:
    assert parse_walltime(text) == secs


@pytest.mark.parametrize("text", ["4GB", "-1", "1e9M", "$(reboot)", "9" * 20])
def test_hostile_squeue_memory_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="memory"):
        parse_memory(text)


@pytest.mark.parametrize("text", ["1-", "a:b", "99999-00:00:00", "1:2:3:4", "30:00|x"])
def test_hostile_squeue_walltime_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="time limit"):
        parse_walltime(text)


def test_slurm_env_ignores_comment_constraint_and_account() -> None:
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_USER": "cms001", "SLURM_JOB_UID": "1001", "SLURM_JOB_GID": "1001",
           "SLURM_CLUSTER_NAME": "c", "SLURM_JOB_RESTART_COUNT": "2", "SLURM_JOB_CPUS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_COMMENT": "vo=atlas", "SLURM_JOB_ACCOUNT": "atlas",
           "SLURM_JOB_CONSTRAINTS": "atlas"}
    ctx = context_from_env(env, with_limits=False)
    assert (ctx.attempt, ctx.cpus, ctx.node, ctx.uid) == (2, 4, None, 1001)
    assert "atlas" not in repr(ctx)
    with pytest.raises(ValidationError, match="SLURM_JOB_UID"):
        context_from_env({**env, "SLURM_JOB_UID": "0x3e9"}, with_limits=False)
