#!/usr/bin/env python3
"""egress-guard benchmark (`make bench`): egress-guard against direct loopback, a naive
gevent relay (the floor of this design) and tinyproxy (when installed), in one run with
identical parameters, then policy scale and reload stall. See bench/README.md for what
each figure means and how to read it.

    make bench                                   # the full run, about 4 minutes
    .venv/bin/python bench/run.py --quick        # smoke run, < 60 s
    .venv/bin/python bench/run.py --modes rate,tls-rate --duration 3
    .venv/bin/python bench/run.py --proxy-cmd 'LOG_LEVEL=WARN {python} {repo}/egress_guard.py'
    .venv/bin/python bench/run.py --modes rate,tls-rate,bulk --py-spy /path/to/py-spy   # profile
    .venv/bin/python bench/run.py --modes soak [--soak-minutes 10]   # soak: not in the default set

Steps: build the C load generator (with OpenSSL when its headers are there) and upstream
server into bench/build/ (gcc); start the upstream (echo / sink / source) pinned to CPU 1;
for each proxy in turn (direct, egress-guard, egress-guard-tls: the same behind its TLS
listener, lean-relay, gevent-relay, tinyproxy) start it pinned to CPU 0, warm up, run every socket
mode with loadgen pinned to CPU 1, stop it; then the policy-scale micro-benchmark and
the reload-stall run; print the tables and write the raw JSON to
bench/build/results-<timestamp>.json.

All traffic is on 127.0.0.1: loadgen, upstream and the stall client refuse any other
address, and the bench policy forbids every address except 127.0.0.1 (listed
explicitly), so egress-guard cannot dial anything else either.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
sys.path.insert(0, HERE)
import peers  # noqa: E402
import hotspots  # noqa: E402
import policy_scale  # noqa: E402  (imports the project's policy package)
import stall  # noqa: E402
import soak  # noqa: E402

from policy import DEFAULT_FORBIDDEN  # noqa: E402

LOADGEN = os.path.join(BUILD, "loadgen")
UPSTREAM = os.path.join(BUILD, "upstream")
SOCKET_MODES = ["idle", "rate", "lat", "tls-rate", "bulk", "bulk-down"]
EXTRA_MODES = ["policy-scale", "reload-stall"]
DEFAULT_MODES = SOCKET_MODES + EXTRA_MODES
ALL_MODES = DEFAULT_MODES + ["soak"]  # soak (10 min by default) only when asked for: --modes soak
RELAYS = ("lean-relay", "gevent-relay")  # bench/peers/<name>.py: gevent relays without egress-guard's work
RAW_KEY = "bench-raw-key"  # identity bench-raw: require_tls false (rate, lat, idle, bulk)
TLS_KEY = "bench-tls-key"  # identity bench-tls: TLS required, SNI checked (tls-rate)
DEFAULT_PROXY_CMD = "{python} {repo}/egress_guard.py"
TLS_ROW = "egress-guard-tls"  # egress-guard's TLS listener (an https:// proxy), loadgen -S



def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- build
def build_tools(force=False):
    """Compile loadgen and upstream with gcc into bench/build/ (only when stale). loadgen
    gets its TLS-to-the-proxy mode (-S, OpenSSL) when the OpenSSL headers are there, and
    is built without it otherwise (the egress-guard (tls) row is then skipped)."""
    gcc = shutil.which("gcc")
    if not gcc:
        sys.exit("bench: gcc not found. The load generator and upstream server are small C programs\n"
                 "(bench/loadgen.c, bench/upstream.c) built with gcc and nothing else:\n"
                 "  Debian/Ubuntu: apt-get install -y gcc")
    os.makedirs(BUILD, exist_ok=True)
    flags = ["-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    tls = ["-DLOADGEN_TLS", "-lssl", "-lcrypto"]
    for out, src, variants in ((LOADGEN, "loadgen.c", (["-lm", *tls], ["-lm"])), (UPSTREAM, "upstream.c", ([],))):
        srcs = [os.path.join(HERE, src), os.path.join(HERE, "common.h")]
        if not force and os.path.exists(out) and all(os.path.getmtime(out) >= os.path.getmtime(s) for s in srcs):
            continue
        tmp = out + ".tmp"
        failures = []
        for libs in variants:
            cmd = [gcc, *flags, "-o", tmp, srcs[0], *libs]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                break
            failures.append("%s\n%s" % (" ".join(cmd), r.stderr.strip()[-1500:]))
        else:
            sys.exit("bench: building %s failed:\n%s" % (src, "\n".join(failures)))
        os.replace(tmp, out)
        log("built %s%s" % (os.path.relpath(out, REPO), " without TLS (OpenSSL headers or libraries missing: "
                            "apt-get install -y libssl-dev)" if failures else ""))


def loadgen_features():
    """What the built loadgen supports: {"tls": bool, "openssl": version or None}."""
    try:
        r = subprocess.run([LOADGEN, "-V"], capture_output=True, text=True, timeout=10)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"tls": False, "openssl": None}


# ---------------------------------------------------------------- sampling
class Sampler(threading.Thread):
    """Samples the proxy's process-tree RSS every `period` s (bounded by stop())."""

    def __init__(self, pid, period=0.05, max_seconds=900):
        super().__init__(daemon=True)
        self.pid, self.period, self.max_seconds = pid, period, max_seconds
        self.peak_kb = 0
        self.tag = None
        self.tag_peak = {}
        self._halt = threading.Event()

    def run(self):
        t_end = time.monotonic() + self.max_seconds
        for _ in range(int(self.max_seconds / self.period) + 1):
            if self._halt.is_set() or time.monotonic() > t_end:
                break
            kb = peers.tree_rss_kb(self.pid)
            self.peak_kb = max(self.peak_kb, kb)
            tag = self.tag
            if tag:
                self.tag_peak[tag] = max(self.tag_peak.get(tag, 0), kb)
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join(timeout=2)


# ---------------------------------------------------------------- TIME_WAIT
TW_SYSCTL = "/proc/sys/net/ipv4/tcp_max_tw_buckets"


def tw_count():
    """TIME_WAIT sockets right now (/proc/net/sockstat 'tw')."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    p = line.split()
                    return int(p[p.index("tw") + 1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def set_tw_cap(cap):
    """Cap TIME_WAIT sockets (root only). Returns the old value, or None if untouched.
    Each run leaves 100k+ TIME_WAITs on loopback; above ~50k they make connect() slow and
    results depend on run order, so the cap is on by default and restored afterwards."""
    if not cap:
        return None
    try:
        with open(TW_SYSCTL) as f:
            old = int(f.read())
        with open(TW_SYSCTL, "w") as f:
            f.write(str(cap))
        return old
    except (OSError, ValueError) as e:
        log("note: cannot set %s (%s; needs root): results may depend on run order" % (TW_SYSCTL, e))
        return None


def restore_tw_cap(old):
    if old is None:
        return
    try:
        with open(TW_SYSCTL, "w") as f:
            f.write(str(old))
    except OSError:
        pass


def drain_time_wait(limit, max_wait):
    """Wait (bounded) until TIME_WAIT sockets fall to `limit`."""
    tw = tw_count()
    if tw <= limit or max_wait <= 0:
        return 0.0
    log("  waiting for %d TIME_WAIT sockets to drain below %d (max %.0fs)" % (tw, limit, max_wait))
    t0 = time.monotonic()
    for _ in range(int(max_wait / 0.5) + 1):
        if tw_count() <= limit or time.monotonic() - t0 > max_wait:
            break
        time.sleep(0.5)
    return time.monotonic() - t0


# ---------------------------------------------------------------- processes
def pinned(cpu, argv):
    return (["taskset", "-c", str(cpu)] if cpu is not None else []) + list(argv)


def loadgen_argv(a, mode, proxy_port, direct, target, conc, duration, ramp, auth=None, authority=None, ca=None):
    argv = [LOADGEN, "-q", "-m", mode, "-t", target, "-c", str(conc), "-d", str(duration),
            "-r", str(ramp), "-n", str(a.payload), "-s", a.sni, "-T", str(a.op_timeout)]
    if direct:
        argv.append("-D")
    else:
        argv += ["-x", "127.0.0.1:%d" % proxy_port]
        if auth:
            argv += ["-u", auth]
        if authority:
            argv += ["-A", authority]
        if ca:  # TLS to the proxy, its certificate verified against this CA
            argv += ["-S", ca]
        if a.new_heads:  # every connection's head differs (X-Seq): nothing is parsed from memory
            argv.append("-N")
    return pinned(a.gen_cpu, argv)


def run_loadgen(argv, timeout, on_ready=None):
    """Run loadgen; return its final JSON dict (or {'fatal': msg}).
    on_ready(n) is called when an idle run prints READY n."""
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        return {"fatal": "cannot run loadgen: %s" % e}
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    result = None
    try:
        for _ in range(1000):
            line = p.stdout.readline()
            if not line:
                break
            line = line.strip()
            if line.startswith("READY") and on_ready:
                on_ready(int(line.split()[1]))
            elif line.startswith("{"):
                try:
                    result = json.loads(line)
                except ValueError:
                    pass
        err = p.stderr.read()
        p.wait(timeout=5)
    finally:
        killer.cancel()
    if result is None:
        return {"fatal": "loadgen rc=%s, no result (timeout %ss?) stderr: %s"
                % (p.returncode, timeout, err.strip()[-300:])}
    return result


def gen_cpu(a):
    """CPU seconds used so far by the load side: finished children (loadgen runs) plus
    the upstream server. Its share of wall time shows whether the load CPU was the limit."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + (peers.cpu_s(a.upstream_pid) if a.upstream_pid else 0.0)


