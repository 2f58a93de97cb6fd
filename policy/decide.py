"""Decisions: what the proxy should do at each check, as values with fixed reasons.

The proxy asks in the order a connection lives (DESIGN.md steps 5-9):

1. `decide_destination` - is the CONNECT target allowed for this identity and port?
2. `decide_addresses`   - is every address the name resolved to outside the forbidden
                          ranges (or explicitly allowed by an IP/CIDR rule)?
3. `decide_plaintext`   - the stream did not start with a TLS ClientHello: may it pass?
4. `decide_sni`         - does the ClientHello's SNI agree with the target and the policy?

Each returns a `Decision`. `reason` is one of the REASON_* constants below, optionally
followed by ``": "`` and a detail (the rule, the range, the SNI name); tests and log
queries match on the constant. Reasons never contain an API key.

Report mode (``mode: report``) turns the refusals of steps 1, 3 and 4 into
``allowed=True, status="reported"`` with reason ``"would deny: <reason>"``. It never
relaxes step 2: the forbidden ranges protect the cluster, not the allowlist, and
authentication happens before any of this.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .addresses import IPAddress
from .hosts import Host, HostError, parse_host
from .model import Identity, Policy, Rule

__all__ = [
    "REASON_ADDRESSES_ALLOWED",
    "REASON_DESTINATION_ALLOWED",
    "REASON_DESTINATION_NOT_ALLOWED",
    "REASON_FORBIDDEN_ADDRESS",
    "REASON_FORBIDDEN_ADDRESS_ALLOWED",
    "REASON_HTTP_ALLOWED",
    "REASON_HTTP_DISABLED",
    "REASON_INVALID_PORT",
    "REASON_NO_ADDRESSES",
    "REASON_PLAINTEXT_ALLOWED",
    "REASON_SNI_ABSENT",
    "REASON_SNI_ALLOWED",
    "REASON_SNI_INVALID",
    "REASON_SNI_MISMATCH",
    "REASON_SNI_MISSING",
    "REASON_SNI_NOT_ALLOWED",
    "REASON_TLS_REQUIRED",
    "REASON_WOULD_DENY",
    "STATUS_ALLOWED",
    "STATUS_DENIED",
    "STATUS_REPORTED",
    "STATUS_SNI_MISMATCH",
    "Decision",
    "decide_addresses",
    "decide_destination",
    "decide_http",
    "decide_plaintext",
    "decide_sni",
]

# Status words (a subset of DESIGN.md's closed set; the proxy owns the others).
STATUS_ALLOWED = "allowed"
STATUS_DENIED = "denied"
STATUS_SNI_MISMATCH = "sni_mismatch"
STATUS_REPORTED = "reported"

# Reasons. Detail after ": " is given in brackets.
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


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check: may the request proceed, and why."""

    allowed: bool
    status: str
    reason: str
    rule: Rule | None = None

    def __bool__(self) -> bool:
        return self.allowed


def _detail(reason: str, detail: object) -> str:
    return f"{reason}: {detail}"


def _allow(reason: str, rule: Rule | None = None) -> Decision:
    return Decision(True, STATUS_ALLOWED, reason, rule)


def _refuse(identity: Identity, status: str, reason: str, rule: Rule | None = None) -> Decision:
    """A refusal, or in report mode the record of one that lets the request through."""
    if identity.mode == "report":
        return Decision(True, STATUS_REPORTED, _detail(REASON_WOULD_DENY, reason), rule)
    return Decision(False, status, reason, rule)


def decide_destination(identity: Identity, host: Host, port: int) -> Decision:
    """Step 1: may `identity` connect to `host` at `port`?"""
    if type(port) is not int or not 1 <= port <= 65535:
        # A programming error upstream, never relaxed: there is no such destination.
        return Decision(False, STATUS_DENIED, REASON_INVALID_PORT)
    rule = identity.match(host, port)
    if rule is not None:
        return _allow(_detail(REASON_DESTINATION_ALLOWED, rule.text), rule)
    return _refuse(identity, STATUS_DENIED, REASON_DESTINATION_NOT_ALLOWED)


def decide_addresses(
    policy: Policy,
    identity: Identity,
    addresses: Sequence[IPAddress | str],
    port: int,
) -> Decision:
    """Step 2: may the proxy dial these resolved addresses? Never relaxed by report mode.

    One forbidden address refuses the request, even if others are fine: the proxy would
    otherwise have to trust that it dials only the good ones, and a rebinding attacker
    controls the order. An address the identity names explicitly (IP or CIDR rule, at
    this port) is allowed even inside a forbidden range.
    """
    if not addresses:
        return Decision(False, STATUS_DENIED, REASON_NO_ADDRESSES)
    override: Rule | None = None
    for address in addresses:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        forbidden = policy.forbidden.match(ip)
        if forbidden is None:
            continue
        rule = identity.allows_address(ip, port)
        if rule is None:
            return Decision(False, STATUS_DENIED, _detail(REASON_FORBIDDEN_ADDRESS, f"{ip} in {forbidden}"))
        override = override or rule
    if override is not None:
        return _allow(_detail(REASON_FORBIDDEN_ADDRESS_ALLOWED, override.text), override)
    return _allow(REASON_ADDRESSES_ALLOWED)


def decide_plaintext(identity: Identity) -> Decision:
    """Step 3: the stream is not TLS; only identities with ``require_tls: false`` pass."""
    if not identity.require_tls:
        return _allow(REASON_PLAINTEXT_ALLOWED)
    return _refuse(identity, STATUS_DENIED, REASON_TLS_REQUIRED)


def decide_http(identity: Identity) -> Decision:
    """May `identity` use plain-HTTP forwarding of http:// URLs at all?"""
    if identity.allow_http:
        return _allow(REASON_HTTP_ALLOWED)
    return _refuse(identity, STATUS_DENIED,
                   f"{REASON_HTTP_DISABLED} for identity {identity.name} (allow_http: false); use CONNECT")


def decide_sni(identity: Identity, target: Host, port: int, sni: str | None) -> Decision:
    """Step 4: judge the ClientHello's server_name against the CONNECT target.

    CONNECT to a name: the SNI must be present, equal to the target after normalization,
    and allowed at this port; otherwise the client could tunnel to one allowed name and
    speak TLS to another host behind the same address. CONNECT to an IP: there is no
    name to compare, so an SNI, if present, must itself be allowed; absent is fine.
    """
    if sni is None:
        if target.ip is None:
            return _refuse(identity, STATUS_SNI_MISMATCH, REASON_SNI_MISSING)
        return _allow(REASON_SNI_ABSENT)
    try:
        sni_host = parse_host(sni)
    except HostError as err:
        return _refuse(identity, STATUS_SNI_MISMATCH, _detail(REASON_SNI_INVALID, err))
    if target.ip is None and sni_host.name != target.name:
        return _refuse(identity, STATUS_SNI_MISMATCH, _detail(REASON_SNI_MISMATCH, sni_host.name))
    rule = identity.match(sni_host, port)
    if rule is None:
        return _refuse(identity, STATUS_SNI_MISMATCH, _detail(REASON_SNI_NOT_ALLOWED, sni_host.name))
    return _allow(_detail(REASON_SNI_ALLOWED, rule.text), rule)
