"""Reading what a client sends before a tunnel opens: the request head (DESIGN.md
step 2) and the TLS ClientHello (step 8), each bounded in size and time.

Deadlines are applied as socket timeouts per read, so the common case (everything in
the first segment) never arms a timer.
"""

from __future__ import annotations

import time
from typing import Any

from gevent import socket

from proxy.errors import Refusal
from wire import http, tls


class Closed(Exception):
    """The client went away before sending a complete request head."""

    def __init__(self, partial: bool) -> None:
        super().__init__("client closed the connection")
        self.partial = partial


def read_head(sock: socket.socket, buffered: bytes, timeout: float) -> tuple[bytes, bytes]:
    """(head, bytes after it): at most 16 KiB within `timeout` seconds (else 431/408)."""
    buf = buffered
    deadline = time.monotonic() + timeout
    while True:
        try:
            end = http.find_head_end(buf)
        except http.HeadError as error:
            raise Refusal(error.status, error.message) from None
        if end > 0:
            if end > http.MAX_HEAD_BYTES:
                break
            return buf[:end], buf[end:]
        if len(buf) > http.MAX_HEAD_BYTES:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refusal(408, f"no complete request head within {timeout:g} s")
        sock.settimeout(remaining)
        try:
            data = sock.recv(http.MAX_HEAD_BYTES + 5 - len(buf))
        except socket.timeout:
            raise Refusal(408, f"no complete request head within {timeout:g} s") from None
        if not data:
            raise Closed(partial=bool(buf))
        buf += data
    raise Refusal(431, f"request head larger than {http.MAX_HEAD_BYTES} bytes")


class HelloTimeout(Exception):
    pass


def read_hello(sock: socket.socket, buffered: bytes, timeout: float) -> tuple[Any, bytes]:
    """(outcome, bytes read): a ClientHello, tls.Invalid, HelloTimeout, or None if the
    client closed first. Reads until the parser stops saying NEED_MORE (it never does
    past 16 KiB), so a hello split across segments or records is reassembled."""
    buf = buffered
    deadline = time.monotonic() + timeout
    while True:
        if buf:
            outcome = tls.parse_client_hello(buf)
            if outcome is not tls.NEED_MORE:
                return outcome, buf
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return HelloTimeout, buf
        sock.settimeout(remaining)
        try:
            data = sock.recv(tls.MAX_HELLO_BYTES + 1 - len(buf) if buf else 4096)
        except socket.timeout:
            return HelloTimeout, buf
        if not data:
            return None, buf
        buf += data
