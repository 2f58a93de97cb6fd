"""The TLS listener: TLS from the client to the proxy, and client certificates.

With PROXY_TLS_CERT and PROXY_TLS_KEY set, a second listener (PROXY_TLS_PORT) serves
the same handler inside TLS: the CONNECT request, its Proxy-Authorization and the
tunnel's bytes all travel encrypted between the pod and the proxy (an `https://` proxy
URL). With PROXY_TLS_CLIENT_CA, a client may present a certificate; OpenSSL verifies it
(chain to that CA, validity, key usage for client authentication: the `ssl_client`
purpose a server applies to client certificates), and its names become a credential
(policy/certificates.py, check 1 of policy/decide.py).

The handler keeps its lean shape (proxy/stream.py): the client's `TLSStream` is a
Stream whose `sock` is a `TLSSocket`, an OpenSSL session over memory BIOs in front of
the real non-blocking socket. It answers `recv`/`send` with plaintext and raises
`BlockingIOError` exactly when the real socket would block, so the head reader, the
first-flight inspector and the pump work unchanged, waiting on the real socket's
watchers. What differs:

- splice cannot move bytes through user-space TLS: the pump copies (`Stream.splice`);
- decrypted bytes can be waiting in the session while the socket is quiet, so a wait
  for readability asks `pending()` first (proxy/stream.py `wait_readable`);
- an accepted write may leave ciphertext the kernel had no room for: it is flushed
  from the hub when the socket is writable, and the next write waits for that, so a
  write is never held back and never reordered;
- a half-close is a TLS close_notify (then the TCP half-close), so a client sees the
  end of the server's stream as a clean end, not a truncation.

The certificate and key (and the client CA bundle) are re-read when their files change
(`ServerTLS.watch`): new handshakes use the new context, open connections keep theirs,
and a pair that does not load keeps the old one in force (logged and counted).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import ssl
from typing import Any

import gevent

from policy import Status
from policy.certificates import entries_of
from proxy.deadlines import Deadline, Sweeper
from proxy.flow import Flow
from proxy.reading import Closed
from proxy.refusal import Refusal, response
from proxy.reload import FileState, file_state
from proxy.stream import WRITE, Stream, hub

CHUNK = 65536
MAX_PENDING = 1 << 20  # ciphertext held for a client that does not read (see TLSSocket.queue)

# OpenSSL's reasons for the failures an operator sees most, in words.
_LOAD_REASONS = {
    "KEY_VALUES_MISMATCH": "the private key does not belong to the certificate",
    "NO_START_LINE": "not a PEM file (no '-----BEGIN' line)",
    "PEM_LIB": "not a valid PEM certificate or key",
    "CA_MD_TOO_WEAK": "the certificate is signed with a digest OpenSSL refuses (e.g. SHA-1)",
    "EE_KEY_TOO_SMALL": "the key is too small for OpenSSL's security level",
}


# OpenSSL's reasons for a handshake that began with an HTTP request line instead.
_PLAINTEXT = frozenset({"HTTP_REQUEST", "HTTPS_PROXY_REQUEST"})


class TLSConfigError(Exception):
    """A certificate, key or CA bundle that cannot be used; str() says which and why."""


def build_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """The listener's context: TLS 1.2 and later, the `ssl` module's secure defaults
    (no compression, server cipher preference, no renegotiation), ALPN http/1.1, and
    with `client_ca` an optional client certificate verified against it."""
    for variable, path in (("PROXY_TLS_CERT", cert), ("PROXY_TLS_KEY", key), ("PROXY_TLS_CLIENT_CA", client_ca)):
        if path and not os.path.isfile(path):
            raise TLSConfigError(f"{variable}={path}: " + ("no such file" if not os.path.exists(path)
                                                           else "not a regular file"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError, TypeError) as error:
        raise TLSConfigError(f"PROXY_TLS_CERT={cert}, PROXY_TLS_KEY={key}: {_why(error)}") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as error:
            raise TLSConfigError(f"PROXY_TLS_CLIENT_CA={client_ca}: {_why(error)}") from None
        if not context.cert_store_stats().get("x509_ca"):
            raise TLSConfigError(f"PROXY_TLS_CLIENT_CA={client_ca}: no CA certificate in it")
        context.verify_mode = ssl.CERT_OPTIONAL
    context.set_alpn_protocols(["http/1.1"])
    return context


def _no_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("the private key is encrypted; give an unencrypted key (a Kubernetes Secret protects it)")


def _why(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        reason = error.reason or ""
        return _LOAD_REASONS.get(reason, reason.replace("_", " ").lower() or str(error))
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


class ServerTLS:
    """The TLS listener's context, rebuilt when its files change."""

    def __init__(self, cert: str, key: str, client_ca: str, metrics: Any, logger: logging.Logger) -> None:
        self.paths = (cert, key, client_ca)
        self.metrics, self.log = metrics, logger
        self.states = self._states()
        self.context = build_context(*self.paths)  # TLSConfigError: a startup error
        self.digest = _digest(self.paths)

    @property
    def client_certificates(self) -> bool:
        return bool(self.paths[2])

    def _states(self) -> tuple[FileState | None, ...]:
        return tuple(file_state(path) if path else None for path in self.paths)

    def watch(self, interval: float) -> None:
        while True:
            gevent.sleep(interval)
            self.check()

    def check(self) -> bool:
        """Reload if any file changed since it was last read; True if a new context is
        in force. Rotation by a Secret's `..data` swap changes every file at once; an
        edit of one file at a time may pass through a pair that does not load, which
        is reported and retried when the files change again."""
        states = self._states()
        if states == self.states:
            return False
        self.states = states
        digest = _digest(self.paths)
        if digest == self.digest:
            return False  # touched, or rewritten with the same content
        try:
            context = build_context(*self.paths)
        except TLSConfigError as error:
            self.metrics.tls_load_errors.inc()
            self.log.error("cannot load the TLS listener's new certificate; the one in force stays",
                           extra={"error": str(error)})
            return False
        self.context, self.digest = context, digest
        self.metrics.tls_reloads.inc()
        self.log.info("TLS certificate reloaded", extra={"certificate": _digest(self.paths[:1]),
                                                          "client_ca": self.paths[2] or None})
        return True


