#!/usr/bin/env python3
"""How long the status page takes to build with many open tunnels (issue 15: under
100 ms at 10,000).

    .venv/bin/python bench/status_page.py                  # 10,000 tunnels, 30 loads of each form
    .venv/bin/python bench/status_page.py --tunnels 50000 --loads 10

In process, no sockets: the proxy's own Admission, Records, Metrics and Reloader on the
example policy, holding `--tunnels` open Flow records (spread over the identities, with
names, SNIs, addresses, byte counts and ages) and a full ring of refusals, then the page's
own WSGI handler called for `/` (HTML), `/status.json` and `/` with an explain question,
as the metrics server calls it. A load is timed from the call to the last byte of the
body; the time the hub is blocked is that time, since a load never yields. Prints the
median, 90th percentile and worst load per form. Every loop is bounded by --loads.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from prometheus_client import CollectorRegistry  # noqa: E402

import policy  # noqa: E402
from policy import Status  # noqa: E402
from proxy.admission import Admission  # noqa: E402
from proxy.flow import Flow  # noqa: E402
from proxy.observe import Metrics  # noqa: E402
from proxy.reload import Reloader  # noqa: E402
from proxy.settings import Settings  # noqa: E402
from proxy.status_page import StatusPage  # noqa: E402

POLICY = os.path.join(os.path.dirname(HERE), "egress-policy.yaml")
FORMS = {
    "html /": ("/", ""),
    "json /status.json": ("/status.json", ""),
    "html / + explain": ("/", "identity=frontend-services&dest=img.cdn.example.com:443&sni=img.cdn.example.com"),
}


def populated(tunnels: int, seed: int = 15) -> tuple[StatusPage, Admission]:
    """A page over an Admission holding `tunnels` open flows and a full refusal ring."""
    random.seed(seed)
    logger = logging.getLogger("bench-status")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    current = policy.load_policy_file(POLICY)
    admission = Admission(Settings(configmap_path=POLICY), current, Metrics(CollectorRegistry()), logger)
    reloader = Reloader(POLICY, admission)
    names = sorted(current.identities)
    now = time.monotonic()
    for number in range(tunnels):
        flow = Flow(f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}:{40000 + number % 20000}")
        flow.method = "CONNECT"
        flow.identity = names[number % len(names)]
        flow.host = policy.parse_host(f"host{number % 500}.cdn.example.com")
        flow.port = 443
        flow.sni = flow.host.name
        flow.address = ipaddress.ip_address(f"203.0.113.{number % 250 + 1}")
        flow.up, flow.down = random.randrange(1 << 20), random.randrange(1 << 24)
        flow.started = flow.quiet_since = now - random.uniform(0, 3600)
        flow.seen = flow.up + flow.down
        admission.open.add(flow)
    for number in range(200):  # more than the ring keeps
        flow = Flow(f"10.9.0.{number % 250}:5{number:04d}")
        flow.identity = names[number % len(names)]
        flow.host, flow.port = policy.parse_host(f"denied{number}.example.net"), 443
        admission.records.decision(flow, Status.DENIED, "destination not allowed")
    return StatusPage("bench", "", lambda: admission, lambda: reloader), admission


def load(page: StatusPage, path: str, query: str) -> tuple[float, int]:
    """(seconds, body bytes) of one load."""
    answer: list[str] = []
    started = time.perf_counter()
    body = b"".join(page({"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"},
                         lambda status, headers: answer.append(status)))
    elapsed = time.perf_counter() - started
    assert answer and answer[0] == "200 OK", answer
    return elapsed, len(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=10_000, help="open tunnels (default 10000)")
    parser.add_argument("--loads", type=int, default=30, help="timed loads per form (default 30)")
    args = parser.parse_args(argv)
    if args.tunnels < 0 or not 1 <= args.loads <= 10_000:
        parser.error("--tunnels must be >= 0 and --loads between 1 and 10000")
    built = time.perf_counter()
    page, admission = populated(args.tunnels)
    print(f"{len(admission.open)} open tunnels, {len(admission.records.activity.refusals)} refusals kept "
          f"(set up in {time.perf_counter() - built:.1f} s); {args.loads} loads per form, after one warm-up load")
    print(f"{'form':<20} {'median':>9} {'p90':>9} {'worst':>9} {'body':>10}")
    for name, (path, query) in FORMS.items():
        load(page, path, query)
        times, size = [], 0
        for _ in range(args.loads):
            elapsed, size = load(page, path, query)
            times.append(elapsed * 1000)
        times.sort()
        p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
        print(f"{name:<20} {statistics.median(times):>6.1f} ms {p90:>6.1f} ms {times[-1]:>6.1f} ms {size:>8} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
