"""Resolving a destination once and dialling an address that was checked.

The proxy never hands a name to `connect()`: a name is resolved once (`Resolver`),
every address is judged by the policy (`admission.open_upstream`), and `dial()`
connects to one of those addresses. A second lookup at connect time is exactly what
DNS rebinding exploits.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import os
from typing import TYPE_CHECKING, Callable, Sequence

import gevent
from gevent import socket

import policy
from policy.addresses import IPAddress, IPv6Address, address_text
from proxy.deadlines import Deadline
from proxy.refusal import Refusal
from proxy.stream import Stream, hub

if TYPE_CHECKING:
    from proxy.deadlines import Sweeper
    from proxy.flow import Flow

Address = IPAddress
# resolve(name, timeout) -> addresses; raises ResolveError. Injected in tests.
Resolver = Callable[[str, float], list[Address]]


class ResolveError(Exception):
    """The name did not resolve; str() says why (for the log, not the client); `kind`
    is the RFC 9209 error type (`dns_timeout` or `dns_error`)."""

    def __init__(self, message: str, kind: str = "dns_error") -> None:
        super().__init__(message)
        self.kind = kind


def load_hosts_file(path: str) -> dict[str, list[Address]]:
    """Parse a hosts(5) file: `address name [name...]`, `#` comments."""
    table: dict[str, list[Address]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) < 2:
                raise ValueError(f"{path}:{number}: expected 'address name...'")
            try:
                address = policy.parse_host(words[0]).ip
            except policy.HostError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
            if address is None:
                raise ValueError(f"{path}:{number}: {words[0]!r} is not an IP address")
            for name in words[1:]:
                try:
                    key = policy.parse_host(name).name
                except policy.HostError as error:
                    raise ValueError(f"{path}:{number}: {error}") from None
                table.setdefault(key, []).append(address)
    return table


def system_resolver(hosts: dict[str, list[Address]]) -> Resolver:
    """Resolve with the hosts table first, then the system resolver (in gevent's pool).

    The timeout is only armed for a real lookup: a hosts-table hit costs a dict lookup.
    """

    def resolve(name: str, timeout: float) -> list[Address]:
        found = hosts.get(name)
        if found is not None:
            return list(found)
        try:
            with gevent.Timeout(timeout):
                infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
        except gevent.Timeout:
            raise ResolveError("DNS lookup timed out", "dns_timeout") from None
        except (OSError, UnicodeError) as error:
            raise ResolveError(str(error)) from None
        seen: list[Address] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if address not in seen:
                seen.append(address)
        return seen

    return resolve


# A non-blocking TCP socket in one system call where the kernel allows it (Linux).
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_STREAM = socket.SOCK_STREAM | _NONBLOCK

# RFC 9209 error types of connect() failures (Proxy-Status); others: destination_unavailable.
_CONNECT_KINDS = {
    errno.ECONNREFUSED: "connection_refused",
    errno.ETIMEDOUT: "connection_timeout",
    errno.EHOSTUNREACH: "destination_ip_unroutable",
    errno.ENETUNREACH: "destination_ip_unroutable",
}


def dial(flow: Flow, addresses: Sequence[Address], port: int, sweeper: Sweeper, timeout: float) -> Stream:
    """Connect to the first vetted address that answers within `timeout` seconds in all;
    the Stream is also left in `flow.upstream` (where the sweeper finds its wait).

    On failure the refusal's `error` names each address tried and why it failed
    (`127.0.0.1:8443: Connection refused`), and `flow.address` is the last one tried."""
    failures: list[str] = []
    kind = "destination_unavailable"
    sweeper.arm(flow, timeout)
    try:
        for address in addresses:
            family = socket.AF_INET6 if type(address) is IPv6Address else socket.AF_INET
            sock = _socket.socket(family, _STREAM)  # the real one, not gevent's
            if not _NONBLOCK:
                sock.setblocking(False)
            stream = flow.upstream = Stream(sock)
            try:
                error = sock.connect_ex((address_text(address), port))
                if error == errno.EINPROGRESS:
                    hub().wait(stream.writable)
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except Deadline:
                error = errno.ETIMEDOUT
            if not error:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                flow.address = address
                return stream
            flow.upstream = None
            flow.address = address  # for the record: the address that failed last
            stream.close()
            why = "connect timed out" if error == errno.ETIMEDOUT else os.strerror(error)
            failures.append(f"[{address}]:{port}: {why}" if address.version == 6 else f"{address}:{port}: {why}")
            kind = _CONNECT_KINDS.get(error, "destination_unavailable")
            if error == errno.ETIMEDOUT and not flow.deadline:
                break  # the whole CONNECT_TIMEOUT is spent
    finally:
        sweeper.disarm(flow)
    raise Refusal.answer_http(502, "could not connect to the destination",
                              error="; ".join(failures) or "no address to connect to", kind=kind)
