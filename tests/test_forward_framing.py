"""Plain-HTTP forwarding, the pure part (`wire.message`): request and response framing
(the smuggling shapes), the chunked-body parser, hop-by-hop stripping and the heads each
side gets; and the `allow_http` decision (`policy.decide_http`)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import http, message
from wire.message import CHUNKED, NO_BODY, UNTIL_CLOSE, ChunkedBody, ChunkError, Framing, FramingError


def request(request_line: str, *headers: str) -> http.Request:
    return http.parse_head(("\r\n".join([request_line, *headers]) + "\r\n\r\n").encode("latin-1"))


def post(*headers: str, version: str = "HTTP/1.1") -> http.Request:
    return request(f"POST http://origin.example/upload {version}", *headers)


# -- request framing -------------------------------------------------------------

REQUEST_FRAMING = [
    ("no-body", post(), NO_BODY),
    ("length", post("Content-Length: 5"), Framing("length", 5)),
    ("length-zero", post("Content-Length: 0"), NO_BODY),
    ("length-leading-zeros", post("Content-Length: 007"), Framing("length", 7)),
    ("chunked", post("Transfer-Encoding: chunked"), CHUNKED),
    ("chunked-mixed-case", post("Transfer-Encoding: Chunked"), CHUNKED),
    ("gzip-then-chunked", post("Transfer-Encoding: gzip, chunked"), CHUNKED),
    ("http10-length", post("Content-Length: 3", version="HTTP/1.0"), Framing("length", 3)),
]


@pytest.mark.parametrize("req,expected", [c[1:] for c in REQUEST_FRAMING], ids=[c[0] for c in REQUEST_FRAMING])
def test_request_framing(req: http.Request, expected: Framing) -> None:
    assert message.request_framing(req) == expected


SMUGGLING = [
    # (name, request, words the 400 message must contain)
    ("cl-and-te", post("Content-Length: 5", "Transfer-Encoding: chunked"), "both"),
    ("te-and-cl", post("Transfer-Encoding: chunked", "Content-Length: 5"), "both"),
    ("duplicate-cl-equal", post("Content-Length: 5", "Content-Length: 5"), "more than one Content-Length"),
    ("duplicate-cl-differing", post("Content-Length: 5", "Content-Length: 6"), "more than one Content-Length"),
    ("cl-comma-list", post("Content-Length: 5, 5"), "invalid Content-Length"),
    ("cl-plus-sign", post("Content-Length: +5"), "invalid Content-Length"),
    ("cl-minus-sign", post("Content-Length: -1"), "invalid Content-Length"),
    ("cl-hex", post("Content-Length: 0x10"), "invalid Content-Length"),
    ("cl-empty", post("Content-Length: "), "invalid Content-Length"),
    ("cl-inner-space", post("Content-Length: 1 0"), "invalid Content-Length"),
    ("cl-huge", post("Content-Length: " + "9" * 40), "invalid Content-Length"),
    ("te-gzip", post("Transfer-Encoding: gzip"), "end with chunked"),
    ("te-chunked-then-gzip", post("Transfer-Encoding: chunked, gzip"), "end with chunked"),
    ("te-chunked-twice", post("Transfer-Encoding: chunked, chunked"), "more than once"),
    ("te-two-lines", post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), "more than one Transfer-Encoding"),
    ("te-two-lines-gzip", post("Transfer-Encoding: gzip", "Transfer-Encoding: chunked"), "more than one Transfer-Encoding"),
    ("te-identity", post("Transfer-Encoding: identity"), "end with chunked"),
    ("te-empty", post("Transfer-Encoding: "), "malformed Transfer-Encoding"),
    ("te-empty-element", post("Transfer-Encoding: gzip,,chunked"), "malformed Transfer-Encoding"),
    ("te-with-parameter", post("Transfer-Encoding: chunked;q=1"), "malformed Transfer-Encoding"),
    ("te-quoted", post('Transfer-Encoding: "chunked"'), "malformed Transfer-Encoding"),
    ("te-on-http10", post("Transfer-Encoding: chunked", version="HTTP/1.0"), "HTTP/1.0"),
]


@pytest.mark.parametrize("req,words", [c[1:] for c in SMUGGLING], ids=[c[0] for c in SMUGGLING])
def test_smuggling_shapes_are_refused(req: http.Request, words: str) -> None:
    with pytest.raises(FramingError) as refused:
        message.request_framing(req)
    assert words in str(refused.value)


# The head parser refuses these before framing is even looked at (issue 6 item 4).
HEAD_SHAPES = [
    ("space-before-colon", b"POST http://o.example/ HTTP/1.1\r\nContent-Length : 5\r\n\r\n"),
    ("obs-fold", b"POST http://o.example/ HTTP/1.1\r\nX-A: 1\r\n chunked\r\n\r\n"),
    ("bare-lf", b"POST http://o.example/ HTTP/1.1\nContent-Length: 5\r\n\r\n"),
    ("extra-space", b"POST  http://o.example/ HTTP/1.1\r\n\r\n"),
    ("te-vertical-tab", b"POST http://o.example/ HTTP/1.1\r\nTransfer-Encoding: \x0bchunked\r\n\r\n"),
]


@pytest.mark.parametrize("raw", [c[1] for c in HEAD_SHAPES], ids=[c[0] for c in HEAD_SHAPES])
def test_malformed_heads_never_reach_framing(raw: bytes) -> None:
    with pytest.raises(http.HeadError) as refused:
        http.find_head_end(raw)
        http.parse_head(raw)
    assert refused.value.status == 400


# -- response framing --------------------------------------------------------------

RESPONSE_FRAMING = [
    ("length", "GET", 200, [("Content-Length", "12")], Framing("length", 12)),
    ("length-repeated-equal", "GET", 200, [("Content-Length", "12, 12")], Framing("length", 12)),
    ("chunked", "GET", 200, [("Transfer-Encoding", "chunked")], CHUNKED),
    ("te-wins-over-cl", "GET", 200, [("Content-Length", "3"), ("Transfer-Encoding", "chunked")], CHUNKED),
    ("te-not-chunked", "GET", 200, [("Transfer-Encoding", "gzip")], UNTIL_CLOSE),
    ("nothing", "GET", 200, [], UNTIL_CLOSE),
    ("head", "HEAD", 200, [("Content-Length", "12")], NO_BODY),
    ("no-content", "GET", 204, [("Content-Length", "12")], NO_BODY),
    ("not-modified", "GET", 304, [("Transfer-Encoding", "chunked")], NO_BODY),
    ("interim", "POST", 100, [], NO_BODY),
]


@pytest.mark.parametrize("method,status,headers,expected", [c[1:] for c in RESPONSE_FRAMING],
                         ids=[c[0] for c in RESPONSE_FRAMING])
def test_response_framing(method: str, status: int, headers: list, expected: Framing) -> None:
    assert message.response_framing(method, status, tuple(headers)) == expected


@pytest.mark.parametrize("headers", [
    [("Content-Length", "3"), ("Content-Length", "4")],
    [("Content-Length", "3, 4")],
    [("Content-Length", "-3")],
    [("Content-Length", "abc")],
], ids=["conflicting-lines", "conflicting-list", "negative", "text"])
def test_bad_response_lengths(headers: list) -> None:
    with pytest.raises(FramingError):
        message.response_framing("GET", 200, tuple(headers))


# -- the chunked body parser -------------------------------------------------------

CHUNKS_OK = [
    ("one-chunk", b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("two-chunks", b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
    ("upper-hex", b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    ("leading-zeros", b"0005\r\nhello\r\n000\r\n\r\n", b"hello"),
    ("extension", b"5;name=value\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("extension-no-value", b"5;flag\r\nhello\r\n0;last\r\n\r\n", b"hello"),
    ("extension-quoted", b'5;n="a \\" b"\r\nhello\r\n0\r\n\r\n', b"hello"),
    ("extension-bws", b"5 ; n = v\r\nhello\r\n0\r\n\r\n", b"hello"),
    ("trailers", b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nX-Other:  2\r\n\r\n", b"hello"),
    ("empty-body", b"0\r\n\r\n", b""),
    ("data-with-crlf-inside", b"4\r\n\r\n\r\n\r\n0\r\n\r\n", b"\r\n\r\n"),
]


@pytest.mark.parametrize("body,data", [c[1:] for c in CHUNKS_OK], ids=[c[0] for c in CHUNKS_OK])
def test_chunked_bodies(body: bytes, data: bytes) -> None:
    after = b"GET http://next.example/ HTTP/1.1\r\n\r\n"
    parser, pieces = ChunkedBody(), []
    used = parser.feed(body + after, pieces)
    assert parser.done
    assert used == len(body)
    assert b"".join(pieces) == data


@pytest.mark.parametrize("body,data", [c[1:] for c in CHUNKS_OK], ids=[c[0] for c in CHUNKS_OK])
def test_chunked_bodies_fed_byte_by_byte(body: bytes, data: bytes) -> None:
    parser, pieces, used = ChunkedBody(), [], 0
    for index in range(len(body)):
        assert not parser.done
        used += parser.feed(body[index:index + 1], pieces)
    assert parser.done and used == len(body)
    assert b"".join(pieces) == data
    assert parser.feed(b"more") == 0


CHUNKS_BAD = [
    ("bad-hex", b"5g\r\nhello\r\n0\r\n\r\n", "chunk size"),
    ("hex-prefix", b"0x5\r\nhello\r\n0\r\n\r\n", "chunk size"),
    ("negative", b"-5\r\nhello\r\n0\r\n\r\n", "chunk size"),
    ("empty-size", b"\r\nhello\r\n0\r\n\r\n", "chunk size"),
    ("space-before-size", b" 5\r\nhello\r\n0\r\n\r\n", "chunk size"),
    ("bare-lf-size", b"5\nhello\r\n0\r\n\r\n", "bare LF"),
    ("bare-lf-after-data", b"5\r\nhello\n0\r\n\r\n", "CRLF"),
    ("missing-crlf-after-data", b"5\r\nhelloX\r\n0\r\n\r\n", "CRLF"),
    ("data-longer-than-size", b"3\r\nhello\r\n0\r\n\r\n", "CRLF"),
    ("bare-cr-in-size", b"5\rX\r\nhello\r\n0\r\n\r\n", "chunk size"),
    ("huge-size", b"1" + b"0" * 16 + b"\r\n", "chunk size"),
    ("bad-extension", b"5;\r\nhello\r\n0\r\n\r\n", "chunk size"),
    ("extension-control", b"5;a=\x01\r\nhello\r\n0\r\n\r\n", "chunk size"),
    ("bare-lf-last-chunk", b"0\n\r\n", "bare LF"),
    ("bare-lf-trailer", b"0\r\nX-A: 1\n\r\n", "bare LF"),
    ("bare-lf-end", b"0\r\n\n", "bare LF"),
    ("trailer-no-colon", b"0\r\nnot a field\r\n\r\n", "trailer"),
    ("trailer-folded", b"0\r\nX-A: 1\r\n 2\r\n\r\n", "trailer"),
    ("size-line-too-long", b"5;" + b"a" * 5000, "too long"),
    ("trailers-too-large", b"0\r\n" + b"X-A: " + b"a" * 20000, "too large"),
]


@pytest.mark.parametrize("body,words", [c[1:] for c in CHUNKS_BAD], ids=[c[0] for c in CHUNKS_BAD])
def test_malformed_chunked_bodies(body: bytes, words: str) -> None:
    with pytest.raises(ChunkError) as refused:
        ChunkedBody().feed(body)
    assert words in str(refused.value)


def test_huge_but_valid_size_only_counts() -> None:
    parser = ChunkedBody()
    assert parser.feed(b"ffffffffffffffff\r\n" + b"x" * 1000) == 1018
    assert parser.remaining == 0xFFFFFFFFFFFFFFFF - 1000 and not parser.done


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=40), max_size=8), st.data())
def test_any_chunking_and_any_split_round_trip(chunks: list[bytes], data: st.DataObject) -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=6)))
    parser, pieces, used, start = ChunkedBody(), [], 0, 0
    for cut in [*cuts, len(body)]:
        used += parser.feed(body[start:cut], pieces)
        start = cut
    assert parser.done and used == len(body)
    assert b"".join(pieces) == b"".join(chunks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_chunk_parser_consumes_or_refuses(data: bytes) -> None:
    parser = ChunkedBody()
    try:
        used = parser.feed(data)
    except ChunkError:
        return
    assert 0 <= used <= len(data)
    assert parser.done or used == len(data)


# -- headers ------------------------------------------------------------------------


def lines(head: bytes) -> list[str]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].decode("latin-1").split("\r\n")


def test_origin_head_is_origin_form_without_hop_by_hop() -> None:
    req = request(
        "GET http://Origin.Example:8080/p/a?q=1&r=2 HTTP/1.1",
        "Host: evil.example",
        "Proxy-Authorization: Basic c2VjcmV0Ong=",
        "Proxy-Connection: Keep-Alive",
        "Connection: keep-alive, X-Secret-Hop",
        "Keep-Alive: timeout=5",
        "TE: trailers",
        "Trailer: X-Sum",
        "Upgrade: websocket",
        "Proxy-Authenticate: Basic",
        "X-Secret-Hop: drop me",
        "Accept: */*",
        "X-Kept: yes",
    )
    sent = lines(message.origin_head(req))
    assert sent[0] == "GET /p/a?q=1&r=2 HTTP/1.1"
    assert sent[1] == "Host: origin.example:8080"
    assert sent[2:] == ["Accept: */*", "X-Kept: yes", "Via: 1.1 egress-guard", "Connection: close"]


def test_connection_cannot_remove_framing_or_host() -> None:
    req = post("Connection: Content-Length, Transfer-Encoding, Host", "Content-Length: 3")
    sent = lines(message.origin_head(req))
    assert "Content-Length: 3" in sent
    assert sent[1] == "Host: origin.example"


def test_transfer_encoding_is_kept_for_the_relayed_chunks() -> None:
    sent = lines(message.origin_head(post("Transfer-Encoding: chunked")))
    assert "Transfer-Encoding: chunked" in sent


@pytest.mark.parametrize("target,host", [
    ("http://origin.example/", "origin.example"),
    ("http://origin.example:80/", "origin.example"),
    ("http://origin.example:8080/", "origin.example:8080"),
    ("http://ORIGIN.example./", "origin.example"),
    ("http://10.0.0.7:81/", "10.0.0.7:81"),
    ("http://[2001:db8::1]/", "[2001:db8::1]"),
    ("http://[2001:db8::1]:8080/", "[2001:db8::1]:8080"),
])
def test_host_is_the_url_authority(target: str, host: str) -> None:
    sent = lines(message.origin_head(request(f"GET {target} HTTP/1.1", "Host: other.example")))
    assert sent[1] == f"Host: {host}"
    assert sum(line.lower().startswith("host:") for line in sent) == 1


@pytest.mark.parametrize("target,origin_form", [
    ("http://o.example", "/"),
    ("http://o.example/", "/"),
    ("http://o.example?x", "/?x"),
])
def test_origin_target(target: str, origin_form: str) -> None:
    assert message.origin_target(request(f"GET {target} HTTP/1.1")) == origin_form


def test_options_without_path_is_asterisk() -> None:
    assert message.origin_target(request("OPTIONS http://o.example:8080 HTTP/1.1")) == "*"
    assert message.origin_target(request("OPTIONS http://o.example/x HTTP/1.1")) == "/x"


def test_http10_request_is_sent_as_http11_with_its_via_version() -> None:
    sent = lines(message.origin_head(request("GET http://o.example/ HTTP/1.0")))
    assert sent[0] == "GET / HTTP/1.1"
    assert "Via: 1.0 egress-guard" in sent


PERSISTENCE = [
    ("http11-default", "HTTP/1.1", [], True),
    ("http11-close", "HTTP/1.1", ["Connection: close"], False),
    ("http11-close-in-list", "HTTP/1.1", ["Connection: TE, Close"], False),
    ("http11-proxy-connection-close", "HTTP/1.1", ["Proxy-Connection: close"], False),
    ("http10-default", "HTTP/1.0", [], False),
    ("http10-keep-alive", "HTTP/1.0", ["Connection: Keep-Alive"], True),
    ("http10-proxy-connection-keep-alive", "HTTP/1.0", ["Proxy-Connection: keep-alive"], True),
]


@pytest.mark.parametrize("version,headers,expected", [c[1:] for c in PERSISTENCE], ids=[c[0] for c in PERSISTENCE])
def test_client_persistence(version: str, headers: list[str], expected: bool) -> None:
    assert message.wants_persistence(request(f"GET http://o.example/ {version}", *headers)) is expected


# -- response heads -----------------------------------------------------------------

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Hop\r\n"
            b"Keep-Alive: timeout=5\r\nX-Hop: 1\r\nProxy-Authenticate: Basic\r\nSet-Cookie: a=1\r\n"
            b"Set-Cookie: b=2\r\n\r\n")


def test_parse_response_head() -> None:
    response = message.parse_response_head(RESPONSE)
    assert (response.version, response.status, response.reason) == ("1.1", 200, "OK")
    assert response.get("set-cookie") == ["a=1", "b=2"]


@pytest.mark.parametrize("raw,status,reason", [
    (b"HTTP/1.0 404 Not Found\n\n", 404, "Not Found"),
    (b"HTTP/1.1 204\r\n\r\n", 204, ""),
    (b"HTTP/1.1 200 \r\nX: y\n\r\n", 200, ""),
])
def test_parse_lenient_response_line_ends(raw: bytes, status: int, reason: str) -> None:
    response = message.parse_response_head(raw)
    assert (response.status, response.reason) == (status, reason)


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: 1\rX-B: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 99 Low\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"\r\n\r\n",
], ids=["space-before-colon", "obs-fold", "bare-cr", "nul", "http2", "status-99", "status-2000", "icy", "empty"])
def test_malformed_response_heads(raw: bytes) -> None:
    with pytest.raises(FramingError):
        message.parse_response_head(raw)


@pytest.mark.parametrize("buffer,end", [
    (b"HTTP/1.1 200 OK\r\n\r\nbody", 19),
    (b"HTTP/1.1 200 OK\n\nbody", 17),
    (b"HTTP/1.1 200 OK\r\nA: b\r\n", -1),
    (b"HTTP/1.1 200 OK\r\nA: b\n\r\nX", 24),
])
def test_find_response_head_end(buffer: bytes, end: int) -> None:
    assert message.find_response_head_end(buffer) == end


def test_client_head_strips_hop_by_hop_and_states_our_persistence() -> None:
    response = message.parse_response_head(RESPONSE)
    sent = lines(message.client_head(response, keep_alive=False, client_version="HTTP/1.1"))
    assert sent == ["HTTP/1.1 200 OK", "Content-Length: 5", "Set-Cookie: a=1", "Set-Cookie: b=2",
                    "Via: 1.1 egress-guard", "Connection: close"]
    kept = lines(message.client_head(response, keep_alive=True, client_version="HTTP/1.1"))
    assert not any(line.lower().startswith("connection:") for line in kept)
    old = lines(message.client_head(response, keep_alive=True, client_version="HTTP/1.0"))
    assert old[-1] == "Connection: keep-alive"


def test_client_head_never_sends_both_lengths_and_dechunks_for_http10() -> None:
    response = message.parse_response_head(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
    sent = lines(message.client_head(response, keep_alive=True, client_version="HTTP/1.1"))
    assert "Transfer-Encoding: chunked" in sent and "Content-Length: 3" not in sent
    decoded = lines(message.client_head(response, keep_alive=False, client_version="HTTP/1.0", dechunk=True))
    assert not any(line.lower().startswith(("transfer-encoding", "content-length")) for line in decoded)


def test_interim_response_head_has_no_connection_field() -> None:
    interim = message.parse_response_head(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert lines(message.client_head(interim, keep_alive=False, client_version="HTTP/1.1")) == [
        "HTTP/1.1 100 Continue", "Via: 1.1 egress-guard"]


def test_allow_http_decision() -> None:
    from policy import decide_http, load_policy_text

    current = load_policy_text(
        "identities:\n"
        "  open: {api_keys: [k1], allowed_destinations: [a.example]}\n"
        "  closed: {api_keys: [k2], allowed_destinations: [a.example], allow_http: false}\n"
        "  watch: {api_keys: [k3], allowed_destinations: [a.example], allow_http: false, mode: report}\n"
    )
    assert decide_http(current.identities["open"]).allowed
    closed = decide_http(current.identities["closed"])
    assert not closed.allowed and "allow_http: false" in closed.reason and "closed" in closed.reason
    watched = decide_http(current.identities["watch"])
    assert watched.allowed and watched.status == "reported" and watched.reason.startswith("would deny")
