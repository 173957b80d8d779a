"""Every bad input is a one-line answer with a documented exit code, never an internal error (issue 11).

Commands run in-process through main(argv) against a real private Redis (a database of the session server
of its own, flushed per test); nothing here needs agents or workers, because each bad input must be refused
before anything acts on it.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from provisioner.cli.main import main
from tests.catalogue.helpers import make_catalogue, write_config

pytestmark = pytest.mark.redis

DB = 11  # a database of the session Redis no other test uses


@pytest.fixture
def db_url(redis_server: str) -> Iterator[str]:
    url = redis_server.rsplit("/", 1)[0] + f"/{DB}"
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield url
    r.flushdb()


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str) -> Path:
    """DYNVM_CONFIG -> a config on the private Redis database; returns the config file."""
    cat, root = make_catalogue(tmp_path)
    cfg = write_config(tmp_path, cat, root, extra=f"redis_url: {db_url}\n")
    monkeypatch.setenv("DYNVM_CONFIG", str(cfg))
    monkeypatch.setenv("DYNVM_FARM_DIR", str(tmp_path / "farm"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return cfg


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert "internal error" not in lines[0] and "Traceback" not in lines[0], err
    return lines[0]


def nothing_written(url: str) -> bool:
    """No instance, no event, no host: the refused command did not act."""
    return redis.Redis.from_url(url).dbsize() == 0


# -- numbers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["events", "-n", "0"], "-n/--count: 0 is out of range"),
        (["events", "-n", "-1"], "-n/--count: -1 is out of range"),
        (["events", "-n", "99999999999999999999"], "is out of range (1..100000)"),
        (["events", "-n", "ten"], "'ten' is not an integer"),
        (["vm", "provision", "--vo", "cms", "--timeout", "nan"], "--timeout: 'nan' is not a finite number"),
        (["vm", "provision", "--vo", "cms", "--timeout", "inf"], "--timeout: 'inf' is not a finite number"),
        (["vm", "provision", "--vo", "cms", "--timeout", "-1"], "--timeout: '-1' seconds is out of range"),
        (["vm", "provision", "--vo", "cms", "--vcpus", "0"], "--vcpus: 0 is out of range"),
        (["vm", "provision", "--vo", "cms", "--memory", "-5"], "--memory: -5 is out of range"),
        (["vm", "migrate", "x", "--timeout", "nan"], "--timeout"),
        (["vm", "recover", "x", "--timeout", "1e999"], "--timeout"),
        (["vm", "release", "x", "--timeout", "-0.5"], "--timeout"),
        (["host", "drain", "hv1", "--timeout", "nan"], "--timeout"),
        (["exec", "--timeout", "-1", "x", "--", "true"], "--timeout"),
        (["exec", "--timeout", "nan", "x", "--", "true"], "--timeout"),
        (["worker", "--concurrency", "-3"], "--concurrency: -3 is out of range (1..256)"),
        (["worker", "--concurrency", "0"], "--concurrency: 0 is out of range"),
        (["agent", "--host", "hv1", "--concurrency", "-1"], "--concurrency: -1 is out of range"),
        (["demo", "--per-vo", "0"], "--per-vo: 0 is out of range (1..20)"),
        (["demo", "--per-vo", "100000000000"], "--per-vo: 100000000000 is out of range"),
        (["demo", "--timeout", "nan"], "--timeout"),
        (["demo", "--dir", ""], "--dir: empty path"),
        (["--config", "", "vo", "list"], "--config must not be empty"),
        (["vo", "list", "--config", ""], "--config must not be empty"),
    ],
)
def test_bad_numbers_are_usage_errors_before_anything_acts(
    live: Path, db_url: str, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and fragment in one_line(err), err
    assert nothing_written(db_url)
    assert not (live.parent / "farm").exists()  # demo never brought a farm up for a refused argument


def test_agent_with_a_bad_argument_does_not_start(
    live: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `agent --concurrency -1` registered the host and ran its start-up reconcile (destroying
    domains), then failed with an internal error."""
    cfg = live.read_text() + "hosts:\n  - {name: hv1, uri: 'test:///default'}\n"
    live.write_text(cfg)
    rc, _, err = run(capsys, "agent", "--host", "hv1", "--concurrency", "-1")
    assert rc == 2 and "--concurrency" in one_line(err)
    assert nothing_written(db_url)


# -- configuration -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("timeouts:\n  visibility_s: .inf\n", "timeouts.visibility_s: Input should be a finite number"),
        ("timeouts:\n  provision_s: .nan\n", "timeouts.provision_s: Input should be a finite number"),
        ("scheduler:\n  cpu_overcommit: .nan\n", "scheduler.cpu_overcommit: Input should be a finite number"),
        ("timeouts:\n  visibility_s: 1e300\n", "timeouts.visibility_s: Input should be less than or equal"),
    ],
)
def test_non_finite_and_absurd_config_numbers(
    live: Path, capsys: pytest.CaptureFixture[str], extra: str, fragment: str
) -> None:
    live.write_text(live.read_text() + extra)
    rc, _, err = run(capsys, "host", "list")
    assert rc == 2 and fragment in one_line(err), err


