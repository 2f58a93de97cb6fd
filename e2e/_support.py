"""Helpers for the end-to-end tests: the proxy as a subprocess, local upstreams that
record what reached them, and real clients (raw CONNECT, Python `ssl`, curl).

Everything runs on 127.0.0.1 and every wait is bounded. Test names such as
api.example.com reach the local upstreams through a HOSTS_FILE the proxy reads;
nothing touches /etc/hosts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest

REPO = Path(__file__).resolve().parent.parent
# The pinned runtime wheels (and the build backend) `make test` downloads: packages install
# from them offline.
WHEELS = REPO / ".venv" / "wheels"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0
IO_TIMEOUT = 10.0

# hosts(5) file every proxy reads: the names tests CONNECT to.
HOSTS = """\
127.0.0.1 api.example.com other.example.com evil.example.com allowed.example.com
127.0.0.1 xn--bcher-kva.example.com xn--pypal-4ve.example.com paypal.example.com
169.254.169.254 metadata.example.com
::ffff:127.0.0.1 mapped.example.com
64:ff9b::7f00:1 nat64.example.com
127.0.0.1 mixed.example.com
169.254.169.254 mixed.example.com
127.0.0.2 multi.example.com
127.0.0.1 multi.example.com
::1 v6loop.example.com
2002:7f00:1::1 sixtofour.example.com
2001:0:4136:e378:8000:63bf:80ff:fffe teredo.example.com
fd00:ec2::254 awsmeta.example.com
100.64.0.1 cgnat.example.com
0.0.0.0 zero.example.com
224.0.0.1 multicast.example.com
255.255.255.255 broadcast.example.com
fe80::1 linklocal6.example.com
"""
# The plain policy most tests need: one identity reaching the local upstreams.
APP_POLICY = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
"""

# Names the TLS upstream's certificate covers.
CERT_NAMES = ("api.example.com", "other.example.com", "evil.example.com", "allowed.example.com", "www.example.com",
              "xn--bcher-kva.example.com", "paypal.example.com", "127.0.0.1")


