"""A new farm starts from clean state; --keep-state keeps it and retires hosts of the old layout;
`dynvm host remove` refuses while a host holds VMs or its agent runs."""

from __future__ import annotations

import pytest

from provisioner.cli.main import main
from provisioner.configload import load_config
from provisioner.control.client import choose_image, client_runtime, submit, wait
from provisioner.errors import ConflictError
from provisioner.farm.layout import FarmLayout
from provisioner.farm.local import farm_down
from provisioner.model import Capacity, Host, HostState, InstanceState
from provisioner.runtime import Runtime
from provisioner.state.store import StateStore
from tests.farm.conftest import up


def _rt(layout: FarmLayout) -> Runtime:
    return client_runtime(load_config(layout.config_file))


def _fill_hosts(layout: FarmLayout, n: int) -> dict[str, str]:
    """One VM per host (each VM takes all 4 vCPUs of a host); returns host -> instance id."""
    rt = _rt(layout)
    image, vo = choose_image(rt, None, "cms")
    placed: dict[str, str] = {}
    for _ in range(n):
        inst, _ = submit(rt, image, vo, vcpus=4)
        done = wait(rt, inst.id, 30)
        assert done.state is InstanceState.READY and done.host is not None, done
        placed[done.host] = inst.id
    assert len(placed) == n
    return placed


def test_new_farm_starts_clean(layout: FarmLayout) -> None:
    up(layout, 3)
    _fill_hosts(layout, 1)
    farm_down(layout)
    up(layout, 2)
    rt = _rt(layout)
    assert [h.name for h in rt.store.list_hosts()] == ["hv1", "hv2"]
    assert rt.store.list_instances() == []


def test_keep_state_retires_old_hosts(layout: FarmLayout, capsys: pytest.CaptureFixture[str]) -> None:
    up(layout, 3)
    placed = _fill_hosts(layout, 3)
    farm_down(layout)
    up(layout, 1, keep_state=True)
    st = layout.read_state()
    assert st is not None and sorted(st.retired) == ["hv2", "hv3"]
    assert all(v.startswith("maintenance") for v in st.retired.values()), st.retired
    rt = _rt(layout)
    assert {h.name: h.state for h in rt.store.list_hosts()} == {
        "hv1": HostState.UP, "hv2": HostState.MAINTENANCE, "hv3": HostState.MAINTENANCE
    }
    assert rt.store.get_instance(placed["hv2"]) is not None  # the kept state is really kept
    cfg = ["--config", str(layout.config_file)]
    capsys.readouterr()
    assert main([*cfg, "host", "remove", "hv2"]) == 4  # holds a VM
    err = capsys.readouterr().err
    assert placed["hv2"] in err and "--force" in err and err.strip().count("\n") == 0, err
    assert main([*cfg, "host", "remove", "hv1"]) == 4  # its agent holds the lease
    assert "agent" in capsys.readouterr().err
    assert main([*cfg, "host", "remove", "hv2", "--force"]) == 0
    assert rt.store.get_host("hv2") is None
    assert main([*cfg, "host", "remove", "nosuch"]) == 3


def test_keep_state_removes_idle_old_hosts(layout: FarmLayout) -> None:
    up(layout, 2)
    farm_down(layout)
    up(layout, 1, keep_state=True)
    st = layout.read_state()
    assert st is not None and list(st.retired) == ["hv2"] and st.retired["hv2"].startswith("removed")
    assert [h.name for h in _rt(layout).store.list_hosts()] == ["hv1"]


def test_remove_host_if_idle_is_checked_in_redis(redis_url: str) -> None:
    store = StateStore.from_url(redis_url)
    store.register_host(Host(name="hx", uri="test:///default", capacity=Capacity(4, 4096)))
    store.renew_lease("hx", "tok", 30)
    assert store.claim("hx", "vm-1", 1, 256)
    with pytest.raises(ConflictError, match="vm-1"):
        store.remove_host("hx", if_idle=True)
    assert store.get_host("hx") is not None
    assert store.release_claim("hx", "vm-1")
    store.remove_host("hx", if_idle=True)
    assert store.get_host("hx") is None and store.list_hosts() == []
