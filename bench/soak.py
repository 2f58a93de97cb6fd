"""Soak: one egress-guard under moderate, mixed load for M minutes (`--modes soak`).

Issue 4 asks that memory and CPU stay flat over a 10-minute soak at moderate load: no
growth in RSS, greenlets, fds or metric series. This module drives that load against a
single egress-guard instance and watches the process from outside:

* Load, repeated identically every period (60 s; one table row each) so that any two
  periods can be compared; a one-period warm-up comes first and is not compared:

      slot 0-1  loadgen rate      concurrency --soak-conc (1), 64 B echo, bench-raw
                (reload at the start of slot 1: rewrite the policy file + SIGHUP)
      slot 2    quiet             (idle tunnels rotated and echoed at its start)
      slot 3-4  loadgen tls-rate  concurrency --soak-conc, 517 B ClientHello, bench-tls
      slot 5    quiet

  A closed-loop loadgen at concurrency 1 already drives about half of egress-guard's
  saturation rate on this 2-core VM, so the two quiet slots bring the average near a
  third of it; a short saturation probe before the warm-up measures that rate and the
  report prints the fraction actually reached.
  All the time: --soak-refused requests/s from the driver (a third with an unknown key ->
  407, a third from bench-raw to a port outside its policy -> 403, a third plain-HTTP
  uploads from bench-raw that the client abandons mid-body: failed uploads leave
  exception tracebacks behind, the reference cycles a reload must never pin), and --soak-idle
  tunnels held open (the first half for the whole run, the other half replaced
  `ROTATE` at a time each period, oldest first), each echoed once per period.
* Samples at the end of every slot (every 10 s): VmRSS, open fds and threads of the
  proxy (/proc), and from its /metrics: the number of series, the connection and
  tunnel gauges, process_cpu_seconds_total, tunnels completed, refusals, reloads.

Greenlets: egress-guard runs one greenlet per client connection (its pool) and one
more per open tunnel (the second pump direction), so `egress_proxy_client_connections
+ egress_proxy_active_tunnels` is the greenlet count (plus a few fixed background
ones). Gauges "at rest" are the minimum over a period's samples: the quiet slots' samples
see only the held idle tunnels (a refused request is in flight < 1 % of the time).

The verdict compares the first period after the warm-up with the last one. All traffic
is 127.0.0.1 (loadgen and the stall helpers refuse anything else; the bench policy
forbids every other address). Every loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import signal
import socket
import threading
import time

import peers
import stall

SLOTS = 6  # per period: rate, rate (+reload), quiet, tls-rate, tls-rate, quiet
REST_SLOTS = (2, 5)
ROTATE = 10  # rotating idle tunnels replaced per period
UNKNOWN_KEY = "soak-unknown-key"
DENIED_OFFSET = 5  # base_port + 5: a port outside bench-raw's 127.0.0.1:echo-source range
THRESHOLDS = {"rss_kb": 2048, "rss_pct": 5.0, "cpu_ratio": 0.15}


# ---------------------------------------------------------------- options
def add_arguments(ap):
    ap.add_argument("--soak-minutes", type=float, default=10.0,
                    help="soak length after a one-period warm-up (mode 'soak', not in the default set); "
                         "fractional for a smoke run, e.g. 0.5 (default %(default)s)")
    ap.add_argument("--soak-conc", type=int, default=1,
                    help="loadgen concurrency of the soak's rate / tls-rate chunks (default %(default)s: about half "
                         "of egress-guard's saturation rate while a chunk runs)")
    ap.add_argument("--soak-idle", type=int, default=100, help="idle tunnels held during the soak (default %(default)s)")
    ap.add_argument("--soak-refused", type=float, default=10.0,
                    help="refused requests per second during the soak: 407, 403 and abandoned uploads in turn (default %(default)s)")


def check_args(a, ap):
    if not (0 < a.soak_minutes <= 240):
        ap.error("--soak-minutes must be in (0, 240]")
    if not (1 <= a.soak_conc <= 64 and 2 <= a.soak_idle <= 5000 and 0 <= a.soak_refused <= 500):
        ap.error("--soak-conc in [1, 64], --soak-idle in [2, 5000], --soak-refused in [0, 500]")


def layout(a):
    """(period seconds, periods compared): one-minute periods, or thirds of a short run."""
    total = a.soak_minutes * 60.0
    if a.soak_minutes >= 3:
        return 60.0, int(round(a.soak_minutes))
    return total / 3.0, 3


def total_seconds(a):
    """Upper bound of the soak's wall time (for the upstream server's lifetime)."""
    period, n = layout(a)
    return period * (n + 1) + 120


# ---------------------------------------------------------------- /proc and /metrics
def proc_status(pid):
    out = {"rss_kb": 0, "threads": 0, "hwm_kb": 0}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    out["hwm_kb"] = int(line.split()[1])
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:
        out["fds"] = len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        out["fds"] = None
    return out


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_STATUS = re.compile(r'status="([^"]*)"')
_GEN = re.compile(r'generation="([^"]*)"')


def scrape(metrics_port, timeout=5.0):
    """GET /metrics; the series count and the few values the soak follows."""
    conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        if resp.status != 200:
            raise OSError("/metrics answered %d" % resp.status)
    finally:
        conn.close()
    out = {"series": 0, "requests": {}, "gc_collections": {}, "gc_collected": 0.0}
    single = {
        "egress_proxy_client_connections": "conns",
        "egress_proxy_active_tunnels": "tunnels",
        "process_cpu_seconds_total": "cpu_s",
        "egress_proxy_tunnel_duration_seconds_count": "closed",
        "egress_proxy_config_reloads_total": "reloads",
        "egress_proxy_config_load_errors_total": "load_errors",
        "process_open_fds": "open_fds_metric",
        "process_resident_memory_bytes": "rss_bytes_metric",
    }
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        out["series"] += 1
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        if name in single:
            out[single[name]] = v
        elif name == "egress_proxy_requests_total":
            s = _STATUS.search(labels)
            st = s.group(1) if s else "?"
            out["requests"][st] = out["requests"].get(st, 0.0) + v
        elif name == "python_gc_collections_total":
            g = _GEN.search(labels)
            out["gc_collections"][g.group(1) if g else "?"] = v
        elif name == "python_gc_objects_collected_total":
            out["gc_collected"] += v
    return out


# ---------------------------------------------------------------- driver-side clients
class _Done(Exception):
    """The request needs no answer read (an abandoned upload)."""


class Refuser(threading.Thread):
    """Paced refused requests: unknown key (-> 407), a denied destination (-> 403), and an
    abandoned plain-HTTP upload (the client closes mid-body: "aborted")."""

    def __init__(self, port, echo_port, denied_port, raw_key, rate, max_seconds):
        super().__init__(daemon=True)
        self.port, self.rate, self.max_seconds = port, rate, max_seconds
        bad = base64.b64encode(("%s:x" % UNKNOWN_KEY).encode()).decode()
        good = base64.b64encode(("%s:x" % raw_key).encode()).decode()
        t1, t2 = "127.0.0.1:%d" % echo_port, "127.0.0.1:%d" % denied_port
        self.requests = [
            (407, ("CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n" % (t1, t1, bad)).encode()),
            (403, ("CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\n" % (t2, t2, good)).encode()),
            ("aborted", ("POST http://%s/upload HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n"
                         "Content-Length: 1000000\r\n\r\n" % (t1, t1, good)).encode() + bytes(4096)),
        ]
        self.counts = {}  # (expected, got) -> n
        self.errors = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def snapshot(self):
        with self._lock:
            return dict(self.counts)

    def one(self, expected, req):
        got = "error"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=3) as s:
                s.sendall(req)
                if expected == "aborted":
                    time.sleep(0.01)  # the upload is under way at the proxy; then abandon it
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    got = "aborted"
                    raise _Done
                head = b""
                for _ in range(16):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                    if b"\r\n\r\n" in head:
                        break
                parts = head.split(b" ", 2)
                got = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else "bad-response"
        except _Done:
            pass
        except OSError as e:
            got = "error"
            if len(self.errors) < 20:
                self.errors.append("%s: %s" % (expected, e))
        with self._lock:
            k = "%s->%s" % (expected, got)
            self.counts[k] = self.counts.get(k, 0) + 1

    def run(self):
        if self.rate <= 0:
            return
        t0 = time.monotonic()
        step = 1.0 / self.rate
        for i in range(int(self.max_seconds * self.rate) + 1):
            if self._halt.is_set():
                break
            expected, req = self.requests[i % len(self.requests)]
            self.one(expected, req)
            wait = t0 + (i + 1) * step - time.monotonic()
            if wait > 0 and self._halt.wait(wait):
                break
            if time.monotonic() - t0 > self.max_seconds:
                break

    def stop(self):
        self._halt.set()
        self.join(timeout=5)


class IdleTunnels:
    """Tunnels held open through the proxy to the echo server (driver process, CPU 1)."""

    def __init__(self, port, target, key, count):
        self.proxy, self.target, self.key = ("127.0.0.1", port), target, key
        self.fixed_n = count // 2
        self.fixed, self.rotating = [], []  # rotating: FIFO of (opened_at, sock)
        self.count = count
        self.opened = self.closed = self.echoes = 0
        self.errors = []

    def _open(self):
        s = stall._open_tunnel(self.proxy, self.target, self.key, 5.0)
        stall._echo(s, b"soak-idle-hello!")
        self.opened += 1
        return s

    def start(self):
        for i in range(self.count):
            s = self._open()
            (self.fixed.append(s) if i < self.fixed_n else self.rotating.append((time.monotonic(), s)))

    def held(self):
        return len(self.fixed) + len(self.rotating)

    def maintain(self, rotate):
        """Replace the `rotate` oldest rotating tunnels, then echo on every one."""
        for _ in range(min(rotate, len(self.rotating))):
            _, s = self.rotating.pop(0)
            s.close()
            self.closed += 1
        missing = self.count - self.held()
        for _ in range(missing):
            try:
                self.rotating.append((time.monotonic(), self._open()))
            except OSError as e:
                self.errors.append("open: %s" % e)
                break
        dead = []
        for s in self.fixed + [s for _, s in self.rotating]:
            try:
                stall._echo(s, b"soak-idle-check!")
                self.echoes += 1
            except OSError as e:
                dead.append(s)
                if len(self.errors) < 20:
                    self.errors.append("echo: %s" % e)
        for s in dead:
            s.close()
            if s in self.fixed:
                self.fixed.remove(s)
            self.rotating = [(t, x) for t, x in self.rotating if x is not s]
        return len(dead)

    def close(self):
        for s in self.fixed + [s for _, s in self.rotating]:
            s.close()
        self.fixed, self.rotating = [], []


# ---------------------------------------------------------------- policy variants
def policy_variant(a, h, i):
    """The bench policy, alternating an extra (unused) bench-raw destination, so each
    reload compiles a different policy and re-judges every held tunnel."""
    text = h.bench_policy_yaml(a)
    if i % 2:
        text = text.replace('    allowed_destinations: ["127.0.0.1:%d-%d"]' % (a.echo_port, a.source_port),
                            '    allowed_destinations: ["127.0.0.1:%d-%d", "127.0.0.1:%d"]'
                            % (a.echo_port, a.source_port, a.base_port + 4))
    return "# soak reload %d\n%s" % (i, text)


# ---------------------------------------------------------------- the run
def run(a, h):
    """Run the soak. `h` is bench/run.py (its loadgen, policy and process helpers)."""
    period, n_periods = layout(a)
    slot = period / SLOTS
    chunk = 2 * slot - min(0.5, 0.15 * slot)  # a loadgen chunk ends before the quiet slot
    port = a.base_port + 40
    out = {"status": "ok", "period_s": period, "periods": n_periods, "slot_s": slot, "chunk_s": round(chunk, 3),
           "conc": a.soak_conc, "idle": a.soak_idle, "rotate": ROTATE, "refused_per_s": a.soak_refused,
           "port": port, "samples": [], "chunks": [], "reloads_sent": 0, "errors": [], "thresholds": THRESHOLDS}
    proc = refuser = idle = None
    worker = None
    try:
        if not peers.port_free(port) or not peers.port_free(port + 1000):
            raise peers.PeerError("port %d or %d already in use" % (port, port + 1000))
        # WATCH_INTERVAL high: only our SIGHUPs reload (one reload per rewrite)
        argv, env, rundir = h.prepare_egress(a, "egress-guard-soak", port, policy_variant(a, h, 0),
                                             {"WATCH_INTERVAL": "3600"})
        out["rundir"], out["cmd"] = rundir, " ".join(argv)
        out["version"] = h.git_version()  # the code the proxy started from (others may commit meanwhile)
        policy_path = env["CONFIGMAP_PATH"]
        metrics_port = port + 1000
        proc = peers.start(argv, env, a.proxy_cpu, rundir)
        peers.wait_ready(proc, port, rundir, timeout=a.start_timeout)
        out["pid"] = proc.pid
        out["start"] = proc_status(proc.pid)
        echo = "127.0.0.1:%d" % a.echo_port
        tls_authority = "%s:%d" % (a.sni, a.echo_port)

        def loadgen(mode, conc, dur, ramp=0.0):
            auth, authority = (h.TLS_KEY, tls_authority) if mode == "tls-rate" else (h.RAW_KEY, None)
            argv = h.loadgen_argv(a, mode, port, False, echo, conc, dur, ramp, auth, authority)
            return h.run_loadgen(argv, ramp + dur + 3 * a.op_timeout + 10)

        def alive(stage):
            if proc.poll() is not None:
                raise peers.PeerError("egress-guard exited (rc=%s) during %s\n%s"
                                      % (proc.returncode, stage, peers.log_tail(rundir)))

        # saturation probe: what "moderate" is relative to
        probe_s = 3.0 if period >= 30 else 1.0
        w = loadgen("rate", 8, 0.5)
        if "fatal" in w or not w.get("ok"):
            raise peers.PeerError("warm-up failed: %s" % (w.get("fatal") or w.get("last_error")))
        sat = loadgen("rate", 32, probe_s, 0.3)
        alive("saturation probe")
        out["saturation"] = {k: sat.get(k) for k in ("rate", "ok", "errors", "p50_us", "p99_us", "fatal")}
        h.log("  soak: saturation probe rate c=32 %.0fs: %.0f tunnels/s" % (probe_s, sat.get("rate") or 0))

        idle = IdleTunnels(port, echo, h.RAW_KEY, a.soak_idle)
        idle.start()
        refuser = Refuser(port, a.echo_port, a.base_port + DENIED_OFFSET, h.RAW_KEY, a.soak_refused,
                          period * (n_periods + 1) + 60)
        refuser.start()
        h.log("  soak: %d idle tunnels held; %g refused/s; %d periods of %.0fs after a %.0fs warm-up "
              "(ends about %s)" % (idle.held(), a.soak_refused, n_periods, period, period,
                                   time.strftime("%H:%M:%S", time.localtime(time.time() + period * (n_periods + 1)))))

        chunks = out["chunks"]

        def chunk_worker(mode, p, s):
            r = loadgen(mode, a.soak_conc, chunk)
            r = {k: r.get(k) for k in ("ok", "errors", "rate", "p50_us", "p99_us", "max_us", "err", "last_error",
                                       "fatal")}
            r.update({"mode": mode, "period": p, "slot": s})
            chunks.append(r)

        prev = None
        ours = {os.getpid(), a.upstream_pid, proc.pid}
        cpu_snap = h.cpu_snapshot()
        t0 = time.monotonic()
        total_slots = (n_periods + 1) * SLOTS
        for k in range(total_slots):
            p, s = divmod(k, SLOTS)  # period 0 = warm-up
            slot_start = t0 + k * slot
            # -- the slot's action
            if s in (0, 3):
                mode = "rate" if s == 0 else "tls-rate"
                worker = threading.Thread(target=chunk_worker, args=(mode, p, s), daemon=True)
                worker.start()
            elif s == 1:
                tmp = policy_path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(policy_variant(a, h, out["reloads_sent"] + 1))
                os.replace(tmp, policy_path)
                os.kill(proc.pid, signal.SIGHUP)
                out["reloads_sent"] += 1
            elif s in REST_SLOTS:
                if worker is not None:
                    worker.join(timeout=max(0.0, slot_start + slot * 0.5 - time.monotonic()))
                    if worker.is_alive():
                        out["errors"].append("period %d slot %d: loadgen chunk overran into the quiet slot" % (p, s))
                if s == 2:
                    dead = idle.maintain(ROTATE)
                    if dead:
                        out["errors"].append("period %d: %d idle tunnels failed their echo" % (p, dead))
            # -- wait for the slot's end, then sample
            wait = slot_start + slot - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            alive("period %d" % p)
            st = proc_status(proc.pid)
            try:
                met = scrape(metrics_port)
            except (OSError, http.client.HTTPException) as e:
                raise peers.PeerError("scraping /metrics failed: %s" % e)
            smp = {"t": round(time.monotonic() - t0, 2), "period": p, "slot": s, "rest": s in REST_SLOTS,
                   "idle_held": idle.held(), "refused": refuser.snapshot(), "proc_cpu_s": round(peers.cpu_s(proc.pid), 2)}
            smp.update(st)
            smp.update(met)
            smp["greenlets"] = met.get("conns", 0) + met.get("tunnels", 0)
            if prev is not None:
                smp["closed_window"] = met.get("closed", 0) - prev.get("closed", 0)
                d_cpu = met.get("cpu_s", 0) - prev.get("cpu_s", 0)
                smp["cpu_window_s"] = round(d_cpu, 3)
            if s == SLOTS - 1:  # period boundary: CPU other processes used (noise)
                snap = h.cpu_snapshot()
                skip = ours | set(peers.tree_pids(os.getpid()))
                skip |= {pid for pid, (nm, _, _) in snap.items() if nm in ("loadgen", "taskset")}
                other, top = h.other_cpu(cpu_snap, snap, skip)
                smp["other_cpu_s"], smp["other_top"] = round(other, 3), top
                cpu_snap = snap
                if p == 0 or p == n_periods or p % 5 == 0:
                    h.log("  soak: %s done: RSS %.1f MB, fds %s, series %d, conns %d, tunnels %d"
                          % ("warm-up" if p == 0 else "period %d/%d" % (p, n_periods), st["rss_kb"] / 1024,
                             st["fds"], met["series"], met.get("conns", -1), met.get("tunnels", -1)))
            out["samples"].append(smp)
            prev = smp
        if worker is not None:
            worker.join(timeout=chunk + 30)
        out["end"] = proc_status(proc.pid)
        out["idle_stats"] = {"opened": idle.opened, "closed": idle.closed, "echoes": idle.echoes,
                             "errors": idle.errors}
    except (peers.PeerError, OSError, ValueError) as e:
        out["status"] = "FAILED: %s" % e
        h.log("  soak FAILED: %s" % e)
    finally:
        if refuser is not None:
            refuser.stop()
            out["refused"] = refuser.snapshot()
            out["refused_errors"] = refuser.errors
        if idle is not None:
            idle.close()
        if proc is not None:
            peers.stop(proc.pid)
    if out["status"] == "ok":
        out["rows"] = rows(out)
        out["verdict"] = verdict(out)
    return out


# ---------------------------------------------------------------- analysis
def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def rows(out):
    """One dict per period (0 = warm-up), from the samples and the loadgen chunks."""
    by = {}
    for smp in out["samples"]:
        by.setdefault(smp["period"], []).append(smp)
    res, prev_end = [], None
    for p in sorted(by):
        ss = by[p]
        end = ss[-1]
        r = {"period": p, "samples": len(ss)}
        if prev_end is not None:
            r["tunnels"] = int(end.get("closed", 0) - prev_end.get("closed", 0))
            r["cpu_s"] = end.get("cpu_s", 0) - prev_end.get("cpu_s", 0)
            r["reloads"] = end.get("reloads", 0) - prev_end.get("reloads", 0)
            r["load_errors"] = end.get("load_errors", 0) - prev_end.get("load_errors", 0)
            for st in ("auth_required", "denied", "bad_request"):
                r[st] = end["requests"].get(st, 0) - prev_end["requests"].get(st, 0)
            r["gc2"] = end["gc_collections"].get("2", 0) - prev_end["gc_collections"].get("2", 0)
            r["wall_s"] = end["t"] - prev_end["t"]
        else:  # warm-up: from the first sample of the period (the probe ran before)
            first = ss[0]
            r["tunnels"] = int(end.get("closed", 0) - first.get("closed", 0))
            r["cpu_s"] = end.get("cpu_s", 0) - first.get("cpu_s", 0)
            r["wall_s"] = end["t"] - first["t"]
            r["partial"] = True
        r["us_per_tunnel"] = 1e6 * r["cpu_s"] / r["tunnels"] if r["tunnels"] else None
        r["tun_per_s"] = r["tunnels"] / r["wall_s"] if r["wall_s"] else None
        r["busy"] = r["cpu_s"] / r["wall_s"] if r["wall_s"] else None
        r["rss_mean_kb"] = _mean([x["rss_kb"] for x in ss])
        r["rss_end_kb"] = end["rss_kb"]
        r["fds_min"], r["fds_max"] = min(x["fds"] for x in ss), max(x["fds"] for x in ss)
        r["threads_max"] = max(x["threads"] for x in ss)
        r["series_max"] = max(x["series"] for x in ss)
        r["conns_rest"] = int(min(x.get("conns", 0) for x in ss))
        r["tunnels_rest"] = int(min(x.get("tunnels", 0) for x in ss))
        r["greenlets_rest"] = int(min(x["greenlets"] for x in ss))
        r["idle_held"] = end["idle_held"]
        r["other_cpu_s"] = end.get("other_cpu_s")
        r["other_top"] = end.get("other_top")
        ch = [c for c in out["chunks"] if c["period"] == p]
        r["lg_ok"] = sum(c.get("ok") or 0 for c in ch)
        r["lg_errors"] = sum(c.get("errors") or 0 for c in ch) + sum(1 for c in ch if c.get("fatal"))
        r["p99_us"] = max([c.get("p99_us") or 0 for c in ch] or [0])
        r["p50_rate_us"] = _mean([c.get("p50_us") for c in ch if c["mode"] == "rate"])
        r["p50_tls_us"] = _mean([c.get("p50_us") for c in ch if c["mode"] == "tls-rate"])
        res.append(r)
        prev_end = end
    return res


def _slope(points):
    """Least-squares slope of (x, y) points."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def verdict(out):
    rs = [r for r in out["rows"] if r["period"] >= 1]
    if len(rs) < 2:
        return {"checks": [], "ok": False, "note": "fewer than two periods after the warm-up"}
    b, e = rs[0], rs[-1]
    checks = []

    def add(name, first, last, change, rule, ok):
        checks.append({"check": name, "first": first, "last": last, "change": change, "rule": rule, "ok": bool(ok)})

    d_kb = e["rss_mean_kb"] - b["rss_mean_kb"]
    pct = 100.0 * d_kb / b["rss_mean_kb"] if b["rss_mean_kb"] else 0.0
    add("RSS (mean over the period)", "%.1f MB" % (b["rss_mean_kb"] / 1024), "%.1f MB" % (e["rss_mean_kb"] / 1024),
        "%+.0f KB (%+.2f %%)" % (d_kb, pct), "< %d KB or < %g %%" % (THRESHOLDS["rss_kb"], THRESHOLDS["rss_pct"]),
        d_kb < THRESHOLDS["rss_kb"] or pct < THRESHOLDS["rss_pct"])
    add("open fds at rest (min)", b["fds_min"], e["fds_min"], "%+d" % (e["fds_min"] - b["fds_min"]), "not growing",
        e["fds_min"] <= b["fds_min"])
    add("threads (max)", b["threads_max"], e["threads_max"], "%+d" % (e["threads_max"] - b["threads_max"]),
        "not growing", e["threads_max"] <= b["threads_max"])
    add("metric series (max)", b["series_max"], e["series_max"], "%+d" % (e["series_max"] - b["series_max"]),
        "not growing", e["series_max"] <= b["series_max"])
    add("client connections at rest (min)", b["conns_rest"], e["conns_rest"],
        "held idle: %d" % e["idle_held"], "= held idle tunnels", e["conns_rest"] == e["idle_held"])
    add("active tunnels at rest (min)", b["tunnels_rest"], e["tunnels_rest"],
        "held idle: %d" % e["idle_held"], "= held idle tunnels", e["tunnels_rest"] == e["idle_held"])
    add("greenlets ~ conns + tunnels at rest", b["greenlets_rest"], e["greenlets_rest"],
        "%+d" % (e["greenlets_rest"] - b["greenlets_rest"]), "not growing", e["greenlets_rest"] <= b["greenlets_rest"])
    if b["us_per_tunnel"] and e["us_per_tunnel"]:
        x = e["us_per_tunnel"] / b["us_per_tunnel"]
        add("CPU per tunnel", "%.0f us" % b["us_per_tunnel"], "%.0f us" % e["us_per_tunnel"], "%.2fx" % x,
            # Cheaper later is warm-up, not a leak; only growth counts against the soak.
            "not up by > %d %%" % (100 * THRESHOLDS["cpu_ratio"]), x - 1 <= THRESHOLDS["cpu_ratio"])
    errs = sum(r["lg_errors"] for r in out["rows"])
    refused = out.get("refused", {})
    wrong = {k: v for k, v in refused.items() if k not in ("407->407", "403->403", "aborted->aborted")}
    reloads = int(out["samples"][-1].get("reloads", 0)) if out["samples"] else 0
    load_err = int(out["samples"][-1].get("load_errors", 0)) if out["samples"] else 0
    idle_errs = out.get("idle_stats", {}).get("errors", [])
    health = "loadgen errors %d, unexpected answers %d, idle echo errors %d, reloads %d/%d" % (
        errs, sum(wrong.values()), len(idle_errs), reloads, out.get("reloads_sent", 0))
    add("health (whole run)", "-", "-", health, "no errors, every reload ok",
        errs == 0 and not wrong and not idle_errs and not out["errors"] and load_err == 0
        and reloads == out.get("reloads_sent", 0))
    # trends over every period after the warm-up (information, not thresholds)
    trend = {
        "rss_kb_per_period": _slope([(r["period"], r["rss_mean_kb"]) for r in rs]),
        "us_per_tunnel_per_period": _slope([(r["period"], r["us_per_tunnel"]) for r in rs if r["us_per_tunnel"]]),
        "fds_min_per_period": _slope([(r["period"], r["fds_min"]) for r in rs]),
    }
    return {"checks": checks, "ok": all(c["ok"] for c in checks), "trend": trend, "first": b["period"],
            "last": e["period"]}


