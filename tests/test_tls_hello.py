"""The ClientHello parser (wire/tls.py): real hellos, re-framed and cut-up hellos, lies in every
length field, the 16 KiB cap, and hypothesis campaigns asserting that only the three documented
outcomes ever occur.

Where the hellos come from:

* Captured live, in this process: Python's ``ssl`` writes its ClientHello into a MemoryBIO when
  ``do_handshake()`` is called on an SSLObject with nobody answering (see ``capture_hello``).
* ``tests/fixtures/hellos/*.hex``: hex with ``#`` comments, each file saying how it was made.
  Three are captures (Python ssl, curl, openssl s_client) frozen so the suite also covers bytes
  that a different OpenSSL build would not produce; four are hand-built field by field (ECH,
  several server names, a non-host_name type, a duplicated server_name extension), annotated
  so a reader can check every length against the RFC.
* Generated here with ``build_hello``: hellos whose exact shape a test needs (huge padding,
  no extensions block, odd host names).

OpenSSL's own server is used as a second opinion: wherever both it and our parser accept a
hello, they must have read the same server name.
"""

from __future__ import annotations

import re
import ssl
import struct
import sys
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire.tls import (
    ACCESS_DENIED,
    DECODE_ERROR,
    INVALID_REASONS,
    MAX_HELLO_BYTES,
    NEED_MORE,
    ClientHello,
    Invalid,
    NeedMore,
    alert,
    is_tls_start,
    parse_client_hello,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hellos"

TLS12, TLS13 = 0x0303, 0x0304
LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 50])  # 242 characters

# Hypothesis runs inside the normal suite: bounded, and without per-example deadlines because a
# loaded CI machine should not turn a correct parser into a flaky test.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- building and capturing hellos ------------------------------------------------------------


