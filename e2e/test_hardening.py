"""Security hardening end to end (issue 3, every item observable from outside):
resolve once and refuse forbidden addresses, explicit IP/CIDR overrides, embedded-IPv4
forms, port rules, hashed keys, max_tunnels, bounded metric labels, duplicate
credentials, and report mode.

HOSTS_FILE maps api/other/evil.example.com to 127.0.0.1, metadata.example.com to
169.254.169.254, mapped.example.com to ::ffff:127.0.0.1 and nat64.example.com to
64:ff9b::7f00:1 (see _support.HOSTS).
"""

from __future__ import annotations

import hashlib
import secrets
import ssl
import time

import pytest
from _support import (
    Proxy,
    Upstream,
    assert_never_dialled,
    connect,
    curl,
    free_port,
    recv_exactly,
    tls_wrap,
    wait_until,
)

HASHED_KEY = "hashed-Secret-0c41d7"
POLICY = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations: ["api.example.com", "other.example.com", "127.0.0.1"]
  names:
    api_keys: ["names-key"]
    allowed_destinations: ["*.example.com"]
  portover:
    api_keys: ["portover-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1:{port}"]
  loopback:
    api_keys: ["loopback-key"]
    allowed_destinations: ["*.example.com", "127.0.0.0/8"]
  ported:
    api_keys: ["ported-key"]
    allowed_destinations: ["api.example.com:{port}", "127.0.0.1:{port}"]
  hashed:
    api_keys: ["sha256:{digest}"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
  limited:
    api_keys: ["limited-key"]
    max_tunnels: 2
    allowed_destinations: ["api.example.com", "127.0.0.1"]
  bounded:
    api_keys: ["bounded-key"]
    allowed_destinations: ["api.example.com"]
  idn:
    api_keys: ["idn-key"]
    allowed_destinations: ["bücher.example.com", "p\u0430ypal.example.com", "127.0.0.1"]
  watcher:
    api_keys: ["watcher-key"]
    mode: report
    allowed_destinations: ["api.example.com", "127.0.0.1"]
"""


@pytest.fixture(scope="module")
def proxy(module_proxies, tls_upstream: Upstream) -> Proxy:
    digest = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    return module_proxies(POLICY.format(port=tls_upstream.port, digest=digest))


def works(proxy: Proxy, ca, target: str, key: str, sni: str | None) -> dict:
    """A full tunnel: 200, TLS handshake, echo. Returns the decision line."""
    with connect(proxy, target, key) as reply:
        assert reply.status == 200, (reply.status, reply.body)
        stream = tls_wrap(reply.sock, ca, sni)
        stream.sendall(b"echo me")
        assert recv_exactly(stream, 7) == b"echo me"
        line = proxy.decision(reply)
        stream.close()
    return line


def forbidden(proxy: Proxy, target: str, key: str, range_text: str) -> dict:
    started = time.monotonic()
    with connect(proxy, target, key) as reply:
        assert reply.status == 403, (reply.status, reply.body)
        line = proxy.decision(reply)
    assert time.monotonic() - started < 1.5, "a forbidden address must be refused without dialling"
    assert line["action"] == "denied"
    assert range_text in line["reason"], line
    return line


# -- resolve once, check every address ---------------------------------------------------------


def test_name_resolving_to_loopback_is_403_and_never_dialled(proxy: Proxy, fresh_tls_upstream: Upstream) -> None:
    line = forbidden(proxy, f"api.example.com:{fresh_tls_upstream.port}", "names-key", "127.0.0.0/8")
    assert_never_dialled(line, fresh_tls_upstream)


def test_metadata_address_is_403_without_dialling(proxy: Proxy) -> None:
    # 169.254.169.254 does not answer here: a dial would hang until CONNECT_TIMEOUT (502).
    line = forbidden(proxy, "metadata.example.com:80", "names-key", "169.254.0.0/16")
    assert "address" not in line, "the decision records a dialled address"


FORBIDDEN_NAMES = {
    # name (see _support.HOSTS): the range the log reason must name
    "mapped.example.com": "127.0.0.0/8",      # ::ffff:127.0.0.1
    "nat64.example.com": "127.0.0.0/8",       # 64:ff9b::7f00:1
    "sixtofour.example.com": "127.0.0.0/8",   # 2002:7f00:1::1
    "teredo.example.com": "127.0.0.0/8",      # client 127.0.0.1 (stored inverted)
    "v6loop.example.com": "::1/128",
    "awsmeta.example.com": "fd00:ec2::254",
    "cgnat.example.com": "100.64.0.0/10",
    "zero.example.com": "0.0.0.0/8",
    "multicast.example.com": "224.0.0.0/4",
    "broadcast.example.com": "255.255.255.255",
    "linklocal6.example.com": "fe80::/10",
}


@pytest.mark.parametrize("host,range_text", FORBIDDEN_NAMES.items(), ids=FORBIDDEN_NAMES.keys())
def test_name_resolving_to_a_forbidden_range_is_403(proxy: Proxy, host: str, range_text: str) -> None:
    forbidden(proxy, f"{host}:443", "names-key", range_text)


def test_one_forbidden_address_among_several_refuses_the_name(proxy: Proxy, tls_upstream: Upstream) -> None:
    # mixed.example.com is 127.0.0.1 (allowed here by CIDR) and 169.254.169.254 (not).
    forbidden(proxy, f"mixed.example.com:{tls_upstream.port}", "loopback-key", "169.254.0.0/16")


def test_dial_falls_back_to_the_next_vetted_address(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    # multi.example.com is 127.0.0.2 (nothing listens: refused) then 127.0.0.1.
    with connect(proxy, f"multi.example.com:{tls_upstream.port}", "loopback-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "multi.example.com", check_hostname=False)  # cert lacks the name
        stream.sendall(b"second address")
        assert recv_exactly(stream, 14) == b"second address"
        line = proxy.decision(reply)
        stream.close()
    assert line["address"] == "127.0.0.1", line
    assert line["action"] == "allowed"


def test_explicit_ip_override_reaches_a_forbidden_address(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    line = works(proxy, ca, f"api.example.com:{tls_upstream.port}", "app-key", "api.example.com")
    assert line["address"] == "127.0.0.1"
    line = works(proxy, ca, f"127.0.0.1:{tls_upstream.port}", "app-key", None)
    assert line["action"] == "allowed"


def test_ipv4_mapped_literal_is_judged_as_ipv4(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    target = f"[::ffff:127.0.0.1]:{tls_upstream.port}"
    line = works(proxy, ca, target, "app-key", None)  # allowed by the explicit "127.0.0.1"
    assert line["destination"] == f"127.0.0.1:{tls_upstream.port}", line
    with connect(proxy, target, "names-key") as reply:
        assert reply.status == 403


def test_nat64_literal_is_not_a_way_to_loopback(proxy: Proxy, tls_upstream: Upstream) -> None:
    for key in ("app-key", "names-key"):
        with connect(proxy, f"[64:ff9b::7f00:1]:{tls_upstream.port}", key) as reply:
            assert reply.status == 403, key


# -- IDNA --------------------------------------------------------------------------------------------


def test_unicode_rule_matches_its_punycode_name(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    line = works(proxy, ca, f"xn--bcher-kva.example.com:{tls_upstream.port}", "idn-key",
                 "xn--bcher-kva.example.com")
    assert line["action"] == "allowed" and line["identity"] == "idn", line


def test_look_alike_rule_does_not_match_the_ascii_name(proxy: Proxy, tls_upstream: Upstream) -> None:
    # The rule is "pаypal" with a Cyrillic а: it is xn--pypal-4ve, not paypal.
    with connect(proxy, f"paypal.example.com:{tls_upstream.port}", "idn-key") as reply:
        assert reply.status == 403
    with connect(proxy, f"xn--pypal-4ve.example.com:{tls_upstream.port}", "idn-key") as reply:
        assert reply.status == 200


# -- port rules -----------------------------------------------------------------------------------


def test_port_rule_allows_only_its_port(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    line = works(proxy, ca, f"api.example.com:{tls_upstream.port}", "ported-key", "api.example.com")
    assert line["rule"] == f"api.example.com:{tls_upstream.port}"
    other = free_port()
    for target in [f"api.example.com:{other}", "api.example.com:443", f"127.0.0.1:{other}"]:
        with connect(proxy, target, "ported-key") as reply:
            assert reply.status == 403, target
            assert proxy.decision(reply)["action"] == "denied"


def test_address_override_is_limited_to_its_port(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    # "api.example.com" allows any port, but the loopback override only covers one port.
    works(proxy, ca, f"api.example.com:{tls_upstream.port}", "portover-key", "api.example.com")
    forbidden(proxy, f"api.example.com:{free_port()}", "portover-key", "127.0.0.0/8")


def test_wildcard_does_not_match_its_apex(proxy: Proxy) -> None:
    for host in ("example.com", "evilexample.com"):
        with connect(proxy, f"{host}:443", "names-key") as reply:
            assert reply.status == 403, host
            assert proxy.decision(reply)["reason"] == "destination not allowed"


# -- hashed keys -------------------------------------------------------------------------------------


def test_hashed_key_works_end_to_end(proxy: Proxy, tls_upstream: Upstream, ca, ca_pem) -> None:
    done = curl(proxy, f"https://api.example.com:{tls_upstream.port}/", HASHED_KEY, ca_pem)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from upstream\n"
    line = works(proxy, ca, f"api.example.com:{tls_upstream.port}", HASHED_KEY, "api.example.com")
    assert line["identity"] == "hashed"


def test_the_digest_itself_is_not_a_key(proxy: Proxy, tls_upstream: Upstream) -> None:
    digest = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    with connect(proxy, f"api.example.com:{tls_upstream.port}", digest) as reply:
        assert reply.status == 407


# -- max_tunnels ------------------------------------------------------------------------------------


def test_max_tunnels_refuses_the_extra_tunnel_until_one_closes(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    target = f"api.example.com:{tls_upstream.port}"
    before = proxy.requests_total(identity="limited", status="limited")
    open_ = []
    try:
        for _ in range(2):
            reply = connect(proxy, target, "limited-key")
            assert reply.status == 200
            stream = tls_wrap(reply.sock, ca, "api.example.com")
            stream.sendall(b"hold")
            assert recv_exactly(stream, 4) == b"hold"
            open_.append((reply, stream))
        with connect(proxy, target, "limited-key") as reply:
            assert reply.status == 429, (reply.status, reply.body)
            assert reply.reason == "Too Many Requests"
            assert reply.headers.get("retry-after", "").isdigit(), reply.headers
            assert reply.body.startswith(b"egress-guard: ")
            line = proxy.decision(reply)
        assert line["action"] == "limited" and line["identity"] == "limited"
        assert proxy.requests_total(identity="limited", status="limited") == before + 1
        # Another identity is not limited by this one's slots.
        works(proxy, ca, target, "app-key", "api.example.com")
        reply, stream = open_.pop()
        stream.close()
        reply.close()

        def admitted() -> bool:
            with connect(proxy, target, "limited-key") as again:
                return again.status == 200

        assert wait_until(admitted, 3, interval=0.1), "the slot was not freed when the tunnel closed"
    finally:
        for reply, stream in open_:
            stream.close()
            reply.close()


def test_max_tunnels_slot_freed_after_a_refused_hello(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    """Tunnels that end before the pump (SNI refused) must give their slot back too."""
    target = f"api.example.com:{tls_upstream.port}"
    for _ in range(4):
        with connect(proxy, target, "limited-key") as reply:
            assert reply.status == 200
            with pytest.raises(ssl.SSLError):
                tls_wrap(reply.sock, ca, "other.example.com")
    assert wait_until(lambda: works(proxy, ca, target, "limited-key", "api.example.com"), 3)


# -- bounded metrics ---------------------------------------------------------------------------------


def test_unauthenticated_requests_mint_no_series(proxy: Proxy) -> None:
    names = [f"rnd-{secrets.token_hex(6)}.example.net" for _ in range(50)]
    before = proxy.requests_total(identity="-", destination="", status="auth_required")
    series_before = len(proxy.metrics())
    for name in names:
        with connect(proxy, f"{name}:443", None) as reply:
            assert reply.status == 407
    metrics = proxy.metrics()
    text = repr(list(metrics))
    assert not any(name in text for name in names), "a client-chosen host became a label value"
    assert metrics.value("egress_proxy_requests_total", identity="-", destination="", status="auth_required") \
        == before + 50
    assert len(metrics) - series_before <= 2


def test_unknown_key_with_random_hosts_mints_no_series(proxy: Proxy) -> None:
    names = [f"rnd-{secrets.token_hex(6)}.example.net" for _ in range(20)]
    for name in names:
        with connect(proxy, f"{name}:443", f"key-{secrets.token_hex(4)}") as reply:
            assert reply.status == 407
    text = repr(list(proxy.metrics()))
    assert not any(name in text for name in names)


def test_destination_labels_are_capped_per_identity(proxy: Proxy) -> None:
    names = [f"denied-{i:03d}-{secrets.token_hex(3)}.example.net" for i in range(120)]
    for name in names:
        with connect(proxy, f"{name}:443", "bounded-key") as reply:
            assert reply.status == 403
    metrics = proxy.metrics()
    destinations = {s["destination"] for s in metrics.series("egress_proxy_requests_total")
                    if s.get("identity") == "bounded"}
    assert "other" in destinations
    assert len(destinations) <= 101, len(destinations)
    assert metrics.value("egress_proxy_requests_total", identity="bounded", destination="other",
                         status="denied") >= 20
    assert metrics.value("egress_proxy_requests_total", identity="bounded", status="denied") == 120


# -- duplicate credentials ------------------------------------------------------------------------------


def test_duplicate_proxy_authorization_is_400(proxy: Proxy, fresh_tls_upstream: Upstream) -> None:
    import base64

    second = "Proxy-Authorization: Basic " + base64.b64encode(b"names-key:x").decode()
    with connect(proxy, f"api.example.com:{fresh_tls_upstream.port}", "app-key", headers=[second]) as reply:
        assert reply.status == 400
        line = proxy.decision(reply)
    assert line["action"] == "bad_request"
    assert line["identity"] == "-"
    assert fresh_tls_upstream.since(0) == []


# -- report mode -----------------------------------------------------------------------------------------


def test_report_mode_lets_a_denied_destination_through_as_reported(proxy: Proxy, tls_upstream: Upstream,
                                                                   ca) -> None:
    before = proxy.requests_total(identity="watcher", destination="other.example.com", status="reported")
    line = works(proxy, ca, f"other.example.com:{tls_upstream.port}", "watcher-key", "other.example.com")
    assert line["action"] == "reported", line
    assert proxy.requests_total(identity="watcher", destination="other.example.com", status="reported") \
        == before + 1
    assert proxy.requests_total(identity="watcher", destination="other.example.com", status="allowed") == 0


def test_report_mode_allowed_destination_is_allowed(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    line = works(proxy, ca, f"api.example.com:{tls_upstream.port}", "watcher-key", "api.example.com")
    assert line["action"] == "allowed"


def test_report_mode_still_requires_a_known_key(proxy: Proxy, tls_upstream: Upstream) -> None:
    with connect(proxy, f"other.example.com:{tls_upstream.port}", "watcher-key-typo") as reply:
        assert reply.status == 407
        assert proxy.decision(reply)["action"] == "auth_required"


def test_status_words_are_the_documented_set(proxy: Proxy) -> None:
    """Runs last in this module: everything above used only the README's status words."""
    proxy.assert_status_words()
