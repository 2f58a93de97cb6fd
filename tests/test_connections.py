"""proxy/connections.py: the handler greenlets' set, what draining and MAX_CONNECTIONS read."""

from __future__ import annotations

import gevent
from gevent.event import Event

from proxy.connections import Connections


def test_spawned_handlers_run_are_counted_and_leave_the_set() -> None:
    connections = Connections()
    release = Event()
    seen: list[tuple[int, int]] = []

    def handle(number: int, other: int) -> None:
        seen.append((number, len(connections)))
        release.wait()

    connections.spawn(handle, 1, 0)
    connections.spawn(handle, 2, 0)
    assert len(connections) == 0  # started from the next turn of the loop
    gevent.sleep(0)
    assert len(connections) == 2
    assert sorted(number for number, _ in seen) == [1, 2]
    assert max(count for _, count in seen) == 2  # a handler counts itself
    assert not connections.join(timeout=0.05)
    release.set()
    assert connections.join(timeout=2)
    assert len(connections) == 0


def test_kill_ends_waiting_handlers_and_runs_their_cleanup() -> None:
    connections = Connections()
    cleaned: list[int] = []

    def handle(number: int) -> None:
        try:
            Event().wait()  # a handler blocked on a read that never comes
        finally:
            cleaned.append(number)

    for number in range(5):
        connections.spawn(handle, number)
    gevent.sleep(0)
    assert len(connections) == 5
    assert connections.kill(timeout=2)
    assert sorted(cleaned) == [0, 1, 2, 3, 4]
    assert len(connections) == 0


def test_kill_gives_up_after_its_timeout_on_a_handler_that_will_not_end() -> None:
    connections = Connections()
    stop = Event()

    def stubborn() -> None:
        while not stop.is_set():
            try:
                stop.wait()
            except BaseException:  # noqa: BLE001 - swallows the kill on purpose
                continue

    connections.spawn(stubborn)
    gevent.sleep(0)
    assert not connections.kill(timeout=0.1)
    assert len(connections) == 1
    stop.set()
    assert connections.join(timeout=2)


def test_a_handler_that_raises_still_leaves_the_set() -> None:
    connections = Connections()

    def broken() -> None:
        raise ValueError("a bug in a handler")

    hub = gevent.get_hub()
    reported: list[type] = []
    original = hub.handle_error
    hub.handle_error = lambda context, kind, value, tb: reported.append(kind)  # type: ignore[method-assign]
    try:
        connections.spawn(broken)
        gevent.sleep(0)
        gevent.sleep(0)
    finally:
        hub.handle_error = original  # type: ignore[method-assign]
    assert reported == [ValueError]
    assert len(connections) == 0
    assert connections.join(timeout=0)


def test_workers_reuse_the_greenlets_of_finished_calls_up_to_their_bound() -> None:
    from proxy.connections import Workers

    workers = Workers(keep=2)
    ran_in: list[object] = []
    release = Event()

    def call(number: int) -> None:
        ran_in.append((number, gevent.getcurrent()))
        release.wait()

    for number in range(3):
        workers.run(call, number)
    gevent.sleep(0)
    first = {number: where for number, where in ran_in}
    assert len(set(first.values())) == 3  # three calls at once: three greenlets
    release.set()
    gevent.sleep(0)
    assert len(workers.parked) == 2  # the third ended: only `keep` are kept
    release.clear()
    ran_in.clear()
    workers.run(call, 7)
    workers.run(call, 8)
    gevent.sleep(0)
    assert {where for _, where in ran_in} <= set(first.values())  # the parked ones ran them
    assert workers.parked == []
    release.set()
    gevent.sleep(0)


def test_a_parked_worker_keeps_nothing_of_its_last_call_alive() -> None:
    import gc
    import weakref

    from proxy.connections import Workers

    class Payload:
        pass

    workers = Workers(keep=4)
    payload = Payload()
    ref = weakref.ref(payload)
    workers.run(lambda item: None, payload)
    del payload
    gevent.sleep(0)
    gc.collect()
    assert workers.parked  # parked, and...
    assert ref() is None  # ...not holding the argument of the call it ran
