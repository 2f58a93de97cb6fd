"""The TLS ClientHello check end to end (steps 8-10 of docs/ARCHITECTURE.md): the SNI is
judged before a client byte reaches the destination, a refused hello gets a TLS
`access_denied` alert, a hello split across segments or records is reassembled, and
non-TLS streams pass only for identities with `require_tls: false`.

"The upstream never received a byte" is proven by the upstream itself: it peeks at the
raw bytes of every accepted connection before its TLS handshake and records the count.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest
from _support import (
    BioTLS,
    Proxy,
    Upstream,
    closed_by_peer,
    connect,
    curl,
    recv_exactly,
    recv_until_eof,
    reframe,
    tls_wrap,
)

POLICY = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations: ["api.example.com", "other.example.com", "127.0.0.1"]
  plain:
    api_keys: ["plain-key"]
    require_tls: false
    allowed_destinations: ["api.example.com", "other.example.com", "127.0.0.1", "::1"]
"""


@pytest.fixture(scope="module")
def proxy(module_proxies) -> Proxy:
    return module_proxies(POLICY)


def assert_access_denied(error: ssl.SSLError) -> None:
    text = str(error).upper()
    assert "ACCESS_DENIED" in text or "ACCESS DENIED" in text, error


def only_connection(upstream: Upstream):
    """The single connection the upstream accepted, once it finished."""
    conns = upstream.since(0)
    assert len(conns) == 1, conns
    assert conns[0].done.wait(5)
    return conns[0]


def refused_hello(proxy: Proxy, upstream: Upstream, ca, target: str, key: str, sni: str | None) -> dict:
    """CONNECT, then a TLS handshake that must end in an access_denied alert."""
    with connect(proxy, target, key) as reply:
        assert reply.status == 200
        with pytest.raises(ssl.SSLError) as caught:
            tls_wrap(reply.sock, ca, sni)
        assert_access_denied(caught.value)
        line = proxy.decision(reply)
    conn = only_connection(upstream)
    assert conn.raw_bytes == 0 and conn.received == b"", "the upstream received bytes of a refused hello"
    return line


def echo_through(stream, payload: bytes = b"ping-pong " * 50) -> None:
    stream.sendall(payload)
    assert recv_exactly(stream, len(payload)) == payload


# -- refused hellos ---------------------------------------------------------------------


