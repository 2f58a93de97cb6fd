"""Loading and validating policies: every class of bad file, named; keys never echoed."""

from __future__ import annotations

import hashlib
import os
import textwrap
import time
import timeit
from pathlib import Path

import pytest

from policy import DEFAULT_FORBIDDEN, Policy, PolicyError, load_policy_file, load_policy_text, parse_host

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "policies"

# Every key used in the bad policies below; none may ever appear in an error message.
SECRET = "s3cr3t-key-value"
SECRETS = (SECRET, "user:pass-secret", "has space-secret", "tab\tsecret", "other-secret", "secret-a")


def identity(body: str, name: str = '"web"') -> str:
    """A policy with one identity whose body is `body` (YAML, any indentation)."""
    return f"identities:\n  {name}:\n" + textwrap.indent(textwrap.dedent(body), "    ")


def with_dest(entry: str) -> str:
    return identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: [{entry}]\n')


def with_key(entry: str) -> str:
    return identity(f'api_keys: [{entry}]\nallowed_destinations: ["api.example.com"]\n')


def with_option(line: str) -> str:
    return identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: ["api.example.com"]\n{line}\n')


GOOD_IDENTITY = f'  "web":\n    api_keys: ["{SECRET}"]\n    allowed_destinations: ["api.example.com"]\n'


def problems_of(text: str) -> tuple[str, ...]:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "test.yaml")
    err = info.value
    for secret in SECRETS:
        assert secret not in str(err), f"key leaked into {err}"
        assert all(secret not in p for p in err.problems)
    return err.problems


