"""Address ranges: the forbidden-address guard and the network index behind CIDR rules.

Step 6 of docs/ARCHITECTURE.md: every address a name resolves to is checked against forbidden ranges
(loopback, link-local incl. cloud metadata, ...) before it is dialled. IPv6 has several
ways to carry an IPv4 address that the network will deliver to that IPv4 host (mapped,
NAT64, 6to4, Teredo); those are judged on the IPv4 they carry, or ``64:ff9b::7f00:1``
would be a way around a ``127.0.0.0/8`` entry.

Lookups never scan the range list: networks are grouped by prefix length, one dict of
masked integers per length, so a lookup costs one dict probe per distinct prefix length
(at most 33 for IPv4, 129 for IPv6) whatever the number of networks.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

from .hosts import HostError, parse_host, unwrap

__all__ = [
    "DEFAULT_FORBIDDEN",
    "ForbiddenRanges",
    "address_text",
    "IPAddress",
    "IPNetwork",
    "NetworkError",
    "NetworkIndex",
    "contains",
    "network_key",
    "network_parts",
    "parse_network",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_TEXTS: dict[int, str] = {}  # IPv4 address integer -> its text, for the addresses proxies dial


def address_text(ip: IPAddress) -> str:
    """str(ip), remembered for IPv4 addresses: ipaddress builds the text in Python on
    every call, and every tunnel needs its address's text to dial it and to log it."""
    if type(ip) is not IPv4Address:
        return str(ip)
    text = _TEXTS.get(ip._ip)  # noqa: SLF001 - the address's integer
    if text is None:
        text = str(ip)
        if len(_TEXTS) >= 4096:
            _TEXTS.clear()
        _TEXTS[ip._ip] = text  # noqa: SLF001
    return text

V = TypeVar("V")

_M32 = 0xFFFFFFFF
_BITS = {4: 32, 6: 128}


class NetworkError(ValueError):
    """A network or address entry that is not a valid, canonical CIDR or IP."""


NetworkKey = tuple[int, int, int]  # (IP version, network address as int, prefix length)


def contains(outer: NetworkKey, inner: NetworkKey) -> bool:
    """Whether network `inner` lies entirely inside network `outer`."""
    version, value, plen = outer
    if inner[0] != version or inner[2] < plen:
        return False
    shift = _BITS[version] - plen
    return inner[1] >> shift == value >> shift


def network_key(network: IPNetwork | str) -> NetworkKey:
    """The (version, address int, prefix length) of a network or canonical CIDR/IP text.

    Text must be canonical (as produced by `parse_network` or `parse_host`); the IPv4
    case is split by hand because it is the bulk of large policies.
    """
    if not isinstance(network, str):
        return network.version, int(network.network_address), network.prefixlen
    address, _, prefix = network.partition("/")
    if ":" in address:
        return 6, int(ipaddress.IPv6Address(address)), int(prefix) if prefix else 128
    a, b, c, d = (int(part) for part in address.split("."))
    return 4, a << 24 | b << 16 | c << 8 | d, int(prefix) if prefix else 32


class _Many(tuple):
    """Several values on one index key (a lone value is stored bare)."""

    __slots__ = ()


def _many(values: list[Any]) -> Any:
    """Several values on one key: rule numbers in a plain tuple (the garbage collector
    stops tracking a tuple of numbers after its first look), anything else in `_Many`."""
    if all(type(v) is int for v in values):
        return tuple(values)
    return _Many(values)


class NetworkIndex(Generic[V]):
    """Values attached to networks, found by address without scanning.

    One level per (version, prefix length): a dict from the masked network integer to the
    values attached to that network, in insertion order. Levels are probed from the most
    specific prefix to the least. A value must not be a plain tuple: several integer
    values on one network are stored as one (which the collector soon stops tracking).
    """

    __slots__ = ("_levels",)

    def __init__(self, entries: Iterable[tuple[NetworkKey, V]]) -> None:
        tables: dict[tuple[int, int], dict[int, list[V]]] = {}
        for (version, value, plen), item in entries:
            level = tables.setdefault((version, plen), {})
            level.setdefault(value, []).append(item)
        levels: dict[int, list[tuple[int, int, dict[int, Any]]]] = {4: [], 6: []}
        for (version, plen), table in tables.items():
            bits = _BITS[version]
            mask = ((1 << plen) - 1) << (bits - plen)
            # A lone value is stored as itself, not in a 1-tuple: large policies are
            # mostly one rule per network, and every object saved is one less to
            # allocate on load and to free when a reload replaces the snapshot.
            frozen = {key: values[0] if len(values) == 1 else _many(values) for key, values in table.items()}
            levels[version].append((plen, mask, frozen))
        self._levels = {
            version: tuple((mask, table) for _, mask, table in sorted(found, key=lambda t: -t[0]))
            for version, found in levels.items()
        }

    def lookup(self, version: int, value: int) -> Iterator[V]:
        """Values of every network containing the address `value`, most specific first."""
        for mask, table in self._levels[version]:
            hit = table.get(value & mask)
            if hit is not None:
                if type(hit) is _Many or type(hit) is tuple:
                    yield from hit
                else:
                    yield hit

    def __bool__(self) -> bool:
        return bool(self._levels[4] or self._levels[6])


