"""What operators see: Prometheus metrics and JSON log lines.

Metric names are a public interface (dashboards and alerts depend on them); see the
README's metrics table. Label values stay bounded: unauthenticated requests carry the
identity "-" and no destination, and each identity may mint at most
`DESTINATION_LABEL_LIMIT` distinct destination values before the rest fold into
"other" — a client sending random host names cannot grow the series set.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from pythonjsonlogger.json import JsonFormatter

# The closed set of decision words (metric label `status`, log field `action`).
STATUSES = (
    "allowed",
    "denied",
    "auth_required",
    "bad_request",
    "connection_failed",
    "sni_mismatch",
    "timeout",
    "limited",
    "reported",
)
UNAUTHENTICATED = "-"
NO_DESTINATION = ""
OTHER_DESTINATION = "other"
DESTINATION_LABEL_LIMIT = 100

del GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR  # we build our own registry
# `*_created` samples double the series count and no dashboard or alert uses them.
disable_created_metrics()


class Metrics:
    """Every metric egress-guard exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = False) -> None:
        self.registry = registry
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.requests = Counter(
            "egress_proxy_requests_total",
            "Proxy requests by identity, destination and decision status.",
            ["identity", "destination", "status"],
            registry=registry,
        )
        self.reloads = Counter(
            "egress_proxy_config_reloads_total",
            "Successful policy reloads.",
            registry=registry,
        )
        self.load_errors = Counter(
            "egress_proxy_config_load_errors_total",
            "Policy loads that failed (the last good policy stayed in force).",
            registry=registry,
        )
        self.last_reload = Gauge(
            "egress_proxy_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful policy load.",
            registry=registry,
        )
        self.allowed_destinations = Gauge(
            "egress_proxy_allowed_destinations",
            "Allowed destination rules per identity in the policy in force.",
            ["identity"],
            registry=registry,
        )
        self.active_tunnels = Gauge(
            "egress_proxy_active_tunnels",
            "Tunnels currently open.",
            registry=registry,
        )
        self.bytes = Counter(
            "egress_proxy_bytes_total",
            "Bytes relayed; direction=upstream is client to destination.",
            ["identity", "direction"],
            registry=registry,
        )
        self.tunnel_duration = Histogram(
            "egress_proxy_tunnel_duration_seconds",
            "How long tunnels stayed open.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, float("inf")),
            registry=registry,
        )
        self.revoked = Counter(
            "egress_proxy_tunnels_revoked_total",
            "Open tunnels closed because a reloaded policy no longer allows them.",
            ["identity"],
            registry=registry,
        )
        # Label children resolved once: `.labels()` takes a lock and builds a tuple key.
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self._destinations: dict[str, set[str]] = {}
        self._byte_children: dict[tuple[str, str], Any] = {}

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
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()

    def count_bytes(self, identity: str, upstream: int, downstream: int) -> None:
        for direction, amount in (("upstream", upstream), ("downstream", downstream)):
            if amount:
                key = (identity, direction)
                child = self._byte_children.get(key)
                if child is None:
                    child = self._byte_children[key] = self.bytes.labels(*key)
                child.inc(amount)

    def policy_loaded(self, destination_counts: dict[str, int]) -> None:
        """Refresh per-identity gauges after a policy (re)load; drop vanished identities."""
        for labels in list(self.allowed_destinations._metrics):  # noqa: SLF001 - no public listing API
            if labels[0] not in destination_counts:
                self.allowed_destinations.remove(*labels)
        for identity, count in destination_counts.items():
            self.allowed_destinations.labels(identity).set(count)
        self.last_reload.set(time.time())


# Fields every decision line may carry, in the order operators read them.
LOG_FIELDS = ("identity", "destination", "action", "reason", "error")


class _Formatter(JsonFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # RFC 3339 in UTC with milliseconds: sortable and unambiguous across nodes.
        return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


def configure_logging(level: int, stream: Any = None) -> logging.Logger:
    """JSON lines on stdout: timestamp, level, message and the record's extra fields."""
    handler = logging.StreamHandler(stream or sys.stdout)
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
