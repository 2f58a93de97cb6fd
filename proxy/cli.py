"""The command line: `--help`, `--version`, `check-policy` and `explain`.

`check-policy` and `explain` load a policy exactly as the server does and touch no
network, so they are safe in CI and pre-commit hooks.
"""

from __future__ import annotations

import argparse
import sys

import policy
from policy import PolicyError
from policy.load import warnings as policy_warnings
from proxy.settings import defaults_table
from wire import http

__version__ = "0.1.0"


def _load(path: str) -> policy.Policy | None:
    """The policy in `path`, or None after printing one line per problem."""
    try:
        return policy.load_policy_file(path)
    except PolicyError as error:
        for problem in error.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return None


def check_policy(path: str) -> int:
    """`check-policy FILE`: validate exactly as the server would."""
    current = _load(path)
    if current is None:
        return 1
    for warning in policy_warnings(current):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    print(f"{path}: ok: {len(current.identities)} identities, {current.key_count} API keys, "
          f"{current.destination_count} destinations")
    return 0


def explain(path: str, key: str, dest: str, sni: str | None) -> int:
    """`explain FILE --key KEY --dest HOST:PORT [--sni NAME]`: the decision, offline.

    The same check list as the live proxy (`policy.judge`), with what is known here: an
    IP target is its own address; a name is not resolved (noted instead).
    """
    current = _load(path)
    if current is None:
        return 2
    try:
        host, port = http.parse_authority(dest, default_port=443)
    except http.HeadError as error:
        print(f"invalid --dest {dest!r}: {error.message} (the proxy answers 400)", file=sys.stderr)
        return 2
    question = policy.Question(host, port, addresses=(host.ip,) if host.ip is not None else None,
                               tls=True if sni is not None else None, sni=sni)
    verdict = policy.judge(current, key, question)
    identity = verdict.identity
    if identity is None:
        print("denied\nidentity: -\nreason: unknown API key (the proxy answers 407)")
        return 1
    notes = []
    if host.ip is None:
        notes.append(f"{host.name} is not resolved here: each address it resolves to must also be "
                     "outside the forbidden ranges (unless allowed by IP/CIDR)")
    if sni is None and host.ip is None and identity.require_tls:
        notes.append(f"the TLS ClientHello must carry SNI {host.name}")
    refusal = verdict.refusal
    lines = ["denied" if refusal is not None else "allowed", f"identity: {identity.name}"]
    if refusal is not None:
        lines.append(f"reason: {refusal.reason}")
    elif verdict.reported:
        lines.append(f"reason: report mode lets it through: {verdict.reason}")
    if verdict.rule is not None:
        lines.append(f"rule: {verdict.rule.text}")
    lines += [f"note: {note}" for note in notes]
    print("\n".join(lines))
    return 1 if refusal is not None else 0


def build_parser() -> argparse.ArgumentParser:
    environment = "\n".join(f"  {name:<17} {default:<31} {text}" for name, default, text in defaults_table())
    parser = argparse.ArgumentParser(
        prog="egress_guard.py",
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
    why.add_argument("--key", required=True, help="the API key (Basic username) the client sends")
    why.add_argument("--dest", required=True, help="the CONNECT target, HOST:PORT or [IPv6]:PORT")
    why.add_argument("--sni", help="the SNI the client's TLS ClientHello carries")
    return parser
