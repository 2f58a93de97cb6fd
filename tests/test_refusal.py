"""How refusals answer: the RFC 9209 Proxy-Status header on every HTTP refusal, made
safe whatever the reason holds, and the error type of each kind of refusal."""

from __future__ import annotations

import logging
import re

import pytest

from policy import Decision, Status
from policy.decide import REASON_AUTH_MISSING, REASON_AUTH_UNKNOWN
from proxy.refusal import MAX_DETAILS, REASON_PHRASES, Refusal, from_decision, proxy_status, response

# RFC 8941 sf-string: printable ASCII, with `"` and `\` escaped.
SF_STRING = re.compile(r'"(?:[ !#-\[\]-~]|\\["\\])*"')


def field(raw: bytes) -> str:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    values = [line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith("Proxy-Status: ")]
    assert len(values) == 1, head
    return values[0]


@pytest.mark.parametrize("status", sorted(set(REASON_PHRASES) - {200}))
def test_every_refusal_status_carries_a_registered_error_type(status: int) -> None:
    value = field(response(status, "why"))
    kind = re.fullmatch(r'egress-guard; error=([a-z_]+); details="why"', value).group(1)
    assert kind in {"http_request_error", "http_request_denied", "connection_limit_reached",
                    "destination_unavailable", "http_response_timeout"}


def test_the_200_carries_no_proxy_status() -> None:
    assert b"Proxy-Status" not in response(200)


@pytest.mark.parametrize("reason", [
    'quote " and backslash \\ inside',
    "line\r\nX-Injected: yes",
    "non-ASCII bücher.example and \x00 control",
    "x" * 5000,
])
def test_details_are_always_a_valid_sf_string(reason: str) -> None:
    value = proxy_status("http_request_error", reason)
    details = value.split("details=", 1)[1]
    assert SF_STRING.fullmatch(details), details
    assert "\r" not in value and "\n" not in value
    assert len(details) <= MAX_DETAILS * 2 + 2
    raw = response(400, reason)
    assert b"\r\nX-Injected" not in raw.split(b"\r\n\r\n", 1)[0]


def test_policy_refusals_name_their_error_type() -> None:
    forbidden = Decision(False, Status.DENIED, "forbidden address: 169.254.169.254 in 169.254.0.0/16 (link-local)")
    assert "error=destination_ip_prohibited" in field(from_decision(forbidden).answer(False))
    denied = Decision(False, Status.DENIED, "destination not allowed")
    assert "error=http_request_denied" in field(from_decision(denied).answer(False))


def test_missing_credentials_are_debug_and_unknown_keys_info() -> None:
    missing = from_decision(Decision(False, Status.AUTH_REQUIRED, REASON_AUTH_MISSING))
    unknown = from_decision(Decision(False, Status.AUTH_REQUIRED, REASON_AUTH_UNKNOWN))
    assert missing.http == unknown.http == 407
    assert missing.level == logging.DEBUG and unknown.level == logging.INFO
    assert b'Proxy-Authenticate: Basic realm="egress-guard"' in missing.answer(False)


def test_a_refusal_inside_the_tunnel_to_an_http_client_is_an_http_403() -> None:
    refusal = from_decision(Decision(False, Status.DENIED, "tls required"), established=True)
    assert refusal.answer(True) == b""
    refusal.inner_http = True
    raw = refusal.answer(True)
    assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert field(raw) == 'egress-guard; error=http_request_denied; details="tls required"'
    assert Refusal(Status.DENIED, "x", alert=49).answer(True) == b"\x15\x03\x03\x00\x02\x02\x31"