def capture_hello(
    server_hostname: str | None,
    *,
    maximum_version: ssl.TLSVersion | None = None,
    minimum_version: ssl.TLSVersion | None = None,
    alpn: list[str] | None = None,
) -> bytes:
    """The first flight Python's ssl sends, read from a MemoryBIO; no socket, no server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        context.check_hostname = False
    if maximum_version is not None:
        context.maximum_version = maximum_version
    if minimum_version is not None:
        context.minimum_version = minimum_version
    if alpn:
        context.set_alpn_protocols(alpn)
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def load_hex(name: str) -> bytes:
    text = (FIXTURES / name).read_text()
    return bytes.fromhex(re.sub(r"#[^\n]*", "", text))


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def extension(ext_type: int, body: bytes) -> bytes:
    return u16(ext_type) + u16(len(body)) + body


def server_name(*entries: tuple[int, bytes]) -> bytes:
    names = b"".join(u8(name_type) + u16(len(name)) + name for name_type, name in entries)
    return extension(0x0000, u16(len(names)) + names)


def host(name: bytes) -> bytes:
    return server_name((0, name))


def hello_body(
    extensions: bytes | None,
    *,
    legacy_version: int = TLS12,
    session_id: bytes = bytes(32),
    cipher_suites: bytes = bytes.fromhex("1301c02f"),
    compression: bytes = b"\x00",
) -> bytes:
    """A ClientHello body; ``extensions=None`` leaves out the extensions block entirely."""
    body = (
        u16(legacy_version)
        + bytes(range(32))
        + u8(len(session_id))
        + session_id
        + u16(len(cipher_suites))
        + cipher_suites
        + u8(len(compression))
        + compression
    )
    if extensions is not None:
        body += u16(len(extensions)) + extensions
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: list[int] | None = None, *, version: int = 0x0301) -> bytes:
    """Frame a handshake message as records with the given payload sizes (the last one takes
    the rest; ``None``: one record)."""
    out, pos = [], 0
    for size in sizes or []:
        if pos + size >= len(message):
            break
        out.append(u8(22) + u16(version) + u16(size) + message[pos : pos + size])
        pos += size
    out.append(u8(22) + u16(version) + u16(len(message) - pos) + message[pos:])
    return b"".join(out)


def build_hello(extensions: bytes | None, **body_fields: object) -> bytes:
    return records(handshake(hello_body(extensions, **body_fields)))  # type: ignore[arg-type]


def message_of(hello: bytes) -> bytes:
    """The handshake message inside a single-record hello."""
    (length,) = struct.unpack_from("!H", hello, 3)
    assert len(hello) == 5 + length
    return hello[5:]


def same_hello(a: ClientHello, b: ClientHello) -> bool:
    """Equal in everything the framing cannot change."""
    return (a.sni, a.legacy_version, a.supported_versions, a.alpn, a.has_ech) == (
        b.sni,
        b.legacy_version,
        b.supported_versions,
        b.alpn,
        b.has_ech,
    )


PY_EXAMPLE = capture_hello("example.com", alpn=["h2", "http/1.1"])
PY_TLS12 = capture_hello("example.com", maximum_version=ssl.TLSVersion.TLSv1_2)
PY_NO_SNI = capture_hello(None)
PY_LONG = capture_hello(LONG_NAME)
SMALL = build_hello(host(b"a.example") + extension(0x002B, b"\x02\x03\x04"))

# Valid hellos the property tests draw from: captured now, captured earlier, generated.
VALID_HELLOS = [
    PY_EXAMPLE,
    PY_TLS12,
    PY_NO_SNI,
    PY_LONG,
    SMALL,
    load_hex("curl-7.88-www.example.net.hex"),
    load_hex("openssl-s_client-tls12-api.example.org.hex"),
    load_hex("python-ssl-tls13-example.com.hex"),
    load_hex("hand-ech-outer-sni.hex"),
]
# Hellos that are invalid only deep inside; mutating them must not uncover a crash either.
ALL_HELLOS = VALID_HELLOS + [
    load_hex("hand-several-server-names.hex"),
    load_hex("hand-non-host-name-type.hex"),
    load_hex("hand-duplicate-server-name.hex"),
]


def check_outcome(data: bytes, result: object) -> None:
    """The contract of parse_client_hello, for any input."""
    assert isinstance(result, ClientHello | NeedMore | Invalid), result
    if isinstance(result, Invalid):
        assert result.reason in INVALID_REASONS
    elif isinstance(result, NeedMore):
        assert result is NEED_MORE
        assert len(data) < MAX_HELLO_BYTES, "buffered past the cap and still asking for more"
    else:
        assert 0 < result.length <= min(len(data), MAX_HELLO_BYTES)
        assert parse_client_hello(data[: result.length]) == result
        if result.sni is not None:
            assert 1 <= len(result.sni) <= 255
            assert result.sni.isascii() and result.sni.isprintable() and " " not in result.sni


# --- real hellos from Python's ssl ------------------------------------------------------------

CAPTURES = [
    # id, server_hostname, capture options, expected sni, expected supported_versions
    ("short", "x.io", {}, "x.io", (TLS13, TLS12)),
    ("common", "example.com", {}, "example.com", (TLS13, TLS12)),
    ("long-242", LONG_NAME, {}, LONG_NAME, (TLS13, TLS12)),
    ("punycode", "xn--bcher-kva.example", {}, "xn--bcher-kva.example", (TLS13, TLS12)),
    ("unicode-sent-as-punycode", "bücher.example", {}, "xn--bcher-kva.example", (TLS13, TLS12)),
    ("case-kept", "Example.COM", {}, "Example.COM", (TLS13, TLS12)),
    ("trailing-dot-kept", "example.com.", {}, "example.com.", (TLS13, TLS12)),
    ("tls12-only", "example.com", {"maximum_version": ssl.TLSVersion.TLSv1_2}, "example.com", ()),
    ("tls13-only", "example.com", {"minimum_version": ssl.TLSVersion.TLSv1_3}, "example.com", (TLS13,)),
    ("no-server-hostname", None, {}, None, (TLS13, TLS12)),
    ("ip-literal-sends-no-sni", "192.0.2.1", {}, None, (TLS13, TLS12)),
]


@pytest.mark.parametrize("alpn", [None, ["h2", "http/1.1"]], ids=["no-alpn", "alpn"])
@pytest.mark.parametrize(
    ("server_hostname", "options", "sni", "versions"),
    [case[1:] for case in CAPTURES],
    ids=[case[0] for case in CAPTURES],
)
def test_python_ssl_hello(server_hostname, options, sni, versions, alpn):
    data = capture_hello(server_hostname, alpn=alpn, **options)
    assert parse_client_hello(data) == ClientHello(
        sni=sni,
        record_version=0x0301,
        legacy_version=TLS12,
        supported_versions=versions,
        alpn=tuple(alpn or ()),
        has_ech=False,
        length=len(data),
    )


# --- fixtures ---------------------------------------------------------------------------------

FIXTURE_CASES = [
    (
        "python-ssl-tls13-example.com.hex",
        ClientHello("example.com", 0x0301, TLS12, (TLS13, TLS12), ("h2", "http/1.1"), False, 517),
    ),
    (
        "curl-7.88-www.example.net.hex",
        ClientHello(
            "www.example.net", 0x0301, TLS12, (TLS13, TLS12, 0x0302, 0x0301), ("h2", "http/1.1"), False, 517
        ),
    ),
    (
        "openssl-s_client-tls12-api.example.org.hex",
        ClientHello("api.example.org", 0x0301, TLS12, (), ("h2",), False, 221),
    ),
    (
        "hand-ech-outer-sni.hex",
        ClientHello("public.example.com", 0x0301, TLS12, (TLS13,), (), True, 274),
    ),
    ("hand-several-server-names.hex", Invalid("several server_name entries")),
    ("hand-non-host-name-type.hex", Invalid("unsupported server_name type")),
    ("hand-duplicate-server-name.hex", Invalid("duplicate extension")),
]


@pytest.mark.parametrize(("name", "expected"), FIXTURE_CASES, ids=[c[0] for c in FIXTURE_CASES])
def test_fixture(name, expected):
    assert parse_client_hello(load_hex(name)) == expected


def test_every_fixture_is_in_the_table():
    assert sorted(p.name for p in FIXTURES.glob("*.hex")) == sorted(c[0] for c in FIXTURE_CASES)


# --- OpenSSL as a second opinion --------------------------------------------------------------


@pytest.fixture(scope="module")
def openssl_server():
    """Feed a hello to OpenSSL's server side; return (names it saw via SNI callback, error)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("example.com").configure_cert(context)
    seen: list[str | bytes | None] = []
    context.sni_callback = lambda _obj, name, _ctx: seen.append(name)

    def feed(data: bytes) -> tuple[list[str | bytes | None], str | None]:
        seen.clear()
        incoming = ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True)
        incoming.write(data)
        # Python cannot hand a non-ASCII name to sni_callback and reports it as unraisable;
        # keep it as the raw bytes OpenSSL accepted instead of failing the test on a warning.
        previous_hook = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: seen.append(unraisable.object)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            return list(seen), None
        except ssl.SSLError as error:
            return list(seen), error.reason or "error"
        finally:
            sys.unraisablehook = previous_hook
        return list(seen), None

    return feed


