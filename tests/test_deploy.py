"""The operators' packaging: Dockerfile, Kubernetes manifests, alerts and dashboard, the
Compose file.

Everything here runs offline from wheels in requirements-dev.txt: hadolint lints the
Dockerfile, kubectl renders the kustomizations, kubernetes-validate checks every object
against the bundled Kubernetes schemas in strict mode, promql-parser parses every alert and
panel query, check-jsonschema checks the Compose file against the Compose specification's
schema (its bundled copy). Metric and label names are taken from the real `proxy.observe.Metrics`, so a
dashboard or alert can never drift from what the proxy exports.

No Docker engine is needed here (e2e/test_image.py builds and runs the real image): the image's runtime layout (exactly the files the Dockerfile
copies, byte-compiled like the builder does, read-only, non-root) is rebuilt in a
temporary directory and started there.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate.utils as kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from proxy import cli, observe
from policy import Status
from proxy.settings import defaults_table

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"

# The oldest Kubernetes the manifests support (the kubelet's preStop `sleep` action is
# on by default from 1.30) and the newest schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
KUSTOMIZATIONS = ("base", "overlays/monitoring", "overlays/tls", "client-namespace")
# Custom resources: no schema in kubernetes-validate; checked structurally below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
             ("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}
# Labels Prometheus attaches to every scraped series (target labels), plus `le` on buckets.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
# Series an expression may use that egress-guard itself does not export.
PROMETHEUS_SERIES = {"up"}
DEFAULTS = {name: default for name, default, _ in defaults_table()}
# A pod listens on every interface; the proxy's own default is loopback (`make run`, pip).
LISTEN_EVERYWHERE = {"PROXY_HOST": "0.0.0.0", "METRICS_HOST": "0.0.0.0"}
POD_LABELS = {"app.kubernetes.io/name": "egress-guard", "app.kubernetes.io/component": "proxy"}


# ---------------------------------------------------------------------------
# helpers


def tool(name: str) -> str:
    """A tool installed by requirements-dev.txt: the venv's bin first (`python -m pytest`
    from the venv does not put it on PATH), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -r requirements-dev.txt")
    return found


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)


@functools.lru_cache(maxsize=None)
def rendered(kustomization: str) -> tuple[dict, ...]:
    result = run([tool("kubectl"), "kustomize", str(DEPLOY / kustomization)])
    assert result.returncode == 0, f"kubectl kustomize deploy/{kustomization} failed:\n{result.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    assert docs, f"deploy/{kustomization} renders nothing"
    return docs


def find(docs: tuple[dict, ...], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


def base() -> tuple[dict, ...]:
    return rendered("base")


def deployment() -> dict:
    return find(base(), "Deployment", "egress-guard")


def pod_spec() -> dict:
    return deployment()["spec"]["template"]["spec"]


def container() -> dict:
    (only,) = pod_spec()["containers"]
    return only


def env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in container()["env"] if "value" in item}


def container_port(name: str) -> int:
    (port,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name]
    return port


def quantity(value: Any) -> float:
    """CPU or memory quantity as a number (cores or bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(suffixes.items(), key=lambda s: -len(s[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# --- Dockerfile -------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        assert stages, "Dockerfile must start with FROM (or ARG)"
        stages[-1].append((keyword, rest))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def instruction(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for kw, rest in stage if kw == keyword]


def env_instruction(stage: list[tuple[str, str]]) -> dict[str, str]:
    values = {}
    for rest in instruction(stage, "ENV"):
        for word in shlex.split(rest):
            name, _, value = word.partition("=")
            values[name] = value
    return values


def copies_from_context() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY that reads the build context, with WORKDIR applied."""
    copies, workdir = [], "/"
    for stage in dockerfile_stages():
        for keyword, rest in stage:
            if keyword == "WORKDIR":
                workdir = rest
            if keyword == "COPY" and "--from=" not in rest:
                words = [w for w in rest.split() if not w.startswith("--")]
                destination = words[-1] if words[-1].startswith("/") else f"{workdir.rstrip('/')}/{words[-1]}"
                copies.append((words[:-1], destination))
    return copies


def dockerignore_excludes(path: str) -> bool:
    """Docker's .dockerignore rules: last matching pattern wins, `!` re-includes, a pattern
    matching a directory covers everything below it."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


# --- metrics ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the proxy exports -> its label names, from the real module.

    A fresh registry holds no samples for labelled metrics (no children yet), so names are
    expanded from each metric's type the way the exposition format does
    (counter -> _total/_created, histogram -> _bucket/_sum/_count/_created)."""
    registry = CollectorRegistry()
    metrics = observe.Metrics(registry, process=True)  # process=True: as `serve` runs it
    series: dict[str, set[str]] = {}
    wrappers = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    for wrapper in wrappers:
        name, kind, labels = wrapper._name, wrapper._type, set(wrapper._labelnames)  # noqa: SLF001
        for suffix in suffixes[kind]:
            series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    wrapped = {w._name for w in wrappers}  # noqa: SLF001
    # The per-request metrics are plain numbers exported by a collector (observe.Counts):
    # expanded from its declared families, as it has no samples before traffic.
    for name, kind, labels, _ in observe.Counts.FAMILIES:
        base = name.removesuffix("_total")
        wrapped.add(base)
        for suffix in suffixes[kind]:
            series[base + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())
    for family in registry.collect():
        if family.name in wrapped:
            continue
        assert family.samples, f"{family.name}: a collector without samples cannot be expanded"
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


