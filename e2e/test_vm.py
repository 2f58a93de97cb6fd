"""On a VM (issue 14 part 3): the systemd unit and its environment file. (The Compose
file is checked with the other packaging, in tests/test_deploy.py.)

The unit is checked by `systemd-analyze verify` with the `egress-guard` command really
installed (the wheel, in a fresh venv, stands in for /opt/egress-guard), its hardening
is read directive by directive, and the command runs with the environment file's
settings: the unit's ExecReload line, run as systemd would, reloads the policy, and its
KillSignal drains and exits 0.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
from pathlib import Path

import pytest
from _support import APP_POLICY, REPO, Proxy, run, tunnel_works

from proxy.settings import Settings, defaults_table

UNIT = REPO / "deploy/systemd/egress-guard.service"
ENV_FILE = REPO / "deploy/systemd/egress-guard.env"
VENV = "/opt/egress-guard"
# Descriptors one client connection may hold: client and upstream sockets, two splice pipes.
FDS_PER_CONNECTION = 6


def unit() -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat), comments and continuations handled."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n", " ", UNIT.read_text()).splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(key: str) -> str:
    (value,) = unit()["Service"][key]
    return value


def env_file() -> dict[str, str]:
    values = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", text)
    assert match, f"a duration systemd reads as seconds or minutes: {text}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed and .ci/ensure-tools could not install it (no apt-get as root)")
    return found


# ---------------------------------------------------------------------------
# systemd


def test_unit_runs_the_installed_command_simply_and_restarts_on_failure() -> None:
    assert service("Type") == "simple", "no sd_notify in the proxy"
    assert service("ExecStart") == f"{VENV}/bin/egress-guard serve"
    assert service("EnvironmentFile") == "/etc/egress-guard/egress-guard.env"
    assert service("Restart") == "on-failure"
    assert shlex.split(service("ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert service("KillSignal") == "SIGTERM"
    assert unit()["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_hardening() -> None:
    for key, value in {"DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                       "SystemCallFilter": "@system-service"}.items():
        assert service(key) == value, key
    assert set(service("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "User" not in unit()["Service"], "DynamicUser allocates the user"


def test_environment_file_holds_valid_settings_the_unit_is_sized_for() -> None:
    values = env_file()
    known = {name for name, _, _ in defaults_table()}
    assert set(values) <= known, f"not a setting: {sorted(set(values) - known)}"
    settings = Settings.from_env(values)  # raises on a value the proxy would refuse
    assert settings.proxy_port > 1024 and settings.metrics_port > 1024, "no capability to bind below 1024"
    assert settings.configmap_path.startswith("/etc/egress-guard/")
    assert seconds(service("TimeoutStopSec")) >= settings.shutdown_timeout + 5, "drain before SIGKILL"
    assert int(service("LimitNOFILE")) >= FDS_PER_CONNECTION * settings.max_connections + 1024


def test_systemd_analyze_verify_passes(installed: Path, tmp_path: Path) -> None:
    """With the command where the unit expects one (the wheel's venv in place of /opt)."""
    analyze = systemd_analyze()
    text = UNIT.read_text()
    assert text.count(VENV + "/bin/") == 1
    placed = tmp_path / "egress-guard.service"
    placed.write_text(text.replace(VENV + "/bin/", f"{installed}/"))
    verified = run([analyze, "verify", "--man=no", placed], timeout=60)
    assert verified.returncode == 0 and "egress-guard.service" not in verified.stderr, verified.stderr

    typo = tmp_path / "typo" / "egress-guard.service"
    typo.parent.mkdir()
    typo.write_text(placed.read_text().replace("ProtectSystem=", "ProtectSytem="))
    flagged = run([analyze, "verify", "--man=no", typo], timeout=60)
    assert "ProtectSytem" in flagged.stderr, "verify must flag an unknown directive"


def test_the_command_under_the_units_settings_reloads_and_stops(installed: Path, start_proxy, ca,
                                                                 fresh_tls_upstream) -> None:
    """The environment file's settings (addresses and paths made local), the unit's
    ExecReload run as systemd runs it, then its KillSignal."""
    local = {"PROXY_HOST": "127.0.0.1", "METRICS_HOST": "127.0.0.1"}
    settings = {k: v for k, v in env_file().items() if k not in ("PROXY_PORT", "METRICS_PORT", "CONFIGMAP_PATH",
                                                                  "WATCH_INTERVAL")}
    command = shlex.split(service("ExecStart").replace(VENV + "/bin/", f"{installed}/"))
    proxy: Proxy = start_proxy(APP_POLICY, _launch=lambda _: command, **{**settings, **local},
                               WATCH_INTERVAL=3600)  # only the reload signal can reload
    assert tunnel_works(proxy, ca, "api.example.com", fresh_tls_upstream.port)

    proxy.policy_path.write_text(APP_POLICY.replace('"api.example.com", ', ""))
    reload = [word.replace("$MAINPID", str(proxy.process.pid)) for word in shlex.split(service("ExecReload"))]
    assert run(reload, timeout=10).returncode == 0
    reloaded = proxy.wait_log(lambda l: l.get("message") == "policy reloaded", timeout=10)
    assert reloaded["destinations_removed"] == ["app: api.example.com"]
    assert not tunnel_works(proxy, ca, "api.example.com", fresh_tls_upstream.port)

    proxy.signal(getattr(signal, service("KillSignal")))
    assert proxy.wait_exit(seconds(service("TimeoutStopSec"))) == 0, proxy.output()
