"""What operators see: Prometheus metrics and JSON log lines.

Metric names are a public interface (dashboards and alerts depend on them); see the
README's metrics table. Label values stay bounded: unauthenticated requests carry the
identity "-" and no destination, and each identity may mint at most
`DESTINATION_LABEL_LIMIT` distinct destination values before the rest fold into
"other" — a client sending random host names cannot grow the series set.
"""

from __future__ import annotations

import bisect
import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any

import prometheus_client.metrics
import prometheus_client.values
from gevent import monkey
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString
from pythonjsonlogger.json import JsonFormatter

from policy.addresses import address_text
from proxy.flow import UNAUTHENTICATED, Flow
from proxy.status import Activity

NO_DESTINATION = ""
OTHER_DESTINATION = "other"
DESTINATION_LABEL_LIMIT = 100

# `*_created` samples double the series count and no dashboard or alert uses them.
disable_created_metrics()
# The remaining prometheus_client metrics (reloads, revocations, gauges) update their
# values under a lock each. Under gevent's monkey-patching that lock is a gevent lock (a
# Python-level wrapper); only the main thread's greenlets ever touch a metric and none
# switches while holding the lock, so the operating system's lock is the right one.
prometheus_client.values.Lock = prometheus_client.metrics.Lock = monkey.get_original("threading", "Lock")


DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)  # and +Inf


