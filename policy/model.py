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
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

from .addresses import (
    DEFAULT_FORBIDDEN,
    ForbiddenRanges,
    IPAddress,
    IPv4Address,
    NetworkIndex,
    NetworkKey,
    contains,
    network_key,
)
from .hosts import Host, unwrap

__all__ = ["MODES", "Identity", "Policy", "PolicyError", "PortRange", "Rule", "key_digest", "port_range"]

MODES = ("enforce", "report")
RULE_KINDS = ("domain", "wildcard", "ip", "cidr")


class PolicyError(Exception):
    """A policy that cannot be used; `problems` lists every reason, one line each.

    Problems name the identity and the offending entry, never an API key value; they do
    not repeat the file name, which is `source` (str() puts it in front, once).
    `position` is the (line, column), both from 1, that the problems point at when there
    is one place to point at (a YAML syntax error): str() then starts ``source:L:C:``, the
    form editors and CI annotations jump to.
    """

    def __init__(self, problems: Iterable[str], source: str | None = None,
                 position: tuple[int, int] | None = None) -> None:
        self.problems: tuple[str, ...] = tuple(problems) or ("invalid policy",)
        self.source = source
        self.position = position
        super().__init__(*self.problems)

    def where(self, source: str | None = None) -> str:
        """``source``, or ``source:L:C`` with a position (`source` defaults to the error's)."""
        source = self.source if source is None else source
        if self.position is None:
            return source or ""
        line, column = self.position
        return f"{source}:{line}:{column}" if source else f"{line}:{column}"

    def __str__(self) -> str:
        joined = "; ".join(self.problems)
        where = self.where()
        return f"{where}: {joined}" if where else joined


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


class Rule(NamedTuple):
    """One allowed destination.

    `text` is the entry as written in the policy (for logs and explanations); `kind` one
    of RULE_KINDS; `target` its normalized match key: the host name (domain), the suffix
    after ``*.`` (wildcard), the canonical address (ip) or network (cidr). `ports` None
    means any port. (A tuple: the compiled policy stores rules as plain data and builds
    these values cheaply when a request matches one.)
    """

    text: str
    kind: str
    ports: PortRange | None
    target: str

    def __str__(self) -> str:
        return self.text


_new_rule = tuple.__new__


_ANY_PORT = 0  # the port code of a rule without ports
_BUILT_LIMIT = 1024  # Rule values kept per identity once built


def port_range(low: int, high: int) -> PortRange:
    """The PortRange low-high, shared: policies repeat a few ranges (443, 8000-8100...)
    across many rules, and rules are rebuilt from the compact form on every match."""
    ports = _PORT_RANGES.get((low, high))
    if ports is None:
        ports = PortRange(low, high)
        if len(_PORT_RANGES) < 4096:
            _PORT_RANGES[(low, high)] = ports
    return ports


_PORT_RANGES: dict[tuple[int, int], PortRange] = {}


def _port_code(ports: PortRange | None) -> int:
    return _ANY_PORT if ports is None else ports.low << 16 | ports.high


def _index(pairs: Iterable[tuple[str, int]]) -> dict[str, int | tuple[int, ...]]:
    """key -> rule number, or a tuple of them (the collector stops tracking a tuple of
    numbers after its first look at it)."""
    grouped: dict[str, list[int]] = {}
    for key, number in pairs:
        grouped.setdefault(key, []).append(number)
    index = {key: numbers[0] if len(numbers) == 1 else tuple(numbers) for key, numbers in grouped.items()}
    release(grouped)
    return index


def release(*containers: list[Any] | set[Any] | dict[Any, Any]) -> None:
    """Empty big temporary containers one item at a time. Freeing a container is one C
    call that holds the GIL until every item in it is gone: policies compile in a thread
    while the event loop serves tunnels, and dropping 100,000 rule tuples at once stops
    the loop for tens of milliseconds (a reload stall); item by item, it gets the GIL
    back in between."""
    for container in containers:
        if isinstance(container, dict):
            while container:
                container.popitem()
        else:
            while container:
                container.pop()


