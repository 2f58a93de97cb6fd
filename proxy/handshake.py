"""Steps 8-9: the client's first flight, judged before the plain pump takes over.

The I/O half of `wire.handshake.FirstFlight`: after the 200, bytes from either side are
read as they come, fed to the inspector, and what it releases is forwarded, until the
handshake has left cleartext (or the client's first bytes were not TLS). Both
directions are served by this one greenlet, so every refusal surfaces here, as a
`Refusal`, before the pump's second greenlet exists.

Time limits (kept by the Sweeper, proxy/deadlines.py): a client that must speak TLS
(`require_tls`) has `HELLO_TIMEOUT` for its first ClientHello; one that may speak
plaintext waits, with the server's bytes flowing, until it speaks (server-first
protocols), and then has `HELLO_TIMEOUT` to finish a hello it began. The rest of the
first flight may idle for `IDLE_TIMEOUT`, like a tunnel.
"""

from __future__ import annotations

import logging
import re
import socket as _socket

from policy import Status
from policy.decide import REASON_TLS_REQUIRED
from proxy.deadlines import Deadline, Sweeper
from proxy.flow import Flow
from proxy.refusal import Refusal
from proxy.stream import Stream, wait_readable
from wire.handshake import HELLO, FirstFlight, FlightError

CHUNK = 65536


def first_flight(client: Stream, upstream: Stream, buffered: bytes, flight: FirstFlight, flow: Flow,
                 sweeper: Sweeper, *, require_tls: bool, hello_timeout: float) -> LateFirstBytes | None:
    """Read, judge and forward the first flight; returns when the pump may take over:
    with None when the flight is judged, or with the judge of the client's first bytes
    still to come when the server spoke first (`require_tls: false`: SMTP, MySQL, a
    stream the client only reads), so the pump carries the server's bytes meanwhile."""
    armed = False
    try:
        if require_tls:
            # A client that must speak TLS has HELLO_TIMEOUT for its hello, and the
            # server's bytes wait until it was judged.
            sweeper.arm(flow, hello_timeout)
            armed = True
        if buffered:
            _forward(upstream, _client(flight, buffered), flow, True)
        server_open = True
        while not flight.done:
            hello_pending = flight.hello is None and not flight.client_done
            if armed and not hello_pending:
                sweeper.disarm(flow)
                armed = False
            try:
                ready = wait_readable(client, upstream if server_open and not (require_tls and hello_pending)
                                      else None)
            except Deadline:
                raise Refusal(Status.TIMEOUT, f"no TLS ClientHello within {hello_timeout:g} s") from None
            data = _recv(ready)
            if data is None:
                continue
            if flow.ended_by != "closed" or flow.idle:
                _ended(flow)
                return
            if ready is upstream:
                if not data:
                    # The server is done sending; the client's side is still judged.
                    server_open = False
                    client.shutdown(_socket.SHUT_WR)
                    continue
                if not flight.started:
                    _forward(client, data, flow, False)
                    return LateFirstBytes(flight)
                _forward(client, flight.server(data), flow, False)
                _forward(upstream, flight.release(), flow, True)  # the inspection may have ended here
                continue
            if not data:
                _client_closed(flight)
                return
            if not armed and not flight.started and data[:1] == b"\x16":
                sweeper.arm(flow, hello_timeout)  # a hello began: it must be finished in time
                armed = True
            _forward(upstream, _client(flight, data), flow, True)
    except FlightError as error:
        raise _refusal(error, flight) from None
    finally:
        if armed:
            sweeper.disarm(flow)


class LateFirstBytes:
    """The client's first bytes, judged in the pump's client-to-server direction after
    the server spoke first (only `require_tls: false` identities read the server before
    the client's first bytes). They are judged exactly like a first flight: plaintext by
    check 5, a ClientHello reassembled, capped and judged on its SNI. A server that spoke
    before any ClientHello is not a TLS server (a TLS server never speaks first), so the
    inspection ends once the first bytes are judged."""

    __slots__ = ("flight", "done")

    def __init__(self, flight: FirstFlight) -> None:
        self.flight: FirstFlight | None = flight
        self.done = False

    def __call__(self, data: bytes) -> bytes:
        """What of `data` may go to the server (raises the Refusal for the client)."""
        flight = self.flight
        assert flight is not None
        try:
            out = _client(flight, data)
        except FlightError as error:
            raise _refusal(error, flight) from None
        if flight.hello is not None or flight.client_done:
            out += flight.end()
            self.done = True
            self.flight = None  # its judge holds the policy snapshot: not for the tunnel's life
        return out


def _client(flight: FirstFlight, data: bytes) -> bytes:
    """`flight.client(data)`; a client refused for speaking plain HTTP into a tunnel
    that requires TLS (a client that CONNECTs even for http:// URLs, as Node's undici
    does) is told so in HTTP, the protocol it speaks, and the log names it."""
    first = not flight.started
    try:
        return flight.client(data)
    except Refusal as refusal:
        method = plain_http_method(data) if first else None
        if method is not None and refusal.reason == REASON_TLS_REQUIRED:
            refusal.reason = (f"{REASON_TLS_REQUIRED}: the client sent a plain-HTTP request ({method}) "
                              "into the tunnel; use an https:// URL, or require_tls: false for this identity")
            refusal.inner_http = True
        raise


_METHOD = re.compile(rb"([A-Z]{3,10}) [!-~]")


def plain_http_method(data: bytes) -> str | None:
    """The method, if `data` starts like an HTTP/1 request line (`GET /path ...`)."""
    found = _METHOD.match(data)
    return found.group(1).decode() if found else None


def _forward(sink: Stream, data: bytes, flow: Flow, upstream: bool) -> None:
    if data:
        sink.send_all(data)
        if upstream:
            flow.up += len(data)
        else:
            flow.down += len(data)


def _recv(stream: Stream) -> bytes | None:
    """What `stream` has; b"" at its end (a reset counts as one); None if nothing yet."""
    try:
        return stream.sock.recv(CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


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


def _refusal(error: FlightError, flight: FirstFlight) -> Refusal:
    if error.server:
        return Refusal(Status.CONNECTION_FAILED, error.reason)
    status = Status.SNI_MISMATCH if error.denied else Status.BAD_REQUEST
    return Refusal(status, error.reason, alert=error.alert, version=flight.version)
