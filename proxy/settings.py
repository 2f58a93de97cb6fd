"""Process settings, read once from the environment at start.

Every variable has the seed's name and default. A value that does not parse is a
startup error naming the variable — never a silent fallback to the default, because
an operator who set `IDLE_TIMEOUT=15m` expects 15 minutes, not 900 seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from dataclasses import dataclass, fields
from typing import Callable, Mapping


class SettingsError(ValueError):
    """A bad environment value; str() names the variable and the problem."""


LOG_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}


def _port(name: str, text: str) -> int:
    value = _integer(name, text)
    if not 1 <= value <= 65535:
        raise SettingsError(f"{name}={text!r}: a port must be between 1 and 65535")
    return value


def _port_or_off(name: str, text: str) -> int:
    if text.strip() == "0":
        return 0
    return _port(name, text)


def _integer(name: str, text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise SettingsError(f"{name}={text!r}: expected a whole number") from None


def _positive_int(name: str, text: str) -> int:
    value = _integer(name, text)
    if value < 1:
        raise SettingsError(f"{name}={text!r}: must be at least 1")
    return value


def _seconds(name: str, text: str, *, zero_ok: bool = False) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise SettingsError(f"{name}={text!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        limit = "0 or more" if zero_ok else "more than 0"
        raise SettingsError(f"{name}={text!r}: must be {limit} seconds")
    return value


def _positive_seconds(name: str, text: str) -> float:
    return _seconds(name, text)


def _seconds_or_zero(name: str, text: str) -> float:
    return _seconds(name, text, zero_ok=True)


def _level(name: str, text: str) -> int:
    level = LOG_LEVELS.get(text.strip().upper())
    if level is None:
        raise SettingsError(f"{name}={text!r}: expected one of DEBUG, INFO, WARN, ERROR")
    return level


def _bind_address(name: str, text: str) -> str:
    text = text.strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise SettingsError(f"{name}={text!r}: expected an IP address to listen on") from None
    return text


def _path(name: str, text: str) -> str:
    if not text.strip():
        raise SettingsError(f"{name} is empty: expected a file path")
    return text


def _optional_path(name: str, text: str) -> str:
    return text.strip()


def _switch(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise SettingsError(f"{name}={text!r}: expected true or false")
    return value == "true"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the process reads from its environment."""

    proxy_port: int = 4750
    metrics_port: int = 9090
    proxy_host: str = "127.0.0.1"
    metrics_host: str = "127.0.0.1"
    configmap_path: str = "/etc/config/egress-policy.yaml"
    watch_interval: float = 5.0
    log_level: int = logging.INFO
    shutdown_timeout: float = 25.0
    header_timeout: float = 10.0
    hello_timeout: float = 5.0
    connect_timeout: float = 10.0
    idle_timeout: float = 900.0
    max_connections: int = 10000
    hosts_file: str = ""
    status_page: bool = True
    proxy_tls_port: int = 4751
    proxy_tls_cert: str = ""
    proxy_tls_key: str = ""
    proxy_tls_client_ca: str = ""

    @property
    def tls(self) -> bool:
        """Is the TLS listener on (PROXY_TLS_CERT and PROXY_TLS_KEY set)?"""
        return bool(self.proxy_tls_cert)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Settings":
        """Build settings from `env`; raises SettingsError naming the first bad variable."""
        values = {}
        for field in fields(cls):
            variable = field.name.upper()
            if variable in env:
                values[field.name] = PARSERS[field.name](variable, env[variable])
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """The rules between variables (each alone parsed fine)."""
        if bool(self.proxy_tls_cert) != bool(self.proxy_tls_key):
            given, missing = (("PROXY_TLS_CERT", "PROXY_TLS_KEY") if self.proxy_tls_cert
                              else ("PROXY_TLS_KEY", "PROXY_TLS_CERT"))
            raise SettingsError(f"{given} is set but {missing} is not: the TLS listener needs both")
        if self.proxy_tls_client_ca and not self.tls:
            raise SettingsError("PROXY_TLS_CLIENT_CA is set but the TLS listener is off: "
                                "client certificates need PROXY_TLS_CERT and PROXY_TLS_KEY too")
        if not self.proxy_port and not self.tls:
            raise SettingsError("PROXY_PORT=0 turns the plaintext listener off, and the TLS listener is off "
                                "(PROXY_TLS_CERT, PROXY_TLS_KEY): nothing would listen")
        if self.tls and self.proxy_tls_port == self.proxy_port:
            raise SettingsError(f"PROXY_TLS_PORT={self.proxy_tls_port}: the same port as PROXY_PORT; "
                                "give the TLS listener a port of its own (or PROXY_PORT=0)")