def cpu_snapshot():
    """{pid: (name, cpu seconds, is kernel thread)} for every process (/proc/PID/stat)."""
    snap = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.find("(") + 1:raw.rfind(")")]
        fl = raw.rsplit(")", 1)[1].split()
        try:
            snap[int(d)] = (name, (int(fl[11]) + int(fl[12])) / peers.CLK_TCK, fl[1] == "2" or d == "2")
        except (ValueError, IndexError):
            continue
    return snap


def other_cpu(before, after, ours):
    """CPU used by processes other than `ours` between two snapshots: (user-space
    total, [(name, seconds)] biggest first; kernel threads are listed, not summed)."""
    used = []
    for pid, (name, t1, kthread) in after.items():
        if pid in ours or pid not in before:
            continue
        d = t1 - before[pid][1]
        if d > 0.005:
            used.append((name + (" [kernel]" if kthread else ""), d, kthread))
    used.sort(key=lambda x: -x[1])
    return sum(d for _, d, k in used if not k), [(nm, round(d, 3)) for nm, d, _ in used[:5]]


def start_upstream(a, lifetime):
    argv = pinned(a.gen_cpu, [UPSTREAM, "-e", "127.0.0.1:%d" % a.echo_port, "-k", "127.0.0.1:%d" % a.sink_port,
                              "-o", "127.0.0.1:%d" % a.source_port, "-T", str(int(lifetime))])
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline().strip()
    if line != "READY":
        p.kill()
        raise RuntimeError("upstream server failed to start (ports %d-%d busy?)" % (a.echo_port, a.source_port))
    return p


# ---------------------------------------------------------------- egress-guard set-up
def bench_settings_yaml():
    """The default forbidden ranges plus 0.0.0.0/0 and ::/0: a safety belt, so that only
    addresses an identity lists explicitly (127.0.0.1) can ever be dialled. Lookups of
    127.0.0.1 stop at 127.0.0.0/8 exactly as with the default list."""
    ranges = [str(net) for net, _ in DEFAULT_FORBIDDEN.ranges] + ["0.0.0.0/0", "::/0"]
    return "settings:\n  forbidden_ranges: [%s]\n" % ", ".join('"%s"' % r for r in ranges)


def bench_identities_yaml(a):
    """Two identities: bench-tls (TLS required; the tls-rate mode, SNI checked against the
    CONNECT name) and bench-raw (require_tls: false; raw bytes for rate/lat/idle/bulk)."""
    return "\n".join([
        "  bench-tls:",
        '    api_keys: ["%s"]' % TLS_KEY,
        '    allowed_destinations: ["%s:%d", "127.0.0.1:%d"]' % (a.sni, a.echo_port, a.echo_port),
        "  bench-raw:",
        '    api_keys: ["%s"]' % RAW_KEY,
        "    require_tls: false",
        '    allowed_destinations: ["127.0.0.1:%d-%d"]' % (a.echo_port, a.source_port),
    ]) + "\n"


def bench_policy_yaml(a):
    if a.socket_policy_size:  # the bench identities inside a big generated policy
        return policy_scale.generate(a.socket_policy_size, extra_identities=bench_identities_yaml(a),
                                     settings=bench_settings_yaml())
    return bench_settings_yaml() + "identities:\n" + bench_identities_yaml(a)


def prepare_egress(a, name, port, policy_text, extra_env=None):
    """(argv, env, rundir) for egress-guard: policy + hosts file in the run directory."""
    rundir = os.path.join(peers.RUN_ROOT, "%s-%d" % (name, port))
    shutil.rmtree(rundir, ignore_errors=True)
    os.makedirs(rundir, mode=0o755)
    policy_path = os.path.join(rundir, "policy.yaml")
    with open(policy_path, "w") as f:
        f.write(policy_text)
    hosts_path = os.path.join(rundir, "hosts")
    with open(hosts_path, "w") as f:
        f.write("127.0.0.1 %s\n" % a.sni)
    metrics_port = port + 1000
    cmd = a.proxy_cmd.format(python=shlex.quote(sys.executable), repo=shlex.quote(REPO), port=port,
                             metrics_port=metrics_port, rundir=shlex.quote(rundir))
    toks = shlex.split(cmd)
    # no inherited *_proxy / PROXY_* variables: the proxy gets exactly these settings
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({
        "PROXY_HOST": "127.0.0.1", "PROXY_PORT": str(port),
        "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(metrics_port),
        "CONFIGMAP_PATH": policy_path, "HOSTS_FILE": hosts_path, "LOG_LEVEL": "INFO",
    })
    env.update(extra_env or {})
    while toks and "=" in toks[0] and toks[0].split("=", 1)[0].replace("_", "").isalnum():
        k, v = toks.pop(0).split("=", 1)
        env[k] = v
    if not toks:
        raise peers.PeerError("empty --proxy-cmd")
    exe = toks[0] if "/" in toks[0] else shutil.which(toks[0], path=env.get("PATH"))
    if not exe or not os.path.exists(exe):
        raise peers.PeerError("egress-guard command not found: %s" % toks[0])
    return [exe] + toks[1:], env, rundir


def tls_listener_env(rundir, port):
    """A CA and a server certificate for 127.0.0.1 (EC P-256 keys, made by trustme for
    this run) written into the run directory, and the environment that turns egress-guard's
    TLS listener on at `port` with the plaintext one off. Returns (environment, CA file)."""
    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    leaf = ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.ECDSA)
    ca_path, cert_path, key_path = (os.path.join(rundir, f) for f in ("ca.pem", "server.pem", "server-key.pem"))
    ca.cert_pem.write_to_path(ca_path)
    with open(cert_path, "wb") as f:
        for pem in leaf.cert_chain_pems:
            f.write(pem.bytes())
    leaf.private_key_pem.write_to_path(key_path)
    return {"PROXY_PORT": "0", "PROXY_TLS_PORT": str(port), "PROXY_TLS_CERT": cert_path,
            "PROXY_TLS_KEY": key_path}, ca_path


def tls_row_missing(features):
    """Why the egress-guard (tls) row cannot run here, or None."""
    if not features.get("tls"):
        return "loadgen was built without TLS (apt-get install -y libssl-dev, then make bench ARGS=--rebuild)"
    try:
        import trustme  # noqa: F401  (requirements-dev.txt)
    except ImportError:
        return "trustme is not installed in this Python (it is in requirements-dev.txt)"
    return None


