"""`explain` and the live proxy run the same check list: one table of requests, fed to
`python egress_guard.py explain` and to a running `python egress_guard.py`, must get
the same decision and the same reason from both.

The live side is a real CONNECT with a real TLS ClientHello (Python `ssl`) to a local
TLS upstream, or a plain-HTTP `GET http://...` for the `--http` rows; names reach it
through the HOSTS_FILE, and `explain` is given the same HOSTS_FILE, as the live proxy
is: names pinned to a forbidden address (metadata.example.com, mixed.example.com) are
refused by both, and the rest resolve to 127.0.0.1, which the identities allow
explicitly. A row may give `--address` instead (what the name resolves to).
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from _support import REPO, Proxy, Upstream, basic, clean_env, connect, send_raw, tls_wrap

POLICY = """
identities:
  web:
    api_keys: ["web-key"]
    allowed_destinations: ["api.example.com", "*.example.org", "127.0.0.1", "metadata.example.com",
                           "mixed.example.com"]
    allow_http: false
  forwarder:
    api_keys: ["fwd-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1", "metadata.example.com"]
  low-ports:
    api_keys: ["ports-key"]
    allowed_destinations: ["api.example.com:1-1024", "127.0.0.1:1-1024"]
  canary:
    api_keys: ["canary-key"]
    mode: report
    allowed_destinations: ["127.0.0.1"]
"""

# (id, key, host, sni or None; "http" for a plain-HTTP request)
CASES = [
    ("allowed-name-sni-equal", "web-key", "api.example.com", "api.example.com"),
    ("name-pinned-to-metadata", "web-key", "metadata.example.com", "metadata.example.com"),
    ("name-with-one-forbidden-address", "web-key", "mixed.example.com", "mixed.example.com"),
    ("http-disabled", "web-key", "api.example.com", "http"),
    ("http-allowed", "fwd-key", "api.example.com", "http"),
    ("http-not-allowed-destination", "fwd-key", "other.example.com", "http"),
    ("http-forbidden-address", "fwd-key", "metadata.example.com", "http"),
    ("allowed-name-sni-other-case", "web-key", "api.example.com", "API.example.com"),
    ("sni-mismatch", "web-key", "api.example.com", "other.example.com"),
    ("destination-not-allowed", "web-key", "evil.example.com", "evil.example.com"),
    ("ip-no-sni", "web-key", "127.0.0.1", None),
    ("ip-sni-not-allowed", "web-key", "127.0.0.1", "evil.example.com"),
    ("ip-sni-allowed", "web-key", "127.0.0.1", "api.example.com"),
    ("ip-not-allowed", "web-key", "127.0.0.2", None),
    ("port-outside-range", "ports-key", "api.example.com", "api.example.com"),
    ("unknown-key", "nobody-key", "api.example.com", "api.example.com"),
    ("report-mode-would-deny", "canary-key", "other.example.com", "other.example.com"),
    ("report-mode-sni-would-deny", "canary-key", "127.0.0.1", "evil.example.com"),
]


@pytest.fixture(scope="module")
def proxy(module_proxies) -> Proxy:
    return module_proxies(POLICY)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("explain") / "policy.yaml"
    path.write_text(POLICY)
    return path


def explained(policy_file: Path, key: str, dest: str, sni: str | None, hosts: Path,
              *extra: str) -> tuple[str, str]:
    """(decision, reason) as `explain` prints them; reason "" when allowed outright."""
    args = [sys.executable, "egress_guard.py", "explain", str(policy_file), "--key", key, "--dest", dest, *extra]
    if sni == "http":
        args.append("--http")
    elif sni is not None:
        args += ["--sni", sni]
    env = {**clean_env(), "HOSTS_FILE": str(hosts)}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode in (0, 1), result.stderr
    lines = result.stdout.splitlines()
    reason = next((l[len("reason: "):] for l in lines if l.startswith("reason: ")), "")
    reason = reason.removesuffix(" (the proxy answers 407)").removeprefix("report mode lets it through: ")
    return lines[0], reason


def live(proxy: Proxy, ca, key: str, dest: str, sni: str | None) -> tuple[str, str]:
    """(decision, reason) the running proxy logged for the same request."""
    if sni == "http":
        head = f"GET http://{dest}/ HTTP/1.1\r\nHost: {dest}\r\nProxy-Authorization: {basic(key)}\r\n\r\n"
        with send_raw(proxy, head.encode()) as reply:
            line = proxy.decision(reply)
    else:
        line = _live_connect(proxy, ca, key, dest, sni)
    decision = "allowed" if line["action"] in ("allowed", "reported") else "denied"
    return decision, line["reason"] if line["action"] != "allowed" else ""


def _live_connect(proxy: Proxy, ca, key: str, dest: str, sni: str | None) -> dict:
    with connect(proxy, dest, key) as reply:
        if reply.status == 200:
            try:
                stream = tls_wrap(reply.sock, ca, sni, check_hostname=False)
                stream.close()
            except (ssl.SSLError, OSError):
                pass  # refused inside the tunnel: the decision line says why
        return proxy.decision(reply)


@pytest.mark.parametrize("key,host,sni", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_explain_agrees_with_the_live_proxy(proxy: Proxy, policy_file: Path, tls_upstream: Upstream, ca,
                                            key: str, host: str, sni: str | None) -> None:
    dest = f"{host}:{tls_upstream.port}"
    offline = explained(policy_file, key, dest, sni, proxy.hosts_path)
    online = live(proxy, ca, key, dest, sni)
    assert offline == online, f"explain said {offline}, the proxy did {online}"


def test_explain_judges_given_addresses_like_resolved_ones(policy_file: Path, tmp_path: Path) -> None:
    """`--address` stands for what the name resolves to, and wins over HOSTS_FILE."""
    empty = tmp_path / "hosts"
    empty.write_text("")
    dest = "api.example.com:443"
    assert explained(policy_file, "web-key", dest, dest[:-4], empty, "--address", "169.254.169.254") == (
        "denied", "forbidden address: 169.254.169.254 in 169.254.0.0/16 (link-local)")
    assert explained(policy_file, "web-key", dest, dest[:-4], empty, "--address", "93.184.216.34")[0] == "allowed"
    assert explained(policy_file, "web-key", dest, dest[:-4], empty, "--address", "93.184.216.34",
                     "--address", "10.0.0.1")[0] == "allowed"  # RFC 1918 is not forbidden by default
    assert explained(policy_file, "web-key", dest, dest[:-4], empty, "--address", "93.184.216.34",
                     "--address", "127.0.0.2")[0] == "denied"


@pytest.mark.parametrize("dest,hint", [
    ("https://api.example.com/v1", "use --dest api.example.com:443"),
    ("http://api.example.com:8080/x?y", "use --dest api.example.com:8080"),
    ("ftp://files.example.com/", "give the host and port the client CONNECTs to"),
])
def test_a_url_as_dest_gets_a_helpful_answer(policy_file: Path, dest: str, hint: str) -> None:
    result = subprocess.run([sys.executable, "egress_guard.py", "explain", str(policy_file), "--key", "web-key",
                             "--dest", dest], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "not a URL" in result.stderr and hint in result.stderr, result.stderr


def test_explain_by_identity_name_and_http_url(policy_file: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "egress_guard.py", "explain", str(policy_file), "--identity", "forwarder",
                             "--dest", "http://api.example.com/path", "--http", "--address", "127.0.0.1"],
                            cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["allowed", "identity: forwarder", "rule: api.example.com"]
