"""Refusals and the bytes that answer them.

Every request egress-guard refuses, at any step, is one `Refusal`: its status word
(metric label / log action), the reason (the log's `reason`, and the body of an HTTP
answer), and how the client is told. Before the `200 Connection established` that is an
HTTP response (`http`); after it, a TLS alert (`alert`) when the client speaks TLS, or
just the close. The connection handler catches it in one place and answers with
`answer()`. Parser errors become refusals here too (`from_parse_error`), so no other
module translates them.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

from policy import Decision, Status
from wire import tls
from wire.http import ALLOWED_METHODS, HeadError
from wire.message import FramingError

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
# The status word an HTTP refusal is counted under when nothing more specific is known.
_WORDS = {
    400: Status.BAD_REQUEST,
    403: Status.DENIED,
    405: Status.BAD_REQUEST,
    407: Status.AUTH_REQUIRED,
    408: Status.TIMEOUT,
    429: Status.LIMITED,
    431: Status.BAD_REQUEST,
    502: Status.CONNECTION_FAILED,
    503: Status.LIMITED,
    504: Status.CONNECTION_FAILED,
    505: Status.BAD_REQUEST,
}
_HTTP = {Status.AUTH_REQUIRED: 407, Status.DENIED: 403, Status.SNI_MISMATCH: 403}


class Refusal(Exception):
    """A request the proxy refuses: what to record and how to tell the client."""

    def __init__(
        self,
        status: Status,
        reason: str,
        *,
        http: int | None = None,
        alert: int | None = None,
        version: int = 0x0303,
        error: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        level: int = logging.INFO,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.http = http  # the HTTP status, when refused before the 200
        self.alert = alert  # the TLS alert description, when refused inside a TLS handshake
        self.version = version if version >> 8 == 3 else 0x0303  # the alert's record version
        self.error = error  # operator-facing detail for the log (e.g. an errno), never a secret
        self.headers = tuple(headers)
        self.level = level
        self.answered = False  # the client was already told (by the pump)

    @classmethod
    def answer_http(cls, code: int, reason: str, *, error: str | None = None,
                    headers: Sequence[tuple[str, str]] = ()) -> Refusal:
        """A refusal answered with HTTP status `code` (counted under its usual word)."""
        if code == 407:
            headers = (*headers, ("Proxy-Authenticate", REALM))
        return cls(_WORDS[code], reason, http=code, error=error, headers=headers)

    def answer(self, established: bool) -> bytes:
        """The bytes that tell the client: an HTTP response before the 200, a TLS alert
        after it, or nothing."""
        if not established and self.http is not None:
            return response(self.http, self.reason, self.headers)
        if established and self.alert is not None:
            return tls.alert(self.alert, self.version)
        return b""


def from_decision(decision: Decision, *, established: bool = False, in_tls: bool = False,
                  version: int = 0x0303) -> Refusal:
    """The refusal for a policy decision: HTTP before the tunnel opens; inside it, the
    TLS `access_denied` alert (record version `version`) if the client speaks TLS, else
    just the close."""
    if established:
        alert = tls.ACCESS_DENIED if in_tls else None
        return Refusal(decision.status, decision.reason, alert=alert, version=version)
    return Refusal.answer_http(_HTTP.get(decision.status, 403), decision.reason)


def from_parse_error(error: HeadError | FramingError) -> Refusal:
    """A request the parsers refused: its status (400, 405, 431, 505) and message."""
    if isinstance(error, FramingError):
        return Refusal.answer_http(400, str(error))
    headers = [("Allow", ALLOWED_METHODS)] if error.status == 405 else []
    return Refusal.answer_http(error.status, error.message, headers=headers)


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
