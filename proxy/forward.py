"""Plain-HTTP forwarding: an absolute-form `GET http://host/path HTTP/1.1` request is
judged like a CONNECT and relayed to the origin as `GET /path HTTP/1.1`.

Each request is its own decision (authenticate, `allow_http`, destination, resolved
addresses) and gets its own origin connection, closed after the response; only the
client side is persistent. In the order a request lives:

1. Authenticate (407) and authorize (403) with the server's helpers, exactly as CONNECT.
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

The pure part (framing, header rewriting, the chunked-body parser) comes first and is
unit-tested on its own; the socket part follows. The parser for bodies is strict in
the same way `wire.http` is for heads: CRLF only, hex sizes, bounded lines.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.select
from gevent import socket

import policy
from policy import Decision, Identity, Policy
from policy.hosts import Host
from proxy.errors import Refusal, response
from proxy.pump import abort, wait_readable
from wire import http

log = logging.getLogger("egress_guard.forward")

CHUNK = 16384  # bytes per read: bodies stream through in pieces this size
MAX_RESPONSE_HEAD = 65536
MAX_RESPONSE_FIELDS = 256
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
MAX_TRAILERS = 16384
MAX_INTERIM = 16  # 1xx responses before the final one
UPLOAD_GRACE = 2.0  # seconds a finished response waits for its request body to finish
LINGER_SECONDS = 2.0  # reading (and discarding) an unfinished upload before closing
FLUSH_EVERY = 5.0  # seconds between byte-counter updates on long transfers
VIA = "egress-guard"

# Hop-by-hop: meaningful for one connection only, never forwarded (RFC 9110 7.6.1).
# Transfer-Encoding is not here: bodies are relayed with their chunk framing intact.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authorization",
    "proxy-authenticate", "te", "trailer", "upgrade",
})
# Never removed because `Connection` names them: dropping a framing header would make
# the next hop read the body differently from us (a smuggling primitive), and Host is
# always rewritten anyway.
PROTECTED = frozenset({"content-length", "transfer-encoding", "host"})

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_STR_TOKEN_RE = re.compile(_TOKEN.decode() + r"\Z")
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_SIZE_RE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*)\Z"
)
_FIELD_RE = re.compile(rb"(" + _TOKEN + rb"):([^\x00-\x08\x0a-\x1f\x7f]*)\Z")
_STATUS_LINE_RE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?\Z")
_DIGITS_RE = re.compile(r"[0-9]{1,18}\Z")


# ---------------------------------------------------------------------------
# Framing: where a message body ends (RFC 9112 section 6).


class FramingError(ValueError):
    """A message whose body length is ambiguous or malformed; str() says why."""


@dataclass(frozen=True, slots=True)
class Framing:
    """How a body is delimited: `none`, `length` (exactly `length` bytes), `chunked`,
    or `close` (until the sender closes; only responses)."""

    kind: str
    length: int = 0

    @property
    def delimited(self) -> bool:
        """True if the end is known without the connection closing."""
        return self.kind != "close"


NO_BODY = Framing("none")
CHUNKED = Framing("chunked")
UNTIL_CLOSE = Framing("close")


def _values(headers: tuple[tuple[str, str], ...], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name]


def _codings(value: str) -> list[str]:
    codings = [part.strip(" \t").lower() for part in value.split(",")]
    if not all(_STR_TOKEN_RE.match(coding) for coding in codings):
        raise FramingError(f"malformed Transfer-Encoding {value!r}: expected a list of coding names")
    return codings


def request_framing(request: http.Request) -> Framing:
    """The request's body framing; FramingError (400) for every ambiguous shape.

    Refused: Content-Length together with Transfer-Encoding, more than one
    Content-Length field (even with equal values), a Content-Length that is not plain
    digits, several Transfer-Encoding fields, codings whose last one is not `chunked` or
    that name `chunked` twice, and Transfer-Encoding on an HTTP/1.0 request (which a
    1.0 origin would not understand).
    """
    lengths = request.get("Content-Length")
    encodings = request.get("Transfer-Encoding")
    if lengths and encodings:
        raise FramingError("both Content-Length and Transfer-Encoding: the body length is ambiguous")
    if encodings:
        if request.version == "HTTP/1.0":
            raise FramingError("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if len(encodings) > 1:
            raise FramingError("more than one Transfer-Encoding header field")
        codings = _codings(encodings[0])
        if codings[-1] != "chunked":
            raise FramingError("Transfer-Encoding must end with chunked")
        if codings.count("chunked") > 1:
            raise FramingError("Transfer-Encoding names chunked more than once")
        return CHUNKED
    if lengths:
        if len(lengths) > 1:
            raise FramingError("more than one Content-Length header field")
        if not _DIGITS_RE.match(lengths[0]):
            raise FramingError(f"invalid Content-Length {lengths[0]!r}: expected a number of bytes")
        length = int(lengths[0])
        return Framing("length", length) if length else NO_BODY
    return NO_BODY


def response_framing(method: str, status: int, headers: tuple[tuple[str, str], ...]) -> Framing:
    """The response's body framing (RFC 9112 6.3); FramingError (502) if unusable."""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return NO_BODY
    encodings = _values(headers, "transfer-encoding")
    if encodings:
        # Transfer-Encoding overrides any Content-Length (which is then not relayed).
        codings = _codings(", ".join(encodings))
        if codings[-1] == "chunked" and codings.count("chunked") == 1:
            return CHUNKED
        return UNTIL_CLOSE
    lengths = _values(headers, "content-length")
    if not lengths:
        return UNTIL_CLOSE
    values = {part.strip(" \t") for value in lengths for part in value.split(",")}
    if len(values) != 1:
        raise FramingError("the origin sent conflicting Content-Length values")
    value = values.pop()
    if not _DIGITS_RE.match(value):
        raise FramingError(f"the origin sent an invalid Content-Length {value!r}")
    return Framing("length", int(value))


