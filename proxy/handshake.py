"""Steps 8-9: the client's first flight, judged before the plain pump takes over.

The I/O half of `wire.handshake.FirstFlight`: after the 200, bytes from either side are
read as they come, fed to the inspector, and what it releases is forwarded, until the
handshake has left cleartext (or the client's first bytes were not TLS). Both
directions are served by this one greenlet, so every refusal surfaces here, as a
`Refusal`, before the pump's second greenlet exists.

Time limits: a client that must speak TLS (`require_tls`) has `HELLO_TIMEOUT` for its
first ClientHello; one that may speak plaintext waits, with the server's bytes flowing,
until it speaks (server-first protocols), and then has `HELLO_TIMEOUT` to finish a hello
it began. The rest of the first flight may idle for `IDLE_TIMEOUT`, like a tunnel.
"""

from __future__ import annotations

import logging
import socket as _socket
import time

from gevent import socket

from policy import Status
from proxy.flow import Flow
from proxy.pump import send_all, wait_readable
from proxy.refusal import Refusal
from wire.handshake import HELLO, FirstFlight, FlightError

CHUNK = 65536


def first_flight(client: socket.socket, upstream: socket.socket, buffered: bytes, flight: FirstFlight,
                 flow: Flow, *, require_tls: bool, hello_timeout: float, idle_timeout: float) -> None:
    """Read, judge and forward the first flight; returns when the pump may take over."""
    try:
        if buffered:
            _forward(upstream, flight.client(buffered), flow, True)
        server_open = True
        # A client that must speak TLS has HELLO_TIMEOUT for its hello, and the server's
        # bytes wait until it was judged; one that may speak plaintext is waited for.
        hello_deadline = time.monotonic() + hello_timeout if require_tls else None
        while not flight.done:
            hello_pending = flight.hello is None and not flight.client_done
            watch = [client]
            if server_open and not (require_tls and hello_pending):
                watch.append(upstream)
            timeout = idle_timeout or 1e9
            if hello_pending and hello_deadline is not None:
                timeout = hello_deadline - time.monotonic()
                if timeout <= 0:
                    raise _hello_timeout(hello_timeout)
            ready = wait_readable(watch, timeout)
            if ready is None:
                if hello_pending and hello_deadline is not None:
                    raise _hello_timeout(hello_timeout)
                flow.idle = True  # the handshake stalled as long as an idle tunnel may
                return
            data = _recv(ready)
            if flow.ended_by != "closed":
                _ended(flow)
                return
            if ready is upstream:
                if not data:
                    # The server is done sending; the client's side is still judged.
                    server_open = False
                    _shutdown_write(client)
                    continue
                _forward(client, flight.server(data), flow, False)
                _forward(upstream, flight.release(), flow, True)  # the inspection may have ended here
                continue
            if not data:
                _client_closed(flight)
                return
            if hello_deadline is None and not flight.started and data[:1] == b"\x16":
                hello_deadline = time.monotonic() + hello_timeout  # a hello began: finish it
            _forward(upstream, flight.client(data), flow, True)
    except FlightError as error:
        raise _refusal(error, flight) from None


def _forward(sink: socket.socket, data: bytes, flow: Flow, upstream: bool) -> None:
    if data:
        send_all(sink, data)
        flow.add(upstream, len(data))


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(CHUNK)
    except OSError:
        return b""  # a reset ends that side like a close


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        pass


def _ended(flow: Flow) -> None:
    """The flow was closed from outside (revocation, shutdown) during its first flight."""
    if flow.ended_by == "revoked":
        raise Refusal(Status.DENIED, "policy reloaded while connecting: the new policy refuses this tunnel")


def _client_closed(flight: FirstFlight) -> None:
    if not flight.started:
        raise Refusal(Status.BAD_REQUEST, "client closed before sending a ClientHello", level=logging.DEBUG)
    if flight.state == HELLO or flight.holding and flight.hello is None:
        raise _refusal(FlightError("invalid TLS ClientHello: client closed mid-ClientHello",
                                   alert=None, denied=False), flight)


def _hello_timeout(timeout: float) -> Refusal:
    return Refusal(Status.TIMEOUT, f"no TLS ClientHello within {timeout:g} s")


def _refusal(error: FlightError, flight: FirstFlight) -> Refusal:
    if error.server:
        return Refusal(Status.CONNECTION_FAILED, error.reason)
    status = Status.SNI_MISMATCH if error.denied else Status.BAD_REQUEST
    return Refusal(status, error.reason, alert=error.alert, version=flight.version)
