"""The command line, run as a user runs it: `python egress_guard.py ...` in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FULL = ROOT / "tests" / "fixtures" / "policies" / "full.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "egress_guard.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_help_lists_commands_and_every_environment_variable() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for word in ("check-policy", "explain", "serve", "--version"):
        assert word in result.stdout
    from proxy.settings import defaults_table

    for variable, default, _ in defaults_table():
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(variable + " "))
        assert default in line


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("egress-guard ")


def test_check_policy_ok_prints_a_summary() -> None:
    result = cli("check-policy", "egress-policy.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "egress-policy.yaml: ok: 3 identities, 6 API keys, 7 destinations, 3 tests passed"


BAD_POLICIES = [
    ("missing-file", None, "file not found"),
    ("bad-yaml", "identities: [unclosed\n", "invalid YAML"),
    ("no-identities", "settings: {}\n", "identities"),
    ("identity-without-keys", "identities:\n  web:\n    allowed_destinations: [a.example]\n", "web"),
    ("bad-destination", "identities:\n  web:\n    api_keys: [k1]\n    allowed_destinations: ['a.*.b']\n", "a.*.b"),
    ("cidr-33", "identities:\n  web:\n    api_keys: [k1]\n    allowed_destinations: ['10.0.0.0/33']\n", "10.0.0.0/33"),
    ("url", "identities:\n  web:\n    api_keys: [k1]\n    allowed_destinations: ['https://a.example']\n", "https://a.example"),
    ("unknown-field", "identities:\n  web:\n    api_keys: [k1]\n    allowed_destination: [a.example]\n", "allowed_destination"),
    ("not-a-mapping", "- just\n- a list\n", "mapping"),
]


@pytest.mark.parametrize("text,words", [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES])
def test_check_policy_refuses_bad_files(tmp_path: Path, text: str | None, words: str) -> None:
    path = tmp_path / "policy.yaml"
    if text is not None:
        path.write_text(text)
    result = cli("check-policy", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # FILE: problem, or FILE:LINE:COLUMN: problem where there is one place to point at
    assert lines and all(re.match(rf"{re.escape(str(path))}(:\d+:\d+)?: ", line) for line in lines), lines
    assert words.lower() in result.stderr.lower()


TESTED = """\
identities:
  web:
    api_keys: [web-secret-key]
    allowed_destinations: [api.example.com, "*.cdn.example.com"]
  meta:
    api_keys: [meta-secret-key]
    allowed_destinations: ["169.254.169.254:80"]
tests:
  - identity: web
    destination: api.example.com:443
    expect: allowed
  - name: no metadata for web
    identity: web
    destination: 169.254.169.254:80
    expect: {metadata}
  - identity: web
    destination: img.cdn.example.com
    expect: allowed
  - identity: meta
    destination: api.example.com
    expect: {api}
