"""The compiled policy: immutable identities, rules and key table.

A `Policy` is built once per load and never changes; the proxy swaps the reference on
reload, and each connection reads it once. Every lookup here is a hash lookup whose cost
does not depend on the number of rules or keys:

- exact names: dict name -> rules;
- wildcards: dict suffix -> rules, probed once per parent suffix of the host (O(labels));
- IPs and CIDRs: `NetworkIndex`, one dict probe per distinct prefix length;
- API keys: dict SHA-256 digest -> identity.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .addresses import DEFAULT_FORBIDDEN, ForbiddenRanges, IPAddress, NetworkIndex, network_key
from .hosts import Host, unwrap

__all__ = ["MODES", "Identity", "Policy", "PolicyError", "PortRange", "Rule", "key_digest"]

MODES = ("enforce", "report")
RULE_KINDS = ("domain", "wildcard", "ip", "cidr")


class PolicyError(Exception):
    """A policy that cannot be used; `problems` lists every reason, one line each.

    Problems name the identity and the offending entry, never an API key value; they do
    not repeat the file name, which is `source` (str() puts it in front, once).
    """

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems) or ("invalid policy",)
        self.source = source
        super().__init__(*self.problems)

    def __str__(self) -> str:
        joined = "; ".join(self.problems)
        return f"{self.source}: {joined}" if self.source else joined


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive port range; a single port is ``PortRange(p, p)``."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high <= 65535:
            raise ValueError(f"invalid port range {self.low}-{self.high}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One allowed destination.

    `text` is the entry as written in the policy (for logs and explanations); `target`
    is its normalized match key: the host name (domain), the suffix after ``*.``
    (wildcard), the canonical address (ip) or network (cidr). `ports` None means any port.
    """

    text: str
    kind: str
    ports: PortRange | None
    target: str

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}")

    def __str__(self) -> str:
        return self.text


def _first_for_port(rules: Rule | tuple[Rule, ...], port: int) -> Rule | None:
    if type(rules) is Rule:
        ports = rules.ports
        return rules if ports is None or ports.low <= port <= ports.high else None
    for rule in rules:
        ports = rule.ports
        if ports is None or ports.low <= port <= ports.high:
            return rule
    return None


def _group(pairs: Iterable[tuple[str, Rule]]) -> Mapping[str, Rule | tuple[Rule, ...]]:
    grouped: dict[str, list[Rule]] = {}
    for key, rule in pairs:
        grouped.setdefault(key, []).append(rule)
    # A lone rule is stored bare, not in a 1-tuple: most keys have one rule, and every
    # object saved is one less to allocate on load and to free when a reload swaps it.
    return MappingProxyType({key: rules[0] if len(rules) == 1 else tuple(rules) for key, rules in grouped.items()})


