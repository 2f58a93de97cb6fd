"""Host normalization: one canonical spelling for every name and address.

Rules, CONNECT targets and TLS SNI values all pass through `parse_host`, so they are
compared in one form: lowercase ASCII (IDNA/punycode for Unicode), no trailing dot, and
for IP literals the canonical text (IPv6 compressed, IPv4-mapped IPv6 unwrapped to IPv4).
Anything that a resolver might read differently from us (``2130706433``, ``0x7f.1``,
``0177.0.0.1``, ``127.1``, zone ids, embedded ``@`` or ``/``) is refused rather than
guessed at: a filter that normalizes less strictly than the resolver can be bypassed.

This runs on every request, so ASCII input (nearly all of it) takes a path that is one
regular-expression match; the `idna` package is used only for non-ASCII input and for
``xn--`` labels.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

__all__ = ["Host", "HostError", "parse_host", "unwrap"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Longer inputs are refused before any further work; DNS names are at most 253 octets.
_MAX_INPUT = 1024
_MAX_NAME = 253
_MAX_LABEL = 63

# A whole lowercase ASCII host name: labels of letters, digits, '_' and '-', not starting
# or ending with '-', separated by single dots. Underscore is accepted because real
# service names use it (e.g. SRV-style names in clusters); it cannot hide an address.
_NAME_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*")

# A last label that some resolver (inet_aton) would read as a number makes the whole name
# an IPv4 literal in that resolver's eyes; such names must be the canonical dotted quad.
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*")
_OCTET = r"(0|[1-9][0-9]{0,2})"
_DOTTED_QUAD_RE = re.compile(r"\.".join([_OCTET] * 4))
_DIGITS = frozenset("0123456789")


class HostError(ValueError):
    """A host that is not acceptable; str() is a short message naming the problem."""


@dataclass(frozen=True, slots=True)
class Host:
    """A normalized host: a DNS name or an IP address.

    `name` is the canonical text (the name, or the address text for IPs); `ip` is set
    exactly when the host is an IP literal.
    """

    name: str
    ip: IPAddress | None = None

    def __str__(self) -> str:
        return self.name


def unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) delivers to;
    any other address unchanged. Rules speak of the IPv4 address, so every address is
    compared in this form."""
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip


def parse_host(text: str) -> Host:
    """Normalize a host name or IP literal (no brackets, no port); raise HostError."""
    if not isinstance(text, str):
        raise HostError("host is not a string")
    return _parse_cached(text)


# The same few destinations are requested over and over; remembering recent answers makes
# the common case a dict hit. Bounded, so random names cannot grow it; failures are not
# cached (lru_cache does not store exceptions), they just take the full path.
@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> Host:
    if not text:
        raise HostError("empty host")
    if len(text) > _MAX_INPUT:
        raise HostError("host too long")
    if text.isascii():
        if ":" in text:
            return _parse_ipv6(text)
        return _parse_ascii_name(text.lower(), text)
    return _parse_ascii_name(_to_ascii(text), text)


def _parse_ascii_name(name: str, original: str) -> Host:
    trailing_dot = name.endswith(".")
    if trailing_dot:
        name = name[:-1]
    if not _NAME_RE.fullmatch(name):
        raise HostError(_diagnose(name, original))
    if len(name) > _MAX_NAME:
        raise HostError("host name too long")
    last = name[name.rfind(".") + 1 :]
    # Every numeric form starts with a digit; real top-level labels never do.
    if last[0] in _DIGITS and _NUMERIC_LABEL_RE.fullmatch(last):
        if trailing_dot:
            # "1.2.3.4." is a name to some resolvers and an address to others.
            raise HostError("non-canonical IPv4 literal")
        return _parse_ipv4(name)
    if "xn--" in name:
        for label in name.split("."):
            if label.startswith("xn--"):
                _check_alabel(label)
    return Host(name)


def _parse_ipv4(name: str) -> Host:
    m = _DOTTED_QUAD_RE.fullmatch(name)
    if m is None:
        # Integers, hex, fewer than four parts, leading zeros (octal to inet_aton, decimal
        # to others): all legal to some resolver, all refused here.
        raise HostError("non-canonical IPv4 literal")
    a, b, c, d = (int(p) for p in m.groups())
    if a > 255 or b > 255 or c > 255 or d > 255:
        raise HostError("IPv4 octet out of range")
    # Built from the integer: the text is already validated, and parsing it again is slow.
    return Host(name, ipaddress.IPv4Address(a << 24 | b << 16 | c << 8 | d))


def _parse_ipv6(text: str) -> Host:
    if "%" in text:
        raise HostError("IPv6 zone id not allowed")
    if "[" in text or "]" in text:
        raise HostError("brackets not allowed around an IPv6 host")
    if text.count(":") == 1:
        raise HostError("':' in host name")
    try:
        ip: IPAddress = ipaddress.IPv6Address(text)
    except ValueError:
        raise HostError("invalid IPv6 literal") from None
    ip = unwrap(ip)
    return Host(str(ip), ip)


def _to_ascii(text: str) -> str:
    """Map a Unicode host to its ASCII (punycode) form, before the strict ASCII checks."""
    for ch in text:
        if ch.isspace():
            raise HostError("whitespace in host")
        if unicodedata.category(ch) == "Cc":
            raise HostError("control character in host")
    try:
        # UTS #46 maps width and case variants (fullwidth digits and dots, capitals) to
        # their plain forms, so "１２７．１" is judged exactly like "127.1".
        mapped = idna.uts46_remap(text, std3_rules=False)
        labels = mapped.split(".")
        out = [
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in labels
        ]
    except (idna.IDNAError, UnicodeError, ValueError):
        raise HostError("invalid internationalized host name") from None
    return ".".join(out).lower()


def _check_alabel(label: str) -> None:
    # An xn-- label must be the canonical encoding of a valid IDNA label; otherwise two
    # spellings could stand for one displayed name.
    try:
        idna.ulabel(label)
    except (idna.IDNAError, UnicodeError, ValueError):
        raise HostError("invalid punycode label") from None


def _diagnose(name: str, original: str) -> str:
    """Explain why `name` failed the name pattern (the slow path, errors only)."""
    if not name:
        return "empty host"
    for ch in original:
        if ch in "\t\n\r\x0b\x0c " or (not ch.isascii() and ch.isspace()):
            return "whitespace in host"
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return "control character in host"
    for ch, problem in (
        ("@", "userinfo ('@') in host"),
        ("/", "'/' in host"),
        ("*", "wildcard '*' in host"),
        (":", "':' in host name"),
    ):
        if ch in name:
            return problem
    if not re.fullmatch(r"[a-z0-9_.-]*", name):
        return "invalid character in host"
    for label in name.split("."):
        if not label:
            return "empty label"
        if len(label) > _MAX_LABEL:
            return "label longer than 63 characters"
        if label.startswith("-") or label.endswith("-"):
            return "label starts or ends with '-'"
    return "invalid host name"
