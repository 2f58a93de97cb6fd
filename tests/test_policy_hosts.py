"""parse_host: the one normalization rules, CONNECT targets and SNI values share."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import Host, HostError, parse_host

ACCEPT = [
    # (input, normalized name, is an IP)
    pytest.param("api.example.com", "api.example.com", False, id="plain-name"),
    pytest.param("API.Example.COM", "api.example.com", False, id="case-folded"),
    pytest.param("api.example.com.", "api.example.com", False, id="trailing-dot-stripped"),
    pytest.param("localhost", "localhost", False, id="single-label"),
    pytest.param("com.", "com", False, id="single-label-trailing-dot"),
    pytest.param("a_b.svc.cluster.local", "a_b.svc.cluster.local", False, id="underscore"),
    pytest.param("a-b.example.com", "a-b.example.com", False, id="inner-hyphen"),
    pytest.param("1.2.3.example.com", "1.2.3.example.com", False, id="numeric-inner-labels"),
    pytest.param("example.1a", "example.1a", False, id="alnum-last-label"),
    pytest.param("a" * 63 + ".com", "a" * 63 + ".com", False, id="label-63"),
    pytest.param(".".join(["a" * 61] * 4), ".".join(["a" * 61] * 4), False, id="name-247"),
    pytest.param("bücher.de", "xn--bcher-kva.de", False, id="idna-unicode"),
    pytest.param("BÜCHER.de", "xn--bcher-kva.de", False, id="idna-unicode-upper"),
    pytest.param("xn--bcher-kva.de", "xn--bcher-kva.de", False, id="idna-punycode"),
    pytest.param("XN--BCHER-KVA.DE", "xn--bcher-kva.de", False, id="idna-punycode-upper"),
    pytest.param("ＥＸＡＭＰＬＥ．ｃｏｍ", "example.com", False, id="fullwidth-mapped"),
    pytest.param("аpple.com", "xn--pple-43d.com", False, id="cyrillic-lookalike-stays-distinct"),
    pytest.param("1.2.3.4", "1.2.3.4", True, id="ipv4"),
    pytest.param("0.0.0.0", "0.0.0.0", True, id="ipv4-zero"),
    pytest.param("255.255.255.255", "255.255.255.255", True, id="ipv4-broadcast"),
    pytest.param("１２７．０．０．１", "127.0.0.1", True, id="fullwidth-ipv4-is-an-ip"),
    pytest.param("::1", "::1", True, id="ipv6-loopback"),
    pytest.param("2001:DB8:0:0:0:0:0:1", "2001:db8::1", True, id="ipv6-compressed"),
    pytest.param("2001:0db8::0001", "2001:db8::1", True, id="ipv6-leading-zero-groups"),
    pytest.param("::ffff:10.1.2.3", "10.1.2.3", True, id="ipv4-mapped-unwrapped"),
    pytest.param("::ffff:a01:203", "10.1.2.3", True, id="ipv4-mapped-hex-unwrapped"),
    pytest.param("64:ff9b::1.2.3.4", "64:ff9b::102:304", True, id="nat64-stays-ipv6"),
]


@pytest.mark.parametrize(("text", "name", "is_ip"), ACCEPT)
def test_accept(text: str, name: str, is_ip: bool) -> None:
    host = parse_host(text)
    assert host.name == name
    assert (host.ip is not None) is is_ip
    if is_ip:
        assert host.ip == ipaddress.ip_address(name)


REJECT = [
    # (input, expected message fragment)
    pytest.param("", "empty host", id="empty"),
    pytest.param(".", "empty host", id="only-dot"),
    pytest.param("a..b", "empty label", id="empty-label"),
    pytest.param("a.com..", "empty label", id="two-trailing-dots"),
    pytest.param(".a.com", "empty label", id="leading-dot"),
    pytest.param("-a.com", "'-'", id="leading-hyphen"),
    pytest.param("a-.com", "'-'", id="trailing-hyphen"),
    pytest.param("a" * 64 + ".com", "longer than 63", id="label-64"),
    pytest.param(".".join(["a" * 63] * 4), "too long", id="name-255"),
    pytest.param("x" * 2000, "too long", id="huge-input"),
    pytest.param("a b.com", "whitespace", id="space"),
    pytest.param("a\tb.com", "whitespace", id="tab"),
    pytest.param("a.com\r\n", "whitespace", id="crlf"),
    pytest.param("a\x00.com", "control character", id="nul"),
    pytest.param("a\x7f.com", "control character", id="del"),
    pytest.param("ä\x01.com", "control character", id="control-in-unicode"),
    pytest.param("a\u00a0b.com", "whitespace", id="nbsp"),
    pytest.param("user@a.com", "'@'", id="userinfo"),
    pytest.param("a.com/path", "'/'", id="slash"),
    pytest.param("*.a.com", "'*'", id="wildcard"),
    pytest.param("a.com:443", "':'", id="port"),
    pytest.param("a!.com", "invalid character", id="bang"),
    pytest.param("a%41.com", "invalid character", id="percent-encoding"),
    pytest.param("a\\b.com", "invalid character", id="backslash"),
    pytest.param("xn--abc.de", "punycode", id="bad-punycode"),
    pytest.param("xn---bbk.de", "punycode", id="non-canonical-punycode"),
    pytest.param("xn--.de", "'-'", id="empty-punycode"),
    pytest.param("a\u200b\u200d.com", "internationalized", id="bad-idna-joiner"),
    # Every spelling inet_aton accepts that is not the canonical dotted quad.
    pytest.param("2130706433", "non-canonical IPv4", id="ipv4-integer"),
    pytest.param("0x7f000001", "non-canonical IPv4", id="ipv4-hex-integer"),
    pytest.param("0x7f.1", "non-canonical IPv4", id="ipv4-hex-two-parts"),
    pytest.param("0x7f.0.0.1", "non-canonical IPv4", id="ipv4-hex-octet"),
    pytest.param("0X7F.0.0.1", "non-canonical IPv4", id="ipv4-hex-octet-upper"),
    pytest.param("0177.0.0.1", "non-canonical IPv4", id="ipv4-octal"),
    pytest.param("012.0.0.1", "non-canonical IPv4", id="ipv4-octal-short"),
    pytest.param("1.2.3.04", "non-canonical IPv4", id="ipv4-leading-zero-last"),
    pytest.param("127.1", "non-canonical IPv4", id="ipv4-two-parts"),
    pytest.param("127.0.1", "non-canonical IPv4", id="ipv4-three-parts"),
    pytest.param("1.2.3.4.5", "non-canonical IPv4", id="ipv4-five-parts"),
    pytest.param("1.2.3.4.", "non-canonical IPv4", id="ipv4-trailing-dot"),
    pytest.param("example.123", "non-canonical IPv4", id="numeric-tld"),
    pytest.param("example.0x", "non-canonical IPv4", id="hex-tld"),
    pytest.param("１２７．１", "non-canonical IPv4", id="fullwidth-short-ipv4"),
    pytest.param("300.1.1.1", "out of range", id="ipv4-octet-300"),
    pytest.param("256.0.0.0", "out of range", id="ipv4-octet-256"),
    pytest.param("fe80::1%eth0", "zone id", id="ipv6-zone-id"),
    pytest.param("fe80::1%25eth0", "zone id", id="ipv6-zone-id-encoded"),
    pytest.param("[::1]", "brackets", id="ipv6-brackets"),
    pytest.param("::g", "invalid IPv6", id="ipv6-bad-hex"),
    pytest.param("1:2:3:4:5:6:7:8:9", "invalid IPv6", id="ipv6-too-many-groups"),
    pytest.param("::ffff:010.0.0.1", "invalid IPv6", id="ipv6-mapped-octal"),
    pytest.param("2001:db8::1::2", "invalid IPv6", id="ipv6-two-double-colons"),
]


@pytest.mark.parametrize(("text", "fragment"), REJECT)
def test_reject(text: str, fragment: str) -> None:
    with pytest.raises(HostError) as info:
        parse_host(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_non_string_rejected() -> None:
    with pytest.raises(HostError):
        parse_host(b"example.com")  # type: ignore[arg-type]


def test_host_is_frozen_value() -> None:
    host = parse_host("Example.com")
    assert host == Host("example.com", None)
    assert str(host) == "example.com"
    with pytest.raises(AttributeError):
        host.name = "other"  # type: ignore[misc]


LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10).filter(
    lambda s: not s[0].isdigit()
)
NAMES = st.lists(LABEL, min_size=1, max_size=5).map(".".join)


@settings(max_examples=200, deadline=None)
@given(name=NAMES, data=st.data())
def test_property_case_and_trailing_dot_do_not_change_the_name(name: str, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    mixed = "".join(c.upper() if f else c for c, f in zip(name, flips))
    assert parse_host(mixed) == parse_host(name) == parse_host(name + ".")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_property_ipv4_text_roundtrip(value: int) -> None:
    ip = ipaddress.IPv4Address(value)
    assert parse_host(str(ip)).ip == ip
    # The same address as one integer is never accepted as an IP.
    with pytest.raises(HostError):
        parse_host(str(value))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_property_only_host_or_host_error(text: str) -> None:
    try:
        host = parse_host(text)
    except HostError:
        return
    assert host.name == parse_host(host.name).name  # normalization is idempotent
    assert host.name.isascii() and host.name == host.name.lower()
