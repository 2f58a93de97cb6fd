"""`Connections`: the greenlets serving client connections, one each; `Workers`: the
greenlets they run in, kept for the next connection.

The StreamServer spawns every accepted connection's handler through `spawn`. A gevent
`Pool` would do that too, but a pool's greenlet is a `gevent.Greenlet`: it records who
spawned it and from where, keeps links and a result, and the pool takes a lock and a
link per greenlet; together that costs more than the rest of a short tunnel's setup.
Here a handler runs in a plain greenlet (as `gevent.spawn_raw` makes) started from the
hub, and the set of running handlers is all the proxy needs: how many there are
(`MAX_CONNECTIONS`), waiting for them to finish (draining), and ending them (shutdown).

A new greenlet is not free either: under Python 3.11 each one gets a stack chunk of its
own for its Python frames, mapped from the kernel when it starts and unmapped when it
ends (two system calls and fresh pages to fault in, per greenlet). So a greenlet that
has finished its call parks itself (`Workers`), up to a bound, and the next call runs in
it. A parked greenlet holds no reference to what it ran.

A handler must not let an exception escape (the proxy's handler catches everything);
one that does is reported by the hub, as for any raw greenlet, and still leaves the set
(its greenlet ends instead of being kept).
"""

from __future__ import annotations

from typing import Any, Callable

from gevent.event import Event
from gevent.timeout import Timeout
from greenlet import GreenletExit, getcurrent, greenlet

from proxy.stream import hub


WORKERS_KEPT = 128  # parked greenlets kept for later calls (each holds ~20 KB)


class Workers:
    """Run calls in greenlets of their own, reusing the greenlets of finished calls."""

    def __init__(self, keep: int = WORKERS_KEPT) -> None:
        self.keep = keep
        self.parked: list[greenlet] = []

    def run(self, function: Callable[..., Any], *args: Any) -> None:
        """Call `function(*args)` in a greenlet of its own, from the next turn of the loop."""
        the_hub = hub()
        parked = self.parked
        if parked:
            the_hub.loop.run_callback(parked.pop().switch, function, args)
        else:
            # The first call comes in a list the worker empties: what starts a greenlet
            # stays referenced for as long as it lives, and this one lives on.
            the_hub.loop.run_callback(greenlet(self._work, the_hub).switch, [function, args])

    def _work(self, first: list[Any]) -> None:
        function, args = first
        first.clear()
        me, parked, park = getcurrent(), self.parked, hub().switch
        while True:
            function(*args)
            function = args = None  # type: ignore[assignment]  # nothing kept alive while parked
            if len(parked) >= self.keep:
                return
            parked.append(me)
            function, args = park()  # until run() hands this greenlet its next call


# The greenlets every connection's handler and every pump's second direction run in.
WORKERS = Workers()


class Connections:
    """Spawn handlers (`spawn`, the StreamServer's spawn callable) and keep track of them."""

    def __init__(self, workers: Workers = WORKERS) -> None:
        self.workers = workers
        self.running: set[greenlet] = set()
        self._idle = Event()  # set while nothing runs
        self._idle.set()

    def __len__(self) -> int:
        return len(self.running)

    def spawn(self, handle: Callable[..., Any], *args: Any) -> None:
        """Run `handle(*args)` in a greenlet of its own, from the next turn of the loop."""
        self.workers.run(self._run, handle, args)

    def _run(self, handle: Callable[..., Any], args: tuple[Any, ...]) -> None:
        me = getcurrent()
        running = self.running
        running.add(me)
        self._idle.clear()
        try:
            handle(*args)
        except GreenletExit:
            pass  # ended by kill()
        finally:
            running.discard(me)
            if not running:
                self._idle.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no handler runs, at most `timeout` seconds; True if none does."""
        return self._idle.wait(timeout)

    def kill(self, timeout: float | None = None) -> bool:
        """End every running handler (GreenletExit raised where it waits) and wait for
        them, at most `timeout` seconds; True if none is left."""
        loop = hub().loop
        for runner in list(self.running):
            loop.run_callback(self._end, runner)
        with Timeout(timeout, False):
            return self.join()
        return not self.running

    def _end(self, runner: greenlet) -> None:
        if runner in self.running:  # still in the handler it was asked to end
            runner.throw(GreenletExit)
