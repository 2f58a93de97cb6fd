"""The status page (issue 15) end to end: a real proxy subprocess, real clients making
real traffic (open TLS tunnels, a refusal of every kind, a report-mode pass, a rejected
reload), and the page read as JSON, as HTML source, and rendered by headless Chromium.

One module-scoped scene serves the read-only tests: what it did is known exactly, so the
page's counts and rows are checked against it, not against themselves.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from _browser import browse, chromium_path, off_loopback
from _support import (
    REPO,
    Proxy,
    Reply,
    Upstream,
    closed_by_peer,
    connect,
    expect_startup_error,
    free_port,
    open_client,
    read_reply,
    recv_exactly,
    send_raw,
    server_context,
    tls_wrap,
    wait_until,
)

APP_KEY, CANARY_KEY = "app-Sekrit-key-4d1f", "canary-Sekrit-key-9e07"
POLICY = f"""
identities:
  app:
    api_keys: ["{APP_KEY}"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
    max_tunnels: 2
  canary:
    api_keys: ["{CANARY_KEY}"]
    mode: report
    allowed_destinations: ["127.0.0.1"]
"""
BROKEN_POLICY = POLICY.replace("max_tunnels: 2", "max_tunnels: lots")
KEYS = (APP_KEY, CANARY_KEY, "nobody-Sekrit-key")
REFUSAL_KINDS = {"denied", "auth_required", "bad_request", "sni_mismatch", "connection_failed", "timeout",
                 "limited", "reported"}
# The documented shape of /status.json (README, "Status page").
TOP_KEYS = {"version", "now", "uptime_s", "draining", "policy", "identities", "tunnels", "refusals"}
POLICY_KEYS = {"digest", "loaded_at", "identities", "destinations", "rejected", "rejected_at"}
IDENTITY_KEYS = {"name", "in_policy", "mode", "open", "max_tunnels", "last_minute", "bytes_up", "bytes_down"}
TUNNEL_KEYS = {"conn", "kind", "client", "identity", "destination", "sni", "address", "age_s", "idle_s",
               "bytes_up", "bytes_down", "listener", "auth"}
REFUSAL_KEYS = {"time", "client", "identity", "destination", "status", "reason", "rule", "error", "sni", "address",
                "listener"}


@dataclass
class Scene:
    proxy: Proxy
    upstream_port: int
    held: list[Any] = field(default_factory=list)  # the open tunnels' TLS sockets
    clients: dict[str, str] = field(default_factory=dict)  # what -> the client address the proxy saw
    busy_bytes: int = 0


def tls_tunnel(proxy: Proxy, ca: Any, target: str, key: str, sni: str) -> tuple[Reply, ssl.SSLSocket]:
    reply = connect(proxy, target, key)
    assert reply.status == 200, (reply.status, reply.text)
    return reply, tls_wrap(reply.sock, ca, sni)


@pytest.fixture(scope="module")
def scene(module_proxies, ca) -> Any:
    upstream = Upstream(tls=server_context(ca))
    proxy: Proxy = module_proxies(POLICY, HEADER_TIMEOUT="1")
    port = upstream.port
    s = Scene(proxy, port)
    try:
        # A refusal of every kind, each from its own client connection.
        with connect(proxy, f"evil.example.com:{port}", APP_KEY) as reply:
            assert reply.status == 403
            s.clients["denied"] = reply.client
        with connect(proxy, f"api.example.com:{port}", "nobody-Sekrit-key") as reply:
            assert reply.status == 407
            s.clients["auth_required"] = reply.client
        with send_raw(proxy, b"BREW /coffee HTTP/1.1\r\n\r\n") as reply:
            assert reply.status == 400
            s.clients["bad_request"] = reply.client
        with connect(proxy, f"api.example.com:{port}", APP_KEY) as reply:
            assert reply.status == 200
            with pytest.raises(ssl.SSLError, match="ACCESS_DENIED"):
                tls_wrap(reply.sock, ca, "other.example.com", check_hostname=False)
            s.clients["sni_mismatch"] = reply.client
        with connect(proxy, f"api.example.com:{free_port()}", APP_KEY) as reply:
            assert reply.status == 502
            s.clients["connection_failed"] = reply.client
        sock = open_client(proxy)
        with sock:
            sock.sendall(b"CONNECT api.example.com:443 HTTP/1.1\r\n")  # and never the end of the head
            reply = read_reply(sock, timeout=5)
            assert reply.status == 408
            s.clients["timeout"] = reply.client
        # Two open tunnels (the identity's max_tunnels), the second one busy; the third is refused.
        for name, payload in (("quiet", b"hello"), ("busy", b"x" * 200_000)):
            reply, stream = tls_tunnel(proxy, ca, f"api.example.com:{port}", APP_KEY, "api.example.com")
            s.held += [stream]
            stream.sendall(payload)
            assert recv_exactly(stream, len(payload)) == payload
            s.clients[name] = reply.client
            time.sleep(0.05)  # distinct ages
        s.busy_bytes = 200_000
        with connect(proxy, f"api.example.com:{port}", APP_KEY) as reply:
            assert reply.status == 429
            s.clients["limited"] = reply.client
        # A report-mode pass that stays open: canary may not reach other.example.com (nor send
        # that SNI), and is let through, recorded `reported`.
        reply, stream = tls_tunnel(proxy, ca, f"other.example.com:{port}", CANARY_KEY, "other.example.com")
        s.held.append(stream)
        s.clients["reported"] = reply.client
        # The newest file is rejected; the last good policy stays in force.
        proxy.write_policy(BROKEN_POLICY)
        assert wait_until(lambda: "rejected" in json.loads(proxy.http_get("/ready")[2]), 10)
        yield s
    finally:
        for stream in s.held:
            stream.close()
        upstream.close()


def status_json(proxy: Proxy, query: str = "") -> tuple[int, dict[str, Any]]:
    status, headers, body = proxy.http_get("/status.json" + query)
    assert headers["Content-Type"] == "application/json", headers
    return status, json.loads(body)


def page(proxy: Proxy, path: str = "/") -> tuple[int, dict[str, str], str]:
    status, headers, body = proxy.http_get(path)
    return status, headers, body.decode()


# -- JSON ----------------------------------------------------------------------------------------


def test_json_shape_and_content_under_real_traffic(scene: Scene) -> None:
    status, data = status_json(scene.proxy)
    assert status == 200
    assert set(data) == TOP_KEYS
    assert data["version"] == "0.1.0" and data["draining"] is False and data["uptime_s"] > 0
    # The policy in force, and the rejected newest file.
    ready = json.loads(scene.proxy.http_get("/ready")[2])
    assert set(data["policy"]) == POLICY_KEYS
    assert data["policy"]["digest"] == ready["policy"]
    assert data["policy"]["rejected"] == ready["rejected"] and "max_tunnels" in data["policy"]["rejected"]
    assert data["policy"]["rejected_at"] > data["policy"]["loaded_at"]
    assert (data["policy"]["identities"], data["policy"]["destinations"]) == (2, 3)

    rows = {row["name"]: row for row in data["identities"]}
    for row in rows.values():
        assert set(row) == IDENTITY_KEYS
    assert list(rows) == ["app", "canary", "-"], "policy identities by name, then others"
    app, canary, anonymous = rows["app"], rows["canary"], rows["-"]
    assert (app["mode"], app["open"], app["max_tunnels"], app["in_policy"]) == ("enforce", 2, 2, True)
    assert app["last_minute"] == {"allowed": 2, "denied": 1, "sni_mismatch": 1, "connection_failed": 1,
                                  "limited": 1}
    assert app["bytes_up"] >= scene.busy_bytes and app["bytes_down"] >= scene.busy_bytes
    assert (canary["mode"], canary["open"], canary["max_tunnels"]) == ("report", 1, None)
    assert canary["last_minute"] == {"reported": 1}
    assert anonymous["in_policy"] is False and anonymous["mode"] is None
    assert anonymous["last_minute"] == {"auth_required": 1, "bad_request": 1, "timeout": 1}

    tunnels = data["tunnels"]
    assert tunnels["open"] == 3
    longest = tunnels["longest_lived"]
    assert [t["client"] for t in longest] == [scene.clients[n] for n in ("quiet", "busy", "reported")]
    for row in longest:
        assert set(row) == TUNNEL_KEYS
        assert row["kind"] == "tunnel" and row["address"] == "127.0.0.1"
        assert row["destination"] == f"{row['sni']}:{scene.upstream_port}"
        assert row["age_s"] > 0 and row["idle_s"] is not None
    assert [t["age_s"] for t in longest] == sorted((t["age_s"] for t in longest), reverse=True)
    busiest = tunnels["busiest"][0]
    assert busiest["client"] == scene.clients["busy"]
    assert busiest["bytes_up"] >= scene.busy_bytes and busiest["bytes_down"] >= scene.busy_bytes
    assert busiest["sni"] == "api.example.com" and busiest["identity"] == "app"
    assert tunnels["busiest"][-1]["bytes_up"] < scene.busy_bytes

    refusals = data["refusals"]
    for row in refusals:
        assert set(row) == REFUSAL_KEYS
    assert {row["status"] for row in refusals} == REFUSAL_KINDS
    assert [row["time"] for row in refusals] == sorted((row["time"] for row in refusals), reverse=True)
    by_status = {row["status"]: row for row in refusals}
    for kind in REFUSAL_KINDS:
        assert by_status[kind]["client"] == scene.clients[kind], kind
    assert by_status["denied"]["destination"] == f"evil.example.com:{scene.upstream_port}"
    assert by_status["denied"]["reason"] == "destination not allowed"
    assert by_status["sni_mismatch"]["reason"] == "sni does not match target: other.example.com"
    assert by_status["sni_mismatch"]["rule"] == "api.example.com"
    assert by_status["reported"]["reason"].startswith("would deny: destination not allowed")
    assert by_status["reported"]["identity"] == "canary"
    assert by_status["limited"]["reason"] == "identity app already has 2 open tunnels (max_tunnels)"
    assert "Connection refused" in by_status["connection_failed"]["error"]
    assert by_status["auth_required"]["identity"] == "-"


def test_json_and_html_never_show_a_key(scene: Scene) -> None:
    texts = [scene.proxy.http_get(path)[2].decode() for path in ("/status.json", "/", "/status")]
    for text in texts:
        for key in KEYS:
            assert key not in text
        assert "Sekrit" not in text and "Proxy-Authorization" not in text
        assert "/coffee" not in text, "a URL path reached the page"


# -- HTML ----------------------------------------------------------------------------------------


def test_html_page_under_real_traffic(scene: Scene) -> None:
    status, headers, text = page(scene.proxy)
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "'unsafe-inline'" not in csp
    assert re.search(r"style-src 'sha256-[A-Za-z0-9+/=]+'", csp)
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "<script" not in text.lower() and "http-equiv=\"refresh\"" not in text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the page may load nothing from elsewhere"
    # Header: version, digest, the rejected file's problem, serving.
    ready = json.loads(scene.proxy.http_get("/ready")[2])
    assert ready["policy"] in text and "The newest policy file was rejected" in text
    assert "max_tunnels" in text and "serving" in text
    # Identities: mode, open / max, last minute by status.
    assert re.search(r"<td[^>]*>app</td><td>enforce</td><td[^>]*>2 / 2</td>", text)
    assert re.search(r"<td[^>]*>canary</td><td>report</td><td[^>]*>1 / no limit</td>", text)
    assert ">reported 1<" in text and ">allowed 2<" in text
    # Tunnels and refusals: the clients and what they asked for.
    for name in ("quiet", "busy", "reported", "denied", "sni_mismatch", "limited", "timeout"):
        assert scene.clients[name] in text, name
    assert "Open tunnels: 3" in text
    assert "sni does not match target: other.example.com" in text
    status, headers, text = page(scene.proxy, "/status")
    assert status == 200 and headers["Content-Security-Policy"] == csp and "Open tunnels: 3" in text


def test_refresh_parameter(scene: Scene) -> None:
    status, _, text = page(scene.proxy, "/?refresh=5")
    assert status == 200 and '<meta http-equiv="refresh" content="5">' in text
    assert '<meta http-equiv="refresh" content="3600">' in page(scene.proxy, "/status?refresh=3600")[2]
    for bad in ("0", "3601", "abc", "-5", "5.5", "", "1e3", "%205", "99999999999"):
        status, headers, text = page(scene.proxy, f"/?refresh={bad}")
        assert status == 400, bad
        assert headers["Content-Type"].startswith("text/plain")
        assert text.startswith("refresh=") and "expected whole seconds from 1 to 3600" in text, text
    status, _, text = page(scene.proxy, "/?refresh=5&refresh=6")
    assert status == 400 and "given twice" in text
    status, _, text = page(scene.proxy, "/status.json?verbose=1")
    assert status == 400 and "unknown query parameter 'verbose'" in text
    status, _, text = page(scene.proxy, "/?refresh=%ff")
    assert status == 400 and "not UTF-8" in text
    assert scene.proxy.http_status("/health") == 200 and scene.proxy.running


def test_other_methods_and_paths(scene: Scene) -> None:
    with socket.create_connection(("127.0.0.1", scene.proxy.metrics_port), timeout=5) as sock:
        sock.sendall(b"POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert recv_all(sock).startswith(b"HTTP/1.1 405")
    with socket.create_connection(("127.0.0.1", scene.proxy.metrics_port), timeout=5) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head = recv_all(sock)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Security-Policy" in head and b"<html" not in head
    status, _, body = scene.proxy.http_get("/status/")
    assert status == 404 and "/status.json" in json.loads(body)["endpoints"]


def recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# -- explain -------------------------------------------------------------------------------------


def cli_explain(policy: str, tmp: Path, hosts: Path, *args: str) -> list[str]:
    path = tmp / "policy.yaml"
    path.write_text(policy)
    done = subprocess.run([sys.executable, "egress_guard.py", "explain", str(path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={"HOSTS_FILE": str(hosts), "PATH": ""})
    return done.stdout.splitlines()


@pytest.mark.parametrize("query,args", [
    ("identity=app&dest=api.example.com:443", ["--identity", "app", "--dest", "api.example.com:443"]),
    ("identity=app&dest=evil.example.com:443", ["--identity", "app", "--dest", "evil.example.com:443"]),
    ("identity=app&dest=api.example.com:443&sni=other.example.com",
     ["--identity", "app", "--dest", "api.example.com:443", "--sni", "other.example.com"]),
    ("identity=app&dest=api.example.com:443&address=169.254.169.254",
     ["--identity", "app", "--dest", "api.example.com:443", "--address", "169.254.169.254"]),
    ("identity=canary&dest=other.example.com:443", ["--identity", "canary", "--dest", "other.example.com:443"]),
    ("identity=app&dest=api.example.com&http=on", ["--identity", "app", "--dest", "api.example.com", "--http"]),
], ids=["allowed", "denied", "sni-mismatch", "forbidden-address", "report-mode", "plain-http"])
def test_explain_form_agrees_with_the_cli(scene: Scene, tmp_path: Path, query: str, args: list[str]) -> None:
    status, data = status_json(scene.proxy, "?" + query)
    assert status == 200
    result = data["explain"]
    expected = dict(line.split(": ", 1) if ": " in line else ("decision", line)
                    for line in cli_explain(POLICY, tmp_path, scene.proxy.hosts_path, *args) if not line.startswith("note"))
    assert result["decision"] == expected["decision"]
    assert result["identity"] == expected["identity"]
    assert result["rule"] == expected.get("rule")
    assert (result["reason"] or None) == expected.get("reason")
    status, _, text = page(scene.proxy, "/?" + query)
    assert status == 200 and 'id="verdict"' in text and f"<b>{result['decision']}</b>" in text


@pytest.mark.parametrize("query,words", [
    ("identity=nobody&dest=api.example.com:443", "unknown identity 'nobody' (the policy has: app, canary)"),
    ("identity=app&dest=2130706433:443", "invalid destination '2130706433:443'"),
    ("identity=app&dest=https://api.example.com/v1", "use destination api.example.com:443"),
    ("identity=app&dest=api.example.com:443&address=not-an-ip", "invalid address 'not-an-ip'"),
    ("identity=app&dest=127.0.0.1:443&address=10.0.0.1", "address is for a name"),
    ("identity=app&dest=api.example.com&http=on&sni=api.example.com", "SNI and plain HTTP do not go together"),
    ("identity=&dest=api.example.com:443", "choose an identity"),
    ("identity=app", "give a destination"),
])
def test_explain_bad_input_is_a_clear_400(scene: Scene, query: str, words: str) -> None:
    status, data = status_json(scene.proxy, "?" + query)
    assert status == 400 and words in data["explain"]["error"], data.get("explain")
    assert data["tunnels"]["open"] == 3, "the rest of the page is still there"
    status, _, text = page(scene.proxy, "/?" + query)
    assert status == 400 and 'id="explain-error"' in text
    status, _, text = page(scene.proxy, "/?identity=app&http=maybe")
    assert status == 400 and "http='maybe': expected on or off" in text
    assert scene.proxy.http_status("/health") == 200


# -- headless Chromium ---------------------------------------------------------------------------


class Cells(HTMLParser):
    """The text of every table cell, by the id of the table or section it is in."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []
        self.cells: dict[str, list[str]] = {}
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs).get("id")
        if tag in ("section", "table") and found:
            self.where.append(found)
        if tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.setdefault(self.where[-1] if self.where else "", []).append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (make test installs it)")
