"""TLSSocket (proxy/tls.py) on a real socket pair and a real TLS session: the socket
contract the handler relies on, and the bound on what it holds for a client that does
not read."""

from __future__ import annotations

import socket
import ssl

import pytest
import trustme

from proxy import tls


@pytest.fixture
def pair(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    context = tls.build_context(str(tmp_path / "server.pem"), str(tmp_path / "server.pem"))
    server_raw, client_raw = socket.socketpair()
    server_raw.setblocking(False)
    server = tls.TLSSocket(server_raw, context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
    for _ in range(20):  # drive both handshakes by hand, bounded
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        client_raw.sendall(client_out.read())
        client_raw.setblocking(False)
        try:
            client_in.write(client_raw.recv(65536))
        except BlockingIOError:
            pass
        client_raw.setblocking(True)
        try:
            server.obj.do_handshake()
            if client.version():
                break
        except ssl.SSLWantReadError:
            server.queue()
            try:
                server.incoming.write(server_raw.recv(65536))
            except BlockingIOError:
                pass
    server.queue()
    assert server.obj.version() in ("TLSv1.2", "TLSv1.3"), "the handshake completed"
    yield server, client_raw
    server.close()
    client_raw.close()


def test_recv_raises_blocking_io_error_only_when_the_socket_would_block(pair) -> None:
    server, _ = pair
    with pytest.raises(BlockingIOError):
        server.recv(100)
    assert not server.pending()


def test_what_the_session_must_answer_is_bounded_for_a_client_that_does_not_read(pair) -> None:
    server, client_raw = pair
    client_raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with pytest.raises(ConnectionAbortedError, match="does not read"):
        for _ in range(4 * tls.MAX_PENDING // 65536):
            # What OpenSSL writes when it must answer the client (a KeyUpdate, say):
            server.outgoing.write(b"\x17" * 65536)
            server.queue()
    assert server.out == b""
