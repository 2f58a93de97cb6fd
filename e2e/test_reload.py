"""Hot reload end to end (issue 2 item 6, issue 3 items 1 and 6): file edits, the
Kubernetes ConfigMap `..data` symlink swap, broken files, SIGHUP, a reloaded
`settings.forbidden_ranges`, and revocation of open tunnels a new policy refuses.
"""

from __future__ import annotations

import os
import signal
import ssl
import time
from pathlib import Path

import pytest
from _support import (
    Proxy,
    Upstream,
    closed_by_peer,
    connect,
    recv_exactly,
    tls_wrap,
    tunnel_works,
    wait_until,
)

BASE = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"{extra}]
"""
WITH_OTHER = BASE.format(extra=', "other.example.com"')
WITHOUT_OTHER = BASE.format(extra="")


def status_of(proxy: Proxy, target: str, key: str = "app-key") -> int:
    with connect(proxy, target, key) as reply:
        return reply.status


def counter(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.metrics().value(name, **labels)


def wait_counter(proxy: Proxy, name: str, expected: float, timeout: float = 3.0, **labels: str) -> None:
    got = wait_until(lambda: counter(proxy, name, **labels) == expected, timeout)
    assert got, f"{name}{labels} is {counter(proxy, name, **labels)}, expected {expected}"


# -- file edits -------------------------------------------------------------------------------


def test_editing_the_policy_file_allows_a_new_destination(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(WITHOUT_OTHER)
    target = f"other.example.com:{tls_upstream.port}"
    assert status_of(proxy, target) == 403
    reloads = counter(proxy, "egress_proxy_config_reloads_total")
    assert counter(proxy, "egress_proxy_allowed_destinations", identity="app") == 2
    # Edited in place, as an operator with an editor would (same inode).
    with open(proxy.policy_path, "w") as handle:
        handle.write(WITH_OTHER)
    started = time.monotonic()
    assert wait_until(lambda: status_of(proxy, target) == 200, 3), "new destination not allowed after the edit"
    assert time.monotonic() - started < 1.5
    wait_counter(proxy, "egress_proxy_config_reloads_total", reloads + 1)
    assert counter(proxy, "egress_proxy_allowed_destinations", identity="app") == 3
    assert tunnel_works(proxy, ca, "other.example.com", tls_upstream.port)
    line = proxy.wait_log(lambda l: l.get("message") == "policy reloaded")
    assert line["level"] == "INFO"


def test_same_size_rewrite_is_noticed(start_proxy, tls_upstream: Upstream) -> None:
    """A change that keeps the size (here: a swapped key) must still reload (mtime/inode)."""
    proxy: Proxy = start_proxy(BASE.format(extra="").replace("app-key", "key-aaa"))
    target = f"api.example.com:{tls_upstream.port}"
    assert status_of(proxy, target, "key-aaa") == 200
    proxy.write_policy(BASE.format(extra="").replace("app-key", "key-bbb"))
    assert wait_until(lambda: status_of(proxy, target, "key-bbb") == 200, 3)
    assert status_of(proxy, target, "key-aaa") == 407


def _configmap_dir(root: Path, text: str, stamp: str) -> None:
    """Write one timestamped payload directory the way kubelet's AtomicWriter does."""
    payload = root / f"..{stamp}"
    payload.mkdir()
    (payload / "egress-policy.yaml").write_text(text)


def _swap(root: Path, stamp: str) -> None:
    tmp = root / "..data_tmp"
    os.symlink(f"..{stamp}", tmp)
    os.replace(tmp, root / "..data")  # rename(2): atomic


