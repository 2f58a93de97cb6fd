"""The process (issue 2 items 1, 5, 7, 8): startup errors, /health /ready /metrics,
JSON logs without secrets, and draining shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import base64
import json
import signal
import socket
import time

import pytest
from _support import (
    APP_POLICY,
    Proxy,
    Upstream,
    closed_by_peer,
    connect,
    expect_startup_error,
    recv_exactly,
    tls_wrap,
    wait_until,
)

POLICY = APP_POLICY

METRIC_NAMES = [
    "egress_proxy_requests_total",
    "egress_proxy_config_reloads_total",
    "egress_proxy_config_load_errors_total",
    "egress_proxy_allowed_destinations",
    "egress_proxy_active_tunnels",
    "egress_proxy_bytes_total",
    "egress_proxy_tunnel_duration_seconds",
    "egress_proxy_tunnels_revoked_total",
]


def open_tunnel(proxy: Proxy, upstream: Upstream, ca):
    reply = connect(proxy, f"api.example.com:{upstream.port}", "app-key")
    assert reply.status == 200
    stream = tls_wrap(reply.sock, ca, "api.example.com")
    stream.sendall(b"open")
    assert recv_exactly(stream, 4) == b"open"
    return reply, stream


# -- exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0(start_proxy, signum: int) -> None:
    proxy: Proxy = start_proxy(POLICY)
    proxy.signal(signum)
    assert proxy.wait_exit(10) == 0, proxy.output()
    assert "Traceback" not in proxy.output(), proxy.output()
    messages = [l["message"] for l in proxy.log_lines()]
    assert messages[-1] == "stopped", proxy.output()


# -- startup errors ---------------------------------------------------------------------------

BAD_ENV = {
    "PROXY_PORT=abc": ({"PROXY_PORT": "abc"}, "PROXY_PORT"),
    "PROXY_PORT=0": ({"PROXY_PORT": "0"}, "PROXY_PORT"),
    "METRICS_PORT=70000": ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
    "IDLE_TIMEOUT=-1": ({"IDLE_TIMEOUT": "-1"}, "IDLE_TIMEOUT"),
    "IDLE_TIMEOUT=15m": ({"IDLE_TIMEOUT": "15m"}, "IDLE_TIMEOUT"),
    "HEADER_TIMEOUT=0": ({"HEADER_TIMEOUT": "0"}, "HEADER_TIMEOUT"),
    "WATCH_INTERVAL=nan": ({"WATCH_INTERVAL": "nan"}, "WATCH_INTERVAL"),
    "LOG_LEVEL=LOUD": ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    "MAX_CONNECTIONS=0": ({"MAX_CONNECTIONS": "0"}, "MAX_CONNECTIONS"),
    "PROXY_HOST=localhost:1": ({"PROXY_HOST": "localhost:1"}, "PROXY_HOST"),
}


@pytest.mark.parametrize("env,variable", BAD_ENV.values(), ids=BAD_ENV.keys())
def test_startup_error_bad_setting(start_proxy, env: dict, variable: str) -> None:
    proxy: Proxy = start_proxy(POLICY, _wait=False, **env)
    expect_startup_error(proxy, variable)


@pytest.mark.parametrize("which", ["PROXY_PORT", "METRICS_PORT"])
def test_startup_error_port_in_use(start_proxy, which: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proxy: Proxy = start_proxy(POLICY, _wait=False, **{which: str(port)})
        line = expect_startup_error(proxy, which)
        assert "in use" in line["message"], line


def test_startup_error_missing_policy(start_proxy, tmp_path) -> None:
    missing = tmp_path / "no-such-dir" / "egress-policy.yaml"
    proxy: Proxy = start_proxy(None, _wait=False, CONFIGMAP_PATH=str(missing))
    line = expect_startup_error(proxy)
    assert "not found" in json.dumps(line), line
    assert str(missing) in json.dumps(line), line


INVALID_POLICIES = {
    "yaml": ("identities: {app: [", "YAML"),
    "no-identities": ("settings: {}\n", "identities"),
    "bad-destination": (POLICY.replace('"127.0.0.1"', '"10.0.0.0/33"'), "10.0.0.0/33"),
    "duplicate-key": (POLICY + '  other:\n    api_keys: ["app-key"]\n    allowed_destinations: ["x.example.com"]\n',
                      "other"),
}


@pytest.mark.parametrize("text,word", INVALID_POLICIES.values(), ids=INVALID_POLICIES.keys())
def test_startup_error_invalid_policy(start_proxy, text: str, word: str) -> None:
    proxy: Proxy = start_proxy(text, _wait=False)
    line = expect_startup_error(proxy, word)
    assert "app-key" not in proxy.output(), "a policy error message leaked an API key"
    assert line["level"] == "ERROR"


# -- admin endpoints -----------------------------------------------------------------------------


def test_health_ready_and_metrics_endpoints(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY)
    status, headers, body = proxy.http_get("/health")
    assert status == 200 and json.loads(body) == {"status": "healthy"}
    status, _, body = proxy.http_get("/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    reply, stream = open_tunnel(proxy, tls_upstream, ca)
    try:
        status, headers, body = proxy.http_get("/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        text = body.decode()
        for name in METRIC_NAMES:
            assert f"# TYPE {name} " in text, name
        metrics = proxy.metrics()
        assert metrics.value("egress_proxy_active_tunnels") == 1
        assert metrics.value("egress_proxy_allowed_destinations", identity="app") == 2
    finally:
        stream.close()
        reply.close()
    assert wait_until(lambda: proxy.metrics().value("egress_proxy_active_tunnels") == 0, 5)
    metrics = proxy.metrics()
    assert metrics.value("egress_proxy_tunnel_duration_seconds_count") == 1
    assert metrics.value("egress_proxy_bytes_total", identity="app", direction="upstream") > 0
    assert metrics.value("egress_proxy_bytes_total", identity="app", direction="downstream") > 0
    assert proxy.http_get("/nope")[0] == 404


# -- logs ------------------------------------------------------------------------------------

SECRET_POLICY = """
identities:
  app:
    api_keys: ["Sekrit-Key-7f3a9c2e"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
"""


def test_logs_are_json_and_never_contain_keys(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(SECRET_POLICY, LOG_LEVEL="DEBUG")
    good, unknown = "Sekrit-Key-7f3a9c2e", "Unknown-Sekrit-55d1b0aa"
    port = tls_upstream.port
    with connect(proxy, f"api.example.com:{port}", good) as reply:
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        stream.sendall(b"payload-marker-91ab")
        assert recv_exactly(stream, 19) == b"payload-marker-91ab"
        stream.close()
    for target in [f"evil.example.com:{port}", f"api.example.com:{port}"]:
        with connect(proxy, target, unknown) as reply:
            assert reply.status == 407
    with connect(proxy, f"evil.example.com:{port}", good) as reply:
        assert reply.status == 403
    with connect(proxy, f"api.example.com:{port}", None,
                 headers=[f"Proxy-Authorization: Basic {base64.b64encode(good.encode()).decode()}",
                          f"Proxy-Authorization: Basic {base64.b64encode(unknown.encode()).decode()}"]) as reply:
        assert reply.status == 400
    with connect(proxy, f"api.example.com:{port}", None,
                 headers=[f"Proxy-Authorization: Digest {good}"]) as reply:
        assert reply.status == 407
    proxy.write_policy(SECRET_POLICY.replace("api.example.com", "other.example.com"))
    proxy.wait_log(lambda l: l.get("message") == "policy reloaded")
    proxy.write_policy("identities: {app: {api_keys: [Sekrit-Key-7f3a9c2e, Sekrit-Key-7f3a9c2e]}}")
    proxy.wait_log(lambda l: l.get("level") == "ERROR")
    assert proxy.stop() == 0

    text = proxy.output()
    forbidden = [good, unknown, "payload-marker-91ab"]
    for key in (good, unknown):
        for password in ("pass", "x"):
            forbidden.append(base64.b64encode(f"{key}:{password}".encode()).decode())
        forbidden.append(base64.b64encode(key.encode()).decode())
    for secret in forbidden:
        assert secret not in text, f"{secret!r} appears in the log"
    lines = proxy.log_lines()  # every line is JSON (fails otherwise)
    assert len(lines) >= 8
    for line in lines:
        assert {"timestamp", "level", "message"} <= set(line), line
        assert line["level"] in {"DEBUG", "INFO", "WARNING", "WARN", "ERROR"}, line
    decisions = [l for l in lines if l["message"] == "request"]
    assert {d["action"] for d in decisions} >= {"allowed", "auth_required", "denied", "bad_request"}
    for decision in decisions:
        assert {"identity", "destination", "action", "reason"} <= set(decision), decision


@pytest.mark.parametrize("level", ["WARN", "warning", "ERROR"])
def test_log_level_above_info_hides_decisions(start_proxy, tls_upstream: Upstream, level: str) -> None:
    proxy: Proxy = start_proxy(POLICY, LOG_LEVEL=level)
    with connect(proxy, f"evil.example.com:{tls_upstream.port}", "app-key") as reply:
        assert reply.status == 403
    with connect(proxy, f"api.example.com:{tls_upstream.port}", "wrong-key") as reply:
        assert reply.status == 407
    proxy.write_policy("identities: [")
    proxy.wait_log(lambda l: l.get("level") == "ERROR")
    assert [l for l in proxy.log_lines() if l.get("level") == "INFO"] == []


def test_log_level_debug_is_accepted(start_proxy) -> None:
    proxy: Proxy = start_proxy(POLICY, LOG_LEVEL="DEBUG")
    assert proxy.http_status("/health") == 200


# -- shutdown ---------------------------------------------------------------------------------


def test_draining_shutdown_lets_open_tunnels_finish(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY, SHUTDOWN_TIMEOUT="20")
    reply, stream = open_tunnel(proxy, tls_upstream, ca)
    try:
        proxy.signal(signal.SIGTERM)
        assert wait_until(lambda: proxy.http_status("/ready", timeout=0.5) == 503, 1), "/ready did not go 503"
        assert proxy.http_status("/health") == 200, "liveness must hold while draining"

        def refused() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=1) as sock:
                    sock.sendall(b"CONNECT api.example.com:443 HTTP/1.1\r\n\r\n")
                    sock.settimeout(1)
                    return sock.recv(1) == b""
            except OSError:
                return True

        assert wait_until(refused, 2), "the listener still accepts new connections while draining"
        for i in range(3):  # the open tunnel keeps working
            time.sleep(0.3)
            stream.sendall(b"draining %d" % i)
            assert recv_exactly(stream, 10) == b"draining %d" % i
        assert proxy.running
    finally:
        stream.close()
        reply.close()
    started = time.monotonic()
    assert proxy.wait_exit(10) == 0, proxy.output()
    assert time.monotonic() - started < 5, "the process did not exit soon after the last tunnel closed"
    assert "Traceback" not in proxy.output()


def test_shutdown_timeout_closes_remaining_tunnels(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(POLICY, SHUTDOWN_TIMEOUT="1")
    reply, stream = open_tunnel(proxy, tls_upstream, ca)
    try:
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert closed_by_peer(stream, 5), "the tunnel outlived SHUTDOWN_TIMEOUT"
        assert proxy.wait_exit(5) == 0, proxy.output()
        elapsed = time.monotonic() - started
    finally:
        stream.close()
        reply.close()
    assert 0.8 <= elapsed < 3.5, elapsed
    summary = proxy.wait_log(lambda l: l.get("message") == "tunnel closed")
    assert "shutdown" in str(summary.get("ended_by")), summary
    assert "Traceback" not in proxy.output()


def test_shutdown_timeout_also_ends_connections_without_a_tunnel(start_proxy, tls_upstream: Upstream, ca) -> None:
    """After SHUTDOWN_TIMEOUT the process exits; a client still sending its head (or idle
    between requests) must not add a further wait."""
    proxy: Proxy = start_proxy(POLICY, SHUTDOWN_TIMEOUT="1", HEADER_TIMEOUT="30")
    reply, stream = open_tunnel(proxy, tls_upstream, ca)
    silent = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        silent.sendall(b"CONNECT api.example.com:443 HTTP/1.1\r\n")  # ...and no more
        assert wait_until(lambda: proxy.metrics().value("egress_proxy_client_connections") >= 2, 5)
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait_exit(10) == 0, proxy.output()
        elapsed = time.monotonic() - started
        assert closed_by_peer(silent, 2)
        assert closed_by_peer(stream, 2)
    finally:
        silent.close()
        stream.close()
        reply.close()
    assert elapsed < 2.2, f"exit took {elapsed:.2f} s with SHUTDOWN_TIMEOUT=1"
