#!/usr/bin/env python3
"""Start / stop peer CONNECT proxies (and arbitrary proxy commands) on loopback.

Library used by bench/run.py, and a small CLI for poking at a peer by hand:

    python3 bench/peers.py list
    python3 bench/peers.py start NAME PORT [--cpu 0]   # prints the PID, proxy keeps running
    python3 bench/peers.py stop PID

Built-in peers (Debian packages tinyproxy, squid):
    tinyproxy, tinyproxy-noauth, squid, squid-noauth
The auth variants accept `Proxy-Authorization: Basic base64(benchkey:x)`.
Any other proxy is given as a command: "VAR=val ... prog args" with the
placeholders {port}, {metrics_port}, {rundir}.
Run directories (rendered configs, proxy.log) live under bench/build/run/.
"""
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_DIR = os.path.join(HERE, "peers")
RUN_ROOT = os.path.join(HERE, "build", "run")
AUTH_USER = "benchkey"
AUTH_PASS = "x"  # must match peers/squid.passwd
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

BUILTIN = {
    "tinyproxy": {"kind": "tinyproxy", "auth": True},
    "tinyproxy-noauth": {"kind": "tinyproxy", "auth": False},
    "squid": {"kind": "squid", "auth": True},
    "squid-noauth": {"kind": "squid", "auth": False},
}


class PeerError(RuntimeError):
    pass


def raise_nofile(n=65536):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(n, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _render(template, out, subs):
    with open(os.path.join(PEERS_DIR, template)) as f:
        text = f.read()
    for k, v in subs.items():
        text = text.replace("@%s@" % k, v)
    with open(out, "w") as f:
        f.write(text)
    return out


def prepare_builtin(name, port, listen="127.0.0.1"):
    """Render the config of a built-in peer; return (argv, env, rundir)."""
    spec = BUILTIN[name]
    rundir = os.path.join(RUN_ROOT, "%s-%d" % (name, port))
    shutil.rmtree(rundir, ignore_errors=True)
    os.makedirs(rundir, mode=0o755)
    os.chmod(RUN_ROOT, 0o755)
    if spec["kind"] == "tinyproxy":
        exe = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        if not os.path.exists(exe):
            raise PeerError("tinyproxy not installed (apt-get install -y tinyproxy)")
        auth = "BasicAuth %s %s" % (AUTH_USER, AUTH_PASS) if spec["auth"] else ""
        conf = _render("tinyproxy.conf.in", os.path.join(rundir, "tinyproxy.conf"),
                       {"PORT": str(port), "LISTEN": listen, "RUNDIR": rundir, "AUTH": auth})
        return [exe, "-d", "-c", conf], None, rundir
    if spec["kind"] == "squid":
        exe = shutil.which("squid") or "/usr/sbin/squid"
        if not os.path.exists(exe):
            raise PeerError("squid not installed (apt-get install -y squid)")
        subs = {"PORT": str(port), "LISTEN": "[%s]" % listen if ":" in listen else listen, "RUNDIR": rundir,
                "AUTH_PARAM": "", "AUTH_ACL": "", "AUTH_REQ": ""}
        if spec["auth"]:
            helper = "/usr/lib/squid/basic_ncsa_auth"
            if not os.path.exists(helper):
                raise PeerError("squid auth helper %s missing" % helper)
            pw = os.path.join(rundir, "squid.passwd")
            shutil.copy(os.path.join(PEERS_DIR, "squid.passwd"), pw)
            os.chmod(pw, 0o644)
            subs["AUTH_PARAM"] = "\n".join([
                "auth_param basic program %s %s" % (helper, pw),
                "auth_param basic children 2 startup=1 idle=1",
                "auth_param basic realm bench",
                "auth_param basic credentialsttl 2 hours",
            ])
            subs["AUTH_ACL"] = "acl authed proxy_auth REQUIRED"
            subs["AUTH_REQ"] = "authed"
        conf = _render("squid.conf.in", os.path.join(rundir, "squid.conf"), subs)
        try:  # squid drops privileges to 'proxy'; it must write cache.log there
            pw_ent = pwd.getpwnam("proxy")
            os.chown(rundir, pw_ent.pw_uid, pw_ent.pw_gid)
        except KeyError:
            pass
        return [exe, "-N", "-f", conf], None, rundir
    raise PeerError("unknown peer kind")


def prepare_command(name, port, command, metrics_port=None):
    """A proxy given as a command line, e.g.
    'PROXY_PORT={port} METRICS_PORT={metrics_port} python egress_guard.py'."""
    rundir = os.path.join(RUN_ROOT, "%s-%d" % (name, port))
    shutil.rmtree(rundir, ignore_errors=True)
    os.makedirs(rundir, mode=0o755)
    os.chmod(RUN_ROOT, 0o755)
    mp = metrics_port if metrics_port is not None else port + 1000
    cmd = command.format(port=port, metrics_port=mp, rundir=rundir)
    toks = shlex.split(cmd)
    env = dict(os.environ)
    while toks and "=" in toks[0] and not toks[0].startswith("=") and \
            toks[0].split("=", 1)[0].replace("_", "").isalnum():
        k, v = toks.pop(0).split("=", 1)
        env[k] = v
    if not toks:
        raise PeerError("empty command for %s" % name)
    exe = shutil.which(toks[0], path=env.get("PATH")) if "/" not in toks[0] else toks[0]
    if not exe or not os.path.exists(exe):
        raise PeerError("%s: executable not found: %s" % (name, toks[0]))
    return [exe] + toks[1:], env, rundir


def start(argv, env=None, cpu=None, rundir=None):
    """Start a proxy in its own session; stdout/stderr go to rundir/proxy.log."""
    if cpu is not None:
        argv = ["taskset", "-c", str(cpu)] + list(argv)  # taskset execs: PID stays
    log = open(os.path.join(rundir or "/tmp", "proxy.log"), "wb")
    try:
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=rundir or "/tmp")
    finally:
        log.close()
    return p


