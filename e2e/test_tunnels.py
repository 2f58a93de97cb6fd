"""Tunnels over time and in numbers (issue 2): idle tunnels end after IDLE_TIMEOUT,
200 concurrent tunnels each carry their own bytes, and the tunnel metrics move."""

from __future__ import annotations

import socket
import threading
import time

from _support import (
    Proxy,
    Upstream,
    closed_by_peer,
    connect,
    recv_exactly,
    recv_until_eof,
    tls_wrap,
    wait_until,
)

POLICY = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
  db:
    api_keys: ["db-key"]
    require_tls: false
    allowed_destinations: ["127.0.0.1"]
"""


def test_idle_timeout_ends_a_silent_tunnel(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY, IDLE_TIMEOUT="1")
    with connect(proxy, f"api.example.com:{tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        stream.sendall(b"x")
        assert recv_exactly(stream, 1) == b"x"
        started = time.monotonic()
        assert closed_by_peer(stream, 5), "a silent tunnel outlived IDLE_TIMEOUT=1"
        elapsed = time.monotonic() - started
        stream.close()
    assert 0.8 <= elapsed < 3.5, elapsed
    summary = proxy.wait_log(lambda l: l.get("message") == "tunnel closed")
    assert "idle" in summary["ended_by"], summary
    assert summary["identity"] == "app"


def test_traffic_keeps_a_tunnel_alive_past_idle_timeout(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY, IDLE_TIMEOUT="1")
    with connect(proxy, f"api.example.com:{tls_upstream.port}", "app-key") as reply:
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        for _ in range(6):  # 2.4 s in all, never 1 s of silence
            stream.sendall(b"tick")
            assert recv_exactly(stream, 4) == b"tick"
            time.sleep(0.4)
        stream.close()


def test_200_concurrent_tunnels(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY)
    count = 200
    opened = threading.Barrier(count + 1, timeout=60)
    release = threading.Barrier(count + 1, timeout=60)
    errors: list[str] = []
    echoed = [False] * count

    def client(index: int) -> None:
        stream = None
        try:
            reply = connect(proxy, f"api.example.com:{tls_upstream.port}", "app-key", timeout=30)
            assert reply.status == 200, reply.status
            stream = tls_wrap(reply.sock, ca, "api.example.com", timeout=30)
            payload = f"tunnel {index:03d} ".encode() * (index + 1)
            stream.sendall(payload)
            assert recv_exactly(stream, len(payload), timeout=30) == payload
            opened.wait()
            release.wait()
            stream.sendall(payload[::-1])
            assert recv_exactly(stream, len(payload), timeout=30) == payload[::-1]
            echoed[index] = True
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{index}: {type(error).__name__}: {error}")
            opened.abort()
            release.abort()
        finally:
            if stream is not None:
                stream.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        opened.wait()
        active = proxy.metrics().value("egress_proxy_active_tunnels")
        release.wait()
    except threading.BrokenBarrierError:
        active = None
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:5]
    assert all(echoed)
    assert active == count
    assert wait_until(lambda: proxy.metrics().value("egress_proxy_active_tunnels") == 0, 5)
    metrics = proxy.metrics()
    assert metrics.value("egress_proxy_requests_total", identity="app", status="allowed") == count
    assert metrics.value("egress_proxy_tunnel_duration_seconds_count") == count
    # Lines are flushed at the end of the proxy's event-loop iteration: allow for it.
    def closed_lines() -> list[dict]:
        return [l for l in proxy.log_lines() if l.get("message") == "tunnel closed"]

    wait_until(lambda: len(closed_lines()) >= count, 5)
    summaries = closed_lines()
    assert len(summaries) == count
    for direction in ("up", "down"):
        total = sum(l[f"bytes_{direction}"] for l in summaries)
        assert metrics.value("egress_proxy_bytes_total", identity="app", direction=f"{direction}stream") == total


def test_bulk_transfer_both_ways_is_exact_and_counted(start_proxy, fresh_echo_upstream: Upstream) -> None:
    proxy: Proxy = start_proxy(POLICY)
    data = bytes(range(256)) * (2 * 1024 * 1024 // 256)  # 2 MiB
    with connect(proxy, f"127.0.0.1:{fresh_echo_upstream.port}", "db-key", timeout=30) as reply:
        assert reply.status == 200

        def send() -> None:
            reply.sock.sendall(data)
            reply.sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = recv_until_eof(reply.sock, timeout=30)
        sender.join(30)
    trailer = b"EOF:%d" % len(data)
    assert len(got) == len(data) + len(trailer)
    assert got[: len(data)] == data and got[len(data):] == trailer
    summary = proxy.wait_log(lambda l: l.get("message") == "tunnel closed")
    assert summary["bytes_up"] == len(data)
    assert summary["bytes_down"] == len(data) + len(trailer)
    metrics = proxy.metrics()
    assert metrics.value("egress_proxy_bytes_total", identity="db", direction="upstream") == len(data)
    assert metrics.value("egress_proxy_bytes_total", identity="db", direction="downstream") == len(got)