def test_configmap_symlink_swap_is_reloaded(start_proxy, tmp_path: Path, tls_upstream: Upstream, ca) -> None:
    root = tmp_path / "config"
    root.mkdir()
    _configmap_dir(root, WITHOUT_OTHER, "2026_11_26_19_00_00.000000001")
    os.symlink("..2026_11_26_19_00_00.000000001", root / "..data")
    os.symlink("..data/egress-policy.yaml", root / "egress-policy.yaml")
    proxy: Proxy = start_proxy(None, CONFIGMAP_PATH=str(root / "egress-policy.yaml"))
    target = f"other.example.com:{tls_upstream.port}"
    assert status_of(proxy, target) == 403
    reloads = counter(proxy, "egress_proxy_config_reloads_total")

    _configmap_dir(root, WITH_OTHER, "2026_11_26_19_05_00.000000002")
    _swap(root, "2026_11_26_19_05_00.000000002")
    for stale in ["..2026_11_26_19_00_00.000000001"]:  # kubelet removes the old payload
        (root / stale / "egress-policy.yaml").unlink()
        (root / stale).rmdir()
    assert wait_until(lambda: status_of(proxy, target) == 200, 3), "the ..data swap was not picked up"
    wait_counter(proxy, "egress_proxy_config_reloads_total", reloads + 1)
    assert counter(proxy, "egress_proxy_allowed_destinations", identity="app") == 3
    assert tunnel_works(proxy, ca, "other.example.com", tls_upstream.port)

    # A second swap back, same file size as the first payload.
    _configmap_dir(root, WITHOUT_OTHER, "2026_11_26_19_10_00.000000003")
    _swap(root, "2026_11_26_19_10_00.000000003")
    assert wait_until(lambda: status_of(proxy, target) == 403, 3), "the second ..data swap was not picked up"
    wait_counter(proxy, "egress_proxy_config_reloads_total", reloads + 2)
    assert counter(proxy, "egress_proxy_allowed_destinations", identity="app") == 2


BROKEN = {
    "yaml-syntax": "identities: [unclosed\n",
    "bad-destination": BASE.format(extra=', "*a.com"'),
    "empty": "",
    "no-keys": "identities:\n  app:\n    allowed_destinations: [api.example.com]\n",
}


@pytest.mark.parametrize("broken", BROKEN.values(), ids=BROKEN.keys())
def test_broken_file_keeps_the_old_policy_until_a_good_one(start_proxy, tls_upstream: Upstream, ca,
                                                          broken: str) -> None:
    proxy: Proxy = start_proxy(WITHOUT_OTHER)
    errors = counter(proxy, "egress_proxy_config_load_errors_total")
    reloads = counter(proxy, "egress_proxy_config_reloads_total")
    proxy.write_policy(broken)
    wait_counter(proxy, "egress_proxy_config_load_errors_total", errors + 1)
    line = proxy.wait_log(lambda l: l.get("level") == "ERROR" and "reload" in l.get("message", ""))
    assert line.get("error"), line
    assert proxy.http_status("/ready") == 200, "a broken reload must not make the proxy unready"
    assert tunnel_works(proxy, ca, "api.example.com", tls_upstream.port), "the old key stopped working"
    assert counter(proxy, "egress_proxy_config_reloads_total") == reloads
    assert counter(proxy, "egress_proxy_allowed_destinations", identity="app") == 2

    proxy.write_policy(WITH_OTHER.replace("app-key", "new-key"))
    wait_counter(proxy, "egress_proxy_config_reloads_total", reloads + 1)
    assert tunnel_works(proxy, ca, "other.example.com", tls_upstream.port, key="new-key")
    assert status_of(proxy, f"api.example.com:{tls_upstream.port}", "app-key") == 407
    assert counter(proxy, "egress_proxy_config_load_errors_total") == errors + 1