# ---------------------------------------------------------------------------
# Headers: what each side is sent.


def connection_options(headers: tuple[tuple[str, str], ...], names: tuple[str, ...] = ("connection",)) -> set[str]:
    """The lowercased comma-separated tokens of the named header fields."""
    tokens: set[str] = set()
    for name in names:
        for value in _values(headers, name):
            tokens.update(token for token in (part.strip(" \t").lower() for part in value.split(",")) if token)
    return tokens


def _strip_hop_by_hop(headers: tuple[tuple[str, str], ...], *drop: str) -> list[tuple[str, str]]:
    named = connection_options(headers) - PROTECTED
    dropped = HOP_BY_HOP | named | set(drop)
    return [(name, value) for name, value in headers if name.lower() not in dropped]


def authority(host: Host, port: int, default_port: int = 80) -> str:
    """The Host header value for a destination: `name`, `name:port`, `[v6]:port`."""
    name = f"[{host.name}]" if host.ip is not None and host.ip.version == 6 else host.name
    return name if port == default_port else f"{name}:{port}"


def origin_target(request: http.Request) -> str:
    """The origin-form target: the path and query, or `*` for `OPTIONS http://host`."""
    if request.method == "OPTIONS":
        rest = request.target.partition("://")[2]
        if not any(mark in rest for mark in "/?"):
            return "*"
    return request.path or "/"


def wants_persistence(request: http.Request) -> bool:
    """Does the client want its connection kept open after this exchange?"""
    # Proxy-Connection is non-standard, but older clients still say keep-alive/close in it.
    options = connection_options(request.headers, ("connection", "proxy-connection"))
    if request.version == "HTTP/1.1":
        return "close" not in options
    return "keep-alive" in options and "close" not in options