INVALID = [
    # (policy text, fragments that must all appear in one problem)
    # --- the file as a whole
    pytest.param("- a\n- b\n", ("must be a mapping", "not a list"), id="top-is-list"),
    pytest.param("just text\n", ("must be a mapping", "not a string"), id="top-is-scalar"),
    pytest.param("", ("policy is empty",), id="empty-file"),
    pytest.param("# only a comment\n", ("policy is empty",), id="comments-only"),
    pytest.param("settings: {}\n", ("missing 'identities'",), id="no-identities"),
    pytest.param("identities:\n", ("'identities' must be a mapping", "not nothing"), id="identities-null"),
    pytest.param("identities: [web]\n", ("'identities' must be a mapping",), id="identities-list"),
    pytest.param("identities: {}\n", ("'identities' is empty",), id="identities-empty"),
    pytest.param("identities:\n" + GOOD_IDENTITY + "identity: {}\n", ("unknown key 'identity'",),
                 id="unknown-top-key"),
    # --- identity names
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: [a.com]\n', "123"),
                 ("identity name 123", "must be a string"), id="name-not-string"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: [a.com]\n', '""'),
                 ("identity name ''", "empty"), id="name-empty"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: [a.com]\n', '"web frontend"'),
                 ("identity name 'web frontend'", "whitespace"), id="name-space"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: [a.com]\n', '"web\\x01"'),
                 ("identity name 'web\\x01'", "control"), id="name-control"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: [a.com]\n', '"-"'),
                 ("identity name '-'", "reserved"), id="name-reserved-dash"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: [a.com]\n', "x" * 129),
                 ("identity name 'xxx", "longer than 128"), id="name-too-long"),
    # --- identity body
    pytest.param('identities:\n  "web":\n', ("identity 'web'", "must be a mapping"), id="identity-null"),
    pytest.param('identities:\n  "web": [a, b]\n', ("identity 'web'", "must be a mapping"), id="identity-list"),
    pytest.param(identity('allowed_destinations: ["a.com"]\n'), ("identity 'web'", "missing api_keys"), id="no-api-keys"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\n'), ("identity 'web'", "missing allowed_destinations"),
                 id="no-destinations"),
    pytest.param(identity(f'api_keys: "{SECRET}"\nallowed_destinations: ["a.com"]\n'),
                 ("identity 'web'", "api_keys must be a list"), id="api-keys-not-list"),
    pytest.param(identity('api_keys: []\nallowed_destinations: ["a.com"]\n'), ("identity 'web'", "api_keys is empty"),
                 id="api-keys-empty"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: "a.com"\n'),
                 ("identity 'web'", "allowed_destinations must be a list"), id="destinations-not-list"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: []\n'),
                 ("identity 'web'", "allowed_destinations is empty"), id="destinations-empty"),
    pytest.param(identity(f'api_keys: ["{SECRET}"]\nallowed_destination: ["a.com"]\n'),
                 ("identity 'web'", "unknown key 'allowed_destination'", "did you mean 'allowed_destinations'"),
                 id="typo-allowed-destination"),
    pytest.param(with_option("apikeys: []"), ("identity 'web'", "unknown key 'apikeys'"), id="typo-apikeys"),
    # --- keys (named by position, never by value)
    pytest.param(with_key("12345"), ("identity 'web'", "api_keys[0]", "must be a string"), id="key-integer"),
    pytest.param(with_key("null"), ("identity 'web'", "api_keys[0]", "must be a string"), id="key-null"),
    pytest.param(with_key('["nested"]'), ("identity 'web'", "api_keys[0]", "must be a string"), id="key-list"),
    pytest.param(with_key('""'), ("identity 'web'", "api_keys[0]", "empty key"), id="key-empty"),
    pytest.param(with_key(f'"{SECRET}", "user:pass-secret"'), ("identity 'web'", "api_keys[1]", "':'"), id="key-colon"),
    pytest.param(with_key('"has space-secret"'), ("identity 'web'", "api_keys[0]", "whitespace"), id="key-space"),
    pytest.param(with_key('"tab\\tsecret"'), ("identity 'web'", "api_keys[0]", "whitespace or control"), id="key-tab"),
    pytest.param(with_key('"ctl\\x01-secret"'), ("identity 'web'", "api_keys[0]", "control"), id="key-control"),
    pytest.param(with_key('"sha256:abcd"'), ("identity 'web'", "api_keys[0]", "64 hex digits"), id="hashed-short"),
    pytest.param(with_key('"sha256:' + "g" * 64 + '"'), ("identity 'web'", "api_keys[0]", "64 hex digits"),
                 id="hashed-not-hex"),
    pytest.param(with_key('"sha256:' + "a" * 65 + '"'), ("identity 'web'", "api_keys[0]", "64 hex digits"),
                 id="hashed-too-long"),
    pytest.param(with_key(f'"{SECRET}", "other-secret", "{SECRET}"'),
                 ("identity 'web'", "api_keys[2]", "same key as api_keys[0]"), id="key-twice-in-identity"),
    pytest.param(
        "identities:\n" + GOOD_IDENTITY + f'  "batch":\n    api_keys: ["other-secret", "{SECRET}"]\n'
        '    allowed_destinations: ["b.com"]\n',
        ("identity 'batch'", "api_keys[1]", "identity 'web'", "api_keys[0]", "unique across identities"),
        id="key-in-two-identities",
    ),
    # --- destinations (the entry is named as written)
    pytest.param(with_dest('"*"'), ("identity 'web'", "allowed_destinations[0] '*'", "bare '*'"), id="dest-star"),
    pytest.param(with_dest('"*."'), ("allowed_destinations[0] '*.'", "without a domain"), id="dest-star-dot"),
    pytest.param(with_dest('"a.*.b"'), ("allowed_destinations[0] 'a.*.b'", "first label"), id="dest-inner-star"),
    pytest.param(with_dest('"*a.com"'), ("allowed_destinations[0] '*a.com'", "first label"), id="dest-partial-star"),
    pytest.param(with_dest('"*.*.a.com"'), ("allowed_destinations[0] '*.*.a.com'", "first label"),
                 id="dest-double-star"),
    pytest.param(with_dest('"*.10.0.0.1"'), ("'*.10.0.0.1'", "cannot cover an IP"), id="dest-wildcard-ip"),
    pytest.param(with_dest('"300.1.1.1"'), ("'300.1.1.1'", "out of range"), id="dest-octet-300"),
    pytest.param(with_dest('"10.0.0.0/33"'), ("'10.0.0.0/33'", "prefix length 33"), id="dest-prefix-33"),
    pytest.param(with_dest('"::/129"'), ("'::/129'", "prefix length 129"), id="dest-prefix-129"),
    pytest.param(with_dest('"10.0.0.1/24"'), ("'10.0.0.1/24'", "host bits set", "10.0.0.0/24"), id="dest-host-bits"),
    pytest.param(with_dest('"10.0.0.0/255.0.0.0"'), ("'10.0.0.0/255.0.0.0'", "decimal"), id="dest-netmask"),
    pytest.param(with_dest('"api example.com"'), ("'api example.com'", "whitespace"), id="dest-space"),
    pytest.param(with_dest('" api.example.com"'), ("' api.example.com'", "whitespace"), id="dest-leading-space"),
    pytest.param(with_dest('"https://x.example.com"'), ("'https://x.example.com'", "URL", "'x.example.com'"),
                 id="dest-url"),
    pytest.param(with_dest('"x.example.com/path"'), ("'x.example.com/path'", "paths are not allowed"),
                 id="dest-path"),
    pytest.param(with_dest('"user@x.example.com"'), ("'user@x.example.com'", "userinfo"), id="dest-userinfo"),
    pytest.param(with_dest('"x.example.com:0"'), ("'x.example.com:0'", "port 0 out of range"), id="dest-port-0"),
    pytest.param(with_dest('"x.example.com:65536"'), ("'x.example.com:65536'", "port 65536"), id="dest-port-65536"),
    pytest.param(with_dest('"x.example.com:https"'), ("'x.example.com:https'", "invalid port"), id="dest-port-name"),
    pytest.param(with_dest('"x.example.com:"'), ("'x.example.com:'", "invalid port"), id="dest-port-empty"),
    pytest.param(with_dest('"x.example.com:8100-8000"'), ("'x.example.com:8100-8000'", "reversed"),
                 id="dest-range-reversed"),
    pytest.param(with_dest('""'), ("allowed_destinations[0] ''", "empty destination"), id="dest-empty"),
    pytest.param(with_dest("5"), ("allowed_destinations[0] 5", "must be a string"), id="dest-integer"),
    pytest.param(with_dest("null"), ("allowed_destinations[0] None", "must be a string"), id="dest-null"),
    pytest.param(with_dest("1.5"), ("allowed_destinations[0] 1.5", "must be a string"), id="dest-float"),
    pytest.param(with_dest('"2130706433"'), ("'2130706433'", "non-canonical IPv4"), id="dest-ipv4-integer"),
    pytest.param(with_dest('"0x7f.1"'), ("'0x7f.1'", "non-canonical IPv4"), id="dest-ipv4-hex"),
    pytest.param(with_dest('"0177.0.0.1"'), ("'0177.0.0.1'", "non-canonical IPv4"), id="dest-ipv4-octal"),
    pytest.param(with_dest('"127.1"'), ("'127.1'", "non-canonical IPv4"), id="dest-ipv4-short"),
    pytest.param(with_dest('"0x0a.0.0.0/8"'), ("'0x0a.0.0.0/8'", "paths are not allowed"), id="dest-cidr-hex"),
    pytest.param(with_dest('"[::1"'), ("'[::1'", "unclosed"), id="dest-unclosed-bracket"),
    pytest.param(with_dest('"[10.0.0.1]:443"'), ("'[10.0.0.1]:443'", "only for IPv6"), id="dest-bracketed-ipv4"),
    pytest.param(with_dest('"fe80::1%eth0"'), ("'fe80::1%eth0'", "zone id"), id="dest-zone-id"),
    pytest.param(with_dest('"-bad.example.com"'), ("'-bad.example.com'", "'-'"), id="dest-leading-hyphen"),
    pytest.param(with_dest('"a..example.com"'), ("'a..example.com'", "empty label"), id="dest-empty-label"),
    # --- options
    pytest.param(with_option("mode: enforcing"), ("identity 'web'", "mode 'enforcing'", "'enforce' or 'report'"),
                 id="mode-unknown"),
    pytest.param(with_option("mode: 1"), ("identity 'web'", "mode 1"), id="mode-integer"),
    pytest.param(with_option('require_tls: "yes"'), ("identity 'web'", "require_tls 'yes'", "true or false"),
                 id="require-tls-string"),
    pytest.param(with_option("require_tls: null"), ("identity 'web'", "require_tls None"), id="require-tls-null"),
    pytest.param(with_option("allow_http: 1"), ("identity 'web'", "allow_http 1", "true or false"),
                 id="allow-http-integer"),
    pytest.param(with_option("max_tunnels: 0"), ("identity 'web'", "max_tunnels 0", "positive integer"),
                 id="max-tunnels-zero"),
    pytest.param(with_option("max_tunnels: -5"), ("identity 'web'", "max_tunnels -5"), id="max-tunnels-negative"),
    pytest.param(with_option("max_tunnels: true"), ("identity 'web'", "max_tunnels True"), id="max-tunnels-bool"),
    pytest.param(with_option('max_tunnels: "10"'), ("identity 'web'", "max_tunnels '10'"), id="max-tunnels-string"),
    pytest.param(with_option("max_tunnels: 2.5"), ("identity 'web'", "max_tunnels 2.5"), id="max-tunnels-float"),
    pytest.param(with_option("max_tunnels:"), ("identity 'web'", "max_tunnels", "omit it"), id="max-tunnels-null"),
    # --- settings
    pytest.param("settings: [1]\nidentities:\n" + GOOD_IDENTITY, ("settings", "must be a mapping"),
                 id="settings-list"),
    pytest.param("settings: {forbidden: []}\nidentities:\n" + GOOD_IDENTITY, ("settings", "unknown key 'forbidden'"),
                 id="settings-unknown-key"),
    pytest.param('settings: {forbidden_ranges: "10.0.0.0/8"}\nidentities:\n' + GOOD_IDENTITY,
                 ("settings", "forbidden_ranges must be a list"), id="forbidden-not-list"),
    pytest.param("settings: {forbidden_ranges: null}\nidentities:\n" + GOOD_IDENTITY,
                 ("settings", "forbidden_ranges must be a list"), id="forbidden-null"),
    pytest.param('settings: {forbidden_ranges: ["nope"]}\nidentities:\n' + GOOD_IDENTITY,
                 ("settings: forbidden_ranges[0] 'nope'", "not an IP address"), id="forbidden-not-ip"),
    pytest.param('settings: {forbidden_ranges: ["10.0.0.1/8"]}\nidentities:\n' + GOOD_IDENTITY,
                 ("forbidden_ranges[0] '10.0.0.1/8'", "10.0.0.0/8"), id="forbidden-host-bits"),
    pytest.param("settings: {forbidden_ranges: [5]}\nidentities:\n" + GOOD_IDENTITY,
                 ("forbidden_ranges[0] 5", "must be a string"), id="forbidden-integer"),
]


