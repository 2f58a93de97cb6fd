"""The `tests:` section of a policy (policy/expectations.py): validation, judging, the
failure messages, and that a failing test makes the whole file invalid."""

from __future__ import annotations

import hashlib
import textwrap

import pytest
import yaml

from policy import PolicyError, load_policy_text

# Keys of the policy below; no message may ever contain one.
WEB_KEY = "web-secret-key-1"
HASHED_KEY = "web-secret-key-2"  # stored as its SHA-256
META_KEY = "meta-secret-key"
CANARY_KEY = "canary-secret-key"
KEYS = (WEB_KEY, HASHED_KEY, META_KEY, CANARY_KEY)

POLICY = f"""
identities:
  web:
    api_keys: ["{WEB_KEY}", "sha256:{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}"]
    allowed_destinations:
      - "api.example.com:443"
      - "*.cdn.example.com"
      - "10.0.0.0/24:5432"
      - "192.168.1.100"
      - "[2001:db8::1]:443"
    allow_http: false
  meta:
    api_keys: ["{META_KEY}"]
    allowed_destinations: ["169.254.169.254:80", "metadata.example.com"]
    require_tls: false
  canary:
    api_keys: ["{CANARY_KEY}"]
    allowed_destinations: ["api.example.com:443"]
    mode: report
"""


def with_tests(*entries: dict | str, policy: str = POLICY) -> str:
    """The policy with a `tests:` section holding `entries` (mappings, or raw YAML)."""
    body = "".join(e if isinstance(e, str) else yaml.safe_dump([e], sort_keys=False) for e in entries)
    return policy + "tests:\n" + textwrap.indent(body, "  ")


def problems_of(text: str) -> tuple[str, ...]:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "p.yaml")
    error = info.value
    for key in KEYS:
        assert key not in str(error), f"an API key leaked into {error}"
    assert all("\n" not in problem for problem in error.problems), error.problems
    return error.problems


def judged(entry: dict) -> str:
    """What the policy's check list says about the test `entry`: each outcome is written
    as the expectation once, and exactly one of the two files must load."""
    passed = []
    for outcome in ("allowed", "denied"):
        try:
            load_policy_text(with_tests({**entry, "expect": outcome}), "p.yaml")
        except PolicyError as error:
            (problem,) = error.problems
            assert f"expected {outcome}, got " in problem, problem
            assert all(key not in problem for key in KEYS), problem
        else:
            passed.append(outcome)
    assert len(passed) == 1, (entry, passed)
    return passed[0]


