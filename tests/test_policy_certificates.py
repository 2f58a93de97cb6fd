"""Client certificates as credentials: the `client_certificates:` entries, their
validation, and check 1 with a certificate, a key, or both."""

from __future__ import annotations

import pytest

from policy import PolicyError, Question, Status, judge, load_policy_text, parse_host
from policy.certificates import EntryError, entries_of, parse_entry
from policy.changes import changes
from policy.decide import (
    REASON_AUTH_MISSING,
    REASON_AUTH_UNKNOWN,
    REASON_CERT_AMBIGUOUS,
    REASON_CERT_UNKNOWN,
    REASON_CREDENTIALS_DISAGREE,
)

POLICY = """
identities:
  web:
    client_certificates:
      - "uri:spiffe://cluster.local/ns/shop/sa/web"
      - "dns:Web.Shop.svc."
    allowed_destinations: ["api.example.com"]
  batch:
    api_keys: ["batch-key"]
    client_certificates: ["cn:batch-runner"]
    allowed_destinations: ["api.example.com", "files.example.com"]
  legacy:
    api_keys: ["legacy-key"]
    allowed_destinations: ["files.example.com"]
"""
QUESTION = Question(parse_host("api.example.com"), 443)


def who(certificate: tuple[str, ...] = (), key: str | None = None, question: Question = QUESTION) -> tuple[str, str]:
    verdict = judge(load_policy_text(POLICY), key, question, certificate=certificate)
    return (verdict.identity.name if verdict.identity else "-"), verdict.reason


@pytest.mark.parametrize(("text", "canonical"), [
    ("uri:spiffe://cluster.local/ns/shop/sa/web", "uri:spiffe://cluster.local/ns/shop/sa/web"),
    ("dns:Web.Shop.SVC.", "dns:web.shop.svc"),
    ("cn:Batch-Runner", "cn:Batch-Runner"),  # common names keep their case
])
def test_entries_are_canonical(text: str, canonical: str) -> None:
    assert parse_entry(text) == canonical


@pytest.mark.parametrize(("text", "problem"), [
    ("spiffe://cluster.local/ns/shop/sa/web", "must start with uri:, dns: or cn:"),
    ("URI:spiffe://x", "must start with uri:, dns: or cn:"),
    ("email:a@b.c", "must start with uri:, dns: or cn:"),
    ("dns:", "nothing after dns:"),
    ("uri:web", "a URI needs a scheme"),
    ("cn:web frontend", "whitespace or control"),
    ("cn:web\x00", "whitespace or control"),
    ("dns:" + "a" * 1100, "longer than 1024"),
    (42, "must be a string"),
])
def test_bad_entries_say_why(text: object, problem: str) -> None:
    with pytest.raises(EntryError, match=problem):
        parse_entry(text)


def test_a_certificate_proves_its_identity_without_a_key() -> None:
    assert who(("uri:spiffe://cluster.local/ns/shop/sa/web",))[0] == "web"
    assert who(("dns:web.shop.svc",))[0] == "web"  # the policy's "Web.Shop.svc." in canonical form
    assert who(("cn:batch-runner",))[0] == "batch"


def test_any_carried_name_may_match() -> None:
    assert who(("dns:unrelated.example", "cn:batch-runner"))[0] == "batch"


def test_an_unmatched_certificate_falls_back_to_the_key() -> None:
    assert who(("cn:someone-else",), "legacy-key", Question(parse_host("files.example.com"), 443))[0] == "legacy"


def test_an_unmatched_certificate_without_a_key_is_refused_naming_the_certificate() -> None:
    name, reason = who(("cn:someone-else",))
    assert name == "-"
    assert reason.startswith(REASON_CERT_UNKNOWN) and "cn:someone-else" in reason and "no API key" in reason


def test_no_credentials_at_all() -> None:
    assert who() == ("-", REASON_AUTH_MISSING)


def test_a_certificate_and_a_key_that_agree() -> None:
    assert who(("cn:batch-runner",), "batch-key")[0] == "batch"


def test_a_certificate_and_a_key_that_disagree_are_refused_never_chosen_from() -> None:
    name, reason = who(("uri:spiffe://cluster.local/ns/shop/sa/web",), "legacy-key")
    assert name == "-"
    assert reason == f"{REASON_CREDENTIALS_DISAGREE}: certificate: web, API key: legacy"
    verdict = judge(load_policy_text(POLICY), "legacy-key", QUESTION,
                    certificate=("uri:spiffe://cluster.local/ns/shop/sa/web",))
    assert verdict.status == Status.AUTH_REQUIRED


