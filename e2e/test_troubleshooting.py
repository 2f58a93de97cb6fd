"""The operator's debugging loop, end to end: the reason reaches the client (RFC 9209
`Proxy-Status` on every HTTP refusal, checked with raw sockets, curl -v and Python
`requests`), report mode counts what it promises, one `conn` id per client connection
in every line about it, and the reload, startup and readiness lines say what happened.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest
import requests
from _forward_origin import Origin
from _support import (
    IO_TIMEOUT,
    Proxy,
    Upstream,
    basic,
    connect,
    curl,
    free_port,
    read_reply,
    send_raw,
    tls_wrap,
    wait_until,
)

POLICY = """
identities:
  web:
    api_keys: ["web-key"]
    allowed_destinations: ["api.example.com", "metadata.example.com", "127.0.0.1"]
    allow_http: false
  limited:
    api_keys: ["limited-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
    max_tunnels: 1
  forwarder:
    api_keys: ["fwd-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
  canary:
    api_keys: ["canary-key"]
    mode: report
    allowed_destinations: ["127.0.0.1"]
"""

PROXY_STATUS = re.compile(r'^egress-guard; error=([a-z_]+); details="((?:[^"\\]|\\.)*)"$')


def proxy_status(headers: dict[str, str]) -> tuple[str, str]:
    """(error type, details) of a Proxy-Status header, which must be well formed."""
    value = headers.get("proxy-status") or headers.get("Proxy-Status")
    assert value is not None, f"no Proxy-Status in {headers}"
    found = PROXY_STATUS.match(value)
    assert found, value
    return found.group(1), re.sub(r"\\(.)", r"\1", found.group(2))


def closed_port() -> int:
    """A loopback port nothing listens on (connect() is refused)."""
    return free_port()


@pytest.fixture(scope="module")
def proxy(module_proxies) -> Proxy:
    return module_proxies(POLICY, LOG_LEVEL="DEBUG")


# (id, request head, expected status, expected error type, reason as logged (prefix))
RAW_CASES = [
    ("no-credentials", "CONNECT api.example.com:{tls} HTTP/1.1\r\nHost: x\r\n\r\n",
     407, "http_request_denied", "proxy authentication required"),
    ("unknown-key", "CONNECT api.example.com:{tls} HTTP/1.1\r\nProxy-Authorization: {nobody}\r\n\r\n",
     407, "http_request_denied", "unknown API key"),
    ("destination-not-allowed", "CONNECT evil.example.com:{tls} HTTP/1.1\r\nProxy-Authorization: {web}\r\n\r\n",
     403, "http_request_denied", "destination not allowed"),
    ("forbidden-address", "CONNECT metadata.example.com:{tls} HTTP/1.1\r\nProxy-Authorization: {web}\r\n\r\n",
     403, "destination_ip_prohibited", "forbidden address: 169.254.169.254"),
    ("connection-refused", "CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nProxy-Authorization: {web}\r\n\r\n",
     502, "connection_refused", "could not connect to the destination"),
    ("malformed", "CONNECT api.example.com HTTP/1.1 extra\r\n\r\n",
     400, "http_request_error", ""),
    ("method-not-allowed", "BREW http://api.example.com/ HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
     405, "http_request_error", "method BREW is not supported"),
    ("http-2", "CONNECT api.example.com:443 HTTP/2.0\r\n\r\n",
     505, "http_request_error", ""),
    ("head-too-large", "CONNECT api.example.com:443 HTTP/1.1\r\nX-Big: " + "a" * 70000 + "\r\n\r\n",
     431, "http_request_error", "request head larger than"),
    ("plain-http-disabled", "GET http://api.example.com:{tls}/ HTTP/1.1\r\nHost: api.example.com\r\n"
     "Proxy-Authorization: {web}\r\n\r\n", 403, "http_request_denied", "plain-HTTP forwarding is disabled"),
]


@pytest.mark.parametrize("head,status,kind,reason", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_every_http_refusal_carries_proxy_status_with_the_logged_reason(
        proxy: Proxy, tls_upstream: Upstream, head: str, status: int, kind: str, reason: str) -> None:
    text = head.format(tls=tls_upstream.port, closed=closed_port(), web=basic("web-key"),
                       nobody=basic("nobody-key"))
    with send_raw(proxy, text.encode("latin-1")) as reply:
        assert reply.status == status, reply.raw_head
        error_type, details = proxy_status(reply.headers)
        assert error_type == kind
        assert details.startswith(reason)
        assert reply.text == f"egress-guard: {details}\n" or len(details) >= 250
        line = proxy.decision(reply)
    assert line["reason"].startswith(details.removesuffix("..."))
    assert "web-key" not in reply.raw_head.decode("latin-1") and "nobody-key" not in details


def test_connection_failures_name_the_address_and_the_errno(proxy: Proxy) -> None:
    port = closed_port()
    with connect(proxy, f"127.0.0.1:{port}", "web-key") as reply:
        assert reply.status == 502
        assert proxy_status(reply.headers)[0] == "connection_refused"
        line = proxy.decision(reply)
    assert line["action"] == "connection_failed"
    assert line["address"] == "127.0.0.1"
    assert line["error"] == f"127.0.0.1:{port}: Connection refused"


def test_the_tunnel_limit_is_connection_limit_reached(proxy: Proxy, tls_upstream: Upstream) -> None:
    with connect(proxy, f"127.0.0.1:{tls_upstream.port}", "limited-key") as first:
        assert first.status == 200
        with connect(proxy, f"127.0.0.1:{tls_upstream.port}", "limited-key") as second:
            assert second.status == 429
            assert proxy_status(second.headers)[0] == "connection_limit_reached"
            assert second.headers["retry-after"] == "1"


def test_a_header_timeout_is_an_http_request_error(start_proxy) -> None:
    proxy = start_proxy(POLICY, HEADER_TIMEOUT="0.5")
    with send_raw(proxy, b"CONNECT api.example.com:443 HTTP/1.1\r\n") as reply:
        assert reply.status == 408
        assert proxy_status(reply.headers) == ("http_request_error", "no complete request head within 0.5 s")


def test_curl_shows_the_reason_of_a_refused_connect(proxy: Proxy, tls_upstream: Upstream, ca_pem: Path) -> None:
    result = curl(proxy, f"https://evil.example.com:{tls_upstream.port}/", "web-key", ca_pem, "-v")
    assert result.returncode != 0
    assert "< HTTP/1.1 403 Forbidden" in result.stderr
    assert '< Proxy-Status: egress-guard; error=http_request_denied; details="destination not allowed"' \
        in result.stderr, result.stderr[-3000:]


def test_python_requests_sees_the_reason_of_a_refused_http_request(proxy: Proxy, tls_upstream: Upstream) -> None:
    proxies = {"http": f"http://web-key:x@127.0.0.1:{proxy.port}"}
    answer = requests.get(f"http://api.example.com:{tls_upstream.port}/", proxies=proxies, timeout=IO_TIMEOUT)
    assert answer.status_code == 403
    kind, details = proxy_status(answer.headers)
    assert kind == "http_request_denied"
    assert details.startswith("plain-HTTP forwarding is disabled for identity web")
    missing = requests.get(f"http://api.example.com:{tls_upstream.port}/",
                           proxies={"http": f"http://127.0.0.1:{proxy.port}"}, timeout=IO_TIMEOUT)
    assert missing.status_code == 407
    assert proxy_status(missing.headers)[0] == "http_request_denied"
    assert missing.headers["Proxy-Authenticate"] == 'Basic realm="egress-guard"'


def test_python_requests_sees_the_status_of_a_refused_tunnel(proxy: Proxy, tls_upstream: Upstream) -> None:
    # urllib3 reports a refused CONNECT as a ProxyError naming the status; the reason is
    # in the header, which it does not expose (curl -v, above, prints it).
    proxies = {"https": f"http://web-key:x@127.0.0.1:{proxy.port}"}
    with pytest.raises(requests.exceptions.ProxyError, match="403"):
        requests.get(f"https://evil.example.com:{tls_upstream.port}/", proxies=proxies, timeout=IO_TIMEOUT)


def test_plain_http_inside_a_tls_only_tunnel_is_answered_in_http(proxy: Proxy, fresh_echo_upstream: Upstream) -> None:
    """A client that CONNECTs even for http:// (Node's undici) and then speaks HTTP into
    the tunnel gets a 403 it can read, in the tunnel; nothing reaches the destination."""
    with connect(proxy, f"127.0.0.1:{fresh_echo_upstream.port}", "web-key") as reply:
        assert reply.status == 200
        reply.sock.sendall(b"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        inner = read_reply(reply.sock)
        assert inner.status == 403
        kind, details = proxy_status(inner.headers)
        assert kind == "http_request_denied"
        assert details.startswith("tls required: the client sent a plain-HTTP request (GET) into the tunnel")
        line = proxy.decision(reply)
    assert line["action"] == "denied" and line["reason"] == details
    conns = fresh_echo_upstream.since(0)
    assert len(conns) == 1 and conns[0].done.wait(5)
    assert conns[0].received == b""


def test_report_mode_counts_a_would_deny_whose_connection_then_fails(proxy: Proxy) -> None:
    port = closed_port()
    before = proxy.requests_total(identity="canary", status="reported")
    with connect(proxy, f"api.example.com:{port}", "canary-key") as reply:
        assert reply.status == 502
        line = proxy.decision(reply)
    assert line["action"] == "reported"
    assert line["reason"] == "would deny: destination not allowed"
    assert line["error"] == f"could not connect to the destination: 127.0.0.1:{port}: Connection refused"
    metrics = proxy.metrics()
    assert metrics.value("egress_proxy_requests_total", identity="canary", status="reported") == before + 1
    assert metrics.value("egress_proxy_requests_total", identity="canary", status="connection_failed") == 0


def test_report_mode_counts_a_would_deny_that_never_sends_a_hello(start_proxy, echo_upstream: Upstream) -> None:
    proxy = start_proxy(POLICY, HELLO_TIMEOUT="0.5")
    with connect(proxy, f"api.example.com:{echo_upstream.port}", "canary-key") as reply:
        assert reply.status == 200
        line = proxy.wait_log(lambda l: l.get("message") == "request" and l.get("client") == reply.client, 5)
    assert line["action"] == "reported"
    assert line["error"] == "no TLS ClientHello within 0.5 s"


def test_every_line_about_a_tunnel_carries_its_conn_id(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    with connect(proxy, f"api.example.com:{tls_upstream.port}", "web-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        stream.sendall(b"ping")
        assert stream.recv(4) == b"ping"
        stream.close()
        decision = proxy.decision(reply)
    conn = decision["conn"]
    assert re.fullmatch(r"[0-9a-f]{6}-\d+", conn)
    closed = proxy.wait_log(lambda l: l.get("message") == "tunnel closed" and l.get("conn") == conn)
    assert closed["destination"] == decision["destination"]
    other = proxy.wait_log(lambda l: l.get("message") == "request" and l.get("conn") not in (None, conn))
    assert other["conn"] != conn


def test_kept_alive_plain_http_requests_share_their_connection_id(proxy: Proxy) -> None:
    origin = Origin()
    head = (f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Proxy-Authorization: {basic('fwd-key')}\r\n\r\n").encode()
    offset = proxy.log_size()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT) as sock:
            for _ in range(2):
                sock.sendall(head)
                assert read_reply(sock).status == 200
            client = "127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        origin.close()

    def mine() -> list[dict] | None:
        found = [l for l in proxy.log_lines(offset) if l.get("client") == client]
        return found if len(found) >= 4 else None

    lines = wait_until(mine)
    assert lines and [l["message"] for l in lines] == ["request", "forwarded", "request", "forwarded"]
    assert len({line["conn"] for line in lines}) == 1


def test_missing_credentials_are_a_debug_line_not_an_info_line(start_proxy, tls_upstream: Upstream) -> None:
    proxy = start_proxy(POLICY)  # LOG_LEVEL INFO
    with connect(proxy, f"api.example.com:{tls_upstream.port}", None) as reply:
        assert reply.status == 407
    with connect(proxy, f"api.example.com:{tls_upstream.port}", "nobody-key") as unknown:
        assert unknown.status == 407
        proxy.decision(unknown)  # a wrong key stays visible at INFO
    assert not [l for l in proxy.log_lines() if l.get("client") == reply.client]
    assert proxy.requests_total(identity="-", status="auth_required") == 2


def test_startup_line_says_whether_a_hosts_file_is_in_use(proxy: Proxy) -> None:
    line = proxy.wait_log(lambda l: l.get("message") == "egress-guard listening")
    assert line["hosts_file"] == str(proxy.hosts_path)
    assert line["pinned_names"] == len({n for raw in proxy.hosts_path.read_text().splitlines()
                                        for n in raw.split()[1:]})


def test_a_missing_policy_names_configmap_path(start_proxy, tmp_path: Path) -> None:
    proxy = start_proxy(None, CONFIGMAP_PATH=str(tmp_path / "nowhere.yaml"), _wait=False)
    assert proxy.wait_exit(15) == 1
    error = proxy.wait_log(lambda l: l.get("level") == "ERROR")
    assert "file not found" in error["message"] and "CONFIGMAP_PATH" in error["message"]


def test_reloads_say_what_changed_and_skip_unchanged_files(start_proxy) -> None:
    proxy = start_proxy(POLICY, LOG_LEVEL="DEBUG")
    reloads = lambda: proxy.metrics().value("egress_proxy_config_reloads_total")  # noqa: E731
    offset = proxy.log_size()
    stamp = time.time() + 5
    os.utime(proxy.policy_path, (stamp, stamp))  # touched, same text
    proxy.wait_log(lambda l: l.get("message") == "policy file unchanged", offset=offset)
    assert reloads() == 0
    changed = POLICY.replace('["api.example.com", "metadata.example.com", "127.0.0.1"]',
                             '["api.example.com", "new.example.com", "127.0.0.1"]').replace(
        "  forwarder:\n", "  forwarder2:\n").replace("max_tunnels: 1", "max_tunnels: 2")
    proxy.write_policy(changed)
    line = proxy.wait_log(lambda l: l.get("message") == "policy reloaded", offset=offset)
    assert line["identities_added"] == ["forwarder2"]
    assert line["identities_removed"] == ["forwarder"]
    assert line["identities_changed"] == ["web (allowed_destinations)", "limited (max_tunnels)"]
    assert line["destinations_added"] == ["web: new.example.com"]
    assert line["destinations_removed"] == ["web: metadata.example.com"]
    assert line["previous"] != line["policy"]
    assert reloads() == 1


def test_ready_names_the_policy_and_a_rejected_newer_file(start_proxy) -> None:
    proxy = start_proxy(POLICY)
    status, _, body = proxy.http_get("/ready")
    import json

    ready = json.loads(body)
    assert status == 200 and "rejected" not in ready and re.fullmatch(r"[0-9a-f]{12}", ready["policy"])
    proxy.write_policy("identities: [")
    rejected = wait_until(lambda: json.loads(proxy.http_get("/ready")[2]).get("rejected"), 10)
    assert rejected and "invalid YAML" in rejected
    status, _, body = proxy.http_get("/ready")
    assert status == 200 and json.loads(body)["policy"] == ready["policy"]
    proxy.write_policy(POLICY)
    assert wait_until(lambda: "rejected" not in json.loads(proxy.http_get("/ready")[2]), 10)
