"""The command line: `--help`, `--version`, `check-policy` and `explain`.

`check-policy` and `explain` load a policy exactly as the server does and touch no
network, so they are safe in CI and pre-commit hooks.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import policy
from policy import PolicyError
from policy.load import warnings as policy_warnings
from policy.addresses import IPAddress
from policy.certificates import canonical
from proxy.dial import load_hosts_file
from proxy.settings import defaults_table
from wire import http

# The one place the version is written: pyproject.toml reads it, the image's label and
# CHANGELOG.md must agree (tests/test_package.py).
__version__ = "0.1.0"


def invoked_as() -> str:
    """How to call this program again: `egress-guard` (installed) or `python egress_guard.py`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name == "egress-guard" else "python egress_guard.py"


def _load(path: str) -> policy.Policy | None:
    """The policy in `path`, or None after printing one line per problem."""
    try:
        return policy.load_policy_file(path)
    except PolicyError as error:
        where = error.where(path)  # path:LINE:COLUMN for a YAML syntax error
        for problem in error.problems:
            print(f"{where}: {problem}", file=sys.stderr)
        return None


def check_policy(path: str) -> int:
    """`check-policy FILE`: validate exactly as the server would."""
    current = _load(path)
    if current is None:
        return 1
    for warning in policy_warnings(current):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    tests = current.test_count
    passed = f", {tests} test{'' if tests == 1 else 's'} passed" if tests else ""
    print(f"{path}: ok: {len(current.identities)} identities, {current.key_count} API keys, "
          f"{current.destination_count} destinations{passed}")
    return 0


class ExplainInputError(ValueError):
    """A request `explain` cannot judge; str() names the input and the problem."""


# How the inputs are named in problems: the command line's flags (the status page's
# form passes its own field names).
CLI_FIELDS = {"dest": "--dest", "sni": "--sni", "address": "--address", "http": "--http"}


@dataclass(frozen=True)
class Explanation:
    """How the policy judges one request: `status` is the decision word (`allowed`,
    `reported`, or the refusal's), `reason` why (None: allowed outright), `rule` the rule
    that matched, `notes` what the operator should know about the facts judged."""

    allowed: bool
    status: str
    identity: str
    reason: str | None
    rule: str | None
    notes: tuple[str, ...]
    proven_by: str | None = None  # "API key" or "client certificate" (None: named, not proven)

    def lines(self) -> list[str]:
        how = f" (by {self.proven_by})" if self.proven_by else ""
        lines = ["allowed" if self.allowed else "denied", f"identity: {self.identity}{how}"]
        if self.reason is not None:
            lines.append(f"reason: {self.reason}")
        if self.rule is not None:
            lines.append(f"rule: {self.rule}")
        return lines + [f"note: {note}" for note in self.notes]


def explain(path: str, key: str | None, dest: str, sni: str | None, *, identity_name: str | None = None,
            addresses: Sequence[str] = (), http_request: bool = False, hosts_file: str | None = None,
            certificate: Sequence[str] = ()) -> int:
    """`explain FILE (--key KEY | --identity NAME | --cert-uri/--cert-dns/--cert-cn VALUE...)
    --dest HOST:PORT [--sni NAME] [--address IP]... [--http]`: the decision, offline (see
    `judge_request`)."""
    if identity_name is not None and certificate:
        print("--identity names the identity already: give certificate names (--cert-*) with --key, or alone",
              file=sys.stderr)
        return 2
    if identity_name is None and key is None and not certificate:
        print("say who asks: --key KEY, --identity NAME, or a client certificate's --cert-uri/--cert-dns/--cert-cn",
              file=sys.stderr)
        return 2
    current = _load(path)
    if current is None:
        return 2
    try:
        explanation = judge_request(current, key, dest, sni, identity_name=identity_name, addresses=addresses,
                                    http_request=http_request, hosts_file=hosts_file, certificate=certificate)
    except ExplainInputError as error:
        print(error, file=sys.stderr)
        return 2
    print("\n".join(explanation.lines()))
    return 0 if explanation.allowed else 1


