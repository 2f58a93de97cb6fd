#!/usr/bin/env python3
"""Makes docs/status-page.png, the README's screenshot of the status page.

    .venv/bin/python docs/status-page.py        # needs chromium (make test installs it)

Runs `python egress_guard.py` on the example policy (egress-policy.yaml) with one
identity added, `canary` in report mode, whose explicit 127.0.0.1 rule lets its tunnels
reach a local TLS echo server; the example names are pinned to 127.0.0.1 by a
HOSTS_FILE, so the example identities' requests are refused as they would be for a
loopback address. Then some traffic (open tunnels, refusals of several kinds, a
report-mode pass), an explain question, and headless Chromium's screenshot of the page.
Everything is on 127.0.0.1 (the e2e tests' own helpers); every wait is bounded.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import trustme

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO / "e2e"))

from _browser import browse  # noqa: E402
from _support import Proxy, Upstream, connect, recv_exactly, send_raw, server_context, tls_wrap  # noqa: E402

CANARY = """
  # Added for the screenshot: a report-mode identity that may reach the local upstream.
  "canary":
    api_keys:
      - "canary-pod-1"
    mode: report
    allowed_destinations:
      - "127.0.0.1"
"""
HOSTS = "127.0.0.1 api.example.com img.cdn.example.com www.googleapis.com payments.example.net\n"


def policy_text() -> str:
    text = (REPO / "egress-policy.yaml").read_text()
    head, tests = text.split("\n# Tests:", 1)
    return head.rstrip("\n") + "\n" + CANARY + "\n# Tests:" + tests


def main() -> int:
    ca = trustme.CA()
    upstream = Upstream(tls=server_context(ca))
    work = Path(tempfile.mkdtemp(prefix="status-page-"))
    proxy = Proxy(work / "proxy", policy_text(), hosts=HOSTS)
    held = []
    try:
        port = upstream.port
        for sni, size in (("api.example.com", 2_000), ("img.cdn.example.com", 900_000), ("127.0.0.1", 40_000)):
            target = f"{sni}:{port}" if sni != "127.0.0.1" else f"127.0.0.1:{port}"
            reply = connect(proxy, target, "canary-pod-1")
            stream = tls_wrap(reply.sock, ca, sni if sni != "127.0.0.1" else None, check_hostname=False)
            stream.sendall(b"x" * size)
            recv_exactly(stream, size)
            held.append(stream)
            time.sleep(0.3)
        for target, key in ((f"api.example.com:{port}", "frontend-pod-1"),  # a loopback address: forbidden
                            ("payments.example.net:443", "frontend-pod-2"),
                            ("www.googleapis.com:443", "backend-worker-1"),
                            ("api.example.com:443", "stolen-key")):
            connect(proxy, target, key).close()
        send_raw(proxy, b"GET / HTTP/1.1\r\n\r\n").close()
        shot = DOCS / "status-page.png"
        url = (f"http://127.0.0.1:{proxy.metrics_port}/?identity=frontend-services"
               "&dest=payments.example.net:443")
        browse(url, work / "chromium", screenshot=shot, size=(1280, 1500))
        print(f"wrote {shot.relative_to(REPO)}")
    finally:
        for stream in held:
            stream.close()
        proxy.stop()
        upstream.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