JUDGED = [
    # (test entry without `expect`, the outcome the policy gives)
    pytest.param({"identity": "web", "destination": "api.example.com:443"}, "allowed", id="name-allowed"),
    pytest.param({"identity": "web", "destination": "api.example.com"}, "allowed", id="default-port-443"),
    pytest.param({"identity": "meta", "destination": "169.254.169.254", "http": True}, "allowed",
                 id="http-default-port-80"),
    pytest.param({"identity": "canary", "destination": "api.example.com", "http": True}, "denied",
                 id="http-default-port-80-not-443"),
    pytest.param({"identity": "web", "destination": "api.example.com:8443"}, "denied", id="other-port"),
    pytest.param({"identity": "web", "destination": "API.Example.com.:443"}, "allowed", id="normalized-name"),
    pytest.param({"identity": "web", "destination": "img.cdn.example.com:443"}, "allowed", id="wildcard"),
    pytest.param({"identity": "web", "destination": "cdn.example.com:443"}, "denied", id="wildcard-not-its-apex"),
    pytest.param({"identity": "web", "destination": "10.0.0.7:5432"}, "allowed", id="ip-in-cidr"),
    pytest.param({"identity": "web", "destination": "10.0.1.7:5432"}, "denied", id="ip-outside-cidr"),
    pytest.param({"identity": "web", "destination": "[2001:db8::1]:443"}, "allowed", id="ipv6"),
    pytest.param({"identity": "web", "destination": "[2001:db8::1]"}, "allowed", id="ipv6-default-port"),
    pytest.param({"identity": "web", "destination": "[2001:db8::1]:80"}, "denied", id="ipv6-other-port"),
    # forbidden ranges: the metadata address only for an identity that lists it
    pytest.param({"identity": "web", "destination": "169.254.169.254:80"}, "denied", id="metadata-ip-not-listed"),
    pytest.param({"identity": "meta", "destination": "169.254.169.254:80"}, "allowed", id="metadata-ip-listed"),
    pytest.param({"identity": "web", "destination": "api.example.com:443", "address": "169.254.169.254"},
                 "denied", id="name-resolving-to-metadata"),
    pytest.param({"identity": "meta", "destination": "metadata.example.com:80", "address": "169.254.169.254"},
                 "allowed", id="name-resolving-to-listed-ip"),
    pytest.param({"identity": "meta", "destination": "metadata.example.com:443", "address": "169.254.169.254"},
                 "denied", id="listed-ip-at-another-port"),
    pytest.param({"identity": "web", "destination": "api.example.com:443", "address": ["93.184.216.34", "127.0.0.1"]},
                 "denied", id="one-forbidden-address-of-several"),
    pytest.param({"identity": "web", "destination": "api.example.com:443", "address": ["93.184.216.34", "2001:db8::5"]},
                 "allowed", id="addresses-all-fine"),
    pytest.param({"identity": "web", "destination": "api.example.com:443", "address": "::ffff:127.0.0.1"},
                 "denied", id="mapped-loopback"),
    # SNI: the target name by default; an IP target carries none unless given
    pytest.param({"identity": "web", "destination": "api.example.com:443", "sni": "evil.example.com"},
                 "denied", id="sni-mismatch"),
    pytest.param({"identity": "web", "destination": "api.example.com:443", "sni": "API.example.com"},
                 "allowed", id="sni-same-name"),
    pytest.param({"identity": "web", "destination": "192.168.1.100:443"}, "allowed", id="ip-target-no-sni"),
    pytest.param({"identity": "web", "destination": "192.168.1.100:443", "sni": "evil.example.com"},
                 "denied", id="ip-target-sni-not-allowed"),
    pytest.param({"identity": "web", "destination": "192.168.1.100:443", "sni": "img.cdn.example.com"},
                 "allowed", id="ip-target-sni-allowed"),
    # plain HTTP
    pytest.param({"identity": "web", "destination": "api.example.com:443", "http": True}, "denied",
                 id="http-with-allow-http-false"),
    pytest.param({"identity": "meta", "destination": "metadata.example.com:80", "http": True}, "allowed",
                 id="http-allowed"),
    pytest.param({"identity": "meta", "destination": "metadata.example.com:80", "http": False}, "allowed",
                 id="http-false-is-connect"),
    # report mode is judged as enforcement would judge it
    pytest.param({"identity": "canary", "destination": "api.example.com:443"}, "allowed", id="report-mode-allowed"),
    pytest.param({"identity": "canary", "destination": "other.example.com:443"}, "denied", id="report-mode-would-deny"),
    pytest.param({"identity": "canary", "destination": "api.example.com:443", "sni": "other.example.com"},
                 "denied", id="report-mode-sni"),
]


@pytest.mark.parametrize(("entry", "expected"), JUDGED)
def test_a_test_is_judged_by_the_check_list(entry: dict, expected: str) -> None:
    assert judged(entry) == expected


