"""The bypass regression table: one named row per trick that has beaten an egress proxy
or an SSRF filter somewhere (Squid, tinyproxy, Smokescreen, URL parsers), each sent to a
real `python egress_guard.py` and judged from outside.

A row is a raw request head, optionally the bytes the client sends once the tunnel is
open, and the outcome we require:

- an HTTP status (the destination is never dialled for a refusal),
- "refused-in-tunnel": 200, then the ClientHello is refused and the upstream receives
  nothing — it may not even be connected to,
- "forwarded": 200 and the client's bytes reach the upstream.

More detailed tests of each class live beside this table (test_connect, test_sni,
test_hardening, tests/test_http_head.py, tests/test_tls_hello.py); this file is the
one list to extend when a new class turns up.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from _support import (
    BioTLS,
    Proxy,
    Upstream,
    assert_never_dialled,
    basic,
    closed_by_peer,
    connect,
    open_client,
    read_reply,
    recv_exactly,
    server_context,
    tls_wrap,
    wait_until,
)

HELLOS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hellos"

POLICY = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations:
      - "api.example.com"
      - "public.example.com"
      - "metadata.example.com"
      - "mapped.example.com"
      - "bücher.example.com"
      - "127.0.0.1"
  strict:
    api_keys: ["strict-key"]
    allowed_destinations: ["127.0.0.1", "api.example.com:1-1"]
  wide:
    api_keys: ["wide-key"]
    allowed_destinations: ["0.0.0.0/0", "::/0", "api.example.com"]
  plain:
    api_keys: ["plain-key"]
    require_tls: false
    allowed_destinations: ["api.example.com", "127.0.0.1"]
"""


def fixture_hello(name: str) -> bytes:
    text = re.sub(r"#[^\n]*", "", (HELLOS / name).read_text())
    return bytes.fromhex("".join(text.split()))


def python_hello(sni: str, pad_to: int = 0) -> bytes:
    """A real ClientHello from Python's ssl (optionally inflated with a padding extension)."""
    import ssl

    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if pad_to:
        # Grow the hello with an extension of type 0xffce (unassigned) and fix every length.
        pad = pad_to - len(hello)
        body = bytearray(hello[9:])
        ext_len_at = 2 + 32 + 1 + body[34] + 2
        ext_len_at += int.from_bytes(body[ext_len_at - 2:ext_len_at], "big") + 1
        ext_len_at += body[ext_len_at - 1]
        extension = b"\xff\xce" + pad.to_bytes(2, "big") + bytes(pad)
        ext_total = int.from_bytes(body[ext_len_at:ext_len_at + 2], "big") + len(extension)
        body[ext_len_at:ext_len_at + 2] = ext_total.to_bytes(2, "big")
        body += extension
        handshake = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
        records = b""
        for start in range(0, len(handshake), 16384):
            chunk = handshake[start:start + 16384]
            records += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
        hello = records
    return hello


def reframe(hello: bytes, size: int) -> bytes:
    """A one-record ClientHello re-framed into handshake records of `size` bytes."""
    payload = hello[5:]
    return b"".join(hello[:3] + len(payload[p:p + size]).to_bytes(2, "big") + payload[p:p + size]
                    for p in range(0, len(payload), size))


def head(line: bytes, *, key: str | None = "app-key", extra: bytes = b"") -> bytes:
    auth = f"Proxy-Authorization: {basic(key)}\r\n".encode() if key else b""
    return line + b"\r\n" + auth + extra + b"\r\n"


