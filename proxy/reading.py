"""Reading what a client sends before a tunnel opens: the request head (steps 2-3 of
docs/ARCHITECTURE.md) and the TLS ClientHello (step 8), each bounded in size and time.

Deadlines are applied as socket timeouts per read, so the common case (everything in
the first segment) never arms a timer.
"""

from __future__ import annotations

import logging
import time

from gevent import socket

from policy import Status
from proxy.refusal import Refusal, from_parse_error
from wire import http, tls


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
    while True:
        try:
            end = http.find_head_end(buf)
        except http.HeadError as error:
            raise from_parse_error(error) from None
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
        buf += data
    raise Refusal.answer_http(431, f"request head larger than {http.MAX_HEAD_BYTES} bytes")


def read_hello(sock: socket.socket, buffered: bytes, timeout: float) -> tuple[tls.ClientHello | None, bytes]:
    """Step 8: (the ClientHello, every byte read) — or (None, bytes) when the stream does
    not start a TLS handshake. Reads until the parser stops saying NEED_MORE (it never
    does past 16 KiB), so a hello split across segments or records is reassembled.
    Refuses a silent client, one that closes first, and an invalid hello."""
    buf = buffered
    deadline = time.monotonic() + timeout
    while True:
        if buf:
            if not tls.is_tls_start(buf[0]):
                return None, buf
            outcome = tls.parse_client_hello(buf)
            if isinstance(outcome, tls.ClientHello):
                return outcome, buf
            if isinstance(outcome, tls.Invalid):
                raise _invalid(outcome.reason, buf)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refusal(Status.TIMEOUT, f"no TLS ClientHello within {timeout:g} s")
        sock.settimeout(remaining)
        try:
            data = sock.recv(tls.MAX_HELLO_BYTES + 1 - len(buf) if buf else 4096)
        except socket.timeout:
            raise Refusal(Status.TIMEOUT, f"no TLS ClientHello within {timeout:g} s") from None
        if not data:
            if buf:
                raise _invalid("client closed mid-ClientHello", buf)
            raise Refusal(Status.BAD_REQUEST, "client closed before sending a ClientHello", level=logging.DEBUG)
        buf += data


def _invalid(reason: str, data: bytes) -> Refusal:
    return Refusal(Status.BAD_REQUEST, f"invalid TLS ClientHello: {reason}", alert=tls.DECODE_ERROR,
                   version=record_version(data))


def record_version(data: bytes) -> int:
    """The record version a TLS client used (for the alert we answer with)."""
    return int.from_bytes(data[1:3], "big") if len(data) >= 3 else 0x0303