def judge_request(current: policy.Policy, key: str | None, dest: str, sni: str | None, *,
                  identity_name: str | None = None, addresses: Sequence[str] = (), http_request: bool = False,
                  hosts_file: str | None = None, fields: Mapping[str, str] = CLI_FIELDS,
                  certificate: Sequence[str] = ()) -> Explanation:
    """How `current` judges a request for `dest`, with what the live proxy would know.

    `certificate`: the entries a verified client certificate would carry (``uri:...``,
    ``dns:...``, ``cn:...``), judged as the TLS listener judges them, with `key` if given.

    The same check list as the live proxy (`policy.judge`): an IP target is its own
    address; a name's addresses are `addresses`, else its HOSTS_FILE entry (as the
    server reads it), else unknown (noted: names are never resolved here).
    `http_request` judges a plain-HTTP `http://` request. Bad input raises
    ExplainInputError, naming the input as `fields` calls it.
    """
    if http_request and dest[:7].lower() == "http://":
        dest = _url_target(dest) or dest  # an http:// URL, as the client sends it
    if "://" in dest:
        raise ExplainInputError(
            f"invalid {fields['dest']} {dest!r}: give HOST:PORT, not a URL (for {_url_hint(dest, fields)}); "
            f"add {fields['http']} for an http:// URL the client sends to the proxy as plain HTTP")
    try:
        host, port = http.parse_authority(dest, default_port=80 if http_request else 443)
    except http.HeadError as error:
        raise ExplainInputError(f"invalid {fields['dest']} {dest!r}: {error.message} (the proxy answers 400)") from None
    if http_request and sni is not None:
        raise ExplainInputError(f"{fields['sni']} and {fields['http']} do not go together: "
                                "a plain-HTTP request carries no TLS")
    resolved, source = _addresses(host, addresses, hosts_file, fields)
    question = policy.Question(host, port, http=http_request, addresses=resolved,
                               tls=True if sni is not None else None, sni=sni)
    identity = None
    if identity_name is not None:
        identity = current.identities.get(identity_name)
        if identity is None:
            known = ", ".join(sorted(current.identities)[:20])
            raise ExplainInputError(f"unknown identity {identity_name!r} (the policy has: {known})")
    proven = tuple(certificate)
    verdict = policy.judge(current, key, question, identity, certificate=proven)
    identity = verdict.identity
    if identity is None:
        return Explanation(False, policy.Status.AUTH_REQUIRED, "-", f"{verdict.reason} (the proxy answers 407)",
                           None, ())
    notes = []
    if source:
        notes.append(f"addresses of {host.name} from {source}: {', '.join(str(a) for a in resolved or ())}")
    elif host.ip is None:
        notes.append(f"{host.name} is not resolved here (give {fields['address']}, or HOSTS_FILE): each address "
                     "it resolves to must also be outside the forbidden ranges (unless allowed by IP/CIDR)")
    refusal = verdict.refusal
    if refusal is None and sni is None and host.ip is None and identity.require_tls and not http_request:
        notes.append(f"the TLS ClientHello must carry SNI {host.name}")
    reason = None
    if refusal is not None:
        reason = refusal.reason
    elif verdict.reported:
        reason = f"report mode lets it through: {verdict.reason}"
    proven_by = None
    if identity_name is None:
        proven_by = "client certificate" if proven and current.by_certificate(proven) else "API key"
    return Explanation(refusal is None, verdict.status, identity.name, reason,
                       verdict.rule.text if verdict.rule is not None else None, tuple(notes), proven_by)


def _url_target(url: str) -> str | None:
    """The `HOST:PORT` an http(s):// URL's client asks the proxy for; None if there is none."""
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    port = {"https": 443, "http": 80}.get(scheme.lower())
    if not authority or port is None:
        return None
    has_port = authority.rpartition("]")[2].count(":") == 1 if authority.startswith("[") else ":" in authority
    return authority if has_port else f"{authority}:{port}"