# The public interface promised in the README (names with suffixes).
CONTRACT_SERIES = {
    "egress_proxy_requests_total": {"identity", "destination", "status"},
    "egress_proxy_config_reloads_total": set(),
    "egress_proxy_config_load_errors_total": set(),
    "egress_proxy_allowed_destinations": {"identity"},
    "egress_proxy_active_tunnels": set(),
    "egress_proxy_client_connections": set(),
    "egress_proxy_bytes_total": {"identity", "direction"},
    "egress_proxy_tunnel_duration_seconds_bucket": {"le"},
    "egress_proxy_tunnel_duration_seconds_sum": set(),
    "egress_proxy_tunnel_duration_seconds_count": set(),
    "egress_proxy_tunnels_revoked_total": {"identity"},
    "egress_proxy_config_last_reload_success_timestamp_seconds": set(),
    "process_resident_memory_bytes": set(),
    "process_cpu_seconds_total": set(),
    "process_open_fds": set(),
    "process_max_fds": set(),
}
LABEL_VALUES = {"status": set([s.value for s in Status]), "direction": {"upstream", "downstream"}}
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def parse_promql(expr: str) -> promql_parser.Expr:
    for macro, duration in GRAFANA_MACROS.items():
        expr = expr.replace(macro, duration)
    try:
        return promql_parser.parse(expr)
    except ValueError as error:
        pytest.fail(f"invalid PromQL ({error}):\n{expr}")


def promql_problems(expr: str) -> list[str]:
    """Unknown series, labels a series does not carry, label values outside the closed
    sets, and `by` labels that none of the aggregated series carry."""
    exported = exported_series()
    problems: list[str] = []
    tree = parse_promql(expr)

    def selectors(node: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
        found: list[promql_parser.VectorSelector] = []
        promql_parser.walk(node, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None)
        return found

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name is None:
                problems.append(f"selector without a metric name: {node}")
                return
            if node.name in PROMETHEUS_SERIES:
                return
            if node.name not in exported:
                problems.append(f"{node.name} is not exported by egress-guard")
                return
            for matcher in node.matchers.matchers:
                if matcher.name not in exported[node.name] | TARGET_LABELS:
                    problems.append(f"{node.name} has no label {matcher.name!r}")
                allowed = LABEL_VALUES.get(matcher.name)
                if allowed and matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.Re,
                                              promql_parser.MatchOp.NotEqual, promql_parser.MatchOp.NotRe):
                    unknown = set(matcher.value.split("|")) - allowed
                    if unknown:
                        problems.append(f"{node.name}: {matcher.name} values {sorted(unknown)} are never exported")
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None \
                and node.modifier.type == promql_parser.AggModifierType.By:
            carried = set(TARGET_LABELS)
            for selector in selectors(node.expr):
                carried |= exported.get(selector.name or "", frozenset())
            for label in node.modifier.labels:
                if label not in carried:
                    problems.append(f"by ({label}): no aggregated series carries that label")

    promql_parser.walk(tree, visit)
    return problems


def output_labels(node: promql_parser.Expr) -> set[str] | None:
    """Labels an expression's result is sure to carry; None when unknown (raw series)."""
    if isinstance(node, promql_parser.ParenExpr):
        return output_labels(node.expr)
    if isinstance(node, promql_parser.AggregateExpr):
        if node.modifier is None:
            return set()
        return set(node.modifier.labels) if node.modifier.type == promql_parser.AggModifierType.By else None
    if isinstance(node, promql_parser.BinaryExpr):
        left = output_labels(node.lhs)
        if str(node.op) == "or":
            right = output_labels(node.rhs)
            return None if left is None or right is None else left & right
        return left
    return None


def metric_names_in(expr: str) -> set[str]:
    names: set[str] = set()
    promql_parser.walk(parse_promql(expr),
                       lambda n: names.add(n.name) if isinstance(n, promql_parser.VectorSelector) and n.name else None)
    return names


# ---------------------------------------------------------------------------
# Dockerfile


