"""The request-head parser: a table of named good and bad heads, plus a bounded fuzz."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import http


def head(request_line: str, *headers: str) -> bytes:
    return ("\r\n".join([request_line, *headers]) + "\r\n\r\n").encode("latin-1")


GOOD = [
    ("connect-name", head("CONNECT api.example.com:443 HTTP/1.1", "Host: api.example.com:443"), "api.example.com", 443),
    ("connect-http10", head("CONNECT api.example.com:8443 HTTP/1.0"), "api.example.com", 8443),
    ("connect-bare-host-443", head("CONNECT api.example.com HTTP/1.1"), "api.example.com", 443),
    ("connect-uppercase", head("CONNECT API.Example.COM:443 HTTP/1.1"), "api.example.com", 443),
    ("connect-trailing-dot", head("CONNECT api.example.com.:443 HTTP/1.1"), "api.example.com", 443),
    ("connect-ipv4", head("CONNECT 10.0.0.7:5432 HTTP/1.1"), "10.0.0.7", 5432),
    ("connect-ipv6", head("CONNECT [2001:db8::1]:443 HTTP/1.1"), "2001:db8::1", 443),
    ("connect-ipv4-mapped", head("CONNECT [::ffff:10.0.0.7]:443 HTTP/1.1"), "10.0.0.7", 443),
    ("connect-port-1", head("CONNECT a.example:1 HTTP/1.1"), "a.example", 1),
    ("connect-port-65535", head("CONNECT a.example:65535 HTTP/1.1"), "a.example", 65535),
    ("connect-idna", head("CONNECT xn--bcher-kva.example:443 HTTP/1.1"), "xn--bcher-kva.example", 443),
    ("header-ows", head("CONNECT a.example:443 HTTP/1.1", "X-A:   spaced \t"), "a.example", 443),
    ("get-absolute", head("GET http://a.example/x?y=1 HTTP/1.1", "Host: a.example"), "a.example", 80),
    ("get-absolute-port", head("POST http://a.example:8080 HTTP/1.1"), "a.example", 8080),
]


@pytest.mark.parametrize("raw,host,port", [case[1:] for case in GOOD], ids=[case[0] for case in GOOD])
def test_good_heads(raw: bytes, host: str, port: int) -> None:
    request = http.parse_head(raw)
    assert request.host.name == host
    assert request.port == port


def test_absolute_form_gives_origin_form() -> None:
    request = http.parse_head(head("GET http://a.example/p/q?x=1&y=2 HTTP/1.1"))
    assert request.path == "/p/q?x=1&y=2"
    assert http.parse_head(head("GET http://a.example HTTP/1.1")).path == "/"
    assert http.parse_head(head("GET http://a.example?q HTTP/1.1")).path == "/?q"


BAD = [
    # (name, raw head, status, words the message must contain)
    ("lowercase-connect", head("connect a.example:443 HTTP/1.1"), 400, "proxy request"),
    ("double-space", head("CONNECT  a.example:443 HTTP/1.1"), 400, "single spaces"),
    ("trailing-space", head("CONNECT a.example:443 HTTP/1.1 "), 400, "request line"),
    ("tab-separator", head("CONNECT\ta.example:443 HTTP/1.1"), 400, "request line"),
    ("two-part-line", head("CONNECT a.example:443"), 400, "request line"),
    ("http2-version", head("CONNECT a.example:443 HTTP/2.0"), 505, "not supported"),
    ("garbage-version", head("CONNECT a.example:443 HTTQ/1.1"), 400, "version"),
    ("userinfo", head("CONNECT user@a.example:443 HTTP/1.1"), 400, "userinfo"),
    ("userinfo-password", head("CONNECT u:p@a.example:443 HTTP/1.1"), 400, "userinfo"),
    ("port-zero", head("CONNECT a.example:0 HTTP/1.1"), 400, "port"),
    ("port-65536", head("CONNECT a.example:65536 HTTP/1.1"), 400, "port"),
    ("port-negative", head("CONNECT a.example:-1 HTTP/1.1"), 400, "port"),
    ("port-empty", head("CONNECT a.example: HTTP/1.1"), 400, "port"),
    ("port-plus", head("CONNECT a.example:+443 HTTP/1.1"), 400, "port"),
    ("port-huge", head("CONNECT a.example:4430000000 HTTP/1.1"), 400, "port"),
    ("ipv4-decimal", head("CONNECT 2130706433:443 HTTP/1.1"), 400, "host"),
    ("ipv4-hex", head("CONNECT 0x7f.1:443 HTTP/1.1"), 400, "host"),
    ("ipv4-octal", head("CONNECT 012.0.0.1:443 HTTP/1.1"), 400, "host"),
    ("ipv4-octal-0177", head("CONNECT 0177.0.0.1:443 HTTP/1.1"), 400, "host"),
    ("ipv4-short", head("CONNECT 127.1:443 HTTP/1.1"), 400, "host"),
    ("ipv4-out-of-range", head("CONNECT 300.1.1.1:443 HTTP/1.1"), 400, "host"),
    ("ipv6-unbracketed", head("CONNECT 2001:db8::1:443 HTTP/1.1"), 400, "brackets"),
    ("ipv6-zone", head("CONNECT [fe80::1%25eth0]:443 HTTP/1.1"), 400, "host"),
    ("brackets-on-name", head("CONNECT [a.example]:443 HTTP/1.1"), 400, "IPv6"),
    ("empty-host", head("CONNECT :443 HTTP/1.1"), 400, "host"),
    ("nul-in-target", head("CONNECT a.exa\x00mple:443 HTTP/1.1"), 400, "control"),
    ("del-in-target", head("CONNECT a.exa\x7fmple:443 HTTP/1.1"), 400, "control"),
    ("non-ascii-target", head("CONNECT a.ex\xe4mple:443 HTTP/1.1"), 400, "non-ASCII"),
    ("underscore-ok-but-star-not", head("CONNECT *.example:443 HTTP/1.1"), 400, "host"),
    ("percent-in-host", head("CONNECT a%2eexample:443 HTTP/1.1"), 400, "host"),
    ("obs-fold", head("CONNECT a.example:443 HTTP/1.1", "X-A: 1", " folded"), 400, "folding"),
    ("space-before-colon", head("CONNECT a.example:443 HTTP/1.1", "Proxy-Authorization : Basic eDp5"), 400, "colon"),
    ("no-colon", head("CONNECT a.example:443 HTTP/1.1", "NoColonHere"), 400, "colon"),
    ("empty-name", head("CONNECT a.example:443 HTTP/1.1", ": value"), 400, "name"),
    ("nul-in-value", head("CONNECT a.example:443 HTTP/1.1", "X-A: a\x00b"), 400, "control"),
    ("cr-in-value", b"CONNECT a.example:443 HTTP/1.1\r\nX-A: a\rb\r\n\r\n", 400, "CR"),
    ("bare-lf-line", b"CONNECT a.example:443 HTTP/1.1\nX-A: b\r\n\r\n", 400, "CR"),
    ("origin-form", head("GET / HTTP/1.1", "Host: a.example"), 400, "proxy request"),
    ("asterisk-form", head("OPTIONS * HTTP/1.1"), 400, "proxy request"),
    ("https-absolute", head("GET https://a.example/ HTTP/1.1"), 400, "CONNECT"),
    ("ftp-absolute", head("GET ftp://a.example/ HTTP/1.1"), 400, "scheme"),
    ("fragment", head("GET http://a.example/#frag HTTP/1.1"), 400, "fragment"),
    ("absolute-userinfo", head("GET http://u:p@a.example/ HTTP/1.1"), 400, "userinfo"),
    ("trace-method", head("TRACE http://a.example/ HTTP/1.1"), 405, "not supported"),
    ("too-many-fields", head("CONNECT a.example:443 HTTP/1.1", *[f"X-{i}: v" for i in range(101)]), 431, "header fields"),
]


@pytest.mark.parametrize("raw,status,words", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_heads(raw: bytes, status: int, words: str) -> None:
    with pytest.raises(http.HeadError) as caught:
        http.parse_head(raw)
    assert caught.value.status == status
    assert words.lower() in caught.value.message.lower()


def test_oversized_head_is_431() -> None:
    raw = head("CONNECT a.example:443 HTTP/1.1", "X-Big: " + "a" * http.MAX_HEAD_BYTES)
    with pytest.raises(http.HeadTooLarge):
        http.parse_head(raw)


@pytest.mark.parametrize(
    "buffer,end",
    [
        (b"CONNECT a:1 HTTP/1.1\r\n", -1),
        (b"CONNECT a:1 HTTP/1.1\r\n\r\n", 24),
        (b"CONNECT a:1 HTTP/1.1\r\n\r\n\x16\x03\x01", 24),
    ],
    ids=["incomplete", "complete", "pipelined-hello"],
)
def test_find_head_end(buffer: bytes, end: int) -> None:
    assert http.find_head_end(buffer) == end


@pytest.mark.parametrize("buffer", [b"CONNECT a:1 HTTP/1.1\n\n", b"CONNECT a:1 HTTP/1.1\nHost: a\n"], ids=["lf-lf", "lf-only-lines"])
def test_find_head_end_refuses_bare_lf_early(buffer: bytes) -> None:
    with pytest.raises(http.BadRequest):
        http.find_head_end(buffer)


def auth(value: str) -> http.Request:
    return http.parse_head(head("CONNECT a.example:443 HTTP/1.1", f"Proxy-Authorization: {value}"))


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "value,key",
    [
        (basic("frontend-pod-1:anything"), "frontend-pod-1"),
        (basic("frontend-pod-1:"), "frontend-pod-1"),
        (basic("frontend-pod-1"), "frontend-pod-1"),
        (basic("k:with:colons"), "k"),
        ("basic " + base64.b64encode(b"k:x").decode(), "k"),
    ],
    ids=["user-pass", "empty-pass", "no-colon", "colons-in-pass", "lowercase-scheme"],
)
def test_credentials(value: str, key: str) -> None:
    assert http.proxy_credentials(auth(value)) == key


@pytest.mark.parametrize(
    "value",
    ["Bearer abc", "Basic !!!notbase64", basic(":password"), "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Basic"],
    ids=["bearer", "bad-base64", "empty-user", "not-utf8", "no-credentials"],
)
def test_malformed_credentials_are_value_errors(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        http.proxy_credentials(auth(value))
    assert not isinstance(caught.value, http.HeadError)


def test_missing_credentials() -> None:
    assert http.proxy_credentials(http.parse_head(head("CONNECT a.example:443 HTTP/1.1"))) is None


def test_duplicate_proxy_authorization_is_400() -> None:
    request = http.parse_head(
        head("CONNECT a.example:443 HTTP/1.1", f"Proxy-Authorization: {basic('a:x')}", f"proxy-authorization: {basic('b:x')}")
    )
    with pytest.raises(http.BadRequest, match="duplicate"):
        http.proxy_credentials(request)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes_only_parse_or_head_error(data: bytes) -> None:
    try:
        http.parse_head(data + b"\r\n\r\n")
    except http.HeadError as error:
        assert error.status in (400, 405, 431, 505)


_line_chars = st.sampled_from(list("CONNECT GEThtp:/[]@.%:0123456789abcxyz-_\t\r\n\x00\x7f\xe4"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(_line_chars, max_size=40), min_size=1, max_size=6))
def test_fuzz_structured_heads(lines: list[str]) -> None:
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        request = http.parse_head(raw)
    except http.HeadError:
        return
    # Anything accepted is well-formed: a valid port, and a host with no separators.
    assert 1 <= request.port <= 65535
    assert not any(c in request.host.name for c in " \t\r\n\x00@/")
