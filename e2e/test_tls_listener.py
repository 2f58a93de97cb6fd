"""The TLS listener (`https://` proxy URLs) and client certificates as identities,
against the real subprocess with real clients: curl `--proxy https://`, Python
`requests`, and Python `ssl` sockets for what curl cannot do on purpose (stall mid-
handshake, send plaintext to the TLS port, watch a half-close).

Certificates come from e2e/_certs.py: a client CA the proxy trusts, another it does not,
and leaf certificates carrying a SPIFFE URI, a DNS name or a common name.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from _certs import Authority, Issued
from _forward_origin import Origin
from _support import (
    IO_TIMEOUT,
    BioTLS,
    Proxy,
    ProxyFactory,
    Upstream,
    clean_env,
    connect_head,
    free_port,
    read_reply,
    recv_exactly,
    wait_until,
)

SPIFFE = "spiffe://cluster.local/ns/shop/sa/web"

POLICY = f"""
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
  web:
    client_certificates: ["uri:{SPIFFE}"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
  batch:
    client_certificates: ["dns:batch.jobs.svc"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
  reports:
    api_keys: ["reports-key"]
    client_certificates: ["cn:reporting"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
  raw:
    api_keys: ["raw-key"]
    client_certificates: ["cn:raw-stream"]
    require_tls: false
    allowed_destinations: ["127.0.0.1"]
"""


class PKI:
    """The proxy's CA and certificate, client certificates of every kind, and a CA the
    proxy does not trust."""

    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory, "egress-guard test CA")
        self.server = self.ca.server()
        self.web = self.ca.issue("web", uri=(SPIFFE,))
        self.batch = self.ca.issue("batch", dns=("batch.jobs.svc",))
        self.reports = self.ca.issue("reports", cn="reporting")
        self.raw = self.ca.issue("raw", cn="raw-stream")
        self.nobody = self.ca.issue("nobody", cn="nobody", uri=("spiffe://cluster.local/ns/x/sa/nobody",))
        self.expired = self.ca.issue("expired", uri=(SPIFFE,), expired=True)
        self.server_only = self.ca.issue("server-only", uri=(SPIFFE,), client=False, server=True)
        self.stranger = Authority(directory / "other", "someone else's CA").issue("stranger", uri=(SPIFFE,))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def tls_env(pki: PKI, **extra: Any) -> dict[str, Any]:
    return {"PROXY_TLS_PORT": free_port(), "PROXY_TLS_CERT": pki.server.cert, "PROXY_TLS_KEY": pki.server.key,
            "PROXY_TLS_CLIENT_CA": pki.ca.path, **extra}


@pytest.fixture(scope="module")
def proxy(module_proxies: ProxyFactory, pki: PKI) -> Proxy:
    return module_proxies(POLICY, **tls_env(pki))


def tls_port(proxy: Proxy) -> int:
    return int(proxy.env["PROXY_TLS_PORT"])


def curl_tls(proxy: Proxy, pki: PKI, url: str, ca_pem: Path | None, *args: str,
             cert: Issued | None = None, key: str | None = None) -> subprocess.CompletedProcess:
    """curl through the TLS listener (`--proxy https://`), trusting the proxy's CA."""
    command = ["curl", "-sS", "--max-time", "10", "--proxy", f"https://127.0.0.1:{tls_port(proxy)}",
               "--proxy-cacert", str(pki.ca.path), "-w", "\n%{http_connect}"]
    if cert is not None:
        command += ["--proxy-cert", str(cert.cert), "--proxy-key", str(cert.key)]
    if key is not None:
        command += ["--proxy-user", f"{key}:pass"]
    if ca_pem is not None:
        command += ["--cacert", str(ca_pem)]
    command += [*args, url]
    return subprocess.run(command, check=False, capture_output=True, timeout=20, env=clean_env(), text=True)


def tls_client(proxy: Proxy, pki: PKI, cert: Issued | None = None, *, timeout: float = IO_TIMEOUT) -> ssl.SSLSocket:
    """A TLS connection to the proxy's TLS listener, optionally with a client certificate."""
    context = ssl.create_default_context(cafile=str(pki.ca.path))
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    sock = socket.create_connection(("127.0.0.1", tls_port(proxy)), timeout=timeout)
    return context.wrap_socket(sock, server_hostname="127.0.0.1", suppress_ragged_eofs=False)


def connect_tls(proxy: Proxy, pki: PKI, target: str, *, cert: Issued | None = None, key: str | None = None) -> Any:
    """CONNECT through the TLS listener; the reply (its socket is the TLS connection)."""
    offset = proxy.log_size()
    sock = tls_client(proxy, pki, cert)
    sock.sendall(connect_head(target, key))
    reply = read_reply(sock)
    reply.log_offset = offset
    return reply


# ---------------------------------------------------------------------------
# API keys inside TLS


def test_curl_with_a_key_through_an_https_proxy(proxy: Proxy, pki: PKI, tls_upstream: Upstream, ca_pem: Path) -> None:
    offset = proxy.log_size()
    result = curl_tls(proxy, pki, f"https://api.example.com:{tls_upstream.port}/", ca_pem, key="app-key")
    assert result.returncode == 0, result.stderr
    body, connect_code = result.stdout.rsplit("\n", 1)
    assert body == "hello from upstream\n" and connect_code == "200"
    line = proxy.wait_log(lambda l: l.get("message") == "request" and l.get("identity") == "app", offset=offset)
    assert line["listener"] == "tls" and line["auth"] == "api_key" and line["action"] == "allowed", line
    metrics = proxy.metrics()
    assert metrics.value("egress_proxy_authentications_total", identity="app", auth="api_key", listener="tls") >= 1
    assert "app-key" not in proxy.log_text()


def test_python_requests_through_an_https_proxy(proxy: Proxy, pki: PKI, tls_upstream: Upstream, ca_pem: Path,
                                                tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"  # requests verifies the proxy and the origin with one bundle
    bundle.write_bytes(Path(ca_pem).read_bytes() + pki.ca.pem)
    proxy_url = f"https://app-key:pass@127.0.0.1:{tls_port(proxy)}"
    with requests.Session() as session:
        session.trust_env = False
        answer = session.get(f"https://api.example.com:{tls_upstream.port}/", proxies={"https": proxy_url},
                             verify=str(bundle), timeout=10)
    assert answer.status_code == 200 and answer.text == "hello from upstream\n"


def test_refusals_are_answered_inside_tls(proxy: Proxy, pki: PKI) -> None:
    with connect_tls(proxy, pki, "evil.example.com:443", key="app-key") as reply:
        assert reply.status == 403 and "destination not allowed" in reply.text
        assert "Proxy-Status" in reply.raw_head.decode()
    line = proxy.decision(reply)
    assert line["listener"] == "tls" and line["action"] == "denied" and line["auth"] == "api_key", line
    with connect_tls(proxy, pki, "api.example.com:443") as reply:
        assert reply.status == 407 and reply.headers["proxy-authenticate"].startswith("Basic")


@pytest.mark.parametrize(("sni", "allowed"), [("api.example.com", True), ("evil.example.com", False)])
def test_a_hello_sent_with_the_head_is_judged_inside_the_tls_session(proxy: Proxy, pki: PKI, ca,
                                                                     fresh_tls_upstream: Upstream, sni: str,
                                                                     allowed: bool) -> None:
    """Head and ClientHello in one TLS write: the hello is decrypted ahead with the head
    and must still be judged before anything reaches the destination (TLS in TLS)."""
    sock = tls_client(proxy, pki)
    with sock:
        inner = BioTLS(sock, ca, sni)
        target = f"api.example.com:{fresh_tls_upstream.port}"
        sock.sendall(connect_head(target, "app-key") + inner.client_hello())
        assert read_reply(sock).status == 200
        if allowed:
            inner.finish_handshake()
            inner.send(b"inside two sessions")
            assert inner.recv(19) == b"inside two sessions"
        else:
            assert sock.recv(7) == tls_alert_access_denied()
    line = proxy.wait_log(lambda l: l.get("message") == "request" and l.get("sni") == sni)
    assert line["action"] == ("allowed" if allowed else "sni_mismatch") and line["listener"] == "tls", line
    if not allowed:  # dialled before the 200, but not one byte of the hello went on
        (conn,) = wait_until(lambda: fresh_tls_upstream.since(0))  # its accept thread may lag
        assert conn.done.wait(5) and conn.raw_bytes == 0, conn


def tls_alert_access_denied() -> bytes:
    from wire import tls as wire_tls

    return wire_tls.alert(wire_tls.ACCESS_DENIED, 0x0301)


def test_plain_http_urls_through_the_tls_listener(proxy: Proxy, pki: PKI) -> None:
    """An http:// URL through an https:// proxy: the request is forwarded inside TLS, and
    the client connection stays open for the next one (two URLs, one TLS connection)."""
    origin = Origin()
    try:
        first = f"http://api.example.com:{origin.port}/one"
        second = f"http://api.example.com:{origin.port}/big-chunked?n=300000"
        offset = proxy.log_size()
        # curl fetches `second`, then `first` (the URL curl_tls puts last) on the same connection.
        result = curl_tls(proxy, pki, first, None, "-o", "/dev/null", "-w", "%{http_code} %{num_connects}\n",
                          second, "-o", "/dev/null", cert=pki.reports)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-4:] == ["200", "1", "200", "0"], result.stdout  # the second reused the first

        def forwarded() -> list[dict]:
            return [l for l in proxy.log_lines(offset) if l.get("message") == "forwarded"]

        lines = wait_until(lambda: forwarded() if len(forwarded()) == 2 else None)
        assert [l["bytes_down"] > 300000 for l in lines] == [True, False], lines
        assert len({l["conn"] for l in lines}) == 1, lines
        decisions = [l for l in proxy.log_lines(offset) if l.get("message") == "request"]
        assert {(l["listener"], l["auth"], l["identity"]) for l in decisions} == {("tls", "certificate", "reports")}
    finally:
        origin.close()


# ---------------------------------------------------------------------------
# Client certificates


@pytest.mark.parametrize(("which", "identity"), [("web", "web"), ("batch", "batch"), ("reports", "reports")],
                         ids=["uri-san", "dns-san", "common-name"])
def test_curl_with_a_client_certificate_needs_no_key(proxy: Proxy, pki: PKI, tls_upstream: Upstream, ca_pem: Path,
                                                     which: str, identity: str) -> None:
    offset = proxy.log_size()
    result = curl_tls(proxy, pki, f"https://api.example.com:{tls_upstream.port}/", ca_pem, cert=getattr(pki, which))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n200"), result.stdout
    line = proxy.wait_log(lambda l: l.get("message") == "request" and l.get("identity") == identity, offset=offset)
    assert line["auth"] == "certificate" and line["listener"] == "tls" and line["action"] == "allowed", line
    assert proxy.metrics().value("egress_proxy_authentications_total", identity=identity, auth="certificate",
                                 listener="tls") >= 1


def test_a_certificate_matching_no_identity_falls_back_to_the_key(proxy: Proxy, pki: PKI, tls_upstream: Upstream,
                                                                   ca_pem: Path) -> None:
    url = f"https://api.example.com:{tls_upstream.port}/"
    result = curl_tls(proxy, pki, url, ca_pem, cert=pki.nobody)
    assert result.returncode != 0 and result.stdout.endswith("407"), (result.stdout, result.stderr)
    with connect_tls(proxy, pki, "api.example.com:443", cert=pki.nobody) as reply:
        assert reply.status == 407
        assert "client certificate matches no identity" in reply.text and "cn:nobody" in reply.text
    offset = proxy.log_size()
    result = curl_tls(proxy, pki, url, ca_pem, cert=pki.nobody, key="app-key")
    assert result.returncode == 0 and result.stdout.endswith("\n200"), result.stderr
    line = proxy.wait_log(lambda l: l.get("message") == "request" and l.get("identity") == "app", offset=offset)
    assert line["auth"] == "api_key", line


def test_a_certificate_and_a_key_that_disagree_get_407(proxy: Proxy, pki: PKI) -> None:
    with connect_tls(proxy, pki, "api.example.com:443", cert=pki.web, key="app-key") as reply:
        assert reply.status == 407
        assert "client certificate and API key name different identities" in reply.text
    line = proxy.decision(reply)
    assert line["identity"] == "-" and line["action"] == "auth_required", line
    assert "certificate: web, API key: app" in line["reason"]
    # Agreeing credentials are fine.
    with connect_tls(proxy, pki, "127.0.0.1:9", cert=pki.reports, key="reports-key") as reply:
        assert reply.status == 502  # admitted (nothing listens on port 9): not a 407


@pytest.mark.parametrize(("which", "why"), [
    ("stranger", "client certificate rejected: unable to get local issuer certificate"),
    ("expired", "client certificate rejected: certificate has expired"),
    ("server_only", "client certificate rejected: unsuitable certificate purpose"),
], ids=["wrong-ca", "expired", "no-client-auth-usage"])
def test_a_certificate_that_fails_verification_ends_the_handshake(proxy: Proxy, pki: PKI, tls_upstream: Upstream,
                                                                   ca_pem: Path, which: str, why: str) -> None:
    before = proxy.requests_total(status="bad_request")
    offset = proxy.log_size()
    result = curl_tls(proxy, pki, f"https://api.example.com:{tls_upstream.port}/", ca_pem, cert=getattr(pki, which))
    assert result.returncode != 0 and "200" not in result.stdout, result
    line = proxy.wait_log(lambda l: l.get("message") == "request" and l.get("listener") == "tls"
                          and l.get("action") == "bad_request", offset=offset)
    assert line["reason"] == f"TLS handshake failed: {why}", line
    assert line["identity"] == "-" and "method" in line
    assert wait_until(lambda: proxy.requests_total(status="bad_request") == before + 1)
    assert proxy.http_status("/health") == 200
    # "Why was my pod denied?": the status page has it too, with the listener.
    status, _, body = proxy.http_get("/status.json")
    newest = json.loads(body)["refusals"][0]
    assert status == 200 and (newest["listener"], newest["status"], newest["reason"]) == \
        ("tls", "bad_request", line["reason"]), newest


def test_logs_and_metrics_never_carry_a_certificate_serial(proxy: Proxy, pki: PKI, tls_upstream: Upstream,
                                                           ca_pem: Path) -> None:
    from cryptography import x509

    curl_tls(proxy, pki, f"https://api.example.com:{tls_upstream.port}/", ca_pem, cert=pki.web)
    serial = x509.load_pem_x509_certificate(pki.web.cert_pem).serial_number
    _, _, body = proxy.http_get("/metrics")
    for text in (proxy.log_text(), body.decode()):
        assert f"{serial:X}" not in text.upper() and str(serial) not in text


# ---------------------------------------------------------------------------
# What a client can do wrong on the TLS port


def test_plain_http_on_the_tls_port_is_told_to_use_https(proxy: Proxy) -> None:
    offset = proxy.log_size()
    with socket.create_connection(("127.0.0.1", tls_port(proxy)), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n")
        reply = read_reply(sock)
    assert reply.status == 400 and "https://" in reply.text
    line = proxy.wait_log(lambda l: l.get("action") == "bad_request" and l.get("client") == reply.client, offset=offset)
    assert "plain-HTTP request to the TLS port" in line["reason"], line


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"\x16\x03\x01\x00\x05hello", os.urandom(512)],
                         ids=["zeros", "bogus-record", "random"])
def test_garbage_on_the_tls_port_is_a_bad_request(proxy: Proxy, garbage: bytes) -> None:
    before = proxy.requests_total(status="bad_request")
    with socket.create_connection(("127.0.0.1", tls_port(proxy)), timeout=IO_TIMEOUT) as sock:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):  # an alert, then the close
            pass
    assert wait_until(lambda: proxy.requests_total(status="bad_request") == before + 1)
    assert proxy.http_status("/health") == 200


def test_failed_handshakes_leave_no_descriptor_behind(proxy: Proxy, pki: PKI) -> None:
    def open_fds() -> int:
        return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))

    def settled() -> int:
        return wait_until(lambda: open_fds() if proxy.metrics().value("egress_proxy_client_connections") == 0
                          else None)

    before = settled()
    for round_ in range(30):
        with socket.create_connection(("127.0.0.1", tls_port(proxy)), timeout=IO_TIMEOUT) as sock:
            sock.sendall(os.urandom(64) if round_ % 2 else b"\x16\x03\x01\x00\x10" + os.urandom(16))
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        try:  # a client certificate from a CA the proxy does not trust
            tls_client(proxy, pki, pki.stranger).close()
        except (ssl.SSLError, OSError):
            pass
    assert settled() <= before, "a failed handshake kept a socket or watcher"
    assert proxy.http_status("/health") == 200


