"""Decisions: the one ordered check list every request is judged by.

`judge()` walks the checks in the order a request lives (docs/ARCHITECTURE.md, steps
4-9) and stops at the first refusal:

1. authenticate      - a verified client certificate or the API key names an
                       identity, and both name the same one when both are given
                       (else `auth_required`, 407);
2. plain HTTP        - for an absolute-form http:// request: `allow_http` (403);
3. destination       - a rule allows this host at this port (403);
4. addresses         - every address the name resolved to is outside the forbidden
                       ranges, or allowed explicitly by an IP/CIDR rule (403);
5. stream            - the client's first bytes: not TLS needs `require_tls: false`;
                       a ClientHello's SNI must agree with the target and the policy.

A check whose facts are not known yet (addresses before the lookup, the stream before
the client has sent anything) is skipped, so the live proxy asks again as it learns
more, the re-check after a reload asks with everything the tunnel knows, and
`explain` asks with what the operator gave it: all through this one function, so they
cannot disagree.

Each check returns a `Decision`. `reason` is one of the REASON_* constants below,
optionally followed by ``": "`` and a detail (the rule, the range, the SNI name); tests
and log queries match on the constant. Reasons never contain an API key.

Report mode (``mode: report``) turns the refusals of checks 2, 3 and 5 into
``allowed=True, status=REPORTED`` with reason ``"would deny: <reason>"``. It never
relaxes checks 1 and 4: authentication and the forbidden ranges protect the proxy and
the cluster, not the allowlist.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from .addresses import IPAddress, unwrap
from .certificates import describe
from .hosts import Host, HostError, parse_host
from .model import Identity, Policy, Rule, key_digest


class Status(enum.StrEnum):
    """The closed set of decision words: metric label `status`, log field `action`."""

    ALLOWED = "allowed"
    DENIED = "denied"
    AUTH_REQUIRED = "auth_required"
    BAD_REQUEST = "bad_request"
    CONNECTION_FAILED = "connection_failed"
    SNI_MISMATCH = "sni_mismatch"
    TIMEOUT = "timeout"
    LIMITED = "limited"
    REPORTED = "reported"


# Reasons. Detail after ": " is given in brackets.
REASON_AUTH_MISSING = "proxy authentication required (Proxy-Authorization: Basic, username = API key)"
REASON_AUTH_UNKNOWN = "unknown API key"
REASON_CERT_UNKNOWN = "client certificate matches no identity"  # [its entries; and no API key was given]
REASON_CERT_AMBIGUOUS = "client certificate matches several identities"  # [their names]
REASON_CREDENTIALS_DISAGREE = "client certificate and API key name different identities"  # [both names]
REASON_DESTINATION_ALLOWED = "destination allowed"  # [rule text]
REASON_DESTINATION_NOT_ALLOWED = "destination not allowed"
REASON_INVALID_PORT = "invalid port"
REASON_ADDRESSES_ALLOWED = "addresses allowed"
REASON_FORBIDDEN_ADDRESS_ALLOWED = "forbidden address allowed by rule"  # [rule text]
REASON_FORBIDDEN_ADDRESS = "forbidden address"  # [address in range (label)]
REASON_NO_ADDRESSES = "no addresses"
REASON_TLS_REQUIRED = "tls required"
REASON_PLAINTEXT_ALLOWED = "plaintext allowed"
REASON_HTTP_ALLOWED = "plain http allowed"
REASON_HTTP_DISABLED = "plain-HTTP forwarding is disabled"  # [for identity NAME (allow_http: false); use CONNECT]
REASON_SNI_ALLOWED = "sni allowed"  # [rule text]
REASON_SNI_ABSENT = "no sni for ip target"
REASON_SNI_MISSING = "sni missing"
REASON_SNI_INVALID = "sni invalid"  # [parse problem]
REASON_SNI_MISMATCH = "sni does not match target"  # [normalized sni]
REASON_SNI_NOT_ALLOWED = "sni not allowed"  # [normalized sni]
REASON_WOULD_DENY = "would deny"  # [the enforce-mode reason]


class Decision(NamedTuple):
    """The outcome of one check: may the request proceed, and why. (Values of this
    module are tuples: a request makes a dozen of them, and a frozen dataclass costs a
    call per field to build.)"""

    allowed: bool
    status: str
    reason: str
    rule: Rule | None = None


def _detail(reason: str, detail: object) -> str:
    return f"{reason}: {detail}"


def _allow(reason: str, rule: Rule | None = None) -> Decision:
    return _new(Decision, (True, Status.ALLOWED, reason, rule))


_new = tuple.__new__
_ALLOWED: dict[tuple[str, Rule], Decision] = {}  # allowing decisions of rules, built once


def _allow_by(reason: str, rule: Rule) -> Decision:
    """The decision that `rule` allows (`reason: rule`), shared between requests."""
    decision = _ALLOWED.get((reason, rule))
    if decision is None:
        decision = _allow(_detail(reason, rule.text), rule)
        if len(_ALLOWED) < 4096:
            _ALLOWED[(reason, rule)] = decision
    return decision


def _refuse(identity: Identity, status: str, reason: str, rule: Rule | None = None) -> Decision:
    """A refusal, or in report mode the record of one that lets the request through."""
    if identity.mode == "report":
        return Decision(True, Status.REPORTED, _detail(REASON_WOULD_DENY, reason), rule)
    return Decision(False, status, reason, rule)


# ---------------------------------------------------------------------------
# The ordered check list.


class Question(NamedTuple):
    """What the proxy knows about one request when it asks the policy.

    `addresses` None: the name is not resolved yet (or, for `explain`, not given).
    `tls` None: the client has not sent its first bytes yet; True with `sni` the
    ClientHello's server_name (None: the hello carried none).
    """

    host: Host
    port: int
    http: bool = False
    addresses: tuple[IPAddress, ...] | None = None
    tls: bool | None = None
    sni: str | None = None


class Verdict(NamedTuple):
    """The outcome of the check list: who asked, on which facts, and the decisions taken
    in order.

    `decisions` ends at the first refusal (then `refusal` is it). `rule` is the first
    rule any check matched; `reported` the reasons report mode let through. `status`
    (the decision word for the record: refused, reported or allowed) and `reason` are
    worked out once, when the verdict is made: the live path reads them for every request.
    """

    identity: Identity | None
    question: Question | None
    decisions: tuple[Decision, ...]
    refusal: Decision | None
    rule: Rule | None
    reported: tuple[str, ...]
    status: str
    reason: str

    @classmethod
    def of(cls, identity: Identity | None, decisions: Sequence[Decision], question: Question | None = None) -> Verdict:
        refusal = rule = None
        reported: list[str] = []
        for decision in decisions:
            if rule is None:
                rule = decision.rule
            if not decision.allowed:
                refusal = decision
            elif decision.status == Status.REPORTED:
                reported.append(decision.reason)
        if refusal is not None:
            status, reason = refusal.status, refusal.reason
        elif reported:
            status, reason = Status.REPORTED, "; ".join(reported)
        else:
            status, reason = Status.ALLOWED, REASON_DESTINATION_ALLOWED
        return _new(cls, (identity, question, tuple(decisions), refusal, rule, tuple(reported), status, reason))

    @property
    def allowed(self) -> bool:
        return self.identity is not None and self.refusal is None


def authenticate(policy: Policy, key: str | None, certificate: Sequence[str] = ()) -> Decision | Identity:
    """Check 1: the identity the credentials prove, or the refusal (never relaxed).

    `certificate`: the entries of the client's verified certificate (empty: none). A
    certificate naming an identity needs no key; one naming none falls back to the key.
    A certificate and a key naming different identities are refused, never chosen from.
    """
    by_certificate = policy.by_certificate(certificate) if certificate else ()
    if len(by_certificate) > 1:
        names = ", ".join(identity.name for identity in by_certificate)
        return Decision(False, Status.AUTH_REQUIRED, _detail(REASON_CERT_AMBIGUOUS, names))
    if key is None:
        if by_certificate:
            return by_certificate[0]
        if certificate:
            return Decision(False, Status.AUTH_REQUIRED,
                            _detail(REASON_CERT_UNKNOWN, f"{describe(certificate)}; and no API key was given"))
        return Decision(False, Status.AUTH_REQUIRED, REASON_AUTH_MISSING)
    identity = policy.authenticate(key)
    if identity is None:
        return Decision(False, Status.AUTH_REQUIRED, REASON_AUTH_UNKNOWN)
    if by_certificate and by_certificate[0] is not identity:
        return Decision(False, Status.AUTH_REQUIRED, _detail(
            REASON_CREDENTIALS_DISAGREE, f"certificate: {by_certificate[0].name}, API key: {identity.name}"))
    return identity


def judge(policy: Policy, key: str | None, question: Question, identity: Identity | None = None,
          prior: Verdict | None = None, certificate: Sequence[str] = ()) -> Verdict:
    """Walk the check list for `question`.

    `key` and `certificate` are the credentials (check 1). `identity` skips check 1 when
    the caller already authenticated them against this same `policy`. `prior` is the
    verdict the same request got from this same `policy` on fewer facts (the live path
    asks again as it learns more): its decisions stand, and only the checks whose facts
    are new since then run.

    Verdicts that let a request through are remembered on `policy` (`Policy.verdicts`),
    by everything they were judged on: the credentials (as the policy holds them: the
    key's digest) or the identity, or the very `prior` verdict they continue; and every
    fact of `question`. A client asking again for the same destination with the same
    credentials gets the same verdict from a dictionary lookup: the checks are pure
    functions of those inputs and of the policy, so it is the verdict they would give.
    A reload brings a new policy, and so an empty memory; refusals are never remembered.
    """
    if prior is not None:
        who: object = id(prior)  # its entry keeps `prior` alive, so the id stays its own
    elif identity is not None:
        who = identity  # authenticated by the caller: the credentials decide nothing more
    else:
        try:
            who = (None if key is None else key_digest(key),
                   certificate if type(certificate) is tuple else tuple(certificate))
        except UnicodeEncodeError:
            return _judge(policy, key, question, identity, prior, certificate)
    addresses = question.addresses
    if addresses is None:
        seen = None
    elif len(addresses) == 1 and type(addresses[0]) is not str:
        seen = (type(addresses[0]), addresses[0]._ip)  # noqa: SLF001 - ipaddress's integer, no Python-level hash
    else:
        seen = tuple((type(a), a) if type(a) is str else (type(a), a._ip) for a in addresses)  # noqa: SLF001
    facts = (who, question.host.name, question.port, question.http, seen, question.tls, question.sni)
    verdicts = policy.verdicts
    known = verdicts.get(facts)
    if known is not None and known[0] is prior:
        return known[1]
    verdict = _judge(policy, key, question, identity, prior, certificate)
    if verdict.refusal is None and verdict.identity is not None:
        if len(verdicts) >= VERDICTS_KEPT:
            verdicts.clear()  # a client inventing destinations cannot grow it: start again
        verdicts[facts] = (prior, verdict)
    return verdict


# Allowing verdicts a policy snapshot remembers (judge); a few hundred bytes each.
VERDICTS_KEPT = 4096


def _judge(policy: Policy, key: str | None, question: Question, identity: Identity | None,
           prior: Verdict | None, certificate: Sequence[str]) -> Verdict:
    if prior is not None:
        asked = prior.question
        if prior.refusal is not None or prior.identity is None or asked is None:
            return prior
        decisions = list(prior.decisions)
        _continue(policy, prior.identity, question, decisions, asked)
        return Verdict.of(prior.identity, decisions, question)
    if identity is None:
        found = authenticate(policy, key, certificate)
        if isinstance(found, Decision):
            return Verdict.of(None, (found,), question)
        identity = found
    decisions: list[Decision] = []
    for decision in checks(policy, identity, question):
        decisions.append(decision)
        if not decision.allowed:
            break
    return Verdict.of(identity, decisions, question)


def _continue(policy: Policy, identity: Identity, question: Question, decisions: list[Decision],
              asked: Question) -> None:
    """The checks `asked` had no facts for and `question` has: addresses, then the stream."""
    if question.addresses is not None and asked.addresses is None:
        decisions.append(decide_addresses(policy, identity, question.addresses, question.port))
        if not decisions[-1].allowed:
            return
    if question.tls is not None and asked.tls is None:
        decisions.append(decide_plaintext(identity) if question.tls is False
                         else decide_sni(identity, question.host, question.port, question.sni))


def checks(policy: Policy, identity: Identity, question: Question) -> Iterator[Decision]:
    """Checks 2-5 in order, each as soon as its facts are known."""
    host, port = question.host, question.port
    if question.http:
        yield decide_http(identity)
    yield decide_destination(identity, host, port)
    if question.addresses is not None:
        yield decide_addresses(policy, identity, question.addresses, port)
    if question.tls is False:
        yield decide_plaintext(identity)
    elif question.tls:
        yield decide_sni(identity, host, port, question.sni)


# ---------------------------------------------------------------------------
# The checks.


def decide_http(identity: Identity) -> Decision:
    """Check 2: may `identity` use plain-HTTP forwarding of http:// URLs at all?"""
    if identity.allow_http:
        return _allow(REASON_HTTP_ALLOWED)
    return _refuse(identity, Status.DENIED,
                   f"{REASON_HTTP_DISABLED} for identity {identity.name} (allow_http: false); use CONNECT")


def decide_destination(identity: Identity, host: Host, port: int) -> Decision:
    """Check 3: may `identity` connect to `host` at `port`?"""
    if type(port) is not int or not 1 <= port <= 65535:
        # A programming error upstream, never relaxed: there is no such destination.
        return Decision(False, Status.DENIED, REASON_INVALID_PORT)
    rule = identity.match(host, port)
    if rule is not None:
        return _allow_by(REASON_DESTINATION_ALLOWED, rule)
    return _refuse(identity, Status.DENIED, REASON_DESTINATION_NOT_ALLOWED)


def decide_addresses(policy: Policy, identity: Identity, addresses: Sequence[IPAddress | str], port: int) -> Decision:
    """Check 4: may the proxy dial these resolved addresses? Never relaxed by report mode.

    One forbidden address refuses the request, even if others are fine: the proxy would
    otherwise have to trust that it dials only the good ones, and a rebinding attacker
    controls the order. An address the identity names explicitly is allowed even inside a
    forbidden range: by an IP rule equal to it, or a CIDR rule lying entirely inside that
    range (at this port). A broader CIDR (``0.0.0.0/0``) never unlocks a forbidden address.
    """
    if not addresses:
        return Decision(False, Status.DENIED, REASON_NO_ADDRESSES)
    override: Rule | None = None
    find = policy.forbidden.find
    for address in addresses:
        ip = ipaddress.ip_address(address) if type(address) is str else address
        found = find(ip)
        if found is None:
            continue
        forbidden_range, forbidden = found
        ip = unwrap(ip)
        rule = identity.allows_address(ip, port, inside=forbidden_range)
        if rule is None:
            return Decision(False, Status.DENIED, _detail(REASON_FORBIDDEN_ADDRESS, f"{ip} in {forbidden}"))
        override = override or rule
    if override is not None:
        return _allow_by(REASON_FORBIDDEN_ADDRESS_ALLOWED, override)
    return _allow(REASON_ADDRESSES_ALLOWED)


def decide_plaintext(identity: Identity) -> Decision:
    """Check 5, not TLS: only identities with ``require_tls: false`` pass."""
    if not identity.require_tls:
        return _allow(REASON_PLAINTEXT_ALLOWED)
    return _refuse(identity, Status.DENIED, REASON_TLS_REQUIRED)


def decide_sni(identity: Identity, target: Host, port: int, sni: str | None) -> Decision:
    """Check 5, TLS: judge the ClientHello's server_name against the CONNECT target.

    CONNECT to a name: the SNI must be present, equal to the target after normalization,
    and allowed at this port; otherwise the client could tunnel to one allowed name and
    speak TLS to another host behind the same address. CONNECT to an IP: there is no
    name to compare, so an SNI, if present, must itself be allowed; absent is fine.
    """
    if sni is None:
        if target.ip is None:
            return _refuse(identity, Status.SNI_MISMATCH, REASON_SNI_MISSING)
        return _allow(REASON_SNI_ABSENT)
    try:
        sni_host = parse_host(sni)
    except HostError as err:
        return _refuse(identity, Status.SNI_MISMATCH, _detail(REASON_SNI_INVALID, err))
    if target.ip is None and sni_host.name != target.name:
        return _refuse(identity, Status.SNI_MISMATCH, _detail(REASON_SNI_MISMATCH, sni_host.name))
    rule = identity.match(sni_host, port)
    if rule is None:
        return _refuse(identity, Status.SNI_MISMATCH, _detail(REASON_SNI_NOT_ALLOWED, sni_host.name))
    return _allow_by(REASON_SNI_ALLOWED, rule)
