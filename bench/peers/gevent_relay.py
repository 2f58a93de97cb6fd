"""A naive gevent CONNECT relay: the floor of this design on this machine.

No authentication, no policy, no SNI check, no logging, no metrics: read the request
head, dial the target, answer 200, pump both ways with recv/sendall. It is what the
issue's reference row "a naive gevent relay" measured. bench/run.py runs it as the peer
`gevent-relay` so each run shows how much of egress-guard's per-tunnel cost is its own
work and how much is gevent + the kernel.

Loopback only: it refuses any CONNECT target that is not a 127.0.0.0/8 or ::1 address.

    PROXY_PORT=19012 python bench/peers/gevent_relay.py
"""

from gevent import monkey

monkey.patch_all()

import ipaddress  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

CHUNK = 65536


def pump(src, dst):
    try:
        while True:
            data = src.recv(CHUNK)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def handle(client, _address):
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = b""
    while b"\r\n\r\n" not in head:
        data = client.recv(4096)
        if not data or len(head) > 16384:
            return
        head += data
    head, _, rest = head.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) != 3 or parts[0] != b"CONNECT":
        client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        return
    host, _, port = parts[1].decode("latin-1").rpartition(":")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        if not ip.is_loopback:
            raise ValueError("not loopback")
        # not create_connection(): its getaddrinfo() would cost a trip through gevent's
        # resolver thread pool even for a numeric address
        upstream = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        upstream.settimeout(10)
        try:
            upstream.connect((str(ip), int(port)))
        except OSError:
            upstream.close()
            raise
    except (ValueError, OSError):
        client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        return
    upstream.settimeout(None)
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        other = gevent.spawn(pump, upstream, client)
        pump(client, upstream)
        other.join()
    finally:
        upstream.close()


if __name__ == "__main__":
    server = StreamServer(("127.0.0.1", int(os.environ.get("PROXY_PORT", "19012"))), handle, backlog=4096)
    server.max_accept = 1000
    server.serve_forever()