@pytest.mark.parametrize(("name", "expected"), FIXTURE_CASES, ids=[c[0] for c in FIXTURE_CASES])
def test_openssl_agrees_on_fixture(openssl_server, name, expected):
    names, error = openssl_server(load_hex(name))
    if isinstance(expected, ClientHello):
        assert names == [expected.sni]
    else:
        assert names == [] and error == "BAD_EXTENSION"


# --- framing: records and TCP segments --------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [[1], [100], [300, 100], [4], [3], [1] * 600, [2, 1, 1, 7] * 60],
    ids=["1+rest", "100+rest", "three", "split-after-header", "split-inside-header", "1-byte", "ragged"],
)
@pytest.mark.parametrize("data", [PY_EXAMPLE, PY_LONG, PY_TLS12], ids=["tls13", "long-sni", "tls12"])
def test_hello_split_over_records(data, sizes):
    whole = parse_client_hello(data)
    framed = records(message_of(data), sizes)
    result = parse_client_hello(framed)
    assert isinstance(result, ClientHello) and same_hello(result, whole)
    assert result.length == len(framed)


def test_every_prefix_needs_more():
    for data in (PY_EXAMPLE, records(message_of(PY_TLS12), [1, 2, 3, 50])):
        for cut in range(len(data)):
            assert parse_client_hello(data[:cut]) is NEED_MORE, cut
        assert isinstance(parse_client_hello(data), ClientHello)


@pytest.mark.parametrize("segment", [1, 7, 100, 1460])
def test_tcp_segments_into_a_growing_buffer(segment):
    # The proxy appends each recv() to one bytearray and parses the whole buffer again; the
    # buffer must stay growable afterwards (no memoryview may outlive the call).
    data = records(message_of(PY_EXAMPLE), [200, 1, 150])
    buffer = bytearray()
    results = []
    for start in range(0, len(data), segment):
        buffer += data[start : start + segment]
        results.append(parse_client_hello(buffer))
    assert all(r is NEED_MORE for r in results[:-1])
    assert isinstance(results[-1], ClientHello) and results[-1].sni == "example.com"


