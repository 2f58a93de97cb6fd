"""Plain-HTTP forwarding: an absolute-form `GET http://host/path HTTP/1.1` request is
judged like a CONNECT and relayed to the origin as `GET /path HTTP/1.1`.

Each request is its own decision (authenticate, `allow_http`, destination, resolved
addresses) and gets its own origin connection, closed after the response; only the
client side is persistent. In the order a request lives:

1. Authenticate (407) and authorize (403) through `Admission`, exactly as CONNECT.
2. Refuse ambiguous request framing with 400 before anything is dialled: the proxy and
   the origin must agree on where a body ends, or a second request can be smuggled
   inside the first (`request_framing`).
3. Take a `max_tunnels` slot, resolve once, dial the vetted address (429/403/502).
4. Send the origin-form head without hop-by-hop headers (`origin_head`), then stream
   the body in its own greenlet while this one reads the response, so
   `Expect: 100-continue` and early error responses work.
5. Relay interim 1xx responses and the final response, its body framed exactly as the
   origin framed it (`response_framing`), never held in memory.
6. Keep the client connection open only when both messages were delimited and
   completely read; the bytes after the request body go back to the handler loop,
   which parses the next request.

The pure part (framing, header rewriting, the chunked-body parser) lives in
`wire.message` and is unit-tested there; this module is the socket part.
"""

from __future__ import annotations

import logging
import time

import gevent
from gevent import socket
from gevent.socket import wait_read

from proxy.admission import Admission
from proxy.flow import Flow, abort
from proxy.refusal import from_parse_error, response
from wire import http
from wire.message import (
    ChunkedBody,
    ChunkError,
    Framing,
    FramingError,
    Response,
    client_head,
    find_response_head_end,
    origin_head,
    parse_response_head,
    request_framing,
    response_framing,
    wants_persistence,
)

log = logging.getLogger("egress_guard.forward")

CHUNK = 16384  # bytes per read: bodies stream through in pieces this size
MAX_RESPONSE_HEAD = 65536
MAX_INTERIM = 16  # 1xx responses before the final one
UPLOAD_GRACE = 2.0  # seconds a finished response waits for its request body to finish
LINGER_SECONDS = 2.0  # reading (and discarding) an unfinished upload before closing


# ---------------------------------------------------------------------------
# The exchange on the wire.


