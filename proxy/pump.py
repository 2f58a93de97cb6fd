"""The byte pump: copy a tunnel's two directions until both end.

Shape from gevent's portforwarder example: one greenlet per direction, joined by the
handler (returning would close the sockets). An end-of-stream in one direction is
passed on as a half-close (`shutdown(SHUT_WR)`) so protocols that signal "done
sending" by closing their write side keep working; the tunnel ends when both
directions have ended, or on an error in either. Idleness is the Sweeper's to find
(proxy/deadlines.py): it shuts both sockets down, and both directions see the end.

Lean: both directions work on `Stream`s (the real sockets, non-blocking, with their
watchers made once), try every operation before waiting, and arm no timer.

Memory: no per-tunnel buffers. `recv()` returns a right-sized bytes object that lives
only until it is sent, so an idle tunnel holds no payload memory.

Speed: a direction that turns out to carry bulk data (a read fills a whole chunk)
switches to `os.splice` through a pipe taken from a small pool, so the kernel moves
the bytes without copying them through Python. splice is detected at run time (it is
Linux-only and sandboxed kernels may refuse it); without it, the recv/send loop
carries everything. Pipes are pooled because creating two fds per tunnel costs more
than short tunnels gain.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable

from gevent.hub import Waiter

from proxy.connections import WORKERS
from proxy.flow import Flow, abort
from proxy.refusal import Refusal
from proxy.stream import Stream, hub

CHUNK = 65536
SPLICE_CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
PIPE_POOL_LIMIT = 32
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, missing from older Pythons' fcntl


class Pipes:
    """A pool of kernel pipes for splice; `None` from take() means use recv/send."""

    def __init__(self, limit: int = PIPE_POOL_LIMIT) -> None:
        self.limit = limit
        self.free: list[tuple[int, int]] = []
        self.enabled = hasattr(os, "splice") and self._probe()

    @staticmethod
    def _probe() -> bool:
        """Can this kernel splice socket -> pipe -> socket? (seccomp may say no)."""
        try:
            a, b = socket.socketpair()
            r, w = os.pipe()
        except OSError:
            return False
        try:
            a.sendall(b"x")
            flags = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
            moved = os.splice(b.fileno(), w, 1, flags=flags)
            return moved == 1 and os.splice(r, a.fileno(), 1, flags=flags) == 1 and b.recv(1) == b"x"
        except OSError:
            return False
        finally:
            for fd in (r, w):
                os.close(fd)
            a.close()
            b.close()

    def take(self) -> tuple[int, int] | None:
        if not self.enabled:
            return None
        if self.free:
            return self.free.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None  # out of fds: the copy loop still works
        try:
            import fcntl

            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller default pipe still works, just with more wakeups
        return r, w

    def give(self, pipe: tuple[int, int], empty: bool) -> None:
        """Return a pipe; one that may hold stray bytes is closed, never reused."""
        if empty and len(self.free) < self.limit:
            self.free.append(pipe)
        else:
            for fd in pipe:
                os.close(fd)


PIPES = Pipes()


def relay(client: Stream, upstream: Stream, flow: Flow, first: Callable[[bytes], bytes] | None = None,
          judged: Callable[[], None] | None = None) -> None:
    """Pump until both directions end; counts go into `flow`.

    This greenlet copies client -> upstream; a second, raw greenlet (no Greenlet
    bookkeeping: links, exception records; a parked one reused, proxy/connections.py)
    copies upstream -> client and reports back through a Waiter when it ends. `first`
    (with `.done`), if given, judges the client's first bytes before they go on
    (proxy/handshake.py: LateFirstBytes); `judged` is called once it is done. A Refusal it raises is answered to the client here, before
    both sides are shut, and then raised.
    """
    done = Waiter(hub())
    WORKERS.run(_copy_then_report, upstream, client, flow, done)
    finished = False
    try:
        if first is None or _first_bytes(client, upstream, flow, first, judged):
            _copy(client, upstream, flow, True)
        done.get()
        finished = True
    except Refusal as refusal:
        answer = refusal.answer(True)
        if answer:
            try:
                client.send_all(answer)
            except OSError:
                pass
        refusal.answered = True
        raise
    finally:
        if not finished:
            abort(client, upstream)  # the other direction sees EOF and ends on its own


def _first_bytes(client: Stream, upstream: Stream, flow: Flow, first: Any, judged: Callable[[], None] | None) -> bool:
    """Feed the client's reads to `first` until it has judged them; False if the client
    went away first."""
    recv, wait = client.sock.recv, hub().wait
    while not first.done:
        try:
            data = recv(CHUNK)
        except BlockingIOError:
            wait(client.readable)
            continue
        except OSError:
            return False
        if not data:
            upstream.shutdown(socket.SHUT_WR)
            return False
        out = first(data)
        if out:
            upstream.send_all(out)
            flow.up += len(out)
    if judged is not None:
        judged()
    return True


def _copy_then_report(source: Stream, sink: Stream, flow: Flow, done: Waiter) -> None:
    try:
        _copy(source, sink, flow, False)
    finally:
        # A Waiter is switched from the hub only.
        hub().loop.run_callback(done.switch, None)


def _copy(source: Stream, sink: Stream, flow: Flow, upstream: bool) -> None:
    try:
        if _recv_send(source, sink, flow, upstream):
            _splice(source, sink, flow, upstream)
    except OSError:
        # A reset or a closed peer ends the whole tunnel, both ways.
        abort(source, sink)
        return
    try:
        sink.sock.shutdown(socket.SHUT_WR)
    except OSError:
        abort(source, sink)


def _recv_send(source: Stream, sink: Stream, flow: Flow, upstream: bool, upgrade: bool = True) -> bool:
    """Copy with recv/send; True when the stream looks bulk and splice can take over."""
    recv, send, readable, wait = source.sock.recv, sink.sock.send, source.readable, hub().wait
    bulk_ok = upgrade and PIPES.enabled and source.splice and sink.splice
    while True:
        try:
            data = recv(CHUNK)
        except BlockingIOError:
            wait(readable)
            continue
        size = len(data)
        if not size:
            return False
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        if sent < size:
            sink.send_all(memoryview(data)[sent:])
        if upstream:
            flow.up += size
        else:
            flow.down += size
        if bulk_ok and size == CHUNK:
            return True


def _splice(source: Stream, sink: Stream, flow: Flow, upstream: bool) -> None:
    pipe = PIPES.take()
    if pipe is None:
        _recv_send(source, sink, flow, upstream, upgrade=False)
        return
    r, w = pipe
    src, dst = source.sock.fileno(), sink.sock.fileno()
    flags = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
    wait, readable, writable = hub().wait, source.readable, sink.writable
    pending = 0
    spliced = False
    try:
        while True:
            try:
                moved = os.splice(src, w, SPLICE_CHUNK, flags=flags)
            except BlockingIOError:
                wait(readable)
                continue
            if moved == 0:
                return
            pending = moved
            while pending:
                try:
                    pending -= os.splice(r, dst, pending, flags=flags)
                except BlockingIOError:
                    wait(writable)
            if upstream:
                flow.up += moved
            else:
                flow.down += moved
            spliced = True
    except OSError as error:
        if error.errno != errno.EINVAL or spliced or pending:
            raise
        # This pair of sockets cannot splice (seen on some sandboxed kernels): copy instead.
        _recv_send(source, sink, flow, upstream, upgrade=False)
    finally:
        PIPES.give(pipe, empty=pending == 0)
