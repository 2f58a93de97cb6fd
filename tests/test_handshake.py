"""The first-flight inspector (wire/handshake.py) between a real OpenSSL client and a real
OpenSSL server (Python `ssl` over memory BIOs): every ClientHello judged, the handshake
followed until it is encrypted, and the bypasses of the second round refused.

The server records every server name its SNI callback sees, so a test can prove that a
name the inspector refused never reached a TLS stack.
"""

from __future__ import annotations

import ssl
import sys

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire.handshake import (
    DONE,
    MAX_HELLO_PIECES,
    MAX_HELLO_RECORDS,
    TLS12_CLIENT,
    TLS13_CLIENT,
    FirstFlight,
    FlightError,
)
from wire.tls import ACCESS_DENIED, DECODE_ERROR, ClientHello, HelloReader

CA = trustme.CA()
CERT = CA.issue_cert("api.example.com", "www.example.com", "other.example.com")
NAME, SAME_LENGTH_OTHER = b"api.example.com", b"www.example.com"


def server_context(*, retry: bool = False, maximum: ssl.TLSVersion | None = None) -> tuple[ssl.SSLContext, list]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    CERT.configure_cert(context)
    if retry:
        # The client key-shares X25519; a server that takes only P-384 asks again (HRR).
        context.set_ecdh_curve("secp384r1")
    if maximum is not None:
        context.maximum_version = maximum
    seen: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: seen.append(name)
    return context, seen


def client_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CA.configure_trust(context)
    if maximum is not None:
        context.maximum_version = maximum
    return context


class Pair:
    """An OpenSSL client and server whose bytes cross through a FirstFlight."""

    def __init__(self, *, retry: bool = False, maximum: ssl.TLSVersion | None = None, sni: str = "api.example.com"):
        server_ctx, self.seen = server_context(retry=retry, maximum=maximum)
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_context(maximum).wrap_bio(self.c_in, self.c_out, server_hostname=sni)
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        self.judged: list[str | None] = []
        self.flight = FirstFlight(self.judge)
        self.refuse: set[str] = set()

    def judge(self, hello: ClientHello | None) -> None:
        self.judged.append(hello.sni if hello is not None else "<plaintext>")
        if hello is not None and hello.sni in self.refuse:
            raise PermissionError(hello.sni)

    def step(self, obj: ssl.SSLObject) -> None:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass

    def client_bytes(self, tamper=None) -> bytes:
        self.step(self.client)
        data = self.c_out.read()
        return tamper(data) if tamper else data

    def to_server(self, data: bytes) -> None:
        self.s_in.write(self.flight.client(data))

    def to_client(self) -> None:
        self.step(self.server)
        data = self.s_out.read()
        if data:
            self.c_in.write(self.flight.server(data))

    def handshake(self, rounds: int = 8, tamper=None) -> None:
        for _ in range(rounds):
            data = self.client_bytes(tamper)
            if data:
                self.to_server(data)
            self.to_client()

    def talk(self) -> bytes:
        self.client.write(b"hello through")
        self.to_server(self.c_out.read())
        return self.server.read(64)


@pytest.mark.parametrize("maximum,state", [(ssl.TLSVersion.TLSv1_3, TLS13_CLIENT), (ssl.TLSVersion.TLSv1_2, TLS12_CLIENT)],
                         ids=["tls1.3", "tls1.2"])
def test_a_real_handshake_is_followed_to_its_end(maximum: ssl.TLSVersion, state: int) -> None:
    pair = Pair(maximum=maximum)
    pair.handshake()
    assert pair.talk() == b"hello through"
    assert pair.judged == ["api.example.com"] and pair.seen == ["api.example.com"]
    assert pair.flight.done and pair.flight.state == DONE and not pair.flight.retried


def test_a_legitimate_hello_retry_request_is_judged_twice_and_works() -> None:
    pair = Pair(retry=True)
    pair.handshake()
    assert pair.talk() == b"hello through"
    assert pair.flight.retried
    assert pair.judged == ["api.example.com", "api.example.com"]
    assert pair.seen == ["api.example.com", "api.example.com"]


def test_hello_retry_second_hello_for_another_name_is_refused() -> None:
    pair = Pair(retry=True)
    pair.to_server(pair.client_bytes())
    pair.to_client()  # the HelloRetryRequest
    assert pair.flight.retried
    second = pair.client_bytes(lambda data: data.replace(NAME, SAME_LENGTH_OTHER))
    with pytest.raises(FlightError) as caught:
        pair.to_server(second)
    assert caught.value.denied and caught.value.alert == ACCESS_DENIED
    assert "second ClientHello names another server: www.example.com" in caught.value.reason
    assert pair.seen == ["api.example.com"], "the other name reached the server"


def test_without_the_inspector_the_server_would_serve_the_other_name() -> None:
    """The attack is real: OpenSSL takes the second hello's name (what the fix stops)."""
    pair = Pair(retry=True)
    pair.s_in.write(pair.client_bytes())
    pair.step(pair.server)
    pair.c_in.write(pair.s_out.read())
    pair.s_in.write(pair.client_bytes(lambda data: data.replace(NAME, SAME_LENGTH_OTHER)))
    pair.step(pair.server)
    assert pair.seen == ["api.example.com", "www.example.com"]


