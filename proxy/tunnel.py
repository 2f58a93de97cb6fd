"""What the handler knows about one request (`Attempt`) and one open tunnel (`Tunnel`)."""

from __future__ import annotations

import time

from gevent import socket

from policy import Host
from proxy.dial import Address
from proxy.observe import UNAUTHENTICATED
from proxy.pump import Traffic, abort


class Tunnel:
    """An open tunnel: enough to re-judge it under a new policy and to close it.

    It holds the identity's name, not the Identity: a tunnel must not keep an old
    policy snapshot alive after a reload.
    """

    __slots__ = (
        "identity", "key", "host", "port", "address", "sni", "tls", "client", "upstream",
        "traffic", "started", "ended_by", "counted_up", "counted_down", "slot", "first",
    )

    def __init__(self, identity: str, key: str, host: Host, port: int, address: Address,
                 client: socket.socket, upstream: socket.socket, slot: bool) -> None:
        self.identity = identity
        self.key = key  # kept only to re-authenticate on reload; never logged (see __repr__)
        self.host = host
        self.port = port
        self.address = address
        self.sni: str | None = None
        self.tls = True
        self.client = client
        self.upstream = upstream
        self.traffic = Traffic()
        self.started = time.monotonic()
        self.ended_by = "closed"
        self.counted_up = 0
        self.counted_down = 0
        self.slot = slot
        self.first = b""  # client bytes peeked before the tunnel opened, sent first

    def __repr__(self) -> str:
        return f"<Tunnel {self.identity} -> {self.host.name}:{self.port}>"

    @property
    def destination(self) -> str:
        return _destination(self.host, self.port)

    def close(self, why: str) -> None:
        self.ended_by = why
        abort(self.client, self.upstream)


def _destination(host: Host | None, port: int) -> str:
    if host is None:
        return ""
    if host.ip is not None and host.ip.version == 6:
        return f"[{host.name}]:{port}"
    return f"{host.name}:{port}"


class Attempt:
    """What one request has established so far, for its decision record."""

    __slots__ = ("client", "method", "identity", "host", "port", "address", "sni", "rule", "status", "reason")

    def __init__(self, client: str) -> None:
        self.client = client
        self.method = ""
        self.identity = UNAUTHENTICATED
        self.host: Host | None = None
        self.port = 0
        self.address: Address | None = None
        self.sni: str | None = None
        self.rule: str | None = None
        self.status = "allowed"
        self.reason = ""

    @property
    def destination(self) -> str:
        return _destination(self.host, self.port)
