"""CONNECT end to end (issue 2): every status a client can get, through a real
`python egress_guard.py`, with Python sockets and curl as clients.

Each refusal is checked on the status line, the one-line body, the
`egress_proxy_requests_total{status}` metric and the decision log line's `action`.
"""

from __future__ import annotations

import base64
import select
import time

import pytest
from _support import (
    Proxy,
    Upstream,
    assert_never_dialled,
    connect,
    curl,
    free_port,
    open_client,
    read_reply,
    recv_exactly,
    send_raw,
    tls_wrap,
)

KEY = "app-key"
POLICY = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations:
      - "api.example.com"
      - "other.example.com"
      - "nowhere.invalid"
      - "127.0.0.1"          # explicit: the test upstreams live on loopback
"""
REALM = 'Basic realm="egress-guard"'


@pytest.fixture(scope="module")
def proxy(module_proxies) -> Proxy:
    return module_proxies(POLICY, HEADER_TIMEOUT="1", CONNECT_TIMEOUT="5")


def refused(proxy: Proxy, reply, status: int, action: str, identity: str = "-", logged: bool = True) -> dict:
    """Common checks for a refusal; returns its decision log line (`logged`: expect one
    at INFO)."""
    assert reply.status == status, (reply.raw_head, reply.body)
    assert reply.body.startswith(b"egress-guard: ") and reply.body.endswith(b"\n"), reply.body
    assert reply.headers.get("content-type", "").startswith("text/plain")
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert reply.headers["proxy-status"].startswith("egress-guard; error=")
    if not logged:
        return {}
    line = proxy.decision(reply)
    assert line["action"] == action, line
    assert line["identity"] == identity, line
    assert reply.body.decode() == f"egress-guard: {line['reason']}\n"
    return line


def counted(proxy: Proxy, before: float, **labels: str) -> None:
    assert proxy.requests_total(**labels) == before + 1, labels


# -- 200 ------------------------------------------------------------------------------


def test_tls_tunnel_with_python_ssl_carries_data(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    before = proxy.requests_total(identity="app", destination="api.example.com", status="allowed")
    reply = connect(proxy, f"api.example.com:{tls_upstream.port}", KEY)
    with reply:
        assert reply.status == 200
        assert reply.raw_head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        payload = b"hello through the tunnel " * 100
        stream.sendall(payload)
        assert recv_exactly(stream, len(payload)) == payload
        line = proxy.decision(reply)
        stream.close()
    assert line["action"] == "allowed"
    assert line["identity"] == "app"
    assert line["destination"] == f"api.example.com:{tls_upstream.port}"
    assert line["sni"] == "api.example.com"
    counted(proxy, before, identity="app", destination="api.example.com", status="allowed")
    summary = proxy.wait_log(lambda l: l.get("message") == "tunnel closed"
                             and l.get("destination") == f"api.example.com:{tls_upstream.port}"
                             and l.get("bytes_up", 0) >= len(payload))
    assert summary["bytes_down"] >= len(payload)
    assert summary["identity"] == "app"
    assert "duration_ms" in summary


def test_curl_https_through_the_proxy(proxy: Proxy, tls_upstream: Upstream, ca_pem) -> None:
    done = curl(proxy, f"https://api.example.com:{tls_upstream.port}/", KEY, ca_pem)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from upstream\n"


def test_curl_reports_403_for_a_denied_destination(proxy: Proxy, tls_upstream: Upstream, ca_pem) -> None:
    done = curl(proxy, f"https://evil.example.com:{tls_upstream.port}/", KEY, ca_pem)
    assert done.returncode == 56, (done.returncode, done.stderr)
    assert "CONNECT tunnel failed, response 403" in done.stderr


def test_curl_reports_431_for_a_huge_proxy_header(proxy: Proxy, tls_upstream: Upstream, ca_pem) -> None:
    done = curl(proxy, f"https://api.example.com:{tls_upstream.port}/", KEY, ca_pem,
                "--proxy-header", "X-Big: " + "a" * 20000)
    assert done.returncode == 56, (done.returncode, done.stderr)
    assert "CONNECT tunnel failed, response 431" in done.stderr


def test_curl_reports_407_for_an_unknown_key(proxy: Proxy, tls_upstream: Upstream, ca_pem) -> None:
    done = curl(proxy, f"https://api.example.com:{tls_upstream.port}/", "no-such-key", ca_pem)
    assert done.returncode == 56, (done.returncode, done.stderr)
    assert "CONNECT tunnel failed, response 407" in done.stderr


def test_http_1_0_connect(proxy: Proxy, tls_upstream: Upstream, ca) -> None:
    head = f"CONNECT api.example.com:{tls_upstream.port} HTTP/1.0\r\n{AUTH}\r\n\r\n".encode()
    with send_raw(proxy, head) as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        stream.sendall(b"old")
        assert recv_exactly(stream, 3) == b"old"
        stream.close()


def test_bare_host_means_port_443(proxy: Proxy) -> None:
    with send_raw(proxy, f"CONNECT api.example.com HTTP/1.1\r\n{AUTH}\r\n\r\n".encode()) as reply:
        assert reply.status in (200, 502)  # whatever listens (or not) on 127.0.0.1:443 here
        line = proxy.decision(reply)
    assert line["destination"] == "api.example.com:443", line


# -- 400 ------------------------------------------------------------------------------

AUTH = "Proxy-Authorization: " + "Basic " + base64.b64encode(b"app-key:x").decode()
BAD_REQUESTS = {
    "double-space": "CONNECT  api.example.com:443 HTTP/1.1",
    "no-version": "CONNECT api.example.com:443",
    "lowercase-version": "CONNECT api.example.com:443 http/1.1",
    "userinfo": "CONNECT user:pw@api.example.com:443 HTTP/1.1",
    "userinfo-bare": "CONNECT @api.example.com:443 HTTP/1.1",
    "port-0": "CONNECT api.example.com:0 HTTP/1.1",
    "port-65536": "CONNECT api.example.com:65536 HTTP/1.1",
    "port-letters": "CONNECT api.example.com:https HTTP/1.1",
    "port-empty": "CONNECT api.example.com: HTTP/1.1",
    "port-signed": "CONNECT api.example.com:+443 HTTP/1.1",
    "ip-decimal": "CONNECT 2130706433:443 HTTP/1.1",
    "ip-hex": "CONNECT 0x7f.1:443 HTTP/1.1",
    "ip-short": "CONNECT 127.1:443 HTTP/1.1",
    "ip-octal": "CONNECT 0177.0.0.1:443 HTTP/1.1",
    "ipv6-unbracketed": "CONNECT ::1:443 HTTP/1.1",
    "tab-in-line": "CONNECT\tapi.example.com:443 HTTP/1.1",
    "nul-in-target": "CONNECT api.example.com\x00:443 HTTP/1.1",
    "unicode-host": "CONNECT b\u00fccher.example.com:443 HTTP/1.1",
    "space-in-host": "CONNECT api example.com:443 HTTP/1.1",
    "crlf-in-target": "CONNECT api.example.com:443\r\nX: y HTTP/1.1",
}


@pytest.mark.parametrize("line", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_400_malformed_request(proxy: Proxy, line: str) -> None:
    before = proxy.requests_total(identity="-", destination="", status="bad_request")
    head = f"{line}\r\n{AUTH}\r\n\r\n".encode()
    with send_raw(proxy, head) as reply:
        refused(proxy, reply, 400, "bad_request")
        assert reply.reason == "Bad Request"
    counted(proxy, before, identity="-", destination="", status="bad_request")


def test_400_bare_lf_line_endings_answered_at_once(proxy: Proxy) -> None:
    started = time.monotonic()
    with send_raw(proxy, f"CONNECT api.example.com:443 HTTP/1.1\n{AUTH}\n\n".encode()) as reply:
        refused(proxy, reply, 400, "bad_request")
    assert time.monotonic() - started < 0.9, "a bare-LF head must not wait for HEADER_TIMEOUT"


@pytest.mark.parametrize("second", [AUTH, "proxy-authorization: " + AUTH.split(": ", 1)[1]],
                         ids=["same-case", "lowercase-name"])
def test_400_duplicate_proxy_authorization(proxy: Proxy, tls_upstream: Upstream, second: str) -> None:
    mark = tls_upstream.snapshot()
    with connect(proxy, f"api.example.com:{tls_upstream.port}", KEY, headers=[second]) as reply:
        refused(proxy, reply, 400, "bad_request")
        assert b"Proxy-Authorization" in reply.body
    assert tls_upstream.since(mark) == []


# -- 405 ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND"])
def test_405_method_not_allowed(proxy: Proxy, method: str) -> None:
    before = proxy.requests_total(identity="-", status="bad_request")
    with send_raw(proxy, f"{method} http://x/ HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n\r\n".encode()) as reply:
        refused(proxy, reply, 405, "bad_request")
        assert reply.reason == "Method Not Allowed"
        assert "CONNECT" in reply.headers.get("allow", ""), reply.headers
        assert method not in reply.headers["allow"]
    counted(proxy, before, identity="-", status="bad_request")


# -- 407 ------------------------------------------------------------------------------

AUTH_FAILURES = {
    "missing": None,
    "bearer-scheme": "Bearer app-key",
    "not-base64": "Basic !!!not-base64!!!",
    "empty-username": "Basic " + base64.b64encode(b":app-key").decode(),
    "unknown-key": "Basic " + base64.b64encode(b"no-such-key:x").decode(),
    "key-as-password": "Basic " + base64.b64encode(b"someone:app-key").decode(),
}


@pytest.mark.parametrize("value", AUTH_FAILURES.values(), ids=AUTH_FAILURES.keys())
def test_407_proxy_authentication_required(proxy: Proxy, tls_upstream: Upstream, value: str | None) -> None:
    before = proxy.requests_total(identity="-", destination="", status="auth_required")
    mark = tls_upstream.snapshot()
    headers = [] if value is None else [f"Proxy-Authorization: {value}"]
    with connect(proxy, f"api.example.com:{tls_upstream.port}", None, headers=headers) as reply:
        # No credentials at all is the first step of a challenge (git): DEBUG, not INFO.
        refused(proxy, reply, 407, "auth_required", logged=value is not None)
        assert reply.reason == "Proxy Authentication Required"
        assert reply.headers.get("proxy-authenticate") == REALM
    counted(proxy, before, identity="-", destination="", status="auth_required")
    assert tls_upstream.since(mark) == [], "an unauthenticated request must not be dialled"


# -- 403 ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example.com", "EVIL.example.com.", "127.0.0.2", "api.example.com.evil.example.com"])
def test_403_destination_not_allowed_is_never_dialled(proxy: Proxy, fresh_tls_upstream: Upstream, host: str) -> None:
    before = proxy.requests_total(identity="app", status="denied")
    with connect(proxy, f"{host}:{fresh_tls_upstream.port}", KEY) as reply:
        line = refused(proxy, reply, 403, "denied", identity="app")
        assert reply.reason == "Forbidden"
        assert "not allowed" in reply.text
        assert "not allowed" in line["reason"]
    counted(proxy, before, identity="app", status="denied")
    assert_never_dialled(line, fresh_tls_upstream)


# -- 408 / 431 ---------------------------------------------------------------------------


def test_408_request_head_too_slow(proxy: Proxy) -> None:
    before = proxy.requests_total(identity="-", status="timeout")
    sock = open_client(proxy)
    with sock:
        started = time.monotonic()
        sock.sendall(b"CONNECT api.example.com:443 HTTP/1.1\r\n")  # ...and never the rest
        reply = read_reply(sock, timeout=5)
        elapsed = time.monotonic() - started
        refused(proxy, reply, 408, "timeout")
        assert reply.reason == "Request Timeout"
    assert 0.8 <= elapsed < 3, elapsed
    counted(proxy, before, identity="-", status="timeout")


def test_408_trickling_head_is_bounded_in_total(proxy: Proxy) -> None:
    """HEADER_TIMEOUT bounds the whole head, not each read: a byte every 0.2 s still gets 408."""
    head = f"CONNECT api.example.com:443 HTTP/1.1\r\n{AUTH}\r\n\r\n".encode()
    sock = open_client(proxy)
    with sock:
        started = time.monotonic()
        for byte in head:
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable or time.monotonic() - started > 5:
                break
        reply = read_reply(sock, timeout=5)
        elapsed = time.monotonic() - started
        refused(proxy, reply, 408, "timeout")
    assert elapsed < 2.5, elapsed


def test_408_silent_client(proxy: Proxy) -> None:
    sock = open_client(proxy)
    with sock:
        reply = read_reply(sock, timeout=5)
        refused(proxy, reply, 408, "timeout")


def test_431_request_head_over_16_kib(proxy: Proxy) -> None:
    before = proxy.requests_total(identity="-", status="bad_request")
    start = f"CONNECT api.example.com:443 HTTP/1.1\r\n{AUTH}\r\nX-Padding: ".encode()
    # 16389 bytes: over the 16 KiB limit, and all of it read by the proxy before it answers
    # (unread bytes would turn its close into a reset that can swallow the answer).
    head = start + b"a" * (16389 - len(start))
    with send_raw(proxy, head) as reply:
        refused(proxy, reply, 431, "bad_request")
        assert reply.reason == "Request Header Fields Too Large"
    counted(proxy, before, identity="-", status="bad_request")


@pytest.mark.parametrize("size", [20000, 100000])
def test_431_much_larger_head(proxy: Proxy, size: int) -> None:
    head = f"CONNECT api.example.com:443 HTTP/1.1\r\n{AUTH}\r\nX-Padding: ".encode()
    head += b"a" * (size - len(head) - 4) + b"\r\n\r\n"
    with send_raw(proxy, head) as reply:
        refused(proxy, reply, 431, "bad_request")


def test_431_complete_head_over_16_kib(proxy: Proxy) -> None:
    head = f"CONNECT api.example.com:443 HTTP/1.1\r\n{AUTH}\r\n".encode()
    head += b"".join(b"X-Pad-%d: %s\r\n" % (i, b"b" * 150) for i in range(30))  # ~5 KB
    head += b"X-Big: " + b"c" * (16388 - len(head) - len(b"X-Big: \r\n\r\n")) + b"\r\n\r\n"
    assert len(head) == 16388  # a complete head, 4 bytes over the limit
    with send_raw(proxy, head) as reply:
        refused(proxy, reply, 431, "bad_request")


# -- 502 ------------------------------------------------------------------------------


def test_502_refused_port(proxy: Proxy) -> None:
    port = free_port()  # bound, then closed: nothing listens there
    before = proxy.requests_total(identity="app", status="connection_failed")
    with connect(proxy, f"127.0.0.1:{port}", KEY) as reply:
        line = refused(proxy, reply, 502, "connection_failed", identity="app")
        assert reply.reason == "Bad Gateway"
    assert "refused" in line.get("error", "").lower(), line
    counted(proxy, before, identity="app", status="connection_failed")


def test_502_refused_port_by_name(proxy: Proxy) -> None:
    port = free_port()
    with connect(proxy, f"api.example.com:{port}", KEY) as reply:
        refused(proxy, reply, 502, "connection_failed", identity="app")


def test_502_unresolvable_name(proxy: Proxy) -> None:
    before = proxy.requests_total(identity="app", destination="nowhere.invalid", status="connection_failed")
    with connect(proxy, "nowhere.invalid:443", KEY) as reply:
        refused(proxy, reply, 502, "connection_failed", identity="app")
        assert "resolve" in reply.text
    counted(proxy, before, identity="app", destination="nowhere.invalid", status="connection_failed")


def test_status_words_are_the_documented_set(proxy: Proxy) -> None:
    """Runs last in this module: everything above used only the README's status words."""
    proxy.assert_status_words()