def test_a_connection_without_a_byte_is_not_a_request(proxy: Proxy) -> None:
    before = proxy.requests_total(status="bad_request")
    socket.create_connection(("127.0.0.1", tls_port(proxy)), timeout=IO_TIMEOUT).close()  # a TCP health check
    time.sleep(0.3)
    assert proxy.requests_total(status="bad_request") == before


def test_header_timeout_covers_the_handshake(start_proxy, pki: PKI) -> None:
    proxy = start_proxy(POLICY, HEADER_TIMEOUT="1", **tls_env(pki))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", tls_port(proxy)), timeout=IO_TIMEOUT) as stalled, \
            socket.create_connection(("127.0.0.1", tls_port(proxy)), timeout=IO_TIMEOUT) as partial:
        partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello that never ends
        for sock in (stalled, partial):
            assert sock.recv(4096) == b""  # closed by the proxy
    assert time.monotonic() - started < 5
    lines = wait_until(lambda: [l for l in proxy.find_logs(message="request", action="timeout")
                                if l["listener"] == "tls"] or None)
    assert len(lines) == 2 and "no complete TLS handshake within 1 s" in lines[0]["reason"], lines
    assert proxy.http_status("/health") == 200


# ---------------------------------------------------------------------------
# Tunnels inside TLS: byte streams, half-close, bulk