def test_page_in_headless_chromium(scene: Scene, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{scene.proxy.metrics_port}/?identity=app&dest=evil.example.com:443"
    trace = subprocess.run(["strace", "-f", "-o", "/dev/null", "true"], capture_output=True, timeout=30).returncode == 0
    visit = browse(url, tmp_path / "dom", trace=trace)
    cells = Cells()
    cells.feed(visit.dom)
    longest, refusals = cells.cells["longest_lived"], cells.cells["refusals"]
    for name in ("quiet", "busy", "reported"):
        assert scene.clients[name] in longest, name
    assert f"other.example.com:{scene.upstream_port}" in longest and "127.0.0.1" in longest
    for kind in REFUSAL_KINDS:
        assert scene.clients[kind] in refusals, kind
    assert "destination not allowed" in refusals and "sni does not match target: other.example.com" in refusals
    assert "The newest policy file was rejected" in visit.dom
    verdict = re.search(r'id="verdict".*?</div>', visit.dom, re.S)
    assert verdict and "<b>denied</b>" in verdict.group(0) and "destination not allowed" in verdict.group(0)
    if trace:
        assert any("127.0.0.1" in line and str(scene.proxy.metrics_port) in line for line in visit.network)
        assert off_loopback(visit.network) == [], "chromium reached beyond loopback"
    shot = tmp_path / "status-page.png"
    browse(url, tmp_path / "shot", screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


# -- escaping ------------------------------------------------------------------------------------

SCRIPT_NAME = "<script>alert('x')</script>\"&"
LONG_NAME = "L" * 110 + "<b>bold</b>"  # names may be up to 128 characters
HOSTILE_POLICY = f"""
identities:
  {json.dumps(SCRIPT_NAME)}:
    api_keys: ["hostile-Sekrit-1"]
    mode: report
    allowed_destinations: ["127.0.0.1"]
  {json.dumps(LONG_NAME)}:
    api_keys: ["hostile-Sekrit-2"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
"""
# The tags and attributes the page itself writes: nothing a value could have smuggled in.
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "small", "dl", "dt",
             "dd", "section", "p", "table", "thead", "tbody", "tr", "th", "td", "span", "code", "b", "br", "a",
             "form", "label", "select", "option", "input", "button", "div", "footer"}
PAGE_ATTRIBUTES = {"lang", "charset", "http-equiv", "content", "name", "id", "class", "href", "method", "action",
                   "value", "selected", "type", "placeholder", "checked"}


class Markup(HTMLParser):
    """Every tag and attribute of a page, and its text (with entities decoded)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.values: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            self.attributes.add(name)
            self.values.append(value or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_hostile_names_are_escaped(start_proxy, ca, fresh_tls_upstream: Upstream) -> None:
    proxy: Proxy = start_proxy(HOSTILE_POLICY)
    port = fresh_tls_upstream.port
    # The script-named identity (report mode) keeps a tunnel open and leaves a reported pass;
    # the long-named one is refused.
    reply, stream = tls_tunnel(proxy, ca, f"other.example.com:{port}", "hostile-Sekrit-1", "other.example.com")
    try:
        with connect(proxy, f"evil.example.com:{port}", "hostile-Sekrit-2") as refused:
            assert refused.status == 403
        # A rejected reload whose problem names a hostile entry.
        proxy.write_policy(HOSTILE_POLICY.replace('["127.0.0.1"]', '["<img src=x onerror=alert(1)>"]', 1))
        assert wait_until(lambda: "rejected" in json.loads(proxy.http_get("/ready")[2]), 10)
        hostile_dest = "\"><script>alert(1)</script>:443"
        query = urllib.parse.urlencode({"identity": SCRIPT_NAME, "dest": hostile_dest, "sni": "<i>x</i>'\""})
        for path in ("/", "/?" + query, "/?" + urllib.parse.urlencode({"identity": LONG_NAME,
                                                                       "dest": "a" * 900 + "<u>.example:443"})):
            status, headers, text = page(proxy, path)
            assert status in (200, 400), (path, status)
            markup = Markup()
            markup.feed(text)
            assert markup.tags <= PAGE_TAGS, markup.tags - PAGE_TAGS
            assert markup.attributes <= PAGE_ATTRIBUTES, markup.attributes - PAGE_ATTRIBUTES
            assert "<script" not in text.lower() and "<img" not in text and "<b>bold" not in text
            shown = "".join(markup.text) + "".join(markup.values)
            assert SCRIPT_NAME in shown and LONG_NAME in shown, "the names are shown, as text"
            assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;&amp;" in text
        assert "&lt;img src=x onerror=alert(1)&gt;" in page(proxy, "/")[2], "the rejected file's problem, escaped"
        status, _, text = page(proxy, "/?" + query)
        assert status == 400 and "&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;:443" in text
        assert 'value="&lt;i&gt;x&lt;/i&gt;&#x27;&quot;"' in text, "a form field echoes its value, escaped"
        status, _, text = page(proxy, "/?" + urllib.parse.urlencode({"dest": "a" * 1001}))
        assert status == 400 and "longer than 1000 characters" in text
        data = status_json(proxy)[1]
        assert {row["name"] for row in data["identities"]} >= {SCRIPT_NAME, LONG_NAME}
        assert data["tunnels"]["longest_lived"][0]["identity"] == SCRIPT_NAME
    finally:
        stream.close()
        reply.close()


# -- STATUS_PAGE=false ---------------------------------------------------------------------------


def test_status_page_off(start_proxy, ca, tls_upstream: Upstream) -> None:
    proxy: Proxy = start_proxy(POLICY, STATUS_PAGE="false")
    with connect(proxy, f"evil.example.com:{tls_upstream.port}", APP_KEY) as reply:
        assert reply.status == 403
    for path in ("/", "/status", "/status.json", "/?refresh=5", "/status.json?identity=app&dest=a.example:443"):
        status, _, body = proxy.http_get(path)
        assert status == 404, path
        assert json.loads(body)["endpoints"] == ["/health", "/ready", "/metrics"]
    assert proxy.http_status("/health") == 200 and proxy.requests_total(status="denied") == 1


@pytest.mark.parametrize("value", ["maybe", "", "yes", "2"])
def test_bad_status_page_setting_is_a_startup_error(start_proxy, value: str) -> None:
    proxy: Proxy = start_proxy(POLICY, STATUS_PAGE=value, _wait=False)
    expect_startup_error(proxy, "STATUS_PAGE", "expected true or false")