@pytest.mark.parametrize(("text", "fragments"), INVALID)
def test_invalid_policy_is_rejected_with_a_precise_problem(text: str, fragments: tuple[str, ...]) -> None:
    problems = problems_of(text)
    assert any(all(f in p for f in fragments) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_shipped_policy_loads() -> None:
    policy = load_policy_file(ROOT / "egress-policy.yaml")
    assert sorted(policy.identities) == ["backend-services", "frontend-services", "monitoring-services"]
    assert (len(policy.identities), policy.key_count, policy.destination_count) == (3, 6, 7)
    for key, name in [
        ("frontend-pod-1", "frontend-services"),
        ("frontend-pod-2", "frontend-services"),
        ("backend-worker-1", "backend-services"),
        ("backend-worker-2", "backend-services"),
        ("prometheus", "monitoring-services"),
        ("alertmanager", "monitoring-services"),
    ]:
        found = policy.authenticate(key)
        assert found is not None and found.name == name
    frontend = policy.identities["frontend-services"]
    assert [r.text for r in frontend.rules] == ["api.example.com", "*.cdn.example.com"]
    assert (frontend.mode, frontend.require_tls, frontend.allow_http, frontend.max_tunnels) == (
        "enforce", True, True, None,
    )
    assert policy.forbidden is DEFAULT_FORBIDDEN
    assert len(policy.digest) == 12
    assert policy.test_count == 3


def test_full_fixture_options() -> None:
    policy = load_policy_file(FIXTURES / "full.yaml")
    web, batch, canary = (policy.identities[n] for n in ("web", "batch", "canary"))
    assert web.max_tunnels == 10
    assert (batch.require_tls, batch.allow_http) == (False, False)
    assert canary.mode == "report"
    kinds = {r.text: r.kind for r in web.rules}
    assert kinds["*.cdn.example.com"] == "wildcard"
    assert kinds["10.0.0.0/24:5432"] == "cidr"
    assert kinds["[2001:db8::2]:443"] == "ip"
    assert kinds["bücher.example"] == "domain"
    assert str(next(r for r in web.rules if r.text == "*.corp.example:8000-8100").ports) == "8000-8100"


def test_all_problems_are_collected() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_file(FIXTURES / "many_problems.yaml")
    problems = info.value.problems
    expected = [
        ("identity 'web'", "unknown key 'allowed_destination'"),
        ("identity 'web'", "missing allowed_destinations"),
        ("identity 'batch'", "api_keys[1]", "same key as api_keys[0]"),
        ("identity 'batch'", "allowed_destinations[0] '*'"),
        ("identity 'batch'", "allowed_destinations[1] '10.0.0.1/24'"),
        ("identity 'ops'", "api_keys[0]", "identity 'web'"),
        ("identity 'ops'", "mode 'enforcing'"),
    ]
    for fragments in expected:
        assert any(all(f in p for f in fragments) for p in problems), (fragments, problems)
    assert len(problems) == len(expected)
    text = str(info.value)
    assert text.startswith(str(FIXTURES / "many_problems.yaml") + ": ")
    assert "web-secret-1" not in text and "batch-secret-1" not in text


def test_duplicate_yaml_keys_are_reported() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_file(FIXTURES / "duplicate_keys.yaml")
    problems = info.value.problems
    assert "identities: duplicate identity 'web' (lines 2 and 9)" in problems
    assert "identity 'web': duplicate key 'allowed_destinations' (lines 4 and 5)" in problems


def test_duplicate_keys_under_api_keys_are_not_echoed() -> None:
    text = identity('api_keys: {secret-a: 1, secret-a: 2}\nallowed_destinations: ["a.com"]\n')
    problems = problems_of(text)
    assert any("duplicate mapping key" in p and "identity 'web' api_keys" in p for p in problems), problems


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        pytest.param("identities:\n  a: [1\n", "p.yaml:3:1: invalid YAML: while parsing a flow sequence",
                     id="unclosed-flow"),
        pytest.param("identities:\n\tweb: {}\n", "p.yaml:2:1: invalid YAML: ", id="tab-indent"),
        pytest.param("a: b\nc\n", "p.yaml:3:1: invalid YAML: ", id="missing-colon"),
        pytest.param("a: !!python/object:os.system {}\n", "p.yaml:1:4: invalid YAML: ", id="python-tag"),
        pytest.param("a: 1\n---\nb: 2\n", "p.yaml:2:1: invalid YAML: ", id="two-documents"),
        pytest.param("identities: {[a]: 1}\n", "p.yaml:1:14: invalid YAML: ", id="unhashable-key"),
        pytest.param("a: b\r\nc\r\n", "p.yaml:3:1: invalid YAML: ", id="crlf-lines"),
    ],
)
def test_bad_yaml_is_one_clear_line(text: str, prefix: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "p.yaml")
    (problem,) = info.value.problems
    message = str(info.value)
    assert message.startswith(prefix) and "\n" not in message, message
    # The position is the error's, not part of the problem (which never names the file).
    line, column = (int(n) for n in prefix.split(":")[1:3])
    assert info.value.position == (line, column)
    assert problem.startswith("invalid YAML: ") and "p.yaml" not in problem
    assert message == f"p.yaml:{line}:{column}: {problem}"