class Counts:
    """The metrics every request updates, kept as plain numbers and exported when
    Prometheus scrapes (`collect`, a prometheus_client custom collector).

    prometheus_client's own Counter costs four Python calls and a lock per update, and
    its Histogram a walk over the buckets; a request updates five such metrics. Here an
    update is one dictionary operation (or an addition), done by the one thread that
    serves connections, and the exposition is built from these numbers only when asked:
    the same names, types, labels and values the README promises.
    """

    # (name, type, labels, help) of every family collect() yields, in order.
    FAMILIES = (
        ("egress_proxy_requests_total", "counter", ("identity", "destination", "status"),
         "Proxy requests by identity, destination and decision status."),
        ("egress_proxy_active_tunnels", "gauge", (), "Tunnels currently open."),
        ("egress_proxy_bytes_total", "counter", ("identity", "direction"),
         "Bytes relayed; direction=upstream is client to destination."),
        ("egress_proxy_tunnel_duration_seconds", "histogram", (), "How long tunnels stayed open."),
        ("egress_proxy_authentications_total", "counter", ("identity", "auth", "listener"),
         "Requests whose credentials proved an identity, by how (auth: api_key or certificate) "
         "and listener (plain or tls)."),
    )

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}
        self.authentications: dict[tuple[str, str, str], int] = {}
        self.active_tunnels = 0
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.duration_sum = 0.0

    def observe_duration(self, seconds: float) -> None:
        self.durations[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def describe(self) -> list[Any]:
        return []  # registering must not call collect() (it runs at scrape time only)

    def collect(self) -> Any:
        counters = {"egress_proxy_requests_total": self.requests, "egress_proxy_bytes_total": self.bytes,
                    "egress_proxy_authentications_total": self.authentications}
        for name, kind, labels, text in self.FAMILIES:
            if kind == "counter":
                family = CounterMetricFamily(name, text, labels=labels)
                for key, value in list(counters[name].items()):
                    family.add_metric(key, value)
            elif kind == "gauge":
                family = GaugeMetricFamily(name, text, value=self.active_tunnels)
            else:
                cumulative, buckets = 0, []
                for bound, count in zip((*DURATION_BUCKETS, float("inf")), self.durations):
                    cumulative += count
                    buckets.append((floatToGoString(bound), cumulative))
                family = HistogramMetricFamily(name, text, buckets=buckets, sum_value=self.duration_sum)
            yield family


class Metrics:
    """Every metric egress-guard exports, registered on one registry: the per-request
    ones as plain numbers (`counts`), the rest as prometheus_client metrics."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = False) -> None:
        self.registry = registry
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        def metric(kind: type, name: str, text: str, labels: tuple[str, ...] = (), **options: Any) -> Any:
            return kind(name, text, labels, registry=registry, **options)

        self.counts = counts = Counts()
        registry.register(counts)
        self.reloads = metric(Counter, "egress_proxy_config_reloads_total", "Successful policy reloads.")
        self.load_errors = metric(Counter, "egress_proxy_config_load_errors_total",
                                  "Policy loads that failed (the last good policy stayed in force).")
        self.last_reload = metric(Gauge, "egress_proxy_config_last_reload_success_timestamp_seconds",
                                  "Unix time of the last successful policy load.")
        self.allowed_destinations = metric(Gauge, "egress_proxy_allowed_destinations",
                                           "Allowed destination rules per identity in the policy in force.",
                                           ("identity",))
        self.client_connections = metric(Gauge, "egress_proxy_client_connections",
                                         "Client connections currently open (compare with MAX_CONNECTIONS).")
        self.revoked = metric(Counter, "egress_proxy_tunnels_revoked_total",
                              "Open tunnels closed because a reloaded policy no longer allows them.", ("identity",))
        self.tls_reloads = metric(Counter, "egress_proxy_tls_reloads_total",
                                  "Times the TLS listener's certificate, key or client CA were reloaded.")
        self.tls_load_errors = metric(Counter, "egress_proxy_tls_load_errors_total",
                                      "Changed TLS listener files that did not load (the ones in force stayed).")
        self._destinations: dict[str, set[str]] = {}

    def destination_label(self, identity: str, destination: str) -> str:
        """The bounded label value for `destination` requested by `identity`."""
        if identity == UNAUTHENTICATED:
            return NO_DESTINATION
        seen = self._destinations.get(identity)
        if seen is None:
            seen = self._destinations[identity] = set()
        if destination in seen:
            return destination
        if len(seen) >= DESTINATION_LABEL_LIMIT:
            return OTHER_DESTINATION
        seen.add(destination)
        return destination

    def count_request(self, identity: str, destination: str, status: str) -> None:
        key = (identity, self.destination_label(identity, destination), status)
        requests = self.counts.requests
        requests[key] = requests.get(key, 0) + 1

    def count_auth(self, identity: str, auth: str, listener: str) -> None:
        key = (identity, auth, listener)
        counted = self.counts.authentications
        counted[key] = counted.get(key, 0) + 1

    def count_bytes(self, identity: str, upstream: int, downstream: int) -> None:
        counted = self.counts.bytes
        if upstream:
            key = (identity, "upstream")
            counted[key] = counted.get(key, 0) + upstream
        if downstream:
            key = (identity, "downstream")
            counted[key] = counted.get(key, 0) + downstream

    def policy_loaded(self, destination_counts: dict[str, int]) -> None:
        """Refresh per-identity gauges after a policy (re)load; drop vanished identities."""
        for labels in list(self.allowed_destinations._metrics):  # noqa: SLF001 - no public listing API
            if labels[0] not in destination_counts:
                self.allowed_destinations.remove(*labels)
        for identity, count in destination_counts.items():
            self.allowed_destinations.labels(identity).set(count)
        self.last_reload.set(time.time())


# The attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class _Formatter(JsonFormatter):
    """python-json-logger's formatter with a fast path for our own event records.

    The generic path (record dict merging, renaming, field parsing) costs ~20 µs a
    line; the proxy logs twice per tunnel, so plain records take a direct route to
    the same serializer. Records with exceptions or stack info take the generic path.
    """

    _second = -1
    _prefix = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return self.rfc3339(record.created)

    def rfc3339(self, created: float) -> str:
        # RFC 3339 in UTC with milliseconds: sortable and unambiguous across nodes.
        # The date-time part is rebuilt once per second, not per line.
        second = int(created)
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._prefix}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info or isinstance(record.msg, dict):
            return super().format(record)
        entry = {"timestamp": self.formatTime(record), "level": record.levelname, "message": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS:
                entry[key] = value
        return self.serialize_log_record(entry)


class BufferedStreamHandler(logging.StreamHandler):
    """Writes lines without a flush (a write syscall) per line.

    The first line written in an event-loop iteration schedules one flush for the end
    of that iteration: a lone line goes out at once, and the lines of a busy
    iteration leave in one write. WARNING and above flush immediately.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        # As for the metric locks above: the operating system's lock, not gevent's
        # Python-level one (threading.RLock is the pure-Python one once monkey-patched);
        # every write comes from the main thread's greenlets.
        self.lock = monkey.get_original("_thread", "RLock")()
        self._pending = False
        self._loop: Any = None

    def write_line(self, line: str) -> None:
        self.stream.write(line + "\n")
        if not self._pending:  # the first line of this turn of the loop: flush at its end
            loop = self._loop
            if loop is None:
                import gevent

                loop = self._loop = gevent.get_hub().loop
            self._pending = True
            loop.run_callback(self._flush_pending)

    def _flush_pending(self) -> None:
        self._pending = False
        try:
            self.stream.flush()  # from the hub, between greenlets: no line is half-written
        except Exception:  # noqa: BLE001 - a closed stdout must not take the proxy down
            pass

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:  # noqa: BLE001 - logging must never take the proxy down
            self.handleError(record)


class Events:
    """The per-request and per-tunnel lines, on the hot path of every connection.

    Same JSON, same formatter and stream as the logger, minus the LogRecord
    machinery (record creation, handler routing), which costs more than the
    serialization itself. Falls back to the logger if its handler is not ours.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def direct(self, level: int = logging.INFO) -> tuple[BufferedStreamHandler, _Formatter] | None | bool:
        """The handler and formatter lines may be written to directly, if they are ours;
        False if lines of `level` are not logged at all, None to go through the logger."""
        logger = self.logger
        if not logger.isEnabledFor(level):
            return False
        handlers = logger.handlers
        handler = handlers[0] if len(handlers) == 1 else None
        formatter = getattr(handler, "formatter", None)
        if isinstance(handler, BufferedStreamHandler) and isinstance(formatter, _Formatter):
            return handler, formatter
        return None

    def write(self, level: int, message: str, fields: dict[str, Any]) -> None:
        logger = self.logger
        direct = self.direct(level)
        if direct is False:
            return
        if direct is None:
            logger.log(level, message, extra=fields)
            return
        handler, formatter = direct
        try:
            handler.write_line(event_line(formatter.rfc3339(time.time()), logging.getLevelName(level),
                                          message, fields))
        except Exception:  # noqa: BLE001 - logging must never take the proxy down
            logger.log(level, message, extra=fields)


_LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING", logging.ERROR: "ERROR"}
_quote = json.encoder.encode_basestring_ascii  # C: a JSON string literal, non-ASCII escaped
_QUOTED: dict[str, str] = {}


def event_line(timestamp: str, level: str, message: str, fields: dict[str, Any]) -> str:
    """The JSON object python-json-logger's serializer writes for these fields (its default
    separators, `ensure_ascii`), built directly: the serializer makes a JSONEncoder and a C
    encoder for every line, which costs more than the line. Values are str, int, float,
    bool or None; anything else takes `json.dumps`."""
    parts = ['{"timestamp": "', timestamp, '", "level": "', level, '", "message": ', _quote(message)]
    for key, value in fields.items():
        quoted = _QUOTED.get(key)
        if quoted is None:
            quoted = _QUOTED[key] = ", " + _quote(key) + ": "
        parts.append(quoted)
        if isinstance(value, str):
            parts.append(_quote(value))
        elif value is True or value is False:
            parts.append("true" if value else "false")
        elif type(value) is int:
            parts.append(int.__repr__(value))
        elif type(value) is float and value == value and value not in (_INF, -_INF):
            parts.append(float.__repr__(value))
        else:
            parts.append(json.dumps(value, ensure_ascii=True, default=str))
    parts.append("}")
    return "".join(parts)


_INF = float("inf")


class Records:
    """The lines and counts every request leaves behind, written from its `Flow`.

    `decision` is the one decision line (and count) per request; `tunnel_closed`,
    `forwarded` and `revoked` follow a request that was let through.
    """

    def __init__(self, metrics: Metrics, logger: logging.Logger, activity: Activity | None = None) -> None:
        self.metrics = metrics
        self.events = Events(logger)
        self.log = logger
        self.activity = activity  # the status page's memory (None: the page is off)

    def decision(self, flow: Flow, status: str, reason: str, *, error: str | None = None,
                 level: int = logging.INFO) -> None:
        """Count and log one decision."""
        host = flow.host.name if flow.host is not None else ""
        self.metrics.count_request(flow.identity, host, status)
        if self.activity is not None:
            self.activity.decided(flow, status, reason, error)
        events = self.events
        direct = events.direct(level)
        if direct is False:
            return
        if direct is not None and error is None:
            # The line of every request, built in one go: the same JSON as event_line()
            # writes for the fields below (tests/test_observe.py holds them to it).
            handler, formatter = direct
            q = _quote
            level_name = _LEVELS.get(level) or logging.getLevelName(level)
            line = (f'{{"timestamp": "{formatter.rfc3339(time.time())}", "level": "{level_name}", '
                    f'"message": "request", "conn": {q(flow.conn)}, "client": {q(flow.client)}, '
                    f'"listener": "{flow.listener}", "method": {q(flow.method)}, '
                    f'"identity": {q(flow.identity)}, "destination": {q(flow.destination)}, '
                    f'"action": {q(status)}, "reason": {q(reason)}')
            if flow.auth is not None:
                line += f', "auth": "{flow.auth}"'
            if flow.address is not None:
                line += f', "address": {q(address_text(flow.address))}'
            if flow.sni is not None:
                line += f', "sni": {q(flow.sni)}'
            if flow.rule is not None:
                line += f', "rule": {q(flow.rule)}'
            handler.write_line(line + "}")
            return
        fields = {
            "conn": flow.conn,
            "client": flow.client,
            "listener": flow.listener,
            "method": flow.method,
            "identity": flow.identity,
            "destination": flow.destination,
            "action": status,
            "reason": reason,
        }
        if flow.auth is not None:
            fields["auth"] = flow.auth
        if flow.address is not None:
            fields["address"] = address_text(flow.address)
        if flow.sni is not None:
            fields["sni"] = flow.sni
        if flow.rule is not None:
            fields["rule"] = flow.rule
        if error is not None:
            fields["error"] = error
        events.write(level, "request", fields)

    def admitted(self, flow: Flow) -> None:
        """The decision line of a request the policy let through (allowed or reported)."""
        self.decision(flow, flow.status, flow.reason or "destination allowed")

    def flush_bytes(self, flow: Flow) -> None:
        """Add the bytes relayed since the last flush to the metrics."""
        up, down = flow.up - flow.counted_up, flow.down - flow.counted_down
        flow.counted_up, flow.counted_down = flow.up, flow.down
        self.metrics.count_bytes(flow.identity, up, down)

    def tunnel_closed(self, flow: Flow) -> None:
        duration = time.monotonic() - flow.started
        self.metrics.counts.observe_duration(duration)
        self.flush_bytes(flow)
        ended_by = "idle timeout" if flow.idle and flow.ended_by == "closed" else flow.ended_by
        events = self.events
        direct = events.direct()
        if direct is False:
            return
        if direct is not None:  # as in decision(): the event_line() of the fields below
            handler, formatter = direct
            q = _quote
            handler.write_line(
                f'{{"timestamp": "{formatter.rfc3339(time.time())}", "level": "INFO", "message": "tunnel closed", '
                f'"conn": {q(flow.conn)}, "identity": {q(flow.identity)}, "destination": {q(flow.destination)}, "bytes_up": {flow.up}, '
                f'"bytes_down": {flow.down}, "duration_ms": {float.__repr__(round(duration * 1000, 1))}, '
                f'"ended_by": {q(ended_by)}}}')
            return
        events.write(logging.INFO, "tunnel closed", {
            "conn": flow.conn,
            "identity": flow.identity,
            "destination": flow.destination,
            "bytes_up": flow.up,
            "bytes_down": flow.down,
            "duration_ms": round(duration * 1000, 1),
            "ended_by": ended_by,
        })

    def forwarded(self, flow: Flow, status_code: int, keep_alive: bool, error: str | None) -> None:
        self.flush_bytes(flow)
        fields = {
            "conn": flow.conn,
            "client": flow.client,
            "method": flow.method,
            "identity": flow.identity,
            "destination": flow.destination,
            "status_code": status_code,
            "bytes_up": flow.up,
            "bytes_down": flow.down,
            "duration_ms": round((time.monotonic() - flow.started) * 1000, 1),
            "keep_alive": keep_alive,
        }
        if flow.ended_by != "closed":
            fields["ended_by"] = flow.ended_by
        if error is not None:
            fields["error"] = error
        self.events.write(logging.INFO, "forwarded", fields)

    def revoked(self, flow: Flow, why: str) -> None:
        self.metrics.revoked.labels(flow.identity).inc()
        if self.activity is not None:
            self.activity.revoked(flow, why)
        self.log.warning("tunnel revoked by policy reload", extra={
            "conn": flow.conn,
            "identity": flow.identity,
            "destination": flow.destination,
            "action": "denied",
            "reason": why,
        })


def configure_logging(level: int, stream: Any = None, *, buffered: bool = False) -> logging.Logger:
    """JSON lines on stdout: timestamp, level, message and the record's extra fields."""
    # The logging HOWTO's optimizations: no caller lookup, thread or process names.
    logging._srcfile = None  # noqa: SLF001
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if stream is None:
        stream = sys.stdout
        if buffered:
            # Our own block-buffered writer on fd 1: PYTHONUNBUFFERED (common in
            # container images) would otherwise turn every line into a write syscall.
            sys.stdout.flush()
            stream = open(sys.stdout.fileno(), "w", buffering=1 << 16, encoding="utf-8", closefd=False)
    handler = BufferedStreamHandler(stream) if buffered else logging.StreamHandler(stream)
    handler.setFormatter(
        _Formatter(
            "{asctime}{levelname}{message}",
            style="{",
            rename_fields={"asctime": "timestamp", "levelname": "level"},
        )
    )
    logger = logging.getLogger("egress_guard")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return logger