def test_a_second_hello_of_the_same_name_must_pass_the_judge_again() -> None:
    pair = Pair(retry=True)
    pair.to_server(pair.client_bytes())
    pair.to_client()
    pair.refuse.add("api.example.com")  # e.g. a reload in between
    with pytest.raises(PermissionError):
        pair.to_server(pair.client_bytes())
    assert pair.seen == ["api.example.com"]


def test_a_second_hello_right_behind_the_first_is_refused() -> None:
    pair = Pair()
    first = pair.client_bytes()
    other = Pair(sni="www.example.com").client_bytes()
    with pytest.raises(FlightError) as caught:
        pair.to_server(first + other)
    assert caught.value.denied and "before the server answered" in caught.value.reason
    # The first hello was judged and released; the second never was.
    assert pair.judged == ["api.example.com"]


def test_a_second_hello_inside_the_first_hello_record_is_refused() -> None:
    first = Pair().client_bytes()
    other = Pair(sni="www.example.com").client_bytes()
    # One record holding both handshake messages.
    payload = first[5:] + other[5:]
    record = first[:3] + len(payload).to_bytes(2, "big") + payload
    flight = FirstFlight(lambda hello: None)
    with pytest.raises(FlightError) as caught:
        flight.client(record)
    assert caught.value.denied and "after the ClientHello" in caught.value.reason


def test_compatibility_ccs_and_early_data_may_follow_the_hello() -> None:
    flight = FirstFlight(lambda hello: None)
    hello = Pair().client_bytes()
    ccs = bytes.fromhex("140303000101")
    early = b"\x17\x03\x03\x00\x10" + bytes(16)
    assert flight.client(hello + ccs + early[:7]) == hello + ccs + early[:7]
    assert flight.client(early[7:]) == early[7:]
    assert not flight.done


def test_cleartext_handshake_after_a_tls13_server_hello_is_refused() -> None:
    pair = Pair()
    pair.to_server(pair.client_bytes())
    pair.to_client()
    assert pair.flight.state == TLS13_CLIENT
    other = Pair(sni="www.example.com").client_bytes()
    with pytest.raises(FlightError) as caught:
        pair.to_server(other)
    assert caught.value.denied and "TLS 1.3" in caught.value.reason


def test_a_hello_in_a_tls12_client_flight_is_refused() -> None:
    pair = Pair(maximum=ssl.TLSVersion.TLSv1_2)
    pair.to_server(pair.client_bytes())
    pair.to_client()
    assert pair.flight.state == TLS12_CLIENT
    other = Pair(sni="www.example.com").client_bytes()
    with pytest.raises(FlightError) as caught:
        pair.to_server(other)
    assert caught.value.denied and "after the server's ServerHello" in caught.value.reason


def test_a_server_that_is_not_tls_ends_the_inspection() -> None:
    # An echo server sends the hello back: not a ServerHello, so not a TLS server.
    flight = FirstFlight(lambda hello: None)
    hello = Pair().client_bytes()
    assert flight.client(hello) == hello
    assert flight.server(hello) == hello
    assert flight.done
    assert flight.client(b"anything") == b"anything"


def test_plaintext_is_judged_once_and_passes() -> None:
    judged = []
    flight = FirstFlight(judged.append)
    assert flight.client(b"SELECT 1;\n") == b"SELECT 1;\n"
    assert judged == [None] and flight.done
    assert flight.client(b"\x16\x03\x01") == b"\x16\x03\x01"  # nothing more is inspected