def test_bytes_after_the_hello_are_not_part_of_it():
    ccs = bytes.fromhex("140303000101")
    result = parse_client_hello(PY_EXAMPLE + ccs + b"\x17\x03\x03\x00\x05hello")
    assert isinstance(result, ClientHello) and result.length == len(PY_EXAMPLE)


def test_extra_bytes_after_the_message_inside_the_last_record_are_allowed():
    message = message_of(SMALL) + b"\x00\x00\x00\x00"
    framed = records(message, [10])
    result = parse_client_hello(framed)
    assert isinstance(result, ClientHello) and result.sni == "a.example"
    assert result.length == len(framed)
    # ...and the whole of that last record is waited for.
    assert parse_client_hello(framed[:-1]) is NEED_MORE


@pytest.mark.parametrize("content_type", [0x17, 0x15, 0x14, 0x18, 0x00])
def test_other_record_type_inside_a_split_hello(content_type):
    framed = bytearray(records(message_of(PY_EXAMPLE), [100, 100]))
    second = 5 + 100
    framed[second] = content_type
    expected = Invalid("non-handshake record inside the hello")
    assert parse_client_hello(framed) == expected
    # Decided on the type byte alone, without waiting for the rest of that record.
    assert parse_client_hello(framed[: second + 1]) == expected


def test_interleaved_change_cipher_spec_record():
    # A well-formed record of another type between two hello fragments is still refused.
    framed = records(message_of(PY_EXAMPLE), [100])
    ccs = bytes.fromhex("140303000101")
    assert parse_client_hello(framed[:105] + ccs + framed[105:]) == Invalid(
        "non-handshake record inside the hello"
    )


# --- not TLS, or not a ClientHello ------------------------------------------------------------

NOT_HELLOS = [
    ("http-request", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "not a TLS handshake record"),
    ("ssh-banner", b"SSH-2.0-OpenSSH_9.6\r\n", "not a TLS handshake record"),
    # SSLv2-compatible ClientHello: 2-byte header with the top bit set, msg_type 1.
    ("sslv2-hello", bytes.fromhex("802e0103010015000000100000030000060000040100800200800300800400800700c0"), "not a TLS handshake record"),
    ("application-data-first", bytes.fromhex("1703030005") + b"hello", "not a TLS handshake record"),
    ("alert-first", alert(DECODE_ERROR), "not a TLS handshake record"),
    ("record-version-2", bytes.fromhex("160200"), "unsupported record version"),
    ("record-version-4", bytes.fromhex("1604010005"), "unsupported record version"),
    ("record-length-0", bytes.fromhex("1603010000"), "bad record length"),
    ("record-length-2^14+1", bytes.fromhex("1603014001"), "bad record length"),
    ("server-hello", records(handshake(hello_body(None), msg_type=2)), "not a client_hello"),
    ("server-hello-type-byte-only", bytes.fromhex("160303004002"), "not a client_hello"),
    ("hello-request", records(b"\x00\x00\x00\x00"), "not a client_hello"),
    ("empty-hello-body", records(handshake(b"")), "truncated client_hello"),
    ("zeros", bytes(64), "not a TLS handshake record"),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in NOT_HELLOS], ids=[c[0] for c in NOT_HELLOS])
def test_not_a_hello(data, reason):
    assert parse_client_hello(data) == Invalid(reason)