@pytest.mark.parametrize("trigger", ["watch", "SIGHUP"])
def test_failed_reload_is_one_json_log_line_without_traceback(start_proxy, trigger: str) -> None:
    """An operator's typo is an expected event, not a crash: one JSON error line on stdout,
    nothing on stderr (Kubernetes merges both streams into the container log)."""
    proxy: Proxy = start_proxy(WITHOUT_OTHER, WATCH_INTERVAL="0.2" if trigger == "watch" else "3600")
    errors = counter(proxy, "egress_proxy_config_load_errors_total")
    proxy.write_policy(BROKEN["bad-destination"])
    if trigger == "SIGHUP":
        proxy.signal(signal.SIGHUP)
    wait_counter(proxy, "egress_proxy_config_load_errors_total", errors + 1)
    proxy.wait_log(lambda l: l.get("level") == "ERROR")
    error_lines = [l for l in proxy.log_lines() if l.get("level") == "ERROR"]
    assert len(error_lines) == 1, error_lines
    assert "*a.com" in error_lines[0].get("error", ""), error_lines[0]
    stderr = proxy.err_path.read_text(errors="replace")
    assert "Traceback" not in stderr, f"a failed reload printed a traceback:\n{stderr}"
    assert stderr == "", f"a failed reload wrote non-JSON output:\n{stderr}"