class Target:
    """One row of the table: how to start it and what each mode sends it. `tls_listener`:
    egress-guard behind its TLS listener, loadgen speaking TLS to it."""

    def __init__(self, name, kind, auth=None, tls_auth=None, tls_authority=None, tls_listener=False):
        self.name, self.kind = name, kind
        self.auth, self.tls_auth, self.tls_authority = auth, tls_auth, tls_authority
        self.tls_listener = tls_listener

    def creds(self, mode):
        if mode == "tls-rate":
            return self.tls_auth or self.auth, self.tls_authority
        return self.auth, None


# ---------------------------------------------------------------- status page load
class PageLoader(threading.Thread):
    """Loads egress-guard's status page (`/`, the HTML form) every `every` seconds while
    the socket modes run (--page-every), as a browser on `?refresh=N` does: does
    watching the page cost the tunnels anything? Counts loads, failures and the slowest."""

    def __init__(self, metrics_port, every, max_seconds=3600):
        super().__init__(daemon=True)
        self.url = "http://127.0.0.1:%d/" % metrics_port
        self.every, self.max_seconds = every, max_seconds
        self.loads, self.failures, self.slowest_ms, self.last_error = 0, 0, 0.0, None
        self.done = threading.Event()

    def run(self):
        import urllib.request
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.max_seconds
        while not self.done.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                with opener.open(self.url, timeout=5) as answer:
                    answer.read()
                self.loads += 1
                self.slowest_ms = max(self.slowest_ms, (time.monotonic() - started) * 1000)
            except OSError as e:
                self.failures += 1
                self.last_error = str(e)
            self.done.wait(max(0.0, self.every - (time.monotonic() - started)))

    def stop(self):
        self.done.set()
        self.join(timeout=10)
        return {"every_s": self.every, "loads": self.loads, "failures": self.failures,
                "slowest_ms": round(self.slowest_ms, 1), "last_error": self.last_error}


# ---------------------------------------------------------------- one proxy
def bench_one(a, target, port):
    """Run the socket modes against one proxy. Returns a result dict."""
    name = target.name
    res = {"name": name, "port": port, "modes": {}, "status": "ok"}
    direct = target.kind == "direct"
    proc = sampler = rundir = ca = page_loader = None
    tgt = {"echo": "127.0.0.1:%d" % a.echo_port, "sink": "127.0.0.1:%d" % a.sink_port,
           "source": "127.0.0.1:%d" % a.source_port}
    try:
        if not direct:
            if not peers.port_free(port):
                raise peers.PeerError("port %d already in use" % port)
            if target.kind == "egress":
                argv, env, rundir = prepare_egress(a, name, port, bench_policy_yaml(a))
                if target.tls_listener:
                    tls_env, ca = tls_listener_env(rundir, port)
                    env.update(tls_env)
                    res["loadgen_openssl"] = a.loadgen["openssl"]
            elif target.kind == "relay":
                relay = os.path.join(HERE, "peers", name.replace("-", "_") + ".py")
                argv, env, rundir = peers.prepare_command(
                    name, port, "PROXY_PORT={port} %s %s" % (shlex.quote(sys.executable), shlex.quote(relay)))
            else:
                argv, env, rundir = peers.prepare_builtin(name, port)
            res["cmd"] = " ".join(argv)
            if target.kind == "egress" and a.socket_policy_size:
                res["policy_destinations"] = a.socket_policy_size
            res["rundir"] = rundir
            t0 = time.monotonic()
            proc = peers.start(argv, env, a.proxy_cpu, rundir)
            peers.wait_ready(proc, port, rundir, timeout=a.start_timeout)
            res["start_s"] = round(time.monotonic() - t0, 2)
            res["pid"] = proc.pid
            sampler = Sampler(proc.pid)
            sampler.start()
            res["rss_start_kb"] = peers.tree_rss_kb(proc.pid)

        def cpu():
            return peers.tree_cpu_split(proc.pid) if proc else (0.0, 0.0)

        def check_alive(stage):
            if proc is not None and proc.poll() is not None:
                raise peers.PeerError("proxy exited (rc=%s) during %s\n%s"
                                      % (proc.returncode, stage, peers.log_tail(rundir)))

        auth, _ = target.creds("rate")
        w = run_loadgen(loadgen_argv(a, "rate", port, direct, tgt["echo"], 8, a.warmup, 0, auth, ca=ca),
                        a.warmup + 15)
        check_alive("warm-up")
        if "fatal" in w:
            raise peers.PeerError("warm-up: " + w["fatal"])
        if w["ok"] == 0 or w["errors"] > w["ok"]:
            raise peers.PeerError("warm-up failed: %d ok, %d errors; last error: %s"
                                  % (w["ok"], w["errors"], w.get("last_error")))
        res["rss_warm_kb"] = peers.tree_rss_kb(proc.pid) if proc else 0
        if a.page_every and target.kind == "egress":
            page_loader = PageLoader(port + 1000, a.page_every)
            page_loader.start()

        plan = {
            "idle": ("idle", tgt["echo"], a.idle, a.idle_hold, 0),
            "rate": ("rate", tgt["echo"], a.conc, a.duration, a.ramp),
            "lat": ("rate", tgt["echo"], 1, a.lat_duration, min(a.ramp, 0.2)),
            "tls-rate": ("tls-rate", tgt["echo"], a.conc, a.duration, a.ramp),
            "bulk": ("bulk", tgt["sink"], a.bulk_conns, a.duration, a.ramp),
            "bulk-down": ("bulk-down", tgt["source"], a.bulk_conns, a.duration, a.ramp),
        }
        for m in a.socket_modes:
            lmode, dst, conc, dur, ramp = plan[m]
            auth, authority = target.creds(m)
            argv = loadgen_argv(a, lmode, port, direct, dst, conc, dur, ramp, auth, authority, ca)
            timeout = ramp + dur + 3 * a.op_timeout + 10 + (a.idle * 0.004 if m == "idle" else 0)
            rss_before = peers.tree_rss_kb(proc.pid) if proc else 0

            def on_ready(n, _s=sampler):
                if _s:
                    _s.tag = "idle"

            spy = None
            if a.py_spy and target.kind == "egress" and m in PROFILED_MODES:
                spy = start_profiler(a, proc.pid, m, ramp, dur)
            s0 = cpu_snapshot()
            c0, w0, g0 = cpu(), time.monotonic(), gen_cpu(a)
            r = run_loadgen(argv, timeout, on_ready if m == "idle" else None)
            c1, w1, g1 = cpu(), time.monotonic(), gen_cpu(a)
            # whatever else ran on the machine meanwhile (other users, a build...): noise
            ours = set(peers.tree_pids(proc.pid) if proc else []) | {os.getpid(), a.upstream_pid}
            r["other_cpu_s"], r["other_top"] = other_cpu(s0, cpu_snapshot(), ours)
            r["other_cpu_s"] = round(r["other_cpu_s"], 3)
            r["gen_cpu_s"] = round(g1 - g0, 3)
            if spy:
                spy.join(timeout=dur + 30)
                if spy.result:
                    res.setdefault("profiles", {})[m] = spy.result
            if sampler:
                sampler.tag = None
            r["cpu_user_s"] = round(c1[0] - c0[0], 3)
            r["cpu_sys_s"] = round(c1[1] - c0[1], 3)
            r["wall_s"] = round(w1 - w0, 3)
            if authority:
                r["connect_authority"] = authority
            if m == "idle" and proc:
                r["rss_before_kb"] = rss_before
                r["rss_idle_kb"] = sampler.tag_peak.get("idle", 0)
            res["modes"][m] = r
            summary = r.get("fatal") or "ok=%s err=%s rate=%.0f/s p50=%.0fus MB/s=%.0f" % (
                r["ok"], r["errors"], r["rate"], r["p50_us"], r["mbps"])
            log("  %-12s %-9s %s" % (name, m, summary))
            check_alive(m)
        if proc:
            res["cpu_total_s"] = round(sum(cpu()), 2)
            res["hwm_kb"] = peers.hwm_kb(proc.pid)
    except peers.PeerError as e:
        res["status"] = "FAILED: %s" % e
        log("  %s FAILED: %s" % (name, e))
    except Exception as e:  # noqa: BLE001 - report, clean up, continue with the next proxy
        res["status"] = "FAILED: internal error %s: %s" % (type(e).__name__, e)
        log("  %s FAILED: %r" % (name, e))
    finally:
        if page_loader is not None:
            res["page_loads"] = page_loader.stop()
            log("  %s status page: %s" % (name, res["page_loads"]))
        if proc is not None:
            if not peers.stop(proc.pid):
                log("  %s: needed SIGKILL to stop" % name)
        if sampler:
            sampler.stop()
            res["rss_peak_kb"] = sampler.peak_kb
    return res


