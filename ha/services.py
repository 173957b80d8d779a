"""Declared services (the seed's Cfengine "ideal state"): what must run, whatever happens to the hosts.

Truth: Redis, one hash per service (``PREFIX:svc:NAME``) plus the set ``PREFIX:svcs``; the leader
monitor keeps each declared service running (restart in place first, relocate after its limit).  One
name = at most one VM, one MAC (derived from the name), one address: ``declare`` refuses an address
another service already declared.  ``export``/``apply`` round-trip the declarations as YAML for git.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis

from provisioner.catalogue.model import NAME_RE
from provisioner.errors import ConflictError, NotFoundError, ValidationError
from provisioner.model import Tier
from provisioner.state.keys import check_id

PRIORITIES = (Tier.CRITICAL, Tier.HIGH, Tier.NORMAL)
MAX_AFTER = 16
_FIELDS = ("name", "image", "priority", "address", "anti_affinity", "after")

_DECLARE = """
-- KEYS[1] service hash, KEYS[2] services set, KEYS[3] address index hash (address -> name)
-- ARGV: name, address ('' = none), field, value, ...   Returns 'ok' or 'address:<holder>'.
local name, addr = ARGV[1], ARGV[2]
if addr ~= '' then
  local holder = redis.call('HGET', KEYS[3], addr)
  if holder and holder ~= name then return 'address:' .. holder end
end
local old = redis.call('HGET', KEYS[1], 'address')
if old and old ~= '' and old ~= addr then redis.call('HDEL', KEYS[3], old) end
-- a re-declaration replaces the declaration, not the keeper's bookkeeping (its VM, restart times)
local keep = redis.call('HMGET', KEYS[1], 'instance', 'restarts')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if keep[1] then redis.call('HSET', KEYS[1], 'instance', keep[1]) end
if keep[2] then redis.call('HSET', KEYS[1], 'restarts', keep[2]) end
redis.call('SADD', KEYS[2], name)
if addr ~= '' then redis.call('HSET', KEYS[3], addr, name) end
return 'ok'
"""

_REMOVE = """
-- KEYS[1] service hash, KEYS[2] services set, KEYS[3] address index.  Returns 1 if it existed.
local addr = redis.call('HGET', KEYS[1], 'address')
if not addr then return 0 end
if addr ~= '' and redis.call('HGET', KEYS[3], addr) == ARGV[1] then redis.call('HDEL', KEYS[3], addr) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    image: str  # catalogue reference, e.g. "ce:stable"
    priority: Tier = Tier.NORMAL
    address: str | None = None
    anti_affinity: str | None = None
    after: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["priority"] = self.priority.value
        d["after"] = list(self.after)
        return d


def parse_service(raw: Mapping[str, Any], where: str = "service") -> Service:
    """Validate one declaration (from the CLI or a YAML file); errors name ``where`` and the field."""
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValidationError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))[:200]}")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValidationError(f"{where}.name: {str(name)[:64]!r} is not a service name ({NAME_RE.pattern})")
    image = raw.get("image")
    if not isinstance(image, str) or not 0 < len(image) <= 128:
        raise ValidationError(f"{where}.image: give an image reference (NAME[:VERSION|:CHANNEL])")
    from provisioner.catalogue.files import parse_ref

    parse_ref(image)
    prio = raw.get("priority", Tier.NORMAL.value)
    if prio not in {p.value for p in PRIORITIES}:
        raise ValidationError(f"{where}.priority: {str(prio)[:32]!r} is not critical, high or normal")
    address = raw.get("address")
    if address is not None:
        try:
            address = str(ipaddress.IPv4Address(address))
        except (ValueError, TypeError):
            raise ValidationError(f"{where}.address: {str(address)[:64]!r} is not an IPv4 address") from None
    group = raw.get("anti_affinity")
    if group is not None and (not isinstance(group, str) or not NAME_RE.match(group)):
        raise ValidationError(f"{where}.anti_affinity: {str(group)[:64]!r} is not a group name")
    after = raw.get("after") or []
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or len(after) > MAX_AFTER:
        raise ValidationError(f"{where}.after: a list of at most {MAX_AFTER} service names")
    for a in after:
        if not isinstance(a, str) or not NAME_RE.match(a) or a == name:
            raise ValidationError(f"{where}.after: {str(a)[:64]!r} is not another service's name")
    return Service(name, image, Tier(prio), address, group, tuple(dict.fromkeys(after)))


