"""`Stream`: one TCP socket, used the lean way on the hot path.

gevent's socket wrapper gives blocking-style code cooperative waits, but pays for it on
every call: a timeout timer armed per wait, a Python-level method per operation. A
tunnel makes a dozen such calls. Here the handler works on the real socket object,
non-blocking, always trying the operation first and waiting only when the kernel says
EAGAIN, on two io watchers made once per socket and reused for every wait. No timer is
armed per wait: deadlines and idle timeouts are the `Sweeper`'s (proxy/deadlines.py),
which wakes a waiting greenlet when one passes.

The client's Stream reuses the socket and watchers of the gevent socket the
StreamServer accepted, so the plain-HTTP path can keep using that gevent socket.
"""

from __future__ import annotations

import socket
from typing import Any

import gevent
from gevent.hub import Waiter

READ, WRITE = 1, 2
_hub: Any = None


def hub() -> Any:
    """The hub of the thread doing socket work (the main thread). (Hot paths read
    `_hub or hub()`: a global read instead of a call, once it is known.)"""
    global _hub
    if _hub is None:
        _hub = gevent.get_hub()
    return _hub


class Stream:
    """A non-blocking socket and its read and write watchers."""

    __slots__ = ("sock", "readable", "_writable", "owned", "wrapper")
    tls = False  # a TLSStream (proxy/tls.py): `sock` is a TLS session over the socket
    splice = True  # may the pump splice this socket's bytes (not through user-space TLS)

    def __init__(self, sock: socket.socket, readable: Any = None, writable: Any = None, wrapper: Any = None) -> None:
        self.sock = sock
        self.owned = readable is None  # watchers made here are closed here
        self.wrapper = wrapper  # the gevent socket this Stream is a view of, if any
        if readable is None:
            readable = (_hub or hub()).loop.io(sock.fileno(), READ)
        self.readable = readable
        self._writable = writable  # made when first needed: most sockets never wait to write

    @property
    def writable(self) -> Any:
        watcher = self._writable
        if watcher is None:
            watcher = self._writable = (_hub or hub()).loop.io(self.sock.fileno(), WRITE)
        return watcher

    @property
    def watchers(self) -> tuple[Any, ...]:
        """The watchers made so far (what a waiting greenlet may be parked on)."""
        return (self.readable,) if self._writable is None else (self.readable, self._writable)

    @classmethod
    def of(cls, gsock: Any) -> Stream:
        """A Stream over a gevent socket's own socket object and watchers (gevent's
        private attributes; gevent is pinned in requirements.txt)."""
        return cls(gsock._sock, gsock._read_event, gsock._write_event, gsock)  # noqa: SLF001

    def to_gevent(self) -> Any:
        """Hand the connection to a gevent socket, for code written against gevent's
        socket API (plain-HTTP forwarding); this Stream becomes a view of it (`.wrapper`,
        closed by `close()`). Returns the gevent socket."""
        if self.wrapper is not None:
            return self.wrapper
        from gevent import socket as gevent_socket

        if self.owned:
            self._close_watchers()
        sock = self.sock
        wrapped = gevent_socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.sock, self.readable, self._writable = wrapped._sock, wrapped._read_event, wrapped._write_event  # noqa: SLF001
        self.owned, self.wrapper = False, wrapped
        return wrapped

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int) -> bytes:
        """At most `size` bytes, b"" at EOF; waits while there is nothing to read."""
        sock = self.sock
        while True:
            try:
                return sock.recv(size)
            except BlockingIOError:
                (_hub or hub()).wait(self.readable)

    def send_all(self, data: bytes | memoryview) -> None:
        """Send everything, waiting while the kernel's buffer is full."""
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            (_hub or hub()).wait(self.writable)
            try:
                view = view[sock.send(view):]
            except BlockingIOError:
                pass

    def shutdown(self, how: int) -> None:
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def close(self) -> None:
        if self.wrapper is not None:
            self.wrapper.close()
            return
        if self.owned:
            self.readable.close()
            if self._writable is not None:
                self._writable.close()
        self.sock.close()

    def _close_watchers(self) -> None:
        self.readable.close()
        if self._writable is not None:
            self._writable.close()


def wait_readable(first: Stream, second: Stream | None = None) -> Stream:
    """The first of the streams with something to read (data, EOF or an error).
    (A TLS stream may hold decrypted bytes while its socket is quiet: asked first.)"""
    if first.tls and first.sock.pending():
        return first
    if second is None:
        (_hub or hub()).wait(first.readable)
        return first
    waiter = Waiter(_hub or hub())
    first.readable.start(waiter.switch, first)
    second.readable.start(waiter.switch, second)
    try:
        return waiter.get()
    finally:
        first.readable.stop()
        second.readable.stop()
