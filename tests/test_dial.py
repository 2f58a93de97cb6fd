"""Resolve once, judge every address, dial a judged one — with an injected resolver.

The resolver is a plain function handed to the server (no system files are touched);
dials go to real loopback listeners.
"""

from __future__ import annotations

import ipaddress

import gevent
import pytest
from gevent import socket
from prometheus_client import CollectorRegistry

import policy
from egress_guard import Attempt, EgressGuard
from proxy.dial import ResolveError, load_hosts_file
from proxy.errors import Refusal
from proxy.observe import Metrics
from proxy.settings import Settings

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


def guard_with(resolver, **settings) -> tuple[EgressGuard, policy.Policy]:
    current = policy.load_policy_text(POLICY)
    guard = EgressGuard(Settings(**settings), current, Metrics(CollectorRegistry()), resolver)
    return guard, current


def dial(guard: EgressGuard, current: policy.Policy, key: str, host: str, port: int):
    attempt = Attempt("test")
    attempt.host, attempt.port = policy.parse_host(host), port
    identity = current.authenticate(key)
    return guard.resolve_and_dial(current, identity, attempt), attempt


def test_name_resolving_to_a_forbidden_address_is_refused_without_dialling() -> None:
    resolver = Resolver({"svc.example.com": ["169.254.169.254"]})
    guard, current = guard_with(resolver)
    with pytest.raises(Refusal) as caught:
        dial(guard, current, "k1", "svc.example.com", 80)
    assert caught.value.status == 403 and "169.254.0.0/16" in caught.value.message
    assert resolver.calls == ["svc.example.com"]


def test_one_forbidden_address_among_public_ones_refuses_the_name() -> None:
    resolver = Resolver({"svc.example.com": ["203.0.113.7", "127.0.0.1"]})
    guard, current = guard_with(resolver)
    with pytest.raises(Refusal) as caught:
        dial(guard, current, "k1", "svc.example.com", 443)
    assert caught.value.status == 403 and "loopback" in caught.value.message


def test_explicit_cidr_lets_the_vetted_address_be_dialled_once(listener) -> None:
    port = listener.getsockname()[1]
    resolver = Resolver({"svc.example.com": ["127.0.0.1"]})
    guard, current = guard_with(resolver)
    (upstream, address), attempt = dial(guard, current, "k2", "svc.example.com", port)
    try:
        assert str(address) == "127.0.0.1" and upstream.getpeername() == ("127.0.0.1", port)
        assert resolver.calls == ["svc.example.com"]  # resolved once, never again at connect
    finally:
        upstream.close()


def test_falls_through_to_the_next_vetted_address(listener) -> None:
    port = listener.getsockname()[1]
    # 127.0.0.2 is loopback too but nothing listens there: refused, then the next one.
    resolver = Resolver({"svc.example.com": ["127.0.0.2", "127.0.0.1"]})
    guard, current = guard_with(resolver)
    (upstream, address), _ = dial(guard, current, "k2", "svc.example.com", port)
    upstream.close()
    assert str(address) == "127.0.0.1"


def test_ipv4_mapped_answers_are_judged_as_ipv4() -> None:
    resolver = Resolver({"svc.example.com": ["::ffff:127.0.0.1"]})
    guard, current = guard_with(resolver)
    with pytest.raises(Refusal) as caught:
        dial(guard, current, "k1", "svc.example.com", 443)
    assert caught.value.status == 403


@pytest.mark.parametrize(
    "resolver,error",
    [
        (Resolver({}, fail="Name or service not known"), "Name or service not known"),
        (Resolver({}), "no addresses"),
    ],
    ids=["nxdomain", "empty-answer"],
)
def test_resolution_failures_are_502(resolver: Resolver, error: str) -> None:
    guard, current = guard_with(resolver)
    with pytest.raises(Refusal) as caught:
        dial(guard, current, "k1", "svc.example.com", 443)
    assert caught.value.status == 502 and caught.value.word == "connection_failed"
    assert error in caught.value.error


def test_system_resolver_bounds_a_hanging_lookup(monkeypatch) -> None:
    from proxy import dial as dial_module

    def hanging_getaddrinfo(*args, **kwargs):
        gevent.sleep(30)

    monkeypatch.setattr(dial_module.socket, "getaddrinfo", hanging_getaddrinfo)
    resolve = dial_module.system_resolver({"pinned.example": [ipaddress.ip_address("192.0.2.1")]})
    assert [str(a) for a in resolve("pinned.example", 0.01)] == ["192.0.2.1"]  # table hit: no lookup
    guard, current = guard_with(resolve, connect_timeout=0.3)
    with gevent.Timeout(3):
        with pytest.raises(Refusal) as caught:
            dial(guard, current, "k1", "svc.example.com", 443)
    assert caught.value.status == 502 and caught.value.error == "DNS lookup timed out"


def test_refused_connection_is_502(listener) -> None:
    port = listener.getsockname()[1]
    listener.close()
    guard, current = guard_with(Resolver({}))
    with pytest.raises(Refusal) as caught:
        dial(guard, current, "k2", "127.0.0.1", port)
    assert caught.value.status == 502 and "refused" in caught.value.error.lower()


def test_hosts_file(tmp_path) -> None:
    path = tmp_path / "hosts"
    path.write_text("# comment\n127.0.0.1 a.example B.Example.\n::1 a.example\n\n")
    table = load_hosts_file(str(path))
    assert [str(a) for a in table["a.example"]] == ["127.0.0.1", "::1"]
    assert [str(a) for a in table["b.example"]] == ["127.0.0.1"]
    path.write_text("127.1 a.example\n")
    with pytest.raises(ValueError, match="hosts:1"):
        load_hosts_file(str(path))
