"""The policy's `tests:` section end to end: a failing test stops startup, and a reload to
a file whose test fails keeps the last good policy (and is counted) until a fixed file
arrives."""

from __future__ import annotations

import json

from _support import Proxy, Upstream, connect, expect_startup_error, tunnel_works, wait_until

POLICY = """
identities:
  app:
    api_keys: ["app-key"]
    allowed_destinations: ["api.example.com", "127.0.0.1"{extra}]
tests:
  - identity: app
    destination: api.example.com:443
    expect: allowed
  - name: app stays off other.example.com
    identity: app
    destination: other.example.com:443
    expect: {other}
"""
GOOD = POLICY.format(extra="", other="denied")
# other.example.com added, but the test still says denied: the file is invalid.
FAILING = POLICY.format(extra=', "other.example.com"', other="denied")
# the same change with its test updated.
FIXED = POLICY.format(extra=', "other.example.com"', other="allowed")
FAILURE = ("tests[1] (app stays off other.example.com): identity app, destination other.example.com:443: "
           "expected denied, got allowed (reason: destination allowed: other.example.com)")


def status_of(proxy: Proxy, target: str, key: str = "app-key") -> int:
    with connect(proxy, target, key) as reply:
        return reply.status


def counter(proxy: Proxy, name: str) -> float:
    return proxy.metrics().value(name)


def wait_counter(proxy: Proxy, name: str, expected: float, timeout: float = 5.0) -> None:
    got = wait_until(lambda: counter(proxy, name) == expected, timeout)
    assert got, f"{name} is {counter(proxy, name)}, expected {expected}"


def test_startup_with_a_failing_test_exits_1_naming_it(start_proxy) -> None:
    proxy: Proxy = start_proxy(FAILING, _wait=False)
    error = expect_startup_error(proxy, FAILURE)
    assert "tests[0]" not in json.dumps(error), "a passing test was reported"
    assert "app-key" not in proxy.output(), "a policy error message leaked an API key"


def test_startup_with_passing_tests(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(GOOD)
    assert tunnel_works(proxy, ca, "api.example.com", tls_upstream.port)
    assert status_of(proxy, f"other.example.com:{tls_upstream.port}") == 403


def test_reload_to_a_failing_test_keeps_the_last_good_policy(start_proxy, tls_upstream: Upstream, ca) -> None:
    proxy: Proxy = start_proxy(GOOD)
    other = f"other.example.com:{tls_upstream.port}"
    errors = counter(proxy, "egress_proxy_config_load_errors_total")
    reloads = counter(proxy, "egress_proxy_config_reloads_total")
    offset = proxy.log_size()

    proxy.write_policy(FAILING)
    wait_counter(proxy, "egress_proxy_config_load_errors_total", errors + 1)
    line = proxy.wait_log(lambda l: l.get("level") == "ERROR" and "reload" in l.get("message", ""), offset=offset)
    assert FAILURE in line.get("error", ""), line
    assert "app-key" not in proxy.log_text()
    assert proxy.http_status("/ready") == 200, "a failed reload must not make the proxy unready"
    assert tunnel_works(proxy, ca, "api.example.com", tls_upstream.port), "the old policy stopped working"
    assert status_of(proxy, other) == 403, "the failing file's new destination was allowed"
    assert counter(proxy, "egress_proxy_config_reloads_total") == reloads

    proxy.write_policy(FIXED)
    wait_counter(proxy, "egress_proxy_config_reloads_total", reloads + 1)
    assert tunnel_works(proxy, ca, "other.example.com", tls_upstream.port), "the fixed file was not loaded"
    assert tunnel_works(proxy, ca, "api.example.com", tls_upstream.port)
    assert counter(proxy, "egress_proxy_config_load_errors_total") == errors + 1
