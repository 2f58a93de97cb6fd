"""Connection limits end to end (issue 3 item 5): MAX_CONNECTIONS answers 503 quickly
instead of hanging, and HEADER_TIMEOUT keeps 300 silent clients from delaying a real one."""

from __future__ import annotations

import socket
import time

from _support import (
    APP_POLICY,
    Proxy,
    Upstream,
    connect,
    open_client,
    read_reply,
    recv_exactly,
    tls_wrap,
    wait_until,
)

POLICY = APP_POLICY


def silent_clients(proxy: Proxy, count: int) -> list[socket.socket]:
    socks = []
    try:
        for _ in range(count):
            socks.append(open_client(proxy))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def client_connections(proxy: Proxy) -> float:
    return proxy.metrics().value("egress_proxy_client_connections")


def wait_accepted(proxy: Proxy, count: int) -> None:
    """Until the proxy holds `count` client connections (its gauge says so)."""
    assert wait_until(lambda: client_connections(proxy) >= count, 5), client_connections(proxy)


def test_max_connections_answers_503_quickly(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY, MAX_CONNECTIONS="5", HEADER_TIMEOUT="30")
    held = silent_clients(proxy, 5)
    try:
        wait_accepted(proxy, 5)
        before = proxy.requests_total(status="limited")
        started = time.monotonic()
        with connect(proxy, f"api.example.com:{tls_upstream.port}", "app-key", timeout=5) as reply:
            assert reply.status == 503, (reply.status, reply.body)
            assert reply.reason == "Service Unavailable"
            assert reply.headers.get("retry-after", "").isdigit()
            assert reply.body.startswith(b"egress-guard: ")
        assert time.monotonic() - started < 1, "the extra client waited instead of getting a 503"
        assert wait_until(lambda: proxy.requests_total(status="limited") == before + 1, 2)
        line = proxy.wait_log(lambda l: l.get("action") == "limited")
        assert line["identity"] == "-"
    finally:
        for sock in held:
            sock.close()

    def served() -> bool:
        with connect(proxy, f"api.example.com:{tls_upstream.port}", "app-key") as again:
            if again.status != 200:
                return False
            stream = tls_wrap(again.sock, ca, "api.example.com")
            stream.sendall(b"ok")
            ok = recv_exactly(stream, 2) == b"ok"
            stream.close()
            return ok

    assert wait_until(served, 3, interval=0.1), "closing the held connections did not free their slots"


def test_max_connections_admits_exactly_the_limit(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY, MAX_CONNECTIONS="5", HEADER_TIMEOUT="30")
    held = silent_clients(proxy, 4)
    try:
        wait_accepted(proxy, 4)
        with connect(proxy, f"api.example.com:{tls_upstream.port}", "app-key", timeout=5) as reply:
            assert reply.status == 200, "the fifth connection was refused with MAX_CONNECTIONS=5"
            stream = tls_wrap(reply.sock, ca, "api.example.com")
            stream.sendall(b"fifth")
            assert recv_exactly(stream, 5) == b"fifth"
            stream.close()
    finally:
        for sock in held:
            sock.close()


def test_300_silent_clients_do_not_delay_a_real_one(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY, HEADER_TIMEOUT="2")
    held = silent_clients(proxy, 300)
    try:
        wait_accepted(proxy, 300)
        started = time.monotonic()
        with connect(proxy, f"api.example.com:{tls_upstream.port}", "app-key", timeout=5) as reply:
            assert reply.status == 200
            stream = tls_wrap(reply.sock, ca, "api.example.com", timeout=5)
            stream.sendall(b"not delayed")
            assert recv_exactly(stream, 11) == b"not delayed"
            stream.close()
        assert time.monotonic() - started < 1, "a real client was delayed by silent ones"
        # HEADER_TIMEOUT frees them: each gets a 408 and is closed. Their deadlines are
        # armed as their handlers first wait, so they expire over a few sweeps: keep every
        # socket open until all 300 are counted (a client closing first is no timeout).
        for sock in [*held[::50], held[-1]]:
            reply = read_reply(sock, timeout=5)
            assert reply.status == 408
        assert wait_until(lambda: proxy.requests_total(identity="-", status="timeout") >= 300, 5), \
            proxy.metrics().series("egress_proxy_requests_total")
    finally:
        for sock in held:
            sock.close()