@pytest.mark.parametrize(
    "data", [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x02", b"\x16\x03\x01\x02\x00"]
)
def test_too_short_to_tell(data):
    assert parse_client_hello(data) is NEED_MORE


def test_is_tls_start():
    assert is_tls_start(0x16)
    assert not any(is_tls_start(b) for b in range(256) if b != 0x16)


# --- every length field, lying ----------------------------------------------------------------


def test_truncated_at_every_offset_of_the_body():
    # Re-framed so the record and handshake lengths agree with the cut: what is left is a
    # complete message whose body ends early, inside one field or another. The only cut that
    # leaves a valid hello is right after compression_methods (an SSL 3.0-style hello).
    body = message_of(PY_EXAMPLE)[4:]
    no_extensions_end = 2 + 32 + 1 + 32 + 2 + 36 + 1 + 1
    assert body[no_extensions_end - 2 : no_extensions_end] == b"\x01\x00"
    for cut in range(len(body)):
        result = parse_client_hello(records(handshake(body[:cut])))
        if cut == no_extensions_end:
            assert isinstance(result, ClientHello) and result.sni is None
        else:
            assert isinstance(result, Invalid), cut


GOOD_EXTENSIONS = host(b"a.example") + extension(0x0010, b"\x00\x03\x02h2")

LIES = [
    # id, hello, reason
    ("legacy-version-2.0", build_hello(GOOD_EXTENSIONS, legacy_version=0x0200), "unsupported client version"),
    ("session-id-33", build_hello(GOOD_EXTENSIONS, session_id=bytes(33)), "session_id too long"),
    ("cipher-suites-odd", build_hello(GOOD_EXTENSIONS, cipher_suites=b"\x13\x01\x13"), "bad cipher_suites length"),
    ("cipher-suites-empty", build_hello(GOOD_EXTENSIONS, cipher_suites=b""), "bad cipher_suites length"),
    ("cipher-suites-overrun", records(handshake(hello_body(None)[:67] + b"\xff\xfe")), "truncated client_hello"),
    ("compression-empty", build_hello(GOOD_EXTENSIONS, compression=b""), "no compression methods"),
    ("extensions-length-1-byte", records(handshake(hello_body(None) + b"\x00")), "extensions length mismatch"),
    ("extensions-length-short", records(handshake(hello_body(GOOD_EXTENSIONS) + b"\x00")), "extensions length mismatch"),
    ("extensions-length-long", records(handshake(hello_body(GOOD_EXTENSIONS)[:-1])), "extensions length mismatch"),
    ("extension-header-cut", build_hello(GOOD_EXTENSIONS + b"\x00\x15\x00"), "truncated extension"),
    ("extension-overrun", build_hello(GOOD_EXTENSIONS + b"\x00\x15\x00\x05\x00"), "truncated extension"),
    ("duplicate-padding", build_hello(extension(21, b"") + GOOD_EXTENSIONS + extension(21, b"")), "duplicate extension"),
    ("duplicate-server-name", build_hello(host(b"a.example") + host(b"a.example")), "duplicate extension"),
    ("server-name-empty", build_hello(extension(0, b"")), "malformed server_name"),
    ("server-name-empty-list", build_hello(extension(0, b"\x00\x00")), "malformed server_name"),
    ("server-name-list-long", build_hello(extension(0, b"\x00\x0f\x00\x00\x09a.example")), "malformed server_name"),
    ("server-name-list-short", build_hello(extension(0, b"\x00\x0b\x00\x00\x09a.example")), "malformed server_name"),
    ("host-name-overrun", build_hello(extension(0, b"\x00\x0c\x00\x00\x0aa.example")), "malformed server_name"),
    ("two-names", build_hello(server_name((0, b"a.example"), (0, b"b.example"))), "several server_name entries"),
    ("name-then-junk", build_hello(extension(0, b"\x00\x0d\x00\x00\x09a.example\x00")), "several server_name entries"),
    ("name-type-1", build_hello(server_name((1, b"a.example"))), "unsupported server_name type"),
    ("name-type-255-first", build_hello(server_name((255, b"x"), (0, b"a.example"))), "unsupported server_name type"),
    ("host-name-empty", build_hello(host(b"")), "bad host name length"),
    ("host-name-256", build_hello(host(b"a" * 256)), "bad host name length"),
    ("host-name-nul", build_hello(host(b"allowed.example\x00.evil.example")), "bad host name characters"),
    ("host-name-utf8", build_hello(host("bücher.example".encode())), "bad host name characters"),
    ("host-name-latin1", build_hello(host(b"b\xfccher.example")), "bad host name characters"),
    ("host-name-space", build_hello(host(b"a.example evil")), "bad host name characters"),
    ("host-name-tab", build_hello(host(b"a.example\t")), "bad host name characters"),
    ("host-name-newline", build_hello(host(b"a.example\r\n")), "bad host name characters"),
    ("host-name-del", build_hello(host(b"a.example\x7f")), "bad host name characters"),
    ("alpn-empty", build_hello(extension(0x0010, b"")), "malformed alpn"),
    ("alpn-empty-list", build_hello(extension(0x0010, b"\x00\x00")), "malformed alpn"),
    ("alpn-empty-name", build_hello(extension(0x0010, b"\x00\x01\x00")), "malformed alpn"),
    ("alpn-name-overrun", build_hello(extension(0x0010, b"\x00\x03\x05h2")), "malformed alpn"),
    ("alpn-list-mismatch", build_hello(extension(0x0010, b"\x00\x04\x02h2")), "malformed alpn"),
    ("versions-empty", build_hello(extension(0x002B, b"")), "malformed supported_versions"),
    ("versions-odd", build_hello(extension(0x002B, b"\x03\x03\x04\x03")), "malformed supported_versions"),
    ("versions-mismatch", build_hello(extension(0x002B, b"\x04\x03\x04")), "malformed supported_versions"),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in LIES], ids=[c[0] for c in LIES])
