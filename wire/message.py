"""HTTP/1.1 messages as the forwarding path sees them: where a body ends (request and
response framing, RFC 9112 section 6), which header fields each side is sent, response
heads from an origin, and an incremental parser for chunked bodies. Pure functions and
values over bytes and parsed heads, no sockets: `proxy.forward` does the I/O.

The proxy and the origin must agree on where a body ends, or a second request can be
smuggled inside the first, so every ambiguous request framing is refused. The parser
for bodies is strict in the same way `wire.http` is for heads: CRLF only, hex sizes,
bounded lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policy.hosts import Host
from wire import http

MAX_RESPONSE_FIELDS = 256
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
MAX_TRAILERS = 16384
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

_TOKEN = http.TOKEN
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
    encodings = http.header_values(headers, "transfer-encoding")
    if encodings:
        # Transfer-Encoding overrides any Content-Length (which is then not relayed).
        codings = _codings(", ".join(encodings))
        if codings[-1] == "chunked" and codings.count("chunked") == 1:
            return CHUNKED
        return UNTIL_CLOSE
    lengths = http.header_values(headers, "content-length")
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
        for value in http.header_values(headers, name):
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
        return http.header_values(self.headers, name)


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
