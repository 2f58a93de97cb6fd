"""Resolve once, judge every address, dial a judged one — with an injected resolver.

The resolver is a plain function handed to `open_upstream` (no system files are
touched, no server is built); dials go to real loopback listeners.
"""

from __future__ import annotations

import ipaddress

import gevent
import pytest
from gevent import socket

import policy
from proxy.admission import open_upstream
from proxy.deadlines import Sweeper
from proxy.dial import ResolveError, load_hosts_file
from proxy.flow import Flow
from proxy.refusal import Refusal

POLICY = """
identities:
  names-only:
    api_keys: [k1]
    allowed_destinations: ["svc.example.com", "*.example.org"]
  with-loopback:
    api_keys: [k2]
    allowed_destinations: ["svc.example.com", "127.0.0.0/8"]
"""


class Resolver:
    """Answers from a table and records every lookup."""

    def __init__(self, table: dict[str, list[str]], *, fail: str | None = None) -> None:
        self.table = {name: [ipaddress.ip_address(a) for a in addrs] for name, addrs in table.items()}
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, name: str, timeout: float):
        self.calls.append(name)
        if self.fail:
            raise ResolveError(self.fail)
        return list(self.table.get(name, []))


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


CURRENT = policy.load_policy_text(POLICY)


def dial(resolver, key: str, host: str, port: int, timeout: float = 10.0):
    """(upstream socket, address dialled), as the proxy opens a tunnel for `key`."""
    flow = Flow("test")
    flow.key = key
    flow.target(policy.parse_host(host), port)
    upstream = open_upstream(CURRENT, CURRENT.authenticate(key), flow, resolver, timeout, Sweeper(set(), 0))
    return upstream, flow.address


def test_name_resolving_to_a_forbidden_address_is_refused_without_dialling() -> None:
    resolver = Resolver({"svc.example.com": ["169.254.169.254"]})
    with pytest.raises(Refusal) as caught:
        dial(resolver, "k1", "svc.example.com", 80)
    assert caught.value.http == 403 and "169.254.0.0/16" in caught.value.reason
    assert caught.value.kind == "destination_ip_prohibited"
    assert resolver.calls == ["svc.example.com"]


def test_one_forbidden_address_among_public_ones_refuses_the_name() -> None:
    resolver = Resolver({"svc.example.com": ["203.0.113.7", "127.0.0.1"]})
    with pytest.raises(Refusal) as caught:
        dial(resolver, "k1", "svc.example.com", 443)
    assert caught.value.http == 403 and "loopback" in caught.value.reason


def test_explicit_cidr_lets_the_vetted_address_be_dialled_once(listener) -> None:
    port = listener.getsockname()[1]
    resolver = Resolver({"svc.example.com": ["127.0.0.1"]})
    upstream, address = dial(resolver, "k2", "svc.example.com", port)
    try:
        assert str(address) == "127.0.0.1" and upstream.sock.getpeername() == ("127.0.0.1", port)
        assert resolver.calls == ["svc.example.com"]  # resolved once, never again at connect
    finally:
        upstream.close()


def test_falls_through_to_the_next_vetted_address(listener) -> None:
    port = listener.getsockname()[1]
    # 127.0.0.2 is loopback too but nothing listens there: refused, then the next one.
    resolver = Resolver({"svc.example.com": ["127.0.0.2", "127.0.0.1"]})
    upstream, address = dial(resolver, "k2", "svc.example.com", port)
    upstream.close()
    assert str(address) == "127.0.0.1"


def test_ipv4_mapped_answers_are_judged_as_ipv4() -> None:
    resolver = Resolver({"svc.example.com": ["::ffff:127.0.0.1"]})
    with pytest.raises(Refusal) as caught:
        dial(resolver, "k1", "svc.example.com", 443)
    assert caught.value.http == 403


@pytest.mark.parametrize(
    "resolver,error",
    [
        (Resolver({}, fail="Name or service not known"), "Name or service not known"),
        (Resolver({}), "no addresses"),
    ],
    ids=["nxdomain", "empty-answer"],
)
def test_resolution_failures_are_502(resolver: Resolver, error: str) -> None:
    with pytest.raises(Refusal) as caught:
        dial(resolver, "k1", "svc.example.com", 443)
    assert caught.value.http == 502 and caught.value.status == "connection_failed"
    assert error in caught.value.error
    assert caught.value.kind == "dns_error"


def test_system_resolver_bounds_a_hanging_lookup(monkeypatch) -> None:
    from proxy import dial as dial_module

    def hanging_getaddrinfo(*args, **kwargs):
        gevent.sleep(30)

    monkeypatch.setattr(dial_module.socket, "getaddrinfo", hanging_getaddrinfo)
    resolve = dial_module.system_resolver({"pinned.example": [ipaddress.ip_address("192.0.2.1")]})
    assert [str(a) for a in resolve("pinned.example", 0.01)] == ["192.0.2.1"]  # table hit: no lookup
    with gevent.Timeout(3):
        with pytest.raises(Refusal) as caught:
            dial(resolve, "k1", "svc.example.com", 443, timeout=0.3)
    assert caught.value.http == 502 and caught.value.error == "DNS lookup timed out"
    assert caught.value.kind == "dns_timeout"


def test_refused_connection_is_502(listener) -> None:
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(Refusal) as caught:
        dial(Resolver({}), "k2", "127.0.0.1", port)
    assert caught.value.http == 502 and caught.value.kind == "connection_refused"
    assert caught.value.error == f"127.0.0.1:{port}: Connection refused"


def test_every_failed_address_is_named(listener) -> None:
    port = listener.getsockname()[1]
    listener.close()
    resolver = Resolver({"svc.example.com": ["127.0.0.2", "127.0.0.3"]})
    flow = Flow("test")
    flow.key = "k2"
    flow.target(policy.parse_host("svc.example.com"), port)
    with pytest.raises(Refusal) as caught:
        open_upstream(CURRENT, CURRENT.authenticate("k2"), flow, resolver, 10.0, Sweeper(set(), 0))
    assert caught.value.error == (f"127.0.0.2:{port}: Connection refused; "
                                  f"127.0.0.3:{port}: Connection refused")
    assert str(flow.address) == "127.0.0.3"


def test_hosts_file(tmp_path) -> None:
    path = tmp_path / "hosts"
    path.write_text("# comment\n127.0.0.1 a.example B.Example.\n::1 a.example\n\n")
    table = load_hosts_file(str(path))
    assert [str(a) for a in table["a.example"]] == ["127.0.0.1", "::1"]
    assert [str(a) for a in table["b.example"]] == ["127.0.0.1"]
    path.write_text("127.1 a.example\n")
    with pytest.raises(ValueError, match="hosts:1"):
        load_hosts_file(str(path))
