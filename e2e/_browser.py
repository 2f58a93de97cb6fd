"""Headless Chromium (Debian's `chromium`, installed by .ci/ensure-tools) for the status
page: one run per call, bounded in time, loopback only.

Chromium is told to stay off the network (no background networking, updates, sync,
default apps, pings or crash reports; a fresh profile), and its host resolver maps every
name to "not found": it can reach nothing but the literal 127.0.0.1 URL it is given.
`browse(..., trace=True)` also runs it under `strace` and returns every network system
call it made, so a test can prove that.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

RUN_TIMEOUT = 60.0  # seconds one Chromium run may take, start to exit

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
    "--no-pings", "--disable-breakpad", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--metrics-recording-only", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def chromium_path() -> str | None:
    return shutil.which("chromium")


@dataclass
class Visit:
    dom: str  # the DOM after load (--dump-dom), or "" for a screenshot run
    network: list[str]  # strace lines of network system calls (trace=True), else []


def browse(url: str, workdir: Path, *, screenshot: Path | None = None, size: tuple[int, int] = (1280, 1400),
           trace: bool = False) -> Visit:
    """Load `url` (http://127.0.0.1:...) in headless Chromium with a fresh profile under
    `workdir`; dump its DOM, or save a PNG to `screenshot`."""
    assert url.startswith("http://127.0.0.1:"), url
    chromium = chromium_path()
    assert chromium is not None, "chromium is not installed (make test installs it: .ci/ensure-tools)"
    workdir.mkdir(parents=True, exist_ok=True)
    command = [chromium, *FLAGS, f"--user-data-dir={workdir / 'profile'}", f"--window-size={size[0]},{size[1]}"]
    command += [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
    trace_file = workdir / "network.trace"
    if trace:
        command = ["strace", "-f", "-qq", "-yy", "-e", "trace=connect,sendto,sendmsg,sendmmsg",
                   "-o", str(trace_file), *command]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"chromium exited with {done.returncode}:\n{done.stderr[-3000:]}"
    if screenshot is not None:
        assert screenshot.exists() and screenshot.stat().st_size > 0, done.stderr[-3000:]
    network = trace_file.read_text().splitlines() if trace else []
    return Visit("" if screenshot is not None else done.stdout, network)


_INET = re.compile(r'inet_addr\("([0-9.]+)"\)|inet_pton\(AF_INET6, "([0-9a-fA-F:.]+)"')
_PEER = re.compile(r"<(?:TCP|UDP)(?:v6)?:\[.*?->\[?([0-9a-fA-F:.]+?)\]?:\d+\]>")


def off_loopback(network: list[str]) -> list[str]:
    """The traced system calls that reached, or sent to, an address outside loopback.

    A TCP connect anywhere but loopback counts; so does any send on a socket whose peer
    is not loopback. A UDP connect() sends nothing (Chromium connects a UDP socket to a
    public IPv6 address only to learn whether IPv6 is routable), so it counts only if
    something is then sent on it, which the send rule catches."""
    found = []
    for line in network:
        if " connect(" in line and "<TCP" in line:
            addresses = [a or b for a, b in _INET.findall(line)]
            if any(not ipaddress.ip_address(a).is_loopback for a in addresses):
                found.append(line)
        elif re.search(r" send(to|msg|mmsg)\(", line):
            peer = _PEER.search(line)
            addresses = [a or b for a, b in _INET.findall(line)]
            if peer is not None:
                addresses.append(peer.group(1))
            if any(not ipaddress.ip_address(a).is_loopback for a in addresses):
                found.append(line)
    return found
