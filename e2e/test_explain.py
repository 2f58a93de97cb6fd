"""`explain` and the live proxy run the same check list: one table of requests, fed to
`python egress_guard.py explain` and to a running `python egress_guard.py`, must get
the same decision and the same reason from both.

The live side is a real CONNECT with a real TLS ClientHello (Python `ssl`) to a local
TLS upstream; names reach it through the HOSTS_FILE. `explain` does not resolve names,
so every name in this table resolves to an address the identity allows explicitly
(127.0.0.1): the address check passes on both sides.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from _support import REPO, Proxy, Upstream, clean_env, connect, tls_wrap

POLICY = """
identities:
  web:
    api_keys: ["web-key"]
    allowed_destinations: ["api.example.com", "*.example.org", "127.0.0.1"]
  low-ports:
    api_keys: ["ports-key"]
    allowed_destinations: ["api.example.com:1-1024", "127.0.0.1:1-1024"]
  canary:
    api_keys: ["canary-key"]
    mode: report
    allowed_destinations: ["127.0.0.1"]
"""

# (id, key, host, sni or None)
CASES = [
    ("allowed-name-sni-equal", "web-key", "api.example.com", "api.example.com"),
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


def explained(policy_file: Path, key: str, dest: str, sni: str | None) -> tuple[str, str]:
    """(decision, reason) as `explain` prints them; reason "" when allowed outright."""
    args = [sys.executable, "egress_guard.py", "explain", str(policy_file), "--key", key, "--dest", dest]
    if sni is not None:
        args += ["--sni", sni]
    result = subprocess.run(args, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode in (0, 1), result.stderr
    lines = result.stdout.splitlines()
    reason = next((l[len("reason: "):] for l in lines if l.startswith("reason: ")), "")
    reason = reason.removesuffix(" (the proxy answers 407)").removeprefix("report mode lets it through: ")
    return lines[0], reason


def live(proxy: Proxy, ca, key: str, dest: str, sni: str | None) -> tuple[str, str]:
    """(decision, reason) the running proxy logged for the same request."""
    with connect(proxy, dest, key) as reply:
        if reply.status == 200:
            try:
                stream = tls_wrap(reply.sock, ca, sni, check_hostname=False)
                stream.close()
            except (ssl.SSLError, OSError):
                pass  # refused inside the tunnel: the decision line says why
        line = proxy.decision(reply)
    decision = "allowed" if line["action"] in ("allowed", "reported") else "denied"
    return decision, line["reason"] if line["action"] != "allowed" else ""


@pytest.mark.parametrize("key,host,sni", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_explain_agrees_with_the_live_proxy(proxy: Proxy, policy_file: Path, tls_upstream: Upstream, ca,
                                            key: str, host: str, sni: str | None) -> None:
    dest = f"{host}:{tls_upstream.port}"
    offline = explained(policy_file, key, dest, sni)
    online = live(proxy, ca, key, dest, sni)
    assert offline == online, f"explain said {offline}, the proxy did {online}"