def test_policy_error_where() -> None:
    assert PolicyError(["x"], "p.yaml", (3, 7)).where() == "p.yaml:3:7"
    assert PolicyError(["x"], "p.yaml", (3, 7)).where("other.yaml") == "other.yaml:3:7"
    assert PolicyError(["x"], "p.yaml").where() == "p.yaml"
    assert str(PolicyError(["x", "y"], None, (3, 7))) == "3:7: x; y"
    assert str(PolicyError(["x"])) == "x"


WILDCARD_HINT = 'hint: quote wildcard entries, as in "*.example.com" (YAML reads a leading * as an alias)'
TAB_HINT = "hint: indent with spaces; YAML does not allow tabs"
DESTS = 'identities:\n  web:\n    api_keys: ["k"]\n    allowed_destinations:\n'

YAML_HINTS = [
    # (text, position, the hint or None)
    pytest.param(DESTS + "      - *.example.com\n", (5, 10), WILDCARD_HINT, id="wildcard-block"),
    pytest.param(DESTS + '      - "a.com"\n      - *.cdn.example.com:443\n', (6, 10),
                 WILDCARD_HINT, id="wildcard-block-port"),
    pytest.param(DESTS[:-1] + " [*.example.com]\n", (4, 29), WILDCARD_HINT, id="wildcard-flow"),
    pytest.param('a: ["x.com", *.example.com, "y.com"]\n', (1, 15), WILDCARD_HINT,
                 id="wildcard-flow-second"),
    pytest.param("a: [ *.example.com ]\n", (1, 7), WILDCARD_HINT, id="wildcard-flow-spaced"),
    pytest.param("a:\n  - *example.com\n", None, WILDCARD_HINT, id="star-then-name"),
    # The hint never echoes the entry: an unquoted key that starts with "*" is still a key.
    pytest.param('identities:\n  web:\n    api_keys:\n      - *s3cr3t.k3y\n', (4, 16), WILDCARD_HINT,
                 id="wildcard-shaped-key-not-echoed"),
    pytest.param("identities:\n\tweb: {}\n", (2, 1), TAB_HINT, id="tab-indent-key"),
    pytest.param(DESTS + "\t- a.com\n", (5, 1), TAB_HINT, id="tab-indent-item"),
    pytest.param("a:\n  b: 1\n  \tc: 2\n", (3, 3), TAB_HINT, id="tab-after-spaces"),
    pytest.param("a:\n  -\t- b\n", (2, 4), TAB_HINT, id="tab-after-dash"),
    pytest.param("a: |\n\tfoo\n", (2, 1), TAB_HINT, id="tab-block-scalar"),
    # no hint where the error is something else
    pytest.param("a: *anchor\n", (1, 4), None, id="undefined-alias"),
    pytest.param("a:\n  - *\n", (2, 6), None, id="bare-star"),
    pytest.param("identities:\n  a: [1\n", (3, 1), None, id="unclosed-flow"),
    pytest.param("a: b\nc\n", (3, 1), None, id="missing-colon"),
]


