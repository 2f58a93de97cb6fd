"""Refusals and the bytes that answer them.

Every request egress-guard refuses before a tunnel opens is a `Refusal` that knows its
HTTP status and its status word (metric label / log action); `response()` is the one
place that turns a status and a message into bytes on the wire.
"""

from __future__ import annotations

from typing import Iterable, Sequence

REALM = 'Basic realm="egress-guard"'

REASON_PHRASES = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
STATUS_WORDS = {
    400: "bad_request",
    403: "denied",
    405: "bad_request",
    407: "auth_required",
    408: "timeout",
    429: "limited",
    431: "bad_request",
    502: "connection_failed",
    503: "limited",
    504: "connection_failed",
    505: "bad_request",
}


class Refusal(Exception):
    """A request we answer with an HTTP error; knows its status and metric word."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        word: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        error: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.word = word or STATUS_WORDS[status]
        self.headers = tuple(headers)
        self.error = error  # operator-facing detail for the log (e.g. an errno), never a secret


def response(status: int, message: str = "", headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 response; refusals carry a one-line text body."""
    lines = [f"HTTP/1.1 {status} {REASON_PHRASES[status]}"]
    if status == 200:
        lines.append("")
        lines.append("")
        return "\r\n".join(lines).encode("latin-1")
    body = f"egress-guard: {message}\n".encode("utf-8")
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + body


ESTABLISHED = response(200)


def auth_required(message: str) -> Refusal:
    return Refusal(407, message, headers=[("Proxy-Authenticate", REALM)])
