"""The byte pump over real loopback TCP sockets: bulk data, half-close, idle, fallback.

Idleness is found by the Sweeper (proxy/deadlines.py), run here as the server runs it.
"""

from __future__ import annotations

import hashlib
import os

import gevent
import pytest
from gevent import socket

from proxy import pump
from proxy.deadlines import Sweeper
from proxy.flow import Flow
from proxy.stream import Stream


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    a = socket.create_connection(listener.getsockname(), timeout=5)
    b, _ = listener.accept()
    listener.close()
    return a, b


@pytest.fixture(params=["splice", "copy"])
def mode(request: pytest.FixtureRequest):
    enabled = pump.PIPES.enabled
    if request.param == "splice" and not enabled:
        pytest.skip("this kernel cannot splice sockets")
    pump.PIPES.enabled = request.param == "splice"
    yield request.param
    pump.PIPES.enabled = enabled


def start_tunnel(idle: float = 5.0):
    """client <-> [c_side | pump | u_side] <-> upstream, with a Sweeper minding `idle`."""
    client, c_side = tcp_pair()
    u_side, upstream = tcp_pair()
    traffic = Flow("test")
    traffic.client_stream, traffic.upstream = Stream.of(c_side), Stream.of(u_side)
    sweeper = Sweeper({traffic}, idle, tick=0.05)
    minder = gevent.spawn(sweeper.run)
    worker = gevent.spawn(pump.relay, traffic.client_stream, traffic.upstream, traffic)
    worker.link(lambda _: minder.kill(block=False))
    return client, upstream, traffic, worker, (c_side, u_side)


def send_all_and_close(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)


def read_all(sock: socket.socket) -> bytes:
    parts = []
    with gevent.Timeout(20):
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return b"".join(parts)
            parts.append(data)


def test_bulk_both_directions_with_half_close(mode: str) -> None:
    client, upstream, traffic, worker, _ = start_tunnel()
    up_payload, down_payload = os.urandom(6 << 20), os.urandom(5 << 20)
    senders = [gevent.spawn(send_all_and_close, client, up_payload),
               gevent.spawn(send_all_and_close, upstream, down_payload)]
    got_up = gevent.spawn(read_all, upstream)
    got_down = gevent.spawn(read_all, client)
    gevent.joinall([*senders, got_up, got_down, worker], timeout=30, raise_error=True)
    assert hashlib.sha256(got_up.value).digest() == hashlib.sha256(up_payload).digest()
    assert hashlib.sha256(got_down.value).digest() == hashlib.sha256(down_payload).digest()
    assert (traffic.up, traffic.down) == (len(up_payload), len(down_payload))
    assert worker.dead and not traffic.idle


def test_half_close_keeps_the_other_direction_open(mode: str) -> None:
    client, upstream, traffic, worker, _ = start_tunnel()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert read_all(upstream) == b"request"  # upstream sees EOF after the request
    upstream.sendall(b"late reply")
    upstream.shutdown(socket.SHUT_WR)
    assert read_all(client) == b"late reply"
    worker.join(timeout=5)
    assert worker.dead


def test_idle_tunnel_ends_after_idle_timeout(mode: str) -> None:
    client, upstream, traffic, worker, _ = start_tunnel(idle=0.3)
    client.sendall(b"x")
    with gevent.Timeout(5):
        assert upstream.recv(1) == b"x"
    worker.join(timeout=5)
    assert worker.dead and traffic.idle
    with gevent.Timeout(5):
        assert client.recv(1) == b""


def test_one_direction_busy_is_not_idle(mode: str) -> None:
    client, upstream, traffic, worker, _ = start_tunnel(idle=0.4)
    # Only downstream traffic for longer than the idle timeout: the tunnel must live.
    for _ in range(8):
        upstream.sendall(b"tick")
        with gevent.Timeout(5):
            assert client.recv(4) == b"tick"
        gevent.sleep(0.1)
    assert not worker.dead
    client.close()
    upstream.close()
    worker.join(timeout=5)


def test_reset_ends_both_directions(mode: str) -> None:
    client, upstream, traffic, worker, _ = start_tunnel()
    client.sendall(b"hi")
    with gevent.Timeout(5):
        assert upstream.recv(2) == b"hi"
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upstream.close()  # RST
    worker.join(timeout=5)
    assert worker.dead
    with gevent.Timeout(5):
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass


def test_pipe_pool_reuses_and_caps() -> None:
    pipes = pump.Pipes(limit=1)
    if not pipes.enabled:
        pytest.skip("this kernel cannot splice sockets")
    a, b = pipes.take(), pipes.take()
    pipes.give(a, empty=True)
    pipes.give(b, empty=True)  # over the limit: closed
    assert pipes.free == [a]
    with pytest.raises(OSError):
        os.fstat(b[0])
    assert pipes.take() == a
    pipes.give(a, empty=False)  # may hold stray bytes: never reused
    assert pipes.free == []
