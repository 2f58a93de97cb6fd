"""The README's offline demo, run line by line as a newcomer types it (issue 14 part 4).

The three shell blocks under "### Offline demo": the set-up (policy, hosts file,
certificate, `openssl s_server ... &`), the proxy (`... make run`), and one curl line per
outcome, whose comment says what it shows. Only the ports change — free ones instead of
4750, 9090 and 8443, so the test runs beside anything else — and the scratch directory
(a temporary one instead of /tmp/egress-demo). Loopback only; no DNS.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from _support import REPO, Proxy, ProxyFactory, clean_env, free_port, run, wait_until

DEMO = re.search(r"^### Offline demo\n(.*?)^##", (REPO / "README.md").read_text(), re.M | re.S)
# What each curl line's comment promises -> (exit code, words on stdout or stderr).
OUTCOMES = {
    "allowed": (0, "<HTML>"),
    "403": (56, "CONNECT tunnel failed, response 403"),
    "407": (56, "CONNECT tunnel failed, response 407"),
    "SNI mismatch": (35, "alert access denied"),
}


def blocks() -> list[str]:
    assert DEMO, "README.md has no '### Offline demo' section"
    found = re.findall(r"```sh\n(.*?)```", DEMO[1], re.S)
    assert len(found) == 3, "set-up, proxy, curl lines"
    return [block.replace("\\\n", " ") for block in found]


def localize(text: str, scratch: Path, proxy: Proxy | None, server_port: int) -> str:
    text = text.replace("/tmp/egress-demo", str(scratch)).replace(":8443", f":{server_port}")
    if proxy is not None:
        text = text.replace("127.0.0.1:4750", f"127.0.0.1:{proxy.port}")
    return text


def test_the_readme_demo_shows_allowed_403_407_and_sni_mismatch(tmp_path: Path, start_proxy: ProxyFactory) -> None:
    setup, serve, clients = blocks()
    server_port = free_port()
    scratch = tmp_path / "egress-demo"
    background: list[subprocess.Popen] = []
    try:
        for line in localize(setup, scratch, None, server_port).splitlines():
            if line.rstrip().endswith("&"):  # the TLS server: ours to stop
                background.append(subprocess.Popen(shlex.split(line.rstrip()[:-1]), cwd=scratch, env=clean_env(),
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            elif line.strip():
                done = run(["bash", "-ec", line], cwd=scratch if scratch.exists() else tmp_path, env=clean_env())
                assert done.returncode == 0, f"{line}\n{done.stderr}"
        assert wait_until(lambda: run(["openssl", "s_client", "-connect", f"127.0.0.1:{server_port}"],
                                      timeout=10).returncode == 0, timeout=10), "the demo's TLS server is up"

        (line,) = [l for l in localize(serve, scratch, None, server_port).splitlines() if l.strip()]
        *assignments, make, target = shlex.split(line)
        assert (make, target) == ("make", "run"), line
        env = dict(a.split("=", 1) for a in assignments)
        # `make -s`: make's own echo of the command would not be a JSON log line.
        proxy = start_proxy(None, _launch=lambda _: ["make", "-s", "run"], CONFIGMAP_PATH=env["CONFIGMAP_PATH"],
                            HOSTS_FILE=env["HOSTS_FILE"], PROXY_HOST=None, METRICS_HOST=None)
        assert proxy.find_logs(message="egress-guard listening")[0]["proxy"] == f"127.0.0.1:{proxy.port}"

        seen = []
        for line in localize(clients, scratch, proxy, server_port).splitlines():
            command, _, comment = line.partition("#")
            if not command.strip():
                continue
            (expected,) = [o for o in OUTCOMES if comment.strip().startswith(o)]
            code, words = OUTCOMES[expected]
            done = run(shlex.split(command), cwd=scratch, env=clean_env(), timeout=30)
            assert done.returncode == code and words in done.stdout + done.stderr, f"{line}\n{done.stderr}"
            seen.append(expected)
        assert seen == list(OUTCOMES)
        actions = [l["action"] for l in proxy.find_logs(message="request")]
        assert actions == ["allowed", "denied", "auth_required", "sni_mismatch"], actions
    finally:
        for process in background:
            process.terminate()
            process.wait(timeout=10)
