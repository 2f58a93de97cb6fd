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
from policy.decide import REASON_AUTH_MISSING, REASON_FORBIDDEN_ADDRESS, REASON_NO_ADDRESSES
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

# RFC 9209 error types (the `error` of the Proxy-Status header) an HTTP answer carries
# when nothing more specific is known; dialling, resolving and the address check pass
# their own (`Refusal(kind=...)`).
_KINDS = {
    400: "http_request_error",
    403: "http_request_denied",
    405: "http_request_error",
    407: "http_request_denied",
    408: "http_request_error",
    429: "connection_limit_reached",
    431: "http_request_error",
    502: "destination_unavailable",
    503: "connection_limit_reached",
    504: "http_response_timeout",
    505: "http_request_error",
}
PROXY_NAME = "egress-guard"  # this hop's name in Proxy-Status
MAX_DETAILS = 256  # characters of the reason in Proxy-Status `details`


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
        kind: str | None = None,
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
        self.kind = kind  # the RFC 9209 error type, when more specific than the HTTP status says
        self.answered = False  # the client was already told (by the pump)
        self.inner_http = False  # refused inside the tunnel, where the client speaks HTTP: answer in HTTP

    @classmethod
    def answer_http(cls, code: int, reason: str, *, error: str | None = None,
                    headers: Sequence[tuple[str, str]] = (), kind: str | None = None,
                    level: int = logging.INFO) -> Refusal:
        """A refusal answered with HTTP status `code` (counted under its usual word)."""
        if code == 407:
            headers = (*headers, ("Proxy-Authenticate", REALM))
        return cls(_WORDS[code], reason, http=code, error=error, headers=headers, kind=kind, level=level)

    def answer(self, established: bool) -> bytes:
        """The bytes that tell the client: an HTTP response before the 200, a TLS alert
        after it, an HTTP 403 inside the tunnel to a client that spoke plain HTTP into it,
        or nothing."""
        if not established and self.http is not None:
            return response(self.http, self.reason, self.headers, self.kind)
        if established and self.alert is not None:
            return tls.alert(self.alert, self.version)
        if established and self.inner_http:
            return response(403, self.reason, (), self.kind)
        return b""


def from_decision(decision: Decision, *, established: bool = False, in_tls: bool = False,
                  version: int = 0x0303) -> Refusal:
    """The refusal for a policy decision: HTTP before the tunnel opens; inside it, the
    TLS `access_denied` alert (record version `version`) if the client speaks TLS, else
    just the close."""
    kind = kind_of(decision.reason)
    if established:
        alert = tls.ACCESS_DENIED if in_tls else None
        return Refusal(decision.status, decision.reason, alert=alert, version=version, kind=kind)
    # A client that sent no credentials at all is usually about to retry with them
    # (git, and other libcurl users, wait for the 407 challenge): not worth an INFO line.
    level = logging.DEBUG if decision.reason == REASON_AUTH_MISSING else logging.INFO
    return Refusal.answer_http(_HTTP.get(decision.status, 403), decision.reason, kind=kind, level=level)


def kind_of(reason: str) -> str | None:
    """The RFC 9209 error type of a policy refusal whose HTTP status does not say it."""
    if reason.startswith((REASON_FORBIDDEN_ADDRESS, REASON_NO_ADDRESSES)):
        return "destination_ip_prohibited"
    return None


def from_parse_error(error: HeadError | FramingError) -> Refusal:
    """A request the parsers refused: its status (400, 405, 431, 505) and message."""
    if isinstance(error, FramingError):
        return Refusal.answer_http(400, str(error))
    headers = [("Allow", ALLOWED_METHODS)] if error.status == 405 else []
    return Refusal.answer_http(error.status, error.message, headers=headers)


def response(status: int, message: str = "", headers: Iterable[tuple[str, str]] = (),
             kind: str | None = None) -> bytes:
    """A complete HTTP/1.1 response; refusals carry a one-line text body and an RFC 9209
    `Proxy-Status` header with the error type (`kind`, else the status's usual one) and
    the same reason as the log line."""
    lines = [f"HTTP/1.1 {status} {REASON_PHRASES[status]}"]
    if status == 200:
        lines.append("")
        lines.append("")
        return "\r\n".join(lines).encode("latin-1")
    body = f"egress-guard: {message}\n".encode("utf-8")
    lines.append(f"Proxy-Status: {proxy_status(kind or _KINDS[status], message)}")
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + body


def proxy_status(kind: str, details: str) -> str:
    """The Proxy-Status field value: this hop, the error type and the reason as an
    sf-string (printable ASCII only, `"` and `\\` escaped; anything else becomes `?`),
    bounded in length. A reason never holds a key; it may hold a name the client sent,
    which is why it is made safe here, not trusted."""
    text = details if len(details) <= MAX_DETAILS else details[: MAX_DETAILS - 3] + "..."
    if not (text.isascii() and text.isprintable()):
        text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'{PROXY_NAME}; error={kind}; details="{text}"'


ESTABLISHED = response(200)