class Identity:
    """A named set of clients (sharing API keys, or client certificates carrying one of
    `certificates`) and what they may reach.

    Immutable. Identities compare by object: two loads of the same file give distinct
    identities, which is what revocation after a reload needs.

    Rules are stored as data the garbage collector need not look at (strings, numbers,
    and one array and one tuple per identity, never an object per rule): a policy of
    100,000 destinations then costs a full collection nothing, so no collection pauses
    live tunnels for it and nothing needs freezing. `Rule` values are built when asked
    for (`match`, `rules`).
    """

    __slots__ = ("name", "mode", "require_tls", "allow_http", "max_tunnels", "certificates",
                 "_texts", "_kinds", "_ports", "_targets", "_names", "_suffixes", "_networks", "_built")

    def __init__(self, *, name: str, mode: str = "enforce", require_tls: bool = True, allow_http: bool = True,
                 max_tunnels: int | None = None, rules: Iterable[Rule] = (), certificates: Iterable[str] = ()) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        kept = list(rules)
        texts = tuple(rule.text for rule in kept)
        targets = tuple(rule.target for rule in kept)
        kinds = bytes(RULE_KINDS.index(rule.kind) for rule in kept)
        # A repeated entry (same kind, target and ports) can never be the first match;
        # indexing it once keeps per-key lists short however a policy was copy-pasted.
        seen: set[tuple[str, str, PortRange | None]] = set()
        numbered = []
        for number, rule in enumerate(kept):
            key = (rule.kind, rule.target, rule.ports)
            if key not in seen:
                seen.add(key)
                numbered.append((number, rule))
        fields = {
            "name": name, "mode": mode, "require_tls": require_tls, "allow_http": allow_http,
            "max_tunnels": max_tunnels, "certificates": tuple(certificates),
            "_texts": texts, "_targets": targets, "_kinds": kinds,
            "_ports": array("I", (_port_code(rule.ports) for rule in kept)),
            "_names": MappingProxyType(_index((r.target, i) for i, r in numbered if r.kind == "domain")),
            "_suffixes": MappingProxyType(_index((r.target, i) for i, r in numbered if r.kind == "wildcard")),
            "_networks": NetworkIndex((network_key(r.target), i) for i, r in numbered if r.kind in ("ip", "cidr")),
            "_built": {},
        }
        for field_name, value in fields.items():
            object.__setattr__(self, field_name, value)
        release(kept, numbered, seen)  # Rule values are not kept: built again when asked for

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Identity is immutable (cannot set {name!r})")

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, mode={self.mode!r}, rules={len(self._texts)})"

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every rule, in policy order."""
        return tuple(self._rule(i) for i in range(len(self._texts)))

    @property
    def rule_count(self) -> int:
        return len(self._texts)

    def _rule(self, number: int) -> Rule:
        rule = self._built.get(number)
        if rule is None:
            code = self._ports[number]
            ports = None if code == _ANY_PORT else port_range(code >> 16, code & 0xFFFF)
            rule = _new_rule(Rule, (self._texts[number], RULE_KINDS[self._kinds[number]], ports, self._targets[number]))
            # The rules requests actually match are kept, up to a bound: few objects for
            # the collector, and a hit costs a dict lookup.
            if len(self._built) < _BUILT_LIMIT:
                self._built[number] = rule
        return rule

    def _first_for_port(self, hit: int | tuple[int, ...], port: int) -> Rule | None:
        codes = self._ports
        for number in (hit,) if type(hit) is int else hit:
            code = codes[number]
            if code == _ANY_PORT or code >> 16 <= port <= code & 0xFFFF:
                return self._rule(number)
        return None

    def match(self, host: Host, port: int) -> Rule | None:
        """The first rule allowing `host` at `port`, or None.

        Order (as the seed): exact domain, then wildcard suffixes from the nearest parent
        outwards; for an IP host, exact IPs and CIDRs from the most specific prefix.
        """
        if host.ip is not None:
            return self.allows_address(host.ip, port)
        name = host.name
        hit = self._names.get(name)
        if hit is not None:
            rule = self._first_for_port(hit, port)
            if rule is not None:
                return rule
        suffixes = self._suffixes
        if suffixes:
            # Only whole parent names are probed, so "*.cdn.example.com" can never match
            # "cdn.example.com" itself or "evilcdn.example.com".
            dot = name.find(".")
            while dot != -1:
                hit = suffixes.get(name[dot + 1 :])
                if hit is not None:
                    rule = self._first_for_port(hit, port)
                    if rule is not None:
                        return rule
                dot = name.find(".", dot + 1)
        return None

    def allows_address(self, ip: IPAddress, port: int, inside: NetworkKey | None = None) -> Rule | None:
        """The IP or CIDR rule naming `ip` at `port`, or None.

        With `inside` (a forbidden range holding `ip`), only a rule that names exactly this
        address, or a network lying entirely inside that range, counts: this is what lets
        an identity reach an address the forbidden ranges would otherwise refuse, and a
        broad rule such as ``0.0.0.0/0`` must never do that.
        """
        if type(ip) is IPv4Address:  # the usual case, without Python-level property calls
            version, value = 4, ip._ip  # noqa: SLF001
        else:
            ip = unwrap(ip)
            version, value = ip.version, int(ip)
        codes = self._ports
        for number in self._networks.lookup(version, value):
            code = codes[number]
            if code == _ANY_PORT or code >> 16 <= port <= code & 0xFFFF:
                if inside is None or RULE_KINDS[self._kinds[number]] == "ip" \
                        or contains(inside, network_key(self._targets[number])):
                    return self._rule(number)
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
    themselves are never held. `certificates` maps every `client_certificates` entry (in
    its canonical form, policy/certificates.py) to its identity's name. `digest` is a
    short hash of the source text, a version string for logs. `test_count` is how many
    entries of the file's `tests:` section the policy passed when it was loaded
    (policy/expectations.py).
    """

    identities: Mapping[str, Identity]
    key_digests: Mapping[bytes, str] = field(repr=False)
    certificates: Mapping[str, str] = field(default_factory=dict)
    forbidden: ForbiddenRanges = DEFAULT_FORBIDDEN
    digest: str = ""
    test_count: int = 0
    _keys: Mapping[bytes, tuple[bytes, Identity]] = field(init=False, repr=False)
    # Allowing verdicts by what they were judged on (policy/decide.py, judge): the one
    # mutable part of a snapshot, a memory that goes with it when a reload replaces it.
    verdicts: dict[tuple[object, ...], object] = field(init=False, repr=False, default_factory=dict)
    _certs: Mapping[str, Identity] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        identities = MappingProxyType(dict(self.identities))
        keys = {d: (d, identities[name]) for d, name in self.key_digests.items()}
        object.__setattr__(self, "identities", identities)
        object.__setattr__(self, "key_digests", MappingProxyType(dict(self.key_digests)))
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "certificates", MappingProxyType(dict(self.certificates)))
        object.__setattr__(self, "_certs", {entry: identities[name] for entry, name in self.certificates.items()})

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

    def by_certificate(self, entries: Iterable[str]) -> tuple[Identity, ...]:
        """The identities a verified certificate's entries (policy/certificates.py) name,
        each once, in the order of the entries: none, one, or (a certificate carrying
        names of two identities) several, which the caller must refuse, not choose from."""
        found: list[Identity] = []
        certs = self._certs
        for entry in entries:
            identity = certs.get(entry)
            if identity is not None and identity not in found:
                found.append(identity)
        return tuple(found)

    @property
    def key_count(self) -> int:
        return len(self._keys)

    @property
    def destination_count(self) -> int:
        return sum(identity.rule_count for identity in self.identities.values())