def test_hadolint_reports_nothing_at_any_level(tmp_path: Path) -> None:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # a neutral config: no user or repository overrides
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    result = run([tool("hadolint"), "--config", str(config), "--no-color", "--format", "json",
                  "--failure-threshold", "style", "--disable-ignore-pragma",
                  "--require-label", "org.opencontainers.image.title:text",
                  "--require-label", "org.opencontainers.image.description:text",
                  "--require-label", "org.opencontainers.image.version:text",
                  "--require-label", "org.opencontainers.image.licenses:spdx",
                  str(DOCKERFILE)], env=clean_env)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "hadolint findings:\n" + "\n".join(
        f"  line {f['line']}: {f['code']} ({f['level']}) {f['message']}" for f in findings)
    assert result.returncode == 0, result.stderr


def test_hadolint_is_armed(tmp_path: Path) -> None:
    """The lint above means something: the same invocation flags a bad Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nADD . /app\n")
    result = run([tool("hadolint"), "--no-color", "--format", "json", "--failure-threshold", "style", str(bad)])
    codes = {f["code"] for f in json.loads(result.stdout)}
    assert {"DL3006", "DL3008", "DL3020"} <= codes
    assert result.returncode != 0


def test_dockerfile_is_multi_stage_on_a_pinned_base() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    for stage in stages:
        image = instruction(stage, "FROM")[0].split()[0]
        name, _, tag = image.partition("@")[0].partition(":")
        assert re.fullmatch(r"\d+\.\d+\.\d+-slim-\w+", tag), f"{image}: pin a patch release and Debian suite"
    builder_runs = " ".join(r for s in stages[:-1] for r in instruction(s, "RUN"))
    assert "--only-binary=:all:" in builder_runs, "wheels only: no compiler is ever needed"
    assert "compileall" in builder_runs and "checked-hash" in builder_runs


def test_runtime_stage_only_copies_what_runs() -> None:
    stage = final_stage()
    (remove,) = instruction(stage, "RUN")  # the base's installer goes; nothing comes
    commands = [c.strip().split()[0] for c in remove.split("&&")]
    assert commands == ["site=\"$(python", "bundled=\"$(python", "rm"], remove
    for word in ("pip", "setuptools", '"$bundled"'):
        assert word in remove.split("rm -rf", 1)[1], f"{word} stays in the runtime stage"
    copies = instruction(stage, "COPY")
    assert copies and all("--from=" in c for c in copies), "the runtime stage takes files from the builder only"


def test_runtime_stage_user_ports_entrypoint_and_healthcheck() -> None:
    stage = final_stage()
    (user,) = instruction(stage, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0, f"USER {user}: numeric, non-root"
    security = pod_spec()["securityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"]), "image and Deployment agree"

    exposed = {int(p.split("/")[0]) for line in instruction(stage, "EXPOSE") for p in line.split()}
    assert exposed == {int(DEFAULTS["PROXY_PORT"]), int(DEFAULTS["PROXY_TLS_PORT"]), int(DEFAULTS["METRICS_PORT"])}

    (entrypoint,) = instruction(stage, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["python", "egress_guard.py"], "exec form, so SIGTERM reaches python"
    assert not instruction(stage, "CMD")

    (healthcheck,) = instruction(stage, "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python", "exec form with python (the slim image has no curl)"
    assert "/health" in command[-1] and "METRICS_PORT" in command[-1]

    variables = env_instruction(stage)
    assert variables["PYTHONDONTWRITEBYTECODE"] == "1", "nothing to write on a read-only root filesystem"
    for name in ("CONFIGMAP_PATH", "PROXY_PORT", "METRICS_PORT"):
        assert variables[name] == DEFAULTS[name]
    for name, value in LISTEN_EVERYWHERE.items():
        assert variables[name] == value, f"{name}: a container listens on every interface"
    labels = " ".join(instruction(stage, "LABEL"))
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_build_context_holds_exactly_what_the_image_copies() -> None:
    sources = [source for sources, _ in copies_from_context() for source in sources]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} - {"tests", "e2e"}
    copied = {s.strip("/") for s in sources}
    assert packages <= copied, f"python packages missing from the image: {sorted(packages - copied)}"
    for path in (".git", ".venv/bin/python", "tests/test_deploy.py", "e2e", "deploy/base/kustomization.yaml",
                 "bench/build/loadgen", "Makefile", "policy/__pycache__/load.cpython-311.pyc", "notes.txt"):
        assert dockerignore_excludes(path), f"{path} would be sent to the Docker build"


@pytest.fixture
def image_root() -> Iterator[Path]:
    """The runtime image's /app and /etc/config, rebuilt from the Dockerfile's COPY lines."""
    top = Path(tempfile.mkdtemp(prefix="egress-guard-image-"))
    top.chmod(0o755)  # traversable by the unprivileged user the image runs as
    app = top / "app"
    app.mkdir()
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc")
    for sources, destination in copies_from_context():
        if not destination.startswith("/app"):
            continue  # requirements.txt: builder only
        target = app / destination[len("/app"):].strip("/")
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=ignored, dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
    compiled = run([sys.executable, "-m", "compileall", "-q", "-f", "--invalidation-mode", "checked-hash", str(app)])
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    config = top / "etc" / "config"
    config.mkdir(parents=True)
    shutil.copy2(DEPLOY / "base" / "egress-policy.yaml", config / "egress-policy.yaml")
    for path in [top, *top.rglob("*")]:  # read-only for everyone but root
        mode = path.stat().st_mode
        path.chmod((mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
                   | (0o555 if path.is_dir() else 0))
    try:
        yield top
    finally:
        for path in [top, *top.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
        shutil.rmtree(top)


def _wait_ready(port: int, server: subprocess.Popen, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as answer:
                return answer.status == 200
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _unprivileged(uid: int, gid: int) -> dict:
    """subprocess arguments that run as the image's user, where this machine allows it.
    Root can switch users, but only if that user can reach this interpreter (a venv on a
    pyenv under /root cannot be); otherwise the run stays as the current user, and the
    check that nothing was written still holds."""
    if os.geteuid() != 0:
        return {}
    as_user = {"user": uid, "group": gid, "extra_groups": []}
    try:
        if run([sys.executable, "-c", "pass"], **as_user).returncode == 0:
            return as_user
    except PermissionError:
        pass
    return {}


def test_image_layout_runs_from_a_read_only_tree(image_root: Path) -> None:
    """The files the Dockerfile copies are all the proxy needs; it writes nothing, serves
    /health and /ready, passes the HEALTHCHECK command and exits 0 on SIGTERM."""
    stage = final_stage()
    uid, gid = (int(x) for x in instruction(stage, "USER")[0].split(":"))
    as_user = _unprivileged(uid, gid)
    app = image_root / "app"
    environment = {**env_instruction(stage), "HOME": "/", "LANG": "C.UTF-8"}
    environment["PATH"] = f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"
    proxy_port, metrics_port = _free_port(), _free_port()
    environment.update(PROXY_HOST="127.0.0.1", METRICS_HOST="127.0.0.1", PROXY_PORT=str(proxy_port),
                       METRICS_PORT=str(metrics_port), CONFIGMAP_PATH=str(image_root / "etc/config/egress-policy.yaml"))
    before = sorted(str(p) for p in image_root.rglob("*"))
    entrypoint = json.loads(instruction(stage, "ENTRYPOINT")[0])

    for extra in (["--version"], ["check-policy", "egress-policy.yaml"]):
        done = run([*entrypoint, *extra], cwd=app, env=environment, **as_user)
        assert done.returncode == 0, f"{extra}: {done.stdout}{done.stderr}"

    healthcheck = json.loads(instruction(stage, "HEALTHCHECK")[0].split(" CMD ", 1)[1])
    server = subprocess.Popen(entrypoint, cwd=app, env=environment, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, **as_user)
    health, checked, exit_code = None, None, None
    try:
        if _wait_ready(metrics_port, server):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=2) as answer:
                health = json.loads(answer.read())
            checked = run(healthcheck, cwd=app, env=environment, **as_user)
            server.send_signal(signal.SIGTERM)
            exit_code = server.wait(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
        log = server.communicate()[0]
    assert health == {"status": "healthy"}, f"/ready never answered 200; the proxy said:\n{log}"
    assert checked.returncode == 0, f"HEALTHCHECK failed: {checked.stderr}"
    assert exit_code == 0, f"SIGTERM: exit {exit_code}\n{log}"
    assert sorted(str(p) for p in image_root.rglob("*")) == before, "the proxy wrote files at runtime"

    stopped = run(healthcheck, cwd=app, env=environment, **as_user)
    assert stopped.returncode != 0, "HEALTHCHECK must fail when nothing answers"


# ---------------------------------------------------------------------------
# Kubernetes: rendering and schema validation


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_and_validates_strictly(kustomization: str) -> None:
    problems = []
    for doc in rendered(kustomization):
        kind = (doc.get("apiVersion"), doc.get("kind"))
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                if kind not in CRD_KINDS:
                    problems.append(f"{kind}: no schema in Kubernetes {version}")
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                problems.append(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {path}: {error.message}")
    assert not problems, "\n".join(problems)


def manifest_files() -> list[Path]:
    """Whole manifests (patches are partial by design: they are validated rendered)."""
    skip = {"kustomization.yaml", "egress-policy.yaml"}
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name not in skip and not p.name.endswith("-patch.yaml")
                  and p.relative_to(DEPLOY).parts[0] != "compose")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_file_validates_strictly(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert (doc["apiVersion"], doc["kind"]) in CRD_KINDS, f"{doc['kind']}: unknown kind"


def test_strict_validation_rejects_unknown_fields() -> None:
    """The validation above is strict: a misspelt field fails instead of being dropped."""
    broken = json.loads(json.dumps(deployment()))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready", "port": 9090}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_manifest_is_left_out_of_its_kustomization(kustomization: str) -> None:
    directory = DEPLOY / kustomization
    config = yaml.safe_load((directory / "kustomization.yaml").read_text())
    used = set(config.get("resources", [])) | {p["path"] for p in config.get("patches", []) if "path" in p}
    for generator in config.get("configMapGenerator", []) + config.get("secretGenerator", []):
        used |= {f.split("=")[-1] for f in generator.get("files", [])}
    for path in directory.glob("*.yaml"):
        if path.name != "kustomization.yaml" and not path.name.startswith("example-"):
            assert path.name in used, f"deploy/{kustomization}/{path.name} is never applied"


# ---------------------------------------------------------------------------
# Kubernetes: what the Deployment promises


def test_deployment_env_matches_the_proxy_defaults() -> None:
    values = env()
    assert DEFAULTS["PROXY_HOST"] == DEFAULTS["METRICS_HOST"] == "127.0.0.1"
    for name, default in {**DEFAULTS, **LISTEN_EVERYWHERE}.items():
        if default.startswith("("):
            continue  # optional, unset by default
        assert values.get(name) == default, f"{name}: {values.get(name)!r}, the proxy's default is {default!r}"
    assert container_port("proxy") == int(values["PROXY_PORT"])
    assert container_port("metrics") == int(values["METRICS_PORT"])


def test_deployment_runs_replicated_and_spread_across_nodes() -> None:
    spec = deployment()["spec"]
    hpa = find(base(), "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2, "at least two replicas at all times"
    # The HPA owns the count; a `replicas:` in the manifest would be re-applied by every
    # `kubectl apply -k` (policy changes included) and scale a busy Deployment down.
    assert "replicas" not in spec
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    pod = pod_spec()
    by_node = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node and all(selects(c["labelSelector"]["matchLabels"], POD_LABELS) for c in by_node)
    assert by_node[0]["maxSkew"] == 1
    preferred = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
               and selects(t["podAffinityTerm"]["labelSelector"]["matchLabels"], POD_LABELS) for t in preferred)


def test_deployment_security_context() -> None:
    pod = pod_spec()
    security = {**pod["securityContext"], **container()["securityContext"]}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged") in (None, False)
    assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add")
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host)
    namespace = find(base(), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_deployment_resources_have_requests_and_limits() -> None:
    resources = container()["resources"]
    for kind in ("cpu", "memory"):
        request, limit = quantity(resources["requests"][kind]), quantity(resources["limits"][kind])
        assert 0 < request <= limit, kind


def test_deployment_probes_use_ready_and_health() -> None:
    metrics_port = int(env()["METRICS_PORT"])
    probes = container()
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health"), ("startupProbe", "/health")):
        get = probes[probe]["httpGet"]
        assert get["path"] == path, probe
        port = get["port"] if isinstance(get["port"], int) else container_port(get["port"])
        assert port == metrics_port, probe
    # A liveness failure restarts the pod and cuts every tunnel: it must be slower to fire
    # than readiness.
    live, ready = probes["livenessProbe"], probes["readinessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"]


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    pre_stop = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(env()["SHUTDOWN_TIMEOUT"])
    assert pod_spec()["terminationGracePeriodSeconds"] > pre_stop + drain


def test_policy_configmap_is_unhashed_and_mounted_as_a_directory() -> None:
    config_path = Path(env()["CONFIGMAP_PATH"])
    (mount,) = [m for m in container()["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount and "subPathExpr" not in mount, "subPath mounts never see ConfigMap updates"
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    name = volume["configMap"]["name"]
    configmap = find(base(), "ConfigMap", name)  # same name: no content-hash suffix
    generator = yaml.safe_load((DEPLOY / "base/kustomization.yaml").read_text())["configMapGenerator"][0]
    assert generator["name"] == name and generator["options"]["disableNameSuffixHash"] is True
    assert configmap["data"][config_path.name] == (DEPLOY / "base/egress-policy.yaml").read_text()
    assert "items" not in volume["configMap"], "project the whole ConfigMap"


def test_deploy_policy_passes_check_policy() -> None:
    result = run([sys.executable, str(ROOT / "egress_guard.py"), "check-policy",
                  str(DEPLOY / "base/egress-policy.yaml")], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_pdb_and_hpa_target_the_proxy_pods() -> None:
    docs = base()
    service = find(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert selects(service["spec"]["selector"], POD_LABELS)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["proxy"]["port"] == int(DEFAULTS["PROXY_PORT"]) and ports["proxy"]["targetPort"] == "proxy"
    assert ports["metrics"]["port"] == int(DEFAULTS["METRICS_PORT"]) and ports["metrics"]["targetPort"] == "metrics"

    pdb = find(docs, "PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], POD_LABELS)
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable", 0) >= 1

    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "egress-guard"}
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert all(d["metadata"].get("namespace") == "egress-guard" for d in docs if d["kind"] != "Namespace")


# ---------------------------------------------------------------------------
# Kubernetes: NetworkPolicies make the proxy the only way out


def _ports(rule: dict) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports", [])}


def _is_dns(peer: dict) -> bool:
    return (peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "kube-system"}
            and peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"})


def test_proxy_network_policy() -> None:
    policies = [d for d in base() if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, "default deny in the namespace"
    (proxy,) = [p for p in policies if selects(p["spec"]["podSelector"].get("matchLabels", {}), POD_LABELS)]
    spec = proxy["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}

    proxy_port, metrics_port = int(DEFAULTS["PROXY_PORT"]), int(DEFAULTS["METRICS_PORT"])
    sources: dict[int, list[dict]] = {}
    for rule in spec["ingress"]:
        assert rule.get("from") and rule.get("ports"), "no ingress rule may allow everyone or every port"
        for _, port in _ports(rule):
            sources.setdefault(port, []).extend(rule["from"])
    assert set(sources) == {proxy_port, metrics_port}
    assert sources[proxy_port] == [{"namespaceSelector": {"matchLabels": {"egress-guard.io/client": "true"}}}]
    assert sources[metrics_port] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]

    dns = [r for r in spec["egress"] if any(_is_dns(peer) for peer in r.get("to", []))]
    assert dns and _ports(dns[0]) == {("UDP", 53), ("TCP", 53)}
    blocks = [peer["ipBlock"] for r in spec["egress"] for peer in r.get("to", []) if "ipBlock" in peer]
    for rule in spec["egress"]:
        assert rule.get("to"), "an egress rule without `to` allows every destination"
    v4 = [b for b in blocks if b["cidr"] == "0.0.0.0/0"]
    assert v4, "the outside world over IPv4"
    required = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}
    assert required <= set(v4[0]["except"])
    for block in blocks:
        network = ipaddress.ip_network(block["cidr"])
        if network.version == 6:
            assert {"fc00::/7", "fe80::/10"} <= set(block["except"])
        for hole in block.get("except", []):
            assert ipaddress.ip_network(hole).subnet_of(network)


def test_client_namespace_policy_allows_only_dns_and_the_proxy() -> None:
    (policy,) = rendered("client-namespace")
    assert policy["kind"] == "NetworkPolicy" and "namespace" not in policy["metadata"], \
        "applied with -n into each client namespace"
    spec = policy["spec"]
    assert spec["podSelector"] == {} and spec["policyTypes"] == ["Egress"]
    assert "ingress" not in spec, "the client's own ingress rules are left alone"
    assert len(spec["egress"]) == 2
    for rule in spec["egress"]:
        assert rule.get("to") and rule.get("ports")
        for peer in rule["to"]:
            assert "ipBlock" not in peer
    (dns,) = [r for r in spec["egress"] if all(_is_dns(peer) for peer in r["to"])]
    assert _ports(dns) == {("UDP", 53), ("TCP", 53)}
    (proxy,) = [r for r in spec["egress"] if r is not dns]
    (peer,) = proxy["to"]
    namespace = find(base(), "Namespace")["metadata"]["name"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    assert selects(peer["podSelector"]["matchLabels"], POD_LABELS)
    assert _ports(proxy) == {("TCP", int(DEFAULTS["PROXY_PORT"])), ("TCP", int(DEFAULTS["PROXY_TLS_PORT"]))}


def test_example_client_uses_the_service_and_a_secret_key() -> None:
    pod = yaml.safe_load((DEPLOY / "client-namespace/example-client.yaml").read_text())
    variables = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    service = find(base(), "Service")
    address = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{DEFAULTS['PROXY_PORT']}"
    assert variables["HTTPS_PROXY"]["value"] == f"http://$(EGRESS_GUARD_KEY):x@{address}"
    assert "secretKeyRef" in variables["EGRESS_GUARD_KEY"]["valueFrom"]
    assert ".svc" in variables["NO_PROXY"]["value"]


# ---------------------------------------------------------------------------
# Prometheus Operator objects


def monitoring() -> tuple[dict, ...]:
    return rendered("overlays/monitoring")


def test_monitoring_overlay_is_the_base_plus_crds() -> None:
    overlay = {(d["kind"], d["metadata"]["name"]) for d in monitoring()}
    core = {(d["kind"], d["metadata"]["name"]) for d in base()}
    assert overlay - core == {("ServiceMonitor", "egress-guard"), ("PrometheusRule", "egress-guard")}
    assert core <= overlay


def test_service_monitor_scrapes_the_metrics_port() -> None:
    monitor = find(monitoring(), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "egress-guard"
    spec = monitor["spec"]
    service = find(monitoring(), "Service")
    assert selects(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    assert spec["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    # The alerts select job="egress-guard": that is the value of the Service label jobLabel names.
    assert service["metadata"]["labels"][spec["jobLabel"]] == "egress-guard"


def alert_rules() -> list[dict]:
    """From the source file, so collection needs no kubectl (the rendered copy is the same)."""
    rule = yaml.safe_load((DEPLOY / "overlays/monitoring/prometheusrule.yaml").read_text())
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_prometheus_rule_structure() -> None:
    rule = find(monitoring(), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["name"]
    assert rule["metadata"]["namespace"] == "egress-guard"
    assert [r for g in rule["spec"]["groups"] for r in g["rules"]] == alert_rules()
    groups = rule["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    for r in alert_rules():
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", r["alert"])
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        if "for" in r:
            assert re.fullmatch(r"(\d+[smhd])+", r["for"]), r["for"]


def test_alerts_cover_the_operators_questions() -> None:
    by_metric: dict[str, set[str]] = {}
    for r in alert_rules():
        for name in metric_names_in(r["expr"]):
            by_metric.setdefault(name, set()).add(r["alert"])
    assert "up" in by_metric, "proxy down"
    assert "egress_proxy_config_load_errors_total" in by_metric, "policy load errors"
    assert "egress_proxy_config_last_reload_success_timestamp_seconds" in by_metric, "stale policy"
    denial = [r for r in alert_rules() if "denied" in r["expr"] and "sni_mismatch" in r["expr"]]
    assert denial, "denial spike"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expression_uses_only_exported_series(rule: dict) -> None:
    assert promql_problems(rule["expr"]) == []
    known = output_labels(parse_promql(rule["expr"]))
    if known is not None:
        text = json.dumps(rule["annotations"])
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in known, f"annotation uses $labels.{label}, the expression keeps only {sorted(known)}"


# ---------------------------------------------------------------------------
# Grafana dashboard


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text())


def panels() -> list[dict]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p.get("targets", [])]


def test_dashboard_metric_contract_matches_proxy_observe() -> None:
    """The series this dashboard and the alerts were written against are the ones
    proxy/observe.py exports, with the same labels."""
    exported = exported_series()
    for name, labels in CONTRACT_SERIES.items():
        assert name in exported, f"{name} is no longer exported"
        assert exported[name] == labels, f"{name}: labels {sorted(exported[name])}, expected {sorted(labels)}"
    assert "proxy/observe.py" in inspect.getsourcefile(observe.Metrics).replace(os.sep, "/")


def test_dashboard_is_importable_grafana_json() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    assert board.get("id") is None, "no instance-specific id"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert "label_values(egress_proxy_requests_total" in variables["identity"]["query"]["query"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_layout_has_no_overlaps_and_puts_the_overview_first() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels():
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    content = [p for p in panels() if p["type"] != "row"]
    top = min(p["gridPos"]["y"] for p in content)
    first = [p for p in content if p["gridPos"]["y"] == top]
    assert all(p["type"] == "stat" for p in first)
    text = json.dumps(first)
    for needle in ("egress_proxy_active_tunnels", "denied|sni_mismatch", "egress_proxy_config_load_errors_total"):
        assert needle in text, f"the top row should answer {needle} at a glance"


def test_dashboard_uses_only_exported_series() -> None:
    problems = [f"{title}: {problem}" for title, expr in queries() for problem in promql_problems(expr)]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+)(\{.*\})?, *(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]["query"]
        metric, _, label = match.groups()
        if metric not in exported_series():
            problems.append(f"variable {variable['name']}: {metric} is not exported")
        elif label not in exported_series()[metric] | TARGET_LABELS:
            problems.append(f"variable {variable['name']}: {metric} has no label {label}")
    assert problems == []


def test_dashboard_covers_every_egress_metric() -> None:
    used = set().union(*(metric_names_in(expr) for _, expr in queries()))
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exported_series() if n.startswith("egress_proxy_")}
    uncovered = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not uncovered, f"metrics with no panel: {sorted(uncovered)}"
    title_exprs = " ".join(expr for _, expr in queries())
    for quantile in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(egress_proxy_tunnel_duration_seconds_bucket" in title_exprs
    assert "topk(" in title_exprs, "denial hot spots"
    assert "process_resident_memory_bytes" in used and "process_cpu_seconds_total" in used


def test_promql_checker_catches_mistakes() -> None:
    """The checks above are not vacuous."""
    assert promql_problems('rate(egress_proxy_request_total[5m])') == ["egress_proxy_request_total is not exported by egress-guard"]
    assert promql_problems('egress_proxy_tunnel_duration_seconds_count{identity="a"}') \
        == ["egress_proxy_tunnel_duration_seconds_count has no label 'identity'"]
    assert promql_problems('egress_proxy_requests_total{status="rejected"}') \
        == ["egress_proxy_requests_total: status values ['rejected'] are never exported"]
    assert promql_problems('sum by (destination) (egress_proxy_bytes_total)') \
        == ["by (destination): no aggregated series carries that label"]
    assert output_labels(parse_promql('sum by (pod) (x) > 0 and sum(y) > 1')) == {"pod"}


# ---------------------------------------------------------------------------
# Kubernetes: the TLS overlay


def test_tls_overlay_mounts_what_the_proxy_reads_and_opens_the_port() -> None:
    docs = rendered("overlays/tls")
    spec = find(docs, "Deployment", "egress-guard")["spec"]["template"]["spec"]
    (proxy,) = spec["containers"]
    values = {item["name"]: item["value"] for item in proxy["env"] if "value" in item}
    mounts = {m["name"]: m for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for variable, volume in (("PROXY_TLS_CERT", "tls"), ("PROXY_TLS_KEY", "tls"), ("PROXY_TLS_CLIENT_CA", "client-ca")):
        mount = mounts[volume]
        assert values[variable].startswith(mount["mountPath"] + "/") and mount["readOnly"], (variable, mount)
        assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
    examples = list(yaml.safe_load_all((DEPLOY / "overlays/tls/example-certificate.yaml").read_text()))
    listener = next(d for d in examples if d["kind"] == "Certificate" and "server auth" in d["spec"].get("usages", ()))
    assert volumes["tls"]["secret"]["secretName"] == listener["spec"]["secretName"]
    assert volumes["tls"]["secret"]["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 10001
    assert values["PROXY_TLS_CERT"].endswith("/tls.crt") and values["PROXY_TLS_KEY"].endswith("/tls.key")
    tls_port = int(values["PROXY_TLS_PORT"])
    assert [p["containerPort"] for p in proxy["ports"] if p["name"] == "proxy-tls"] == [tls_port]
    service = find(docs, "Service", "egress-guard")
    assert {"name": "proxy-tls", "port": tls_port, "targetPort": "proxy-tls", "protocol": "TCP"} in service["spec"]["ports"]
    admitted = find(docs, "NetworkPolicy", "egress-guard")["spec"]["ingress"][0]["ports"]
    assert {"protocol": "TCP", "port": tls_port} in admitted
    client = find(rendered("client-namespace"), "NetworkPolicy")["spec"]["egress"][-1]["ports"]
    assert {"protocol": "TCP", "port": tls_port} in client
    # The base stays as it was: no TLS port that nothing listens on.
    assert "proxy-tls" not in {p["name"] for p in find(base(), "Service", "egress-guard")["spec"]["ports"]}


# ---------------------------------------------------------------------------
# Compose (deploy/compose/compose.yaml)

COMPOSE = DEPLOY / "compose" / "compose.yaml"


def test_compose_file_validates_against_the_compose_specification(tmp_path: Path) -> None:
    command = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    checked = run([*command, str(COMPOSE)])
    assert checked.returncode == 0, checked.stdout + checked.stderr

    typo = tmp_path / "compose.yaml"
    typo.write_text(COMPOSE.read_text().replace("read_only: true\n    user:", "readonly: true\n    user:"))
    assert "readonly" in typo.read_text()
    assert run([*command, str(typo)]).returncode != 0, "the schema check must reject an unknown key"


def test_compose_runs_the_image_as_the_manifests_do() -> None:
    (service,) = yaml.safe_load(COMPOSE.read_text())["services"].values()
    stage = final_stage()
    assert service["image"] == f"egress-guard:{cli.__version__}"
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["user"] == instruction(stage, "USER")[0]
    (mount,) = service["volumes"]
    assert (mount["type"], mount["target"], mount["read_only"]) == ("bind", str(Path(DEFAULTS["CONFIGMAP_PATH"]).parent), True)
    assert not mount["source"].endswith(".yaml"), "the directory: a file mount never sees an edit"
    ports = {str(p).rsplit(":", 1)[-1]: str(p) for p in service["ports"]}
    assert set(ports) == {DEFAULTS["PROXY_PORT"], DEFAULTS["METRICS_PORT"]}
    assert ports[DEFAULTS["METRICS_PORT"]].startswith("127.0.0.1:"), "metrics stay local"
    healthcheck = json.loads(instruction(stage, "HEALTHCHECK")[0].split(" CMD ", 1)[1])
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck], "the image's HEALTHCHECK"
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert service["stop_signal"] == "SIGTERM"
    assert grace and int(grace[1]) > float(service["environment"]["SHUTDOWN_TIMEOUT"]), "drain before SIGKILL"