def test_failure_message_names_the_test_expectation_outcome_and_reason() -> None:
    text = with_tests(
        {"identity": "web", "destination": "api.example.com:443", "expect": "allowed"},
        {"name": "no metadata", "identity": "meta", "destination": "169.254.169.254:80", "expect": "denied"},
    )
    assert problems_of(text) == (
        "tests[1] (no metadata): identity meta, destination 169.254.169.254:80: expected denied, got allowed "
        "(reason: destination allowed: 169.254.169.254:80)",
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param({"identity": "web", "destination": "api.example.com", "expect": "denied"},
                     "tests[0]: identity web, destination api.example.com:443: expected denied, got allowed "
                     "(reason: destination allowed: api.example.com:443)", id="allowed-names-the-rule"),
        pytest.param({"identity": "web", "destination": "evil.example.com:443", "expect": "allowed"},
                     "tests[0]: identity web, destination evil.example.com:443: expected allowed, got denied "
                     "(reason: destination not allowed)", id="refusal-reason"),
        pytest.param({"identity": "web", "destination": "api.example.com:443", "address": "127.0.0.1",
                      "expect": "allowed"},
                     "tests[0]: identity web, destination api.example.com:443: expected allowed, got denied "
                     "(reason: forbidden address: 127.0.0.1 in 127.0.0.0/8 (loopback))", id="forbidden-address"),
        pytest.param({"identity": "canary", "destination": "other.example.com", "expect": "allowed"},
                     "tests[0]: identity canary, destination other.example.com:443: expected allowed, got denied "
                     "(reason: would deny: destination not allowed; would deny: sni not allowed: other.example.com)",
                     id="report-mode-reason"),
        pytest.param({"identity": "web", "destination": "[2001:DB8::1]", "expect": "denied"},
                     "tests[0]: identity web, destination [2001:db8::1]:443: expected denied, got allowed "
                     "(reason: destination allowed: [2001:db8::1]:443)", id="ipv6-normalized"),
    ],
)
def test_failure_messages(entry: dict, message: str) -> None:
    assert problems_of(with_tests(entry)) == (message,)


def test_every_failing_test_is_one_problem_and_passing_ones_are_not_listed() -> None:
    ok = {"identity": "web", "destination": "api.example.com:443", "expect": "allowed"}
    bad = {"identity": "web", "destination": "evil.example.com:443", "expect": "allowed"}
    problems = problems_of(with_tests(ok, bad, ok, bad))
    assert [p.split(":")[0] for p in problems] == ["tests[1]", "tests[3]"]


def test_str_of_the_error_starts_with_the_source() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(with_tests({"identity": "web", "destination": "evil.example.com", "expect": "allowed"}),
                         "p.yaml")
    assert str(info.value).startswith("p.yaml: tests[0]: identity web, destination evil.example.com:443: ")
    assert info.value.position is None


# --- test_count ---------------------------------------------------------------------------------


def test_policy_counts_the_tests_it_passed() -> None:
    ok = {"identity": "web", "destination": "api.example.com:443", "expect": "allowed"}
    no = {"identity": "web", "destination": "169.254.169.254:80", "expect": "denied"}
    assert load_policy_text(POLICY).test_count == 0
    assert load_policy_text(POLICY + "tests:\n").test_count == 0  # every entry commented out
    assert load_policy_text(POLICY + "tests: []\n").test_count == 0
    assert load_policy_text(with_tests(ok)).test_count == 1
    assert load_policy_text(with_tests(ok, no, ok)).test_count == 3


def test_tests_do_not_change_the_policy() -> None:
    plain = load_policy_text(POLICY)
    tested = load_policy_text(with_tests({"identity": "web", "destination": "api.example.com", "expect": "allowed"}))
    assert sorted(tested.identities) == sorted(plain.identities)
    assert (tested.key_count, tested.destination_count) == (plain.key_count, plain.destination_count)


# --- validation ---------------------------------------------------------------------------------

GOOD = {"identity": "web", "destination": "api.example.com:443", "expect": "allowed"}