def test_length_and_content_lies(data, reason):
    assert parse_client_hello(data) == Invalid(reason)


ACCEPTED = [
    # id, hello, sni, alpn
    ("no-extensions-block", build_hello(None), None, ()),
    ("empty-extensions-block", build_hello(b""), None, ()),
    ("host-name-255", build_hello(host(b"a" * 255)), "a" * 255, ()),
    ("host-name-punctuation-kept", build_hello(host(b"_srv.Example.com.")), "_srv.Example.com.", ()),
    ("unknown-extensions-skipped", build_hello(extension(0xABCD, b"xyz") + extension(0x0A0A, b"") + host(b"a.example")), "a.example", ()),
    ("alpn-binary-name", build_hello(extension(0x0010, b"\x00\x03\x02\xff\x00")), None, ("\xff\x00",)),
    ("session-id-empty", build_hello(host(b"a.example"), session_id=b""), "a.example", ()),
    ("ssl3-client-version", build_hello(host(b"a.example"), legacy_version=0x0300), "a.example", ()),
]


@pytest.mark.parametrize(("data", "sni", "alpn"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted_shapes(data, sni, alpn):
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello)
    assert (result.sni, result.alpn, result.length) == (sni, alpn, len(data))


# --- the 16 KiB cap ---------------------------------------------------------------------------


def padded_hello(total: int, sizes: list[int] | None = None) -> bytes:
    """A hello of exactly ``total`` bytes in one record (or ``sizes`` records), grown with the
    padding extension (RFC 7685) the way real clients grow theirs."""
    base = hello_body(host(b"a.example") + extension(21, b""))
    pad = total - (5 + 4 + len(base))
    data = records(handshake(hello_body(host(b"a.example") + extension(21, bytes(pad)))), sizes)
    assert sizes or len(data) == total
    return data


def test_hello_of_exactly_the_cap_is_accepted():
    data = padded_hello(MAX_HELLO_BYTES)
    result = parse_client_hello(data)
    assert isinstance(result, ClientHello) and result.length == MAX_HELLO_BYTES


def test_hello_one_byte_over_the_cap():
    data = padded_hello(MAX_HELLO_BYTES + 1)
    assert parse_client_hello(data) == Invalid("hello exceeds 16384 bytes")
    # The record header alone already says so.
    assert parse_client_hello(data[:5]) == Invalid("hello exceeds 16384 bytes")


def test_large_hello_over_several_records_is_refused_from_its_first_bytes():
    data = padded_hello(20000, [4000] * 5)
    too_big = Invalid("hello exceeds 16384 bytes")
    assert parse_client_hello(data) == too_big
    # Record header (5) + handshake header (4): the declared length cannot fit, so no waiting.
    assert parse_client_hello(data[:8]) is NEED_MORE
    assert parse_client_hello(data[:9]) == too_big


def test_one_byte_records_cannot_smuggle_past_the_cap():
    # 3004 handshake bytes in 1-byte records would take 18000 bytes. The parser cannot know
    # the client will keep the records that small (the rest could come in one record), so it
    # waits exactly as long as the rest still fits: after k records the least total is
    # 6k + 5 + (3004 - k), which passes the cap at k = 2676 -- that record's header, read in
    # full at byte 6 * 2675 + 5, ends the wait, still below MAX_HELLO_BYTES.
    data = records(message_of(padded_hello(3009)), [1] * 3004)
    too_big = Invalid("hello exceeds 16384 bytes")
    assert parse_client_hello(data) == too_big
    assert parse_client_hello(data[: 6 * 2675 + 4]) is NEED_MORE
    assert parse_client_hello(data[: 6 * 2675 + 5]) == too_big


def test_never_need_more_past_the_cap():
    # Records of junk that is never a complete message: the cap ends the wait.
    stream = bytes.fromhex("1603010004") + b"\x01\x00\x3f\xf0" + bytes.fromhex("1603014000") + bytes(16384)
    for cut in range(MAX_HELLO_BYTES - 10, len(stream)):
        assert parse_client_hello(stream[:cut]) is not NEED_MORE
    assert parse_client_hello(stream) == Invalid("hello exceeds 16384 bytes")


# --- the rest of the API ----------------------------------------------------------------------


def test_alert_bytes():
    assert alert(ACCESS_DENIED) == bytes.fromhex("15030300020231")
    assert alert(DECODE_ERROR, 0x0301) == bytes.fromhex("15030100020232")


@pytest.mark.parametrize(
    "options",
    [{}, {"maximum_version": ssl.TLSVersion.TLSv1_2}],
    ids=["tls13-client", "tls12-client"],
)
def test_clients_understand_the_access_denied_alert(options):
    # What step 9 of docs/ARCHITECTURE.md relies on: the client reports "tlsv1 alert access denied".
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for name, value in options.items():
        setattr(context, name, value)
    incoming = ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, ssl.MemoryBIO(), server_hostname="example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    incoming.write(alert(ACCESS_DENIED))
    with pytest.raises(ssl.SSLError, match="TLSV1_ALERT_ACCESS_DENIED"):
        tls.do_handshake()


def test_outcome_types():
    assert NeedMore() is NEED_MORE and repr(NEED_MORE) == "NEED_MORE"
    result = parse_client_hello(SMALL)
    with pytest.raises(AttributeError):
        result.sni = "evil.example"  # type: ignore[misc]
    assert not hasattr(result, "__dict__") and not hasattr(Invalid("x"), "__dict__")


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, lambda d: memoryview(b"junk" + d)[4:], lambda d: memoryview(d).cast("b")],
    ids=["bytes", "bytearray", "memoryview", "offset-memoryview", "signed-memoryview"],
)
def test_bytes_like_inputs(wrap):
    assert parse_client_hello(wrap(PY_EXAMPLE)) == parse_client_hello(PY_EXAMPLE)