def _loaders() -> list:
    import yaml

    found = [pytest.param(yaml.SafeLoader, id="pure")]
    if hasattr(yaml, "CSafeLoader"):
        found.append(pytest.param(yaml.CSafeLoader, id="libyaml"))
    return found


@pytest.mark.parametrize("loader", _loaders())
@pytest.mark.parametrize(("text", "position", "hint"), YAML_HINTS)
def test_yaml_hints_for_the_classic_mistakes(monkeypatch: pytest.MonkeyPatch, loader: type, text: str,
                                            position: tuple[int, int] | None, hint: str | None) -> None:
    import policy.load

    monkeypatch.setattr(policy.load, "_PolicyLoader", type("Loader", (loader,), {}))
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "p.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("invalid YAML: ") and "\n" not in problem
    assert "s3cr3t" not in str(info.value)
    if position is not None:
        assert info.value.position == position
        assert str(info.value).startswith(f"p.yaml:{position[0]}:{position[1]}: invalid YAML: ")
    if hint is None:
        assert "hint:" not in problem
    else:
        assert problem.endswith("; " + hint), problem


def test_quoted_wildcards_and_tabs_inside_quotes_load() -> None:
    policy = load_policy_text(DESTS + '      - "*.example.com"\n      - \'*.cdn.example.com:443\'\n')
    assert [r.text for r in policy.identities["web"].rules] == ["*.example.com", "*.cdn.example.com:443"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_file(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy_file(tmp_path)


def test_path_through_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(PolicyError, match="cannot read: Not a directory"):
        load_policy_file(tmp_path / "file" / "p.yaml")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("identities: {}\n")
    path.chmod(0)
    with pytest.raises(PolicyError, match="permission denied"):
        load_policy_file(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"identities:\n  \xff\xfe: {}\n")
    with pytest.raises(PolicyError, match=r"not valid UTF-8 \(byte 14\)"):
        load_policy_file(path)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (ROOT / "egress-policy.yaml").read_bytes())
    assert len(load_policy_file(str(path)).identities) == 3


# --- keys ---------------------------------------------------------------------------------


def test_hashed_key_matches_its_preimage_only() -> None:
    policy = load_policy_file(FIXTURES / "hashed_keys.yaml")
    hexdigest = hashlib.sha256(b"hashed-secret-1").hexdigest()
    hashed = policy.authenticate("hashed-secret-1")
    assert hashed is not None and hashed.name == "hashed"
    assert policy.authenticate(hexdigest) is None  # the digest is not itself a key
    assert policy.authenticate("sha256:" + hexdigest) is None
    assert policy.authenticate("SHA256-IS-NOT-A-PREFIX-plain-key") is hashed
    assert policy.authenticate(b"hashed-secret-1") is hashed
    assert policy.key_count == 2


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("", id="empty"),
        pytest.param("frontend-pod-3", id="unknown"),
        pytest.param("Frontend-pod-1", id="case-differs"),
        pytest.param("frontend-pod-1 ", id="trailing-space"),
        pytest.param("frontend-pod-1\x00", id="nul-suffix"),
        pytest.param("\ud800", id="lone-surrogate"),
    ],
)
def test_unknown_keys_do_not_authenticate(key: str) -> None:
    policy = load_policy_file(ROOT / "egress-policy.yaml")
    assert policy.authenticate(key) is None


