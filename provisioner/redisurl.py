"""Where Redis is: a plain URL, or Sentinel (a list of sentinels and the name of the service they watch).

One configuration value, ``redis_url``, serves the state store and the Celery broker alike:

- ``redis://[user:password@]host:port/db`` (``rediss://``, ``unix://`` too): one server.
- ``sentinel://[user:password@]host[:port][,host[:port]...]/service[/db][?sentinel_password=...]``: ask the
  sentinels which server is the master of ``service`` and follow it through failovers.  ``user:password``
  authenticate to the Redis servers; ``sentinel_password`` (optional) to the sentinels themselves.

Passwords never appear in messages: ``redact`` hides both kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

from provisioner.errors import ValidationError

SCHEMES = ("redis", "rediss", "unix", "sentinel")
_HOSTPORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9.-]+))(?::([0-9]{1,5}))?$")
SENTINEL_PORT = 26379
_SERVICE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SECRET_PARAMS = ("sentinel_password", "password")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def redact(url: str) -> str:
    """The URL without its passwords (user info and secret query parameters), for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable redis url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}" if ":" in userinfo else netloc
    query = "&".join(
        f"{k}=***" if k in _SECRET_PARAMS else kv
        for kv in parts.query.split("&")
        if kv
        for k in [kv.split("=", 1)[0]]
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def check_url(url: str) -> None:
    """Raise ValidationError (naming the redacted URL) unless ``url`` is a usable Redis location."""
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        raise ValidationError(f"redis url {redact(url)!r}: scheme must be one of {', '.join(SCHEMES)}")
    if scheme == "sentinel":
        parse_sentinel(url)


def parse_sentinel(url: str) -> SentinelTarget:
    """``sentinel://[user:pw@]h1:p1[,h2:p2...]/service[/db][?sentinel_password=...]``."""
    shown = redact(url)
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    sentinels = []
    for item in netloc.split(","):
        m = _HOSTPORT.match(item.strip())
        port = int(m.group(3) or SENTINEL_PORT) if m is not None else 0
        if m is None or not 0 < port < 65536:
            raise ValidationError(f"redis url {shown!r}: sentinel {item.strip()!r} is not host[:port]")
        sentinels.append((m.group(1) or m.group(2), port))
    segments = [s for s in path.split("/") if s]
    if not segments or not _SERVICE.match(segments[0]) or len(segments) > 2:
        raise ValidationError(
            f"redis url {shown!r}: give the service name: sentinel://HOST:PORT,.../SERVICE[/DB]"
        )
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValidationError(f"redis url {shown!r}: database {segments[1]!r} is not a number")
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"sentinel_password"})
    if unknown:
        raise ValidationError(f"redis url {shown!r}: unknown parameter(s) {', '.join(unknown)}")
    spw = params.get("sentinel_password", [None])[0] or None
    db = int(segments[1]) if len(segments) == 2 else 0
    return SentinelTarget(tuple(sentinels), segments[0], db, username, password, spw)


def broker_settings(url: str) -> tuple[str, dict[str, object]]:
    """Celery's broker URL and the transport options it needs for ``url`` (kombu's Sentinel transport takes
    ``sentinel://`` URLs joined by ``;`` and the service as ``master_name``)."""
    if scheme_of(url) != "sentinel":
        return url, {}
    t = parse_sentinel(url)
    auth = ""
    if t.password is not None or t.username is not None:
        auth = f"{quote(t.username or '', safe='')}:{quote(t.password or '', safe='')}@"
    hosts = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in t.sentinels]
    broker = ";".join(f"sentinel://{auth}{hp}/{t.db}" for hp in hosts)
    options: dict[str, object] = {"master_name": t.service}
    if t.sentinel_password is not None:
        options["sentinel_kwargs"] = {"password": t.sentinel_password}
    return broker, options
