"""The remembered verdicts of `policy.judge` (Policy.verdicts) and parses of
`wire.http.parse_head`: a remembered answer must be exactly the one working it out
gives, for any sequence of requests, and must hold no API key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import Question, load_policy_file, parse_host
from policy import decide as decide_module
from policy.decide import _judge, judge
from wire import http

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "policies"
POLICY_FILE = FIXTURES / "full.yaml"

KEYS = ["web-key-1", "batch-key-1", "canary-key-1", "hashed-secret-1", "unknown-key", None]
HOSTS = ["api.example.com", "x.cdn.example.com", "pay.example.com", "a.corp.example", "evil.example.net",
         "storage.googleapis.com", "169.254.169.254", "10.0.0.9", "192.168.1.100", "2001:db8::1", "bücher.example"]
PORTS = [443, 80, 5432, 8050]
ADDRESSES = [ipaddress.ip_address(text) for text in
             ("93.184.216.34", "127.0.0.1", "169.254.169.254", "10.0.0.9", "192.168.1.100", "2001:db8::1", "::1")]
SNIS = [None, "api.example.com", "x.cdn.example.com", "evil.example.net", "API.EXAMPLE.COM.", "bad_name!"]

requests = st.tuples(
    st.sampled_from(KEYS), st.sampled_from(HOSTS), st.sampled_from(PORTS), st.booleans(),
    st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True).map(tuple),
    st.sampled_from([False, True]), st.sampled_from(SNIS),
)
# Near neighbours: requests that share all but one or two facts are where a memory keyed
# on too little would answer one with the other's verdict.
FIELDS = (KEYS, HOSTS, PORTS, [False, True], None, [False, True], SNIS)
PUBLIC = ADDRESSES[0]
# Requests every check lets through: the ones whose verdicts are remembered.
ALLOWED = [
    ("web-key-1", "api.example.com", 443, False, (PUBLIC,), True, "api.example.com"),
    ("hashed-secret-1", "x.cdn.example.com", 443, False, (PUBLIC,), True, "x.cdn.example.com"),
    ("web-key-1", "10.0.0.9", 5432, False, (ADDRESSES[3],), True, None),
    ("web-key-1", "192.168.1.100", 443, False, (ADDRESSES[4],), True, None),
    ("batch-key-1", "storage.googleapis.com", 443, False, (PUBLIC,), False, None),
    ("batch-key-1", "169.254.169.254", 80, False, (ADDRESSES[2],), False, None),
    ("canary-key-1", "api.example.com", 443, False, (PUBLIC,), True, "evil.example.net"),
    ("web-key-1", "api.example.com", 443, True, (PUBLIC,), False, None),
]


@st.composite
def neighbours(draw: st.DrawFn) -> list[tuple]:
    base = draw(st.one_of(requests, st.sampled_from(ALLOWED)))
    out = [base]
    for _ in range(draw(st.integers(1, 8))):
        varied = list(draw(st.sampled_from(out)))
        for index in draw(st.lists(st.integers(0, 6), min_size=1, max_size=2)):
            choices = FIELDS[index]
            varied[index] = (draw(st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True).map(tuple))
                             if choices is None else draw(st.sampled_from(choices)))
        out.append(tuple(varied))
    return out


def same(a: decide_module.Verdict, b: decide_module.Verdict) -> None:
    assert a == b  # every field: identity, question, decisions, refusal, rule, reported, status, reason


def chain(policy, judged, key, host, port, http_request, addresses, tls, sni):
    """The live path's three questions (head, then addresses, then the first bytes), each
    continuing from the verdict before, as proxy/admission.py and egress_guard.py ask them."""
    target = parse_host(host)
    first = judged(policy, key, Question(target, port, http_request), None, None, ())
    if first.refusal is not None or first.identity is None:
        return [first]
    second = judged(policy, key, Question(target, port, http_request, addresses), first.identity, first, ())
    if second.refusal is not None:
        return [first, second]
    third = judged(policy, key, Question(target, port, http_request, addresses[:1], tls, sni if tls else None),
                   first.identity, second, ())
    return [first, second, third]


def remembered(policy, key, question, identity, prior, certificate):
    return judge(policy, key, question, identity, prior, certificate)


def worked_out(policy, key, question, identity, prior, certificate):
    return _judge(policy, key, question, identity, prior, certificate)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(requests, min_size=1, max_size=12), neighbours()))
def test_remembered_verdicts_are_the_verdicts_judging_gives(sequence) -> None:
    policy = load_policy_file(POLICY_FILE)  # a fresh snapshot: an empty memory per example
    fresh = load_policy_file(POLICY_FILE)
    for request in sequence * 2:  # every request asked twice: the second time from memory
        got = chain(policy, remembered, *request)
        expected = chain(fresh, worked_out, *request)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert (a.identity.name if a.identity else None) == (b.identity.name if b.identity else None)
            assert (a.status, a.reason, a.refusal, a.reported) == (b.status, b.reason, b.refusal, b.reported)
            assert (a.rule.text if a.rule else None) == (b.rule.text if b.rule else None)
            assert a.decisions == b.decisions or [d[:3] for d in a.decisions] == [d[:3] for d in b.decisions]


def test_refusals_are_never_remembered_and_no_key_is_held() -> None:
    policy = load_policy_file(POLICY_FILE)
    host = parse_host("evil.example.net")
    refused = judge(policy, "web-key-1", Question(host, 443))
    assert refused.refusal is not None
    unknown = judge(policy, "unknown-key", Question(parse_host("api.example.com"), 443))
    assert unknown.identity is None
    assert policy.verdicts == {}
    allowed = judge(policy, "web-key-1", Question(parse_host("api.example.com"), 443))
    assert allowed.refusal is None and len(policy.verdicts) == 1
    assert judge(policy, "web-key-1", Question(parse_host("api.example.com"), 443)) is allowed

    def strings(value: object):
        if isinstance(value, (tuple, list)):
            for item in value:
                yield from strings(item)
        elif isinstance(value, (str, bytes)):
            yield value

    held = [text for facts in policy.verdicts for text in strings(facts)]
    for key in KEYS:
        if key is not None:
            assert all(key not in (text.decode("latin-1") if isinstance(text, bytes) else text) for text in held)


def test_a_known_key_and_a_wrong_key_for_the_same_destination_do_not_share_an_answer() -> None:
    policy = load_policy_file(POLICY_FILE)
    question = Question(parse_host("api.example.com"), 443)
    assert judge(policy, "web-key-1", question).refusal is None
    for key in ("web-key-2", "WEB-KEY-1", "web-key-1 ", None):
        verdict = judge(policy, key, question)
        assert verdict.identity is None and verdict.status == "auth_required", key
    # explain's --identity (no key) is judged as that identity only.
    batch = policy.identities["batch"]
    assert judge(policy, None, question, batch).refusal is not None


def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decide_module, "VERDICTS_KEPT", 8)
    policy = load_policy_file(POLICY_FILE)
    for number in range(50):
        verdict = judge(policy, "web-key-1", Question(parse_host(f"h{number}.cdn.example.com"), 443))
        assert verdict.refusal is None
        assert len(policy.verdicts) <= 8
    again = judge(policy, "web-key-1", Question(parse_host("h49.cdn.example.com"), 443))
    assert again.rule is not None and again.rule.text == "*.cdn.example.com"


def test_a_reloaded_policy_starts_with_an_empty_memory() -> None:
    first = load_policy_file(POLICY_FILE)
    judge(first, "web-key-1", Question(parse_host("api.example.com"), 443))
    assert first.verdicts
    assert load_policy_file(POLICY_FILE).verdicts == {}


# -- parse_head ---------------------------------------------------------------------------------


def head(target: str, key: str | None = "k", extra: str = "") -> bytes:
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    if key is not None:
        import base64

        lines.append("Proxy-Authorization: Basic " + base64.b64encode(f"{key}:".encode()).decode())
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_the_same_head_is_parsed_once_and_its_key_read_once() -> None:
    data = head("api.example.com:443", "key-one")
    first = http.parse_head(data)
    assert http.parse_head(bytes(data)) is first  # equal bytes, another object: still remembered
    assert http.proxy_credentials(first) == "key-one"
    assert http.proxy_credentials(http.parse_head(data)) == "key-one"
    other = http.parse_head(head("api.example.com:443", "key-two"))
    assert other is not first and http.proxy_credentials(other) == "key-two"


def test_bad_heads_and_bad_credentials_are_refused_every_time() -> None:
    bad = b"CONNECT api.example.com:443 HTTP/1.1\r\nHost : x\r\n\r\n"
    for _ in range(3):
        with pytest.raises(http.BadRequest):
            http.parse_head(bad)
    duplicated = http.parse_head(head("api.example.com:443", "k", "Proxy-Authorization: Basic eDo="))
    for _ in range(3):
        with pytest.raises(http.BadRequest):
            http.proxy_credentials(duplicated)
    not_basic = http.parse_head(b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Bearer x\r\n\r\n")
    for _ in range(3):
        with pytest.raises(ValueError, match="not Basic"):
            http.proxy_credentials(not_basic)


def test_large_heads_are_not_remembered_and_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    large = head("api.example.com:443", "k", "X-Pad: " + "a" * http.MEMO_HEAD_BYTES)
    assert http.parse_head(large) is not http.parse_head(large)
    monkeypatch.setattr(http, "MEMO_HEADS", 4)
    for number in range(20):
        http.parse_head(head(f"h{number}.example.com:443", f"key-{number}"))
        assert len(http._parsed) <= 4  # noqa: SLF001
        assert len(http._remembered) <= 4  # noqa: SLF001
    request = http.parse_head(head("h19.example.com:443", "key-19"))
    assert http.proxy_credentials(request) == "key-19"
    assert len(http._credentials) <= 4  # noqa: SLF001


def test_release_empties_big_temporaries_item_by_item() -> None:
    from policy.model import Identity, release
    from policy.destinations import parse_destination

    rules = [parse_destination(f"h{number}.example.com") for number in range(1000)]
    items, seen, index = list(range(10)), set(range(10)), {n: n for n in range(10)}
    release(items, seen, index)
    assert items == [] and seen == set() and index == {}
    identity = Identity(name="many", rules=rules)
    release(rules)
    assert rules == []  # the caller's list is emptied; the identity keeps what it needs
    assert identity.rule_count == 1000
    assert identity.match(parse_host("h999.example.com"), 443).text == "h999.example.com"