# Field name -> the parser of its variable's value. With DESCRIPTIONS, also the
# source of `--help`'s environment table (`defaults_table`).
PARSERS: dict[str, Callable[[str, str], object]] = {
    "proxy_port": _port_or_off,
    "metrics_port": _port,
    "proxy_host": _bind_address,
    "metrics_host": _bind_address,
    "configmap_path": _path,
    "watch_interval": _positive_seconds,
    "log_level": _level,
    "shutdown_timeout": _seconds_or_zero,
    "header_timeout": _positive_seconds,
    "hello_timeout": _positive_seconds,
    "connect_timeout": _positive_seconds,
    "idle_timeout": _seconds_or_zero,
    "max_connections": _positive_int,
    "hosts_file": _optional_path,
    "status_page": _switch,
    "proxy_tls_port": _port,
    "proxy_tls_cert": _optional_path,
    "proxy_tls_key": _optional_path,
    "proxy_tls_client_ca": _optional_path,
}

DESCRIPTIONS: dict[str, str] = {
    "PROXY_PORT": "plaintext proxy listener port (CONNECT and plain http:// requests; 0 = off)",
    "METRICS_PORT": "/health, /ready, /metrics and the status page (/, /status.json) port",
    "PROXY_HOST": "address the proxy listens on (0.0.0.0: every IPv4 interface; :: for IPv6)",
    "METRICS_HOST": "address the metrics server listens on",
    "CONFIGMAP_PATH": "policy file (a ConfigMap mount)",
    "WATCH_INTERVAL": "seconds between policy file checks",
    "LOG_LEVEL": "DEBUG, INFO, WARN or ERROR",
    "SHUTDOWN_TIMEOUT": "seconds open tunnels may drain after SIGTERM",
    "HEADER_TIMEOUT": "seconds a client has to send its request head (408)",
    "HELLO_TIMEOUT": "seconds a client has to send its TLS ClientHello",
    "CONNECT_TIMEOUT": "seconds to resolve and connect to a destination (502)",
    "IDLE_TIMEOUT": "seconds without traffic before a tunnel closes (0 = never)",
    "MAX_CONNECTIONS": "client connections at once; past it clients get 503",
    "HOSTS_FILE": "optional hosts(5)-format file consulted before DNS",
    "STATUS_PAGE": "true or false: the status page on METRICS_PORT (/, /status, /status.json)",
    "PROXY_TLS_PORT": "TLS proxy listener port (https:// proxy URLs), on with the next two",
    "PROXY_TLS_CERT": "PEM certificate chain of the TLS listener (re-read when it changes)",
    "PROXY_TLS_KEY": "PEM private key of the TLS listener (re-read when it changes)",
    "PROXY_TLS_CLIENT_CA": "PEM CA bundle that client certificates are verified against",
}

def defaults_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) rows for `--help` and the README."""
    rows = []
    for field in fields(Settings):
        default = field.default
        if field.name == "log_level":
            default = logging.getLevelName(default)
        elif isinstance(default, bool):
            default = "true" if default else "false"
        elif isinstance(default, float) and default.is_integer():
            default = int(default)
        variable = field.name.upper()
        rows.append((variable, str(default) if default != "" else "(unset)", DESCRIPTIONS[variable]))
    return rows
