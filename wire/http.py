"""Strict parsing of a proxy request head: pure functions over bytes, no sockets.

A proxy that is lenient where its origin servers are strict (or the reverse) is how
request smuggling and filter bypasses happen, so anything outside the narrow grammar
below is refused with the status it deserves, carried on the exception (as h11 does):

    request-line = method SP request-target SP HTTP-version CRLF
    header-field = token ":" OWS field-value OWS CRLF

Refused: bare LF or CR, obsolete line folding, whitespace before a colon, control
characters, extra spaces, userinfo in an authority, non-canonical IP literals and
ports outside 1-65535. (Body framing of forwarded requests is judged in
wire/message.py.)
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import NamedTuple

from policy.hosts import Host, HostError, parse_host

MAX_HEAD_BYTES = 16384
MAX_HEADER_FIELDS = 100
# Reads a head may take: one per line of a client writing each field separately, and
# some more; bounds the work a client sending a byte at a time can cause.
MAX_HEAD_PIECES = MAX_HEADER_FIELDS + 28
HEAD_END = b"\r\n\r\n"

# RFC 9110 token characters.
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(TOKEN + rb"\Z")
# VCHAR, obs-text, SP and HTAB; anything else in a value (CR, LF, NUL, DEL...) is refused.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET_BYTE = re.compile(rb"[^\x21-\x7e]")
# A whole well-formed header field: token, colon, value without controls (its surrounding
# blanks outside the group). Anything else takes the checks that say what is wrong.
_FIELD = re.compile(TOKEN.join([rb"(", rb"):[ \t]*((?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*"]))
_PORT = re.compile(r"[0-9]{1,5}\Z")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
# Characters allowed in an absolute-form target after the authority (RFC 3986 pchar,
# '/', '?', and '%'); no fragment, no whitespace, no controls.
_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*\Z")

FORWARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ALLOWED_METHODS = "CONNECT, " + ", ".join(sorted(FORWARD_METHODS))


class HeadError(Exception):
    """A request head we refuse; `status` is the HTTP status it should produce."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(HeadError):
    status = 400


class HeadTooLarge(HeadError):
    status = 431


class MethodNotAllowed(HeadError):
    status = 405


class VersionNotSupported(HeadError):
    status = 505


class Request(NamedTuple):
    """A parsed request head.

    For CONNECT, `host`/`port` are the tunnel target. For an absolute-form `http://`
    request, they are the origin and `path` is the origin-form target to send it.
    """

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    host: Host
    port: int
    path: str | None = None

    def get(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive), in order."""
        return header_values(self.headers, name)

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"


def header_values(headers: tuple[tuple[str, str], ...], name: str) -> list[str]:
    """Every value of the header field `name` (case-insensitive) in `headers`, in order."""
    name = name.lower()
    return [value for key, value in headers if key.lower() == name]


def find_head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Offset just past the blank line ending the head, or -1 if not there yet.

    `start`: how much of `buffer` an earlier call already examined (and found no end in),
    so a head arriving in many pieces is scanned once, not once per piece. Raises
    BadRequest as soon as a bare LF shows up, so a client that ends lines with LF alone
    gets an answer instead of waiting for the header timeout.
    """
    # Back up far enough to see a CRLF CRLF (or a CRLF) that straddles the old end.
    begin = max(0, start - 3)
    end = buffer.find(HEAD_END, begin)
    scan = buffer[begin:] if end < 0 else buffer[begin : end + 4]
    if scan.count(b"\n") != scan.count(b"\r\n") + (scan[:1] == b"\n" and buffer[begin - 1 : begin] == b"\r"):
        raise BadRequest("bare LF in request head: lines must end with CRLF")
    return -1 if end < 0 else end + 4


# Heads parsed before, by their bytes: a pod reconnecting to the same destination sends
# the same head every time, and parsing is a pure function of the bytes, so the same
# head gets the same (immutable) Request back from a dictionary lookup. Only heads that
# parsed, up to MEMO_HEAD_BYTES each, and MEMO_HEADS of them; a client sending ever
# new heads only makes the memory start again.
MEMO_HEADS = 1024
MEMO_HEAD_BYTES = 1024
_parsed: dict[bytes, Request] = {}
_remembered: set[int] = set()  # ids of the Requests in _parsed (alive while they are there)


def parse_head(head: bytes) -> Request:
    """Parse a complete request head (ending with CRLF CRLF)."""
    request = _parsed.get(head)
    if request is None:
        request = _parse_head(head)
        if len(head) <= MEMO_HEAD_BYTES:
            if len(_parsed) >= MEMO_HEADS:
                _parsed.clear()
                _remembered.clear()
                _credentials.clear()
            _parsed[head] = request
            _remembered.add(id(request))
    return request


