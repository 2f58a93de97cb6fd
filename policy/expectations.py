"""Policy tests: the `tests:` section, expectations written next to the rules.

    tests:
      - identity: frontend-services          # an identity name, never a key
        destination: api.example.com:443     # HOST:PORT, [v6]:PORT, or HOST (443; http: 80)
        expect: allowed                      # or denied
        address: 10.0.0.7                    # optional: what the name resolves to (or a list)
        sni: api.example.com                 # optional: the ClientHello's server name
        http: true                           # optional: a plain http:// request, not CONNECT
        name: frontend reaches the API       # optional: a label for messages

`parse_tests` validates the raw entries, reporting every problem in the words of
load.py; `run_tests` judges each test with the one check list (`decide.judge`) and
returns one problem per test whose outcome is not the expected one. load.py calls both,
so wherever a policy loads (check-policy, startup, every reload) its tests are checked,
and a failing test makes the file invalid.

What a test stands for: a CONNECT by a normal TLS client, whose ClientHello carries the
target name as SNI (an IP target: no SNI), unless `sni` says otherwise; with `http: true`
a plain-HTTP request (no stream check). Without `address` the address check is skipped,
as `explain` does. A test passes "allowed" only if nothing refused it and nothing was
merely reported: a `mode: report` identity is judged as enforcement would judge it.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

from .decide import Question, Verdict, judge
from .destinations import DestinationError, split_port
from .hosts import Host, HostError, IPAddress, parse_host
from .model import Policy, key_digest
from .problems import show, type_name, unknown_keys

__all__ = ["OUTCOMES", "TEST_KEYS", "Expectation", "parse_tests", "run_tests"]

TEST_KEYS = ("name", "identity", "destination", "address", "sni", "http", "expect")
REQUIRED_KEYS = ("identity", "destination", "expect")
OUTCOMES = ("allowed", "denied")
DEFAULT_PORT = 443  # a CONNECT target without a port; an http: true test takes HTTP_PORT
HTTP_PORT = 80
_PORT_RE = re.compile(r"[0-9]{1,5}")
_NAME_LIMIT = 80


class Expectation(NamedTuple):
    """One validated test: who asks (`identity`, a name), what (`question`, as the live
    proxy would ask it), and the outcome expected. `label` (``tests[1] (name)``) and
    `destination` (``host:port``) are for messages."""

    label: str
    identity: str
    destination: str
    question: Question
    expect: str


class _Invalid(ValueError):
    """Problems with one field of a test: each message (`args`) follows ``tests[N]``."""


def parse_tests(raw: Any, identities: Collection[Any], keys: Mapping[bytes, tuple[str, int]]
                ) -> tuple[tuple[Expectation, ...], list[str]]:
    """The `tests:` section as expectations, and every problem found in it.

    `identities` are the identity names the policy defines; `keys` maps the digest of
    each API key to its identity (name, index), so that a key written where an identity
    name belongs is recognized, and never echoed.
    """
    if raw is None:  # no section, or one with every entry commented out
        return (), []
    if not isinstance(raw, list):
        return (), [f"tests: must be a list of tests (identity, destination, expect), not {type_name(raw)}"]
    tests, problems = [], []
    for index, entry in enumerate(raw):
        test = _expectation(index, entry, identities, keys, problems)
        if test is not None:
            tests.append(test)
    return tuple(tests), problems


def run_tests(policy: Policy, tests: tuple[Expectation, ...]) -> list[str]:
    """Judge every test against `policy`; one problem per test that fails."""
    failures = []
    for test in tests:
        verdict = judge(policy, None, test.question, identity=policy.identities[test.identity])
        got = outcome(verdict)
        if got != test.expect:
            failures.append(f"{test.label}: identity {test.identity}, destination {test.destination}: "
                            f"expected {test.expect}, got {got} (reason: {_reason(verdict)})")
    return failures


def outcome(verdict: Verdict) -> str:
    """"allowed" only if no check refused and none was merely reported (report mode is
    judged as enforcement would judge it); otherwise "denied"."""
    return "allowed" if verdict.refusal is None and not verdict.reported else "denied"


def _reason(verdict: Verdict) -> str:
    """Why the verdict is what it is: the refusal, what report mode let through, or the
    decision that named the allowing rule."""
    if verdict.refusal is not None or verdict.reported:
        return verdict.reason
    named = next((d for d in verdict.decisions if d.rule is not None), None)
    return named.reason if named is not None else verdict.reason


# --- one entry ------------------------------------------------------------------------------


def _expectation(index: int, raw: Any, identities: Collection[Any], keys: Mapping[bytes, tuple[str, int]],
                 problems: list[str]) -> Expectation | None:
    """One validated test, or None after recording its problems."""
    where = f"tests[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping with identity, destination and expect, not {type_name(raw)}")
        return None
    start = len(problems)
    label = where
    if "name" in raw:
        name = _field(where, problems, _name, raw["name"])
        if name is not None:
            label = f"{where} ({name})"
    problems.extend(unknown_keys(f"{label}: ", raw, TEST_KEYS))
    problems.extend(f"{label}: missing {key}" for key in REQUIRED_KEYS if key not in raw)
    identity = _field(label, problems, _identity, raw.get("identity"), identities, keys) if "identity" in raw else None
    target = _field(label, problems, _destination, raw["destination"]) if "destination" in raw else None
    expect = _field(label, problems, _expect, raw["expect"]) if "expect" in raw else None
    addresses = _field(label, problems, _addresses, raw["address"]) if "address" in raw else None
    sni = _field(label, problems, _sni, raw["sni"]) if "sni" in raw else None
    http = _field(label, problems, _http, raw["http"]) if "http" in raw else False
    if http and sni is not None:
        problems.append(f"{label}: sni and http: true do not go together (plain HTTP has no TLS)")
    if len(problems) > start or identity is None or target is None or expect is None or http is None:
        return None
    host, port = target
    if port is None:
        port = HTTP_PORT if http else DEFAULT_PORT
    return Expectation(label, identity, _authority(host, port), _question(host, port, addresses, sni, http), expect)


def _field(where: str, problems: list[str], parse: Any, *args: Any) -> Any:
    """`parse(*args)`, or None after recording its problems under `where`."""
    try:
        return parse(*args)
    except _Invalid as err:
        problems.extend(f"{where}{message}" for message in err.args)
        return None


def _question(host: Host, port: int, addresses: tuple[IPAddress, ...] | None, sni: str | None,
              http: bool) -> Question:
    """What the live proxy would ask: plain HTTP has no stream check; a CONNECT stands for
    a normal TLS client, whose SNI is the target name (an IP target: none) unless given."""
    if http:
        return Question(host, port, http=True, addresses=addresses)
    if sni is None and host.ip is None:
        sni = host.name
    return Question(host, port, addresses=addresses, tls=True, sni=sni)


def _authority(host: Host, port: int) -> str:
    return f"[{host.name}]:{port}" if host.ip is not None and host.ip.version == 6 else f"{host.name}:{port}"


# --- fields (each raises _Invalid with the message after "tests[N]") -------------------------


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f" name {show(value)}: must be a non-empty string")
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value):
        raise _Invalid(f" name {show(value)}: must be one line of text")
    return value if len(value) <= _NAME_LIMIT else value[: _NAME_LIMIT - 3] + "..."


def _identity(value: Any, identities: Collection[Any], keys: Mapping[bytes, tuple[str, int]]) -> str:
    if not isinstance(value, str):
        raise _Invalid(f" identity {show(value)}: must be an identity name (a string)")
    if value in identities:
        return value
    owner = _key_owner(value, keys)
    if owner is not None:
        # Someone wrote a key where the name belongs: say whose, never the key.
        raise _Invalid(f" identity: that is an API key of identity {show(owner)}, not an identity name "
                       f"(write identity: {owner})")
    raise _Invalid(f": unknown identity {show(value)}{_did_you_mean(value, identities)}")


def _key_owner(value: str, keys: Mapping[bytes, tuple[str, int]]) -> str | None:
    try:
        found = keys.get(key_digest(value))
    except UnicodeEncodeError:
        return None
    return found[0] if found is not None else None


def _did_you_mean(value: str, identities: Collection[Any]) -> str:
    names = [name for name in identities if isinstance(name, str)]
    hint = difflib.get_close_matches(value, names, n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _destination(value: Any) -> tuple[Host, int | None]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST`` (port None: the default), as a CONNECT
    target is read."""
    if not isinstance(value, str):
        raise _Invalid(f" destination {show(value)}: must be a string, HOST:PORT")
    if "://" in value:
        raise _Invalid(f" destination {show(value)}: a HOST:PORT, not a URL")
    try:
        host_text, port = _split_authority(value)
        host = parse_host(host_text)
        if value.startswith("[") and host.ip is None:
            raise _Invalid("brackets are only for IPv6 addresses")
    except (_Invalid, HostError) as err:
        raise _Invalid(f" destination {show(value)}: {err}") from None
    return host, port


