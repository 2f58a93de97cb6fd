"""A plain-HTTP origin for the forwarding tests that records exactly what reached it.

Raw sockets and one thread per connection, so the tests can see the request head byte
for byte and count connections (a refused request must not even open one). One request
per connection, as egress-guard sends `Connection: close`.

Routes (by path, any method):
  /big-chunked?n=N   N bytes of PATTERN, chunked in 64 KiB pieces
  /slow-chunked      a chunk "first;", then waits for `release` before "second;"
  /close             a body delimited by closing the connection
  /hop               a response carrying hop-by-hop fields that must not reach the client
  /garbage           a response that is not HTTP
  /reject-early      413 before reading the request body
  /silent            no response at all (until `release` or 10 s)
  anything else      200 with a JSON description of what was received
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

PATTERN = bytes(range(256)) * 256  # 64 KiB


def pattern_bytes(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


@dataclass
class Received:
    head: bytes
    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body_length: int = 0
    body_sha256: str = ""

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Origin:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.accepted = 0
        self.requests: list[Received] = []
        self.cut_off: list[str] = []  # paths of requests whose connection closed mid-body
        self.started: list[str] = []  # paths of request heads received (body or not)
        self.release = threading.Event()
        self.closing = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.closing = True
        self.listener.close()

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        try:
            with conn:
                self._exchange(conn)
        except OSError:
            pass

    def _exchange(self, conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        end = buf.index(b"\r\n\r\n") + 4
        head, rest = buf[:end], buf[end:]
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        received = Received(head, method, target, headers)
        path = urlsplit(target).path
        with self.lock:
            self.started.append(path)
        if path == "/reject-early":  # answer without reading the body, as a server refusing an upload does
            with self.lock:
                self.requests.append(received)
            conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
            return
        if path == "/silent":  # read the request, never answer
            self.release.wait(10)
            return
        if any(v.lower() == "100-continue" for v in received.get("Expect")):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        digest = hashlib.sha256()
        try:
            for piece in self._body(conn, received, rest):
                digest.update(piece)
                received.body_length += len(piece)
        except OSError:
            with self.lock:
                self.cut_off.append(path)
            raise
        received.body_sha256 = digest.hexdigest()
        with self.lock:
            self.requests.append(received)
        self._respond(conn, received)

    @staticmethod
    def _body(conn: socket.socket, received: Received, rest: bytes):
        def more() -> bytes:
            data = conn.recv(65536)
            if not data:
                raise OSError("closed mid-body")
            return data

        if received.get("Content-Length"):
            remaining = int(received.get("Content-Length")[0])
            while remaining:
                if not rest:
                    rest = more()
                piece, rest = rest[:remaining], rest[remaining:]
                remaining -= len(piece)
                yield piece
        elif received.get("Transfer-Encoding"):
            buf = rest
            while True:
                while b"\r\n" not in buf:
                    buf += more()
                line, buf = buf.split(b"\r\n", 1)
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while not (buf.startswith(b"\r\n") or b"\r\n\r\n" in buf):
                        buf += more()
                    return
                while len(buf) < size + 2:
                    buf += more()
                yield buf[:size]
                buf = buf[size + 2:]

    def _respond(self, conn: socket.socket, received: Received) -> None:
        url = urlsplit(received.target)
        query = parse_qs(url.query)
        if url.path == "/big-chunked":
            n = int(query["n"][0])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            if received.method != "HEAD":
                data = pattern_bytes(n)
                for start in range(0, n, 65536):
                    piece = data[start:start + 65536]
                    conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                conn.sendall(b"0\r\nX-Checksum: done\r\n\r\n")
            return
        if url.path == "/slow-chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst;\r\n")
            self.release.wait(10)
            conn.sendall(b"7\r\nsecond;\r\n0\r\n\r\n")
            return
        if url.path == "/close":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                         b"until the origin closes")
            return
        if url.path == "/hop":
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n"
                         b"X-Hop: origin-private\r\nProxy-Authenticate: Basic realm=origin\r\n"
                         b"X-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok")
            return
        if url.path == "/garbage":
            conn.sendall(b"this is not an HTTP response\r\n\r\n")
            return
        body = json.dumps({
            "method": received.method, "target": received.target,
            "body_length": received.body_length, "body_sha256": received.body_sha256,
        }).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        if received.method != "HEAD":
            conn.sendall(body)