# ---------------------------------------------------------------- profiling
PROFILED_MODES = ("rate", "tls-rate", "bulk")


def start_profiler(a, pid, mode, ramp, duration):
    """py-spy record of the proxy for the measured part of one mode (a thread)."""
    out = os.path.join(BUILD, "profile-%s.txt" % mode)

    def work():
        time.sleep(ramp)
        argv = pinned(a.gen_cpu, [a.py_spy, "record", "-p", str(pid), "-d", str(max(1, int(duration))),
                                  "-r", "200", "-f", "raw", "-o", out])
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 25)
        except (OSError, subprocess.SubprocessError) as e:
            log("  py-spy failed: %s" % e)
            return
        if r.returncode == 0 and os.path.exists(out):
            t.result = out
        else:
            log("  py-spy failed (rc=%s): %s" % (r.returncode, r.stderr.strip()[-200:]))

    t = threading.Thread(target=work, daemon=True)
    t.result = None
    t.start()
    return t


# ---------------------------------------------------------------- reload stall
def _count_in_file(path, needle, state):
    """Occurrences of `needle` in the file, reading only what was appended since last call."""
    try:
        with open(path, "rb") as f:
            f.seek(state.get("pos", 0))
            data = state.get("rest", b"") + f.read()
            state["pos"] = f.tell()
    except OSError:
        return state.get("count", 0)
    cut = data.rfind(b"\n") + 1
    state["count"] = state.get("count", 0) + data[:cut].count(needle)
    state["failed"] = state.get("failed", 0) + data[:cut].count(b'"policy reload failed')
    state["rest"] = data[cut:]
    return state["count"]