def _digest(paths: tuple[str, ...]) -> str:
    """A short digest of the files' contents, to tell versions apart (in logs, too: it
    is a hash of the certificate file, never of the key alone)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError:
            digest.update(b"\0missing\0")
        digest.update(b"\0")
    return digest.hexdigest()[:12]


class TLSSocket:
    """One server-side TLS session over a non-blocking socket, with the socket's
    `recv`/`send`/`shutdown` contract for plaintext (see the module docstring)."""

    __slots__ = ("raw", "obj", "incoming", "outgoing", "out", "plain", "eof", "flusher", "shut", "failed")

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        self.raw = raw
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.out = b""  # ciphertext accepted but not yet taken by the kernel
        self.plain = b""  # plaintext decrypted ahead by pending()
        self.eof = False  # the client's stream ended (close_notify, or TCP EOF)
        self.flusher: Any = None  # io watcher flushing `out` from the hub
        self.shut = False  # shut the TCP write side once `out` is flushed
        self.failed: OSError | None = None  # a write error met by the hub's flush

    def fileno(self) -> int:
        return self.raw.fileno()

    # -- reading

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes of plaintext; b"" at the end; BlockingIOError if none yet."""
        plain = self.plain
        if plain:
            self.plain = plain[size:]
            return plain[:size]
        if self.eof:
            return b""
        obj = self.obj
        while True:
            try:
                return obj.read(size)
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True
                return b""
            if self.outgoing.pending:
                self.queue()  # what reading made OpenSSL write (a KeyUpdate answer)
            data = self.raw.recv(CHUNK)  # BlockingIOError: nothing to read yet
            if data:
                self.incoming.write(data)
            else:
                self.incoming.write_eof()

    def pending(self) -> bool:
        """Is there plaintext (or the end) to read without waiting for the socket?"""
        if self.plain or self.eof or self.obj.pending():
            return True
        if not self.incoming.pending:
            return False
        try:
            self.plain = self.obj.read(CHUNK)
        except ssl.SSLWantReadError:
            return False  # a record not complete yet: wait for the rest
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self.eof = True
        except ssl.SSLError:
            return True  # the next recv raises it
        return True

    # -- writing

    def send(self, data: bytes | memoryview) -> int:
        """Encrypt and send all of `data` (returns its length), or accept none of it
        (BlockingIOError) while an earlier write is still being flushed."""
        if self.failed is not None:
            raise self.failed
        if self.out:
            self.flush()
            if self.out:
                raise BlockingIOError(11, "previous TLS record still being flushed")
        self.obj.write(data)
        self.queue()
        return len(data)

    def queue(self) -> None:
        """Send what OpenSSL wrote; what the kernel cannot take now is flushed from the hub.

        A write adds one record's worth at most (send() refuses while `out` is pending),
        but reading can make OpenSSL answer the client (a KeyUpdate that requests one):
        a client that floods such messages and never reads would grow `out` without
        bound, so past MAX_PENDING the connection fails instead."""
        self.out += self.outgoing.read()
        self.flush()
        if len(self.out) > MAX_PENDING:
            self.out = b""
            raise ConnectionAbortedError(errno.ENOBUFS, "the client does not read what its TLS session must answer")
        if self.out and self.flusher is None:
            self.flusher = hub().loop.io(self.raw.fileno(), WRITE)
        if self.out and not self.flusher.active:
            self.flusher.start(self._flush_later)

    def flush(self) -> None:
        out = self.out
        if out:
            try:
                sent = self.raw.send(out)
            except BlockingIOError:
                return
            self.out = out[sent:]
        if not self.out and self.shut:
            self.shut = False
            self.raw.shutdown(socket.SHUT_WR)

    def _flush_later(self) -> None:
        try:
            self.flush()
        except OSError as error:
            self.failed, self.out = error, b""
        if not self.out:
            self.flusher.stop()

    def shutdown(self, how: int) -> None:
        """SHUT_WR: close_notify, then the TCP half-close once it is sent; reading goes on.
        SHUT_RD / SHUT_RDWR: the socket's own (to end blocked reads at once)."""
        if how != socket.SHUT_WR:
            self.raw.shutdown(how)
            return
        self._drain()
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is written; the client's own may come later
        except ssl.SSLError:
            pass  # the session failed already: just the TCP half-close
        self.shut = True
        self.queue()

    def _drain(self) -> None:
        """Decrypt every complete record already received into `plain`: unwrap() reads
        the client's close_notify from the same buffer and would drop data before it."""
        while self.incoming.pending and not self.eof:
            try:
                data = self.obj.read(CHUNK)
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self.eof = True
                return
            except ssl.SSLError:
                return
            self.plain += data

    def close(self) -> None:
        if self.flusher is not None:
            self.flusher.stop()
            self.flusher.close()
            self.flusher = None
        if self.out:
            try:
                self.raw.send(self.out)  # one try: the peer may be gone
            except OSError:
                pass
        self.raw.close()


