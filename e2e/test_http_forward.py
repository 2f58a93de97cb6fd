"""Plain-HTTP forwarding end to end: `python egress_guard.py` as a subprocess, real curl
and raw-socket clients, and a local origin that records exactly what reached it.

The origin listens on 127.0.0.1 and is reached by the name origin.example.test through
HOSTS_FILE. Loopback is a forbidden range, so the `web` identity lists 127.0.0.1
explicitly while `nameonly` lists only the name (and is refused for it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

from _forward_origin import Origin, pattern_bytes

REPO = Path(__file__).resolve().parent.parent
KEYS = {"web": "web-key", "nameonly": "name-key", "nohttp": "nohttp-key", "limited": "limited-key",
        "watch": "watch-key"}
POLICY = """
identities:
  web:
    api_keys: ["web-key"]
    allowed_destinations: ["origin.example.test", "127.0.0.1"]
  nameonly:
    api_keys: ["name-key"]
    allowed_destinations: ["origin.example.test"]
  nohttp:
    api_keys: ["nohttp-key"]
    allow_http: false
    allowed_destinations: ["origin.example.test", "127.0.0.1"]
  limited:
    api_keys: ["limited-key"]
    max_tunnels: 1
    allowed_destinations: ["origin.example.test", "127.0.0.1"]
  watch:
    api_keys: ["watch-key"]
    mode: report
    allow_http: false
    allowed_destinations: ["origin.example.test", "127.0.0.1"]