def _split_authority(text: str) -> tuple[str, int | None]:
    """``host[:port]`` as an allowed_destinations entry is split, but with one port."""
    try:
        host, port = split_port(text)
    except DestinationError as err:
        raise _Invalid(str(err)) from None
    if port is None and text.count(":") > 1 and not text.startswith("["):
        raise _Invalid("IPv6 addresses must be written in brackets: [2001:db8::1]:443")
    return host, None if port is None else _port(port)


def _port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise _Invalid(f"invalid port {text!r}: must be from 1 to 65535")
    return int(text)


def _expect(value: Any) -> str:
    if value not in OUTCOMES or not isinstance(value, str):
        raise _Invalid(f" expect {show(value)}: must be 'allowed' or 'denied'")
    return value


def _addresses(value: Any) -> tuple[IPAddress, ...]:
    """The addresses the name resolves to: one IP, or a non-empty list of them."""
    if isinstance(value, str):
        return (_address(" address", value),)
    if not isinstance(value, list):
        raise _Invalid(f" address {show(value)}: must be an IP address or a list of them")
    if not value:
        raise _Invalid(" address: an empty list; give at least one IP address (or leave address out)")
    found, wrong = [], []
    for index, item in enumerate(value):
        try:
            found.append(_address(f" address[{index}]", item))
        except _Invalid as err:
            wrong.extend(err.args)
    if wrong:
        raise _Invalid(*wrong)
    return tuple(found)


def _address(where: str, value: Any) -> IPAddress:
    if not isinstance(value, str):
        raise _Invalid(f"{where} {show(value)}: must be a string IP address")
    try:
        ip = parse_host(value).ip
    except HostError as err:
        raise _Invalid(f"{where} {show(value)}: {err}") from None
    if ip is None:
        raise _Invalid(f"{where} {show(value)}: must be an IP address (what the name resolves to)")
    return ip


def _sni(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f" sni {show(value)}: must be a non-empty string, the name the ClientHello carries")
    return value


def _http(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f" http {show(value)}: must be true or false")
    return value