"""


def test_check_policy_counts_the_tests_that_passed(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(TESTED.format(metadata="denied", api="denied"))
    result = cli("check-policy", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok: 2 identities, 2 API keys, 3 destinations, 4 tests passed"
    path.write_text(TESTED.split("tests:")[0] + "tests:\n  - {identity: web, destination: a.cdn.example.com, "
                                                "expect: allowed}\n")
    assert cli("check-policy", str(path)).stdout.strip().endswith(", 3 destinations, 1 test passed")
    path.write_text(TESTED.split("tests:")[0])
    assert cli("check-policy", str(path)).stdout.strip().endswith(", 3 destinations")  # no tests, no mention


def test_check_policy_names_each_failing_test(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(TESTED.format(metadata="allowed", api="allowed"))
    result = cli("check-policy", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: tests[1] (no metadata for web): identity web, destination 169.254.169.254:80: "
        "expected allowed, got denied (reason: destination not allowed)",
        f"{path}: tests[3]: identity meta, destination api.example.com:443: "
        "expected allowed, got denied (reason: destination not allowed)",
    ]
    assert "secret" not in result.stderr


def test_check_policy_reports_bad_tests_with_the_other_problems(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(TESTED.format(metadata="denied", api="allow").replace("identity: meta", "identity: meta-secret-key"))
    result = cli("check-policy", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: tests[3] identity: that is an API key of identity 'meta', not an identity name (write identity: meta)",
        f"{path}: tests[3] expect 'allow': must be 'allowed' or 'denied'",
    ]


YAML_MISTAKES = [
    # (name, text, where the line starts after the path, how it ends)
    ("wildcard", "identities:\n  web:\n    api_keys: [k1]\n    allowed_destinations:\n      - *.example.com\n",
     ":5:10: invalid YAML: while scanning an alias: ",
     '; hint: quote wildcard entries, as in "*.example.com" (YAML reads a leading * as an alias)'),
    ("tab", "identities:\n  web:\n\tapi_keys: [k1]\n", ":3:1: invalid YAML: while scanning for the next token: ",
     "; hint: indent with spaces; YAML does not allow tabs"),
    ("unclosed", "identities: [unclosed\n", ":2:1: invalid YAML: while parsing a flow sequence: ", "or ']'"),
]


@pytest.mark.parametrize("text,start,end", [c[1:] for c in YAML_MISTAKES], ids=[c[0] for c in YAML_MISTAKES])
def test_check_policy_yaml_error_is_file_line_column(tmp_path: Path, text: str, start: str, end: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    result = cli("check-policy", str(path))
    assert result.returncode == 1
    (printed,) = result.stderr.splitlines()
    assert printed.startswith(f"{path}{start}") and printed.endswith(end), printed


def test_check_policy_names_both_identities_never_the_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "identities:\n"
        "  alpha:\n    api_keys: [shared-secret-key-xyz]\n    allowed_destinations: [a.example]\n"
        "  beta:\n    api_keys: [shared-secret-key-xyz]\n    allowed_destinations: ['*', b.example]\n"
    )
    result = cli("check-policy", str(path))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 2  # one line per problem
    assert "alpha" in result.stderr and "beta" in result.stderr
    assert "shared-secret-key-xyz" not in result.stderr + result.stdout


EXPLAIN = [
    # (name, args, exit code, lines that must appear)
    ("allowed-exact", ["--key", "web-key-1", "--dest", "api.example.com:443"], 0,
     ["allowed", "identity: web", "rule: api.example.com"]),
    ("allowed-wildcard", ["--key", "web-key-1", "--dest", "img.cdn.example.com:443"], 0,
     ["allowed", "rule: *.cdn.example.com"]),
    ("allowed-hashed-key", ["--key", "hashed-secret-1", "--dest", "api.example.com:443"], 0, ["allowed", "identity: web"]),
    ("denied-destination", ["--key", "web-key-1", "--dest", "evil.example.com:443"], 1,
     ["denied", "identity: web", "reason: destination not allowed"]),
    ("denied-port", ["--key", "web-key-1", "--dest", "pay.example.com:8443"], 1, ["denied"]),
    ("unknown-key", ["--key", "nobody", "--dest", "api.example.com:443"], 1, ["denied", "reason: unknown API key"]),
    ("sni-mismatch", ["--key", "web-key-1", "--dest", "api.example.com:443", "--sni", "evil.example.com"], 1,
     ["denied", "reason: sni does not match target"]),
    ("sni-match", ["--key", "web-key-1", "--dest", "api.example.com:443", "--sni", "API.example.com"], 0, ["allowed"]),
    ("ip-in-cidr", ["--key", "web-key-1", "--dest", "10.0.0.7:5432"], 0, ["allowed", "rule: 10.0.0.0/24:5432"]),
    ("forbidden-address", ["--key", "web-key-1", "--dest", "127.0.0.1:443"], 1, ["denied"]),
    ("metadata-allowed-explicitly", ["--key", "batch-key-1", "--dest", "169.254.169.254:80"], 0, ["allowed"]),
    ("report-mode", ["--key", "canary-key-1", "--dest", "other.example.com:443"], 0,
     ["allowed", "identity: canary", "reason: report mode lets it through"]),
]


@pytest.mark.parametrize("args,code,lines", [c[1:] for c in EXPLAIN], ids=[c[0] for c in EXPLAIN])
def test_explain(args: list[str], code: int, lines: list[str]) -> None:
    result = cli("explain", str(FULL), *args)
    assert result.returncode == code, result.stdout + result.stderr
    for line in lines:
        assert any(out.startswith(line) for out in result.stdout.splitlines()), (line, result.stdout)
    key = args[args.index("--key") + 1]
    assert key not in result.stdout + result.stderr


@pytest.mark.parametrize("dest", ["2130706433:443", "a.example:0", "user@a.example:443", "[::1:443"])
def test_explain_bad_destination_is_exit_2(dest: str) -> None:
    result = cli("explain", str(FULL), "--key", "web-key-1", "--dest", dest)
    assert result.returncode == 2
    assert "invalid --dest" in result.stderr and "Traceback" not in result.stderr


def test_explain_bad_policy_is_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("identities: {}\n")
    result = cli("explain", str(path), "--key", "k", "--dest", "a.example:443")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_check_policy_warns_about_wide_networks_without_failing(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "identities:\n"
        "  wide:\n    api_keys: [k1]\n    allowed_destinations: ['0.0.0.0/0:443', '10.0.0.0/8', '10.1.0.0/16', '::/0']\n"
    )
    result = cli("check-policy", str(path))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if ": warning: " in line]
    assert len(warnings) == 3, result.stderr  # /0, /8 and ::/0; not the /16
    assert "'0.0.0.0/0:443' is a /0 network" in result.stderr and "never unlocks a forbidden address" in result.stderr
    assert "10.1.0.0/16" not in result.stderr
    assert result.stdout.startswith(f"{path}: ok:")


def test_explain_notes_the_sni_only_for_an_allowed_name() -> None:
    allowed = cli("explain", "egress-policy.yaml", "--identity", "frontend-services", "--dest", "api.example.com:443")
    assert allowed.returncode == 0, allowed.stderr
    assert "note: the TLS ClientHello must carry SNI api.example.com" in allowed.stdout
    denied = cli("explain", "egress-policy.yaml", "--identity", "frontend-services", "--dest", "api.example.com:443",
                 "--address", "169.254.169.254")
    assert denied.returncode == 1
    assert denied.stdout.splitlines()[:3] == [
        "denied", "identity: frontend-services", "reason: forbidden address: 169.254.169.254 in 169.254.0.0/16 (link-local)"]
    assert "must carry SNI" not in denied.stdout


CERT_POLICY = """
identities:
  web:
    client_certificates: ["uri:spiffe://cluster.local/ns/shop/sa/web", "dns:web.shop.svc"]
    allowed_destinations: ["api.example.com"]
  legacy:
    api_keys: ["legacy-key"]
    allowed_destinations: ["api.example.com"]