INVALID = [
    # (the tests: section, or one entry, and fragments that must all appear in one problem)
    pytest.param("{a: 1}\n", ("tests: must be a list", "not a mapping"), id="section-is-mapping"),
    pytest.param("- just text\n", ("tests[0]: must be a mapping", "not a string"), id="entry-is-string"),
    pytest.param({"destination": "a.example", "expect": "allowed"}, ("tests[0]: missing identity",), id="no-identity"),
    pytest.param({"identity": "web", "expect": "allowed"}, ("tests[0]: missing destination",), id="no-destination"),
    pytest.param({"identity": "web", "destination": "a.example"}, ("tests[0]: missing expect",), id="no-expect"),
    pytest.param({**GOOD, "adress": "10.0.0.1"}, ("tests[0]: unknown key 'adress'", "did you mean 'address'?"),
                 id="unknown-key-typo"),
    pytest.param({**GOOD, "rule": "x"}, ("tests[0]: unknown key 'rule'", "expected one of: name, identity"),
                 id="unknown-key"),
    pytest.param({**GOOD, "identity": "x"}, ("tests[0]: unknown identity 'x'",), id="unknown-identity"),
    pytest.param({**GOOD, "identity": "webb"}, ("tests[0]: unknown identity 'webb' (did you mean 'web'?)",),
                 id="unknown-identity-typo"),
    pytest.param({**GOOD, "identity": 5}, ("tests[0] identity 5: must be an identity name",), id="identity-number"),
    pytest.param({**GOOD, "identity": WEB_KEY}, ("tests[0] identity: that is an API key of identity 'web'",),
                 id="identity-is-a-key"),
    pytest.param({**GOOD, "identity": HASHED_KEY}, ("tests[0] identity: that is an API key of identity 'web'",),
                 id="identity-is-a-hashed-key"),
    pytest.param({**GOOD, "expect": "allow"}, ("tests[0] expect 'allow': must be 'allowed' or 'denied'",),
                 id="expect-allow"),
    pytest.param({**GOOD, "expect": True}, ("tests[0] expect True: must be 'allowed' or 'denied'",), id="expect-bool"),
    pytest.param({**GOOD, "expect": "reported"}, ("tests[0] expect 'reported'",), id="expect-reported"),
    pytest.param({**GOOD, "destination": "https://x/"}, ("tests[0] destination 'https://x/': a HOST:PORT, not a URL",),
                 id="destination-url"),
    pytest.param({**GOOD, "destination": 443}, ("tests[0] destination 443: must be a string",), id="destination-number"),
    pytest.param({**GOOD, "destination": "a.example:0"}, ("tests[0] destination 'a.example:0'", "invalid port"),
                 id="port-0"),
    pytest.param({**GOOD, "destination": "a.example:65536"}, ("destination 'a.example:65536'", "1 to 65535"),
                 id="port-65536"),
    pytest.param({**GOOD, "destination": "a.example:https"}, ("invalid port 'https'",), id="port-name"),
    pytest.param({**GOOD, "destination": "a.example:"}, ("invalid port ''",), id="port-empty"),
    pytest.param({**GOOD, "destination": "2001:db8::1"}, ("must be written in brackets",), id="ipv6-bare"),
    pytest.param({**GOOD, "destination": "[10.0.0.1]:443"}, ("brackets are only for IPv6",), id="brackets-v4"),
    pytest.param({**GOOD, "destination": "[2001:db8::1"}, ("unclosed '['",), id="brackets-open"),
    pytest.param({**GOOD, "destination": "[2001:db8::1]443"}, ("unexpected text after ']'",), id="brackets-junk"),
    pytest.param({**GOOD, "destination": "0x7f.1:80"}, ("destination '0x7f.1:80': non-canonical IPv4 literal",),
                 id="non-canonical-ip"),
    pytest.param({**GOOD, "destination": "*.cdn.example.com:443"}, ("wildcard '*' in host",), id="wildcard-target"),
    pytest.param({**GOOD, "destination": "user@a.example:443"}, ("userinfo",), id="userinfo"),
    pytest.param({**GOOD, "address": "db.internal"}, ("tests[0] address 'db.internal': must be an IP address",),
                 id="address-name"),
    pytest.param({**GOOD, "address": "127.1"}, ("tests[0] address '127.1': non-canonical IPv4 literal",),
                 id="address-non-canonical"),
    pytest.param({**GOOD, "address": []}, ("tests[0] address: an empty list",), id="address-empty-list"),
    pytest.param({**GOOD, "address": 10}, ("tests[0] address 10: must be an IP address or a list",),
                 id="address-number"),
    pytest.param({**GOOD, "address": ["10.0.0.1", 7]}, ("tests[0] address[1] 7: must be a string IP address",),
                 id="address-list-number"),
    pytest.param({**GOOD, "sni": ""}, ("tests[0] sni '': must be a non-empty string",), id="sni-empty"),
    pytest.param({**GOOD, "sni": ["a"]}, ("tests[0] sni ['a']",), id="sni-list"),
    pytest.param({**GOOD, "http": "yes please"}, ("tests[0] http 'yes please': must be true or false",),
                 id="http-string"),
    pytest.param({**GOOD, "http": True, "sni": "api.example.com"}, ("tests[0]: sni and http: true do not go together",),
                 id="http-with-sni"),
    pytest.param({**GOOD, "name": 5}, ("tests[0] name 5: must be a non-empty string",), id="name-number"),
    pytest.param({**GOOD, "name": "two\nlines"}, ("tests[0] name 'two\\nlines': must be one line",), id="name-newline"),
    pytest.param({**GOOD, "name": "api", "identity": "x"}, ("tests[0] (api): unknown identity 'x'",),
                 id="name-labels-problems"),
]