def test_sni_mismatch_gets_access_denied_and_upstream_never_sees_the_hello(
        proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    before = proxy.requests_total(identity="app", destination="api.example.com", status="sni_mismatch")
    line = refused_hello(proxy, fresh_tls_upstream, ca, f"api.example.com:{fresh_tls_upstream.port}", "app-key",
                         "other.example.com")
    assert line["action"] == "sni_mismatch"
    assert line["sni"] == "other.example.com"
    assert "other.example.com" in line["reason"]
    assert proxy.requests_total(identity="app", destination="api.example.com", status="sni_mismatch") == before + 1


def test_sni_mismatch_with_curl_prints_access_denied(proxy: Proxy, fresh_tls_upstream: Upstream, ca_pem) -> None:
    port = fresh_tls_upstream.port
    # curl CONNECTs to other.example.com but sends SNI api.example.com.
    done = curl(proxy, f"https://api.example.com:{port}/", "app-key", ca_pem,
                "--connect-to", f"api.example.com:{port}:other.example.com:{port}")
    assert done.returncode == 35, (done.returncode, done.stderr)
    assert "tlsv1 alert access denied" in done.stderr
    conn = only_connection(fresh_tls_upstream)
    assert conn.raw_bytes == 0


def test_missing_sni_on_a_name_target_is_refused(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    line = refused_hello(proxy, fresh_tls_upstream, ca, f"api.example.com:{fresh_tls_upstream.port}", "app-key", None)
    assert line["action"] == "sni_mismatch"
    assert "sni" in line["reason"]


def test_ip_target_with_a_disallowed_sni_is_refused(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    line = refused_hello(proxy, fresh_tls_upstream, ca, f"127.0.0.1:{fresh_tls_upstream.port}", "app-key",
                         "evil.example.com")
    assert line["action"] == "sni_mismatch"
    assert "evil.example.com" in line["reason"]


# -- allowed hellos -----------------------------------------------------------------------


def test_ip_target_without_sni_is_allowed(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    with connect(proxy, f"127.0.0.1:{fresh_tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, None)
        echo_through(stream)
        line = proxy.decision(reply)
        stream.close()
    assert line["action"] == "allowed"
    assert "sni" not in line
    conn = only_connection(fresh_tls_upstream)
    assert conn.sni is None and conn.raw_bytes > 0


def test_ip_target_with_an_allowed_sni_is_allowed(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    with connect(proxy, f"127.0.0.1:{fresh_tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        echo_through(stream)
        stream.close()
    assert only_connection(fresh_tls_upstream).sni == "api.example.com"


def test_sni_matching_is_case_insensitive(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    with connect(proxy, f"API.Example.COM:{fresh_tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        echo_through(stream)
        stream.close()


def test_trailing_dot_target_matches_its_sni(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    with connect(proxy, f"api.example.com.:{fresh_tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        echo_through(stream)
        stream.close()


def test_hello_sent_together_with_the_connect_head(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    """A client that does not wait for the 200 (one segment: head + ClientHello)."""
    import base64

    from _support import open_client, read_reply

    sock = open_client(proxy)
    with sock:
        client = BioTLS(sock, ca, "api.example.com")
        head = (f"CONNECT api.example.com:{fresh_tls_upstream.port} HTTP/1.1\r\n"
                f"Proxy-Authorization: Basic {base64.b64encode(b'app-key:x').decode()}\r\n\r\n").encode()
        sock.sendall(head + client.client_hello())
        assert read_reply(sock).status == 200
        client.finish_handshake()
        client.send(b"eager")
        assert client.recv(5) == b"eager"
    assert only_connection(fresh_tls_upstream).sni == "api.example.com"


@pytest.mark.parametrize("pieces", [3, 5])
def test_hello_split_across_tcp_segments(proxy: Proxy, fresh_tls_upstream: Upstream, ca, pieces: int) -> None:
    with connect(proxy, f"api.example.com:{fresh_tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        client = BioTLS(reply.sock, ca, "api.example.com")
        hello = client.client_hello()
        size = -(-len(hello) // pieces)
        for start in range(0, len(hello), size):
            reply.sock.sendall(hello[start:start + size])
            time.sleep(0.05)
        client.finish_handshake()
        client.send(b"segmented")
        assert client.recv(9) == b"segmented"
        line = proxy.decision(reply)
    assert line["action"] == "allowed" and line["sni"] == "api.example.com"
    assert only_connection(fresh_tls_upstream).sni == "api.example.com"


@pytest.mark.parametrize("segmented", [False, True], ids=["one-segment", "and-segments"])
def test_hello_split_across_tls_records(proxy: Proxy, fresh_tls_upstream: Upstream, ca, segmented: bool) -> None:
    with connect(proxy, f"api.example.com:{fresh_tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        client = BioTLS(reply.sock, ca, "api.example.com")
        hello = reframe(client.client_hello(), 4)
        if segmented:
            for start in range(0, len(hello), 97):  # segment edges fall inside record headers too
                reply.sock.sendall(hello[start:start + 97])
                time.sleep(0.01)
        else:
            reply.sock.sendall(hello)
        client.finish_handshake()
        client.send(b"recorded")
        assert client.recv(8) == b"recorded"
        line = proxy.decision(reply)
    assert line["action"] == "allowed" and line["sni"] == "api.example.com"


# -- not a ClientHello we judge --------------------------------------------------------------

NOT_HELLOS = {
    # An application-data record where the hello should be.
    "application-data-record": b"\x17\x03\x03\x00\x05hello",
    # A handshake record announcing a ClientHello longer than the 16 KiB cap.
    "hello-over-16-KiB": b"\x16\x03\x01\x40\x00\x01\x00\x50\x00" + b"\x03\x03" + b"\x00" * 2000,
    # A handshake record that is not a client_hello (server_hello).
    "server-hello": b"\x16\x03\x03\x00\x08\x02\x00\x00\x04\x03\x03\x00\x00",
}


@pytest.mark.parametrize("data", NOT_HELLOS.values(), ids=NOT_HELLOS.keys())
def test_invalid_hello_is_refused_and_never_forwarded(proxy: Proxy, fresh_tls_upstream: Upstream,
                                                      data: bytes) -> None:
    with connect(proxy, f"api.example.com:{fresh_tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        reply.sock.sendall(data)
        assert closed_by_peer(reply.sock, 5), "the proxy kept the tunnel open after an invalid hello"
        line = proxy.decision(reply)
    assert line["action"] in {"bad_request", "denied"}, line
    conn = only_connection(fresh_tls_upstream)
    assert conn.raw_bytes == 0, "bytes of an invalid hello reached the upstream"


def test_no_hello_within_hello_timeout(start_proxy, fresh_tls_upstream: Upstream) -> None:
    proxy: Proxy = start_proxy(POLICY, HELLO_TIMEOUT="1")
    with connect(proxy, f"api.example.com:{fresh_tls_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        started = time.monotonic()
        assert closed_by_peer(reply.sock, 5), "a tunnel without a ClientHello stayed open"
        elapsed = time.monotonic() - started
        line = proxy.decision(reply)
    assert 0.8 <= elapsed < 3, elapsed
    assert line["action"] == "timeout", line
    assert proxy.requests_total(identity="app", status="timeout") == 1
    assert only_connection(fresh_tls_upstream).raw_bytes == 0


# -- not TLS ----------------------------------------------------------------------------------


def test_non_tls_bytes_are_closed_and_never_reach_the_upstream(proxy: Proxy, fresh_echo_upstream: Upstream) -> None:
    before = proxy.requests_total(identity="app", status="denied")
    with connect(proxy, f"127.0.0.1:{fresh_echo_upstream.port}", "app-key") as reply:
        assert reply.status == 200
        reply.sock.sendall(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        assert closed_by_peer(reply.sock, 5), "the proxy kept a non-TLS tunnel open"
        line = proxy.decision(reply)
    assert line["action"] == "denied"
    assert "tls" in line["reason"].lower()
    assert proxy.requests_total(identity="app", status="denied") == before + 1
    conns = fresh_echo_upstream.since(0)
    for conn in conns:
        assert conn.done.wait(5)
        assert conn.received == b"", "plaintext reached the upstream"


def test_require_tls_false_plaintext_echo(proxy: Proxy, fresh_echo_upstream: Upstream) -> None:
    with connect(proxy, f"127.0.0.1:{fresh_echo_upstream.port}", "plain-key") as reply:
        assert reply.status == 200
        reply.sock.sendall(b"SELECT 1;\n")
        assert recv_exactly(reply.sock, 10) == b"SELECT 1;\n"
        line = proxy.decision(reply)
    assert line["action"] == "allowed"


def test_require_tls_false_server_speaks_first(proxy: Proxy, banner_upstream: Upstream) -> None:
    with connect(proxy, f"127.0.0.1:{banner_upstream.port}", "plain-key") as reply:
        assert reply.status == 200
        started = time.monotonic()
        banner = recv_exactly(reply.sock, len(Upstream.BANNER), timeout=4)
        assert banner == Upstream.BANNER
        assert time.monotonic() - started < 2, "the banner waited for the hello timeout"
        reply.sock.sendall(b"EHLO client\r\n")
        assert recv_exactly(reply.sock, 13) == b"EHLO client\r\n"


def test_require_tls_false_still_checks_the_sni_of_a_hello(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    line = refused_hello(proxy, fresh_tls_upstream, ca, f"api.example.com:{fresh_tls_upstream.port}", "plain-key",
                         "other.example.com")
    assert line["action"] == "sni_mismatch"


def test_require_tls_false_still_checks_the_sni_on_an_ip_target(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    line = refused_hello(proxy, fresh_tls_upstream, ca, f"127.0.0.1:{fresh_tls_upstream.port}", "plain-key",
                         "evil.example.com")
    assert line["action"] == "sni_mismatch"


def test_require_tls_false_tls_with_a_good_sni_works(proxy: Proxy, fresh_tls_upstream: Upstream, ca) -> None:
    with connect(proxy, f"api.example.com:{fresh_tls_upstream.port}", "plain-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        echo_through(stream)
        stream.close()


# -- half-close -------------------------------------------------------------------------------


def test_half_close_is_propagated(proxy: Proxy, fresh_echo_upstream: Upstream) -> None:
    with connect(proxy, f"127.0.0.1:{fresh_echo_upstream.port}", "plain-key") as reply:
        assert reply.status == 200
        reply.sock.sendall(b"last words")
        assert recv_exactly(reply.sock, 10) == b"last words"
        reply.sock.shutdown(socket.SHUT_WR)
        # The upstream sees EOF only if the proxy passed the half-close on; it then
        # answers on the still-open direction.
        assert recv_until_eof(reply.sock, timeout=5) == b"EOF:10"
    summary = proxy.wait_log(lambda l: l.get("message") == "tunnel closed"
                             and l.get("destination") == f"127.0.0.1:{fresh_echo_upstream.port}")
    assert summary["bytes_up"] == 10 and summary["bytes_down"] == 16


def test_half_close_from_the_upstream_is_propagated(proxy: Proxy) -> None:
    upstream = Upstream(mode="goodbye")
    try:
        with connect(proxy, f"127.0.0.1:{upstream.port}", "plain-key") as reply:
            assert reply.status == 200
            # The upstream greets and shuts down its write side: the client sees EOF...
            assert recv_until_eof(reply.sock, timeout=5) == Upstream.BANNER
            # ...and can still send; the upstream receives it.
            reply.sock.sendall(b"after your EOF")
            reply.sock.shutdown(socket.SHUT_WR)
            conns = upstream.since(0)
            assert len(conns) == 1 and conns[0].done.wait(5)
            assert conns[0].received == b"after your EOF"
    finally:
        upstream.close()


def test_ipv6_literal_target(proxy: Proxy) -> None:
    upstream = Upstream(host="::1")
    try:
        with connect(proxy, f"[::1]:{upstream.port}", "plain-key") as reply:
            assert reply.status == 200, reply.body
            reply.sock.sendall(b"six")
            assert recv_exactly(reply.sock, 3) == b"six"
            line = proxy.decision(reply)
        assert line["destination"] == f"[::1]:{upstream.port}", line
    finally:
        upstream.close()


def test_status_words_are_the_documented_set(proxy: Proxy) -> None:
    """Runs last in this module: everything above used only the README's status words."""
    proxy.assert_status_words()