"""


@pytest.mark.parametrize(("args", "code", "lines"), [
    (["--cert-uri", "spiffe://cluster.local/ns/shop/sa/web"], 0, ["allowed", "identity: web (by client certificate)"]),
    (["--cert-dns", "WEB.shop.svc."], 0, ["allowed", "identity: web (by client certificate)"]),
    (["--cert-cn", "nobody"], 1, ["denied", "reason: client certificate matches no identity: cn:nobody"]),
    (["--cert-cn", "nobody", "--key", "legacy-key"], 0, ["allowed", "identity: legacy (by API key)"]),
    (["--cert-dns", "web.shop.svc", "--key", "legacy-key"], 1,
     ["denied", "reason: client certificate and API key name different identities: certificate: web, API key: legacy"]),
], ids=["uri", "dns", "unmatched", "unmatched-with-key", "disagree"])
def test_explain_with_certificate_names(tmp_path: Path, args: list[str], code: int, lines: list[str]) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(CERT_POLICY)
    result = cli("explain", str(path), "--dest", "api.example.com:443", *args)
    assert result.returncode == code, result.stdout + result.stderr
    for line in lines:
        assert any(out.startswith(line) for out in result.stdout.splitlines()), (line, result.stdout)


@pytest.mark.parametrize(("args", "problem"), [
    (["--identity", "web", "--cert-cn", "x"], "--identity names the identity already"),
    ([], "say who asks"),
])
def test_explain_needs_one_way_to_say_who_asks(tmp_path: Path, args: list[str], problem: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(CERT_POLICY)
    result = cli("explain", str(path), "--dest", "api.example.com:443", *args)
    assert result.returncode == 2 and problem in result.stderr, result.stderr