@dataclass(frozen=True, slots=True, eq=False, kw_only=True)
class Identity:
    """A named set of clients (sharing API keys) and what they may reach.

    Identities compare by object: two loads of the same file give distinct identities,
    which is what revocation after a reload needs.
    """

    name: str
    mode: str = "enforce"
    require_tls: bool = True
    allow_http: bool = True
    max_tunnels: int | None = None
    rules: tuple[Rule, ...] = ()
    _names: Mapping[str, Rule | tuple[Rule, ...]] = field(init=False, repr=False)
    _suffixes: Mapping[str, Rule | tuple[Rule, ...]] = field(init=False, repr=False)
    _networks: NetworkIndex[Rule] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        object.__setattr__(self, "rules", tuple(self.rules))
        # A repeated entry (same kind, target and ports) can never be the first match;
        # indexing it once keeps per-key lists short however a policy was copy-pasted.
        seen: set[tuple[str, str, PortRange | None]] = set()
        rules = []
        for rule in self.rules:
            key = (rule.kind, rule.target, rule.ports)
            if key not in seen:
                seen.add(key)
                rules.append(rule)
        object.__setattr__(self, "_names", _group((r.target, r) for r in rules if r.kind == "domain"))
        object.__setattr__(self, "_suffixes", _group((r.target, r) for r in rules if r.kind == "wildcard"))
        networks = NetworkIndex((network_key(r.target), r) for r in rules if r.kind in ("ip", "cidr"))
        object.__setattr__(self, "_networks", networks)

    def match(self, host: Host, port: int) -> Rule | None:
        """The first rule allowing `host` at `port`, or None.

        Order (as the seed): exact domain, then wildcard suffixes from the nearest parent
        outwards; for an IP host, exact IPs and CIDRs from the most specific prefix.
        """
        if host.ip is not None:
            return self.allows_address(host.ip, port)
        name = host.name
        rules = self._names.get(name)
        if rules is not None:
            rule = _first_for_port(rules, port)
            if rule is not None:
                return rule
        suffixes = self._suffixes
        if suffixes:
            # Only whole parent names are probed, so "*.cdn.example.com" can never match
            # "cdn.example.com" itself or "evilcdn.example.com".
            dot = name.find(".")
            while dot != -1:
                rules = suffixes.get(name[dot + 1 :])
                if rules is not None:
                    rule = _first_for_port(rules, port)
                    if rule is not None:
                        return rule
                dot = name.find(".", dot + 1)
        return None

    def allows_address(self, ip: IPAddress, port: int) -> Rule | None:
        """The IP or CIDR rule naming `ip` at `port`, or None.

        Only explicit address rules count: this is what lets an identity reach an address
        that the forbidden ranges would otherwise refuse.
        """
        ip = unwrap(ip)
        for rule in self._networks.lookup(ip.version, int(ip)):
            ports = rule.ports
            if ports is None or ports.low <= port <= ports.high:
                return rule
        return None


def key_digest(api_key: str | bytes) -> bytes:
    """SHA-256 of an API key as presented (UTF-8); the form keys are stored in."""
    if isinstance(api_key, str):
        api_key = api_key.encode("utf-8", "surrogateescape")
    return hashlib.sha256(api_key).digest()


# Compared against when a presented key is unknown, so both paths do the same work.
_NO_ENTRY: tuple[bytes, Identity | None] = (bytes(32), None)


@dataclass(frozen=True, slots=True, eq=False, kw_only=True)
class Policy:
    """An immutable, compiled policy snapshot.

    `key_digests` maps the SHA-256 digest of every API key to its identity's name; keys
    themselves are never held. `digest` is a short hash of the source text, a version
    string for logs.
    """

    identities: Mapping[str, Identity]
    key_digests: Mapping[bytes, str] = field(repr=False)
    forbidden: ForbiddenRanges = DEFAULT_FORBIDDEN
    digest: str = ""
    _keys: Mapping[bytes, tuple[bytes, Identity]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        identities = MappingProxyType(dict(self.identities))
        keys = {d: (d, identities[name]) for d, name in self.key_digests.items()}
        object.__setattr__(self, "identities", identities)
        object.__setattr__(self, "key_digests", MappingProxyType(dict(self.key_digests)))
        object.__setattr__(self, "_keys", keys)

    def authenticate(self, api_key: str | bytes) -> Identity | None:
        """The identity owning `api_key`, or None.

        The key is hashed and looked up by digest, then the stored digest is compared in
        constant time; an unknown key runs the same comparison against a dummy, so the
        time taken does not depend on whether, or how closely, a key matches. A
        ``sha256:<hex>`` entry is matched by the key whose digest it is, never by the hex
        text itself.
        """
        try:
            presented = key_digest(api_key)
        except UnicodeEncodeError:
            return None
        stored, identity = self._keys.get(presented, _NO_ENTRY)
        if hmac.compare_digest(stored, presented) and identity is not None:
            return identity
        return None

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def destination_count(self) -> int:
        return sum(len(identity.rules) for identity in self.identities.values())
