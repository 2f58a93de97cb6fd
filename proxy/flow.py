"""`Flow`: one request's way through the proxy, from its head to its last byte.

One record per request (a CONNECT tunnel, or one plain-HTTP exchange on a kept-alive
client connection), filled in as the request lives: what was asked, what the policy
said, and once admitted, the sockets and byte counts. It is what the decision log line
and the `tunnel closed` / `forwarded` lines are written from, what revocation re-judges
after a reload, and what draining closes.

It holds names and texts, never the Identity or the Policy: an open tunnel must not
keep an old policy snapshot alive after a reload.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any

from policy import Host, Question, Status, Verdict
from policy.addresses import IPAddress as Address
from policy.addresses import IPv6Address

UNAUTHENTICATED = "-"  # the identity of a request before (or without) authentication
_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__

# Connection ids: a per-process prefix (so two replicas' or two runs' ids differ) and a
# counter, e.g. "3fa9c1-17": short to read and to grep, unique within the logs of a fleet.
_PREFIX = os.urandom(3).hex() + "-"
_serial = itertools.count(1)


def connection_id() -> str:
    """A new client connection's id (the `conn` field of its log lines)."""
    return _PREFIX + str(next(_serial))


class Flow:
    """What one request has established so far, and its traffic once admitted."""

    __slots__ = (
        # the request
        "conn", "client", "listener", "certificate", "method", "key", "host", "port", "destination", "http",
        # the decision so far
        "identity", "auth", "status", "reason", "rule", "address", "tls", "sni", "established", "verdict",
        # once admitted
        "client_stream", "upstream", "slot", "started", "up", "down", "last", "idle",
        "counted_up", "counted_down", "ended_by",
        # time limits (proxy/deadlines.py)
        "deadline", "seen", "quiet_since",
    )

    def __init__(self, client: str, conn: str = "", listener: str = "plain", certificate: tuple[str, ...] = ()) -> None:
        self.conn = conn or connection_id()  # the client connection's id in every line about it
        self.client = client  # "address:port" of the client, as logged
        self.listener = listener  # "plain" or "tls": which listener the client came in by
        self.certificate = certificate  # the entries of its verified client certificate (policy/certificates.py)
        self.method = ""
        self.key: str | None = None  # kept only to re-authenticate on reload; never logged (see __repr__)
        self.host: Host | None = None
        self.port = 0
        self.destination = ""  # host:port as logged ([v6]:port), set with them by target()
        self.http = False  # a plain-HTTP exchange rather than a CONNECT tunnel
        self.identity = UNAUTHENTICATED
        self.auth: str | None = None  # how the identity was proven: "api_key" or "certificate"
        self.status: str = Status.ALLOWED
        self.reason = ""
        self.rule: str | None = None
        self.address: Address | None = None  # the address dialled
        self.tls: bool | None = None  # did the client's first bytes start TLS (None: not seen yet)
        self.sni: str | None = None
        self.established = False  # the 200 (or the request head) went out
        # The policy's verdict on the facts before the first bytes, while the request is
        # being judged (later checks continue from it); dropped once it is let through,
        # since it holds the Identity, and so the policy snapshot.
        self.verdict: Verdict | None = None
        self.client_stream: Any = None  # proxy.stream.Stream
        self.upstream: Any = None  # proxy.stream.Stream, once dialled
        self.slot = False  # holds one of its identity's max_tunnels
        self.started = time.monotonic()
        self.up = 0  # bytes client -> destination
        self.down = 0  # bytes destination -> client
        self.last = self.started  # time of the last byte either way
        self.idle = False  # ended by IDLE_TIMEOUT
        self.counted_up = 0  # bytes already added to the metrics
        self.counted_down = 0
        self.ended_by = "closed"
        self.deadline = 0.0  # when the current phase must end (0: none armed)
        self.seen = 0  # bytes either way at the last idleness sweep
        self.quiet_since = self.started  # ...and since when that count has not moved

    def __repr__(self) -> str:
        return f"<Flow {self.identity} -> {self.destination}>"

    def target(self, host: Host, port: int) -> None:
        """What the request asks for: `host` at `port` (and its text, `destination`)."""
        self.host, self.port = host, port
        self.destination = f"[{host.name}]:{port}" if type(host.ip) is IPv6Address else f"{host.name}:{port}"

    def question(self, addresses: tuple[Address, ...] | None = None) -> Question:
        """Everything known about this request, as the policy's check list asks it."""
        assert self.host is not None
        if addresses is None and self.address is not None:
            addresses = (self.address,)
        return _new(Question, (self.host, self.port, self.http, addresses, self.tls, self.sni))

    def close(self, why: str) -> None:
        """End the flow now (revocation, shutdown): blocked reads on both sides return."""
        self.ended_by = why
        self.abort()

    def abort(self) -> None:
        abort(self.client_stream, self.upstream)

    def add(self, upstream: bool, count: int) -> None:
        """Count `count` bytes relayed in one direction, and when (the plain-HTTP path's
        idle limits read `last`; the tunnel pump counts without the clock)."""
        self.last = time.monotonic()
        if upstream:
            self.up += count
        else:
            self.down += count


def abort(*streams: Any) -> None:
    """Stop both directions now: a blocked read on any of `streams` (Streams or sockets)
    returns at once."""
    for stream in streams:
        if stream is not None:
            try:
                stream.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
