#!/usr/bin/env python3
"""Where egress-guard's time goes: summarize a py-spy profile taken under load.

bench/run.py --profile records egress-guard with `py-spy record --format raw` during
the rate, tls-rate and bulk modes (py-spy is not a project dependency: install it
anywhere, e.g. `python3 -m venv /tmp/spy && /tmp/spy/bin/pip install py-spy`, and pass
`--py-spy /tmp/spy/bin/py-spy` or put it on PATH). This module turns the collapsed
stacks into two tables: time by phase of a tunnel's life, and the hottest functions by
own time. Standalone:

    python bench/hotspots.py bench/build/profile-rate.txt

Sampling pauses the proxy (py-spy's default, which attributes frames accurately), so
the rates of a profiled run are lower than a normal run's: read the shares, not the
throughput. Native time (syscalls, the kernel's TCP work, memcpy) is charged to the
Python frame that made the call.
"""

from __future__ import annotations

import collections
import re
import sys

# (phase, regex on one frame). A sample goes to the first phase matched by a frame,
# walking from the leaf toward the root and skipping gevent/stdlib frames, so the time
# inside gevent's socket methods lands on the egress-guard code that called them.
PHASES = [
    ("logging (records, JSON, write)", r"\(logging/|pythonjsonlogger|\(json/|observe\.py"),
    ("metrics (prometheus_client)", r"prometheus_client"),
    ("auth + policy decisions", r"\(policy/|key_digest|authenticate"),
    ("TLS ClientHello parse", r"wire/tls\.py"),
    ("request head read + parse", r"wire/http\.py|read_head"),
    ("resolve + dial upstream", r"proxy/dial\.py|resolve_and_dial|\bdial \("),
    ("wait for / read ClientHello", r"first_bytes|read_hello"),
    ("pump (relay, recv/send, splice)", r"proxy/pump\.py"),
    ("send 200 / refusals", r"EgressGuard\.(establish|_refuse)|\bresponse \("),
    ("accept + spawn handler", r"do_read|_do_read|\.spawn \(|do_handle"),
    ("close / teardown", r"do_close|socket\.close|_real_close|_drop_"),
    ("other egress_guard code", r"egress_guard\.py|\(proxy/"),
]
GEVENT = ("gevent hub / loop / switching", r"gevent/|greenlet")
IDLE_WORKER = "_WorkerGreenlet.run"  # thread-pool workers waiting for work: not CPU


def load(path):
    """[(frames leaf-first, count)] from py-spy's raw (collapsed) format."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit() or IDLE_WORKER in stack:
                continue
            out.append((stack.split(";")[::-1], int(count)))
    return out


def phases(samples):
    total = sum(c for _, c in samples) or 1
    tally = collections.Counter()
    compiled = [(name, re.compile(rx)) for name, rx in PHASES]
    gev = re.compile(GEVENT[1])
    for frames, count in samples:
        hit = None
        for fr in frames:
            hit = next((name for name, rx in compiled if rx.search(fr)), None)
            if hit:
                break
        if hit is None:
            hit = GEVENT[0] if any(gev.search(fr) for fr in frames) else "no Python frame (GC, native)"
        tally[hit] += count
    return [(name, 100.0 * c / total) for name, c in tally.most_common()], total


def hottest(samples, top=15):
    total = sum(c for _, c in samples) or 1
    own = collections.Counter()
    for frames, count in samples:
        leaf = re.sub(r":\d+\)$", ")", frames[0]) if frames else "?"
        leaf = re.sub(r"\(/\S*?/(site-packages|python3\.\d+)/", "(", leaf)
        leaf = re.sub(r"\(/\S*?/(egress_guard\.py|proxy/|policy/|wire/)", r"(\1", leaf)
        own[leaf or "?"] += count
    return [(k, 100.0 * v / total) for k, v in own.most_common(top)]


def summary(path, title=None, top=15):
    samples = load(path)
    if not samples:
        return "%s: no samples" % path
    ph, total = phases(samples)
    lines = ["%s (%d samples, %s)" % (title or "profile", total, path)]
    lines += ["  %5.1f%%  %s" % (p, name) for name, p in ph]
    lines.append("  hottest functions by own time (native calls included):")
    lines += ["  %5.1f%%  %s" % (p, name) for name, p in hottest(samples, top)]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    for p in sys.argv[1:]:
        print(summary(p))
