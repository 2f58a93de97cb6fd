"""decide_*: the decisions the proxy acts on, including report mode and SNI rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy import Decision, decide_destination, decide_plaintext, decide_sni, load_policy_file, parse_host
from policy import decide as decide_module

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "policies"
POLICY = load_policy_file(FIXTURES / "full.yaml")
WEB, BATCH, CANARY = (POLICY.identities[n] for n in ("web", "batch", "canary"))
IDENTITIES = {"web": WEB, "batch": BATCH, "canary": CANARY}
REASONS = {value for name, value in vars(decide_module).items() if name.startswith("REASON_")}

ALLOWED = (True, "allowed")
DENIED = (False, "denied")
REPORTED = (True, "reported")
SNI_MISMATCH = (False, "sni_mismatch")


def check(decision: Decision, outcome: tuple[bool, str], reason: str) -> None:
    assert (decision.allowed, decision.status) == outcome
    assert decision.reason == reason
    # Every reason is a documented constant, optionally followed by ": detail".
    assert decision.reason in REASONS or decision.reason.split(": ", 1)[0] in REASONS
    for secret in ("web-key-1", "batch-key-1", "canary-key-1", "hashed-secret-1"):
        assert secret not in decision.reason


@pytest.mark.parametrize(
    ("who", "host", "port", "outcome", "reason"),
    [
        pytest.param("web", "api.example.com", 443, ALLOWED, "destination allowed: api.example.com", id="exact"),
        pytest.param("web", "x.cdn.example.com", 443, ALLOWED, "destination allowed: *.cdn.example.com",
                     id="wildcard"),
        pytest.param("web", "10.0.0.9", 5432, ALLOWED, "destination allowed: 10.0.0.0/24:5432", id="cidr"),
        pytest.param("web", "evil.example.net", 443, DENIED, "destination not allowed", id="not-listed"),
        pytest.param("web", "pay.example.com", 80, DENIED, "destination not allowed", id="wrong-port"),
        pytest.param("web", "api.example.com", 0, DENIED, "invalid port", id="port-0"),
        pytest.param("web", "api.example.com", 65536, DENIED, "invalid port", id="port-65536"),
        pytest.param("canary", "api.example.com", 443, ALLOWED, "destination allowed: api.example.com:443",
                     id="report-allowed"),
        pytest.param("canary", "api.example.com", 80, REPORTED, "would deny: destination not allowed",
                     id="report-wrong-port"),
        pytest.param("canary", "evil.example.net", 443, REPORTED, "would deny: destination not allowed",
                     id="report-not-listed"),
        pytest.param("canary", "api.example.com", 0, DENIED, "invalid port", id="report-invalid-port"),
    ],
)
def test_decide_destination(who: str, host: str, port: int, outcome: tuple[bool, str], reason: str) -> None:
    decision = decide_destination(IDENTITIES[who], parse_host(host), port)
    check(decision, outcome, reason)
    if outcome == ALLOWED:
        assert decision.rule is not None and reason.endswith(decision.rule.text)
    else:
        assert decision.rule is None


@pytest.mark.parametrize(
    ("who", "target", "port", "sni", "outcome", "reason"),
    [
        # CONNECT to a name: SNI present, equal after normalization, and allowed.
        pytest.param("web", "api.example.com", 443, "api.example.com", ALLOWED, "sni allowed: api.example.com",
                     id="name-equal"),
        pytest.param("web", "api.example.com", 443, "API.Example.com.", ALLOWED, "sni allowed: api.example.com",
                     id="name-equal-after-normalization"),
        pytest.param("web", "a.cdn.example.com", 443, "a.cdn.example.com", ALLOWED, "sni allowed: *.cdn.example.com",
                     id="name-wildcard"),
        pytest.param("web", "bücher.example", 443, "xn--bcher-kva.example", ALLOWED, "sni allowed: bücher.example",
                     id="name-idna"),
        pytest.param("web", "api.example.com", 443, None, SNI_MISMATCH, "sni missing", id="name-no-sni"),
        pytest.param("web", "api.example.com", 443, "", SNI_MISMATCH, "sni invalid: empty host", id="name-empty-sni"),
        pytest.param("web", "api.example.com", 443, "evil.example.net", SNI_MISMATCH,
                     "sni does not match target: evil.example.net", id="name-other-sni"),
        pytest.param("web", "api.example.com", 443, "a.cdn.example.com", SNI_MISMATCH,
                     "sni does not match target: a.cdn.example.com", id="name-other-allowed-sni"),
        pytest.param("web", "api.example.com", 443, "api.example.com\x00", SNI_MISMATCH,
                     "sni invalid: control character in host", id="name-sni-with-nul"),
        pytest.param("web", "api.example.com", 443, "2130706433", SNI_MISMATCH,
                     "sni invalid: non-canonical IPv4 literal", id="name-sni-integer-ip"),
        pytest.param("web", "pay.example.com", 8443, "pay.example.com", SNI_MISMATCH,
                     "sni not allowed: pay.example.com", id="name-sni-wrong-port"),
        # CONNECT to an IP: an SNI is optional, but if present it must be allowed.
        pytest.param("web", "192.168.1.100", 443, None, ALLOWED, "no sni for ip target", id="ip-no-sni"),
        pytest.param("web", "192.168.1.100", 443, "api.example.com", ALLOWED, "sni allowed: api.example.com",
                     id="ip-allowed-sni"),
        pytest.param("web", "192.168.1.100", 443, "evil.example.net", SNI_MISMATCH,
                     "sni not allowed: evil.example.net", id="ip-unlisted-sni"),
        pytest.param("web", "192.168.1.100", 443, "pay.example.com", ALLOWED, "sni allowed: pay.example.com:443",
                     id="ip-port-rule-sni"),
        pytest.param("web", "192.168.1.100", 80, "pay.example.com", SNI_MISMATCH, "sni not allowed: pay.example.com",
                     id="ip-port-rule-sni-wrong-port"),
        pytest.param("web", "192.168.1.100", 443, "bad name", SNI_MISMATCH, "sni invalid: whitespace in host",
                     id="ip-invalid-sni"),
        pytest.param("web", "2001:db8::1", 443, "2001:db8::1", ALLOWED, "sni allowed: 2001:db8::1",
                     id="ip-literal-sni"),
        # Report mode records instead of refusing.
        pytest.param("canary", "api.example.com", 443, "api.example.com", ALLOWED,
                     "sni allowed: api.example.com:443", id="report-ok"),
        pytest.param("canary", "api.example.com", 443, "evil.example.net", REPORTED,
                     "would deny: sni does not match target: evil.example.net", id="report-mismatch"),
        pytest.param("canary", "api.example.com", 443, None, REPORTED, "would deny: sni missing",
                     id="report-missing"),
    ],
)
def test_decide_sni(
    who: str, target: str, port: int, sni: str | None, outcome: tuple[bool, str], reason: str
) -> None:
    check(decide_sni(IDENTITIES[who], parse_host(target), port, sni), outcome, reason)


@pytest.mark.parametrize(
    ("who", "outcome", "reason"),
    [
        pytest.param("web", DENIED, "tls required", id="tls-required-by-default"),
        pytest.param("batch", ALLOWED, "plaintext allowed", id="require-tls-false"),
        pytest.param("canary", REPORTED, "would deny: tls required", id="report-mode"),
    ],
)
def test_decide_plaintext(who: str, outcome: tuple[bool, str], reason: str) -> None:
    check(decide_plaintext(IDENTITIES[who]), outcome, reason)


def test_decision_is_a_frozen_value() -> None:
    decision = decide_plaintext(WEB)
    assert decision == Decision(False, "denied", "tls required", None)
    with pytest.raises(AttributeError):
        decision.allowed = True  # type: ignore[misc]


def test_authentication_is_not_relaxed_by_report_mode() -> None:
    assert POLICY.authenticate("canary-key-1") is CANARY
    assert POLICY.authenticate("canary-key-2") is None
