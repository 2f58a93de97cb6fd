"""Resolving a destination once and dialling an address that was checked.

The proxy never hands a name to `connect()`: a name is resolved once (`Resolver`),
every address is judged by the policy (`admission.open_upstream`), and `dial()`
connects to one of those addresses. A second lookup at connect time is exactly what
DNS rebinding exploits.
"""

from __future__ import annotations

import ipaddress
import os
import time
from typing import Callable, Sequence

import gevent
from gevent import socket

import policy
from proxy.refusal import Refusal

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# resolve(name, timeout) -> addresses; raises ResolveError. Injected in tests.
Resolver = Callable[[str, float], list[Address]]


class ResolveError(Exception):
    """The name did not resolve; str() says why (for the log, not the client)."""


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
            raise ResolveError("DNS lookup timed out") from None
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


def dial(addresses: Sequence[Address], port: int, deadline: float) -> tuple[socket.socket, Address]:
    """Connect to the first vetted address that answers before `deadline`."""
    failure = "no address to connect to"
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            failure = "connect timed out"
            break
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(remaining)
        try:
            sock.connect((str(address), port))
        except socket.timeout:
            sock.close()
            failure = "connect timed out"
            continue
        except OSError as error:
            sock.close()
            failure = os.strerror(error.errno) if error.errno else str(error)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address
    raise Refusal.answer_http(502, "could not connect to the destination", error=failure)