def test_plain_and_hashed_forms_of_one_key_collide() -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_file(FIXTURES / "plain_and_hashed_duplicate.yaml")
    (problem,) = info.value.problems
    assert "identity 'hashed'" in problem and "identity 'plain'" in problem
    assert "plain-and-hashed" not in problem and "63920ab1" not in problem.lower()


def test_policy_does_not_hold_plaintext_keys() -> None:
    policy = load_policy_file(ROOT / "egress-policy.yaml")
    assert "frontend-pod-1" not in repr(policy)
    assert hashlib.sha256(b"frontend-pod-1").digest() in policy.key_digests


# --- settings -----------------------------------------------------------------------------


def test_forbidden_ranges_replace_the_defaults() -> None:
    import ipaddress

    policy = load_policy_file(FIXTURES / "full.yaml")
    assert policy.forbidden.match(ipaddress.ip_address("127.0.0.1")) == "127.0.0.0/8 (configured)"
    assert policy.forbidden.match(ipaddress.ip_address("100.64.0.1")) is None  # default-only range
    assert DEFAULT_FORBIDDEN.match(ipaddress.ip_address("100.64.0.1")) is not None
    assert len(policy.forbidden) == 4


def test_empty_forbidden_ranges_disable_the_guard() -> None:
    import ipaddress

    policy = load_policy_file(FIXTURES / "forbidden_disabled.yaml")
    for text in ("127.0.0.1", "169.254.169.254", "::1", "2002:7f00:1::"):
        assert policy.forbidden.match(ipaddress.ip_address(text)) is None