def test_a_matching_certificate_does_not_excuse_an_unknown_key() -> None:
    assert who(("cn:batch-runner",), "not-a-key") == ("-", REASON_AUTH_UNKNOWN)


def test_a_certificate_naming_two_identities_is_refused() -> None:
    name, reason = who(("uri:spiffe://cluster.local/ns/shop/sa/web", "cn:batch-runner"))
    assert name == "-"
    assert reason == f"{REASON_CERT_AMBIGUOUS}: web, batch"


def test_a_certificate_identity_is_judged_like_any_other() -> None:
    verdict = judge(load_policy_text(POLICY), None, Question(parse_host("files.example.com"), 443),
                    certificate=("dns:web.shop.svc",))
    assert verdict.identity is not None and verdict.identity.name == "web"
    assert verdict.status == Status.DENIED


def identity(body: str, name: str = "web") -> str:
    indented = "".join(f"    {line}\n" for line in body.strip().splitlines())
    return f"identities:\n  {name}:\n{indented}"


@pytest.mark.parametrize(("text", "fragments"), [
    pytest.param(identity('allowed_destinations: ["a.com"]'),
                 ("identity 'web'", "missing api_keys (or client_certificates)"), id="no-credentials"),
    pytest.param(identity('client_certificates: []\nallowed_destinations: ["a.com"]'),
                 ("identity 'web'", "missing api_keys (or client_certificates)"), id="empty-certificates"),
    pytest.param(identity('api_keys: []\nclient_certificates: []\nallowed_destinations: ["a.com"]'),
                 ("api_keys is empty", "or a client_certificates entry"), id="both-empty"),
    pytest.param(identity('client_certificates: "cn:web"\nallowed_destinations: ["a.com"]'),
                 ("client_certificates must be a list",), id="not-a-list"),
    pytest.param(identity('client_certificates: ["web"]\nallowed_destinations: ["a.com"]'),
                 ("client_certificates[0] 'web'", "must start with uri:, dns: or cn:"), id="no-kind"),
    pytest.param(identity('client_certificates: ["cn:web", "cn:web"]\nallowed_destinations: ["a.com"]'),
                 ("client_certificates[1] 'cn:web'", "same entry as client_certificates[0]"), id="twice"),
    pytest.param(identity('client_certificates: ["dns:web.svc", "dns:WEB.svc."]\nallowed_destinations: ["a.com"]'),
                 ("client_certificates[1]", "same entry as client_certificates[0]"), id="twice-canonical"),
])
def test_invalid_entries_are_rejected_precisely(text: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


def test_the_same_entry_in_two_identities_names_both() -> None:
    text = """
identities:
  web:
    client_certificates: ["uri:spiffe://cluster.local/ns/shop/sa/web"]
    allowed_destinations: ["a.com"]
  admin:
    api_keys: ["k"]
    client_certificates: ["cn:x", "uri:spiffe://cluster.local/ns/shop/sa/web"]
    allowed_destinations: ["b.com"]
"""
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text)
    assert caught.value.problems == (
        "identity 'admin': client_certificates[1] 'uri:spiffe://cluster.local/ns/shop/sa/web': also in identity "
        "'web' client_certificates[0]; a certificate must name one identity",)


def test_a_certificate_only_identity_loads() -> None:
    current = load_policy_text(POLICY)
    assert current.identities["web"].certificates == ("uri:spiffe://cluster.local/ns/shop/sa/web", "dns:web.shop.svc")
    assert current.certificates["cn:batch-runner"] == "batch"
    assert current.key_count == 2


def test_a_reload_reports_changed_certificates() -> None:
    old = load_policy_text(POLICY)
    new = load_policy_text(POLICY.replace('client_certificates: ["cn:batch-runner"]', "client_certificates: []"))
    assert "batch (client_certificates)" in changes(old, new).identities_changed


def test_entries_of_a_decoded_certificate() -> None:
    peer = {
        "subject": ((("organizationName", "Shop"),), (("commonName", "web-frontend"),)),
        "subjectAltName": (("DNS", "Web.Shop.svc"), ("URI", "spiffe://cluster.local/ns/shop/sa/web"),
                           ("IP Address", "10.0.0.1"), ("email", "a@b.c")),
        "serialNumber": "0BADC0DE",
    }
    assert entries_of(peer) == ("dns:web.shop.svc", "uri:spiffe://cluster.local/ns/shop/sa/web", "cn:web-frontend")
    assert entries_of(None) == () and entries_of({}) == ()
