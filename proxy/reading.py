"""Reading a request head (steps 2-3 of docs/ARCHITECTURE.md), bounded in size and time.
(The ClientHello, step 8, is read by proxy/handshake.py.)

The deadline is the Sweeper's (proxy/deadlines.py), armed only if the head is not
already there: no timer per read.
"""

from __future__ import annotations

from proxy.deadlines import Deadline, Sweeper
from proxy.flow import Flow
from proxy.refusal import Refusal, from_parse_error
from proxy.stream import Stream
from wire import http


class Closed(Exception):
    """The client went away before sending a complete request head."""

    def __init__(self, partial: bool) -> None:
        super().__init__("client closed the connection")
        self.partial = partial


def read_request(client: Stream, buffered: bytes, flow: Flow, sweeper: Sweeper,
                 timeout: float) -> tuple[http.Request, bytes]:
    """Steps 2-3: the parsed request head and the bytes after it."""
    head, rest = read_head(client, buffered, flow, sweeper, timeout)
    try:
        return http.parse_head(head), rest
    except http.HeadError as error:
        raise from_parse_error(error) from None


def read_head(client: Stream, buffered: bytes, flow: Flow, sweeper: Sweeper, timeout: float) -> tuple[bytes, bytes]:
    """(head, bytes after it): at most 16 KiB in at most MAX_HEAD_PIECES reads, within
    `timeout` seconds of the first wait (else 431/400/408). The common case, the whole head
    already there, neither waits nor arms a deadline."""
    buf = buffered
    scanned = pieces = 0
    armed = False
    recv = client.sock.recv
    try:
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
            try:
                data = recv(http.MAX_HEAD_BYTES + 5 - len(buf))
            except BlockingIOError:
                try:
                    armed = sweeper.wait(flow, client.readable, timeout, armed)
                except Deadline:
                    raise Refusal.answer_http(408, f"no complete request head within {timeout:g} s") from None
                continue
            if not data:
                raise Closed(partial=bool(buf))
            pieces += 1
            if pieces > http.MAX_HEAD_PIECES:
                raise Refusal.answer_http(400, f"request head sent in more than {http.MAX_HEAD_PIECES} pieces")
            buf += data
    finally:
        if armed:
            sweeper.disarm(flow)
    raise Refusal.answer_http(431, f"request head larger than {http.MAX_HEAD_BYTES} bytes")