class TLSStream(Stream):
    """The client's Stream on the TLS listener (`sock` is its TLSSocket)."""

    __slots__ = ("certificate",)
    tls = True
    splice = False

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(raw)
        self.sock = TLSSocket(raw, context)  # type: ignore[assignment]
        self.certificate: tuple[str, ...] = ()  # the verified client certificate's entries

    def to_gevent(self) -> Any:
        return BlockingTLS(self)


class BlockingTLS:
    """A TLSStream with the blocking, timeout-taking subset of a gevent socket that the
    plain-HTTP path (proxy/forward.py) uses."""

    def __init__(self, stream: TLSStream) -> None:
        self.stream = stream
        self.timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def fileno(self) -> int:
        return self.stream.fileno()

    def pending(self) -> bool:
        return self.stream.sock.pending()

    def recv(self, size: int) -> bytes:
        sock = self.stream.sock
        while True:
            try:
                return sock.recv(size)
            except BlockingIOError:
                self._wait(self.stream.readable)

    def sendall(self, data: bytes | memoryview) -> None:
        sock = self.stream.sock
        while True:
            try:
                sock.send(data)
                return
            except BlockingIOError:
                self._wait(self.stream.writable)

    def _wait(self, watcher: Any) -> None:
        if not self.timeout:
            hub().wait(watcher)
            return
        with gevent.Timeout(self.timeout, socket.timeout("timed out")):
            hub().wait(watcher)

    def shutdown(self, how: int) -> None:
        self.stream.sock.shutdown(how)

    def close(self) -> None:
        self.stream.close()


def handshake_failure(error: ssl.SSLError) -> str:
    """Why a client's TLS handshake failed, for the log line (OpenSSL's reason, in words)."""
    reason = (error.reason or "").replace("_", " ").lower()
    if error.reason in _PLAINTEXT:
        return "the client sent a plain-HTTP request to the TLS port (use an https:// proxy URL)"
    verify = getattr(error, "verify_message", None)
    if verify:
        return f"client certificate rejected: {verify}"
    return reason or str(error)


def handshake(stream: TLSStream, flow: Flow, sweeper: Sweeper, timeout: float) -> None:
    """Complete the server side of the client's TLS handshake, within `timeout` seconds
    of the first wait (HEADER_TIMEOUT; the request head then has its own), and note
    the verified client certificate's entries on the stream. A failure is a Refusal
    (`bad_request`, nothing to answer: there is no session to answer in); a client that
    connects and leaves without a byte is `Closed`, as on the plaintext listener."""
    sock = stream.sock
    obj, raw = sock.obj, sock.raw
    armed = seen = False
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as error:
                sock.queue()  # the alert OpenSSL wrote for the client
                if error.reason in _PLAINTEXT:
                    # A plaintext request on the TLS port: say so in the protocol it speaks.
                    try:
                        raw.send(response(400, "this port speaks TLS: use an https:// proxy URL"))
                    except OSError:
                        pass
                raise Refusal(Status.BAD_REQUEST, f"TLS handshake failed: {handshake_failure(error)}") from None
            sock.queue()
            try:
                data = raw.recv(CHUNK)
            except BlockingIOError:
                try:
                    armed = sweeper.wait(flow, stream.readable, timeout, armed)
                except Deadline:
                    raise Refusal(Status.TIMEOUT, f"no complete TLS handshake within {timeout:g} s") from None
                continue
            except OSError as error:
                raise Refusal(Status.BAD_REQUEST, f"TLS handshake failed: {error.strerror or error}",
                              level=logging.DEBUG) from None
            if not data:
                if not seen:
                    raise Closed(partial=False)
                raise Refusal(Status.BAD_REQUEST, "TLS handshake failed: the client closed the connection",
                              level=logging.DEBUG)
            seen = True
            sock.incoming.write(data)
        sock.queue()  # the handshake's last flight, and session tickets
    finally:
        if armed:
            sweeper.disarm(flow)
    stream.certificate = entries_of(obj.getpeercert())