def test_a_half_close_from_the_server_is_a_clean_tls_close(proxy: Proxy, pki: PKI) -> None:
    goodbye = Upstream(mode="goodbye")
    try:
        with connect_tls(proxy, pki, f"127.0.0.1:{goodbye.port}", key="raw-key") as reply:
            assert reply.status == 200
            sock = reply.sock
            assert recv_exactly(sock, len(Upstream.BANNER)) == Upstream.BANNER
            # close_notify, not a truncation (suppress_ragged_eofs=False would raise SSLEOFError)
            assert sock.recv(10) == b""
            sock.sendall(b"still talking")  # the other direction stays open
            conn = goodbye.since(0)[0]
            assert wait_until(lambda: conn.received == b"still talking"), conn.received
    finally:
        goodbye.close()


def test_bulk_both_ways_through_the_tls_listener(proxy: Proxy, pki: PKI, echo_upstream: Upstream) -> None:
    payload = os.urandom(4 << 20)
    with connect_tls(proxy, pki, f"127.0.0.1:{echo_upstream.port}", cert=pki.raw) as reply:
        assert reply.status == 200
        sock = reply.sock
        sock.settimeout(30)
        received = bytearray()

        def read() -> None:
            while len(received) < len(payload):
                data = sock.recv(1 << 16)
                if not data:
                    return
                received.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(payload)
        reader.join(30)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    line = proxy.wait_log(lambda l: l.get("message") == "tunnel closed" and l.get("conn") == proxy.decision(reply)["conn"])
    assert line["bytes_up"] == len(payload)
    # The echo upstream answers the client's close with "EOF:<n>", which may or may not
    # still reach the closing client.
    assert line["bytes_down"] in (len(payload), len(payload) + len(b"EOF:%d" % len(payload))), line