# (id, request line or whole head, bytes after 200, expected)
CASES = [
    # -- spelling of the target -------------------------------------------------------
    ("trailing-dot-is-the-same-name", head(b"CONNECT api.example.com.:{port} HTTP/1.1"),
     "api.example.com", "forwarded"),
    ("mixed-case-is-the-same-name", head(b"CONNECT API.Example.COM:{port} HTTP/1.1"), "api.example.com", "forwarded"),
    ("idna-unicode-rule-matches-punycode", head(b"CONNECT xn--bcher-kva.example.com:{port} HTTP/1.1"),
     None, 200),
    ("confusable-cyrillic-a-does-not-match", head(b"CONNECT xn--pi-6kc.example.com:{port} HTTP/1.1"), None, 403),
    ("userinfo-in-authority", head(b"CONNECT app-key@api.example.com:{port} HTTP/1.1"), None, 400),
    ("userinfo-with-password", head(b"CONNECT a:b@api.example.com:{port} HTTP/1.1"), None, 400),
    ("decimal-ipv4", head(b"CONNECT 2130706433:{port} HTTP/1.1"), None, 400),
    ("hex-ipv4", head(b"CONNECT 0x7f.0.0.1:{port} HTTP/1.1"), None, 400),
    ("octal-ipv4", head(b"CONNECT 0177.0.0.1:{port} HTTP/1.1"), None, 400),
    ("short-ipv4", head(b"CONNECT 127.1:{port} HTTP/1.1"), None, 400),
    ("port-0", head(b"CONNECT api.example.com:0 HTTP/1.1"), None, 400),
    ("port-65536", head(b"CONNECT api.example.com:65536 HTTP/1.1"), None, 400),
    ("port-rule-other-port", head(b"CONNECT api.example.com:{port} HTTP/1.1", key="strict-key"), None, 403),
    # -- request-line and header smuggling ---------------------------------------------
    ("cr-in-request-line", head(b"CONNECT api.example.com:{port}\r HTTP/1.1"), None, 400),
    ("lf-in-request-line", b"CONNECT api.example.com:{port}\n HTTP/1.1\r\n\r\n", None, 400),
    ("nul-in-request-line", head(b"CONNECT api.example.com\x00.evil:{port} HTTP/1.1"), None, 400),
    ("tab-in-request-line", head(b"CONNECT\tapi.example.com:{port} HTTP/1.1"), None, 400),
    ("double-space-in-request-line", head(b"CONNECT  api.example.com:{port} HTTP/1.1"), None, 400),
    ("duplicate-proxy-authorization",
     head(b"CONNECT api.example.com:{port} HTTP/1.1", extra=f"Proxy-Authorization: {basic('strict-key')}\r\n".encode()),
     None, 400),
    ("space-before-colon", b"CONNECT api.example.com:{port} HTTP/1.1\r\nProxy-Authorization : "
     + basic("app-key").encode() + b"\r\n\r\n", None, 400),
    # -- addresses behind allowed names ------------------------------------------------
    ("name-resolving-to-metadata", head(b"CONNECT metadata.example.com:{port} HTTP/1.1"), None, 403),
    ("name-resolving-to-ipv4-mapped-loopback", head(b"CONNECT mapped.example.com:{port} HTTP/1.1"), None, 200),
    ("ipv4-mapped-literal-of-metadata", head(b"CONNECT [::ffff:169.254.169.254]:{port} HTTP/1.1"), None, 403),
    ("nat64-literal-of-loopback", head(b"CONNECT [64:ff9b::7f00:1]:{port} HTTP/1.1"), None, 403),
    # -- the ClientHello ---------------------------------------------------------------
    ("sni-differs-from-connect-name", head(b"CONNECT api.example.com:{port} HTTP/1.1"),
     "other.example.com", "refused-in-tunnel"),
    ("sni-missing-on-name-target", head(b"CONNECT api.example.com:{port} HTTP/1.1"), "", "refused-in-tunnel"),
    ("several-server-name-entries", head(b"CONNECT 127.0.0.1:{port} HTTP/1.1"),
     fixture_hello("hand-several-server-names.hex"), "refused-in-tunnel"),
    ("non-hostname-name-type", head(b"CONNECT 127.0.0.1:{port} HTTP/1.1"),
     fixture_hello("hand-non-host-name-type.hex"), "refused-in-tunnel"),
    ("two-server-name-extensions", head(b"CONNECT 127.0.0.1:{port} HTTP/1.1"),
     fixture_hello("hand-duplicate-server-name.hex"), "refused-in-tunnel"),
    ("ech-outer-sni-allowed-is-judged", head(b"CONNECT 127.0.0.1:{port} HTTP/1.1"),
     fixture_hello("hand-ech-outer-sni.hex"), "forwarded"),
    ("ech-outer-sni-not-allowed", head(b"CONNECT 127.0.0.1:{port} HTTP/1.1", key="strict-key"),
     fixture_hello("hand-ech-outer-sni.hex"), "refused-in-tunnel"),
    ("hello-over-16-KiB", head(b"CONNECT api.example.com:{port} HTTP/1.1"),
     python_hello("api.example.com", pad_to=17000), "refused-in-tunnel"),
    ("application-data-record-first", head(b"CONNECT api.example.com:{port} HTTP/1.1"),
     b"\x17\x03\x03\x00\x05hello", "refused-in-tunnel"),
    ("alert-record-before-hello", head(b"CONNECT api.example.com:{port} HTTP/1.1"),
     b"\x15\x03\x03\x00\x02\x01\x00" + python_hello("api.example.com"), "refused-in-tunnel"),
    ("plain-http-inside-a-tls-only-tunnel", head(b"CONNECT api.example.com:{port} HTTP/1.1"),
     b"GET / HTTP/1.1\r\nHost: evil.example.com\r\n\r\n", "refused-in-tunnel"),
    # -- second round (the first flight, supernets, bounded work) -------------------------
    ("hello-in-one-byte-records", head(b"CONNECT api.example.com:{port} HTTP/1.1"),
     reframe(python_hello("api.example.com"), 1), "refused-in-tunnel"),
    ("supernet-rule-does-not-unlock-loopback", head(b"CONNECT 127.0.0.1:{port} HTTP/1.1", key="wide-key"),
     None, 403),
    ("supernet-rule-does-not-unlock-mapped-loopback",
     head(b"CONNECT [::ffff:127.0.0.1]:{port} HTTP/1.1", key="wide-key"), None, 403),
    ("supernet-rule-does-not-unlock-a-name-resolving-to-loopback",
     head(b"CONNECT api.example.com:{port} HTTP/1.1", key="wide-key"), None, 403),
    ("supernet-rule-does-not-unlock-metadata", head(b"CONNECT 169.254.169.254:80 HTTP/1.1", key="wide-key"),
     None, 403),
]