# ---------------------------------------------------------------- report
def _f(v, fmt="%.0f", scale=1.0):
    return "-" if v is None else fmt % (v * scale)


def report(out, fmt_table):
    if out.get("status") != "ok":
        return "Soak: %s" % out.get("status")
    period = out["period_s"]
    unit = "min" if abs(period - 60) < 1e-6 else "period"
    hdr = [unit, "tunnels", "tun/s", "CPU us/tun", "busy", "RSS MB", "dRSS KB", "fds min/max", "thr", "series",
           "conns@rest", "tun@rest", "greenlets~", "407", "403", "reload", "gen2 gc", "lg err", "p99 ms",
           "other CPU"]
    base = next((r for r in out["rows"] if r["period"] == 1), None)
    table = []
    for r in out["rows"]:
        d = "-" if base is None or r["period"] == 0 else "%+.0f" % (r["rss_mean_kb"] - base["rss_mean_kb"])
        table.append([
            "warm-up" if r["period"] == 0 else str(r["period"]), r["tunnels"], _f(r["tun_per_s"]),
            _f(r["us_per_tunnel"]), _f(r["busy"], "%.0f%%", 100), _f(r["rss_mean_kb"], "%.2f", 1 / 1024), d,
            "%d/%d" % (r["fds_min"], r["fds_max"]), r["threads_max"], r["series_max"], r["conns_rest"],
            r["tunnels_rest"], r["greenlets_rest"], _f(r.get("auth_required")), _f(r.get("denied")),
            _f(r.get("reloads")), _f(r.get("gc2")), r["lg_errors"], _f(r["p99_us"], "%.2f", 1e-3),
            _f(r["other_cpu_s"] / r["wall_s"] if r.get("other_cpu_s") is not None and r["wall_s"] else None,
               "%.0f%%", 100),
        ])
    sat = (out.get("saturation") or {}).get("rate")
    avg = _mean([r["tun_per_s"] for r in out["rows"] if r["period"] >= 1])
    lines = ["Soak: one egress-guard (started from %s), %d x %.0f s after a %.0f s warm-up (mode soak)"
             % (out.get("version", "?"), out["periods"], period, period),
             fmt_table(hdr, table),
             "Each %s: loadgen rate c=%d for %.1f s, quiet %.1f s, tls-rate c=%d for %.1f s, quiet %.1f s; reload "
             "(policy rewrite + SIGHUP) %.0f s in; %g refused requests/s throughout (407 unknown key, 403 denied "
             "destination, abandoned plain-HTTP upload); %d idle tunnels held (%d for the whole run, %d replaced per %s), each echoed once per %s."
             % (unit, out["conc"], out["chunk_s"], period / 2 - out["chunk_s"], out["conc"], out["chunk_s"],
                period / 2 - out["chunk_s"], out["slot_s"], out["refused_per_s"], out["idle"], out["idle"] // 2,
                out["rotate"], unit, unit),
             "Load: %s tunnels/s on average = %s of the saturation probe's %s/s (rate c=32)."
             % (_f(avg), "-" if not (avg and sat) else "%.0f %%" % (100 * avg / sat), _f(sat)),
             "tunnels = tunnels closed (egress_proxy_tunnel_duration_seconds_count); CPU = process_cpu_seconds_total "
             "over the %s / those tunnels (refusals, reloads and idle echoes included); RSS = VmRSS, mean of the %s's "
             "samples (every %.0f s); dRSS vs the first %s after the warm-up; @rest = minimum over the samples "
             "(quiet slots: only the held idle tunnels); greenlets~ = connections + tunnels (one greenlet per client "
             "connection, one more per open tunnel); 407/403 = egress_proxy_requests_total auth_required/denied; "
             "gen2 gc = full collections; other CPU = processes outside the benchmark (noise)."
             % (unit, unit, out["slot_s"], unit)]
    v = out.get("verdict") or {}
    if v.get("checks"):
        vt = [[c["check"], c["first"], c["last"], c["change"], c["rule"], "PASS" if c["ok"] else "MISS"]
              for c in v["checks"]]
        lines += ["", fmt_table(["soak verdict: %s %d vs %s %d" % (unit, v["first"], unit, v["last"]), "first",
                                 "last", "change", "threshold", "verdict"], vt)]
        t = v.get("trend", {})
        lines.append("Trend over %ss %d-%d (least squares): RSS %s KB/%s, CPU %s us/tunnel per %s, fds at rest %s "
                     "per %s. Proxy VmHWM %.1f MB at the end."
                     % (unit, v["first"], v["last"], _f(t.get("rss_kb_per_period"), "%+.1f"), unit,
                        _f(t.get("us_per_tunnel_per_period"), "%+.1f"), unit, _f(t.get("fds_min_per_period"), "%+.2f"),
                        unit, out.get("end", {}).get("hwm_kb", 0) / 1024))
    elif v.get("note"):
        lines.append("soak verdict: %s" % v["note"])
    if out["errors"]:
        lines.append("soak errors: %s" % "; ".join(out["errors"][:5]))
    for c in out["chunks"]:
        if c.get("fatal") or c.get("errors"):
            lines.append("soak loadgen %s period %d: %s" % (c["mode"], c["period"],
                                                             c.get("fatal") or c.get("last_error")))
            break
    return "\n".join(lines)


def goal_row(out):
    """One row for run.py's issue-4 goals table."""
    if not out or out.get("status") != "ok" or not (out.get("verdict") or {}).get("checks"):
        return None
    v = out["verdict"]
    rss = next(c for c in v["checks"] if c["check"].startswith("RSS"))
    cpu = next((c for c in v["checks"] if c["check"] == "CPU per tunnel"), None)
    missed = [c["check"] for c in v["checks"] if not c["ok"]]
    text = "%d x %.0f s: RSS %s, CPU/tunnel %s%s" % (
        out["periods"], out["period_s"], rss["change"], cpu["change"] if cpu else "-",
        ("; missed: " + ", ".join(missed)) if missed else "; fds, series, greenlets flat")
    return ["soak: RSS/CPU/fds/series flat", text, "PASS" if v["ok"] else "MISS"]


if __name__ == "__main__":
    raise SystemExit("run the soak through the driver: .venv/bin/python bench/run.py --modes soak [--soak-minutes M]")