def log_tail(rundir, n=15):
    out = []
    for fn in ("proxy.log", "cache.log", "tinyproxy.log"):
        path = os.path.join(rundir, fn)
        try:
            with open(path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()[-n:]
            if lines:
                out.append("--- %s ---\n%s" % (fn, "\n".join(lines)))
        except OSError:
            pass
    return "\n".join(out)


def _socket_can(host, action):
    """True if `action(sock)` on a fresh socket for `host` raises no OSError."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        action(s)
        return True
    except OSError:
        return False
    finally:
        s.close()


def port_open(port, host="127.0.0.1"):
    def connect(s):
        s.settimeout(0.2)
        s.connect((host, port))

    return _socket_can(host, connect)


def port_free(port, host="127.0.0.1"):
    """True if a server could bind the port (SO_REUSEADDR, so TIME_WAIT is fine)."""
    def bind(s):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))

    return _socket_can(host, bind)


def wait_ready(proc, port, rundir, timeout=15.0, host="127.0.0.1"):
    """Wait until the port accepts; raise PeerError with the log tail if the
    process dies or the port never opens."""
    t_end = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        rc = proc.poll()
        if rc is not None:
            raise PeerError("exited with code %s before listening on %d\n%s"
                            % (rc, port, log_tail(rundir)))
        if port_open(port, host):
            time.sleep(0.2)  # let it finish initialising (helpers etc.)
            if proc.poll() is None:
                return
        if time.monotonic() > t_end:
            break
        time.sleep(0.05)
    raise PeerError("port %d not open after %.0fs\n%s" % (port, timeout, log_tail(rundir)))


# ---- /proc sampling ----------------------------------------------------
def tree_pids(pid):
    """pid and all its descendants (bounded walk)."""
    out, todo = [], [pid]
    for _ in range(10000):
        if not todo:
            break
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir("/proc/%d/task" % p):
                try:
                    with open("/proc/%d/task/%s/children" % (p, t)) as f:
                        todo.extend(int(x) for x in f.read().split())
                except OSError:
                    pass
        except OSError:
            pass
    return out


def _status_kb(pid, key):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_kb(pid):
    return _status_kb(pid, "VmRSS")


def hwm_kb(pid):
    return _status_kb(pid, "VmHWM")


def tree_rss_kb(pid):
    return sum(rss_kb(p) for p in tree_pids(pid))


def cpu_s(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[11..14] = utime stime cutime cstime (stat fields 14..17)
        return sum(int(x) for x in fields[11:15]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_cpu_s(pid):
    return sum(cpu_s(p) for p in tree_pids(pid))


def tree_cpu_split(pid):
    """(user_s, sys_s) summed over pid and its descendants (incl. reaped children)."""
    u = s = 0
    for p in tree_pids(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fl = f.read().rsplit(")", 1)[1].split()
            u += int(fl[11]) + int(fl[13])
            s += int(fl[12]) + int(fl[14])
        except (OSError, ValueError, IndexError):
            pass
    return u / CLK_TCK, s / CLK_TCK


def stop(pid, timeout=5.0):
    """SIGTERM the PID, wait, then SIGKILL it and any descendants left."""
    pids = tree_pids(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    t_end = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        try:
            wp, _ = os.waitpid(pid, os.WNOHANG)
            if wp == pid:
                break
        except ChildProcessError:  # not our child: poll for existence
            if not os.path.exists("/proc/%d" % pid):
                break
        if time.monotonic() > t_end:
            break
        time.sleep(0.05)
    killed = False
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            os.kill(p, signal.SIGKILL)
            killed = True
        except (OSError, IndexError):
            pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return not killed


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    s = sub.add_parser("start")
    s.add_argument("name")
    s.add_argument("port", type=int)
    s.add_argument("--cpu", type=int, default=None)
    s.add_argument("--listen", default="127.0.0.1")
    s.add_argument("--command", default=None, help="non-builtin: command line with {port}")
    t = sub.add_parser("stop")
    t.add_argument("pid", type=int)
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for k, v in BUILTIN.items():
            print("%-18s %s auth=%s" % (k, v["kind"], "basic %s:%s" % (AUTH_USER, AUTH_PASS) if v["auth"] else "none"))
        return 0
    if a.cmd == "stop":
        ok = stop(a.pid)
        print("stopped %d%s" % (a.pid, "" if ok else " (needed SIGKILL)"))
        return 0
    raise_nofile()
    if a.command:
        argv2, env, rundir = prepare_command(a.name, a.port, a.command)
    elif a.name in BUILTIN:
        argv2, env, rundir = prepare_builtin(a.name, a.port, a.listen)
    else:
        print("unknown peer %s (try: list, or --command)" % a.name, file=sys.stderr)
        return 2
    if not port_free(a.port):
        print("port %d is already in use" % a.port, file=sys.stderr)
        return 1
    p = start(argv2, env, a.cpu, rundir)
    try:
        wait_ready(p, a.port, rundir, host=a.listen)
    except PeerError as e:
        print("%s failed to start: %s" % (a.name, e), file=sys.stderr)
        stop(p.pid)
        return 1
    with open(os.path.join(rundir, "pid"), "w") as f:
        f.write("%d\n" % p.pid)
    print(p.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