class Broken(Exception):
    """One side of an exchange failed. `side` is "client" or "origin"; `status` is what
    to answer if no response has been sent yet (None: nothing, the client is gone)."""

    def __init__(self, side: str, message: str, status: int | None = None, *, idle: bool = False,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.side = side
        self.message = message
        self.status = status
        self.idle = idle  # ended by IDLE_TIMEOUT rather than by the peer
        self.kind = kind  # the RFC 9209 error type of the answer (None: the status's usual one)


class Side:
    """One socket of the exchange; its failures become `Broken` for that side.

    What a failure answers, if no response has started: reading the client fails with
    400 (it stopped mid-body or sent a bad one) or 408 (idle); an origin failure is 502;
    a client that reset or stopped reading gets nothing.
    """

    def __init__(self, sock: socket.socket, name: str, flow: Flow, idle: float, upstream: bool) -> None:
        self.sock, self.name, self.flow, self.idle, self.upstream = sock, name, flow, idle, upstream
        self.is_client = name == "client"
        self.read_status = 400 if self.is_client else 502

    def recv(self, size: int) -> bytes:
        while True:
            try:
                return self.sock.recv(size)
            except socket.timeout:
                # Idle only when the other direction was quiet too (as the tunnel pump).
                if time.monotonic() - self.flow.last < self.idle:
                    continue
                raise Broken(self.name, f"no data from the {self.name} within IDLE_TIMEOUT",
                             408 if self.is_client else 502, idle=True,
                             kind=None if self.is_client else "http_response_timeout") from None
            except OSError as error:
                raise Broken(self.name, f"reading from the {self.name}: {_why(error)}",
                             None if self.is_client else 502, kind="connection_terminated") from None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as error:
            raise Broken(self.name, f"writing to the {self.name}: {_why(error)}",
                         None if self.is_client else 502, kind="connection_terminated") from None
        self.flow.add(self.upstream, len(data))


def _why(error: OSError) -> str:
    return error.strerror or type(error).__name__


def copy_body(source: Side, sink: Side, framing: Framing, buffered: bytes, *, dechunk: bool = False) -> bytes:
    """Relay one body from `source` to `sink` in pieces; returns bytes read past its end."""
    if framing.kind == "none":
        return buffered
    if framing.kind == "length":
        remaining = framing.length
        first, rest = buffered[:remaining], buffered[remaining:]
        if first:
            sink.send(first)
            remaining -= len(first)
        while remaining:
            data = source.recv(min(CHUNK, remaining))
            if not data:
                raise Broken(source.name, f"the {source.name} closed {remaining} bytes before the end of the body",
                             source.read_status)
            sink.send(data)
            remaining -= len(data)
        return rest
    if framing.kind == "close":
        data = buffered
        while True:
            if data:
                sink.send(data)
            data = source.recv(CHUNK)
            if not data:
                return b""
    parser = ChunkedBody()
    data = buffered
    while True:
        if data:
            pieces: list[bytes] | None = [] if dechunk else None
            try:
                used = parser.feed(data, pieces)
            except ChunkError as error:
                raise Broken(source.name, f"malformed chunked body from the {source.name}: {error}",
                             source.read_status) from None
            if pieces is None:
                sink.send(data[:used] if used < len(data) else data)
            elif pieces:
                sink.send(b"".join(pieces))
            if parser.done:
                return data[used:]
        data = source.recv(CHUNK)
        if not data:
            raise Broken(source.name, f"the {source.name} closed in the middle of a chunked body", source.read_status)


def read_response(origin: Side, buffered: bytes) -> tuple[Response, bytes]:
    """(the next response head, bytes after it), within MAX_RESPONSE_HEAD."""
    buf, scanned = buffered, 0
    while True:
        end = find_response_head_end(buf, max(0, scanned - 2))
        if end > 0:
            if end > MAX_RESPONSE_HEAD:
                break
            try:
                return parse_response_head(buf[:end]), buf[end:]
            except FramingError as error:
                raise Broken("origin", str(error), 502, kind="http_protocol_error") from None
        if len(buf) > MAX_RESPONSE_HEAD:
            break
        scanned = len(buf)
        data = origin.recv(CHUNK)
        if not data:
            raise Broken("origin", "the origin closed without a complete response" if buf
                         else "the origin closed without responding", 502, kind="connection_terminated")
        buf += data
    raise Broken("origin", f"response head from the origin larger than {MAX_RESPONSE_HEAD} bytes", 502,
                 kind="http_response_header_section_size")


class Upload:
    """The request body on its way to the origin, in its own greenlet."""

    def __init__(self, client: Side, origin: Side, framing: Framing, buffered: bytes) -> None:
        self.leftover = b""
        self.error: Broken | None = None
        self.greenlet = gevent.spawn(self._run, client, origin, framing, buffered)

    def _run(self, client: Side, origin: Side, framing: Framing, buffered: bytes) -> None:
        try:
            self.leftover = copy_body(client, origin, framing, buffered)
        except Broken as error:
            self.error = error
            if error.side == "client":
                # The request cannot complete: stop waiting for the origin's answer.
                abort(origin.sock)

    @property
    def complete(self) -> bool:
        return self.greenlet.dead and self.error is None

    def finish(self, grace: float) -> bool:
        """Wait briefly for the body to finish; True if it was relayed whole."""
        self.greenlet.join(timeout=grace)
        if not self.greenlet.dead:
            self.greenlet.kill(block=True, timeout=1)
            return False
        return self.error is None


def forward(admission: Admission, client: socket.socket, request: http.Request, buffered: bytes,
            flow: Flow) -> tuple[bool, bytes]:
    """Judge and relay one absolute-form request; (keep the client connection, leftover)."""
    current, identity = admission.admit(flow, request)
    try:
        framing = request_framing(request)
    except FramingError as error:
        raise from_parse_error(error) from None
    upstream = admission.connect(current, identity, flow).to_gevent()
    del current, identity  # an exchange keeps no policy snapshot alive
    admission.track(flow)
    admission.records.admitted(flow)
    try:
        keep, leftover = Exchange(admission, client, upstream, request, flow).run(framing, buffered)
    finally:
        admission.release(flow)
    if keep and not leftover:
        keep = next_request_started(admission, client)
    return keep, leftover


def next_request_started(admission: Admission, client: socket.socket) -> bool:
    """Wait (up to HEADER_TIMEOUT, less if draining starts) for a kept-alive client to
    begin its next request; False if it stays idle, so the connection closes quietly.

    The handler's head timeout answers 408 and records a decision; for a client that is
    merely idle between requests that would be a stray response and a false "timeout".
    """
    if getattr(client, "pending", None) is not None and client.pending():
        return True  # the TLS listener's session holds the next request's bytes already
    deadline = time.monotonic() + admission.settings.header_timeout
    while not admission.draining:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            wait_read(client.fileno(), timeout=min(remaining, 0.5), timeout_exc=_Quiet)
        except _Quiet:
            continue
        except OSError:
            return False
        return True  # bytes, or an orderly close the handler will see as such
    return False


class _Quiet(Exception):
    """No byte from a kept-alive client in this slice of the wait."""


class Exchange:
    """One request and its response between a client and a fresh origin connection."""

    def __init__(self, admission: Admission, client: socket.socket, upstream: socket.socket,
                 request: http.Request, flow: Flow) -> None:
        self.admission, self.request, self.flow = admission, request, flow
        idle = admission.settings.idle_timeout
        self.client = Side(client, "client", flow, idle, False)
        self.origin = Side(upstream, "origin", flow, idle, True)
        for sock in (client, upstream):
            sock.settimeout(idle or None)
        self.status = 0
        self.responded = False  # a final response head went to the client

    def run(self, framing: Framing, buffered: bytes) -> tuple[bool, bytes]:
        upload: Upload | None = None
        keep, leftover, error = False, b"", None
        try:
            self.origin.send(origin_head(self.request))
            if framing.kind != "none":
                upload = Upload(self.client, self.origin, framing, buffered)
            else:
                leftover = buffered
            keep = self.respond(upload)
            if upload is not None:
                keep = upload.finish(UPLOAD_GRACE) and keep
                leftover = upload.leftover
        except Broken as broken:
            broken = self.blame(broken, upload)
            error = broken.message
            if not self.responded and broken.status is not None:
                self.status = broken.status
                try:
                    self.client.sock.sendall(response(broken.status, broken.message, (), broken.kind))
                except OSError:
                    pass
        except Exception as unexpected:  # a bug must end this connection, not the server
            error = f"internal error: {type(unexpected).__name__}"
            log.exception("forwarding failed", extra={"conn": self.flow.conn, "identity": self.flow.identity})
        finally:
            unread = upload is not None and not upload.complete
            if upload is not None and not upload.greenlet.dead:
                upload.greenlet.kill(block=True, timeout=1)
            if unread and self.status:
                self.linger()
            try:
                self.client.sock.settimeout(None)
            except OSError:
                pass
            self.admission.records.forwarded(self.flow, self.status, keep and error is None, error)
        if error is not None:
            return False, b""
        return keep, leftover

    @staticmethod
    def blame(broken: Broken, upload: Upload | None) -> Broken:
        """The failure to report when both sides stopped: the client's, if its upload failed
        (that is what stopped the origin side) or was still under way when all went quiet."""
        if upload is None:
            return broken
        if upload.error is not None and upload.error.side == "client":
            return upload.error
        if broken.idle and broken.side == "origin" and not upload.greenlet.dead:
            return Broken("client", "the client sent no request body data within IDLE_TIMEOUT", 408, idle=True)
        return broken

    def linger(self) -> None:
        """Close gently after answering a request whose body was not read to the end.

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy the response before the client reads it (an origin refusing a large
        upload early, say). So stop writing, then read and discard for a moment first.
        """
        sock = self.client.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.5)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline and sock.recv(CHUNK):
                pass
        except OSError:
            pass

    def respond(self, upload: Upload | None) -> bool:
        """Relay interim responses and the final one; True if the client may send more."""
        request = self.request
        rest = b""
        for _ in range(MAX_INTERIM + 1):
            response, rest = read_response(self.origin, rest)
            if response.status >= 200:
                break
            if response.status == 101:
                raise Broken("origin", "the origin switched protocols although no upgrade was requested", 502,
                             kind="http_protocol_error")
            if request.version == "HTTP/1.1":  # 1xx are never sent to an HTTP/1.0 client
                self.client.send(client_head(response, keep_alive=True, client_version=request.version))
        else:
            raise Broken("origin", f"more than {MAX_INTERIM} interim responses from the origin", 502,
                         kind="http_protocol_error")
        try:
            body = response_framing(request.method, response.status, response.headers)
        except FramingError as error:
            raise Broken("origin", str(error), 502, kind="http_protocol_error") from None
        dechunk = body.kind == "chunked" and request.version == "HTTP/1.0"
        keep = (wants_persistence(request) and body.delimited and not dechunk
                and not self.admission.draining and (upload is None or not upload.greenlet.dead or upload.complete))
        self.status = response.status
        self.client.send(client_head(response, keep_alive=keep, client_version=request.version,
                                     dechunk=dechunk))
        self.responded = True
        copy_body(self.origin, self.client, body, rest, dechunk=dechunk)
        return keep