@pytest.fixture(scope="module")
def proxy(module_proxies) -> Proxy:
    return module_proxies(POLICY)


@pytest.fixture
def upstream() -> Upstream:
    # A raw (non-TLS) recorder of this row's own: it shows exactly which bytes arrived,
    # if any, and nothing another row sent can arrive late on it.
    server = Upstream(peek_timeout=3.0)
    yield server
    server.close()


@pytest.mark.parametrize("raw,after,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bypass_class(proxy: Proxy, upstream: Upstream, raw: bytes, after: str | bytes | None,
                      expected: int | str) -> None:
    offset = proxy.log_size()
    sock = open_client(proxy)
    try:
        sock.sendall(raw.replace(b"{port}", str(upstream.port).encode()))
        reply = read_reply(sock)
        reply.log_offset = offset
        if isinstance(expected, int):
            assert reply.status == expected, reply.text
            if expected != 200:
                assert_never_dialled(proxy.decision(reply), upstream)
            return
        assert reply.status == 200, reply.text
        data = python_hello(after) if isinstance(after, str) and after else after
        if after == "":
            data = python_hello("127.0.0.1")  # Python sends no SNI for an IP literal
        sock.sendall(data)
        if expected == "forwarded":
            assert wait_until(lambda: any(c.received for c in upstream.since(0)), 5), "nothing was forwarded"
            received = b"".join(c.received for c in upstream.since(0))
            assert received.startswith(data[:64])
        else:
            assert closed_by_peer(sock, 5), "the proxy kept a refused tunnel open"
            # The proxy closed its upstream side too: wait until the recorder saw the end.
            assert wait_until(lambda: all(c.done.is_set() for c in upstream.since(0)), 5)
            assert all(c.received == b"" for c in upstream.since(0)), "refused bytes reached the upstream"
    finally:
        sock.close()


# -- the first flight: scenarios that need a real TLS server or more than one round ---------------


def hello_retry_with_another_name(proxy: Proxy, ca) -> None:
    """HelloRetryRequest: the second ClientHello names another server (same length, so
    only the name changes). A real OpenSSL destination records every name it is shown."""
    names: list = []
    upstream = Upstream(tls=server_context(ca, retry=True, names=names), peek_timeout=3.0)
    try:
        with connect(proxy, f"api.example.com:{upstream.port}", "app-key") as reply:
            assert reply.status == 200
            client = BioTLS(reply.sock, ca, "api.example.com")
            reply.sock.sendall(client.client_hello())
            second = client.next_flight()  # after the server's HelloRetryRequest
            reply.sock.sendall(second.replace(b"api.example.com", b"www.example.com"))
            assert closed_by_peer(reply.sock, 5), "the proxy kept the tunnel open"
            line = proxy.decision(reply)
        assert line["action"] == "sni_mismatch" and "second ClientHello" in line["reason"], line
        assert wait_until(lambda: all(c.done.is_set() for c in upstream.since(0)), 5)
        assert names == ["api.example.com"], f"the destination was shown {names}"
    finally:
        upstream.close()


def hello_retry_with_the_same_name(proxy: Proxy, ca) -> None:
    """A legitimate HelloRetryRequest (real clients meet one whenever the server prefers a
    group they did not key-share) keeps working."""
    names: list = []
    upstream = Upstream(tls=server_context(ca, retry=True, names=names), peek_timeout=3.0)
    try:
        with connect(proxy, f"api.example.com:{upstream.port}", "app-key") as reply:
            stream = tls_wrap(reply.sock, ca, "api.example.com")
            stream.sendall(b"after a retry")
            assert recv_exactly(stream, 13) == b"after a retry"
            line = proxy.decision(reply)
            stream.close()
        assert line["action"] == "allowed" and line["sni"] == "api.example.com"
        assert names == ["api.example.com", "api.example.com"]
    finally:
        upstream.close()


