"""The Python package (issue 14 part 2): `python -m build` makes an sdist and, from it, a
wheel; the wheel installs into a fresh venv offline (the pinned runtime wheels `make
test` keeps in .venv/wheels) and its `egress-guard` command is `python egress_guard.py`:
same --help, --version, check-policy, explain, and a server that serves and drains.
`pip install .` from the sources works offline too (its isolated build takes setuptools
from the same directory).
"""

from __future__ import annotations

import email.parser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from _support import APP_POLICY, REPO, Proxy, fresh_venv, run, tunnel_works

from proxy import cli

def checkout(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "egress_guard.py", *args], cwd=REPO)


def test_wheel_holds_the_modules_and_the_command(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    info = f"egress_guard-{cli.__version__}.dist-info"
    assert top == {"egress_guard.py", "policy", "proxy", "wire", info}, top
    for package in ("policy", "proxy", "wire"):
        modules = {p.name for p in (REPO / package).glob("*.py")}
        assert modules == {n.split("/")[1] for n in names if n.startswith(f"{package}/")}, package
    zipped = zipfile.ZipFile(wheel)
    entry_points = zipped.read(f"{info}/entry_points.txt").decode()
    assert re.search(r"^egress-guard = proxy\.command:main$", entry_points, re.M), entry_points
    assert f"{info}/licenses/LICENSE" in names


def test_wheel_metadata_version_and_runtime_dependencies_only(wheel: Path, dist: Path) -> None:
    info = f"egress_guard-{cli.__version__}.dist-info"
    metadata = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode())
    assert metadata["Name"] == "egress-guard" and metadata["Version"] == cli.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert sorted(metadata.get_all("Requires-Dist")) == sorted(p for p in pins if p), \
        "the package depends on exactly the runtime pins (requirements.txt), no test tooling"
    assert (dist / f"egress_guard-{cli.__version__}.tar.gz").exists(), "the sdist the wheel was built from"


def test_the_version_is_written_once() -> None:
    """pyproject.toml reads proxy/cli.py; the other places that name it are checked here."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'version = { attr = "proxy.cli.__version__" }' in pyproject and cli.__version__ not in pyproject
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG VERSION={cli.__version__}\n" in dockerfile, "the image label's default"
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert releases and releases[0] == cli.__version__, "CHANGELOG.md's newest release"


def test_installed_command_has_the_checkouts_command_line(installed: Path, tmp_path: Path) -> None:
    command = installed / "egress-guard"
    version = run([command, "--version"], cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"egress-guard {cli.__version__}\n"), version.stderr
    helped, reference = run([command, "--help"], cwd=tmp_path), checkout("--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: egress-guard ")
    assert helped.stdout.replace("egress-guard", "python egress_guard.py", 1) == reference.stdout

    policy = tmp_path / "policy.yaml"
    shutil.copy2(REPO / "egress-policy.yaml", policy)
    for args in (["check-policy", policy], ["explain", policy, "--key", "frontend-pod-1", "--dest", "img.cdn.example.com:443"],
                 ["explain", policy, "--identity", "frontend-services", "--dest", "api.example.com:443",
                  "--address", "169.254.169.254"], ["explain", policy]):
        got, want = run([command, *args], cwd=tmp_path), run([sys.executable, REPO / "egress_guard.py", *args], cwd=tmp_path)
        assert (got.returncode, got.stdout) == (want.returncode, want.stdout), args
        # Usage lines wrap at other places for a shorter program name; the message is the same.
        last = got.stderr.splitlines()[-1:]
        assert [line.replace("egress-guard", "python egress_guard.py") for line in last] == want.stderr.splitlines()[-1:]

    where = run([installed / "python", "-c", "import egress_guard; print(egress_guard.__file__)"], cwd=tmp_path)
    assert "site-packages" in where.stdout, f"the command must run the installed copy: {where.stdout}{where.stderr}"


def test_installed_command_serves_and_drains(installed: Path, start_proxy, ca, fresh_tls_upstream) -> None:
    proxy: Proxy = start_proxy(APP_POLICY, _launch=lambda _: [str(installed / "egress-guard"), "serve"])
    assert tunnel_works(proxy, ca, "api.example.com", fresh_tls_upstream.port)
    (started,) = proxy.find_logs(message="egress-guard listening")
    assert started["version"] == cli.__version__
    assert proxy.stop(10) == 0, proxy.output()
    assert proxy.log_lines()[-1]["message"] == "stopped"


def test_pip_install_from_the_sources_gives_the_command(source: Path, tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "venv", source)  # `pip install .`, with build isolation
    version = run([bin_dir / "egress-guard", "--version"], cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"egress-guard {cli.__version__}\n"), version.stderr