def _parse_head(head: bytes) -> Request:
    if len(head) > MAX_HEAD_BYTES:
        raise HeadTooLarge(f"request head exceeds {MAX_HEAD_BYTES} bytes")
    if not head.endswith(HEAD_END):
        raise BadRequest("incomplete request head")
    body = head[:-4]
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        raise BadRequest("bare CR or LF in request head: lines must end with CRLF")
    lines = body.split(b"\r\n")
    method, target, version = _request_line(lines[0])
    headers = _header_fields(lines[1:])
    if method == "CONNECT":
        host, port = parse_authority(target, default_port=443)
        return Request(method, target, version, headers, host, port)
    if target.startswith("/") or target == "*":
        raise BadRequest(
            "not a proxy request: send CONNECT host:port, or an absolute http:// URL"
        )
    host, port, path = parse_absolute_url(target)
    if method not in FORWARD_METHODS:
        raise MethodNotAllowed(f"method {method} is not supported; use one of {ALLOWED_METHODS}")
    return Request(method, target, version, headers, host, port, path)


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest("malformed request line: expected 'METHOD target HTTP/1.1' with single spaces")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise BadRequest("malformed request line: invalid method")
    match = _VERSION.match(version)
    if match is None:
        raise BadRequest("malformed request line: invalid HTTP version")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise VersionNotSupported(f"HTTP version {version.decode('ascii')} is not supported; use HTTP/1.1")
    if _BAD_TARGET_BYTE.search(target):
        raise BadRequest("malformed request line: control or non-ASCII character in target")
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def _header_fields(lines: list[bytes]) -> tuple[tuple[str, str], ...]:
    if len(lines) > MAX_HEADER_FIELDS:
        raise HeadTooLarge(f"more than {MAX_HEADER_FIELDS} header fields")
    fields = []
    for line in lines:
        field = _FIELD.fullmatch(line)
        if field is not None:  # the usual case: one match says it all
            fields.append((field.group(1).decode("ascii"), field.group(2).decode("latin-1")))
            continue
        if not line:
            raise BadRequest("empty line inside the request head")
        if line[0] in b" \t":
            raise BadRequest("obsolete line folding in header field")
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadRequest("malformed header field: no colon")
        if not _TOKEN.match(name):
            raise BadRequest("malformed header field name (whitespace before the colon?)")
        if _BAD_VALUE_BYTE.search(value):
            raise BadRequest("control character in header field value")
        fields.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return tuple(fields)


def parse_authority(text: str, *, default_port: int) -> tuple[Host, int]:
    """`host:port`, `[v6]:port` or a bare `host` (taking `default_port`)."""
    if not text:
        raise BadRequest("empty authority")
    if "@" in text:
        raise BadRequest("userinfo ('@') is not allowed in the authority")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise BadRequest("unterminated '[' in IPv6 authority")
        host_text, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise BadRequest("unexpected characters after ']' in authority")
        port_text = rest[1:] if rest else None
        if ":" not in host_text:
            raise BadRequest("brackets are only for IPv6 addresses")
    else:
        host_text, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
        elif ":" in port_text:
            raise BadRequest("IPv6 addresses must be written in brackets: [2001:db8::1]:443")
    port = default_port if port_text is None else _parse_port(port_text)
    try:
        host = parse_host(host_text)
    except HostError as error:
        raise BadRequest(f"invalid host: {error}") from None
    if text.startswith("[") and host.ip is None:
        raise BadRequest("brackets are only for IPv6 addresses")
    return host, port


def _parse_port(text: str) -> int:
    if not _PORT.match(text):
        raise BadRequest("invalid port: expected a number from 1 to 65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise BadRequest(f"invalid port {port}: must be from 1 to 65535")
    return port


def parse_absolute_url(target: str) -> tuple[Host, int, str]:
    """An absolute-form `http://authority/path?query` target → (host, port, origin-form)."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise BadRequest("not a proxy request: send CONNECT host:port, or an absolute http:// URL")
    scheme = scheme.lower()
    if scheme == "https":
        raise BadRequest("https:// URLs must be sent with CONNECT (use the proxy as an HTTPS proxy)")
    if scheme != "http":
        raise BadRequest(f"unsupported URL scheme {scheme!r}: only http:// is forwarded")
    cut = len(rest)
    for mark in "/?#":
        index = rest.find(mark)
        if 0 <= index < cut:
            cut = index
    authority, path = rest[:cut], rest[cut:]
    if "#" in path:
        raise BadRequest("a fragment ('#') is not allowed in a request target")
    if not path.startswith("/"):
        path = "/" + path
    if not _PATH.match(path):
        raise BadRequest("invalid character in URL path")
    host, port = parse_authority(authority, default_port=80)
    return host, port, path


def proxy_credentials(request: Request) -> str | None:
    """The API key (Basic username) from Proxy-Authorization, or None if absent.

    Raises BadRequest for a duplicated header (which one would win is exactly the
    ambiguity an attacker wants) and ValueError for a malformed one; the caller
    answers 407 to ValueError and never echoes the header.
    """
    known = _credentials.get(id(request))
    if known is not None and known[0] is request:  # a Request parse_head remembered
        return known[1]
    values = request.get("Proxy-Authorization")
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("duplicate Proxy-Authorization header")
    scheme, _, encoded = values[0].partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("Proxy-Authorization scheme is not Basic")
    try:
        decoded = base64.b64decode(encoded.strip(" "), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("Proxy-Authorization is not valid base64") from None
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("Proxy-Authorization credentials are not UTF-8") from None
    username = text.partition(":")[0]
    if not username:
        raise ValueError("Proxy-Authorization has an empty username")
    if id(request) in _remembered:
        _credentials[id(request)] = (request, username)
    return username


# The API key of each Request parse_head remembered, by its id (with the Request, to prove it).
_credentials: dict[int, tuple[Request, str]] = {}