def test_non_contiguous_memoryview():
    doubled = bytes(b for byte in PY_EXAMPLE for b in (byte, 0))
    assert parse_client_hello(memoryview(doubled)[::2]) == parse_client_hello(PY_EXAMPLE)


# --- hypothesis -------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=600).map(lambda b: b"\x16\x03" + b)))
def test_fuzz_arbitrary_bytes(data):
    check_outcome(data, parse_client_hello(data))


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(1, 64), max_size=8))
def test_fuzz_framed_handshake_bytes(payload, sizes):
    # Well-framed records around junk that starts like a client_hello: reaches the body parser.
    data = records(b"\x01" + payload, sizes)
    check_outcome(data, parse_client_hello(data))


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(ALL_HELLOS)))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set-byte"]))
        if kind == "flip" and where < len(data):
            data[where] ^= draw(st.integers(1, 255))
        elif kind == "set-byte" and where < len(data):
            data[where] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[where:]
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "delete":
            del data[where : where + draw(st.integers(1, 40))]
    return bytes(data)


@FUZZ
@given(mutated_hellos())
def test_fuzz_mutated_real_hellos(data):
    check_outcome(data, parse_client_hello(data))


@FUZZ
@given(
    st.sampled_from(VALID_HELLOS),
    st.lists(st.integers(1, 700), max_size=6),
    st.data(),
)
def test_fuzz_prefixes_of_reframed_hellos(hello, sizes, data):
    whole = parse_client_hello(hello)
    framed = records(message_of(hello), sizes)
    full = parse_client_hello(framed)
    assert isinstance(full, ClientHello) and same_hello(full, whole) and full.length == len(framed)
    cut = data.draw(st.integers(0, len(framed) - 1), label="cut")
    assert parse_client_hello(framed[:cut]) is NEED_MORE
    tail = data.draw(st.binary(max_size=64), label="tail")
    assert parse_client_hello(framed + tail) == full


@FUZZ
@given(mutated_hellos())
def test_fuzz_openssl_reads_the_same_name(openssl_server, data):
    # Whenever both parsers accept a hello, they read the same server name: the proxy judges
    # what the server will act on.
    ours = parse_client_hello(data)
    names, _ = openssl_server(data)
    if isinstance(ours, ClientHello) and names:
        assert names == [ours.sni]
