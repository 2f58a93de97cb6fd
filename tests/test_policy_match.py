"""Identity.match: which destination rule, if any, allows a host and port."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import Identity, PortRange, load_policy_file, parse_destination, parse_host

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "policies"
WEB = load_policy_file(FIXTURES / "full.yaml").identities["web"]

MATCHES = [
    # (host as requested, port, the rule text expected to match, or None)
    pytest.param("api.example.com", 443, "api.example.com", id="exact"),
    pytest.param("api.example.com", 22, "api.example.com", id="exact-any-port"),
    pytest.param("API.Example.COM", 443, "api.example.com", id="exact-case-insensitive"),
    pytest.param("api.example.com.", 443, "api.example.com", id="exact-trailing-dot"),
    pytest.param("x.api.example.com", 443, None, id="exact-not-subdomain"),
    pytest.param("example.com", 443, None, id="exact-not-parent"),
    pytest.param("api.example.co", 443, None, id="exact-not-prefix"),
    pytest.param("a.cdn.example.com", 443, "*.cdn.example.com", id="wildcard-one-level"),
    pytest.param("b.a.cdn.example.com", 443, "*.cdn.example.com", id="wildcard-deeper"),
    pytest.param("A.CDN.EXAMPLE.COM.", 443, "*.cdn.example.com", id="wildcard-case-and-dot"),
    pytest.param("cdn.example.com", 443, None, id="wildcard-not-apex"),
    pytest.param("evilcdn.example.com", 443, None, id="wildcard-not-label-suffix"),
    pytest.param("a.evilcdn.example.com", 443, None, id="wildcard-not-label-suffix-deeper"),
    pytest.param("cdn.example.com.evil.net", 443, None, id="wildcard-not-prefix"),
    pytest.param("a.cdn.example.co", 443, None, id="wildcard-not-other-tld"),
    pytest.param("pay.example.com", 443, "pay.example.com:443", id="port-rule"),
    pytest.param("pay.example.com", 8443, None, id="port-rule-other-port"),
    pytest.param("x.corp.example", 8000, "*.corp.example:8000-8100", id="range-low"),
    pytest.param("x.corp.example", 8100, "*.corp.example:8000-8100", id="range-high"),
    pytest.param("x.corp.example", 7999, None, id="range-below"),
    pytest.param("x.corp.example", 8101, None, id="range-above"),
    pytest.param("corp.example", 8050, None, id="range-wildcard-not-apex"),
    pytest.param("bücher.example", 443, "bücher.example", id="idna-unicode-request"),
    pytest.param("xn--bcher-kva.example", 443, "bücher.example", id="idna-punycode-request"),
    pytest.param("BÜCHER.example", 443, "bücher.example", id="idna-unicode-upper"),
    pytest.param("bucher.example", 443, None, id="idna-ascii-lookalike"),
    pytest.param("bϋcher.example", 443, None, id="idna-greek-lookalike"),
    pytest.param("192.168.1.100", 443, "192.168.1.100", id="ipv4-exact"),
    pytest.param("::ffff:192.168.1.100", 443, "192.168.1.100", id="ipv4-mapped-ipv6"),
    pytest.param("192.168.1.101", 443, None, id="ipv4-other"),
    pytest.param("2001:db8::1", 443, "2001:db8::1", id="ipv6-exact"),
    pytest.param("2001:DB8:0:0::1", 8080, "2001:db8::1", id="ipv6-exact-spelling"),
    pytest.param("2001:db8::2", 443, "[2001:db8::2]:443", id="ipv6-port"),
    pytest.param("2001:db8::2", 80, None, id="ipv6-port-other"),
    pytest.param("10.0.0.7", 5432, "10.0.0.0/24:5432", id="cidr-v4-port"),
    pytest.param("10.0.0.255", 5432, "10.0.0.0/24:5432", id="cidr-v4-last"),
    pytest.param("::ffff:10.0.0.7", 5432, "10.0.0.0/24:5432", id="cidr-v4-mapped"),
    pytest.param("10.0.0.7", 443, None, id="cidr-v4-other-port"),
    pytest.param("10.0.1.0", 5432, None, id="cidr-v4-outside"),
    pytest.param("2001:db8:100:ffff::1", 443, "2001:db8:100::/48", id="cidr-v6"),
    pytest.param("2001:db8:101::1", 443, None, id="cidr-v6-outside"),
]


@pytest.mark.parametrize(("host", "port", "expected"), MATCHES)
def test_match(host: str, port: int, expected: str | None) -> None:
    rule = WEB.match(parse_host(host), port)
    assert (rule.text if rule else None) == expected


def identity_for(*destinations: str) -> Identity:
    return Identity(name="t", rules=tuple(parse_destination(d) for d in destinations))


def test_name_rules_never_match_addresses() -> None:
    ident = identity_for("api.example.com", "*.example.com")
    assert ident.match(parse_host("93.184.216.34"), 443) is None


def test_several_rules_for_one_host_pick_the_one_whose_ports_fit() -> None:
    ident = identity_for("db.example.com:5432", "db.example.com:6379", "*.example.com:443")
    db = parse_host("db.example.com")
    assert ident.match(db, 6379).text == "db.example.com:6379"
    assert ident.match(db, 5432).text == "db.example.com:5432"
    assert ident.match(db, 443).text == "*.example.com:443"  # falls through to the wildcard
    assert ident.match(db, 80) is None


def test_most_specific_network_is_tried_first() -> None:
    ident = identity_for("10.0.0.0/8:22", "10.1.0.0/16", "10.1.2.3:443")
    assert ident.match(parse_host("10.1.2.3"), 443).text == "10.1.2.3:443"
    assert ident.match(parse_host("10.1.2.3"), 80).text == "10.1.0.0/16"
    assert ident.match(parse_host("10.9.9.9"), 22).text == "10.0.0.0/8:22"
    assert ident.match(parse_host("10.9.9.9"), 80) is None


def test_nearest_wildcard_wins() -> None:
    ident = identity_for("*.example.com:443", "*.b.example.com")
    assert ident.match(parse_host("a.b.example.com"), 80).text == "*.b.example.com"
    assert ident.match(parse_host("a.c.example.com"), 443).text == "*.example.com:443"


def test_allows_address_uses_only_address_rules() -> None:
    ident = identity_for("metadata.internal", "169.254.169.254:80", "fd00:ec2::/64")
    metadata = parse_host("169.254.169.254").ip
    assert ident.allows_address(metadata, 80).text == "169.254.169.254:80"
    assert ident.allows_address(metadata, 443) is None
    assert ident.allows_address(parse_host("fd00:ec2::254").ip, 443).text == "fd00:ec2::/64"


def test_duplicate_entries_are_harmless() -> None:
    ident = identity_for("a.example.com", "a.example.com", "A.example.com.")
    assert len(ident.rules) == 3
    assert ident.match(parse_host("a.example.com"), 1).text == "a.example.com"


def test_rule_shape() -> None:
    rule = parse_destination("*.Corp.Example.:8000-8100")
    assert (rule.text, rule.kind, rule.ports, rule.target) == (
        "*.Corp.Example.:8000-8100", "wildcard", PortRange(8000, 8100), "corp.example",
    )
    assert parse_destination("[2001:DB8::/32]:443").target == "2001:db8::/32"
    assert parse_destination("::ffff:10.0.0.0/104").target == "10.0.0.0/8"


# --- properties ---------------------------------------------------------------------------

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8).filter(
    lambda s: s[0] not in "-0123456789" and s[-1] != "-"
)
NAME = st.lists(LABEL, min_size=1, max_size=4).map(".".join)


def mixed_case(data: st.DataObject, text: str) -> str:
    flips = data.draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if f else c for c, f in zip(text, flips))


@settings(max_examples=200, deadline=None)
@given(suffix=NAME, prefix=LABEL, deeper=st.lists(LABEL, max_size=3), port=st.integers(1, 65535))
def test_property_wildcard_never_matches_apex_or_partial_label(
    suffix: str, prefix: str, deeper: list[str], port: int
) -> None:
    ident = identity_for(f"*.{suffix}")
    assert ident.match(parse_host(suffix), port) is None
    # "evil" + "cdn.example.com", also below further labels: a suffix, but not on a boundary.
    glued = ".".join([*deeper, prefix + suffix])
    assert ident.match(parse_host(glued), port) is None
    if "." in suffix:
        # Only the parent of the wildcard's domain: never matched either.
        assert ident.match(parse_host(suffix.split(".", 1)[1]), port) is None
    name = ".".join([*deeper, prefix, suffix])
    assert ident.match(parse_host(name), port) is not None


@settings(max_examples=200, deadline=None)
@given(name=NAME, data=st.data())
def test_property_matching_is_case_insensitive(name: str, data: st.DataObject) -> None:
    rule_text = mixed_case(data, name)
    request = mixed_case(data, name)
    ident = identity_for(rule_text, f"*.{mixed_case(data, name)}")
    assert ident.match(parse_host(request), 443).kind == "domain"
    assert ident.match(parse_host("sub." + request), 443).kind == "wildcard"


@settings(max_examples=200, deadline=None)
@given(name=NAME, rule_dot=st.booleans(), request_dot=st.booleans())
def test_property_trailing_dot_is_irrelevant(name: str, rule_dot: bool, request_dot: bool) -> None:
    ident = identity_for(name + ("." if rule_dot else ""))
    assert ident.match(parse_host(name + ("." if request_dot else "")), 443) is not None
