"""Metrics label bounding and the JSON log lines (fast path and logger path agree)."""

from __future__ import annotations

import io
import json
import logging

from prometheus_client import CollectorRegistry

from proxy.observe import DESTINATION_LABEL_LIMIT, OTHER_DESTINATION, UNAUTHENTICATED, Events, Metrics, configure_logging


def samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def test_unauthenticated_requests_carry_no_client_chosen_label() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for i in range(50):
        metrics.count_request(UNAUTHENTICATED, f"random-{i}.example", "auth_required")
    series = samples(registry, "egress_proxy_requests_total")
    assert series == {(("destination", ""), ("identity", "-"), ("status", "auth_required")): 50.0}


def test_destinations_per_identity_are_capped_then_other() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for i in range(DESTINATION_LABEL_LIMIT + 40):
        metrics.count_request("web", f"host-{i}.example", "denied")
    metrics.count_request("web", "host-0.example", "allowed")  # a known value keeps its label
    series = samples(registry, "egress_proxy_requests_total")
    destinations = {dict(labels)["destination"] for labels in series}
    assert len(destinations) == DESTINATION_LABEL_LIMIT + 1
    assert series[(("destination", OTHER_DESTINATION), ("identity", "web"), ("status", "denied"))] == 40.0
    assert series[(("destination", "host-0.example"), ("identity", "web"), ("status", "allowed"))] == 1.0


def test_policy_loaded_drops_vanished_identities() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.policy_loaded({"a": 2, "b": 3})
    metrics.policy_loaded({"b": 4})
    assert samples(registry, "egress_proxy_allowed_destinations") == {(("identity", "b"),): 4.0}


def test_fast_path_and_logger_path_write_the_same_shape() -> None:
    stream = io.StringIO()
    logger = configure_logging(logging.INFO, stream, buffered=True)
    fields = {"identity": "web", "destination": "a.example:443", "action": "allowed", "reason": "ok"}
    Events(logger).write(logging.INFO, "request", fields)
    logger.info("request", extra=fields)
    Events(logger).write(logging.DEBUG, "hidden", fields)  # below LOG_LEVEL: nothing
    fast, slow = (json.loads(line) for line in stream.getvalue().splitlines())
    assert fast.keys() == slow.keys()
    assert list(fast)[:3] == ["timestamp", "level", "message"]
    assert {k: v for k, v in fast.items() if k != "timestamp"} == {k: v for k, v in slow.items() if k != "timestamp"}
    assert fast["timestamp"].endswith("+00:00") and "T" in fast["timestamp"]


def test_exceptions_keep_their_traceback() -> None:
    stream = io.StringIO()
    logger = configure_logging(logging.INFO, stream, buffered=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed", extra={"identity": "web"})
    line = json.loads(stream.getvalue())
    assert line["level"] == "ERROR" and "RuntimeError: boom" in line["exc_info"] and line["identity"] == "web"


EVENT_FIELDS = [
    {"client": "127.0.0.1:5", "identity": "web", "action": "allowed", "bytes_up": 12, "duration_ms": 1.5,
     "keep_alive": True},
    {"destination": "bücher.example:443", "reason": 'quote " backslash \\ tab \t nul \x00', "ended_by": None},
    {"status_code": 0, "ratio": 0.1 + 0.2, "flag": False, "big": 10**20, "list": [1, "a"]},
]


def test_event_lines_are_what_python_json_logger_writes() -> None:
    """The hot-path line builder and python-json-logger's serializer agree byte for byte."""
    from proxy.observe import _Formatter, event_line
    from policy import Status

    formatter = _Formatter("{asctime}{levelname}{message}", style="{",
                           rename_fields={"asctime": "timestamp", "levelname": "level"})
    for fields in [*EVENT_FIELDS, {"action": Status.SNI_MISMATCH}]:
        entry = {"timestamp": "2026-12-02T00:00:00.000+00:00", "level": "INFO", "message": "request ü"}
        entry.update(fields)
        assert event_line(entry["timestamp"], "INFO", "request ü", fields) == formatter.serialize_log_record(entry)


def test_the_two_hot_lines_are_the_generic_lines() -> None:
    """Records writes its per-request and per-tunnel lines directly; they must be exactly
    what the generic path (event_line, itself held to python-json-logger) writes."""
    import ipaddress

    from policy import parse_host
    from proxy.flow import Flow
    from proxy.observe import Records

    def lines(direct: bool) -> list[dict]:
        stream = io.StringIO()
        logger = configure_logging(logging.INFO, stream, buffered=direct)
        records = Records(Metrics(CollectorRegistry()), logger)
        flow = Flow("10.1.2.3:5555", "c0ffee-7")
        flow.method, flow.identity = "CONNECT", "web \"x\""
        flow.target(parse_host("bücher.example"), 443)
        flow.address, flow.sni, flow.rule, flow.up, flow.down = ipaddress.ip_address("::1"), "a.b", "*.ü", 5, 7
        records.decision(flow, "sni_mismatch", 'reason with "quotes" and ü')
        records.tunnel_closed(flow)
        flow.idle = True
        records.tunnel_closed(flow)
        records.log.handlers[0].flush()
        out = [json.loads(line) for line in stream.getvalue().splitlines()]
        for line in out:
            line.pop("timestamp")
            line.pop("duration_ms", None)
        return out

    assert lines(direct=True) == lines(direct=False)


def test_plain_counts_expose_what_prometheus_client_metrics_would() -> None:
    """The per-request metrics are plain numbers (observe.Counts) exported at scrape
    time: their exposition must be what prometheus_client's own Counter, Gauge and
    Histogram print for the same updates (names, HELP, TYPE, labels, bucket bounds)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from proxy.observe import DURATION_BUCKETS, Metrics

    ours = Metrics(CollectorRegistry())
    reference = CollectorRegistry()
    families = {name: (kind, labels, text) for name, kind, labels, text in ours.counts.FAMILIES}
    kinds = {"counter": Counter, "gauge": Gauge}
    made = {}
    for name, (kind, labels, text) in families.items():
        if kind == "histogram":
            made[name] = Histogram(name, text, labels, registry=reference, buckets=(*DURATION_BUCKETS, float("inf")))
        else:
            made[name] = kinds[kind](name, text, labels, registry=reference)
    for identity, destination, status in [("web", "api.example.com", "allowed")] * 3 + [("-", "", "auth_required")]:
        ours.count_request(identity, destination, status)
        made["egress_proxy_requests_total"].labels(identity, ours.destination_label(identity, destination), status).inc()
    ours.count_auth("web", "certificate", "tls")
    made["egress_proxy_authentications_total"].labels("web", "certificate", "tls").inc()
    ours.count_bytes("web", 1000, 0)
    ours.count_bytes("web", 24, 5_000_000)
    made["egress_proxy_bytes_total"].labels("web", "upstream").inc(1024)
    made["egress_proxy_bytes_total"].labels("web", "downstream").inc(5_000_000)
    for seconds in (0.004, 0.01, 0.3, 7.5, 86400.0):
        ours.counts.observe_duration(seconds)
        made["egress_proxy_tunnel_duration_seconds"].observe(seconds)
    ours.counts.active_tunnels = 2
    made["egress_proxy_active_tunnels"].set(2)

    def lines(text: bytes) -> set[str]:
        return {line for line in text.decode().splitlines() if any(name.removesuffix("_total") in line
                                                                   for name in families)}

    expected = lines(generate_latest(reference))
    assert expected and lines(generate_latest(ours.registry)) == expected