class ServiceStore:
    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r = r
        self.prefix = check_id(prefix, "key prefix")
        self.all_key = f"{prefix}:svcs"
        self.addr_key = f"{prefix}:svcaddr"
        self._declare = r.register_script(_DECLARE)
        self._remove = r.register_script(_REMOVE)

    def key(self, name: str) -> str:
        return f"{self.prefix}:svc:{check_id(name, 'service name')}"

    def declare(self, svc: Service) -> None:
        """Create or replace a declaration; ConflictError if its address belongs to another service."""
        args: list[Any] = [svc.name, svc.address or ""]
        for k, v in svc.to_dict().items():
            args += [k, ",".join(v) if isinstance(v, list) else ("" if v is None else v)]
        out = self._declare(keys=[self.key(svc.name), self.all_key, self.addr_key], args=args)
        if out != "ok":
            holder = str(out).split(":", 1)[1]
            raise ConflictError(f"service {svc.name}: address {svc.address} is declared by {holder}")

    def get(self, name: str) -> Service | None:
        raw = cast(dict[str, str], self.r.hgetall(self.key(name)))
        if not raw:
            return None
        return Service(
            raw["name"],
            raw["image"],
            Tier(raw["priority"]),
            raw.get("address") or None,
            raw.get("anti_affinity") or None,
            tuple(a for a in raw.get("after", "").split(",") if a),
        )

    def require(self, name: str) -> Service:
        svc = self.get(name)
        if svc is None:
            raise NotFoundError(f"service {name!r} is not declared")
        return svc

    def all(self) -> list[Service]:
        names = sorted(cast(set[str], self.r.smembers(self.all_key)))
        return [s for s in (self.get(n) for n in names) if s is not None]

    def current_instance(self, name: str) -> str | None:
        """The instance the keeper last started for the service (its VM, wherever failover moved it)."""
        value = self.r.hget(self.key(name), "instance")
        return str(value) if value else None

    def restarts(self, name: str) -> list[float]:
        raw = self.r.hget(self.key(name), "restarts")
        return [float(t) for t in str(raw).split(",") if t] if raw else []

    def set_current(self, name: str, instance_id: str, restarted: bool) -> None:
        """Remember the service's VM; a restart in place also counts towards its restart limit (the last
        20 restart times are kept, enough for any window the limit uses)."""
        fields: dict[str, str] = {"instance": check_id(instance_id, "instance id")}
        if restarted:
            sec, usec = self.r.time()
            fields["restarts"] = ",".join([*map(str, self.restarts(name)[-19:]), f"{sec + usec / 1e6:.3f}"])
        self.r.hset(self.key(name), mapping=cast(Any, fields))

    def remove(self, name: str) -> bool:
        return bool(self._remove(keys=[self.key(name), self.all_key, self.addr_key], args=[name]))

    def apply(self, services: Iterable[Service], prune: bool = False) -> tuple[list[str], list[str]]:
        """Declare every service of a file; with ``prune`` remove the ones it does not name.
        Checked as a whole first (unique names and addresses, known ``after`` targets)."""
        svcs = list(services)
        check_set(svcs, known=set() if prune else {s.name for s in self.all()})
        for s in svcs:
            self.declare(s)
        removed: list[str] = []
        if prune:
            wanted = {s.name for s in svcs}
            removed = [s.name for s in self.all() if s.name not in wanted and self.remove(s.name)]
        return [s.name for s in svcs], removed


def check_set(services: list[Service], known: set[str] | None = None) -> None:
    """A set of declarations is consistent: unique names and addresses, ``after`` names a service."""
    names: dict[str, int] = {}
    addrs: dict[str, str] = {}
    for i, s in enumerate(services):
        if s.name in names:
            first = names[s.name]
            raise ValidationError(f"services[{i}].name: {s.name} is declared twice (first at [{first}])")
        names[s.name] = i
        if s.address is not None:
            if s.address in addrs:
                raise ValidationError(f"services[{i}].address: {s.address} is also {addrs[s.address]}'s")
            addrs[s.address] = s.name
    for i, s in enumerate(services):
        for a in s.after:
            if a not in names and a not in (known or set()):
                raise ValidationError(f"services[{i}].after: unknown service {a!r}")