def _url_hint(url: str, fields: Mapping[str, str]) -> str:
    """`https://api.example.com/v1` -> `... use --dest api.example.com:443`."""
    target = _url_target(url)
    return f"{url} use {fields['dest']} {target}" if target else f"{url} give the host and port the client CONNECTs to"


def _addresses(host: policy.Host, given: Sequence[str], hosts_file: str | None, fields: Mapping[str, str]
               ) -> tuple[tuple[IPAddress, ...] | None, str]:
    """(the addresses the check list judges, where they came from); ExplainInputError
    for a bad one."""
    flag = fields["address"]
    if host.ip is not None:
        if given:
            raise ExplainInputError(f"{flag} is for a name; {host.name} is an address already")
        return (host.ip,), ""
    if given:
        found = []
        for text in given:
            try:
                address = policy.parse_host(text).ip
            except policy.HostError as error:
                raise ExplainInputError(f"invalid {flag} {text!r}: {error}") from None
            if address is None:
                raise ExplainInputError(f"invalid {flag} {text!r}: not an IP address")
            found.append(policy.unwrap(address))
        return tuple(found), flag
    if hosts_file:
        try:
            table = load_hosts_file(hosts_file)
        except (OSError, ValueError) as error:
            raise ExplainInputError(f"cannot load HOSTS_FILE: {error}") from None
        pinned = table.get(host.name)
        if pinned:
            return tuple(policy.unwrap(a) for a in pinned), f"HOSTS_FILE {hosts_file}"
    return None, ""


def certificate_entries(args: argparse.Namespace) -> tuple[str, ...]:
    """The `--cert-*` values as the entries a verified certificate would carry."""
    return tuple(canonical(kind, value) for kind in ("uri", "dns", "cn") for value in getattr(args, f"cert_{kind}"))


def build_parser() -> argparse.ArgumentParser:
    rows = defaults_table()
    width = max(len(name) for name, _, _ in rows)
    environment = "\n".join(f"  {name:<{width}} {default:<31} {text}" for name, default, text in rows)
    parser = argparse.ArgumentParser(
        prog=invoked_as(),
        description="egress-guard: an HTTP CONNECT egress proxy with per-identity allowlists and SNI checks. "
                    "With no command, runs the proxy.",
        epilog=f"environment (variable, default, meaning):\n{environment}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"egress-guard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the proxy (the default; configured by the environment below)")
    check = commands.add_parser("check-policy", help="validate a policy file as the server would (exit 0 ok, 1 problems)")
    check.add_argument("file", help="policy YAML file")
    why = commands.add_parser("explain", help="show how a policy judges one request, offline "
                                              "(exit 0 allowed, 1 denied, 2 bad input)")
    why.add_argument("file", help="policy YAML file")
    who = why.add_mutually_exclusive_group()
    who.add_argument("--key", help="the API key (Basic username) the client sends")
    who.add_argument("--identity", help="the identity's name in the policy (instead of a key)")
    for kind, what in (("uri", "a URI subject alternative name, e.g. spiffe://cluster.local/ns/NS/sa/SA"),
                       ("dns", "a DNS subject alternative name"), ("cn", "the subject common name")):
        why.add_argument(f"--cert-{kind}", action="append", default=[], metavar="VALUE",
                         help=f"the client certificate carries {what} (repeatable; with or without --key)")
    why.add_argument("--dest", required=True, help="the CONNECT target, HOST:PORT or [IPv6]:PORT "
                                                   "(with --http: the http:// URL's host and port)")
    why.add_argument("--sni", help="the SNI the client's TLS ClientHello carries")
    why.add_argument("--address", action="append", default=[], metavar="IP",
                     help="an address the name resolves to (repeatable); default: its HOSTS_FILE entry")
    why.add_argument("--http", action="store_true",
                     help="judge a plain-HTTP request for an http:// URL (allow_http) instead of a CONNECT")
    return parser
