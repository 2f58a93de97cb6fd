"""Destination entries: the text of one `allowed_destinations` item, parsed into a Rule.

Grammar (a port or inclusive port range is optional; without one any port is allowed):

    api.example.com            exact name        api.example.com:443
    *.cdn.example.com          wildcard          *.corp.example:8000-8100
    192.168.1.100              IPv4 address      192.168.1.100:5432
    2001:db8::1                IPv6 address      [2001:db8::1]:443
    10.0.0.0/24                IPv4 network      10.0.0.0/24:5432
    2001:db8::/32              IPv6 network      [2001:db8::/32]:443

Names and addresses go through the same `parse_host` as requests, so a rule is stored in
exactly the form a request will be compared in. Errors name the problem and, where an
operator is likely to have meant something else (a URL, a path, host bits set), say what
to write instead.
"""

from __future__ import annotations

import re

from .addresses import NetworkError, network_parts
from .hosts import HostError, parse_host
from .model import PortRange, Rule, port_range

__all__ = ["DestinationError", "parse_destination", "parse_ports"]

_PORT_RE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_BAD_CHARS_RE = re.compile(r"[\s\x00-\x1f\x7f]")


class DestinationError(ValueError):
    """A destination entry that cannot be parsed; str() says why."""


def parse_ports(text: str) -> PortRange:
    """Parse ``443`` or ``8000-8100`` (ports 1-65535, low <= high)."""
    m = _PORT_RE.fullmatch(text)
    if m is None:
        raise DestinationError(f"invalid port {text!r} (expected a port such as 443 or a range such as 8000-8100)")
    low = int(m.group(1))
    high = int(m.group(2)) if m.group(2) is not None else low
    for port in (low, high):
        if not 1 <= port <= 65535:
            raise DestinationError(f"port {port} out of range (1-65535)")
    if low > high:
        raise DestinationError(f"port range {low}-{high} is reversed (write {high}-{low})")
    return port_range(low, high)


def parse_destination(text: str) -> Rule:
    """Parse one destination entry into a Rule; raise DestinationError."""
    if not isinstance(text, str):
        raise DestinationError("must be a string")
    if not text:
        raise DestinationError("empty destination")
    if _BAD_CHARS_RE.search(text):
        raise DestinationError("contains whitespace or control characters")
    if "://" in text:
        rest = text.split("://", 1)[1].split("/", 1)[0]
        raise DestinationError(f"looks like a URL; write only the host, e.g. {rest!r}")
    if "@" in text:
        raise DestinationError("userinfo ('@') is not allowed; write only the host")
    host, ports = split_port(text)
    port_range = parse_ports(ports) if ports is not None else None

    if "*" in host:
        return _wildcard(text, host, port_range)
    if "/" in host:
        address, _, prefix = host.partition("/")
        try:
            ip = parse_host(address).ip
        except HostError:
            ip = None
        if ip is None:
            raise DestinationError("paths are not allowed; write only the host (or an IP network such as 10.0.0.0/24)")
        try:
            ip, plen = network_parts(ip, address, prefix)
        except NetworkError as err:
            raise DestinationError(str(err)) from None
        return Rule(text, "cidr", port_range, f"{ip}/{plen}")
    try:
        parsed = parse_host(host)
    except HostError as err:
        raise DestinationError(str(err)) from None
    if parsed.ip is not None:
        return Rule(text, "ip", port_range, parsed.name)
    # Share the string when the entry is already normalized ("api.example.com"): one
    # object fewer per rule in large policies.
    return Rule(text, "domain", port_range, text if text == parsed.name else parsed.name)


def split_port(text: str) -> tuple[str, str | None]:
    """Split ``host[:ports]``; IPv6 needs brackets to carry a port."""
    if text.startswith("["):
        inside, bracket, after = text[1:].partition("]")
        if not bracket:
            raise DestinationError("unclosed '['")
        if ":" not in inside:
            raise DestinationError("brackets are only for IPv6 addresses")
        if not after:
            return inside, None
        if not after.startswith(":"):
            raise DestinationError("unexpected text after ']' (expected ':port')")
        return inside, after[1:]
    colons = text.count(":")
    if colons == 0:
        return text, None
    if colons == 1:
        host, _, ports = text.partition(":")
        return host, ports
    if "]" in text:
        raise DestinationError("unbalanced ']'")
    # Two or more colons: a bare IPv6 address or network, which cannot carry a port.
    return text, None


def _wildcard(text: str, host: str, ports: PortRange | None) -> Rule:
    if host == "*":
        raise DestinationError("a bare '*' is not allowed; list destinations explicitly")
    if not host.startswith("*.") or "*" in host[2:]:
        raise DestinationError("'*' is only allowed as the whole first label, as in '*.example.com'")
    suffix = host[2:]
    if not suffix:
        raise DestinationError("wildcard without a domain ('*.' must be followed by a domain)")
    try:
        parsed = parse_host(suffix)
    except HostError as err:
        raise DestinationError(f"invalid wildcard domain: {err}") from None
    if parsed.ip is not None:
        raise DestinationError("a wildcard cannot cover an IP address; use a CIDR such as 10.0.0.0/24")
    return Rule(text, "wildcard", ports, parsed.name)
