"""Forbidden address ranges, embedded IPv4 forms, and the explicit-allow override."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import (
    DEFAULT_FORBIDDEN,
    ForbiddenRanges,
    Identity,
    decide_addresses,
    load_policy_file,
    load_policy_text,
    parse_destination,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "policies"
M32 = 0xFFFFFFFF


def nat64_48(v4: str) -> ipaddress.IPv6Address:
    """64:ff9b:1::/48 with the RFC 6052 layout, built independently of the code under test."""
    x = int(ipaddress.IPv4Address(v4))
    return ipaddress.IPv6Address((0x64FF9B0001 << 80) | (x >> 16) << 64 | (x & 0xFFFF) << 40)


def teredo(server: str, client: str) -> ipaddress.IPv6Address:
    s, c = int(ipaddress.IPv4Address(server)), int(ipaddress.IPv4Address(client))
    return ipaddress.IPv6Address((0x20010000 << 96) | s << 64 | 0x8000_63BF << 32 | (c ^ M32))


DEFAULTS = [
    # (address, expected reason or None)
    pytest.param("127.0.0.1", "127.0.0.0/8 (loopback)", id="loopback-v4"),
    pytest.param("127.255.255.254", "127.0.0.0/8 (loopback)", id="loopback-v4-top"),
    pytest.param("::1", "::1/128 (loopback)", id="loopback-v6"),
    pytest.param("169.254.169.254", "169.254.0.0/16 (link-local)", id="cloud-metadata"),
    pytest.param("169.254.0.1", "169.254.0.0/16 (link-local)", id="link-local-v4"),
    pytest.param("fe80::1", "fe80::/10 (link-local)", id="link-local-v6"),
    pytest.param("febf:ffff::1", "fe80::/10 (link-local)", id="link-local-v6-top"),
    pytest.param("fd00:ec2::254", "fd00:ec2::254/128 (AWS instance metadata)", id="aws-imds-v6"),
    pytest.param("0.0.0.0", "0.0.0.0/8 (unspecified)", id="unspecified-v4"),
    pytest.param("0.1.2.3", "0.0.0.0/8 (unspecified)", id="this-network-v4"),
    pytest.param("::", "::/128 (unspecified)", id="unspecified-v6"),
    pytest.param("224.0.0.1", "224.0.0.0/4 (multicast)", id="multicast-v4"),
    pytest.param("239.255.255.250", "224.0.0.0/4 (multicast)", id="multicast-v4-ssdp"),
    pytest.param("ff02::1", "ff00::/8 (multicast)", id="multicast-v6"),
    pytest.param("255.255.255.255", "255.255.255.255/32 (broadcast)", id="broadcast"),
    pytest.param("100.64.0.1", "100.64.0.0/10 (shared address space)", id="cgnat-low"),
    pytest.param("100.127.255.255", "100.64.0.0/10 (shared address space)", id="cgnat-high"),
    pytest.param("100.128.0.0", None, id="cgnat-outside"),
    pytest.param("8.8.8.8", None, id="public-v4"),
    pytest.param("10.0.0.1", None, id="private-v4-not-default"),
    pytest.param("192.168.1.1", None, id="private-v4-192"),
    pytest.param("2606:4700::1111", None, id="public-v6"),
    pytest.param("fd00::1", None, id="ula-v6"),
    pytest.param("fd00:ec2::253", None, id="next-to-imds"),
    # Embedded IPv4: judged on the address carried.
    pytest.param("::ffff:127.0.0.1", "127.0.0.0/8 (loopback)", id="mapped-loopback"),
    pytest.param("::ffff:169.254.169.254", "169.254.0.0/16 (link-local)", id="mapped-metadata"),
    pytest.param("::ffff:8.8.8.8", None, id="mapped-public"),
    pytest.param("64:ff9b::7f00:1", "127.0.0.0/8 (loopback) embedded in NAT64 address", id="nat64-96-loopback"),
    pytest.param("64:ff9b::a9fe:a9fe", "169.254.0.0/16 (link-local) embedded in NAT64 address", id="nat64-96-metadata"),
    pytest.param("64:ff9b::808:808", None, id="nat64-96-public"),
    pytest.param("64:ff9b:1:a9fe:a9:fe00::", "169.254.0.0/16 (link-local) embedded in NAT64 address",
                 id="nat64-48-metadata-literal"),
    pytest.param(str(nat64_48("127.0.0.1")), "127.0.0.0/8 (loopback) embedded in NAT64 address",
                 id="nat64-48-loopback"),
    pytest.param(str(nat64_48("8.8.8.8")), None, id="nat64-48-public"),
    pytest.param("2002:7f00:1::", "127.0.0.0/8 (loopback) embedded in 6to4 address", id="6to4-loopback"),
    pytest.param("2002:a9fe:a9fe:1::1", "169.254.0.0/16 (link-local) embedded in 6to4 address", id="6to4-metadata"),
    pytest.param("2002:808:808::1", None, id="6to4-public"),
    pytest.param(str(teredo("65.54.227.120", "127.0.0.1")),
                 "127.0.0.0/8 (loopback) embedded in Teredo client address", id="teredo-client-loopback"),
    pytest.param(str(teredo("65.54.227.120", "169.254.169.254")),
                 "169.254.0.0/16 (link-local) embedded in Teredo client address", id="teredo-client-metadata"),
    pytest.param(str(teredo("127.0.0.1", "8.8.8.8")),
                 "127.0.0.0/8 (loopback) embedded in Teredo server address", id="teredo-server-loopback"),
    pytest.param(str(teredo("65.54.227.120", "8.8.8.8")), None, id="teredo-public"),
    pytest.param("::7f00:1", "127.0.0.0/8 (loopback) embedded in IPv4-compatible address", id="v4-compatible"),
]


@pytest.mark.parametrize(("address", "reason"), DEFAULTS)
def test_default_forbidden(address: str, reason: str | None) -> None:
    assert DEFAULT_FORBIDDEN.match(ipaddress.ip_address(address)) == reason


def test_embedded_ipv4_forms() -> None:
    ranges = ForbiddenRanges.from_entries([("127.0.0.1/32", "configured"), ("192.0.2.33/32", "configured")])
    assert ranges.match(ipaddress.IPv6Address("2002:7f00:1::")) == "127.0.0.1/32 (configured) embedded in 6to4 address"
    assert ranges.match(ipaddress.IPv4Address("127.0.0.2")) is None
    assert ranges.match(nat64_48("192.0.2.33")) == "192.0.2.33/32 (configured) embedded in NAT64 address"


def test_configured_ranges_apply_to_embedded_forms_too() -> None:
    ranges = ForbiddenRanges.from_entries([("10.0.0.0/8", "configured")])
    assert ranges.match(ipaddress.ip_address("10.1.2.3")) == "10.0.0.0/8 (configured)"
    assert ranges.match(ipaddress.ip_address("64:ff9b::a01:203")) == "10.0.0.0/8 (configured) embedded in NAT64 address"
    assert ranges.match(ipaddress.ip_address("127.0.0.1")) is None


def test_many_ranges_are_indexed() -> None:
    entries = [(f"10.{i >> 8}.{i & 255}.0/24", "configured") for i in range(20_000)]
    ranges = ForbiddenRanges.from_entries(entries)
    assert ranges.match(ipaddress.ip_address("10.78.31.9")) == "10.78.31.0/24 (configured)"
    assert ranges.match(ipaddress.ip_address("11.0.0.1")) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=M32))
def test_property_every_embedding_is_judged_like_the_ipv4(value: int) -> None:
    v4 = ipaddress.IPv4Address(value)
    forbidden = DEFAULT_FORBIDDEN.match(v4) is not None
    public_server = "65.54.227.120"
    for v6 in (
        ipaddress.IPv6Address((0xFFFF << 32) | value),
        ipaddress.IPv6Address((0x64FF9B << 96) | value),
        nat64_48(str(v4)),
        ipaddress.IPv6Address((0x2002 << 112) | value << 80 | 1),
        teredo(public_server, str(v4)),
    ):
        assert (DEFAULT_FORBIDDEN.match(v6) is not None) is forbidden, v6


# --- decide_addresses ---------------------------------------------------------------------

POLICY = load_policy_file(FIXTURES / "full.yaml")  # configured: loopback and link-local only
BATCH = POLICY.identities["batch"]  # allows 169.254.169.254:80 explicitly


def test_forbidden_address_is_denied_with_the_range() -> None:
    web = POLICY.identities["web"]
    decision = decide_addresses(POLICY, web, [ipaddress.ip_address("169.254.169.254")], 443)
    assert (decision.allowed, decision.status) == (False, "denied")
    assert decision.reason == "forbidden address: 169.254.169.254 in 169.254.0.0/16 (configured)"


def test_explicit_ip_rule_overrides_the_guard_at_its_port_only() -> None:
    metadata = ipaddress.ip_address("169.254.169.254")
    allowed = decide_addresses(POLICY, BATCH, [metadata], 80)
    assert (allowed.allowed, allowed.status) == (True, "allowed")
    assert allowed.reason == "forbidden address allowed by rule: 169.254.169.254:80"
    assert allowed.rule is not None and allowed.rule.text == "169.254.169.254:80"
    denied = decide_addresses(POLICY, BATCH, [metadata], 443)
    assert not denied.allowed and denied.reason.startswith("forbidden address: ")


def test_explicit_cidr_rule_overrides_the_guard() -> None:
    ident = Identity(name="t", rules=(parse_destination("127.0.0.0/8:8080"),))
    decision = decide_addresses(POLICY, ident, ["127.0.0.1", "127.0.0.2"], 8080)
    assert decision.allowed and decision.rule.text == "127.0.0.0/8:8080"


def test_override_names_the_address_actually_dialled() -> None:
    # Allowing 127.0.0.1 does not allow reaching it through a NAT64 spelling.
    ident = Identity(name="t", rules=(parse_destination("127.0.0.1"),))
    decision = decide_addresses(load_policy_text(_ONE), ident, ["64:ff9b::7f00:1"], 443)
    assert not decision.allowed and "embedded in NAT64" in decision.reason


@pytest.mark.parametrize(
    ("rule", "address", "allowed"),
    [
        pytest.param("0.0.0.0/0", "127.0.0.1", False, id="v4-everything-does-not-unlock-loopback"),
        pytest.param("0.0.0.0/0", "169.254.169.254", False, id="v4-everything-does-not-unlock-metadata"),
        pytest.param("0.0.0.0/0", "::ffff:127.0.0.1", False, id="v4-everything-does-not-unlock-mapped-loopback"),
        pytest.param("::/0", "::1", False, id="v6-everything-does-not-unlock-loopback"),
        pytest.param("::/0", "fd00:ec2::254", False, id="v6-everything-does-not-unlock-imds"),
        pytest.param("::/0", "64:ff9b::7f00:1", False, id="v6-everything-does-not-unlock-nat64-loopback"),
        pytest.param("0.0.0.0/0", "93.184.216.34", True, id="v4-everything-reaches-public"),
        pytest.param("126.0.0.0/7", "127.0.0.1", False, id="wider-than-the-range"),
        pytest.param("169.0.0.0/8", "169.254.169.254", False, id="wider-than-link-local"),
        pytest.param("127.0.0.0/8", "127.0.0.1", True, id="equal-to-the-range"),
        pytest.param("127.0.0.0/16", "127.0.0.1", True, id="inside-the-range"),
        pytest.param("127.0.0.1", "127.0.0.1", True, id="the-address-itself"),
        pytest.param("169.254.169.254/32", "169.254.169.254", True, id="a-host-network"),
        pytest.param("64:ff9b::7f00:1", "64:ff9b::7f00:1", True, id="the-nat64-address-itself"),
    ],
)
def test_only_an_explicit_rule_inside_a_forbidden_range_unlocks_it(rule: str, address: str, allowed: bool) -> None:
    ident = Identity(name="t", rules=(parse_destination(rule),))
    decision = decide_addresses(POLICY_DEFAULTS, ident, [address], 443)
    assert decision.allowed is allowed, decision


_ONE = 'identities:\n  "t":\n    api_keys: ["k"]\n    allowed_destinations: ["a.example.com"]\n'


@pytest.mark.parametrize(
    ("addresses", "allowed", "reason"),
    [
        pytest.param(["93.184.216.34"], True, "addresses allowed", id="public"),
        pytest.param(["93.184.216.34", "2606:2800:220:1::1"], True, "addresses allowed", id="public-both-families"),
        pytest.param(["93.184.216.34", "127.0.0.1"], False, "forbidden address: 127.0.0.1 in 127.0.0.0/8 (loopback)",
                     id="one-bad-among-good"),
        pytest.param(["::ffff:127.0.0.1"], False, "forbidden address: 127.0.0.1 in 127.0.0.0/8 (loopback)",
                     id="mapped-unwrapped-in-reason"),
        pytest.param(["fd00:ec2::254"], False,
                     "forbidden address: fd00:ec2::254 in fd00:ec2::254/128 (AWS instance metadata)", id="imds-v6"),
        pytest.param([], False, "no addresses", id="none"),
    ],
)
def test_decide_addresses_table(addresses: list[str], allowed: bool, reason: str) -> None:
    policy = load_policy_text(_ONE)
    ident = policy.identities["t"]
    decision = decide_addresses(policy, ident, [ipaddress.ip_address(a) for a in addresses], 443)
    assert (decision.allowed, decision.reason) == (allowed, reason)
    assert decision.status == ("allowed" if allowed else "denied")


POLICY_DEFAULTS = load_policy_text(_ONE)


def test_report_mode_never_relaxes_the_guard() -> None:
    policy = load_policy_text(_ONE.replace('"a.example.com"]', '"a.example.com"]\n    mode: report'))
    ident = policy.identities["t"]
    assert ident.mode == "report"
    decision = decide_addresses(policy, ident, [ipaddress.ip_address("169.254.169.254")], 80)
    assert (decision.allowed, decision.status) == (False, "denied")


def test_disabled_guard_allows_everything() -> None:
    policy = load_policy_file(FIXTURES / "forbidden_disabled.yaml")
    decision = decide_addresses(policy, policy.identities["lab"], ["127.0.0.1", "::1"], 443)
    assert decision.allowed