@pytest.mark.parametrize(("entry", "fragments"), INVALID)
def test_invalid_test_is_a_precise_problem(entry: dict | str, fragments: tuple[str, ...]) -> None:
    text = POLICY + "tests: " + entry if isinstance(entry, str) and entry.startswith("{") else with_tests(entry)
    problems = problems_of(text)
    assert any(all(f in p for f in fragments) for p in problems), problems


def test_every_problem_of_a_test_is_reported() -> None:
    entry = {"identity": "x", "destination": "https://x/", "expect": "allow", "address": ["db", "127.1"], "color": 1}
    problems = problems_of(with_tests(GOOD, entry))
    assert problems == (
        "tests[1]: unknown key 'color' (expected one of: name, identity, destination, address, sni, http, expect)",
        "tests[1]: unknown identity 'x'",
        "tests[1] destination 'https://x/': a HOST:PORT, not a URL",
        "tests[1] expect 'allow': must be 'allowed' or 'denied'",
        "tests[1] address[0] 'db': must be an IP address (what the name resolves to)",
        "tests[1] address[1] '127.1': non-canonical IPv4 literal",
    )


def test_unknown_top_level_key_suggests_tests() -> None:
    problems = problems_of(POLICY + "test: []\n")
    assert any("unknown key 'test'" in p and "did you mean 'tests'?" in p for p in problems), problems


def test_invalid_tests_are_reported_with_the_other_problems() -> None:
    broken = POLICY.replace('"192.168.1.100"', '"10.0.0.1/24"')
    problems = problems_of(with_tests({**GOOD, "expect": "allow"}, policy=broken))
    assert any("allowed_destinations[3] '10.0.0.1/24'" in p for p in problems), problems
    assert any("tests[0] expect 'allow'" in p for p in problems), problems


def test_tests_run_only_when_the_rest_of_the_policy_is_valid() -> None:
    broken = POLICY.replace('"192.168.1.100"', '"10.0.0.1/24"')
    failing = {"identity": "web", "destination": "evil.example.com", "expect": "allowed"}
    problems = problems_of(with_tests(failing, policy=broken))
    assert len(problems) == 1 and "10.0.0.1/24" in problems[0], problems
    # the same test fails once the policy is fixed
    (problem,) = problems_of(with_tests(failing))
    assert problem.startswith("tests[0]: identity web, destination evil.example.com:443: expected allowed")


def test_a_test_may_name_an_identity_that_failed_validation_without_an_unknown_identity_problem() -> None:
    broken = POLICY.replace('"192.168.1.100"', '"10.0.0.1/24"')
    problems = problems_of(with_tests(GOOD, policy=broken))
    assert not any("unknown identity" in p for p in problems), problems


def test_no_api_key_in_any_message() -> None:
    """Keys written where they do not belong are never echoed (problems_of checks every
    message for every key)."""
    entries = [{**GOOD, "identity": key} for key in KEYS]
    entries += [{**GOOD, "expect": "denied"}, {**GOOD, "identity": "meta", "expect": "allowed"}]
    problems = problems_of(with_tests(*entries))
    assert len(problems) == 4
    assert [p for p in problems if "API key of identity" in p] == [
        "tests[0] identity: that is an API key of identity 'web', not an identity name (write identity: web)",
        "tests[1] identity: that is an API key of identity 'web', not an identity name (write identity: web)",
        "tests[2] identity: that is an API key of identity 'meta', not an identity name (write identity: meta)",
        "tests[3] identity: that is an API key of identity 'canary', not an identity name (write identity: canary)",
    ]
    # and the outcome messages of valid tests carry identity names only
    failures = problems_of(with_tests({**GOOD, "expect": "denied"}, {**GOOD, "identity": "meta"}))
    assert [p.split(",")[0] for p in failures] == ["tests[0]: identity web", "tests[1]: identity meta"]
