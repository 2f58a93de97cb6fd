"""The container image, built and run for real (issue 14 part 1).

`make image`'s build (`.ci/engine build`, docker where a daemon answers, else podman),
then the image run the way the Kubernetes manifests run it: read-only root filesystem,
the image's non-root user, every capability dropped, no privilege escalation, and the
policy directory mounted read-only at /etc/config. The container shares the host's
network and listens on 127.0.0.1 only; its upstreams are the usual loopback ones, its
names come from a HOSTS_FILE in the mounted directory.

`.ci/ensure-tools image` (which `make test` runs) installs the engine and puts the base
image in its storage; this test skips, saying so, only where that was impossible.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import (
    APP_POLICY,
    REPO,
    Proxy,
    ProxyFactory,
    Upstream,
    closed_by_peer,
    connect,
    recv_exactly,
    run,
    tls_wrap,
    tunnel_works,
    wait_until,
)

from proxy import cli

ENGINE = str(REPO / ".ci" / "engine")
BUILD_TIMEOUT = 900  # a cold machine: the base's packages and the wheels come over the network
SHUTDOWN_TIMEOUT = 4
# Passed into the container from the test's environment (`-e NAME` takes the value from
# the engine's environment); the file paths are the container's.
PASSED = ("PROXY_HOST", "PROXY_PORT", "METRICS_HOST", "METRICS_PORT", "WATCH_INTERVAL", "CONNECT_TIMEOUT",
          "SHUTDOWN_TIMEOUT", "LOG_LEVEL")
_names = itertools.count()
# The first test pays for the fixtures: on a cold machine, installing the engine, making
# the base and building the image.
pytestmark = pytest.mark.timeout(2 * BUILD_TIMEOUT)


def engine(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run([ENGINE, *args], timeout=timeout)


@pytest.fixture(scope="module")
def engine_name() -> str:
    ready = run([REPO / ".ci" / "ensure-tools", "image"], timeout=BUILD_TIMEOUT)
    name = engine("--name").stdout.strip()
    if not name:
        pytest.skip(f"no container engine could be installed here (.ci/ensure-tools image: {ready.stderr.strip()})")
    assert ready.returncode == 0, f".ci/ensure-tools image failed:\n{ready.stdout}{ready.stderr}"
    return name


@pytest.fixture(scope="module")
def image(engine_name: str) -> Iterator[str]:
    tag = f"localhost/egress-guard:e2e-{os.getpid()}"
    started = time.monotonic()
    built = engine("build", "-q", "-t", tag, str(REPO), timeout=BUILD_TIMEOUT)
    assert built.returncode == 0, f"{engine_name} build failed:\n{built.stdout}{built.stderr}"
    print(f"image built with {engine_name} in {time.monotonic() - started:.1f} s")
    yield tag
    engine("rmi", "--force", tag)


@pytest.fixture
def containers(image: str, engine_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    """start(policy, **env) -> a `Proxy` whose process is `ENGINE run` of the image."""
    factory = ProxyFactory(lambda: tmp_path_factory.mktemp("container"))
    names: list[str] = []

    def launch(proxy: Proxy) -> list[str]:
        name = f"egress-guard-e2e-{os.getpid()}-{next(_names)}"
        names.append(name)
        proxy.container = name  # type: ignore[attr-defined]
        # Mounted as the image's user sees it: a directory it can list, files it can read.
        proxy.workdir.chmod(0o755)
        flags = ["--read-only-tmpfs=false", "--health-interval=disable"] if engine_name == "podman" else []
        passed = [word for variable in PASSED for word in ("-e", variable)]
        return [ENGINE, "run", "--rm", "--name", name, "--network", "host", "--read-only", *flags,
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                "-v", f"{proxy.workdir}:/etc/config:ro", *passed,
                "-e", "CONFIGMAP_PATH=/etc/config/egress-policy.yaml", "-e", "HOSTS_FILE=/etc/config/hosts", image]

    def start(policy: str, **env: object) -> Proxy:
        return factory(policy, _launch=launch, SHUTDOWN_TIMEOUT=SHUTDOWN_TIMEOUT, **env)

    yield start  # type: ignore[misc]
    problems = factory.close()
    for name in names:
        engine("rm", "--force", name)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def image_config(image: str) -> dict:
    """The image's Config, with its Healthcheck (podman lists that beside Config)."""
    inspected = engine("image", "inspect", image)
    assert inspected.returncode == 0, inspected.stderr
    (found,) = json.loads(inspected.stdout)
    config = found["Config"]
    config.setdefault("Healthcheck", found.get("Healthcheck"))
    return config


