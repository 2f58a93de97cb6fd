"""Reading a request head (steps 2-3 of docs/ARCHITECTURE.md), bounded in size and time.
(The ClientHello, step 8, is read by proxy/handshake.py.)

Deadlines are applied as socket timeouts per read, so the common case (everything in
the first segment) never arms a timer.
"""

from __future__ import annotations

import time

from gevent import socket

from proxy.refusal import Refusal, from_parse_error
from wire import http


class Closed(Exception):
    """The client went away before sending a complete request head."""

    def __init__(self, partial: bool) -> None:
        super().__init__("client closed the connection")
        self.partial = partial


def read_request(sock: socket.socket, buffered: bytes, timeout: float) -> tuple[http.Request, bytes]:
    """Steps 2-3: the parsed request head and the bytes after it."""
    head, rest = read_head(sock, buffered, timeout)
    try:
        return http.parse_head(head), rest
    except http.HeadError as error:
        raise from_parse_error(error) from None


def read_head(sock: socket.socket, buffered: bytes, timeout: float) -> tuple[bytes, bytes]:
    """(head, bytes after it): at most 16 KiB within `timeout` seconds (else 431/408)."""
    buf = buffered
    deadline = time.monotonic() + timeout
    scanned = pieces = 0
    while True:
        try:
            end = http.find_head_end(buf, scanned)
        except http.HeadError as error:
            raise from_parse_error(error) from None
        scanned = len(buf)
        if end > 0:
            if end > http.MAX_HEAD_BYTES:
                break
            return buf[:end], buf[end:]
        if len(buf) > http.MAX_HEAD_BYTES:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refusal.answer_http(408, f"no complete request head within {timeout:g} s")
        sock.settimeout(remaining)
        try:
            data = sock.recv(http.MAX_HEAD_BYTES + 5 - len(buf))
        except socket.timeout:
            raise Refusal.answer_http(408, f"no complete request head within {timeout:g} s") from None
        if not data:
            raise Closed(partial=bool(buf))
        pieces += 1
        if pieces > http.MAX_HEAD_PIECES:
            raise Refusal.answer_http(400, f"request head sent in more than {http.MAX_HEAD_PIECES} pieces")
        buf += data
    raise Refusal.answer_http(431, f"request head larger than {http.MAX_HEAD_BYTES} bytes")
