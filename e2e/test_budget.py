"""The hot path's budget per TLS tunnel, in counts a noisy machine cannot blur.

Speed is measured by `make bench`, as ratios; this guard only keeps the hot path from
quietly growing. It runs `python egress_guard.py` (through e2e/_counting_proxy.py, which
counts greenlet switches and Python function calls) under `strace -f -c`, opens N tunnels
one after another with a real ClientHello to a local echo upstream, stops the proxy, and
does it again with more tunnels: the difference, divided by the difference in tunnels,
is what one tunnel costs in system calls, greenlet switches and Python function calls
(start-up and shutdown cancel out). Budgets are the figures measured when the lean path
landed (bench/README.md gives the breakdown), plus a margin for the few counts that
depend on timing (event-loop turns). It measures twice: with the same head every time (a
pod reconnecting; its parse and verdicts are remembered) and with a new head each time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _support import HOSTS, REPO, Upstream, basic, clean_env, free_port, wait_until

# Per TLS tunnel (CONNECT, 200, a 517-byte ClientHello echoed back, close), one client at a
# time: when the greenlets and parses began to be reused (bench/README.md) a tunnel took 42
# system calls, 12 switches and 302 Python calls with a head the proxy had seen before (a
# pod reconnecting: the parse and the verdicts come from memory), and 375 Python calls with
# a new head each time (its own parse and key). One at a time, every step is its own
# event-loop turn; under load they share turns and fewer calls are made per tunnel.
BUDGET = {"syscalls": 46, "switches": 15, "calls": 330}
BUDGET_NEW_HEADS = {"syscalls": 46, "switches": 15, "calls": 410}
# A greenlet of its own for each connection and each pump would map and unmap a frame
# stack (16 KiB) per greenlet: parked greenlets are reused (proxy/connections.py).
MAX_MAPPINGS = 0.5
FEW, MANY = 40, 160

POLICY = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
"""


def client_hello() -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="api.example.com")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tunnels(port: int, upstream: int, count: int, hello: bytes, new_heads: bool = False) -> None:
    """`count` TLS tunnels one after another; `new_heads`: each head differs from every
    head before (a header with the tunnel's number), so none is parsed from memory."""
    for number in range(count):
        extra = f"X-Tunnel: {number}\r\n" if new_heads else ""
        head = (f"CONNECT api.example.com:{upstream} HTTP/1.1\r\nHost: api.example.com:{upstream}\r\n"
                f"Proxy-Authorization: {basic('app-key')}\r\n{extra}\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(head)
            reply = b""
            while not reply.endswith(b"\r\n\r\n"):
                data = sock.recv(1)
                assert data, f"the proxy closed the connection: {reply!r}"
                reply += data
            assert reply.startswith(b"HTTP/1.1 200"), reply
            sock.sendall(hello)
            echoed = b""
            while len(echoed) < len(hello):
                data = sock.recv(65536)
                assert data, "the tunnel closed before the echo"
                echoed += data
            assert echoed == hello


def measure(tmp: Path, count: int, upstream: Upstream, hello: bytes,
            new_heads: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """(system calls by name, {switches, calls}) of one proxy run serving `count` tunnels."""
    tmp.mkdir()
    (tmp / "policy.yaml").write_text(POLICY)
    (tmp / "hosts").write_text(HOSTS)
    port = free_port()
    env = clean_env()
    env.update({"PROXY_HOST": "127.0.0.1", "PROXY_PORT": str(port), "METRICS_HOST": "127.0.0.1",
                "METRICS_PORT": str(free_port()), "CONFIGMAP_PATH": str(tmp / "policy.yaml"),
                "HOSTS_FILE": str(tmp / "hosts"), "SWITCH_COUNT_FILE": str(tmp / "switches.json"),
                "WATCH_INTERVAL": "3600"})
    log = tmp / "stdout.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["strace", "-f", "-c", "-o", str(tmp / "strace.txt"), sys.executable, "e2e/_counting_proxy.py"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Ready when it says so in its log: polling /ready would add requests to count.
        assert wait_until(lambda: b"egress-guard listening" in log.read_bytes(), 30), log.read_text()
        tunnels(port, upstream.port, count, hello, new_heads)
        time.sleep(0.2)  # the last tunnel's summary is written
    finally:
        # The proxy is strace's child: SIGTERM to strace would only detach it.
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for child in children or [str(process.pid)]:
            os.kill(int(child), signal.SIGTERM)
        process.wait(timeout=30)
    calls = {}
    for line in (tmp / "strace.txt").read_text().splitlines():
        match = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if match and match.group(2) != "total":
            calls[match.group(2)] = int(match.group(1))
    return calls, json.loads((tmp / "switches.json").read_text())


@pytest.mark.parametrize("new_heads", [False, True], ids=["heads-seen-before", "new-heads"])
def test_system_calls_and_switches_per_tunnel(tmp_path: Path, new_heads: bool) -> None:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (make tools installs it)")
    probe = subprocess.run(["strace", "-f", "-c", "-o", "/dev/null", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"this kernel does not allow ptrace: {probe.stderr.decode(errors='replace').strip()}")
    upstream = Upstream()
    hello = client_hello()
    try:
        few, few_switches = measure(tmp_path / "few", FEW, upstream, hello, new_heads)
        many, many_switches = measure(tmp_path / "many", MANY, upstream, hello, new_heads)
    finally:
        upstream.close()
    span = MANY - FEW
    per_call = {name: (many.get(name, 0) - few.get(name, 0)) / span for name in set(few) | set(many)}
    # futex: the resolver thread pool's idle workers, not the tunnels.
    syscalls = sum(v for name, v in per_call.items() if name != "futex")
    switches = (many_switches["switches"] - few_switches["switches"]) / span
    python_calls = (many_switches["calls"] - few_switches["calls"]) / span
    breakdown = ", ".join(f"{name} {v:.1f}" for name, v in sorted(per_call.items(), key=lambda i: -i[1]) if v >= 0.5)
    print(f"per tunnel: {syscalls:.1f} system calls ({breakdown}); {switches:.1f} greenlet switches; "
          f"{python_calls:.0f} Python function calls")
    budget = BUDGET_NEW_HEADS if new_heads else BUDGET
    assert syscalls <= budget["syscalls"], f"{syscalls:.1f} system calls per tunnel ({breakdown})"
    assert switches <= budget["switches"], f"{switches:.1f} greenlet switches per tunnel"
    assert python_calls <= budget["calls"], f"{python_calls:.0f} Python function calls per tunnel"
    mappings = per_call.get("mmap", 0) + per_call.get("munmap", 0)
    assert mappings <= MAX_MAPPINGS, f"{mappings:.1f} mmap/munmap per tunnel: greenlets not reused? ({breakdown})"
    assert syscalls > 10 and switches > 2 and python_calls > 50, "counts this low: the measurement is broken"