def run_stall(a):
    """egress-guard on a big policy, a few tunnels echoing, reloads (rewrite + SIGHUP)."""
    name, port = "egress-guard-stall", a.base_port + 30
    out = {"size": a.stall_size, "reloads_asked": a.reloads, "tunnels": a.stall_tunnels,
           "pace_ms": a.stall_pace_ms, "status": "ok"}
    proc = client = None
    t0 = time.monotonic()
    texts = [policy_scale.generate(a.stall_size, variant=v, extra_identities=bench_identities_yaml(a),
                                   settings=bench_settings_yaml()) for v in range(a.reloads + 1)]
    out["policy_bytes"] = len(texts[0])
    log("  reload-stall: %d-destination policy (%.1f MB), generated in %.1fs"
        % (a.stall_size, len(texts[0]) / 1e6, time.monotonic() - t0))
    try:
        if not peers.port_free(port):
            raise peers.PeerError("port %d already in use" % port)
        # WATCH_INTERVAL high: only our SIGHUPs reload, one reload per rewrite
        argv, env, rundir = prepare_egress(a, name, port, texts[0], {"WATCH_INTERVAL": "3600"})
        out["rundir"] = rundir
        t0 = time.monotonic()
        proc = peers.start(argv, env, a.proxy_cpu, rundir)
        peers.wait_ready(proc, port, rundir, timeout=max(a.start_timeout, 120))
        out["start_s"] = round(time.monotonic() - t0, 2)
        out["rss_start_kb"] = peers.tree_rss_kb(proc.pid)
        log("  reload-stall: egress-guard up in %.1fs, RSS %.0f MB" % (out["start_s"], out["rss_start_kb"] / 1024))
        client = subprocess.Popen(pinned(a.gen_cpu, [
            sys.executable, os.path.join(HERE, "stall.py"), "client", "--proxy", "127.0.0.1:%d" % port,
            "--target", "127.0.0.1:%d" % a.echo_port, "--key", RAW_KEY, "--tunnels", str(a.stall_tunnels),
            "--pace-ms", str(a.stall_pace_ms), "--max-seconds", str(int(a.max_total))]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = [None]
        reader = threading.Thread(target=lambda: ready.__setitem__(0, client.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=30)
        if not ready[0] or ready[0].strip() != "READY":
            raise peers.PeerError("stall client not ready: %r %s" % (ready[0], client.stderr.read()[-300:]
                                                                      if client.poll() is not None else ""))
        time.sleep(0.3)  # the first echoes warm the path
        b0 = time.monotonic()
        time.sleep(a.stall_baseline)
        b1 = time.monotonic()
        logpath = os.path.join(rundir, "proxy.log")
        state = {}
        _count_in_file(logpath, b'"policy reloaded"', state)
        seen = state.get("count", 0)
        windows = []
        policy_path = env["CONFIGMAP_PATH"]
        for i in range(a.reloads):
            tmp = policy_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(texts[i + 1])
            os.replace(tmp, policy_path)  # a ConfigMap update is an atomic swap too
            sent = time.monotonic()
            os.kill(proc.pid, signal.SIGHUP)
            done = None
            for _ in range(int(a.reload_timeout / 0.005) + 1):
                if _count_in_file(logpath, b'"policy reloaded"', state) > seen or state.get("failed"):
                    done = time.monotonic()
                    break
                if time.monotonic() - sent > a.reload_timeout or proc.poll() is not None:
                    break
                time.sleep(0.005)
            if state.get("failed"):
                raise peers.PeerError("policy reload failed:\n%s" % peers.log_tail(rundir))
            if done is None:
                raise peers.PeerError("no 'policy reloaded' within %.0fs of SIGHUP\n%s"
                                      % (a.reload_timeout, peers.log_tail(rundir)))
            seen = state["count"]
            windows.append((sent, done))
            log("  reload-stall: reload %d/%d took %.2fs (SIGHUP -> 'policy reloaded' logged)"
                % (i + 1, a.reloads, done - sent))
            time.sleep(a.stall_settle)
        out["rss_end_kb"] = peers.tree_rss_kb(proc.pid)
        client.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = client.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
            raise peers.PeerError("stall client did not stop")
        data = json.loads(stdout.strip().splitlines()[-1])
        out["client_errors"] = data["errors"]
        out["message_bytes"] = data.get("size")
        out.update(stall.analyze(data["samples"], (b0, b1), windows))
        out["echoes_total"] = len(data["samples"])
        empty = [w for w in [out["baseline"]] + out["reloads"] if not w["echoes"]]
        if empty:
            raise peers.PeerError("no echoes in %d of the %d windows; client errors: %s\n%s"
                                  % (len(empty), 1 + len(out["reloads"]), "; ".join(data["errors"][:3]),
                                     peers.log_tail(rundir)))
        if proc.poll() is not None:
            raise peers.PeerError("egress-guard exited during the stall run\n%s" % peers.log_tail(rundir))
    except (peers.PeerError, OSError, ValueError, IndexError) as e:
        out["status"] = "FAILED: %s" % e
        log("  reload-stall FAILED: %s" % e)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(timeout=5)
        if proc is not None:
            peers.stop(proc.pid)
    return out


# ---------------------------------------------------------------- reporting
def fmt_table(headers, rows):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    out = ["  ".join(str(h).rjust(w[i]) if i else str(h).ljust(w[i]) for i, h in enumerate(headers)),
           "  ".join("-" * x for x in w)]
    for r in rows:
        out.append("  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r)))
    return "\n".join(out)


def g(res, mode, key):
    if res is None or res.get("status") != "ok":
        return None
    r = res["modes"].get(mode)
    if not r or "fatal" in r:
        return None
    return r.get(key)


def n(v, fmt="%.0f", scale=1.0):
    return "-" if v is None else fmt % (v * scale)


def per_tunnel_kb(r):
    idle = r["modes"].get("idle", {})
    if r.get("pid") and idle.get("rss_idle_kb") and idle.get("established"):
        return (idle["rss_idle_kb"] - idle["rss_before_kb"]) / idle["established"]
    return None


def cpu_of(r, mode):
    m = r["modes"].get(mode, {})
    if not r.get("pid") or not m or "fatal" in m:
        return None
    return m.get("cpu_user_s", 0) + m.get("cpu_sys_s", 0)


def per_tunnel_cpu(r, mode):
    """Seconds of proxy CPU per tunnel carried in `mode`, or None."""
    c, done = cpu_of(r, mode), r["modes"].get(mode, {}).get("done_all")
    return c / done if c is not None and done else None


def per_gb_cpu(r, mode):
    """Seconds of proxy CPU per GB carried in `mode`, or None."""
    c, nbytes = cpu_of(r, mode), r["modes"].get(mode, {}).get("bytes_all")
    return c / (nbytes / 1e9) if c is not None and nbytes else None


def load_cpu_per_tunnel(r, mode):
    """Seconds of loadgen + upstream CPU per tunnel in `mode` (the client's TLS handshakes show here)."""
    m = r["modes"].get(mode, {})
    return m["gen_cpu_s"] / m["done_all"] if m.get("done_all") and "gen_cpu_s" in m else None


def ratio(v, b, fmt="%.2fx"):
    return "-" if v is None or not b else fmt % (v / b)


def report_sockets(a, results):
    lines = []
    hdr = ["proxy", "tun/s", "p50 ms", "p99 ms", "c1 p50 us", "tls/s", "tls p99 ms", "bulk MB/s",
           "down MB/s", "idle ok", "RSS idle MB", "KB/tun", "peak RSS MB"]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["name"], "FAIL"] + ["-"] * (len(hdr) - 2))
            continue
        idle = r["modes"].get("idle", {})
        idle_ok = "-"
        if idle and "fatal" not in idle:
            idle_ok = "%d/%d" % (idle["established"], a.idle)
            if idle["alive"] != idle["established"]:
                idle_ok += " (%d alive)" % idle["alive"]
        rows.append([
            r["name"], n(g(r, "rate", "rate")), n(g(r, "rate", "p50_us"), "%.2f", 1e-3),
            n(g(r, "rate", "p99_us"), "%.2f", 1e-3), n(g(r, "lat", "p50_us")),
            n(g(r, "tls-rate", "rate")), n(g(r, "tls-rate", "p99_us"), "%.2f", 1e-3),
            n(g(r, "bulk", "mbps")), n(g(r, "bulk-down", "mbps")), idle_ok,
            n(idle.get("rss_idle_kb") if r.get("pid") else None, "%.1f", 1 / 1024), n(per_tunnel_kb(r), "%.1f"),
            n(r.get("rss_peak_kb") if r.get("pid") else None, "%.1f", 1 / 1024),
        ])
    lines.append(fmt_table(hdr, rows))
    lines.append("tun/s, p50/p99: rate mode (CONNECT + 200 + %d B echo + close) at concurrency %d; c1 p50: the same "
                 "at concurrency 1 (unloaded latency); tls: the same with a 517 B ClientHello (SNI %s); bulk/down: %d "
                 "streams; idle: %d tunnels held %gs (RSS = proxy process tree; KB/tun = delta / tunnels)."
                 % (a.payload, a.conc, a.sni, a.bulk_conns, a.idle, a.idle_hold))

    ok = [r for r in results if r["status"] == "ok"]
    base = next((r for r in ok if r["name"] == "direct"), None)
    if base:
        hdr2 = ["vs direct", "tun/s", "tls/s", "bulk", "down", "c1 latency"]
        rows2 = []
        for r in ok:
            if r is base:
                continue
            lat, blat = g(r, "lat", "p50_us"), g(base, "lat", "p50_us")
            rows2.append([r["name"], ratio(g(r, "rate", "rate"), g(base, "rate", "rate")),
                          ratio(g(r, "tls-rate", "rate"), g(base, "tls-rate", "rate")),
                          ratio(g(r, "bulk", "mbps"), g(base, "bulk", "mbps")),
                          ratio(g(r, "bulk-down", "mbps"), g(base, "bulk-down", "mbps")),
                          "-" if lat is None or not blat else "%+.0f us (%.1fx)" % (lat - blat, lat / blat)])
        lines += ["", fmt_table(hdr2, rows2)]
    eg = next((r for r in ok if r["name"] == "egress-guard"), None)
    tls_row = next((r for r in ok if r["name"] == TLS_ROW), None)
    others = [r for r in ok if r is not eg and r is not base and r is not tls_row]
    if eg and others:
        hdr3 = ["egress-guard / peer", "tun/s", "tls/s", "bulk", "down", "c1 latency", "KB/tun", "CPU/tunnel"]
        rows3 = []
        for o in others:
            lat, olat = g(eg, "lat", "p50_us"), g(o, "lat", "p50_us")
            rows3.append(["vs " + o["name"], ratio(g(eg, "rate", "rate"), g(o, "rate", "rate")),
                          ratio(g(eg, "tls-rate", "rate"), g(o, "tls-rate", "rate")),
                          ratio(g(eg, "bulk", "mbps"), g(o, "bulk", "mbps")),
                          ratio(g(eg, "bulk-down", "mbps"), g(o, "bulk-down", "mbps")),
                          "-" if lat is None or olat is None else "%+.0f us" % (lat - olat),
                          ratio(per_tunnel_kb(eg), per_tunnel_kb(o)),
                          ratio(per_tunnel_cpu(eg, "rate"), per_tunnel_cpu(o, "rate"))])
        lines += ["", fmt_table(hdr3, rows3)]

    if eg and tls_row:
        lines += ["", report_tls_listener(a, eg, tls_row)]

    hdr4 = ["CPU (proxy only)", "us/tunnel", "us/tls tunnel", "usr/sys rate", "busy rate", "s/GB up", "s/GB down",
            "busy bulk"]
    rows4 = []
    for r in ok:
        if not r.get("pid"):
            continue
        rate, bulk = r["modes"].get("rate", {}), r["modes"].get("bulk", {})
        c_rate, c_bulk = cpu_of(r, "rate"), cpu_of(r, "bulk")
        rows4.append([
            r["name"], n(per_tunnel_cpu(r, "rate"), "%.0f", 1e6), n(per_tunnel_cpu(r, "tls-rate"), "%.0f", 1e6),
            ("%.0f/%.0f" % (100 * rate["cpu_user_s"] / max(c_rate, 1e-9), 100 * rate["cpu_sys_s"] / max(c_rate, 1e-9))
             if c_rate else "-"),
            n(c_rate / rate["wall_s"] if c_rate is not None and rate.get("wall_s") else None, "%.0f%%", 100),
            n(per_gb_cpu(r, "bulk"), "%.2f"), n(per_gb_cpu(r, "bulk-down"), "%.2f"),
            n(c_bulk / bulk["wall_s"] if c_bulk is not None and bulk.get("wall_s") else None, "%.0f%%", 100),
        ])
    if rows4:
        lines += ["", fmt_table(hdr4, rows4),
                  "CPU = utime+stime of the proxy's process tree (pinned to CPU %s) over the whole mode run "
                  "(ramp included), divided by every tunnel / byte it carried; busy near 100%% = the proxy "
                  "saturated its core." % a.proxy_cpu]

    hdr5 = ["load side busy (CPU %s)" % a.gen_cpu] + [m for m in ("rate", "lat", "tls-rate", "bulk", "bulk-down")
                                                       if m in a.socket_modes]
    rows5 = []
    for r in ok:
        row = [r["name"]]
        for m in hdr5[1:]:
            mr = r["modes"].get(m, {})
            row.append(n(mr["gen_cpu_s"] / mr["wall_s"] if mr.get("wall_s") and "gen_cpu_s" in mr else None,
                         "%.0f%%", 100))
        rows5.append(row)
    if rows5 and len(hdr5) > 1:
        lines += ["", fmt_table(hdr5, rows5),
                  "CPU of loadgen + upstream over each mode's wall time (ramp and start-up included). Both share one "
                  "core: near 100% there means the load side, not the proxy, set the pace."]
    busy = []
    for r in ok:
        for m, mr in r["modes"].items():
            if mr.get("wall_s") and mr.get("other_cpu_s", 0) / mr["wall_s"] > 0.10:
                top = ", ".join(nm for nm, _ in mr.get("other_top", [])[:2])
                busy.append("%s %s %.0f%% (%s)" % (r["name"], m, 100 * mr["other_cpu_s"] / mr["wall_s"], top))
    if busy:
        lines += ["", "WARNING: other processes took CPU (share of one core) during: %s. Figures from a busy "
                  "machine are low and noisy: rerun on an idle one." % "; ".join(busy)]

    if base and eg:
        parts = []
        for label, mode, key in (("tunnels/s", "rate", "rate"), ("TLS tunnels/s", "tls-rate", "rate"),
                                 ("bulk MB/s", "bulk", "mbps")):
            b, v = g(base, mode, key), g(eg, mode, key)
            if b and v:
                parts.append("%s %.0f = %.1fx egress-guard's" % (label, b, b / v))
        if parts:
            lines += ["", "Load generator headroom: direct (same loadgen, same CPU) did " + "; ".join(parts) + "."]
    return "\n".join(lines)


def report_tls_listener(a, plain, tls):
    """egress-guard behind its TLS listener against the plaintext listener, same run."""
    rows = []
    for label, fmt, scale, get in (
            ("tunnels/s (rate, c=%d)" % a.conc, "%.0f", 1, lambda r: g(r, "rate", "rate")),
            ("TLS tunnels/s (tls-rate)", "%.0f", 1, lambda r: g(r, "tls-rate", "rate")),
            ("rate p99 ms", "%.2f", 1e-3, lambda r: g(r, "rate", "p99_us")),
            ("bulk up MB/s", "%.0f", 1, lambda r: g(r, "bulk", "mbps")),
            ("bulk down MB/s", "%.0f", 1, lambda r: g(r, "bulk-down", "mbps")),
            ("KB per idle tunnel", "%.1f", 1, per_tunnel_kb),
            ("CPU us per tunnel (rate)", "%.0f", 1e6, lambda r: per_tunnel_cpu(r, "rate")),
            ("CPU us per TLS tunnel (tls-rate)", "%.0f", 1e6, lambda r: per_tunnel_cpu(r, "tls-rate")),
            ("CPU s per GB up", "%.2f", 1, lambda r: per_gb_cpu(r, "bulk")),
            ("CPU s per GB down", "%.2f", 1, lambda r: per_gb_cpu(r, "bulk-down")),
            ("load side CPU us per tunnel (rate)", "%.0f", 1e6, lambda r: load_cpu_per_tunnel(r, "rate"))):
        p, t = get(plain), get(tls)
        rows.append([label, n(p, fmt, scale), n(t, fmt, scale), ratio(t, p)])
    lat_p, lat_t = g(plain, "lat", "p50_us"), g(tls, "lat", "p50_us")
    rows.insert(3, ["c=1 p50 latency us", n(lat_p), n(lat_t),
                    "-" if lat_p is None or lat_t is None else "%+.0f us" % (lat_t - lat_p)])
    out = fmt_table(["TLS listener vs plaintext", "plaintext", "tls", "tls / plaintext"], rows)
    lat = tls["modes"].get("lat", {})
    hs = ["%s us at c=1" % n(lat.get("tls_hs_mean_us"))] if lat.get("tls_handshakes") else []
    rate = tls["modes"].get("rate", {})
    if rate.get("tls_handshakes"):
        hs.append("%s us at c=%d" % (n(rate.get("tls_hs_mean_us")), a.conc))
    version = next((m.get("tls_version") for m in tls["modes"].values() if m.get("tls_version")), "")
    cipher = next((m.get("tls_cipher") for m in tls["modes"].values() if m.get("tls_cipher")), "")
    out += ("\n%s: egress-guard with PROXY_PORT=0 and its TLS listener (EC P-256 certificate made for the run), "
            "loadgen speaking TLS to it (an https:// proxy; %s, %s; %s) with a full handshake per tunnel, no "
            "session resumption; same policy, identities and modes as egress-guard. Mean TCP connect + TLS "
            "handshake seen by loadgen: %s. Bulk through TLS is copied through Python and OpenSSL on "
            "both directions (no splice)."
            % (TLS_ROW, version or "?", cipher or "?", tls.get("loadgen_openssl") or "OpenSSL",
               ", ".join(hs) or "-"))
    return out


def goals(a, results, scale, stall_res, soak_res=None):
    """The performance goals, one line each: measured value, target, verdict. The lean
    relay (bench/peers/lean_relay.py: egress-guard's own design without its checks) and
    tinyproxy are measured in the same run; without them, the lines that need them are
    left out."""
    by = {r["name"]: r for r in results if r["status"] == "ok"}
    eg, base, tiny, lean = (by.get(n) for n in ("egress-guard", "direct", "tinyproxy", "lean-relay"))
    rows = []

    def verdict(ok):
        return "-" if ok is None else ("PASS" if ok else "MISS")

    tls = g(eg, "tls-rate", "rate")
    if tls and lean and g(lean, "tls-rate", "rate"):
        x = tls / g(lean, "tls-rate", "rate")
        rows.append(["tls-rate >= 0.8x lean relay", "%.0f/s = %.2fx lean relay" % (tls, x), verdict(x >= 0.8)])
    if tls and tiny and g(tiny, "tls-rate", "rate"):
        x = tls / g(tiny, "tls-rate", "rate")
        rows.append(["tls-rate >= 0.5x tinyproxy", "%.0f/s = %.2fx tinyproxy" % (tls, x), verdict(x >= 0.5)])
    lat = g(eg, "lat", "p50_us")
    if lat is not None and lean and g(lean, "lat", "p50_us") is not None:
        t = g(lean, "lat", "p50_us")
        rows.append(["latency <= lean relay + 100 us", "%.0f us vs lean relay %.0f us" % (lat, t),
                     verdict(lat <= t + 100)])
    bulk, bbulk = g(eg, "bulk", "mbps"), g(base, "bulk", "mbps")
    if bulk and bbulk:
        rows.append(["bulk >= 0.75x direct", "%.0f MB/s = %.2fx direct" % (bulk, bulk / bbulk),
                     verdict(bulk / bbulk >= 0.75)])
    kb = per_tunnel_kb(eg) if eg else None
    if kb is not None:
        rows.append(["<= 20 KB RSS per idle tunnel", "%.1f KB at %d tunnels" % (kb, a.idle), verdict(kb <= 20)])
    if eg:
        errors = sum(m.get("errors", 0) or 0 for m in eg["modes"].values())
        rows.append(["zero errors", "%d loadgen errors over every mode" % errors, verdict(errors == 0)])
    if scale:
        w = scale["worst_ratio"]
        rows.append(["match 100k within 1.2x of 10", "worst %.2fx at %s (%s)" % (w["ratio"], "{:,}".format(w["size"]),
                                                                               w["probe"]),
                     verdict(w["ratio"] <= 1.2) if w["size"] >= 100000 else "-"])
    if stall_res and stall_res.get("status") == "ok" and stall_res.get("worst_gap_ms") is not None:
        sr = stall_res
        rows.append(["reload stall < 50 ms",
                     "worst gap %.1f ms during %d reloads of %s destinations (baseline %.1f ms)"
                     % (sr["worst_gap_ms"], len(sr["reloads"]), "{:,}".format(sr["size"]),
                        sr["baseline"]["max_gap_ms"] or 0),
                     verdict(sr["worst_gap_ms"] < 50)])
    if soak.goal_row(soak_res):
        rows.append(soak.goal_row(soak_res))
    if not rows:
        return ""
    note = ""
    if a.quick:
        note = "QUICK run: short samples, indicative only."
    return fmt_table(["goal", "measured", "verdict"], rows) + ("\n" + note if note else "")


def report_stall(s):
    if s.get("status") != "ok":
        return "reload stall: %s" % s.get("status")
    b = s["baseline"]
    hdr = ["reload stall (%s destinations)" % "{:,}".format(s["size"]), "echoes", "RTT p50 us", "RTT p99 us",
           "max RTT ms", "max gap ms", "gap ended"]
    rows = [["no reload (baseline)", b["echoes"], n(b["p50_us"]), n(b["p99_us"]), n(b["max_rtt_us"], "%.1f", 1e-3),
             n(b["max_gap_ms"], "%.1f"), "-"]]
    for i, r in enumerate(s["reloads"]):
        at = r.get("max_gap_end_s")
        rows.append(["reload %d (took %.2fs)" % (i + 1, r["reload_s"]), r["echoes"], n(r["p50_us"]), n(r["p99_us"]),
                     n(r["max_rtt_us"], "%.1f", 1e-3), n(r["max_gap_ms"], "%.1f"),
                     "-" if at is None else "%+.0f ms" % ((at - r["reload_s"]) * 1000)])
    out = fmt_table(hdr, rows)
    out += ("\n%d tunnels echoing %s B in turn (Python client on CPU %s, %.1f ms pause after each echo: a gap of "
            "~%.1f ms is the normal rhythm). Reload = rewrite the file + SIGHUP, until 'policy reloaded' is seen in "
            "the log (polled every 5 ms), + 0.25 s. 'gap ended' = when the longest gap ended, relative to the moment "
            "'policy reloaded' was seen (about 0 = the stall is the swap at the end of the reload, not the compile)."
            "\nWorst gap during reloads: %.1f ms (goal <= 50 ms). Proxy RSS %.0f MB at start, %.0f MB after."
            % (s["tunnels"], s.get("message_bytes", "?"), s.get("gen_cpu", "1"), s["pace_ms"],
               s["pace_ms"] + (b["p50_us"] or 0) / 1000, s["worst_gap_ms"] or 0, s.get("rss_start_kb", 0) / 1024,
               s.get("rss_end_kb", 0) / 1024))
    if s.get("client_errors"):
        out += "\nclient errors: %s" % "; ".join(s["client_errors"][:5])
    return out


def errors_section(results):
    errs = []
    for r in results:
        if r["status"] != "ok":
            errs.append("%s: %s" % (r["name"], r["status"].splitlines()[0]))
        for m, mr in r["modes"].items():
            if "fatal" in mr:
                errs.append("%s %s: %s" % (r["name"], m, mr["fatal"]))
            elif mr.get("errors"):
                detail = ",".join("%s=%d" % (k, v) for k, v in mr["err"].items() if v)
                errs.append("%s %s: %d errors (%s) last: %s" % (r["name"], m, mr["errors"], detail,
                                                                mr.get("last_error")))
    return ("errors:\n" + "\n".join("  " + e for e in errs)) if errs else ""


def machine_info():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%s, %d CPUs, Linux %s, Python %s" % (cpu, os.cpu_count() or 0, platform.release(),
                                                 platform.python_version())


def git_version():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 60 s): 1 s modes, 300 idle tunnels, fewer timing rounds, 1 reload")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="comma subset of %s (default: all but soak)" % ",".join(ALL_MODES))
    ap.add_argument("--duration", type=float, default=None, help="seconds per socket mode (default 5, quick 1)")
    ap.add_argument("--proxy-cmd", default=DEFAULT_PROXY_CMD,
                    help="command that runs egress-guard; {python} {repo} {port} {metrics_port} {rundir} are "
                         "substituted, leading VAR=value words become its environment (default: %(default)s)")
    ap.add_argument("--peers", default="lean-relay,gevent-relay,tinyproxy",
                    help="peers to run after egress-guard: lean-relay (bench/peers/lean_relay.py, egress-guard's "
                         "own design without its checks: the floor), gevent-relay (bench/peers/gevent_relay.py, a "
                         "naive gevent relay), tinyproxy, squid (when installed); comma list, 'none' for none "
                         "(default: %(default)s)")
    ap.add_argument("--no-tls-listener", dest="tls_listener", action="store_false",
                    help="leave out the %s row (egress-guard's TLS listener, loadgen speaking TLS to it: the "
                         "https:// proxy)" % TLS_ROW)
    ap.add_argument("--ramp", type=float, default=None, help="unmeasured ramp before each mode (default 0.5)")
    ap.add_argument("--lat-duration", type=float, default=None, help="seconds of the concurrency-1 run (default 2)")
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--conc", type=int, default=64, help="concurrency of rate/tls-rate")
    ap.add_argument("--bulk-conns", type=int, default=4)
    ap.add_argument("--idle", type=int, default=None, help="idle tunnels to hold (default 2000)")
    ap.add_argument("--idle-hold", type=float, default=None)
    ap.add_argument("--payload", type=int, default=64)
    ap.add_argument("--sni", default="bench.example.com",
                    help="SNI of the tls-rate ClientHello; egress-guard gets CONNECT <sni>:<port>, mapped to "
                         "127.0.0.1 by its HOSTS_FILE (peers get CONNECT 127.0.0.1:<port>)")
    ap.add_argument("--op-timeout", type=float, default=5.0)
    ap.add_argument("--base-port", type=int, default=19000)
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--gen-cpu", default="1")
    ap.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--tw-cap", type=int, default=16384,
                    help="net.ipv4.tcp_max_tw_buckets during the run, restored afterwards (root; 0: leave it)")
    ap.add_argument("--policy-sizes", default="10,1000,100000")
    ap.add_argument("--stall-size", type=int, default=100000, help="destinations in the reload-stall policy")
    ap.add_argument("--socket-policy-size", type=int, default=0,
                    help="run the socket modes with the bench identities inside a generated policy of N "
                         "destinations (default 0: just the two bench identities)")
    ap.add_argument("--new-heads", action="store_true",
                    help="loadgen sends a new request head on every connection (an X-Seq counter), for "
                         "every proxy: egress-guard then parses every head and reads every key afresh "
                         "(its memory of heads seen before never hits)")
    ap.add_argument("--reloads", type=int, default=None, help="reloads in the stall run (default 5, quick 1)")
    ap.add_argument("--stall-tunnels", type=int, default=4)
    ap.add_argument("--stall-pace-ms", type=float, default=1.0)
    ap.add_argument("--reload-timeout", type=float, default=90.0)
    soak.add_arguments(ap)
    ap.add_argument("--max-total", type=float, default=900.0, help="hard cap on the socket part (s)")
    ap.add_argument("--json", default=None, help="raw results path (default bench/build/results-<timestamp>.json)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the C tools even if up to date")
    ap.add_argument("--page-every", type=float, default=0.0, metavar="S",
                    help="load egress-guard's status page every S seconds during the socket modes "
                         "(0: never, the default); compare a run with and without it")
    ap.add_argument("--profile", action="store_true",
                    help="record egress-guard with py-spy during rate, tls-rate and bulk and print where the time "
                         "goes (profile-<mode>.txt in bench/build/); sampling slows the proxy: read shares, not rates")
    ap.add_argument("--py-spy", default=None, help="py-spy executable for --profile (default: py-spy on PATH)")
    a = ap.parse_args(argv)
    q = a.quick
    for k, full, quick in (("duration", 5.0, 1.0), ("ramp", 0.5, 0.2), ("lat_duration", 2.0, 0.8),
                           ("warmup", 1.0, 0.3), ("idle", 2000, 300), ("idle_hold", 3.0, 0.5),
                           ("reloads", 5, 1)):
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    a.stall_baseline = 1.5 if q else 5.0
    a.stall_settle = 0.3 if q else 1.0
    a.scale_rounds, a.scale_number = (9, 1500) if q else (41, 4000)
    a.drain_max = 5.0 if q else 65.0
    if a.profile or a.py_spy:
        a.py_spy = a.py_spy or shutil.which("py-spy")
        if not a.py_spy or not os.access(a.py_spy, os.X_OK):
            ap.error("--profile needs py-spy: pip install py-spy into any venv (not the project's) and pass "
                     "--py-spy PATH, or put it on PATH")
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in ALL_MODES]
    if bad:
        ap.error("unknown modes: %s (choose from %s)" % (bad, ",".join(ALL_MODES)))
    a.socket_modes = [m for m in SOCKET_MODES if m in a.modes]
    if not (0 < a.duration <= 60 and 0 < a.idle_hold <= 60 and 0 < a.lat_duration <= 60):
        ap.error("durations must be in (0, 60]")
    if not (1 <= a.reloads <= 50):
        ap.error("--reloads must be in [1, 50]")
    if not (a.page_every == 0 or 0.01 <= a.page_every <= 60):
        ap.error("--page-every must be 0 (off) or in [0.01, 60] seconds")
    soak.check_args(a, ap)
    a.peers = [p.strip() for p in a.peers.split(",") if p.strip() and p.strip() != "none"]
    for p in a.peers:
        if p not in RELAYS + ("tinyproxy", "squid"):
            ap.error("unknown peer %r (lean-relay, gevent-relay, tinyproxy, squid)" % p)
    a.echo_port, a.sink_port, a.source_port = a.base_port + 1, a.base_port + 2, a.base_port + 3
    a.upstream_pid = None
    return a