"""
TIMEOUT = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:x".encode()).decode()


class Proxy:
    def __init__(self, process: subprocess.Popen, port: int, metrics_port: int, log: Path, origin: Origin) -> None:
        self.process, self.port, self.metrics_port, self.log, self.origin = process, port, metrics_port, log, origin

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def origin_url(self, path: str = "/", host: str = "origin.example.test") -> str:
        return f"http://{host}:{self.origin.port}{path}"

    def lines(self) -> list[dict]:
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsed": line})
        return out

    def wait_for_lines(self, predicate: Callable[[dict], bool], count: int = 1) -> list[dict]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = [line for line in self.lines() if predicate(line)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def curl(self, *args: str, key: str | None = "web-key") -> subprocess.CompletedProcess:
        command = ["curl", "-sS", "--max-time", str(TIMEOUT), "-x", self.url]
        if key is not None:
            command += ["-U", f"{key}:x"]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return subprocess.run([*command, *args], capture_output=True, timeout=TIMEOUT + 5, env=env)

    def client(self) -> "RawClient":
        return RawClient(self.port)


class RawClient:
    """A raw-socket HTTP/1.1 client: exactly the bytes we choose, responses read one by one."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buf = b""

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bytes:
        data = self.sock.recv(65536)
        self.buf += data
        return data

    def read_head(self) -> tuple[int, list[tuple[str, str]], bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._more():
                raise EOFError(f"connection closed before a response head; got {self.buf!r}")
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        return int(lines[0].split(" ")[1]), headers, head

    def read_response(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        status, headers, head = self.read_head()
        fields = {name.lower(): value for name, value in headers}
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif fields.get("transfer-encoding", "").lower().endswith("chunked"):
            body = self._chunked()
        elif "content-length" in fields:
            length = int(fields["content-length"])
            while len(self.buf) < length:
                if not self._more():
                    raise EOFError("connection closed mid-body")
            body, self.buf = self.buf[:length], self.buf[length:]
        else:
            while self._more():
                pass
            body, self.buf = self.buf, b""
        fields["_head"] = head.decode("latin-1")
        return status, fields, body

    def _chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buf:
                if not self._more():
                    raise EOFError("connection closed mid-chunk")
            line, self.buf = self.buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + self.buf:
                    if not self._more():
                        raise EOFError("connection closed in trailers")
                self.buf = (b"\r\n" + self.buf).split(b"\r\n\r\n", 1)[1]
                return body
            while len(self.buf) < size + 2:
                if not self._more():
                    raise EOFError("connection closed mid-chunk")
            body += self.buf[:size]
            self.buf = self.buf[size + 2:]

    def closed(self) -> bool:
        """True if the proxy closed the connection (EOF with nothing more to read)."""
        if self.buf:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    tmp = tmp_path_factory.mktemp("forward")
    (tmp / "policy.yaml").write_text(POLICY)
    (tmp / "hosts").write_text("127.0.0.1 origin.example.test other.example.test\n")
    origin = Origin()
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({
        "PROXY_HOST": "127.0.0.1", "PROXY_PORT": str(port),
        "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(metrics_port),
        "CONFIGMAP_PATH": str(tmp / "policy.yaml"), "HOSTS_FILE": str(tmp / "hosts"),
        "WATCH_INTERVAL": "0.2", "SHUTDOWN_TIMEOUT": "3", "IDLE_TIMEOUT": "3", "HEADER_TIMEOUT": "2", "LOG_LEVEL": "INFO",
    })
    log = tmp / "proxy.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, str(REPO / "egress_guard.py")], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    running = Proxy(process, port, metrics_port, log, origin)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"egress_guard.py exited with {process.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"egress_guard.py not ready within {TIMEOUT} s:\n{log.read_text()}")
            time.sleep(0.1)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        origin.close()


def request_bytes(proxy: Proxy, method: str = "GET", path: str = "/", *headers: str, key: str = "web-key",
                  host: str = "origin.example.test", version: str = "HTTP/1.1", body: bytes = b"") -> bytes:
    lines = [f"{method} http://{host}:{proxy.origin.port}{path} {version}",
             f"Host: {host}:{proxy.origin.port}", f"Proxy-Authorization: {basic(key)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def wait_until_true(predicate, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def last_received(proxy: Proxy, target: str):
    found = [r for r in proxy.origin.requests if r.target == target]
    assert found, f"the origin never received {target}"
    return found[-1]


# -- what the origin receives ------------------------------------------------------


def test_get_with_query_reaches_the_origin_in_origin_form(proxy: Proxy) -> None:
    done = proxy.curl(proxy.origin_url("/path?q=1"), "-H", "X-Trace: get-1", "-w", "\n%{http_code}")
    assert done.returncode == 0, done.stderr
    body, code = done.stdout.rsplit(b"\n", 1)
    assert code == b"200"
    assert json.loads(body)["target"] == "/path?q=1"
    got = last_received(proxy, "/path?q=1")
    head = got.head.decode("latin-1")
    assert head.startswith("GET /path?q=1 HTTP/1.1\r\n")
    assert got.get("Host") == [f"origin.example.test:{proxy.origin.port}"]
    assert got.get("X-Trace") == ["get-1"]
    assert got.get("Via") == ["1.1 egress-guard"]
    assert got.get("Connection") == ["close"]
    lowered = head.lower()
    assert "proxy-authorization" not in lowered and "proxy-connection" not in lowered
    assert "web-key" not in head and base64.b64encode(b"web-key:x").decode() not in head


def test_client_host_header_is_replaced_by_the_url_authority(proxy: Proxy) -> None:
    done = proxy.curl(proxy.origin_url("/host-check"), "-H", "Host: attacker.example", "-w", "\n%{http_code}")
    assert done.stdout.endswith(b"\n200"), done.stderr
    assert last_received(proxy, "/host-check").get("Host") == [f"origin.example.test:{proxy.origin.port}"]


def test_hop_by_hop_fields_are_stripped_both_ways(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(request_bytes(
            proxy, "GET", "/hop", "Connection: keep-alive, X-Private", "X-Private: client-secret",
            "Keep-Alive: timeout=30", "TE: trailers", "Upgrade: websocket", "Proxy-Connection: keep-alive",
            "X-End-To-End: kept"))
        status, fields, body = client.read_response()
    assert (status, body) == (200, b"ok")
    got = last_received(proxy, "/hop")
    names = {name.lower() for name, _ in got.headers}
    assert not names & {"x-private", "keep-alive", "te", "upgrade", "proxy-connection", "proxy-authorization"}
    assert got.get("X-End-To-End") == ["kept"]
    # The origin's hop-by-hop fields (and one it named in Connection) stay with the proxy.
    assert "x-hop" not in fields and "keep-alive" not in fields and "proxy-authenticate" not in fields
    assert fields["x-end-to-end"] == "kept"
    assert "connection" not in fields  # persistence is ours to state; HTTP/1.1 default is keep-alive


def test_post_of_one_megabyte_with_expect_100_continue(proxy: Proxy, tmp_path: Path) -> None:
    payload = os.urandom(1024 * 1024)
    (tmp_path / "payload").write_bytes(payload)
    done = proxy.curl(proxy.origin_url("/upload"), "--data-binary", f"@{tmp_path / 'payload'}",
                      "-H", "Expect: 100-continue", "--expect100-timeout", "15",
                      "-o", str(tmp_path / "answer"), "-w", "%{http_code} %{time_total}")
    assert done.returncode == 0, done.stderr
    code, seconds = done.stdout.split()
    assert code == b"200"
    # Had the proxy not relayed the origin's 100 Continue, curl would wait 15 s to send.
    assert float(seconds) < 10
    got = last_received(proxy, "/upload")
    assert got.method == "POST" and got.get("Expect") == ["100-continue"]
    assert got.body_length == len(payload)
    assert got.body_sha256 == hashlib.sha256(payload).hexdigest()
    assert json.loads((tmp_path / "answer").read_bytes())["body_length"] == len(payload)
    summaries = proxy.wait_for_lines(lambda l: l.get("message") == "forwarded" and l.get("method") == "POST"
                                     and l.get("bytes_up", 0) > len(payload))
    assert summaries and summaries[-1]["status_code"] == 200


def test_100_continue_is_relayed_before_the_body_is_sent(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(request_bytes(proxy, "PUT", "/expect", "Expect: 100-continue", "Content-Length: 5"))
        status, _, _ = client.read_response()
        assert status == 100  # the body has not been sent yet
        client.send(b"hello")
        status, _, body = client.read_response()
    assert status == 200
    assert json.loads(body)["body_length"] == 5


def test_head(proxy: Proxy) -> None:
    done = proxy.curl("-I", proxy.origin_url("/head-check"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length:" in done.stdout
    assert last_received(proxy, "/head-check").method == "HEAD"


def test_keep_alive_reuse_with_curl(proxy: Proxy) -> None:
    done = proxy.curl(proxy.origin_url("/first"), proxy.origin_url("/second"),
                      "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %{num_connects} %{local_port}\n")
    assert done.returncode == 0, done.stderr
    (code1, connects1, port1), (code2, connects2, port2) = [line.split() for line in done.stdout.splitlines()]
    assert (code1, code2) == (b"200", b"200")
    assert (connects1, connects2) == (b"1", b"0")  # the second request reused the connection
    assert port1 == port2
    client = f"127.0.0.1:{port1.decode()}"
    decisions = proxy.wait_for_lines(lambda l: l.get("message") == "request" and l.get("client") == client, 2)
    assert [d["action"] for d in decisions] == ["allowed", "allowed"]  # each request judged on its own
    summaries = proxy.wait_for_lines(lambda l: l.get("message") == "forwarded" and l.get("client") == client, 2)
    assert [s["keep_alive"] for s in summaries] == [True, True]


def test_later_request_to_a_forbidden_host_on_the_same_connection_is_refused(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(request_bytes(proxy, "GET", "/allowed-first"))
        status, _, body = client.read_response()
        assert status == 200 and json.loads(body)["target"] == "/allowed-first"
        before = proxy.origin.accepted
        client.send(request_bytes(proxy, "GET", "/forbidden-second", host="other.example.test"))
        status, fields, body = client.read_response()
        assert status == 403
        assert b"destination not allowed" in body
        assert fields["connection"] == "close" and client.closed()
    assert proxy.origin.accepted == before


def test_idle_keep_alive_connection_is_closed_quietly(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(request_bytes(proxy, "GET", "/then-idle"))
        status, fields, _ = client.read_response()
        assert status == 200 and "connection" not in fields
        port = client.sock.getsockname()[1]
        started = time.monotonic()
        assert client.closed()  # after HEADER_TIMEOUT, without a stray 408
        assert 1.5 < time.monotonic() - started < TIMEOUT
    assert not [l for l in proxy.lines() if l.get("client") == f"127.0.0.1:{port}" and l.get("action") == "timeout"]


def test_max_tunnels_counts_forwarded_requests_in_flight(proxy: Proxy) -> None:
    proxy.origin.release.clear()
    try:
        with proxy.client() as holder:
            holder.send(request_bytes(proxy, "GET", "/slow-chunked", key="limited-key"))
            assert holder.read_head()[0] == 200  # in flight: its slot is taken
            done = proxy.curl(proxy.origin_url("/second"), "-D", "-", "-w", "\n%{http_code}", key="limited-key")
            assert done.stdout.endswith(b"\n429") and b"Retry-After:" in done.stdout
            proxy.origin.release.set()
            holder._chunked()
        done = proxy.curl(proxy.origin_url("/third"), "-o", "/dev/null", "-w", "%{http_code}", key="limited-key")
        assert done.stdout == b"200"  # the slot was freed when the first request ended
    finally:
        proxy.origin.release.set()


def test_pipelined_requests_head_then_get(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(request_bytes(proxy, "HEAD", "/pipe-1") + request_bytes(proxy, "GET", "/pipe-2"))
        status1, fields1, _ = client.read_response("HEAD")
        status2, _, body2 = client.read_response()
    assert (status1, status2) == (200, 200)
    assert int(fields1["content-length"]) > 0  # HEAD announces a length but carries no body
    assert json.loads(body2)["target"] == "/pipe-2"


def test_chunked_request_body_and_a_request_after_it(proxy: Proxy) -> None:
    chunked = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
    with proxy.client() as client:
        client.send(request_bytes(proxy, "POST", "/chunked-up", "Transfer-Encoding: chunked", body=chunked)
                    + request_bytes(proxy, "GET", "/after-chunked"))
        status1, _, body1 = client.read_response()
        status2, _, body2 = client.read_response()
    assert (status1, status2) == (200, 200)
    assert json.loads(body1)["body_length"] == 12
    got = last_received(proxy, "/chunked-up")
    assert got.get("Transfer-Encoding") == ["chunked"]
    assert got.body_sha256 == hashlib.sha256(b"hello, world").hexdigest()
    assert json.loads(body2)["target"] == "/after-chunked"


def test_malformed_chunked_body_ends_the_request(proxy: Proxy) -> None:
    """The head (and the good start of the body) already went to the origin when the bad
    chunk arrives: the origin connection is closed at once, mid-body, so the origin
    never gets a complete request, and the client gets 400."""
    with proxy.client() as client:
        client.send(request_bytes(proxy, "POST", "/bad-chunks", "Transfer-Encoding: chunked",
                                  body=b"5\r\nhello\r\n"))
        assert wait_until_true(lambda: "/bad-chunks" in proxy.origin.started)
        client.send(b"5\r\nhelloXX\r\n0\r\n\r\n")
        status, _, body = client.read_response()
        assert status == 400 and b"chunk" in body
        assert client.closed()
    assert wait_until_true(lambda: "/bad-chunks" in proxy.origin.cut_off), "the origin connection stayed open"
    assert not any(r.target.endswith("/bad-chunks") for r in proxy.origin.requests)


def test_large_chunked_response_is_streamed(proxy: Proxy, tmp_path: Path) -> None:
    size = 8 * 1024 * 1024 + 123
    done = proxy.curl(proxy.origin_url(f"/big-chunked?n={size}"), "-o", str(tmp_path / "big"),
                      "-w", "%{http_code}")
    assert done.stdout == b"200", done.stderr
    assert hashlib.sha256((tmp_path / "big").read_bytes()).digest() == hashlib.sha256(pattern_bytes(size)).digest()


def test_response_bytes_reach_the_client_before_the_origin_finishes(proxy: Proxy) -> None:
    proxy.origin.release.clear()
    with proxy.client() as client:
        client.send(request_bytes(proxy, "GET", "/slow-chunked"))
        status, _, _ = client.read_head()
        assert status == 200
        deadline = time.monotonic() + TIMEOUT
        while b"first;" not in client.buf and time.monotonic() < deadline:
            client._more()
        assert b"first;" in client.buf and b"second;" not in client.buf  # not held back by the proxy
        proxy.origin.release.set()
        rest = client._chunked()
    assert rest == b"first;second;"


def test_http10_client_gets_a_decoded_body_and_a_closed_connection(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(request_bytes(proxy, "GET", "/big-chunked?n=100000", version="HTTP/1.0"))
        status, fields, body = client.read_response()
    assert status == 200
    assert "transfer-encoding" not in fields and fields["connection"] == "close"
    assert body == pattern_bytes(100000)


def test_close_delimited_response(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(request_bytes(proxy, "GET", "/close"))
        status, fields, body = client.read_response()
    assert (status, body) == (200, b"until the origin closes")
    assert fields["connection"] == "close"


# -- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key"], ids=["no-credentials", "unknown-key"])
def test_407(proxy: Proxy, key: str | None) -> None:
    before = proxy.origin.accepted
    done = proxy.curl(proxy.origin_url("/needs-auth"), "-D", "-", "-o", "/dev/null", "-w", "%{http_code}", key=key)
    assert done.stdout.endswith(b"407")
    assert b'Proxy-Authenticate: Basic realm="egress-guard"' in done.stdout
    assert proxy.origin.accepted == before


def test_403_destination_not_allowed(proxy: Proxy) -> None:
    before = proxy.origin.accepted
    done = proxy.curl(proxy.origin_url("/", host="other.example.test"), "-w", "\n%{http_code}")
    assert done.stdout.endswith(b"\n403")
    assert b"destination not allowed" in done.stdout
    assert proxy.origin.accepted == before


def test_403_name_resolving_to_a_forbidden_address(proxy: Proxy) -> None:
    before = proxy.origin.accepted
    done = proxy.curl(proxy.origin_url("/"), "-w", "\n%{http_code}", key="name-key")
    assert done.stdout.endswith(b"\n403")
    assert b"forbidden address" in done.stdout
    assert proxy.origin.accepted == before


def test_403_allow_http_false(proxy: Proxy) -> None:
    before = proxy.origin.accepted
    done = proxy.curl(proxy.origin_url("/"), "-w", "\n%{http_code}", key="nohttp-key")
    assert done.stdout.endswith(b"\n403")
    assert b"allow_http: false" in done.stdout
    assert proxy.origin.accepted == before


def test_report_mode_lets_plain_http_through_and_records_it(proxy: Proxy) -> None:
    done = proxy.curl(proxy.origin_url("/reported"), "-o", "/dev/null", "-w", "%{http_code}", key="watch-key")
    assert done.stdout == b"200"
    lines = proxy.wait_for_lines(lambda l: l.get("identity") == "watch" and l.get("action") == "reported")
    assert lines and "allow_http: false" in lines[-1]["reason"]


SMUGGLING = [
    ("cl-and-te", ["Content-Length: 4", "Transfer-Encoding: chunked"], "HTTP/1.1", None),
    ("duplicate-cl", ["Content-Length: 4", "Content-Length: 4"], "HTTP/1.1", None),
    ("non-numeric-cl", ["Content-Length: 4x"], "HTTP/1.1", None),
    ("signed-cl", ["Content-Length: +4"], "HTTP/1.1", None),
    ("te-gzip", ["Transfer-Encoding: gzip"], "HTTP/1.1", None),
    ("te-chunked-gzip", ["Transfer-Encoding: chunked, gzip"], "HTTP/1.1", None),
    ("te-chunked-chunked", ["Transfer-Encoding: chunked, chunked"], "HTTP/1.1", None),
    ("two-te-lines", ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], "HTTP/1.1", None),
    ("te-on-http10", ["Transfer-Encoding: chunked"], "HTTP/1.0", None),
    ("space-before-colon", [], "HTTP/1.1", b"Content-Length : 4\r\n"),
    ("obs-fold", ["X-A: 1"], "HTTP/1.1", b" Transfer-Encoding: chunked\r\n"),
    ("bare-lf", [], "HTTP/1.1", b"Content-Length: 4\n"),
]


@pytest.mark.parametrize("headers,version,extra", [c[1:] for c in SMUGGLING], ids=[c[0] for c in SMUGGLING])
def test_smuggling_shapes_get_400_and_reach_no_origin(proxy: Proxy, headers: list[str], version: str,
                                                       extra: bytes | None) -> None:
    smuggled = request_bytes(proxy, "GET", "/smuggled")
    raw = request_bytes(proxy, "POST", "/front", *headers, version=version)
    if extra is not None:
        raw = raw[:-2] + extra + b"\r\n"
    before = proxy.origin.accepted
    with proxy.client() as client:
        client.send(raw + b"0\r\n\r\n" + smuggled)
        status, _, body = client.read_response()
        assert status == 400, body
        assert client.closed()
    assert proxy.origin.accepted == before


def test_extra_space_in_request_line_is_400(proxy: Proxy) -> None:
    before = proxy.origin.accepted
    with proxy.client() as client:
        client.send(f"GET  http://origin.example.test:{proxy.origin.port}/ HTTP/1.1\r\n"
                    f"Proxy-Authorization: {basic('web-key')}\r\n\r\n".encode())
        status, _, _ = client.read_response()
    assert status == 400
    assert proxy.origin.accepted == before


def test_https_absolute_form_is_400_pointing_to_connect(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(f"GET https://origin.example.test:{proxy.origin.port}/ HTTP/1.1\r\n"
                    f"Proxy-Authorization: {basic('web-key')}\r\n\r\n".encode())
        status, _, body = client.read_response()
    assert status == 400 and b"CONNECT" in body


def test_trace_is_405(proxy: Proxy) -> None:
    done = proxy.curl("-X", "TRACE", proxy.origin_url("/"), "-D", "-", "-o", "/dev/null", "-w", "%{http_code}")
    assert done.stdout.endswith(b"405")
    assert b"Allow:" in done.stdout


def test_unreachable_origin_is_502(proxy: Proxy) -> None:
    done = proxy.curl(f"http://origin.example.test:{free_port()}/", "-w", "\n%{http_code}")
    assert done.stdout.endswith(b"\n502")


def test_malformed_origin_response_is_502(proxy: Proxy) -> None:
    done = proxy.curl(proxy.origin_url("/garbage"), "-w", "\n%{http_code}")
    assert done.stdout.endswith(b"\n502")
    lines = proxy.wait_for_lines(lambda l: l.get("message") == "forwarded" and l.get("status_code") == 502)
    assert lines and "status line" in lines[-1]["error"]


def test_early_origin_refusal_of_a_large_upload_reaches_the_client(proxy: Proxy, tmp_path: Path) -> None:
    (tmp_path / "payload").write_bytes(b"x" * (16 * 1024 * 1024))
    for expect in ("Expect: 100-continue", "Expect:"):
        done = proxy.curl(proxy.origin_url("/reject-early"), "--data-binary", f"@{tmp_path / 'payload'}",
                          "-H", expect, "-w", "\n%{http_code}")
        assert done.stdout == b"too large\n413", (expect, done.stderr)


def test_client_stalling_mid_body_gets_408_after_idle_timeout(proxy: Proxy) -> None:
    with proxy.client() as client:
        client.send(request_bytes(proxy, "POST", "/stalled", "Content-Length: 100", body=b"only part"))
        started = time.monotonic()
        status, _, body = client.read_response()
        assert status == 408 and b"IDLE_TIMEOUT" in body
        assert 2 < time.monotonic() - started < TIMEOUT
        assert client.closed()


def test_silent_origin_is_502_after_idle_timeout(proxy: Proxy) -> None:
    proxy.origin.release.clear()
    try:
        done = proxy.curl(proxy.origin_url("/silent"), "-w", "\n%{http_code}")
    finally:
        proxy.origin.release.set()
    assert done.stdout.endswith(b"\n502") and b"IDLE_TIMEOUT" in done.stdout


def test_client_vanishing_mid_body_leaves_the_proxy_serving(proxy: Proxy) -> None:
    for _ in range(20):
        with proxy.client() as client:
            client.send(request_bytes(proxy, "POST", "/vanish", "Transfer-Encoding: chunked", body=b"ff\r\nabc"))
    done = proxy.curl(proxy.origin_url("/still-here"), "-o", "/dev/null", "-w", "%{http_code}")
    assert done.stdout == b"200"


# -- what operators see -------------------------------------------------------------


def test_logs_and_metrics(proxy: Proxy) -> None:
    proxy.curl(proxy.origin_url("/metrics-check"), "-o", "/dev/null")
    summary = proxy.wait_for_lines(lambda l: l.get("message") == "forwarded" and l.get("identity") == "web")[-1]
    assert {"method", "destination", "status_code", "bytes_up", "bytes_down", "duration_ms"} <= summary.keys()
    text = proxy.log.read_text()
    assert "Traceback" not in text and not [l for l in proxy.lines() if "unparsed" in l]
    for key in KEYS.values():
        assert key not in text
        assert base64.b64encode(f"{key}:x".encode()).decode() not in text
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=5) as answer:
        metrics = answer.read().decode()
    assert 'egress_proxy_requests_total{destination="origin.example.test",identity="web",status="allowed"}' in metrics
    assert 'egress_proxy_bytes_total{direction="downstream",identity="web"}' in metrics