def test_only_the_tls_listener(start_proxy, pki: PKI, tls_upstream: Upstream, ca_pem: Path) -> None:
    proxy = start_proxy(POLICY, PROXY_PORT="0", **tls_env(pki))
    startup = proxy.find_logs(message="egress-guard listening")[0]
    assert startup["proxy"] is None and startup["proxy_tls"].endswith(f":{tls_port(proxy)}"), startup
    result = curl_tls(proxy, pki, f"https://api.example.com:{tls_upstream.port}/", ca_pem, key="app-key")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------
# Rotation and revocation


def secret_dir(directory: Path, version: str, cert: bytes, key: bytes) -> None:
    """Lay out (or rotate) a mounted Secret as the kubelet does: files in a timestamped
    directory, `..data` pointing at it (swapped atomically), names linking through it."""
    target = directory / f"..{version}"
    target.mkdir(parents=True)
    (target / "tls.crt").write_bytes(cert)
    (target / "tls.key").write_bytes(key)
    link = directory / "..data_tmp"
    link.symlink_to(target.name)
    os.replace(link, directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def served_certificate(proxy: Proxy, pki: PKI) -> bytes:
    with tls_client(proxy, pki) as sock:
        return sock.getpeercert(binary_form=True)


def pem_der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def test_rotation_keeps_open_tunnels_and_a_bad_pair_keeps_the_old_one(start_proxy, pki: PKI, echo_upstream: Upstream,
                                                                       tmp_path: Path) -> None:
    mount = tmp_path / "tls"
    first, second = pki.ca.issue("rotate-1", client=False, server=True, ips=("127.0.0.1",)), \
        pki.ca.issue("rotate-2", client=False, server=True, ips=("127.0.0.1",))
    secret_dir(mount, "2026_12_03_a", first.cert_pem, first.key_pem)
    proxy = start_proxy(POLICY, **tls_env(pki, PROXY_TLS_CERT=mount / "tls.crt", PROXY_TLS_KEY=mount / "tls.key"))
    assert served_certificate(proxy, pki) == pem_der(first.cert_pem)
    with connect_tls(proxy, pki, f"127.0.0.1:{echo_upstream.port}", key="raw-key") as reply:
        assert reply.status == 200
        reply.sock.sendall(b"before")
        assert recv_exactly(reply.sock, 6) == b"before"
        secret_dir(mount, "2026_12_03_b", second.cert_pem, second.key_pem)
        proxy.wait_log(lambda l: l.get("message") == "TLS certificate reloaded")
        assert served_certificate(proxy, pki) == pem_der(second.cert_pem)
        reply.sock.sendall(b"after")  # the open tunnel kept its session
        assert recv_exactly(reply.sock, 5) == b"after"
        # A pair that does not belong together: the proxy keeps serving the second.
        secret_dir(mount, "2026_12_03_c", first.cert_pem, second.key_pem)
        line = proxy.wait_log(lambda l: l.get("level") == "ERROR")
        assert "does not belong to the certificate" in line["error"], line
        assert proxy.metrics().value("egress_proxy_tls_load_errors_total") == 1
        assert proxy.metrics().value("egress_proxy_tls_reloads_total") == 1
        assert served_certificate(proxy, pki) == pem_der(second.cert_pem)
        reply.sock.sendall(b"still")
        assert recv_exactly(reply.sock, 5) == b"still"
    # Rewritten with the same content (a Secret re-synced unchanged): not a reload.
    secret_dir(mount, "2026_12_03_d", second.cert_pem, second.key_pem)
    time.sleep(1.0)  # five polls at WATCH_INTERVAL=0.2
    assert proxy.metrics().value("egress_proxy_tls_reloads_total") == 1
    assert proxy.metrics().value("egress_proxy_tls_load_errors_total") == 1
    assert proxy.http_status("/health") == 200


def test_a_reload_that_removes_a_certificate_entry_closes_its_tunnels(start_proxy, pki: PKI,
                                                                      echo_upstream: Upstream) -> None:
    proxy = start_proxy(POLICY, **tls_env(pki))
    with connect_tls(proxy, pki, f"127.0.0.1:{echo_upstream.port}", cert=pki.raw) as kept, \
            connect_tls(proxy, pki, f"127.0.0.1:{echo_upstream.port}", key="raw-key") as by_key:
        assert kept.status == 200 and by_key.status == 200
        proxy.write_policy(POLICY.replace('client_certificates: ["cn:raw-stream"]', "client_certificates: []"))
        line = proxy.wait_log(lambda l: l.get("message") == "tunnel revoked by policy reload")
        assert line["identity"] == "raw" and "client certificate no longer proves an identity" in line["reason"], line
        kept.sock.settimeout(5)
        try:
            assert kept.sock.recv(10) == b""
        except ssl.SSLEOFError:
            pass  # closed without close_notify: an abort, as a reset would be
        by_key.sock.sendall(b"key still good")
        assert recv_exactly(by_key.sock, 14) == b"key still good"
    assert proxy.metrics().value("egress_proxy_tunnels_revoked_total", identity="raw") == 1


def test_a_certificate_entry_moved_to_another_identity_closes_its_tunnels(start_proxy, pki: PKI,
                                                                         echo_upstream: Upstream) -> None:
    """The tunnel was admitted and accounted as one identity: when its credentials come
    to name another, it is re-admitted by nobody and closed, even if the other identity
    could reach the same destination."""
    proxy = start_proxy(POLICY, **tls_env(pki))
    with connect_tls(proxy, pki, f"127.0.0.1:{echo_upstream.port}", cert=pki.raw) as reply:
        assert reply.status == 200
        moved = POLICY.replace('client_certificates: ["cn:raw-stream"]', "client_certificates: []") + """\
  raw-again:
    client_certificates: ["cn:raw-stream"]
    require_tls: false
    allowed_destinations: ["127.0.0.1"]
"""
        proxy.write_policy(moved)
        line = proxy.wait_log(lambda l: l.get("message") == "tunnel revoked by policy reload")
        assert line["reason"] == "the credentials now name identity raw-again, not raw", line


# ---------------------------------------------------------------------------
# Startup


@pytest.mark.parametrize(("env", "words"), [
    ({"PROXY_TLS_CERT": "{cert}"}, ("PROXY_TLS_CERT is set but PROXY_TLS_KEY is not",)),
    ({"PROXY_TLS_KEY": "{key}"}, ("PROXY_TLS_KEY is set but PROXY_TLS_CERT is not",)),
    ({"PROXY_TLS_CLIENT_CA": "{ca}"}, ("PROXY_TLS_CLIENT_CA is set but the TLS listener is off",)),
    ({"PROXY_TLS_CERT": "{cert}", "PROXY_TLS_KEY": "/nonexistent/tls.key"}, ("PROXY_TLS_KEY=/nonexistent/tls.key",
                                                                              "no such file")),
    ({"PROXY_TLS_CERT": "{cert}", "PROXY_TLS_KEY": "{other_key}"}, ("does not belong to the certificate",)),
    ({"PROXY_TLS_CERT": "{key}", "PROXY_TLS_KEY": "{key}"}, ("PROXY_TLS_CERT",)),
    ({"PROXY_TLS_CERT": "{cert}", "PROXY_TLS_KEY": "{key}", "PROXY_TLS_CLIENT_CA": "{key}"},
     ("PROXY_TLS_CLIENT_CA",)),
    ({"PROXY_TLS_CERT": "{cert}", "PROXY_TLS_KEY": "{key}", "PROXY_TLS_PORT": "{port}"}, ("PROXY_TLS_PORT",
                                                                                          "same port as PROXY_PORT")),
], ids=["cert-only", "key-only", "ca-without-listener", "missing-key", "mismatched-pair", "key-as-cert",
        "key-as-ca", "same-port"])
def test_startup_errors_name_the_setting(start_proxy, pki: PKI, env: dict[str, str], words: tuple[str, ...]) -> None:
    from _support import expect_startup_error

    values = {"cert": pki.server.cert, "key": pki.server.key, "other_key": pki.web.key, "ca": pki.ca.path}
    port = free_port()
    resolved = {name: value.format(port=port, **values) for name, value in env.items()}
    if "PROXY_TLS_PORT" in resolved:
        resolved["PROXY_PORT"] = str(port)
    proxy = start_proxy(POLICY, _wait=False, **resolved)
    expect_startup_error(proxy, *words)