def test_redis_database_out_of_range(live: Path, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = db_url.rsplit("/", 1)[0] + "/99999"
    live.write_text(live.read_text().replace(db_url, bad))
    for argv in (["host", "list"], ["worker"], ["events"]):
        rc, _, err = run(capsys, *argv)
        line = one_line(err)
        assert rc == 2 and "redis_url" in line and "DB index is out of range" in line, argv


@pytest.fixture
def not_redis() -> Iterator[str]:
    """A TCP server that answers like a web server: the URL of something that is not Redis."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"redis://127.0.0.1:{srv.getsockname()[1]}/0"
    stop.set()
    t.join(5)
    srv.close()


def test_redis_url_pointing_at_something_else(
    live: Path, db_url: str, not_redis: str, capsys: pytest.CaptureFixture[str]
) -> None:
    live.write_text(live.read_text().replace(db_url, not_redis))
    for argv in (["host", "list"], ["worker"]):
        rc, _, err = run(capsys, *argv)
        assert rc == 5 and "does not speak the Redis protocol" in one_line(err), argv


def test_password_is_not_printed_in_errors(
    live: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    live.write_text(live.read_text().replace(db_url, "redis://:s3cretpw@127.0.0.1:1/0"))
    for argv in (["status"], ["worker"], ["host", "list"]):
        rc, out, err = run(capsys, *argv)
        assert rc == 5 and "s3cretpw" not in out + err and ":***@127.0.0.1" in one_line(err), argv


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[str]:
    import shutil
    import subprocess

    from tests.conftest import free_port, wait_until

    exe = shutil.which("redis-server")
    assert exe is not None
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            "s3cretpw",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, password="s3cretpw")

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False

    try:
        wait_until(up, 10, what="redis with a password")
        yield f"redis://:s3cretpw@127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_status_redacts_the_redis_password(
    live: Path, db_url: str, redis_with_password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    live.write_text(live.read_text().replace(db_url, redis_with_password))
    for argv in (["status"], ["-o", "json", "status"]):
        rc, out, err = run(capsys, *argv)
        assert rc == 0, err
        assert "s3cretpw" not in out + err and ":***@127.0.0.1" in out


# -- echoed values, foreign files, FIFOs -------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["vm", "show", "a" * 100_000],
        ["host", "show", "h" * 100_000],
        ["vm", "list", "--state", "s" * 100_000],
        ["vo", "resolve", "v" * 100_000],
        ["image", "show", "i" * 100_000],
        ["-o", "json", "vm", "release", "r" * 100_000],
    ],
)
def test_echoed_values_are_cut(live: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    rc, _, err = run(capsys, *argv)
    line = one_line(err)
    assert rc in (2, 3) and len(line) < 1100, len(line)


def test_config_error_does_not_echo_a_foreign_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$y$j9T$SALTSALT$HASHHASHHASH:20228:0:99999:7:::\nbin:*:20228:0:99999:7:::\n")
    rc, _, err = run(capsys, "--config", str(shadow), "image", "list")
    line = one_line(err)
    assert rc == 2 and "HASHHASH" not in line and "bin" not in line and "<unrecognised key>" in line


def _in_thread(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(main(list(argv))), daemon=True)
    t.start()
    t.join(20)
    assert box, f"dynvm {' '.join(argv)} blocked"
    return box[0], capsys.readouterr().err


def test_fifos_are_refused_without_blocking(
    live: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    rc, err = _in_thread(capsys, "--config", str(fifo), "vo", "list")
    assert rc == 2 and "not a regular file (a FIFO)" in one_line(err)
    rc, err = _in_thread(capsys, "image", "add", str(fifo))
    assert rc == 2 and "not a regular file (a FIFO)" in one_line(err)
    os.mkfifo(tmp_path / "catalogue" / "zz-evil.yaml")
    rc, err = _in_thread(capsys, "image", "list")
    assert "not a regular file (a FIFO)" in err  # reported (as an error or a warning), never a hang


# -- provisioning arguments --------------------------------------------------------------------------------
def test_vo_mapped_to_a_missing_image_names_the_setting(
    live: Path, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    live.write_text(live.read_text().replace("cms: {image: cms-wn", "cms: {image: nosuch"))
    rc, _, err = run(capsys, "vm", "provision", "--vo", "cms")
    line = one_line(err)
    assert rc == 3 and "vos.cms.image" in line and str(live) in line and "'nosuch'" in line
    assert nothing_written(db_url)


@pytest.mark.parametrize(
    "extra", [["--ip", "10.0.0.5"], ["--name", "wn-1"], ["--name", "wn-1", "--ip", "10.0.0.5"]]
)
def test_service_options_on_a_worker_image_are_refused(
    live: Path, db_url: str, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    rc, _, err = run(capsys, "vm", "provision", "--vo", "cms", *extra)
    line = one_line(err)
    assert rc == 2 and "apply to service images only" in line and "worker image" in line
    assert nothing_written(db_url)


def test_error_line_cutting_keeps_paths_whole_and_both_ends_of_a_long_value() -> None:
    from provisioner.cli.output import _one_line

    path = "/tmp/pytest-of-root/pytest-123/test_validate_reports_every_bad0/catalogue/cms-wn.yaml:17:"
    assert _one_line(f"{path} versions[0]: bad") == f"{path} versions[0]: bad"
    cut = _one_line("vm " + "a" * 100_000 + "Z not found")
    assert cut.startswith("vm aaa") and "...(100001 chars)..." in cut and cut.endswith("aZ not found")
    assert len(cut) < 250 and len(_one_line("x " * 100_000)) <= 1000
