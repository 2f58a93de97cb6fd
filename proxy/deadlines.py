"""Every time limit of every connection, kept by one greenlet: no timer per wait.

A connection phase with a deadline (the request head, the connect, the first
ClientHello) registers its flow here once (`arm`) and leaves (`disarm`); idle flows are
found by comparing byte counts between sweeps. The sweeper wakes a few times a second:

- a phase past its deadline: a `Deadline` is thrown into the greenlet waiting on one of
  the flow's sockets (from the hub, as gevent's own `cancel_wait` does), and the
  handler turns it into the refusal that phase deserves (408, a hello timeout, 502);
- a tunnel with no byte either way for `IDLE_TIMEOUT`: it is marked idle and both of
  its sockets are shut down, so both pump directions end.

So the precision of a limit is the sweep interval (a quarter of a second for deadlines,
a second for idleness), which is all an operator's timeout needs, and the hot path
pays a dictionary insert and delete per phase instead of a timer per wait.
"""

from __future__ import annotations

import time

import gevent
from gevent.hub import Waiter

from proxy.flow import Flow
from proxy.stream import hub

TICK = 0.25  # seconds between sweeps of the deadlines
IDLE_EVERY = 4  # sweeps between idleness checks (one a second)


class Deadline(Exception):
    """A connection phase ran out of time."""


class Sweeper:
    """The deadlines of connection phases, and idleness of open flows."""

    def __init__(self, open_flows: set[Flow], idle_timeout: float, tick: float = TICK) -> None:
        self.open_flows = open_flows
        self.idle_timeout = idle_timeout
        self.tick = tick
        self.armed: set[Flow] = set()
        self._sweeps = 0

    def arm(self, flow: Flow, seconds: float) -> None:
        """`flow`'s current phase must end within `seconds`."""
        flow.deadline = time.monotonic() + seconds
        self.armed.add(flow)

    def wait(self, flow: Flow, watcher: object, seconds: float, armed: bool) -> bool:
        """Wait on `watcher` within the current phase's deadline, arming it `seconds` from
        now at the phase's first wait (`armed` False); True, the phase is armed. Raises
        `Deadline` when it passes (the caller disarms in its `finally`)."""
        if not armed:
            self.arm(flow, seconds)
        hub().wait(watcher)
        return True

    def disarm(self, flow: Flow) -> None:
        flow.deadline = 0.0
        self.armed.discard(flow)

    def run(self) -> None:
        while True:
            gevent.sleep(self.tick)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        for flow in [f for f in self.armed if f.deadline <= now]:
            self.armed.discard(flow)
            hub().loop.run_callback(_expire, flow, flow.deadline)
        self._sweeps += 1
        if self.idle_timeout and self._sweeps % IDLE_EVERY == 0:
            self.idle(now)

    def idle(self, now: float) -> None:
        """Close the tunnels that saw no byte either way for IDLE_TIMEOUT."""
        limit = self.idle_timeout
        for flow in list(self.open_flows):
            if flow.http:
                continue  # plain-HTTP exchanges keep their own idle limits (408/502)
            total = flow.up + flow.down
            if total != flow.seen:
                flow.seen, flow.quiet_since = total, now
            elif now - flow.quiet_since >= limit:
                flow.idle = True
                flow.abort()


def _expire(flow: Flow, deadline: float) -> None:
    """Runs in the hub: throw `Deadline` into the greenlet waiting on the flow's sockets,
    if the phase that armed `deadline` is still the current one."""
    if flow.deadline != deadline:
        return  # the phase ended (or a new one began) since the sweep
    flow.deadline = 0.0
    for stream in (flow.client_stream, flow.upstream):
        if stream is None:
            continue
        for watcher in stream.watchers:
            waiter = getattr(watcher.callback, "__self__", None) if watcher.active else None
            if isinstance(waiter, Waiter):
                waiter.throw(Deadline())
                return