# IPv6 prefixes whose addresses carry an IPv4 address the packet is delivered to:
# (name, prefix value, prefix length, extractor of the embedded IPv4 integer).
_Embedding = tuple[str, int, int, Callable[[int], int]]
_EMBEDDINGS: tuple[_Embedding, ...] = (
    ("IPv4-mapped", 0xFFFF << 32, 96, lambda x: x & _M32),
    # Deprecated (RFC 4291) but still understood by some stacks; judged to be safe.
    ("IPv4-compatible", 0, 96, lambda x: x & _M32),
    ("NAT64", 0x0064FF9B << 96, 96, lambda x: x & _M32),
    # RFC 6052 /48 layout: IPv4 bits 0-15 in address bits 48-63, bits 16-31 in 72-87
    # (bits 64-71 are the reserved "u" octet).
    ("NAT64", 0x0064FF9B0001 << 80, 48, lambda x: ((x >> 64) & 0xFFFF) << 16 | ((x >> 40) & 0xFFFF)),
    ("6to4", 0x2002 << 112, 16, lambda x: (x >> 80) & _M32),
    ("Teredo server", 0x20010000 << 96, 32, lambda x: (x >> 64) & _M32),
    # The Teredo client address is stored inverted (RFC 4380 section 4).
    ("Teredo client", 0x20010000 << 96, 32, lambda x: (x & _M32) ^ _M32),
)


class _Range(NamedTuple):
    key: NetworkKey
    reason: str


@dataclass(frozen=True)
class ForbiddenRanges:
    """Networks no identity may reach unless it allows the address explicitly.

    `ranges` holds (network, label) pairs; the label names why the range is forbidden
    and appears in reasons, e.g. ``"169.254.0.0/16 (link-local)"``.
    """

    ranges: tuple[tuple[IPNetwork, str], ...]
    _index: NetworkIndex[_Range] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = NetworkIndex((network_key(net), _Range(network_key(net), f"{net} ({label})"))
                             for net, label in self.ranges)
        object.__setattr__(self, "_index", index)

    def match(self, ip: IPAddress) -> str | None:
        """The reason `ip` is forbidden (its range and label), or None if it is not."""
        found = self.find(ip)
        return found[1] if found is not None else None

    def find(self, ip: IPAddress) -> tuple[NetworkKey, str] | None:
        """The most specific forbidden range holding `ip` (or the IPv4 address it carries)
        and the reason, or None."""
        # Every request asks: type checks and `_ip` (the address's integer) instead of
        # the `version` property and `int()`, which are Python-level calls.
        if type(ip) is IPv4Address:
            for found in self._index.lookup(4, ip._ip):  # noqa: SLF001
                return found
            return None
        ip = unwrap(ip)
        for found in self._index.lookup(ip.version, int(ip)):
            return found
        if ip.version == 6:
            x = int(ip)
            for name, prefix, plen, extract in _EMBEDDINGS:
                if x >> (128 - plen) == prefix >> (128 - plen):
                    for key, reason in self._index.lookup(4, extract(x)):
                        return key, f"{reason} embedded in {name} address"
        return None

    def __len__(self) -> int:
        return len(self.ranges)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, str]]) -> ForbiddenRanges:
        """Build from (network text, label) pairs; raises NetworkError on a bad entry."""
        return cls(tuple((parse_network(text), label) for text, label in entries))


_PREFIX_RE = re.compile(r"0|[1-9][0-9]{0,2}")


def parse_network(text: str) -> IPNetwork:
    """Parse a canonical ``address/prefix`` or a single address (as a /32 or /128).

    The address must be a canonical literal (see parse_host); the network must not have
    host bits set, so a typo like ``10.0.0.1/24`` is reported instead of being widened.
    An IPv4-mapped IPv6 network becomes the IPv4 network it denotes, because addresses are
    compared after unwrapping.
    """
    address, slash, prefix = text.partition("/")
    try:
        host = parse_host(address)
    except HostError as err:
        raise NetworkError(f"not an IP address or CIDR ({err})") from None
    if host.ip is None:
        raise NetworkError("not an IP address or CIDR")
    ip, plen = network_parts(host.ip, address, prefix if slash else None)
    return ipaddress.ip_network((ip, plen))


def network_parts(ip: IPAddress, address: str, prefix: str | None) -> tuple[IPAddress, int]:
    """Validate a prefix for `ip` (parsed from the text `address`); return (ip, length).

    Raises NetworkError for a malformed or out-of-range prefix, or host bits set.
    """
    mapped = ":" in address and ip.version == 4
    if prefix is None:
        return ip, ip.max_prefixlen
    if not _PREFIX_RE.fullmatch(prefix):
        raise NetworkError("prefix length must be a decimal number")
    plen = int(prefix)
    limit = 128 if ":" in address else 32
    if plen > limit:
        raise NetworkError(f"prefix length {plen} out of range (0-{limit})")
    if mapped:
        if plen < 96:
            raise NetworkError("IPv4-mapped network must have a prefix length of at least 96")
        plen -= 96
    bits = ip.max_prefixlen
    host_mask = (1 << (bits - plen)) - 1
    if int(ip) & host_mask:
        suggestion = ipaddress.ip_network((ip, plen), strict=False)
        raise NetworkError(f"host bits set; did you mean {suggestion}?")
    return ip, plen


DEFAULT_FORBIDDEN = ForbiddenRanges.from_entries(
    (
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("fd00:ec2::254/128", "AWS instance metadata"),
        ("0.0.0.0/8", "unspecified"),
        ("::/128", "unspecified"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("100.64.0.0/10", "shared address space"),
    )
)
