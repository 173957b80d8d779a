"""Host and Instance records <-> Redis hash fields (flat strings; ``None`` is an absent field)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from provisioner.errors import ValidationError
from provisioner.model import Capacity, Host, HostState, Instance, InstanceState, Role, Tier

INSTANCE_FIELDS = frozenset(f.name for f in dataclasses.fields(Instance))
_INT_FIELDS = frozenset({"vcpus", "memory_mib", "attempts", "epoch"})
_FLOAT_FIELDS = frozenset({"created", "updated"})
_ENUMS: dict[str, type[Any]] = {"role": Role, "state": InstanceState, "tier": Tier}
# Fields only the store itself changes: the state moves through transition(), never a plain update, and
# the placement epoch only ever goes up inside update_instance.lua.
_PROTECTED = frozenset({"id", "state", "role", "epoch"})


def encode_value(value: object) -> str:
    if hasattr(value, "value") and isinstance(value.value, str):  # enums
        return str(value.value)
    return str(value)


def instance_to_fields(inst: Instance) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in INSTANCE_FIELDS:
        value = getattr(inst, name)
        if value is not None:
            out[name] = encode_value(value)
    return out


def instance_from_fields(h: dict[str, str]) -> Instance:
    kw: dict[str, Any] = {}
    for name, raw in h.items():
        if name not in INSTANCE_FIELDS:
            continue  # a field written by a newer version: ignore rather than fail the read
        if name in _INT_FIELDS:
            kw[name] = int(raw)
        elif name in _FLOAT_FIELDS:
            kw[name] = float(raw)
        elif name in _ENUMS:
            kw[name] = _ENUMS[name](raw)
        else:
            kw[name] = raw
    return Instance(**kw)


def update_fields(iid: str, fields: dict[str, object]) -> tuple[dict[str, str], list[str]]:
    """Split keyword updates into fields to set and fields to delete (value None), checking names."""
    to_set: dict[str, str] = {}
    to_del: list[str] = []
    for name, value in fields.items():
        if name not in INSTANCE_FIELDS or name in _PROTECTED:
            raise ValidationError(f"instance {iid}: field {name!r} cannot be updated")
        if value is None:
            to_del.append(name)
        else:
            if name == "host":
                from provisioner.state.keys import check_id

                check_id(value, "host name")
            to_set[name] = encode_value(value)
    return to_set, to_del


def host_to_fields(host: Host) -> dict[str, str]:
    """The fields an agent's registration refreshes (state, usage and epoch are the store's own)."""
    return {
        "name": host.name,
        "uri": host.uri,
        "cap_vcpus": str(host.capacity.vcpus),
        "cap_memory_mib": str(host.capacity.memory_mib),
        "cap_disk_gib": str(host.capacity.disk_gib),
        "labels": json.dumps(host.labels, sort_keys=True),
        "detection_class": host.detection_class,
        "last_seen": repr(float(host.last_seen)),
    }


def host_from_fields(h: dict[str, str]) -> Host:
    return Host(
        name=h["name"],
        uri=h.get("uri", ""),
        state=HostState(h.get("state", HostState.UP.value)),
        capacity=Capacity(
            int(h.get("cap_vcpus", 0)), int(h.get("cap_memory_mib", 0)), int(h.get("cap_disk_gib", 0))
        ),
        used_vcpus=int(h.get("used_vcpus", 0)),
        used_memory_mib=int(h.get("used_memory_mib", 0)),
        labels=json.loads(h.get("labels", "{}")),
        detection_class=h.get("detection_class", "standard"),
        last_seen=float(h.get("last_seen", 0.0)),
        watched_since=float(h.get("watched_since", 0.0)),
        epoch=int(h.get("epoch", 0)),
    )
