"""Read the TLS ClientHello a client sends through an egress tunnel, and nothing more.

After ``200 Connection established`` the proxy peeks at the first bytes of the tunnel and must
decide, before forwarding a single byte, which server name the client is about to talk to
(steps 8-9 of docs/ARCHITECTURE.md). This module is the pure half of that: a function of the bytes received so
far with exactly three outcomes, in the style of mitmproxy's ClientHello parser:

* ``ClientHello``  -- a complete, well-formed hello; ``length`` says how many input bytes the
  records carrying it occupy (everything after that belongs to later records);
* ``NEED_MORE``    -- a prefix of something that may still become a valid hello: read more and
  call again with *all* bytes so far (the function keeps no state between calls);
* ``Invalid``      -- not a ClientHello we are willing to judge; ``reason`` is a short fixed text
  from ``INVALID_REASONS`` (safe to log and to assert on: it never echoes client bytes).

``parse_client_hello`` never raises for any bytes-like input, never answers ``NEED_MORE`` once
``MAX_HELLO_BYTES`` bytes are buffered, and answers ``Invalid`` as soon as the bytes seen prove
the hello cannot fit in that cap, so a client cannot make the proxy buffer more than 16 KiB.

The parser is deliberately strict wherever leniency would let a client show the proxy one name
and the server another: exactly one ``server_name`` extension holding exactly one ``host_name``
entry, no duplicate extensions, every length consistent. ECH (``encrypted_client_hello``) is
reported but not decrypted: the SNI returned is the *outer* one, the only one an on-path proxy
can see; the real name inside is protected from us by design.

No sockets and no gevent here: the caller owns I/O, timeouts and the alert it sends (``alert``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Final, NamedTuple, final

__all__ = [
    "ACCESS_DENIED",
    "DECODE_ERROR",
    "INVALID_REASONS",
    "MAX_HELLO_BYTES",
    "NEED_MORE",
    "ClientHello",
    "HelloReader",
    "Invalid",
    "NeedMore",
    "ServerHello",
    "alert",
    "is_tls_start",
    "parse_client_hello",
    "parse_one_record",
    "parse_server_hello",
]

# Cap on everything buffered while waiting for the hello: all records that carry it, record
# headers included. One maximal record (5 + 2**14 bytes) does not fit on purpose: real hellos
# are a few hundred bytes (post-quantum key shares bring them to ~1.8 KiB), and the cap is what
# bounds the memory a silent or hostile client can pin per tunnel.
MAX_HELLO_BYTES: Final = 16384

# TLS record plaintext may not exceed 2**14 bytes (RFC 8446 section 5.1).
_MAX_RECORD_PAYLOAD = 2**14

_CONTENT_HANDSHAKE = 22
_CONTENT_ALERT = 21
_HANDSHAKE_CLIENT_HELLO = 1

_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_EXT_SUPPORTED_VERSIONS = 0x002B
_EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D
_READ_EXTENSIONS = frozenset({_EXT_SERVER_NAME, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS, _EXT_ENCRYPTED_CLIENT_HELLO})

# Alert descriptions (RFC 8446 section 6) the proxy sends.
ACCESS_DENIED: Final = 49
DECODE_ERROR: Final = 50

_ALERT_LEVEL_FATAL = 2

# Bytes a host name may contain: printable ASCII without space. Anything else (NUL, control
# characters, UTF-8) cannot be a DNS name and is exactly what confuses a later comparison.
_HOST_NAME_BYTES = bytes(range(0x21, 0x7F))

_U16 = struct.Struct("!H")
_EXT_HEADER = struct.Struct("!HH")


class ClientHello(NamedTuple):
    """The parts of a ClientHello the proxy judges or logs. (A tuple: built once per
    tunnel on the hot path, where a frozen dataclass costs a call per field.)"""

    sni: str | None
    """``host_name`` from the ``server_name`` extension, exactly as sent (ASCII, not lowercased,
    trailing dot kept; normalizing is the policy's job). None when there is no such extension."""
    record_version: int
    """Version field of the first record, e.g. 0x0301."""
    legacy_version: int
    """``legacy_version`` (client_version) in the hello body, e.g. 0x0303."""
    supported_versions: tuple[int, ...]
    """The ``supported_versions`` extension in client order (GREASE values included); empty
    when absent, i.e. a client that offers nothing above TLS 1.2."""
    alpn: tuple[str, ...]
    """ALPN protocol names, decoded as Latin-1 so that any byte string maps to one text."""
    has_ech: bool
    """``encrypted_client_hello`` (0xfe0d) is present: ``sni`` is the outer, public name."""
    length: int
    """Input bytes occupied by the records that carried the hello."""


@final
class NeedMore:
    """More bytes are needed to decide. Use the singleton ``NEED_MORE``."""

    __slots__ = ()
    _instance: ClassVar[NeedMore | None] = None

    def __new__(cls) -> NeedMore:
        # One instance, so callers may test with ``is NEED_MORE`` as well as isinstance().
        if cls._instance is None:
            cls._instance = object.__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __reduce__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()


@dataclass(frozen=True, slots=True)
class Invalid:
    """The bytes are not a ClientHello the proxy will judge."""

    reason: str
    """One of ``INVALID_REASONS``."""


# Every outcome is a shared constant: the reason set stays closed (tests check it), and the
# rejection path allocates nothing.
_NOT_HANDSHAKE = Invalid("not a TLS handshake record")
_BAD_RECORD_VERSION = Invalid("unsupported record version")
_BAD_RECORD_LENGTH = Invalid("bad record length")
_FOREIGN_RECORD = Invalid("non-handshake record inside the hello")
_NOT_CLIENT_HELLO = Invalid("not a client_hello")
_TOO_BIG = Invalid(f"hello exceeds {MAX_HELLO_BYTES} bytes")
_TRUNCATED_HELLO = Invalid("truncated client_hello")
_BAD_CLIENT_VERSION = Invalid("unsupported client version")
_BAD_SESSION_ID = Invalid("session_id too long")
_BAD_CIPHER_SUITES = Invalid("bad cipher_suites length")
_NO_COMPRESSION = Invalid("no compression methods")
_EXTENSIONS_MISMATCH = Invalid("extensions length mismatch")
_TRUNCATED_EXTENSION = Invalid("truncated extension")
_DUPLICATE_EXTENSION = Invalid("duplicate extension")
_BAD_SERVER_NAME = Invalid("malformed server_name")
_SEVERAL_NAMES = Invalid("several server_name entries")
_BAD_NAME_TYPE = Invalid("unsupported server_name type")
_BAD_HOST_LENGTH = Invalid("bad host name length")
_BAD_HOST_BYTES = Invalid("bad host name characters")
_BAD_ALPN = Invalid("malformed alpn")
_BAD_SUPPORTED_VERSIONS = Invalid("malformed supported_versions")

INVALID_REASONS: Final = frozenset(
    invalid.reason
    for invalid in (
        _NOT_HANDSHAKE,
        _BAD_RECORD_VERSION,
        _BAD_RECORD_LENGTH,
        _FOREIGN_RECORD,
        _NOT_CLIENT_HELLO,
        _TOO_BIG,
        _TRUNCATED_HELLO,
        _BAD_CLIENT_VERSION,
        _BAD_SESSION_ID,
        _BAD_CIPHER_SUITES,
        _NO_COMPRESSION,
        _EXTENSIONS_MISMATCH,
        _TRUNCATED_EXTENSION,
        _DUPLICATE_EXTENSION,
        _BAD_SERVER_NAME,
        _SEVERAL_NAMES,
        _BAD_NAME_TYPE,
        _BAD_HOST_LENGTH,
        _BAD_HOST_BYTES,
        _BAD_ALPN,
        _BAD_SUPPORTED_VERSIONS,
    )
)


def is_tls_start(first_byte: int) -> bool:
    """Whether a stream starting with this byte can be TLS (a handshake record)."""
    return first_byte == _CONTENT_HANDSHAKE


def alert(description: int, version: int = 0x0303) -> bytes:
    """A fatal TLS alert record, e.g. ``alert(ACCESS_DENIED)``.

    Sent in plaintext before any ServerHello, which every client accepts; 0x0303 is the record
    version TLS 1.3 requires and TLS 1.2 clients take as well.
    """
    return struct.pack("!BHHBB", _CONTENT_ALERT, version, 2, _ALERT_LEVEL_FATAL, description)


def parse_client_hello(data: bytes | bytearray | memoryview) -> ClientHello | NeedMore | Invalid:
    """Parse the ClientHello at the start of ``data`` (all bytes received so far).

    Returns ``ClientHello``, ``NEED_MORE`` or ``Invalid``; never raises for bytes-like input.
    Bytes after the records that carry the hello are ignored (``ClientHello.length`` marks
    where they start). The result holds no reference to ``data``, so a bytearray buffer can
    grow again as soon as this returns. (`HelloReader` is the same parser fed piece by piece.)
    """
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous:
        view = memoryview(view.tobytes())
    elif view.format != "B":
        view = view.cast("B")
    return HelloReader().feed(view)


class HelloReader:
    """The ClientHello parser, fed the bytes as they arrive: each call looks only at the
    new bytes (and at most one record header and four handshake bytes it had seen
    before), so a hello delivered in many small pieces costs linear time.

    `feed()` returns the outcome so far; once it is a ClientHello or Invalid, it stays.
    After a ClientHello, `trailing` counts handshake bytes that followed the message inside
    its last record (another handshake message), and `records` how many records carried it.
    """

    __slots__ = ("_buf", "_pos", "_hs", "_needed", "_result", "records", "trailing")

    def __init__(self) -> None:
        self._buf = bytearray()  # every byte fed (at most MAX_HELLO_BYTES + one read)
        self._pos = 0  # start of the first record not yet complete
        self._hs = bytearray()  # handshake bytes of the complete records
        self._needed = -1  # 4 + handshake length, once the handshake header is known
        self._result: ClientHello | Invalid | None = None
        self.records = 0
        self.trailing = 0

    def feed(self, data: bytes | bytearray | memoryview) -> ClientHello | NeedMore | Invalid:
        if self._result is not None:
            return self._result
        if not self._buf:
            whole = parse_one_record(data)
            if whole is not None:
                return self._end(whole)
        buf = self._buf
        buf += data
        size = len(buf)
        if size == 0:
            return NEED_MORE
        if buf[0] != _CONTENT_HANDSHAKE:
            return self._end(_NOT_HANDSHAKE)
        # Walk the records, gathering handshake bytes until the whole client_hello message
        # (4-byte handshake header + body) is in. Every check runs on the bytes available, so a
        # prefix that already proves the hello bad or oversized is refused without waiting.
        pos, hs = self._pos, self._hs
        while True:
            if pos + 6 > MAX_HELLO_BYTES:
                # Another record is needed, and even a 1-byte one would not fit in the cap.
                return self._end(_TOO_BIG)
            available = size - pos
            if available >= 1 and buf[pos] != _CONTENT_HANDSHAKE:
                # A client may interleave nothing with its hello: an alert, CCS or application
                # data record here is either a broken client or an attempt to smuggle bytes.
                return self._end(_FOREIGN_RECORD if pos else _NOT_HANDSHAKE)
            if available >= 2 and buf[pos + 1] != 3:
                return self._end(_BAD_RECORD_VERSION)
            if available < 5:
                self._pos = pos
                return NEED_MORE
            record_length = (buf[pos + 3] << 8) | buf[pos + 4]
            if record_length == 0 or record_length > _MAX_RECORD_PAYLOAD:
                # Zero-length handshake fragments are forbidden (RFC 8446 section 5.1).
                return self._end(_BAD_RECORD_LENGTH)
            record_end = pos + 5 + record_length
            if record_end > MAX_HELLO_BYTES:
                return self._end(_TOO_BIG)
            if self._needed < 0:
                header = bytes(hs[:4]) + bytes(buf[pos + 5 : min(record_end, size, pos + 9 - len(hs))])
                if header and header[0] != _HANDSHAKE_CLIENT_HELLO:
                    return self._end(_NOT_CLIENT_HELLO)
                if len(header) >= 4:
                    self._needed = 4 + int.from_bytes(header[1:4], "big")
            needed = self._needed
            if needed >= 0:
                # The least the whole hello can take: this record, plus one more record header
                # if the message does not end inside it.
                missing = needed - len(hs)
                least = record_end
                if missing > record_length:
                    least += 5 + missing - record_length
                if least > MAX_HELLO_BYTES:
                    return self._end(_TOO_BIG)
            if record_end > size:
                self._pos = pos
                return NEED_MORE
            hs += buf[pos + 5 : record_end]
            self.records += 1
            pos = record_end
            if 0 <= needed <= len(hs):
                break
        self._pos = pos
        self.trailing = len(hs) - needed
        message: bytes | memoryview = memoryview(hs)[:needed] if self.trailing else memoryview(hs)
        try:
            result = _parse_body(message, 4, needed, record_version=(buf[1] << 8) | buf[2], length=pos)
        finally:
            message.release()
        return self._end(result)

    def _end(self, result: ClientHello | Invalid) -> ClientHello | Invalid:
        self._result = result
        self._buf = self._hs = bytearray()  # nothing more is needed of the bytes
        return result


def parse_one_record(data: bytes | bytearray | memoryview) -> ClientHello | Invalid | None:
    """The usual case, a whole hello in one record at the start of `data`, parsed in
    place (its `length` says where the record ends); None for anything else, which
    `HelloReader` decides."""
    size = len(data)
    if size < 9 or data[0] != _CONTENT_HANDSHAKE or data[1] != 3 or data[5] != _HANDSHAKE_CLIENT_HELLO:
        return None
    record_length = (data[3] << 8) | data[4]
    needed = 4 + ((data[6] << 16) | (data[7] << 8) | data[8])
    if not 0 < record_length <= _MAX_RECORD_PAYLOAD or 5 + record_length > min(size, MAX_HELLO_BYTES) \
            or needed != record_length:
        return None
    with memoryview(data) as view, view[5 : 5 + record_length] as message:
        return _parse_body(message, 4, needed, record_version=(data[1] << 8) | data[2], length=5 + record_length)


def _parse_body(
    msg: bytes | memoryview, p: int, end: int, *, record_version: int, length: int
) -> ClientHello | Invalid:
    """Parse the client_hello body ``msg[p:end]`` (RFC 8446 section 4.1.2, RFC 5246 7.4.1.2).

    The message is complete here, so any length that overruns ``end`` is Invalid, not NEED_MORE.
    """
    # legacy_version(2) random(32) legacy_session_id_length(1)
    if end - p < 35:
        return _TRUNCATED_HELLO
    if msg[p] != 3:
        return _BAD_CLIENT_VERSION
    legacy_version = (msg[p] << 8) | msg[p + 1]
    p += 34
    session_id_length = msg[p]
    if session_id_length > 32:
        return _BAD_SESSION_ID
    p += 1 + session_id_length
    if p + 2 > end:
        return _TRUNCATED_HELLO
    (cipher_suites_length,) = _U16.unpack_from(msg, p)
    if cipher_suites_length < 2 or cipher_suites_length & 1:
        return _BAD_CIPHER_SUITES
    p += 2 + cipher_suites_length
    if p + 1 > end:
        return _TRUNCATED_HELLO
    compression_length = msg[p]
    if compression_length == 0:
        return _NO_COMPRESSION
    p += 1 + compression_length
    if p > end:
        return _TRUNCATED_HELLO

    # A hello may end here: SSL 3.0 / early TLS 1.0 clients sent no extensions block at all.
    found = _parse_extensions(msg, p, end) if p < end else (None, (), (), False)
    if isinstance(found, Invalid):
        return found
    sni, alpn, supported_versions, has_ech = found
    return ClientHello(
        sni=sni,
        record_version=record_version,
        legacy_version=legacy_version,
        supported_versions=supported_versions,
        alpn=alpn,
        has_ech=has_ech,
        length=length,
    )


def _parse_extensions(
    msg: bytes | memoryview, p: int, end: int
) -> tuple[str | None, tuple[str, ...], tuple[int, ...], bool] | Invalid:
    """(sni, alpn, supported_versions, has_ech) from the extensions block at `msg[p:end]`."""
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = ()
    has_ech = False
    if p + 2 > end:
        return _EXTENSIONS_MISMATCH
    (extensions_length,) = _U16.unpack_from(msg, p)
    p += 2
    if p + extensions_length != end:
        # Trailing bytes after the extensions would be a place to hide a second opinion.
        return _EXTENSIONS_MISMATCH
    seen: set[int] = set()
    remember, header = seen.add, _EXT_HEADER.unpack_from  # a dozen turns per hello: locals
    while p < end:
        if end - p < 4:
            return _TRUNCATED_EXTENSION
        ext_type, ext_length = header(msg, p)
        p += 4
        ext_end = p + ext_length
        if ext_end > end:
            return _TRUNCATED_EXTENSION
        if ext_type in seen:
            # RFC 8446 section 4.2: a duplicate is a protocol error; two server_name
            # extensions would let the proxy and the server each pick a different one.
            return _DUPLICATE_EXTENSION
        remember(ext_type)
        if ext_type not in _READ_EXTENSIONS:
            p = ext_end
            continue
        if ext_type == _EXT_SERVER_NAME:
            result = _parse_server_name(msg, p, ext_end)
            if isinstance(result, Invalid):
                return result
            sni = result
        elif ext_type == _EXT_ALPN:
            result_alpn = _parse_alpn(msg, p, ext_end)
            if result_alpn is None:
                return _BAD_ALPN
            alpn = result_alpn
        elif ext_type == _EXT_SUPPORTED_VERSIONS:
            # u8 length, then u16 versions (the ClientHello form, RFC 8446 4.2.1).
            if ext_length < 3 or msg[p] != ext_length - 1 or msg[p] & 1:
                return _BAD_SUPPORTED_VERSIONS
            count = msg[p] // 2
            supported_versions = struct.unpack_from(f"!{count}H", msg, p + 1)
        elif ext_type == _EXT_ENCRYPTED_CLIENT_HELLO:
            has_ech = True
        p = ext_end
    return sni, alpn, supported_versions, has_ech


def _parse_server_name(msg: bytes | memoryview, p: int, end: int) -> str | Invalid:
    """The single host_name in a server_name extension body ``msg[p:end]`` (RFC 6066 section 3)."""
    if end - p < 2:
        return _BAD_SERVER_NAME
    (list_length,) = _U16.unpack_from(msg, p)
    p += 2
    if p + list_length != end or list_length < 3:
        return _BAD_SERVER_NAME
    # The name type decides how the rest of the entry is laid out, so it is checked first.
    # Only host_name (0) was ever defined; OpenSSL refuses any other type the same way.
    if msg[p] != 0:
        return _BAD_NAME_TYPE
    (name_length,) = _U16.unpack_from(msg, p + 1)
    p += 3
    if p + name_length > end:
        return _BAD_SERVER_NAME
    if p + name_length < end:
        # RFC 6066 allows one name per type and host_name is the only type, so a second entry
        # is either garbage or a second name for the proxy and the server to disagree on.
        return _SEVERAL_NAMES
    if name_length == 0 or name_length > 255:
        return _BAD_HOST_LENGTH
    host = bytes(msg[p:end])
    # translate() deletes every allowed byte in C; anything left over is a forbidden byte.
    if host.translate(None, _HOST_NAME_BYTES):
        return _BAD_HOST_BYTES
    return host.decode("ascii")


def _parse_alpn(msg: bytes | memoryview, p: int, end: int) -> tuple[str, ...] | None:
    """ALPN protocol names in ``msg[p:end]`` (RFC 7301 section 3.1), or None if malformed."""
    if end - p < 2:
        return None
    (list_length,) = _U16.unpack_from(msg, p)
    p += 2
    if p + list_length != end or list_length == 0:
        return None
    names = []
    while p < end:
        name_length = msg[p]
        p += 1
        # Empty names are forbidden; a name running past the list is a length lie.
        if name_length == 0 or p + name_length > end:
            return None
        names.append(bytes(msg[p : p + name_length]).decode("latin-1"))
        p += name_length
    return tuple(names)


# --- the server's answer ----------------------------------------------------------------------

# A ServerHello whose random is this value is a HelloRetryRequest (RFC 8446 section 4.1.3).
_RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
TLS13 = 0x0304


@dataclass(frozen=True, slots=True)
class ServerHello:
    """What the proxy needs of the server's first handshake message."""

    version: int
    """The version the server chose: ``supported_versions`` if present, else legacy_version."""
    retry: bool
    """A HelloRetryRequest: the client must send a second ClientHello."""


_BAD_SERVER_HELLO = Invalid("malformed server_hello")


def parse_server_hello(body: bytes | bytearray | memoryview) -> ServerHello | Invalid:
    """Parse a complete ServerHello message body (after its 4-byte handshake header).

    RFC 8446 section 4.1.3 / RFC 5246 section 7.4.1.3: legacy_version, random, session id,
    cipher suite, compression method, then optional extensions, of which only
    ``supported_versions`` (the negotiated version, TLS 1.3) is read.
    """
    end = len(body)
    if end < 38 or body[0] != 3:
        return _BAD_SERVER_HELLO
    version = (body[0] << 8) | body[1]
    retry = bytes(body[2:34]) == _RETRY_RANDOM
    p = 35 + body[34]
    if body[34] > 32 or p + 3 > end:
        return _BAD_SERVER_HELLO
    p += 3  # cipher_suite, legacy_compression_method
    if p == end:
        return ServerHello(version, retry)  # no extensions: TLS 1.2 or older
    if p + 2 > end or p + 2 + ((body[p] << 8) | body[p + 1]) != end:
        return _BAD_SERVER_HELLO
    p += 2
    while p < end:
        if p + 4 > end:
            return _BAD_SERVER_HELLO
        ext_type, ext_length = _EXT_HEADER.unpack_from(body, p)
        p += 4
        if p + ext_length > end:
            return _BAD_SERVER_HELLO
        if ext_type == _EXT_SUPPORTED_VERSIONS:
            if ext_length != 2:
                return _BAD_SERVER_HELLO
            version = (body[p] << 8) | body[p + 1]
        p += ext_length
    return ServerHello(version, retry)
