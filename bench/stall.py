#!/usr/bin/env python3
"""Reload stall: how long do live tunnels freeze while egress-guard reloads a big policy?

Two halves:

* `client` (a subprocess, pinned to the load CPU by bench/run.py): opens a few
  tunnels through the proxy to the upstream echo server and echoes a small message on
  them in turn, without pause except an optional pacing sleep, recording for every echo
  its completion time (CLOCK_MONOTONIC, the same clock as the driver's) and round-trip
  time. It prints READY once the tunnels are up and one JSON line when told to stop
  (SIGTERM) or when its own time cap runs out.

      python bench/stall.py client --proxy 127.0.0.1:19010 --target 127.0.0.1:19001 \
          --key bench-raw-key [--tunnels 4] [--size 32] [--pace-ms 1] [--max-seconds 300]

* `analyze()`: splits those samples into the quiet baseline and the reload windows
  (SIGHUP sent -> "policy reloaded" logged, plus a short tail) and reports, for each,
  the longest gap between two consecutive echoes and the RTT percentiles. The stall a
  reload causes is the max gap during reloads; the baseline's max gap is the noise floor.

Loopback only: the client refuses a non-loopback proxy address. Every loop is bounded in
count and time.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import math
import signal
import socket
import sys
import time

MAX_SAMPLES = 2_000_000


def _loopback_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"stall client: {text} is not a loopback address")
    return host, int(port)


def _open_tunnel(proxy: tuple[str, int], target: str, key: str, timeout: float) -> socket.socket:
    sock = socket.create_connection(proxy, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cred = base64.b64encode(f"{key}:x".encode()).decode()
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                 f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
    head = b""
    for _ in range(64):
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("proxy closed before answering CONNECT")
        head += chunk
        if b"\r\n\r\n" in head:
            break
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise OSError(f"proxy answered {status!r}")
    if not head.endswith(b"\r\n\r\n"):
        raise OSError("unexpected bytes after the CONNECT response")
    return sock


def _echo(sock: socket.socket, message: bytes) -> None:
    sock.sendall(message)
    got = 0
    for _ in range(1000):
        chunk = sock.recv(len(message) - got)
        if not chunk:
            raise OSError("tunnel closed")
        got += len(chunk)
        if got == len(message):
            return
    raise OSError("echo did not complete")


def client_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="stall.py client")
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--target", required=True, help="CONNECT target, e.g. 127.0.0.1:19001")
    ap.add_argument("--key", required=True)
    ap.add_argument("--tunnels", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--pace-ms", type=float, default=1.0, help="sleep after each echo")
    ap.add_argument("--timeout", type=float, default=10.0, help="per-operation socket timeout")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="hard cap on the run")
    a = ap.parse_args(argv)
    proxy = _loopback_addr(a.proxy)
    _loopback_addr(a.target)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    message = (b"stall-probe-" * ((a.size // 12) + 1))[: a.size]
    socks = [_open_tunnel(proxy, a.target, a.key, a.timeout) for _ in range(max(1, a.tunnels))]
    print("READY", flush=True)
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    pace = a.pace_ms / 1000.0
    clock = time.monotonic
    deadline = clock() + a.max_seconds
    i = 0
    while not stop and len(samples) < MAX_SAMPLES:
        now = clock()
        if now > deadline:
            errors.append("time cap reached")
            break
        k = i % len(socks)
        i += 1
        try:
            t0 = clock()
            _echo(socks[k], message)
            t1 = clock()
            samples.append((t1, t1 - t0))
        except OSError as error:  # a revoked or broken tunnel: note it, reopen (bounded)
            errors.append(f"tunnel {k}: {error}")
            if len(errors) > 50:
                break
            try:
                socks[k].close()
                socks[k] = _open_tunnel(proxy, a.target, a.key, a.timeout)
            except OSError as again:
                errors.append(f"reopen {k}: {again}")
                break
        if pace:
            time.sleep(pace)
    for s in socks:
        s.close()
    print(json.dumps({"samples": [(round(t, 6), round(r * 1e6, 1)) for t, r in samples],
                      "errors": errors, "tunnels": len(socks), "pace_ms": a.pace_ms, "size": a.size}),
          flush=True)
    return 0


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = max(1, min(len(values), math.ceil(p / 100.0 * len(values))))
    return values[k - 1]


def window_stats(samples: list[tuple[float, float]], start: float, end: float) -> dict:
    """Echoes completed in [start, end): count, RTT percentiles (us), the largest gap (ms)
    between an echo in the window and the echo before it (which may precede it), and when
    that gap ended (s after `start`)."""
    rtts, gap_max, gap_end, prev = [], 0.0, None, None
    for t, rtt in samples:
        if t >= end:
            break
        if t >= start:
            rtts.append(rtt)
            if prev is not None and t - prev > gap_max:
                gap_max, gap_end = t - prev, t
        prev = t
    return {"echoes": len(rtts), "p50_us": _pct(rtts, 50), "p99_us": _pct(rtts, 99),
            "max_rtt_us": max(rtts) if rtts else None, "max_gap_ms": gap_max * 1000 if rtts else None,
            "max_gap_end_s": None if gap_end is None else gap_end - start}


def analyze(samples: list[tuple[float, float]], baseline: tuple[float, float],
            reloads: list[tuple[float, float]], tail: float = 0.25) -> dict:
    """Baseline window stats, per-reload stats ([sent, done + tail]) and the worst of those."""
    samples = sorted(samples)
    base = window_stats(samples, *baseline)
    per = []
    for sent, done in reloads:
        st = window_stats(samples, sent, done + tail)
        st["reload_s"] = done - sent
        per.append(st)
    worst = max((p["max_gap_ms"] or 0.0 for p in per), default=None)
    rtts = [r for t, r in samples if any(s <= t < d + tail for s, d in reloads)]
    return {"baseline": base, "reloads": per, "worst_gap_ms": worst,
            "reload_p99_us": _pct(rtts, 99), "reload_p50_us": _pct(rtts, 50)}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "client":
        sys.exit(client_main(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