# The README's closed set of decision words (Statuses) (metric label `status`, log field `action`).
STATUS_WORDS = frozenset({"allowed", "denied", "auth_required", "bad_request", "connection_failed",
                          "sni_mismatch", "timeout", "limited", "reported"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def basic(key: str, password: str = "x") -> str:
    return "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()


def clean_env() -> dict[str, str]:
    """The test runner's environment without proxy variables (curl and urllib honour them)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def run(argv: Iterable[Any], timeout: float = 180, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command to completion (no stdin), its output captured as text."""
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


def fresh_venv(parent: Path, *requirements: Path | str) -> Path:
    """A new venv with `requirements` installed by pip from local files only; its bin/."""
    if not any(WHEELS.glob("gevent-*.whl")):
        pytest.fail(f"{WHEELS} holds no runtime wheels: `make test` downloads them (pip download -r requirements.txt)")
    made = run([sys.executable, "-m", "venv", parent])
    assert made.returncode == 0, made.stderr
    pip = run([parent / "bin/python", "-m", "pip", "install", "--quiet", "--no-index", "--find-links", WHEELS,
               *requirements],
              env={"PATH": "/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CONFIG_FILE": "/dev/null"})
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return parent / "bin"


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; that value, or the last falsy one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------
# Metrics text


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(name, sorted label pairs): value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        pairs = tuple(sorted(_LABEL.findall(labels or "")))
        samples[(name, pairs)] = float(value)
    return samples


class Metrics(dict):
    """Parsed metrics with lookups by name and (partial) labels."""

    def value(self, name: str, **labels: str) -> float:
        """The sum over samples named `name` whose labels include `labels` (0 if none)."""
        return sum(v for (n, pairs), v in self.items() if n == name and set(labels.items()) <= set(pairs))

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(pairs) for (n, pairs) in self if n == name]


# ---------------------------------------------------------------------------
# The proxy subprocess


class Proxy:
    """One `python egress_guard.py` process and its files."""

    def __init__(self, workdir: Path, policy: str | None, env: dict[str, Any] | None = None,
                 hosts: str = HOSTS, wait: bool = True, launch: Callable[[Proxy], list[str]] | None = None) -> None:
        """Start the proxy in `workdir` with `policy` written to workdir/egress-policy.yaml
        (None: write nothing, e.g. when `env` points CONFIGMAP_PATH elsewhere). `env`
        overrides the defaults below; a value of None removes the variable. `launch`
        gives the command line instead of `python egress_guard.py` (e.g. the image in a
        container), called once the files and `env` are in place."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.hosts_path = workdir / "hosts"
        self.hosts_path.write_text(hosts)
        self.log_path = workdir / "stdout.log"
        self.err_path = workdir / "stderr.log"
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = clean_env()
        self.env.update({
            "PROXY_HOST": "127.0.0.1",
            "PROXY_PORT": str(self.port),
            "METRICS_HOST": "127.0.0.1",
            "METRICS_PORT": str(self.metrics_port),
            "CONFIGMAP_PATH": str(workdir / "egress-policy.yaml"),
            "WATCH_INTERVAL": "0.2",
            "HOSTS_FILE": str(self.hosts_path),
            "CONNECT_TIMEOUT": "3",
            "SHUTDOWN_TIMEOUT": "5",
        })
        for name, value in (env or {}).items():
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = str(value)
        self.policy_path = Path(self.env.get("CONFIGMAP_PATH", workdir / "egress-policy.yaml"))
        if policy is not None:
            self.policy_path.write_text(policy)
        self.returncode: int | None = None
        with open(self.log_path, "wb") as out, open(self.err_path, "wb") as err:
            command = launch(self) if launch is not None else [sys.executable, "egress_guard.py"]
            # A process group of its own: a launcher (`make run`) and the proxy it starts
            # are stopped together.
            self.process = subprocess.Popen(command, cwd=REPO, env=self.env, start_new_session=True,
                                            stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()

    # -- lifecycle ---------------------------------------------------------

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"egress_guard.py exited with {self.process.returncode}:\n{self.output()}")
            if self.http_status("/ready", timeout=1) == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"egress_guard.py not ready within {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        self.returncode = self.process.wait(timeout=timeout)
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM to the process group, wait up to `timeout` for all of it, then kill;
        the exit code of the launched process."""
        deadline = time.monotonic() + timeout
        group = self.process.pid  # the session leader's pid is the group's id
        if self.process.poll() is None or _group_alive(group):
            _signal_group(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(group, signal.SIGKILL)
            self.process.wait(timeout=5)
        while _group_alive(group) and time.monotonic() < deadline:  # what a launcher started
            time.sleep(0.05)
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
        self.returncode = self.process.returncode
        return self.returncode

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    # -- files ---------------------------------------------------------------

    def output(self) -> str:
        text = self.log_path.read_text(errors="replace")
        err = self.err_path.read_text(errors="replace")
        return text + (f"\n--- stderr ---\n{err}" if err else "")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_lines(self, offset: int = 0) -> list[dict]:
        """Every stdout line parsed as JSON (a line that is not JSON fails the test)."""
        lines = []
        with open(self.log_path, "rb") as handle:
            handle.seek(max(offset - 1, 0))
            data = handle.read()
        if offset > 0:
            # Start at a line boundary: skip the rest of a line cut by `offset`.
            data = data[1:] if data[:1] == b"\n" else data[data.find(b"\n") + 1:] if b"\n" in data else b""
        text = data.decode(errors="replace")
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a line still being written
        for raw in text.splitlines():
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    raise AssertionError(f"log line is not JSON: {raw!r}") from None
        return lines

    def find_logs(self, **fields: Any) -> list[dict]:
        return [line for line in self.log_lines() if all(line.get(k) == v for k, v in fields.items())]

    def wait_log(self, predicate: Callable[[dict], bool], timeout: float = 5.0, offset: int = 0) -> dict:
        found = wait_until(lambda: next((l for l in self.log_lines(offset) if predicate(l)), None), timeout)
        assert found, f"no matching log line within {timeout} s:\n{self.log_text()[-4000:]}"
        return found

    def decision(self, client: Reply | str, timeout: float = 5.0) -> dict:
        """The decision record ("request" line) the proxy logged for one client connection."""
        peer = client if isinstance(client, str) else client.client
        offset = 0 if isinstance(client, str) else client.log_offset
        return self.wait_log(lambda l: l.get("message") == "request" and l.get("client") == peer, timeout, offset)

    def write_policy(self, text: str) -> None:
        """Replace the policy file atomically (a new inode, as most tools do)."""
        tmp = self.policy_path.with_name(self.policy_path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.policy_path)

    # -- admin endpoints -------------------------------------------------------

    def http_get(self, path: str, timeout: float = 3.0) -> tuple[int, dict[str, str], bytes]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=timeout) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def http_status(self, path: str, timeout: float = 3.0) -> int | None:
        try:
            return self.http_get(path, timeout)[0]
        except OSError:
            return None

    def metrics(self) -> Metrics:
        status, _, body = self.http_get("/metrics")
        assert status == 200
        return Metrics(parse_metrics(body.decode()))

    def requests_total(self, **labels: str) -> float:
        return self.metrics().value("egress_proxy_requests_total", **labels)

    def assert_status_words(self) -> None:
        """Every status label and log action so far is one of the README's status words."""
        labels = {s["status"] for s in self.metrics().series("egress_proxy_requests_total")}
        actions = {l["action"] for l in self.log_lines() if "action" in l}
        assert labels and labels <= STATUS_WORDS, labels - STATUS_WORDS
        assert actions <= STATUS_WORDS, actions - STATUS_WORDS


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    """Does a process of `group` still run (zombies waiting to be reaped do not count)?"""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


class ProxyFactory:
    """Starts proxies in fresh directories and stops every one at teardown."""

    def __init__(self, mktemp: Callable[[], Path]) -> None:
        self.mktemp = mktemp
        self.started: list[Proxy] = []

    def __call__(self, policy: str | None, **env: Any) -> Proxy:
        wait, launch = env.pop("_wait", True), env.pop("_launch", None)
        proxy = Proxy(self.mktemp(), policy, env, wait=False, launch=launch)
        self.started.append(proxy)
        if wait:
            proxy.wait_ready()
        return proxy

    def close(self) -> list[str]:
        """Stop every proxy; problems seen in their logs (tracebacks, non-JSON lines on stdout).

        stderr is checked by dedicated tests (test_reload, test_lifecycle), so that one
        defect fails the test about it rather than every test that happens to trigger it.
        """
        problems = []
        for proxy in self.started:
            proxy.stop()
            text = proxy.log_text()
            if "Traceback" in text:
                problems.append(f"{proxy.workdir}: traceback in the proxy's log:\n{text[-3000:]}")
            try:
                proxy.log_lines()
            except AssertionError as error:
                problems.append(f"{proxy.workdir}: {error}")
        return problems


# ---------------------------------------------------------------------------
# Upstreams


@dataclass
class Conn:
    """What one accepted upstream connection saw."""

    peer: tuple
    raw_bytes: int = -1          # bytes seen before any TLS processing (-1: not yet known)
    sni: str | None = None
    received: bytes = b""        # application bytes (decrypted for TLS)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class Upstream:
    """A threaded TCP server on 127.0.0.1 that records every connection.

    `mode`: "echo" echoes bytes and, when the client half-closes, sends `EOF:<n>` and
    closes; "banner" sends a greeting first, then echoes; "goodbye" sends a line, shuts
    down its write side at once and then records what still arrives. With `tls`, the first bytes
    are peeked raw (so a test can prove nothing arrived) before the TLS handshake;
    decrypted "GET " requests get a small HTTP response (for curl).
    """

    BANNER = b"220 upstream.example ready\r\n"

    def __init__(self, *, tls: ssl.SSLContext | None = None, mode: str = "echo", peek_timeout: float = 10.0,
                 host: str = "127.0.0.1") -> None:
        self.tls = tls
        self.mode = mode
        self.peek_timeout = peek_timeout
        self.conns: list[Conn] = []
        self.lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            conn = Conn(peer)
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(sock, conn), daemon=True).start()

    def _serve(self, sock: socket.socket, conn: Conn) -> None:
        try:
            with sock:
                sock.settimeout(self.peek_timeout)
                if self.mode == "banner":
                    sock.sendall(self.BANNER)
                if self.mode == "goodbye":
                    sock.sendall(self.BANNER)
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(IO_TIMEOUT)
                    while data := sock.recv(65536):
                        conn.received += data
                    return
                if self.tls is not None:
                    try:
                        peeked = sock.recv(65536, socket.MSG_PEEK)
                    except TimeoutError:
                        peeked = b""
                    conn.raw_bytes = len(peeked)
                    if not peeked:
                        return
                    sock.settimeout(IO_TIMEOUT)
                    stream = self.tls.wrap_socket(sock, server_side=True)
                    conn.sni = getattr(stream, "_test_sni", None)
                    with stream:
                        self._talk(stream, conn, tls=True)
                else:
                    sock.settimeout(IO_TIMEOUT)
                    self._talk(sock, conn, tls=False)
        except (OSError, ssl.SSLError) as error:
            conn.error = f"{type(error).__name__}: {error}"
        finally:
            if conn.raw_bytes < 0:
                conn.raw_bytes = len(conn.received)
            conn.done.set()

    def _talk(self, sock: socket.socket, conn: Conn, tls: bool) -> None:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            conn.received += data
            if tls and conn.received.startswith(b"GET "):
                if b"\r\n\r\n" in conn.received:
                    body = b"hello from upstream\n"
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(body), body))
                    return
                continue
            sock.sendall(data)
        if not tls:
            sock.sendall(b"EOF:%d" % len(conn.received))

    def snapshot(self) -> int:
        with self.lock:
            return len(self.conns)

    def since(self, mark: int) -> list[Conn]:
        with self.lock:
            return self.conns[mark:]

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass


def assert_never_dialled(decision: dict, upstream: Upstream, mark: int = 0) -> None:
    """The request behind `decision` (its logged decision line) reached no destination.

    The decision line names the `address` dialled whenever the proxy dialled one, and it
    is written after any dial, so its absence is the proof; the upstream's own record
    must agree (no connection since `mark`)."""
    assert "address" not in decision, f"a refused request was dialled: {decision}"
    assert upstream.since(mark) == [], "a refused request was dialled"


def server_context(ca: Any, *, retry: bool = False, names: list | None = None) -> ssl.SSLContext:
    """A TLS server context with a certificate for the test names; records the SNI.

    `retry`: the server takes only the P-384 group, so a client that key-shares X25519
    (OpenSSL's default) gets a HelloRetryRequest. `names`: every server name the SNI
    callback sees is appended here (one per ClientHello that reached OpenSSL)."""
    cert = ca.issue_cert(*CERT_NAMES)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    if retry:
        context.set_ecdh_curve("secp384r1")

    def remember(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sock._test_sni = name  # type: ignore[attr-defined]
        if names is not None:
            names.append(name)

    context.sni_callback = remember
    return context


def client_context(ca: Any, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(context)
    context.check_hostname = check_hostname
    return context


# ---------------------------------------------------------------------------
# Clients


@dataclass
class Reply:
    """The proxy's answer to a request head, and the still-open socket."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    sock: socket.socket
    raw_head: bytes = b""
    client: str = ""  # "127.0.0.1:port" as the proxy logs it
    log_offset: int = 0  # size of the proxy's log when the connection opened

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_reply(sock: socket.socket, timeout: float = IO_TIMEOUT) -> Reply:
    """Read one response head (and, for errors, the Content-Length body) from `sock`."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(1)  # byte by byte: never read past the head into the tunnel
        if not data:
            raise ConnectionError(f"proxy closed the connection before a full response: {buf!r}")
        buf += data
    head = buf.decode("latin-1")
    lines = head.split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        data = sock.recv(length - len(body))
        if not data:
            break
        body += data
    host, port = sock.getsockname()[:2]
    return Reply(int(status), reason[0] if reason else "", headers, body, sock, buf, f"{host}:{port}")


def open_client(proxy: Proxy, timeout: float = IO_TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send_raw(proxy: Proxy, data: bytes, timeout: float = IO_TIMEOUT) -> Reply:
    """Send `data` as is on a new connection; the reply."""
    offset = proxy.log_size()
    sock = open_client(proxy, timeout)
    try:
        sock.sendall(data)
        reply = read_reply(sock, timeout)
        reply.log_offset = offset
        return reply
    except BaseException:
        sock.close()
        raise


def connect_head(target: str, key: str | None, headers: Iterable[str] = ()) -> bytes:
    """The head of `CONNECT target` (with Basic auth when `key` is given)."""
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if key is not None:
        lines.append(f"Proxy-Authorization: {basic(key)}")
    lines += list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def connect(proxy: Proxy, target: str, key: str | None, *, headers: Iterable[str] = (),
            timeout: float = IO_TIMEOUT) -> Reply:
    """Send `CONNECT target` (with Basic auth when `key` is given); the reply, socket open."""
    return send_raw(proxy, connect_head(target, key, headers), timeout)


def tls_wrap(sock: socket.socket, ca: Any, sni: str | None, timeout: float = IO_TIMEOUT,
             check_hostname: bool = True) -> ssl.SSLSocket:
    """TLS over an established tunnel; `sni=None` sends no server_name."""
    context = client_context(ca, check_hostname=check_hostname and sni is not None and not _is_ip(sni))
    sock.settimeout(timeout)
    return context.wrap_socket(sock, server_hostname=sni)


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def recv_exactly(sock: socket.socket, n: int, timeout: float = IO_TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            break
        buf += data
    return buf


def recv_until_eof(sock: socket.socket, timeout: float = IO_TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return buf
        buf += data


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes (EOF or reset) within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


class BioTLS:
    """A TLS client over a tunnel socket, driven through memory BIOs so the test decides
    exactly how the ClientHello's bytes reach the wire (segments, records)."""

    def __init__(self, sock: socket.socket, ca: Any, sni: str) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = client_context(ca).wrap_bio(self.incoming, self.outgoing, server_hostname=sni)
        sock.settimeout(IO_TIMEOUT)

    def client_hello(self) -> bytes:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def next_flight(self) -> bytes:
        """Read the server's answer until the client has something to send; that."""
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("tunnel closed during the TLS handshake")
            self.incoming.write(data)
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            out = self.outgoing.read()
            if out:
                return out

    def finish_handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("tunnel closed during the TLS handshake")
                self.incoming.write(data)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                buf += self.obj.read(n - len(buf))
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    break
                self.incoming.write(data)
        return buf


def reframe(hello: bytes, pieces: int) -> bytes:
    """Re-frame a one-record ClientHello into `pieces` handshake records."""
    assert hello[0] == 0x16
    version, length = hello[1:3], int.from_bytes(hello[3:5], "big")
    payload = hello[5:5 + length]
    assert len(payload) == length and len(hello) == 5 + length, "expected exactly one record"
    size = -(-len(payload) // pieces)
    out = b""
    for start in range(0, len(payload), size):
        chunk = payload[start:start + size]
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
    return out


def curl(proxy: Proxy, url: str, key: str | None, ca_pem: str | Path | None, *args: str,
         timeout: float = 20.0) -> subprocess.CompletedProcess:
    command = ["curl", "-sS", "--max-time", "10", "-x", f"http://127.0.0.1:{proxy.port}"]
    if key is not None:
        command += ["-U", f"{key}:pass"]
    if ca_pem is not None:
        command += ["--cacert", str(ca_pem)]
    command += [*args, url]
    return subprocess.run(command, check=False, capture_output=True, timeout=timeout, env=clean_env(), text=True)


def tunnel_works(proxy: Proxy, ca: Any, host: str, port: int, key: str = "app-key") -> bool:
    """A TLS tunnel to `host` opens and carries bytes both ways."""
    with connect(proxy, f"{host}:{port}", key) as reply:
        if reply.status != 200:
            return False
        stream = tls_wrap(reply.sock, ca, host)
        stream.sendall(b"still here")
        ok = recv_exactly(stream, 10) == b"still here"
        stream.close()
        return ok


def expect_startup_error(proxy: Proxy, *words: str) -> dict:
    """The proxy exits 1 on a startup error: one JSON ERROR line naming `words`, no
    traceback, nothing left listening; that line."""
    try:
        code = proxy.wait_exit(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the proxy did not exit on a startup error:\n{proxy.output()}")
    output = proxy.output()
    assert code == 1, output
    assert "Traceback" not in output, output
    lines = proxy.log_lines()
    errors = [l for l in lines if l.get("level") == "ERROR"]
    assert len(errors) == 1, lines
    for word in words:
        assert word in errors[0]["message"] + " " + str(errors[0].get("error", "")), errors[0]
    for line in lines:
        assert {"timestamp", "level", "message"} <= set(line), line
    assert proxy.http_status("/health", timeout=0.5) is None, "nothing may stay listening"
    return errors[0]
