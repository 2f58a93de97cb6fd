"""What the status page remembers between requests, kept on the hot path at the cost of
a few dictionary operations per decision.

`Activity` holds two things no other record keeps: the last `REFUSALS_KEPT` refusals and
report-mode passes (a bounded ring, for "why was my pod denied?"), and requests per
identity and status over the last minute (one small dictionary per second with
traffic, `RecentCounts`). Everything else the page shows is read when it is asked for:
the open flows, the policy in force, the byte counters. Nothing here holds a Flow, a
socket, a key or a payload: a refusal is kept as the same fields its log line has.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, NamedTuple

from policy import Status

REFUSALS_KEPT = 100
WINDOW_SECONDS = 60


class Refused(NamedTuple):
    """One refusal or report-mode pass, as its decision line has it."""

    time: float  # Unix time
    client: str
    identity: str
    destination: str
    status: str
    reason: str
    rule: str | None
    error: str | None
    sni: str | None
    address: Any  # the IP dialled (an ipaddress object), if any
    listener: str  # "plain" or "tls"


class RecentCounts:
    """Requests per identity and status in the last `WINDOW_SECONDS`, in one-second
    buckets: a request adds one to a dictionary entry; a new second starts a new
    bucket (only seconds with traffic have one) and the oldest falls out."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.buckets: deque[tuple[int, dict[str, dict[str, int]]]] = deque(maxlen=WINDOW_SECONDS)
        self.second = -1
        self.current: dict[str, dict[str, int]] = {}

    def count(self, identity: str, status: str) -> None:
        second = int(self.clock())
        if second != self.second:
            self.second, self.current = second, {}
            self.buckets.append((second, self.current))
        per = self.current.get(identity)
        if per is None:
            per = self.current[identity] = {}
        per[status] = per.get(status, 0) + 1

    def last_minute(self) -> dict[str, dict[str, int]]:
        """{identity: {status: requests}} over the last WINDOW_SECONDS seconds."""
        oldest = int(self.clock()) - WINDOW_SECONDS + 1
        totals: dict[str, dict[str, int]] = {}
        for second, bucket in list(self.buckets):
            if second < oldest:
                continue
            for identity, statuses in bucket.items():
                into = totals.setdefault(identity, {})
                for status, count in statuses.items():
                    into[status] = into.get(status, 0) + count
        return totals


class Activity:
    """The status page's memory: recent refusals and the last minute's counts."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.refusals: deque[Refused] = deque(maxlen=REFUSALS_KEPT)
        self.recent = RecentCounts(clock)
        self.started = time.time()

    def decided(self, flow: Any, status: str, reason: str, error: str | None) -> None:
        """One decision (a proxy.flow.Flow): counted; kept if it was not a plain allow."""
        self.recent.count(flow.identity, status)
        if status != Status.ALLOWED:
            self.refusals.append(Refused(time.time(), flow.client, flow.identity, flow.destination, status, reason,
                                         flow.rule, error, flow.sni, flow.address, flow.listener))

    def revoked(self, flow: Any, why: str) -> None:
        """An open flow a reload closed: a refusal too, after the fact."""
        self.refusals.append(Refused(time.time(), flow.client, flow.identity, flow.destination, Status.DENIED,
                                     f"revoked by policy reload: {why}", None, None, flow.sni, flow.address,
                                     flow.listener))