def test_settings_without_forbidden_ranges_keeps_defaults() -> None:
    policy = load_policy_text("settings: {}\nidentities:\n" + GOOD_IDENTITY)
    assert policy.forbidden is DEFAULT_FORBIDDEN


# --- the snapshot -------------------------------------------------------------------------


def test_snapshot_is_immutable_and_versioned() -> None:
    text = (ROOT / "egress-policy.yaml").read_text()
    policy = load_policy_text(text)
    with pytest.raises(AttributeError):
        policy.digest = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.identities["new"] = policy.identities["frontend-services"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.identities["frontend-services"].rules = ()  # type: ignore[misc]
    assert load_policy_text(text).digest == policy.digest
    assert load_policy_text(text + "\n# changed\n").digest != policy.digest
    assert len(policy.digest) == 12


def test_report_mode_may_start_with_no_destinations() -> None:
    policy = load_policy_text(identity(f'api_keys: ["{SECRET}"]\nallowed_destinations: []\nmode: report\n'))
    assert policy.identities["web"].rules == ()


# --- scale --------------------------------------------------------------------------------


def big_policy(n: int) -> str:
    """One identity with `n` destinations of every kind."""
    lines = ['identities:', '  "big":', '    api_keys: ["big-key"]', '    allowed_destinations:']
    for i in range(n):
        kind = i % 4
        if kind == 0:
            lines.append(f'      - "host{i}.example.com"')
        elif kind == 1:
            lines.append(f'      - "*.svc{i}.example.net:443"')
        elif kind == 2:
            lines.append(f'      - "10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"')
        else:
            lines.append(f'      - "172.{16 + (i >> 16) % 16}.{i >> 8 & 255}.{i & 255}/32:5432"')
    lines.append('  "small":')
    lines.append('    api_keys: ["small-key"]')
    lines.append('    allowed_destinations: ["host0.example.com", "*.svc1.example.net:443", "10.0.0.2"]')
    return "\n".join(lines) + "\n"


def _match_cost(policy: Policy, key: str) -> float:
    identity = policy.authenticate(key)
    assert identity is not None
    hosts = [parse_host(h) for h in ("host0.example.com", "a.b.svc1.example.net", "10.0.0.2", "nomatch.example.org")]

    def run() -> None:
        for host in hosts:
            identity.match(host, 443)

    return min(timeit.repeat(run, number=2000, repeat=5))


def test_hundred_thousand_destinations_load_and_match_in_constant_time() -> None:
    text = big_policy(100_000)
    started = time.perf_counter()
    policy = load_policy_text(text)
    elapsed = time.perf_counter() - started
    print(f"\n100k destinations loaded in {elapsed:.2f}s")
    assert policy.destination_count == 100_003
    big = policy.identities["big"]
    assert big.match(parse_host("host99996.example.com"), 1) is not None
    assert big.match(parse_host("x.svc99997.example.net"), 443) is not None
    assert big.match(parse_host("x.svc99997.example.net"), 80) is None
    assert big.match(parse_host("10.1.134.158"), 1) is not None  # i = 99998
    assert big.match(parse_host("172.17.134.159"), 5432) is not None  # i = 99999
    assert big.match(parse_host("172.17.134.159"), 5433) is None
    # A scan over 100k rules would be thousands of times slower; allow generous noise.
    small_cost = _match_cost(policy, "small-key")
    big_cost = _match_cost(policy, "big-key")
    print(f"match: small {small_cost / 8000 * 1e9:.0f} ns, 100k {big_cost / 8000 * 1e9:.0f} ns per lookup")
    assert big_cost < small_cost * 10