def test_deleted_file_keeps_the_old_policy(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(WITHOUT_OTHER)
    errors = counter(proxy, "egress_proxy_config_load_errors_total")
    proxy.policy_path.unlink()
    wait_counter(proxy, "egress_proxy_config_load_errors_total", errors + 1)
    assert tunnel_works(proxy, ca, "api.example.com", tls_upstream.port)
    assert proxy.http_status("/ready") == 200
    proxy.write_policy(WITH_OTHER)
    assert wait_until(lambda: status_of(proxy, f"other.example.com:{tls_upstream.port}") == 200, 3)


def test_sighup_reloads_at_once(start_proxy, tls_upstream: Upstream) -> None:
    proxy: Proxy = start_proxy(WITHOUT_OTHER, WATCH_INTERVAL="3600")
    target = f"other.example.com:{tls_upstream.port}"
    reloads = counter(proxy, "egress_proxy_config_reloads_total")
    proxy.write_policy(WITH_OTHER)
    assert not wait_until(lambda: counter(proxy, "egress_proxy_config_reloads_total") > reloads, 0.5), \
        "reloaded without SIGHUP despite WATCH_INTERVAL=3600"
    assert status_of(proxy, target) == 403
    proxy.signal(signal.SIGHUP)
    assert wait_until(lambda: status_of(proxy, target) == 200, 1.5), "SIGHUP did not reload the policy"
    wait_counter(proxy, "egress_proxy_config_reloads_total", reloads + 1)
    line = proxy.wait_log(lambda l: l.get("message") == "policy reloaded")
    assert "SIGHUP" in str(line.get("trigger", "")), line
    assert proxy.running


# -- forbidden ranges --------------------------------------------------------------------------

NAME_ONLY = """
{settings}
identities:
  names:
    api_keys: ["names-key"]
    allowed_destinations: ["api.example.com", "metadata.example.com"]
"""


def test_forbidden_ranges_setting_is_hot_reloaded(start_proxy, tls_upstream: Upstream, ca) -> None:
    relaxed = NAME_ONLY.format(settings='settings:\n  forbidden_ranges: ["169.254.0.0/16", "10.0.0.0/8"]')
    proxy: Proxy = start_proxy(relaxed)
    # Loopback is not in the replaced list: the name-only identity reaches 127.0.0.1.
    with connect(proxy, f"api.example.com:{tls_upstream.port}", "names-key") as reply:
        assert reply.status == 200
        stream = tls_wrap(reply.sock, ca, "api.example.com")
        stream.sendall(b"ping")
        assert recv_exactly(stream, 4) == b"ping"
        with connect(proxy, "metadata.example.com:80", "names-key") as meta:
            assert meta.status == 403
            assert "169.254.0.0/16" in proxy.decision(meta)["reason"]

        proxy.write_policy(NAME_ONLY.format(settings=""))  # back to the default list
        # The open tunnel now goes to a forbidden address: it is revoked.
        assert closed_by_peer(stream, 3), "a tunnel to a newly forbidden address stayed open"
        stream.close()
    with connect(proxy, f"api.example.com:{tls_upstream.port}", "names-key") as reply:
        assert reply.status == 403
        assert "127.0.0.0/8" in proxy.decision(reply)["reason"]
    assert counter(proxy, "egress_proxy_tunnels_revoked_total", identity="names") == 1


# -- revocation ------------------------------------------------------------------------------

REVOKE = """
identities:
  rev:
    api_keys: [{rev_keys}]
    allowed_destinations: [{rev_dests}]
{more}
  bystander:
    api_keys: ["by-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"]
"""
START = REVOKE.format(rev_keys='"rev-key"', rev_dests='"api.example.com", "other.example.com", "127.0.0.1"', more="")
CHANGES = {
    "destination-removed": (
        REVOKE.format(rev_keys='"rev-key"', rev_dests='"other.example.com", "127.0.0.1"', more=""),
        {"rev->api"},
    ),
    "key-removed": (
        REVOKE.format(rev_keys='"rev-key-2"', rev_dests='"api.example.com", "other.example.com", "127.0.0.1"',
                      more=""),
        {"rev->api", "rev->other"},
    ),
    "identity-removed": (
        REVOKE.replace("  rev:\n    api_keys: [{rev_keys}]\n    allowed_destinations: [{rev_dests}]\n{more}\n", ""),
        {"rev->api", "rev->other"},
    ),
}


@pytest.mark.parametrize("change", CHANGES.keys())
def test_revocation_closes_only_the_tunnels_the_new_policy_refuses(start_proxy, tls_upstream: Upstream, ca,
                                                                 change: str) -> None:
    new_policy, revoked = CHANGES[change]
    proxy: Proxy = start_proxy(START)
    port = tls_upstream.port
    tunnels = {}
    replies = []
    for name, host, key in [("rev->api", "api.example.com", "rev-key"),
                            ("rev->other", "other.example.com", "rev-key"),
                            ("bystander->api", "api.example.com", "by-key")]:
        reply = connect(proxy, f"{host}:{port}", key)
        replies.append(reply)
        assert reply.status == 200
        tunnels[name] = tls_wrap(reply.sock, ca, host)
        tunnels[name].sendall(b"hi")
        assert recv_exactly(tunnels[name], 2) == b"hi"
    try:
        proxy.write_policy(new_policy)
        started = time.monotonic()
        for name in sorted(revoked):
            assert closed_by_peer(tunnels[name], 3), f"{name} was not revoked"
        assert time.monotonic() - started < 2, "revocation took longer than a watch interval or so"
        for name in set(tunnels) - revoked:
            tunnels[name].sendall(b"untouched")
            assert recv_exactly(tunnels[name], 9) == b"untouched", f"{name} was disturbed"
        assert counter(proxy, "egress_proxy_tunnels_revoked_total", identity="rev") == len(revoked)
        assert counter(proxy, "egress_proxy_tunnels_revoked_total", identity="bystander") == 0
        lines = [l for l in proxy.log_lines() if "revoked" in l.get("message", "")]
        assert len(lines) == len(revoked), lines
        assert all(l["identity"] == "rev" for l in lines)
        summaries = [l for l in proxy.log_lines() if l.get("message") == "tunnel closed"]
        assert sum(1 for l in summaries if "revoked" in str(l.get("ended_by"))) == len(revoked)
        gauge = {s["identity"] for s in proxy.metrics().series("egress_proxy_allowed_destinations")}
        assert ("rev" in gauge) == (change != "identity-removed"), gauge
    finally:
        for stream in tunnels.values():
            stream.close()
        for reply in replies:
            reply.close()


@pytest.mark.parametrize("change", ["key-removed", "destination-removed"])
def test_revocation_covers_a_tunnel_still_waiting_for_its_hello(start_proxy, tls_upstream: Upstream, ca,
                                                                change: str) -> None:
    """A tunnel that got its 200 before the reload but sends its ClientHello after it must not
    live on under the old policy: it is refused at the hello or closed like any other."""
    proxy: Proxy = start_proxy(START)
    with connect(proxy, f"api.example.com:{tls_upstream.port}", "rev-key") as reply:
        assert reply.status == 200
        proxy.write_policy(CHANGES[change][0])
        # The revocation pass runs before the reload's log line is flushed: it is over.
        proxy.wait_log(lambda l: l.get("message") == "policy reloaded")
        try:
            stream = tls_wrap(reply.sock, ca, "api.example.com")
        except (ssl.SSLError, OSError):
            return  # refused at the hello: fine
        try:
            stream.sendall(b"x")
            assert closed_by_peer(stream, 2), "a tunnel the reloaded policy refuses stays open"
        finally:
            stream.close()


PLAIN = """
identities:
  db:
    api_keys: ["db-key"]
    require_tls: {require_tls}
    allowed_destinations: ["127.0.0.1"]
"""


def test_revocation_when_require_tls_is_turned_on(start_proxy, fresh_echo_upstream: Upstream) -> None:
    proxy: Proxy = start_proxy(PLAIN.format(require_tls="false"))
    with connect(proxy, f"127.0.0.1:{fresh_echo_upstream.port}", "db-key") as reply:
        assert reply.status == 200
        reply.sock.sendall(b"plain")
        assert recv_exactly(reply.sock, 5) == b"plain"
        proxy.write_policy(PLAIN.format(require_tls="true"))
        assert closed_by_peer(reply.sock, 3), "a plaintext tunnel survived require_tls: true"
    assert counter(proxy, "egress_proxy_tunnels_revoked_total", identity="db") == 1


# -- second round: reloads that converge, plain HTTP revoked ------------------------------------


def big_policy(n: int) -> str:
    rules = "\n".join(f'      - "host{i}.big.example.test"' for i in range(n))
    return BASE.format(extra="") + '  gone:\n    api_keys: ["gone-key"]\n    allowed_destinations:\n' + rules + "\n"


def ready_digest(proxy: Proxy) -> str | None:
    import json

    status, _, body = proxy.http_get("/ready")
    return json.loads(body).get("policy") if status == 200 else None


def test_overlapping_reloads_converge_on_the_newest_file(start_proxy, tls_upstream: Upstream) -> None:
    """A 150,000-destination policy and SIGHUP, then 0.3 s later a small policy that
    removes a key and SIGHUP again: the small one must end up in force, and stay."""
    import hashlib

    proxy: Proxy = start_proxy(big_policy(10), WATCH_INTERVAL="0.5")
    assert status_of(proxy, f"127.0.0.1:{tls_upstream.port}", key="gone-key") == 403  # known key
    proxy.write_policy(big_policy(150_000))
    proxy.signal(signal.SIGHUP)
    time.sleep(0.3)  # the large compile is under way: this is the race being tested
    proxy.write_policy(WITHOUT_OTHER)
    proxy.signal(signal.SIGHUP)
    small = hashlib.sha256(WITHOUT_OTHER.encode()).hexdigest()[:12]
    assert wait_until(lambda: ready_digest(proxy) == small, 40, interval=0.2), \
        f"/ready still reports {ready_digest(proxy)}, not the newest file's {small}"
    assert not wait_until(lambda: ready_digest(proxy) != small, 2, interval=0.2), "an older policy came back"
    assert status_of(proxy, f"127.0.0.1:{tls_upstream.port}", key="gone-key") == 407


def test_revocation_cuts_an_in_flight_plain_http_exchange(start_proxy) -> None:
    """A streaming plain-HTTP response stops when a reload removes the key, like a tunnel."""
    from _forward_origin import Origin
    from _support import basic, open_client

    origin = Origin()
    policy = ('identities:\n  web:\n    api_keys: ["web-key"]\n    allowed_destinations: ["127.0.0.1"]\n'
              '  other:\n    api_keys: ["other-key"]\n    allowed_destinations: ["127.0.0.1"]\n')
    proxy: Proxy = start_proxy(policy)
    try:
        revoked = counter(proxy, "egress_proxy_tunnels_revoked_total", identity="web")
        sock = open_client(proxy)
        sock.sendall((f"GET http://127.0.0.1:{origin.port}/slow-chunked HTTP/1.1\r\n"
                      f"Host: 127.0.0.1:{origin.port}\r\nProxy-Authorization: {basic('web-key')}\r\n\r\n").encode())
        received = b""
        while b"first;" not in received:
            data = sock.recv(65536)
            assert data, "the response ended before its first chunk"
            received += data
        proxy.write_policy(policy.replace('"web-key"', '"web-key-2"'))
        assert closed_by_peer(sock, 5), "the exchange outlived the revocation of its key"
        assert b"second;" not in received
        wait_counter(proxy, "egress_proxy_tunnels_revoked_total", revoked + 1, identity="web")
        line = proxy.wait_log(lambda l: l.get("message") == "tunnel revoked by policy reload")
        assert line["identity"] == "web" and line["action"] == "denied"
        sock.close()
    finally:
        origin.release.set()
        origin.close()


# -- remembered parses and verdicts (wire/http.py parse_head, policy/decide.py judge) ------------


def _tunnel_line(proxy: Proxy, ca, target: str, host: str, key: str = "app-key") -> dict:
    """Open a TLS tunnel to `target` with SNI `host`; its decision line."""
    with connect(proxy, target, key) as reply:
        assert reply.status == 200, reply.status
        stream = tls_wrap(reply.sock, ca, host)
        stream.sendall(b"ping")
        assert recv_exactly(stream, 4) == b"ping"
        stream.close()
    return proxy.decision(reply)


def test_a_repeated_request_is_recorded_as_the_first_and_reloads_forget_it(start_proxy, tls_upstream: Upstream,
                                                                           ca) -> None:
    """The same CONNECT head, byte for byte, is parsed once and its allowing verdicts are
    remembered with the policy in force. The remembered answer must be the one judging
    gives (the same decision line), and must not outlive the policy: after a reload that
    drops the destination, then one that drops the key, the very same head is refused."""
    proxy: Proxy = start_proxy(WITH_OTHER, WATCH_INTERVAL="3600")
    target = f"other.example.com:{tls_upstream.port}"
    first = _tunnel_line(proxy, ca, target, "other.example.com")
    again = [_tunnel_line(proxy, ca, target, "other.example.com") for _ in range(3)]
    varying = ("timestamp", "conn", "client")
    for line in again:
        assert {k: v for k, v in line.items() if k not in varying} == \
            {k: v for k, v in first.items() if k not in varying}
    assert first["action"] == "allowed" and first["rule"] == "other.example.com" and first["sni"] == "other.example.com"
    # The remembered allow for this SNI must not stand in for another SNI on the same head.
    with connect(proxy, target, "app-key") as reply:
        assert reply.status == 200
        with pytest.raises((ssl.SSLError, OSError)):
            tls_wrap(reply.sock, ca, "api.example.com", check_hostname=False).sendall(b"x")
    assert proxy.decision(reply)["action"] == "sni_mismatch"

    reloads = counter(proxy, "egress_proxy_config_reloads_total")
    proxy.write_policy(WITHOUT_OTHER)
    proxy.signal(signal.SIGHUP)
    wait_counter(proxy, "egress_proxy_config_reloads_total", reloads + 1)
    assert status_of(proxy, target) == 403
    assert status_of(proxy, f"api.example.com:{tls_upstream.port}") == 200

    proxy.write_policy(WITH_OTHER.replace('"app-key"', '"rotated-key"'))
    proxy.signal(signal.SIGHUP)
    wait_counter(proxy, "egress_proxy_config_reloads_total", reloads + 2)
    assert status_of(proxy, target) == 407
    assert status_of(proxy, target, key="rotated-key") == 200
    assert proxy.running
