"""Following a TLS handshake until it leaves cleartext, so that every ClientHello is judged.

Judging only the first ClientHello is not enough: after a HelloRetryRequest the client
sends a second one, and a client may also pack more handshake messages behind its first.
`FirstFlight` follows both directions of a tunnel from the client's first byte until the
handshake is encrypted, and calls `judge` for every ClientHello the client sends in
cleartext (and with None when the stream does not start with TLS at all). It is pure: the
caller feeds the bytes each side sent (`client()`, `server()`) and forwards what they
return; bytes not yet judged are held back.

The client's stream, in the order the protocol allows it (RFC 8446, RFC 5246):

1. its first byte decides: a handshake record starts TLS, anything else is judged as
   plaintext (`judge(None)`) and nothing more is inspected;
2. the first ClientHello, reassembled across records and reads (capped), then judged;
   handshake data behind it in the same flight is refused;
3. until the server answers: only ChangeCipherSpec (TLS 1.3 compatibility mode), alerts
   and application data (0-RTT early data, encrypted) may follow;
4. after a HelloRetryRequest: exactly one more ClientHello, which must carry the same
   server name as the first and pass the same judgement; then back to 3;
5. after a ServerHello choosing TLS 1.3, every further client handshake record is
   encrypted: the first client application-data record ends the inspection, a
   cleartext handshake record is refused;
6. after a ServerHello choosing TLS 1.2 or older, the client's cleartext handshake
   messages (Certificate, ClientKeyExchange...) pass, a ClientHello among them is
   refused, and its ChangeCipherSpec ends the inspection (its Finished is encrypted).

The server's stream is read only until its ServerHello (or HelloRetryRequest): its
first handshake message says which of 4-6 applies. A server whose first answer is not a
TLS handshake is not a TLS server (it cannot pick a certificate by server name): the
inspection ends and the bytes flow as they are.

Work is bounded: every byte is examined once, and a ClientHello may span at most
`MAX_HELLO_RECORDS` records and `MAX_HELLO_PIECES` reads; the whole inspection at most
`MAX_FLIGHT_RECORDS` client records.
"""

from __future__ import annotations

from collections.abc import Callable

from .tls import (
    ACCESS_DENIED,
    DECODE_ERROR,
    TLS13,
    ClientHello,
    HelloReader,
    Invalid,
    ServerHello,
    parse_one_record,
    parse_server_hello,
)

MAX_HELLO_RECORDS = 64
MAX_HELLO_PIECES = 64
MAX_FLIGHT_RECORDS = 256
MAX_SERVER_HELLO = 65536 + 4  # a HelloRetryRequest cookie may take up to 2**16 - 1 bytes
_MAX_CIPHERTEXT = 2**14 + 2048  # the largest record either side may send (RFC 5246 6.2.3)

_CCS, _ALERT, _HANDSHAKE, _APPLICATION_DATA = 20, 21, 22, 23
_CLIENT_HELLO, _SERVER_HELLO = 1, 2

# Where the client's stream is (the numbers of the module docstring).
FIRST, HELLO, WAIT, RETRY, TLS13_CLIENT, TLS12_CLIENT, DONE = range(7)


