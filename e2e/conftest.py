"""Fixtures for the end-to-end tests: a test CA, local upstreams, and proxy factories.

`start_proxy(policy_yaml, **env)` starts `python egress_guard.py` exactly as a user
does (cwd = the repo, configured by environment variables, HOSTS_FILE mapping the test
names to 127.0.0.1) and returns a `_support.Proxy`: `.port`, `.metrics_port`,
`.log_lines()`, `.metrics()`, `.stop()`. Every proxy a factory started is stopped
(SIGTERM, then kill after 30 s) when the fixture ends, and its log (stdout) is checked:
JSON lines only, no traceback.

Clients and upstreams live in `_support`: `connect(proxy, target, key)` (raw CONNECT ->
Reply with .status/.headers/.body/.sock), `tls_wrap` and `BioTLS` (Python ssl, with
control over the ClientHello's segments and records), `curl(...)`, and `Upstream`
(TLS or plain echo, banner, half-close) which records what each connection received.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from _support import REPO, Proxy, ProxyFactory, Upstream, fresh_venv, run, server_context

# What a checkout holds that the package is built from (tests, e2e, bench, deploy are not in it).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "requirements.txt", "egress_guard.py", "policy", "proxy", "wire")


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def tls_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    """A shared TLS echo/HTTP upstream (tests that count its connections make their own)."""
    upstream = Upstream(tls=server_context(ca))
    yield upstream
    upstream.close()


@pytest.fixture
def fresh_tls_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    """A TLS upstream of this test's own, so its connection log proves what reached it."""
    upstream = Upstream(tls=server_context(ca), peek_timeout=3.0)
    yield upstream
    upstream.close()


@pytest.fixture(scope="session")
def echo_upstream() -> Iterator[Upstream]:
    upstream = Upstream()
    yield upstream
    upstream.close()


@pytest.fixture
def fresh_echo_upstream() -> Iterator[Upstream]:
    upstream = Upstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="session")
def banner_upstream() -> Iterator[Upstream]:
    upstream = Upstream(mode="banner")
    yield upstream
    upstream.close()


@pytest.fixture
def start_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """Factory: start_proxy(policy_yaml, NAME=value, ...) -> a ready Proxy (stopped at teardown).

    Pass `_wait=False` to get the process without waiting for /ready (startup errors),
    `_launch=` for another command line (see `_support.Proxy`).
    """
    factory = ProxyFactory(lambda: tmp_path_factory.mktemp("proxy"))
    yield factory
    _check(factory.close())


@pytest.fixture(scope="module")
def module_proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """The same factory, for proxies a whole module shares."""
    factory = ProxyFactory(lambda: tmp_path_factory.mktemp("proxy"))
    yield factory
    _check(factory.close())


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's package sources (builds write into it; the checkout stays clean)."""
    copy = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, copy / name)
    return copy


@pytest.fixture(scope="session")
def dist(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel, `python -m build` (the sdist first, the wheel from it)."""
    out = tmp_path_factory.mktemp("dist")
    built = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def wheel(dist: Path) -> Path:
    (found,) = dist.glob("*.whl")
    return found


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, offline; its bin/."""
    return fresh_venv(tmp_path_factory.mktemp("venv"), wheel)


def _check(problems: list[str]) -> None:
    """Every proxy's stdout must be JSON lines, and nothing may print a traceback."""
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


__all__ = ["Proxy"]
