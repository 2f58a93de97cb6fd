"""The byte pump: copy a tunnel's two directions until both end.

Shape from gevent's portforwarder example: one greenlet per direction, joined by the
handler (returning would close the sockets). An end-of-stream in one direction is
passed on as a half-close (`shutdown(SHUT_WR)`) so protocols that signal "done
sending" by closing their write side keep working; the tunnel ends when both
directions have ended, on an error in either, or after `idle_timeout` seconds with
no bytes in either direction.

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
import time
from typing import Any

import gevent
from gevent.hub import Waiter

from proxy.flow import Flow, abort

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


def send_all(sock: socket.socket, data: bytes) -> None:
    """sendall() without its per-call SO_SNDBUF lookup in the common case where one
    send() takes everything."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def relay(client: socket.socket, upstream: socket.socket, flow: Flow, idle_timeout: float) -> None:
    """Pump until both directions end; counts go into `flow`.

    This greenlet copies client -> upstream; a second, raw greenlet (no Greenlet
    bookkeeping: links, exception records) copies upstream -> client and reports back
    through a Waiter when it ends.
    """
    timeout = idle_timeout or None
    client.settimeout(timeout)
    upstream.settimeout(timeout)
    hub = gevent.get_hub()
    done = Waiter(hub)
    gevent.spawn_raw(_copy_then_report, upstream, client, flow, idle_timeout, hub, done)
    finished = False
    try:
        _copy(client, upstream, flow, True, idle_timeout)
        done.get()
        finished = True
    finally:
        if not finished:
            abort(client, upstream)  # the other direction sees EOF and ends on its own


def _copy_then_report(source: socket.socket, sink: socket.socket, flow: Flow, idle_timeout: float,
                      hub: Any, done: Waiter) -> None:
    try:
        _copy(source, sink, flow, False, idle_timeout)
    finally:
        # A Waiter is switched from the hub only.
        hub.loop.run_callback(done.switch, None)


def wait_readable(socks: list[socket.socket], timeout: float) -> socket.socket | None:
    """The first of `socks` with something to read (data or EOF) within `timeout`
    seconds, or None.

    One io watcher per socket and a timer, all feeding one Waiter: gevent's poll()
    and select() emulations cost about a millisecond per call, and select() cannot
    watch descriptors above 1023.
    """
    hub = gevent.get_hub()
    waiter = Waiter(hub)
    watchers = []
    try:
        for sock in socks:
            watcher = hub.loop.io(sock.fileno(), 1)
            watcher.start(waiter.switch, sock)
            watchers.append(watcher)
        timer = hub.loop.timer(timeout)
        timer.start(waiter.switch, None)
        watchers.append(timer)
        return waiter.get()
    finally:
        for watcher in watchers:
            watcher.stop()
            watcher.close()


class _Idle(Exception):
    pass


def _copy(source: socket.socket, sink: socket.socket, flow: Flow, is_upstream: bool,
          idle_timeout: float) -> None:
    try:
        if _recv_send(source, sink, flow, is_upstream, idle_timeout):
            _splice(source, sink, flow, is_upstream, idle_timeout)
    except _Idle:
        flow.idle = True
        abort(source, sink)
        return
    except OSError:
        # A reset or a closed peer ends the whole tunnel, both ways.
        abort(source, sink)
        return
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        abort(source, sink)


def _quiet(flow: Flow, idle_timeout: float) -> bool:
    """Only idle if the *other* direction was quiet too."""
    return time.monotonic() - flow.last >= idle_timeout


def _recv_send(source: socket.socket, sink: socket.socket, flow: Flow, is_upstream: bool,
               idle_timeout: float, upgrade: bool = True) -> bool:
    """Copy with recv/sendall; True when the stream looks bulk and splice can take over."""
    recv, send = source.recv, sink.send
    bulk_ok = upgrade and PIPES.enabled
    while True:
        try:
            data = recv(CHUNK)
        except socket.timeout:
            if _quiet(flow, idle_timeout):
                raise _Idle from None
            continue
        if not data:
            return False
        sent = send(data)
        if sent < len(data):
            sink.sendall(memoryview(data)[sent:])
        flow.add(is_upstream, len(data))
        if bulk_ok and len(data) == CHUNK:
            return True


def _splice(source: socket.socket, sink: socket.socket, flow: Flow, is_upstream: bool,
            idle_timeout: float) -> None:
    pipe = PIPES.take()
    if pipe is None:
        _recv_send(source, sink, flow, is_upstream, idle_timeout, upgrade=False)
        return
    r, w = pipe
    src, dst = source.fileno(), sink.fileno()
    flags = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
    # One read watcher, one write watcher and one reusable timer for the whole stream:
    # a bulk stream waits thousands of times a second, and a fresh watcher and timer per
    # wait (what wait_read() does) costs a measurable share of the core.
    hub = gevent.get_hub()
    readable, writable = hub.loop.io(src, 1), hub.loop.io(dst, 2)
    timer = gevent.Timeout(idle_timeout, _Tick) if idle_timeout else None
    pending = 0
    spliced = False
    try:
        while True:
            try:
                moved = os.splice(src, w, SPLICE_CHUNK, flags=flags)
            except BlockingIOError:
                _wait(hub, readable, timer, flow, idle_timeout)
                continue
            if moved == 0:
                return
            pending = moved
            while pending:
                try:
                    pending -= os.splice(r, dst, pending, flags=flags)
                except BlockingIOError:
                    _wait(hub, writable, timer, flow, idle_timeout)
            flow.add(is_upstream, moved)
            spliced = True
    except OSError as error:
        if error.errno != errno.EINVAL or spliced or pending:
            raise
        # This pair of sockets cannot splice (seen on some sandboxed kernels): copy instead.
        _recv_send(source, sink, flow, is_upstream, idle_timeout, upgrade=False)
    finally:
        readable.close()
        writable.close()
        if timer is not None:
            timer.close()
        PIPES.give(pipe, empty=pending == 0)


class _Tick(Exception):
    """The idle timer fired during a wait; idle only if the other direction was quiet."""


def _wait(hub: Any, watcher: Any, timer: gevent.Timeout | None, flow: Flow, idle_timeout: float) -> None:
    if timer is not None:
        timer.start()
    try:
        hub.wait(watcher)
    except _Tick:
        if _quiet(flow, idle_timeout):
            raise _Idle from None
    finally:
        if timer is not None:
            timer.cancel()
