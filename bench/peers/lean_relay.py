"""A lean gevent CONNECT relay: the floor of egress-guard's own design on this machine.

Same fixed shape as egress-guard (a StreamServer, one greenlet per connection written in
blocking style, a raw greenlet for the second direction), none of its work (no
authentication, policy, SNI check, logging or metrics), and the I/O done the lean way:
the accepted socket's own object and watchers, every operation tried before waiting,
the upstream made with a non-blocking connect and two watchers of its own, no timer
anywhere. `make bench` runs it as the peer `lean-relay`; what egress-guard spends above
it is the cost of its checks and records.

Loopback targets only (127.0.0.0/8, ::1); anything else gets 502.

    PROXY_PORT=19014 python bench/peers/lean_relay.py
"""

from gevent import monkey

monkey.patch_all()

import _socket  # noqa: E402
import errno  # noqa: E402
import ipaddress  # noqa: E402
import os  # noqa: E402

import gevent  # noqa: E402
from gevent.hub import Waiter, get_hub  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

HUB = get_hub()
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
BAD = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Side:
    """A raw non-blocking socket with its two watchers."""

    __slots__ = ("sock", "rd", "wr")

    def __init__(self, sock, rd=None, wr=None):
        self.sock = sock
        if rd is None:
            rd, wr = HUB.loop.io(sock.fileno(), 1), HUB.loop.io(sock.fileno(), 2)
        self.rd, self.wr = rd, wr

    def read(self, size=65536):
        while True:
            try:
                return self.sock.recv(size)
            except BlockingIOError:
                HUB.wait(self.rd)

    def read_head(self):
        """(request head, bytes after it), or None if the client left or sent too much."""
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return buf[:end], buf[end + 4:]
            data = self.read(16384)
            if not data or len(buf) > 16384:
                return None
            buf += data

    def write(self, data):
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                HUB.wait(self.wr)


def forward(src, dst):
    """Copy src -> dst until EOF; pass the half-close on, or end both on an error."""
    try:
        while True:
            data = src.read()
            if not data:
                break
            dst.write(data)
        dst.sock.shutdown(_socket.SHUT_WR)
    except OSError:
        for side in (src, dst):
            try:
                side.sock.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass


def forward_then_wake(src, dst, waiter):
    try:
        forward(src, dst)
    finally:
        HUB.loop.run_callback(waiter.switch, None)


def target_of(head):
    line = head.split(b"\r\n", 1)[0].split(b" ")
    host, _, port = line[1].decode("ascii").rpartition(":")
    ip = ipaddress.ip_address(host.strip("[]"))
    if not ip.is_loopback:
        raise ValueError("not loopback")
    return ip, int(port)


def handle(wrapped, _address):
    client = Side(wrapped._sock, wrapped._read_event, wrapped._write_event)
    client.sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    received = client.read_head()
    if received is None:
        return
    head, rest = received
    try:
        ip, port = target_of(head)
    except (ValueError, IndexError):
        client.write(BAD)
        return
    sock = _socket.socket(_socket.AF_INET6 if ip.version == 6 else _socket.AF_INET, _socket.SOCK_STREAM)
    sock.setblocking(False)
    upstream = Side(sock)
    try:
        error = sock.connect_ex((str(ip), port))
        if error == errno.EINPROGRESS:
            HUB.wait(upstream.wr)
            error = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if error:
            client.write(BAD)
            return
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        client.write(OK)
        if rest:
            upstream.write(rest)
        waiter = Waiter(HUB)
        gevent.spawn_raw(forward_then_wake, upstream, client, waiter)
        forward(client, upstream)
        waiter.get()
    finally:
        upstream.rd.close()
        upstream.wr.close()
        sock.close()


if __name__ == "__main__":
    server = StreamServer(("127.0.0.1", int(os.environ.get("PROXY_PORT", "19014"))), handle, backlog=4096)
    server.serve_forever()