class FlightError(Exception):
    """The handshake cannot go on. `alert` is what to tell the client (None: just close);
    `denied` marks a refusal of what the client asked (else a broken stream)."""

    def __init__(self, reason: str, *, alert: int | None, denied: bool, server: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert
        self.denied = denied
        self.server = server  # the destination's stream, not the client's, broke the rules


def _denied(reason: str) -> FlightError:
    return FlightError(reason, alert=ACCESS_DENIED, denied=True)


def _invalid(reason: str) -> FlightError:
    return FlightError(f"invalid TLS ClientHello: {reason}", alert=DECODE_ERROR, denied=False)


class FirstFlight:
    """The inspection of one tunnel's handshake; see the module docstring."""

    __slots__ = (
        "judge", "state", "hello", "retried", "version",
        "_held", "_skip", "_records", "_reader", "_fed", "_pieces", "_msg_left", "_msg_head",
        "_following", "_server_done", "_answers",
    )

    def __init__(self, judge: Callable[[ClientHello | None], None]) -> None:
        self.judge = judge  # raises to refuse; None means "not TLS"
        self.state = FIRST
        self.hello: ClientHello | None = None  # the first ClientHello
        self.retried = False  # a HelloRetryRequest was seen
        self.version = 0x0303  # the record version of the first hello, for alerts
        # The client's side.
        self._held = bytearray()  # client bytes not yet released
        self._skip = 0  # payload bytes of an opaque record still to pass
        self._records = 0  # client records seen after the first hello
        self._reader: HelloReader | None = None  # reading a ClientHello at the start of _held
        self._fed = 0  # bytes of _held the reader has seen
        self._pieces = 0  # client() calls while reading this hello
        self._msg_left = 0  # TLS 1.2 client flight: body bytes left of the current message
        self._msg_head = bytearray()  # ...and the header bytes seen of the next one
        # The server's side.
        self._following = False  # a ClientHello went out: read the server's answer
        self._server_done = False
        self._answers: ServerAnswers | None = ServerAnswers()

    @property
    def done(self) -> bool:
        """Nothing more to inspect in either direction: the plain pump may take over."""
        return self.state == DONE and self.server_done

    @property
    def client_done(self) -> bool:
        """The client's bytes need no more inspection."""
        return self.state == DONE

    @property
    def server_done(self) -> bool:
        """The server's bytes need no more reading."""
        return self._server_done or self.state == DONE and not self._following

    @property
    def started(self) -> bool:
        """The client has sent its first byte."""
        return self.state != FIRST

    @property
    def holding(self) -> bool:
        """Client bytes are held back (part of a hello or of a record header)."""
        return bool(self._held)

    # -- the client's bytes ------------------------------------------------------------

    def client(self, data: bytes) -> bytes:
        """Feed bytes the client sent; the bytes that may be forwarded to the server now."""
        held = self._held
        if self.state == DONE:
            if not held:
                return data
            held += data
            return self.release()
        if not data:
            return b""
        if self.state == FIRST:
            if data[0] != _HANDSHAKE:
                self.state = DONE
                self.judge(None)
                return data
            whole = parse_one_record(data)
            if isinstance(whole, ClientHello) and whole.length == len(data):
                # The usual first read: exactly one record holding exactly one hello.
                self.version = whole.record_version
                self.judge(whole)
                self.hello, self.state, self._following = whole, WAIT, True
                return data
            self.state = HELLO
            self._reader, self._fed, self._pieces = HelloReader(), 0, 0
        held += data
        out = bytearray()
        if self._reader is not None:
            self._pieces += 1
            if self._pieces > MAX_HELLO_PIECES:
                raise _invalid(f"ClientHello sent in more than {MAX_HELLO_PIECES} pieces")
        while held and self.state != DONE:
            if self._reader is not None:
                if not self._read_hello(held, out):
                    break
            elif self._skip:
                take = min(self._skip, len(held))
                self._skip -= take
                out += held[:take]
                del held[:take]
            elif not self._record(held, out):
                break
        if self.state == DONE:
            out += held
            held.clear()
        return bytes(out)

    def end(self) -> bytes:
        """Stop inspecting (the caller knows the server is not a TLS server); the bytes
        still held back, which may go now."""
        self.state, self._server_done, self._reader, self._skip = DONE, True, None, 0
        return self.release()

    def release(self) -> bytes:
        """Bytes held back that may go now (the inspection ended from the server's side)."""
        if self.state != DONE:
            return b""
        out = bytes(self._held)
        self._held.clear()
        return out

    def _read_hello(self, held: bytearray, out: bytearray) -> bool:
        """Steps 2 and 4: a ClientHello at the start of `held`; True once it was judged
        and released, False to wait for more bytes."""
        reader = self._reader
        assert reader is not None
        outcome = reader.feed(held[self._fed:])
        self._fed = len(held)
        if reader.records > MAX_HELLO_RECORDS:
            raise _invalid(f"ClientHello spread over more than {MAX_HELLO_RECORDS} records")
        if isinstance(outcome, Invalid):
            raise _invalid(outcome.reason)
        if not isinstance(outcome, ClientHello):
            return False
        self._reader = None
        if reader.trailing:
            # Another handshake message packed behind the hello: before the server has
            # answered, the client has nothing else to say in cleartext.
            raise _denied("handshake data after the ClientHello before the server answered")
        if self.hello is None:
            self.version = outcome.record_version
            self.judge(outcome)
            self.hello = outcome
        else:
            if outcome.sni != self.hello.sni:
                raise _denied(f"second ClientHello names another server: {outcome.sni}")
            self.judge(outcome)
        self.state = WAIT
        self._following = True
        out += held[: outcome.length]
        del held[: outcome.length]
        return True

    def _record(self, held: bytearray, out: bytearray) -> bool:
        """Steps 3, 5 and 6: the client record at the start of `held`, judged by its
        header; True when it was released (or began to be), False to wait for more."""
        if len(held) < 5:
            return False
        kind, length = held[0], (held[3] << 8) | held[4]
        if held[1] != 3 or not 0 < length <= _MAX_CIPHERTEXT:
            raise _invalid("malformed TLS record during the handshake")
        state = self.state
        if kind == _HANDSHAKE and state == RETRY:
            self._reader, self._fed, self._pieces = HelloReader(), 0, 1  # step 4
            return True
        self._records += 1
        if self._records > MAX_FLIGHT_RECORDS:
            raise _denied(f"more than {MAX_FLIGHT_RECORDS} client records before the handshake was encrypted")
        if kind == _HANDSHAKE:
            if state == TLS12_CLIENT:
                return self._tls12_messages(held, out, length)
            if state == TLS13_CLIENT:
                raise _denied("cleartext handshake record after the server chose TLS 1.3")
            raise _denied("handshake record from the client before the server answered "
                          "(only a HelloRetryRequest allows a second ClientHello)")
        if kind == _CCS:
            if state == TLS12_CLIENT:
                self.state = DONE  # step 6: everything after it is encrypted
        elif kind == _APPLICATION_DATA:
            if state == TLS13_CLIENT:
                self.state = DONE  # step 5: the first encrypted record
        elif kind != _ALERT:
            raise _invalid("unknown TLS record type during the handshake")
        out += held[:5]
        del held[:5]
        self._skip = length
        return True

    def _tls12_messages(self, held: bytearray, out: bytearray, length: int) -> bool:
        """Step 6: a cleartext handshake record of a TLS 1.2 client flight. Its messages
        pass by type (never a ClientHello); their bodies are not kept."""
        if len(held) < 5 + length:
            self._records -= 1  # counted when it is whole
            return False
        head = self._msg_head
        p, end = 5, 5 + length
        while p < end:
            if self._msg_left:
                take = min(self._msg_left, end - p)
                self._msg_left -= take
                p += take
                continue
            take = min(4 - len(head), end - p)
            head += held[p : p + take]
            p += take
            if head[0] == _CLIENT_HELLO:
                raise _denied("ClientHello after the server's ServerHello")
            if len(head) == 4:
                self._msg_left = (head[1] << 16) | (head[2] << 8) | head[3]
                head.clear()
        out += held[:end]
        del held[:end]
        return True

    # -- the server's bytes ------------------------------------------------------------

    def server(self, data: bytes) -> bytes:
        """Feed bytes the server sent; returns them (they are forwarded as they are),
        having first updated what the client may send next."""
        if self.server_done or not self._following or not data:
            return data
        answers = self._answers
        assert answers is not None  # until the server is done
        for answer in answers.feed(data):
            if answer is NOT_TLS:
                self._not_tls()
                break
            self._answered(answer)
            if self._server_done:
                break
        if self._server_done:
            self._answers = None  # nothing more to read: let its buffers go
        return data

    def _answered(self, answer: ServerHello) -> None:
        if answer.retry:
            if self.retried:
                raise _server_error("second HelloRetryRequest")
            self.retried = True
            if self.state == WAIT:
                self.state = RETRY
            return
        self._server_done = True
        if self.state in (WAIT, RETRY):
            self.state = TLS13_CLIENT if answer.version >= TLS13 else TLS12_CLIENT

    def _not_tls(self) -> None:
        """The server's answer is not a TLS handshake: stop following both sides. Once
        it has sent a HelloRetryRequest it is a TLS server, and that is a broken stream."""
        if self.retried:
            raise _server_error("a HelloRetryRequest followed by something other than TLS")
        self._server_done = True
        self.state = DONE
        self._skip = 0
        self._reader = None


NOT_TLS = object()  # ServerAnswers: the server's stream is not a TLS handshake


class ServerAnswers:
    """The server's side of a handshake, read as it passes: its records, and the
    handshake messages they carry up to its ServerHellos (a HelloRetryRequest is one)."""

    __slots__ = ("_buf", "_skip", "_messages")

    def __init__(self) -> None:
        self._buf = bytearray()  # bytes of a record not yet whole
        self._skip = 0  # payload bytes of a record passed over
        self._messages = bytearray()  # handshake bytes, up to a whole message

    def feed(self, data: bytes) -> list[ServerHello | object]:
        """What `data` completes: ServerHellos in order, or NOT_TLS (and nothing after)."""
        found: list[ServerHello | object] = []
        buf = self._buf
        buf += data
        while buf:
            if self._skip:
                take = min(self._skip, len(buf))
                self._skip -= take
                del buf[:take]
                continue
            if buf[0] not in (_CCS, _ALERT, _HANDSHAKE) or (len(buf) >= 2 and buf[1] != 3):
                return [*found, NOT_TLS]  # not a TLS server: nothing to follow
            if len(buf) < 5:
                break
            length = (buf[3] << 8) | buf[4]
            if not 0 < length <= _MAX_CIPHERTEXT:
                return [*found, NOT_TLS]
            if buf[0] != _HANDSHAKE:
                del buf[:5]
                self._skip = length  # alerts and compatibility-mode CCS pass
                continue
            if len(buf) < 5 + length:
                break
            self._messages += buf[5 : 5 + length]
            del buf[: 5 + length]
            if self._hellos(found):
                return [*found, NOT_TLS]
        return found

    def _hellos(self, found: list[ServerHello | object]) -> bool:
        """Move the whole handshake messages gathered into `found`; True if one is not
        a ServerHello (a TLS server answers a ClientHello with a ServerHello)."""
        messages = self._messages
        while len(messages) >= 4:
            if messages[0] != _SERVER_HELLO:
                return True
            size = 4 + ((messages[1] << 16) | (messages[2] << 8) | messages[3])
            if size > MAX_SERVER_HELLO:
                raise _server_error("ServerHello too large")
            if len(messages) < size:
                return False
            answer = parse_server_hello(bytes(messages[4:size]))
            del messages[:size]
            if isinstance(answer, Invalid):
                raise _server_error("malformed ServerHello")
            found.append(answer)
        return False


def _server_error(reason: str) -> FlightError:
    return FlightError(f"the destination's handshake cannot be followed: {reason}", alert=None,
                       denied=False, server=True)