def process_ids(container: str) -> dict[str, list[int]]:
    """The Uid and Gid lines of the container's main process, as the host's kernel sees it."""
    pid = engine("inspect", "--format", "{{.State.Pid}}", container).stdout.strip()
    assert pid.isdigit() and int(pid) > 0, f"no process for {container}: {pid!r}"
    status = Path(f"/proc/{pid}/status").read_text()
    ids = {}
    for line in status.splitlines():
        key, _, values = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = [int(v) for v in values.split()]
    ids["cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]  # type: ignore[assignment]
    return ids


def test_image_serves_as_the_manifests_run_it(containers, image: str, engine_name: str, ca,
                                              fresh_tls_upstream: Upstream) -> None:
    proxy: Proxy = containers(APP_POLICY)

    status, _, body = proxy.http_get("/health")
    assert (status, json.loads(body)) == (200, {"status": "healthy"})
    status, _, body = proxy.http_get("/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"

    with connect(proxy, f"api.example.com:{fresh_tls_upstream.port}", "not-a-key") as refused:
        assert refused.status == 407 and refused.headers["proxy-authenticate"] == 'Basic realm="egress-guard"'
    assert tunnel_works(proxy, ca, "api.example.com", fresh_tls_upstream.port)
    (conn,) = fresh_tls_upstream.since(0)
    assert conn.sni == "api.example.com" and conn.received == b"still here"

    lines = proxy.log_lines()  # every stdout line is JSON, or this fails
    decisions = [l for l in lines if l.get("message") == "request"]
    assert [l["action"] for l in decisions] == ["auth_required", "allowed"], decisions
    assert lines[0]["message"] == "egress-guard listening" and lines[0]["path"] == "/etc/config/egress-policy.yaml"
    assert "app-key" not in proxy.log_text()

    ids = process_ids(proxy.container)
    user, group = (int(x) for x in image_config(image)["User"].split(":"))
    assert user != 0 and ids["Uid"] == [user] * 4 and ids["Gid"] == [group] * 4, ids
    assert ids["cmdline"][0].endswith(b"python") and ids["cmdline"][1] == b"egress_guard.py", \
        "python is the container's main process (exec form), so SIGTERM reaches it"

    healthcheck = (image_config(image)["Healthcheck"] or {}).get("Test")
    assert healthcheck and healthcheck[0] == "CMD", f"the image has no HEALTHCHECK: {healthcheck}"
    if engine_name == "podman":
        checked = engine("healthcheck", "run", proxy.container)
    else:
        checked = engine("exec", proxy.container, *healthcheck[1:])
    assert checked.returncode == 0, f"HEALTHCHECK failed: {checked.stdout}{checked.stderr}"
    unhealthy = engine("exec", "-e", "METRICS_PORT=1", proxy.container, *healthcheck[1:])
    assert unhealthy.returncode != 0, "the HEALTHCHECK command must fail when nothing answers"


def test_image_names_the_version_once_written(image: str) -> None:
    assert image_config(image)["Labels"]["org.opencontainers.image.version"] == cli.__version__
    shown = engine("run", "--rm", "--network", "none", image, "--version")
    assert (shown.returncode, shown.stdout) == (0, f"egress-guard {cli.__version__}\n"), shown.stderr


def test_image_has_no_installer_or_compiler(image: str) -> None:
    probe = ("import importlib.util, json, shutil; print(json.dumps("
             "{t: shutil.which(t) for t in ('pip', 'pip3', 'gcc', 'cc', 'c++', 'make')} | "
             "{m: bool(importlib.util.find_spec(m)) for m in ('pip', 'setuptools')}))")
    found = engine("run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", probe)
    assert found.returncode == 0, found.stderr
    assert not any(json.loads(found.stdout.strip().splitlines()[-1]).values()), found.stdout


def test_policy_edit_in_the_mounted_directory_reloads(containers, ca, fresh_tls_upstream: Upstream) -> None:
    proxy: Proxy = containers(APP_POLICY)
    target = f"api.example.com:{fresh_tls_upstream.port}"
    assert tunnel_works(proxy, ca, "api.example.com", fresh_tls_upstream.port)

    proxy.write_policy(APP_POLICY.replace('"api.example.com", ', ""))
    reloaded = proxy.wait_log(lambda l: l.get("message") == "policy reloaded", timeout=10)
    assert reloaded["destinations_removed"] == ["app: api.example.com"], reloaded
    with connect(proxy, target, "app-key") as refused:
        assert refused.status == 403
    assert proxy.http_get("/ready")[0] == 200


def test_sigterm_drains_then_exits_0_within_shutdown_timeout(containers, ca, fresh_tls_upstream: Upstream) -> None:
    proxy: Proxy = containers(APP_POLICY)
    reply = connect(proxy, f"api.example.com:{fresh_tls_upstream.port}", "app-key")
    assert reply.status == 200
    stream = tls_wrap(reply.sock, ca, "api.example.com")
    try:
        signalled = time.monotonic()
        killed = engine("kill", "--signal", "TERM", proxy.container)
        assert killed.returncode == 0, killed.stderr
        assert wait_until(lambda: proxy.http_status("/ready", timeout=1) == 503, timeout=5), "readiness off"
        stream.sendall(b"draining")
        assert recv_exactly(stream, 8) == b"draining", "an open tunnel keeps working while the proxy drains"
        assert proxy.wait_exit(SHUTDOWN_TIMEOUT + 10) == 0, proxy.output()
        took = time.monotonic() - signalled
        assert closed_by_peer(stream, 2), "the tunnel still open at the deadline is closed"
    finally:
        stream.close()
    assert SHUTDOWN_TIMEOUT - 0.5 <= took <= SHUTDOWN_TIMEOUT + 3, f"exit after {took:.1f} s"
    messages = [l["message"] for l in proxy.log_lines()]
    assert "draining" in messages and messages[-1] == "stopped", messages
    closed = proxy.find_logs(message="tunnel closed")
    assert [l["ended_by"] for l in closed] == ["shutdown"], closed