def second_hello_in_the_first_flight(proxy: Proxy, ca) -> None:
    """A second ClientHello sent right behind the first, before any HelloRetryRequest."""
    names: list = []
    upstream = Upstream(tls=server_context(ca, names=names), peek_timeout=3.0)
    try:
        with connect(proxy, f"api.example.com:{upstream.port}", "app-key") as reply:
            reply.sock.sendall(python_hello("api.example.com") + python_hello("www.example.com"))
            assert closed_by_peer(reply.sock, 5)
            line = proxy.decision(reply)
        assert line["action"] == "sni_mismatch", line
        assert wait_until(lambda: all(c.done.is_set() for c in upstream.since(0)), 5)
        assert "www.example.com" not in names
    finally:
        upstream.close()


def plaintext_identity_silent_past_the_hello_timeout(start_proxy, ca) -> None:
    """`require_tls: false`, the client waits out HELLO_TIMEOUT, then sends a hello for
    another name: it is judged all the same."""
    names: list = []
    upstream = Upstream(tls=server_context(ca, names=names), peek_timeout=5.0)
    slow = start_proxy(POLICY, HELLO_TIMEOUT="0.3")
    try:
        with connect(slow, f"api.example.com:{upstream.port}", "plain-key") as reply:
            assert reply.status == 200
            assert not closed_by_peer(reply.sock, 0.8)  # waited past HELLO_TIMEOUT: still open
            reply.sock.sendall(python_hello("other.example.com"))
            assert closed_by_peer(reply.sock, 5)
            line = slow.decision(reply)
        assert line["action"] == "sni_mismatch", line
        assert names == []
    finally:
        upstream.close()


def plaintext_identity_banner_then_hello(proxy: Proxy, ca) -> None:
    """`require_tls: false`, the destination speaks first, then the client sends a hello
    for another name: judged all the same."""
    upstream = Upstream(mode="banner", peek_timeout=3.0)
    try:
        with connect(proxy, f"api.example.com:{upstream.port}", "plain-key") as reply:
            assert recv_exactly(reply.sock, len(Upstream.BANNER)) == Upstream.BANNER
            reply.sock.sendall(python_hello("other.example.com"))
            assert closed_by_peer(reply.sock, 5)
            line = proxy.decision(reply)
        assert line["action"] == "sni_mismatch", line
        assert wait_until(lambda: all(c.done.is_set() for c in upstream.since(0)), 5)
        assert all(c.received == b"" for c in upstream.since(0)), "the refused hello reached the upstream"
    finally:
        upstream.close()


FLIGHT_CASES = [
    ("hello-retry-second-hello-for-another-name", hello_retry_with_another_name),
    ("hello-retry-same-name-still-works", hello_retry_with_the_same_name),
    ("second-hello-behind-the-first", second_hello_in_the_first_flight),
    ("require-tls-false-silent-past-hello-timeout", plaintext_identity_silent_past_the_hello_timeout),
    ("require-tls-false-banner-then-hello", plaintext_identity_banner_then_hello),
]


@pytest.mark.parametrize("scenario", [c[1] for c in FLIGHT_CASES], ids=[c[0] for c in FLIGHT_CASES])
def test_first_flight_class(proxy: Proxy, start_proxy, ca, scenario) -> None:
    if "start_proxy" in scenario.__code__.co_varnames[:scenario.__code__.co_argcount]:
        scenario(start_proxy, ca)
    else:
        scenario(proxy, ca)


def test_head_in_too_many_pieces_is_refused(proxy: Proxy) -> None:
    """Bounded work per client: a head trickled a byte at a time ends in 400, not in
    the proxy rescanning a growing buffer for every byte."""
    request = head(b"CONNECT api.example.com:443 HTTP/1.1", extra=b"X-Pad: " + b"a" * 300 + b"\r\n")
    offset = proxy.log_size()
    sock = open_client(proxy)
    try:
        for index in range(len(request)):
            try:
                sock.sendall(request[index:index + 1])
            except OSError:
                break  # refused and closed mid-way: what this row wants
            time.sleep(0.002)  # pacing: each byte its own segment and read
        reply = read_reply(sock)
        reply.log_offset = offset
        assert reply.status == 400 and "pieces" in reply.text, reply.text
        assert proxy.decision(reply)["action"] == "bad_request"
    finally:
        sock.close()