def main(argv=None):
    a = parse_args(argv)
    t_begin = time.monotonic()
    build_tools(a.rebuild)
    notes = []
    if a.no_pin or (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        if not a.no_pin:
            notes.append("not pinned: %s" % ("taskset not found" if not shutil.which("taskset")
                                             else "fewer than 2 CPUs"))
        a.proxy_cpu = a.gen_cpu = None
    nofile = peers.raise_nofile(max(65536, 4 * a.idle + 1024))
    if nofile[0] < 3 * a.idle + 256:
        sys.exit("RLIMIT_NOFILE %s too low for %d idle tunnels" % (nofile, a.idle))
    if a.gen_cpu is not None:
        try:  # keep the driver (and the policy micro-benchmark) off the proxy's core
            os.sched_setaffinity(0, {int(a.gen_cpu)})
        except (OSError, ValueError):
            pass

    targets = [Target("direct", "direct"),
               Target("egress-guard", "egress", auth=RAW_KEY, tls_auth=TLS_KEY,
                      tls_authority="%s:%d" % (a.sni, a.echo_port))]
    a.loadgen = loadgen_features()
    if a.tls_listener:
        missing = tls_row_missing(a.loadgen)
        if missing:
            notes.append("%s skipped: %s" % (TLS_ROW, missing))
        else:
            targets.append(Target(TLS_ROW, "egress", auth=RAW_KEY, tls_auth=TLS_KEY,
                                  tls_authority="%s:%d" % (a.sni, a.echo_port), tls_listener=True))
    for p in a.peers:
        if p in RELAYS:
            targets.append(Target(p, "relay"))
            continue
        exe = shutil.which(p) or ("/usr/sbin/squid" if p == "squid" else "/usr/bin/tinyproxy")
        if os.path.exists(exe):
            targets.append(Target(p, "peer", auth="%s:%s" % (peers.AUTH_USER, peers.AUTH_PASS)))
        else:
            notes.append("%s not installed: skipped (apt-get install -y %s to compare against it)" % (p, p))
    for note in notes:
        log("note: " + note)
    log("machine: %s; egress-guard %s" % (machine_info(), git_version()))
    try:
        load1 = float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError, IndexError):
        load1 = 0.0
    if load1 > 0.5:
        notes.append("load average %.2f at start: something else is running on this machine" % load1)
    if a.new_heads:
        notes.append("--new-heads: a new request head on every connection (no head is ever seen twice)")
        log("note: " + notes[-1])
    log("modes: %s%s" % (",".join(a.modes), " (quick)" if a.quick else ""))

    old_tw = set_tw_cap(a.tw_cap) if (a.socket_modes or "reload-stall" in a.modes or "soak" in a.modes) else None
    # with the cap applied, wait for the backlog to fall under it; without (not root),
    # at least under 40k, above which connect() measurably slows down
    tw_limit = a.tw_cap if old_tw is not None else 40000
    up = None
    results, scale, stall_res, soak_res = [], None, None, None
    try:
        need_upstream = a.socket_modes or "reload-stall" in a.modes or "soak" in a.modes
        if need_upstream:
            up = start_upstream(a, a.max_total + 600 + (soak.total_seconds(a) if "soak" in a.modes else 0))
            a.upstream_pid = up.pid
        if a.socket_modes:
            for i, t in enumerate(targets):
                if a.tw_cap:
                    drain_time_wait(tw_limit, a.drain_max)
                if time.monotonic() - t_begin > a.max_total:
                    results.append({"name": t.name, "modes": {}, "status": "FAILED: skipped, --max-total reached"})
                    continue
                if up.poll() is not None:
                    sys.exit("upstream server died (rc=%s)" % up.returncode)
                tw_start = tw_count()
                log("== %s (TIME_WAIT sockets: %d)" % (t.name, tw_start))
                r = bench_one(a, t, a.base_port + 10 + i)
                r["time_wait_at_start"] = tw_start
                results.append(r)
        if "policy-scale" in a.modes:
            log("== policy scale (%s destinations)" % a.policy_sizes)
            scale = policy_scale.run([int(s) for s in a.policy_sizes.split(",") if s.strip()],
                                     rounds=a.scale_rounds, number=a.scale_number, log=log)
        if "reload-stall" in a.modes:
            if a.tw_cap:
                drain_time_wait(tw_limit, a.drain_max)
            log("== reload stall")
            stall_res = run_stall(a)
            stall_res["gen_cpu"] = a.gen_cpu
        if "soak" in a.modes:
            if a.tw_cap:
                drain_time_wait(tw_limit, a.drain_max)
            log("== soak (%g minutes)" % a.soak_minutes)
            soak_res = soak.run(a, sys.modules[__name__])
    finally:
        restore_tw_cap(old_tw)
        if up is not None:
            up.terminate()
            try:
                up.wait(timeout=3)
            except subprocess.TimeoutExpired:
                up.kill()
    total = time.monotonic() - t_begin

    print()
    print("egress-guard benchmark  %s  egress-guard %s\n%s; proxy on CPU %s, loadgen+upstream on CPU %s; "
          "tcp_max_tw_buckets=%s; %.0fs total%s"
          % (time.strftime("%Y-%m-%d %H:%M"), git_version(), machine_info(), a.proxy_cpu, a.gen_cpu,
             a.tw_cap if old_tw is not None else "unchanged", total, "; QUICK (smoke) run" if a.quick else ""))
    if a.proxy_cmd != DEFAULT_PROXY_CMD:
        print("egress-guard command: %s" % a.proxy_cmd)
    if a.socket_policy_size:
        print("egress-guard policy for the socket modes: bench identities + %s generated destinations"
              % "{:,}".format(a.socket_policy_size))
    for note in notes:
        print("note: " + note)
    sections = []
    if results:
        sections.append(report_sockets(a, results))
    if scale:
        sections.append("Policy scale (Identity.match / Policy.authenticate per call)\n" + policy_scale.report(scale))
    if stall_res:
        sections.append(report_stall(stall_res))
    if soak_res:
        sections.append(soak.report(soak_res, fmt_table))
    gl = goals(a, results, scale, stall_res, soak_res)
    if gl:
        sections.append(gl)
    for r in results:
        for m, path in r.get("profiles", {}).items():
            sections.append("Profile of %s, %s mode (py-spy; this run's rates are slowed by sampling)\n%s"
                            % (r["name"], m, hotspots.summary(path, title="time by phase")))
    err = errors_section(results)
    if err:
        sections.append(err)
    for s in sections:
        print()
        print(s)
    path = a.json or os.path.join(BUILD, "results-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items()}, "machine": machine_info(), "version": git_version(),
                   "notes": notes, "total_s": total, "results": results, "policy_scale": scale,
                   "reload_stall": stall_res, "soak": soak_res}, f, indent=1, default=str)
    shown = os.path.relpath(path, os.getcwd()) if path.startswith(os.getcwd() + os.sep) else path
    print("\nraw results: %s" % shown)
    failed = [r for r in results if r["status"] != "ok"]
    if stall_res and stall_res.get("status") != "ok":
        failed.append(stall_res)
    if soak_res and soak_res.get("status") != "ok":
        failed.append(soak_res)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