def test_an_invalid_hello_is_a_decode_error() -> None:
    flight = FirstFlight(lambda hello: None)
    with pytest.raises(FlightError) as caught:
        flight.client(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")
    assert not caught.value.denied and caught.value.alert == DECODE_ERROR


def test_a_hello_in_too_many_pieces_is_refused() -> None:
    hello = Pair().client_bytes()
    flight = FirstFlight(lambda hello: None)
    with pytest.raises(FlightError) as caught:
        for byte in range(len(hello)):
            flight.client(hello[byte:byte + 1])
    assert f"more than {MAX_HELLO_PIECES} pieces" in caught.value.reason


def test_a_hello_in_too_many_records_is_refused() -> None:
    hello = Pair().client_bytes()
    flight = FirstFlight(lambda hello: None)
    with pytest.raises(FlightError) as caught:
        flight.client(reframe(hello, [4] * 200))
    assert f"more than {MAX_HELLO_RECORDS} records" in caught.value.reason


def test_a_second_hello_retry_request_is_a_broken_server() -> None:
    pair = Pair(retry=True)
    pair.to_server(pair.client_bytes())
    pair.step(pair.server)
    retry = pair.s_out.read()
    pair.c_in.write(pair.flight.server(retry))
    pair.to_server(pair.client_bytes())  # the second hello, same name: judged and passed
    with pytest.raises(FlightError) as caught:
        pair.flight.server(retry)
    assert caught.value.server and "second HelloRetryRequest" in caught.value.reason


def reframe(data: bytes, sizes: list[int]) -> bytes:
    """Re-frame the handshake bytes of the records in `data` into records of `sizes`
    (repeating the last size)."""
    payload, p = b"", 0
    while p < len(data):
        length = int.from_bytes(data[p + 3:p + 5], "big")
        payload += data[p + 5:p + 5 + length]
        p += 5 + length
    out, p, i = b"", 0, 0
    while p < len(payload):
        size = sizes[min(i, len(sizes) - 1)]
        out += data[:3] + len(payload[p:p + size]).to_bytes(2, "big") + payload[p:p + size]
        p += size
        i += 1
    return out


# -- arbitrary record and segment splits --------------------------------------------------------

HELLOS = {"tls1.3": Pair().client_bytes(), "tls1.2": Pair(maximum=ssl.TLSVersion.TLSv1_2).client_bytes()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_sizes=st.lists(st.integers(1, 600), min_size=1, max_size=8),
       cuts=st.lists(st.integers(1, 700), min_size=1, max_size=12), retry=st.booleans())
def test_fuzz_splits_of_real_handshakes(record_sizes: list[int], cuts: list[int], retry: bool) -> None:
    """Whatever the records and segments, a real handshake either completes with the one
    name judged (and only that name reaching the server), or the hello is refused for the
    caps -- never anything else."""
    pair = Pair(retry=retry)

    def split(data: bytes) -> list[bytes]:
        if data[:1] != b"\x16":
            return [data]
        data = reframe(data, record_sizes) if data[5:6] == b"\x01" else data
        pieces, p, i = [], 0, 0
        while p < len(data):
            size = cuts[i % len(cuts)]
            pieces.append(data[p:p + size])
            p += size
            i += 1
        return pieces

    try:
        for _ in range(8):
            pair.step(pair.client)
            data = pair.c_out.read()
            if data:
                for piece in split(data):
                    pair.to_server(piece)
            pair.to_client()
    except FlightError as error:
        assert not error.denied and ("records" in error.reason or "pieces" in error.reason), error.reason
        return
    assert pair.talk() == b"hello through"
    assert set(pair.judged) == {"api.example.com"} and set(pair.seen) == {"api.example.com"}
    assert len(pair.judged) == (2 if retry else 1)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), server=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_only_documented_outcomes(data: bytes, server: bytes) -> None:
    flight = FirstFlight(lambda hello: None)
    try:
        flight.client(data[: len(data) // 2])
        flight.server(server)
        flight.client(data[len(data) // 2:])
    except FlightError as error:
        assert error.alert in (ACCESS_DENIED, DECODE_ERROR, None)


def lines_executed(feed) -> int:
    """Python lines run by `feed()`: a deterministic measure of work (not a time)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        feed()
    finally:
        sys.settrace(None)
    return count


def test_a_hello_in_one_byte_pieces_and_records_costs_linear_work() -> None:
    """The quadratic-CPU class: each piece is examined once, never the whole buffer again."""
    def cost(pad: int) -> int:
        hello = HELLOS["tls1.3"]
        padded = pad_hello(hello, pad)
        framed = reframe(padded, [1])

        def feed() -> None:
            reader = HelloReader()
            for byte in range(len(framed)):
                outcome = reader.feed(framed[byte:byte + 1])
            assert isinstance(outcome, ClientHello)

        return lines_executed(feed)

    small, large = cost(1000), cost(2000)
    # Work per byte stays flat: twice the bytes, about twice the lines (quadratic would be 4x).
    assert 1.7 < large / small < 2.3, (small, large)


def pad_hello(hello: bytes, size: int) -> bytes:
    """`hello` grown to `size` handshake bytes with an extension of an unassigned type."""
    body = bytearray(hello[9:])
    p = 2 + 32
    p += 1 + body[p]
    p += 2 + int.from_bytes(body[p:p + 2], "big")
    p += 1 + body[p]
    pad = size - len(body) - 4 - 4
    ext = b"\xff\xce" + pad.to_bytes(2, "big") + bytes(pad)
    total = int.from_bytes(body[p:p + 2], "big") + len(ext)
    body[p:p + 2] = total.to_bytes(2, "big")
    body += ext
    message = b"\x01" + len(body).to_bytes(3, "big") + bytes(body)
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def test_an_invalid_hello_in_one_whole_record_is_a_decode_error() -> None:
    """The one-record fast path hands an invalid hello to the same refusal."""
    hello = bytearray(HELLOS["tls1.3"])
    hello[9] = 0x02  # legacy_version 0x0203: not TLS
    flight = FirstFlight(lambda hello: None)
    with pytest.raises(FlightError) as caught:
        flight.client(bytes(hello))
    assert not caught.value.denied and caught.value.alert == DECODE_ERROR
    assert "unsupported client version" in caught.value.reason
