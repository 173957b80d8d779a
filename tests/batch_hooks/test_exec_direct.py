"""`dynvm exec` / the payload path goes straight to the guest's exec channel: no agent, no Celery task, no
time limit, and a (VM, attempt) starts its payload at most once.  Real Redis; the guest is a hand-written
fake speaking the guest side of the serial protocol on a unix socket (the QEMU version is in qemu_e2e)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from provisioner.config import Config, StorageConfig
from provisioner.control.execjob import exec_in_vm
from provisioner.errors import ConflictError, UnavailableError, ValidationError
from provisioner.execchan.client import UNLIMITED_GUEST_S, exec_socket
from provisioner.execchan.frames import chunk_line, exit_line
from provisioner.execchan.once import run_key
from provisioner.model import Instance, InstanceState, Role
from provisioner.runtime import Runtime
from provisioner.state.store import StateStore
from tests.execchan.fakeguest import FakeGuest, Request, result_line

pytestmark = pytest.mark.redis


class Guest(FakeGuest):
    """Answers each request with exit code 3, the script echoed and ``e`` on stderr, in either protocol."""

    def answer(self, conn: socket.socket, reader: BinaryIO, req: Request) -> None:
        if req.tag == "DYNVM-RUN":  # the streaming protocol (provisioner.execchan.frames): same answer
            frames = [chunk_line(req.id, "o", 0, req.script.encode()), chunk_line(req.id, "e", 0, b"e\n"),
                      exit_line(req.id, 3, 1, 1)]
            conn.sendall(b"".join(frames))
            while (line := reader.readline()) and not line.startswith(b"DYNVM-DONE"):
                pass
            return
        conn.sendall(result_line(req.id, 3, req.script.encode(), b"e\n"))


@pytest.fixture()
def rt(redis_url: str, tmp_path: Path) -> Iterator[Runtime]:
    config = Config(redis_url=redis_url, storage=StorageConfig(shared_dir=tmp_path / "shared"))
    store = StateStore.from_url(redis_url)
    yield Runtime(config=config, store=store, catalogue=cast(Any, None))  # app=None: no Celery at all


def ready_vm(rt: Runtime, iid: str = "vm1", host: str = "hv1") -> Instance:
    inst = Instance(id=iid, role=Role.WORKER, image="cms-wn:1", vcpus=1, memory_mib=256,
                    state=InstanceState.READY, host=host, vo="cms")
    created, _ = rt.store.create_instance(inst)
    return created


def test_exec_talks_to_the_guest_directly_without_any_agent_or_app(rt: Runtime) -> None:
    vm = ready_vm(rt)
    guest = Guest(exec_socket(rt.config.storage.shared_dir, vm.id, "hv1"))
    res = exec_in_vm(rt, vm.id, ["echo", "a b"], timeout_s=None)
    assert res["exit_code"] == 3 and res["host"] == "hv1"
    assert res["stdout"] == "exec echo 'a b'\n" and res["stderr"] == "e\n"
    # No limit: the guest's own timeout is the longest busybox takes, not a minute or an hour.
    assert [(r.timeout, r.script) for r in guest.requests] == [(UNLIMITED_GUEST_S, "exec echo 'a b'\n")]
    assert UNLIMITED_GUEST_S >= 30 * 24 * 3600


def test_a_replayed_start_of_the_same_attempt_never_runs_the_payload_twice(rt: Runtime) -> None:
    vm = ready_vm(rt)
    guest = Guest(exec_socket(rt.config.storage.shared_dir, vm.id, "hv1"))
    assert exec_in_vm(rt, vm.id, ["payload"], None, run_token="1")["exit_code"] == 3
    with pytest.raises(ConflictError, match="already started"):
        exec_in_vm(rt, vm.id, ["payload"], None, run_token="1")
    assert len(guest.requests) == 1
    # A new attempt (a requeued job) may start; the token of attempt 1 is still there.
    exec_in_vm(rt, vm.id, ["payload"], None, run_token="2")
    assert len(guest.requests) == 2
    assert rt.store.r.ttl(run_key("dynvm", vm.id, "1")) > 30 * 24 * 3600


def test_concurrent_starts_of_one_attempt_run_exactly_one_payload(rt: Runtime) -> None:
    vm = ready_vm(rt)
    guest = Guest(exec_socket(rt.config.storage.shared_dir, vm.id, "hv1"))
    outcomes: list[str] = []

    def start() -> None:
        try:
            exec_in_vm(rt, vm.id, ["payload"], None, run_token="7")
            outcomes.append("ran")
        except ConflictError:
            outcomes.append("refused")

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["ran"] + ["refused"] * 7
    assert len(guest.requests) == 1


def test_exec_refuses_a_vm_whose_channel_is_not_on_this_machine(rt: Runtime) -> None:
    vm = ready_vm(rt, host="hv9")
    with pytest.raises(UnavailableError, match="run on its host hv9"):
        exec_in_vm(rt, vm.id, ["true"])


@pytest.mark.parametrize("attempt", ["", "a b", "x" * 65, "1;rm", "../1"])
def test_hostile_attempt_is_refused_before_anything_runs(rt: Runtime, attempt: str) -> None:
    vm = ready_vm(rt)
    guest = Guest(exec_socket(rt.config.storage.shared_dir, vm.id, "hv1"))
    with pytest.raises(ValidationError, match="run attempt"):
        exec_in_vm(rt, vm.id, ["true"], None, run_token=attempt)
    assert guest.requests == []


def test_exec_socket_rejects_hostile_ids(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        exec_socket(tmp_path, "../../etc", "hv1")
    with pytest.raises(ValidationError):
        exec_socket(tmp_path, "vm1", "hv1/../x")


def test_the_agent_binds_qemu_to_the_same_socket_path_the_client_uses(rt: Runtime) -> None:
    from provisioner.agent.domain import exec_socket_path

    vm = ready_vm(rt)
    assert exec_socket_path(rt, vm, "hv1") == exec_socket(rt.config.storage.shared_dir, vm.id, "hv1")


def test_no_exec_task_is_served_by_the_agent() -> None:
    from celery import Celery

    from provisioner.agent import tasks

    app = Celery("t", set_as_current=False)
    tasks.register(app)
    assert "dynvm.boot" in app.tasks and "dynvm.exec" not in app.tasks