def origin_head(request: http.Request) -> bytes:
    """The head sent to the origin: origin-form, our Host, no hop-by-hop fields,
    `Via`, and `Connection: close` (one origin connection per request)."""
    lines = [f"{request.method} {origin_target(request)} HTTP/1.1",
             f"Host: {authority(request.host, request.port)}"]
    lines += [f"{name}: {value}" for name, value in _strip_hop_by_hop(request.headers, "host")]
    lines += [f"Via: {request.version[5:]} {VIA}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


@dataclass(frozen=True, slots=True)
class Response:
    """A parsed response head from the origin."""

    version: str  # "1.0" or "1.1"
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def get(self, name: str) -> list[str]:
        return _values(self.headers, name.lower())


def client_head(response: Response, *, keep_alive: bool, client_version: str,
                dechunk: bool = False) -> bytes:
    """The head sent to the client: the origin's status and fields minus hop-by-hop ones,
    `Via`, and the connection persistence we decided on (not the origin's)."""
    drop = []
    if response.get("transfer-encoding"):
        drop.append("content-length")  # Transfer-Encoding wins; never send both
    if dechunk:
        drop.append("transfer-encoding")
    lines = [f"HTTP/1.1 {response.status} {response.reason}"]
    lines += [f"{name}: {value}" for name, value in _strip_hop_by_hop(response.headers, *drop)]
    lines.append(f"Via: {response.version} {VIA}")
    if response.status >= 200:
        if not keep_alive:
            lines.append("Connection: close")
        elif client_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
    lines += ["", ""]
    return "\r\n".join(lines).encode("latin-1")


def find_response_head_end(buffer: bytes, start: int = 0) -> int:
    """Offset just past the empty line ending a response head, or -1 (LF or CRLF lines)."""
    ends = [i for i in (buffer.find(b"\n\n", start), buffer.find(b"\n\r\n", start)) if i >= 0]
    if not ends:
        return -1
    at = min(ends)
    return at + (2 if buffer[at + 1:at + 2] == b"\n" else 3)


def parse_response_head(head: bytes) -> Response:
    """Parse a complete response head; FramingError if malformed.

    Origins get a little leeway the clients do not (LF-only line ends are read), since
    the head is re-serialized with CRLF before the client sees it; anything that could
    be read two ways (bare CR, folding, whitespace before a colon) is refused.
    """
    lines = head[:-2 if head.endswith(b"\r\n") else -1].split(b"\n")[:-1]
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if not lines:
        raise FramingError("empty response head")
    match = _STATUS_LINE_RE.match(lines[0])
    if match is None:
        raise FramingError("malformed status line from the origin")
    if len(lines) - 1 > MAX_RESPONSE_FIELDS:
        raise FramingError(f"more than {MAX_RESPONSE_FIELDS} header fields from the origin")
    headers = []
    for line in lines[1:]:
        field = _FIELD_RE.match(line)
        if field is None:
            raise FramingError("malformed header field from the origin")
        headers.append((field.group(1).decode("ascii"), field.group(2).strip(b" \t").decode("latin-1")))
    reason = (match.group(3) or b"").decode("latin-1")
    return Response(f"1.{match.group(1).decode()}", int(match.group(2)), reason, tuple(headers))


# ---------------------------------------------------------------------------
# The chunked body parser.


class ChunkError(ValueError):
    """A malformed chunked body; str() says what was wrong."""


class ChunkedBody:
    """Finds the end of a chunked body, fed in pieces; holds no payload.

    `feed(data)` returns how many leading bytes of `data` belong to the body (all of
    them until the last chunk and its trailers have been seen; `done` is then True and
    the rest belongs to whatever follows). Pass a list as `pieces` to collect the chunk
    data (to decode the body for an HTTP/1.0 client).
    """

    __slots__ = ("state", "line", "remaining", "trailer_bytes", "done")

    SIZE, DATA, DATA_CR, DATA_LF, TRAILER, DONE = range(6)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.line = b""
        self.remaining = 0
        self.trailer_bytes = 0
        self.done = False

    def feed(self, data: bytes, pieces: list[bytes] | None = None) -> int:
        pos, size = 0, len(data)
        while pos < size and not self.done:
            state = self.state
            if state == self.DATA:
                take = min(self.remaining, size - pos)
                if pieces is not None:
                    pieces.append(data[pos:pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = self.DATA_CR
            elif state == self.DATA_CR or state == self.DATA_LF:
                expected = 13 if state == self.DATA_CR else 10
                if data[pos] != expected:
                    raise ChunkError("chunk data not followed by CRLF")
                pos += 1
                self.state = self.DATA_LF if state == self.DATA_CR else self.SIZE
            else:
                pos = self._line(data, pos)
        return pos

    def _line(self, data: bytes, pos: int) -> int:
        """Accumulate a size or trailer line; act on it once its LF has arrived."""
        limit = MAX_CHUNK_LINE if self.state == self.SIZE else MAX_TRAILERS - self.trailer_bytes
        end = data.find(b"\n", pos)
        if end < 0:
            self.line += data[pos:]
            if len(self.line) > limit:
                raise ChunkError("chunk size line too long" if self.state == self.SIZE else "trailers too large")
            return len(data)
        line, self.line = self.line + data[pos:end], b""
        if len(line) > limit:
            raise ChunkError("chunk size line too long" if self.state == self.SIZE else "trailers too large")
        if not line.endswith(b"\r"):
            raise ChunkError("bare LF in chunked body: lines must end with CRLF")
        line = line[:-1]
        if self.state == self.SIZE:
            match = _CHUNK_SIZE_RE.match(line)
            if match is None:
                raise ChunkError("malformed chunk size line (expected hex digits, optional ;extensions)")
            self.remaining = int(match.group(1), 16)
            self.state = self.DATA if self.remaining else self.TRAILER
        elif not line:
            self.state = self.DONE
            self.done = True
        else:
            self.trailer_bytes += len(line) + 2
            if line[0] in b" \t" or not _FIELD_RE.match(line):
                raise ChunkError("malformed trailer field")
        return end + 1


# ---------------------------------------------------------------------------
# The exchange on the wire.


class Broken(Exception):
    """One side of an exchange failed. `side` is "client" or "origin"; `status` is what
    to answer if no response has been sent yet (None: nothing, the client is gone)."""

    def __init__(self, side: str, message: str, status: int | None = None, *, idle: bool = False) -> None:
        super().__init__(message)
        self.side = side
        self.message = message
        self.status = status
        self.idle = idle  # ended by IDLE_TIMEOUT rather than by the peer


class Flow:
    """Byte counts and the time of the last byte, shared by both directions."""

    __slots__ = ("up", "down", "last", "counted_up", "counted_down", "flushed")

    def __init__(self) -> None:
        self.up = self.down = self.counted_up = self.counted_down = 0
        self.last = self.flushed = time.monotonic()

    def flush(self, metrics: Any, identity: str) -> None:
        metrics.count_bytes(identity, self.up - self.counted_up, self.down - self.counted_down)
        self.counted_up, self.counted_down = self.up, self.down
        self.flushed = time.monotonic()


class Side:
    """One socket of the exchange; its failures become `Broken` for that side.

    What a failure answers, if no response has started: reading the client fails with
    400 (it stopped mid-body or sent a bad one) or 408 (idle); an origin failure is 502;
    a client that reset or stopped reading gets nothing.
    """

    def __init__(self, sock: socket.socket, name: str, flow: Flow, idle: float,
                 upstream: bool, metrics: Any, identity: str) -> None:
        self.sock, self.name, self.flow, self.idle = sock, name, flow, idle
        self.upstream, self.metrics, self.identity = upstream, metrics, identity
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
                             408 if self.is_client else 502, idle=True) from None
            except OSError as error:
                raise Broken(self.name, f"reading from the {self.name}: {_why(error)}",
                             None if self.is_client else 502) from None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as error:
            raise Broken(self.name, f"writing to the {self.name}: {_why(error)}",
                         None if self.is_client else 502) from None
        flow = self.flow
        now = flow.last = time.monotonic()
        if self.upstream:
            flow.up += len(data)
        else:
            flow.down += len(data)
        if now - flow.flushed >= FLUSH_EVERY:
            flow.flush(self.metrics, self.identity)


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
                raise Broken("origin", str(error), 502) from None
        if len(buf) > MAX_RESPONSE_HEAD:
            break
        scanned = len(buf)
        data = origin.recv(CHUNK)
        if not data:
            raise Broken("origin", "the origin closed without a complete response" if buf
                         else "the origin closed without responding", 502)
        buf += data
    raise Broken("origin", f"response head from the origin larger than {MAX_RESPONSE_HEAD} bytes", 502)


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


def http_decision(identity: Identity) -> Decision:
    """May this identity use plain-HTTP forwarding at all? (Report mode only notes it.)"""
    if identity.allow_http:
        return Decision(True, "allowed", "plain http allowed")
    reason = f"plain-HTTP forwarding is disabled for identity {identity.name} (allow_http: false); use CONNECT"
    if identity.reports_only:
        return Decision(True, "reported", f"would deny: {reason}")
    return Decision(False, "denied", reason)


def forward(guard: Any, client: socket.socket, request: http.Request, buffered: bytes,
            attempt: Any) -> tuple[bool, bytes]:
    """Judge and relay one absolute-form request; (keep the client connection, leftover)."""
    current: Policy = guard.policy  # read the reference once
    attempt.host, attempt.port = request.host, request.port
    _, identity = guard.authenticate(current, request)
    attempt.identity = identity.name
    guard.judge(attempt, http_decision(identity))
    guard.judge(attempt, policy.decide_destination(identity, request.host, request.port))
    try:
        framing = request_framing(request)
    except FramingError as error:
        raise Refusal(400, str(error)) from None
    slot = guard.take_slot(identity)
    try:
        upstream, _ = guard.resolve_and_dial(current, identity, attempt)
    except BaseException:
        guard.free_slot(identity.name, slot)
        raise
    guard.record(attempt, attempt.status, attempt.reason or "destination allowed")
    try:
        keep, leftover = Exchange(guard, client, upstream, request, identity, attempt).run(framing, buffered)
    finally:
        upstream.close()
        guard.free_slot(identity.name, slot)
    if keep and not leftover:
        keep = next_request_started(guard, client)
    return keep, leftover


def next_request_started(guard: Any, client: socket.socket) -> bool:
    """Wait (up to HEADER_TIMEOUT, less if draining starts) for a kept-alive client to
    begin its next request; False if it stays idle, so the connection closes quietly.

    The handler's head timeout answers 408 and records a decision; for a client that is
    merely idle between requests that would be a stray response and a false "timeout".
    """
    deadline = time.monotonic() + guard.settings.header_timeout
    while not guard.draining:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            ready = wait_readable([client], min(remaining, 0.5))
        except OSError:
            return False
        if ready is not None:
            return True  # bytes, or an orderly close the handler will see as such
    return False


class Exchange:
    """One request and its response between a client and a fresh origin connection."""

    def __init__(self, guard: Any, client: socket.socket, upstream: socket.socket,
                 request: http.Request, identity: Identity, attempt: Any) -> None:
        self.guard, self.request, self.attempt = guard, request, attempt
        idle = guard.settings.idle_timeout
        self.flow = Flow()
        self.client = Side(client, "client", self.flow, idle, False, guard.metrics, identity.name)
        self.origin = Side(upstream, "origin", self.flow, idle, True, guard.metrics, identity.name)
        for sock in (client, upstream):
            sock.settimeout(idle or None)
        self.status = 0
        self.responded = False  # a final response head went to the client

    def run(self, framing: Framing, buffered: bytes) -> tuple[bool, bytes]:
        started = time.monotonic()
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
                    self.client.sock.sendall(response(broken.status, broken.message))
                except OSError:
                    pass
        except Exception as unexpected:  # a bug must end this connection, not the server
            error = f"internal error: {type(unexpected).__name__}"
            log.exception("forwarding failed", extra={"identity": self.attempt.identity})
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
            self.summary(started, keep and error is None, error)
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
                raise Broken("origin", "the origin switched protocols although no upgrade was requested", 502)
            if request.version == "HTTP/1.1":  # 1xx are never sent to an HTTP/1.0 client
                self.client.send(client_head(response, keep_alive=True, client_version=request.version))
        else:
            raise Broken("origin", f"more than {MAX_INTERIM} interim responses from the origin", 502)
        try:
            body = response_framing(request.method, response.status, response.headers)
        except FramingError as error:
            raise Broken("origin", str(error), 502) from None
        dechunk = body.kind == "chunked" and request.version == "HTTP/1.0"
        keep = (wants_persistence(request) and body.delimited and not dechunk
                and not self.guard.draining and (upload is None or not upload.greenlet.dead or upload.complete))
        self.status = response.status
        self.client.send(client_head(response, keep_alive=keep, client_version=request.version,
                                     dechunk=dechunk))
        self.responded = True
        copy_body(self.origin, self.client, body, rest, dechunk=dechunk)
        return keep

    def summary(self, started: float, keep_alive: bool, error: str | None) -> None:
        flow, attempt = self.flow, self.attempt
        flow.flush(self.guard.metrics, attempt.identity)
        fields = {
            "client": attempt.client,
            "method": self.request.method,
            "identity": attempt.identity,
            "destination": attempt.destination,
            "status_code": self.status,
            "bytes_up": flow.up,
            "bytes_down": flow.down,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
            "keep_alive": keep_alive,
        }
        if error is not None:
            fields["error"] = error
        log.info("forwarded", extra=fields)
