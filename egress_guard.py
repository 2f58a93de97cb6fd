#!/usr/bin/env python3
"""egress-guard: an HTTP CONNECT egress proxy that lets each pod identity reach only
its allowed destinations, and checks the TLS SNI before a byte goes through.

This file is the entry point and the server. It reads top to bottom as the life of a
connection (the numbered steps of docs/ARCHITECTURE.md): `Proxy.handle` accepts it and
reads the request head (steps 1-3), `Proxy.tunnel` takes a CONNECT through admission,
the 200, the ClientHello and the pump (steps 4-10), plain http:// requests go to
`proxy/forward.py`; then draining, the policy watcher and `main`. Around it: `policy/`
decides (pure), `wire/` parses (pure), `proxy/` does the I/O and the records.
"""

if __name__ == "__main__":
    # Before anything imports socket or threading.
    from gevent import monkey

    monkey.patch_all()

import _socket
import errno
import logging
import os
import signal
import sys
from typing import Any, Callable, Sequence

import gevent
from gevent import socket
from gevent.event import Event
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer
from prometheus_client import CollectorRegistry

import policy
from policy import Identity, Policy, PolicyError, Status
from proxy import cli
from proxy.admin import admin_app
from proxy.admission import Admission, apply
from proxy.connections import Connections
from proxy.dial import load_hosts_file, system_resolver
from proxy.flow import Flow
from proxy.forward import forward
from proxy.observe import Metrics, configure_logging
from proxy.handshake import LateFirstBytes, first_flight
from proxy.pump import relay
from proxy.reading import Closed, read_request
from proxy.refusal import ESTABLISHED, Refusal
from proxy.reload import Reloader, file_state
from proxy.settings import Settings, SettingsError
from proxy.status_page import StatusPage
from proxy.stream import Stream
from proxy.tls import ServerTLS, TLSConfigError, TLSStream, handshake
from wire.handshake import FirstFlight
from wire.tls import ClientHello

__version__ = cli.__version__
log = logging.getLogger("egress_guard")


class Listener(StreamServer):
    """gevent's StreamServer (a greenlet per accepted connection, spawned into a pool),
    handing the handler a `Stream` over the accepted socket instead of building a gevent
    socket wrapper for it: the handler works on the real socket (proxy/stream.py), and
    a wrapper is made only if a plain-HTTP request needs one."""

    def do_read(self) -> tuple[Stream, Any] | None:
        try:
            fd, address = self.socket._accept()  # noqa: SLF001 - what StreamServer.do_read calls
        except BlockingIOError:
            return None
        sock = _socket.socket(self.socket.family, self.socket.type, 0, fd)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.stream(sock), address

    def stream(self, sock: _socket.socket) -> Stream:
        return Stream(sock)

    def do_close(self, stream: Stream, *args: Any) -> None:
        stream.close()


class TLSListener(Listener):
    """The TLS listener (proxy/tls.py): each connection's Stream is a TLS session, with
    the context in force when it was accepted (its handshake runs in the handler)."""

    def __init__(self, address: tuple[str, int], handle: Callable, server_tls: ServerTLS, **options: Any) -> None:
        super().__init__(address, handle, **options)
        self.server_tls = server_tls

    def stream(self, sock: _socket.socket) -> Stream:
        return TLSStream(sock, self.server_tls.context)


class Proxy:
    """The proxy listener: one greenlet per client connection, in blocking style."""

    def __init__(self, settings: Settings, admission: Admission, server_tls: ServerTLS | None = None) -> None:
        self.settings = settings
        self.admission = admission
        self.records = admission.records
        self.server_tls = server_tls
        # Unbounded: MAX_CONNECTIONS is enforced in handle() with a quick 503, not by
        # leaving clients waiting in the accept backlog.
        self.connections = Connections()
        self.servers: list[Listener] = []
        # Read at scrape time: nothing to update on the hot path.
        admission.metrics.client_connections.set_function(lambda: len(self.connections))

    def listen(self) -> None:
        """Start the plaintext listener (unless PROXY_PORT=0) and the TLS one (if configured);
        OSError names the port that failed, in `what`."""
        settings = self.settings
        if settings.proxy_port:
            self._start(Listener((settings.proxy_host, settings.proxy_port), self.handle,
                                 spawn=self.connections.spawn, backlog=4096), "PROXY_PORT", settings.proxy_port)
        if self.server_tls is not None:
            self._start(TLSListener((settings.proxy_host, settings.proxy_tls_port), self.handle, self.server_tls,
                                    spawn=self.connections.spawn, backlog=4096),
                        "PROXY_TLS_PORT", settings.proxy_tls_port)

    def _start(self, server: Listener, variable: str, port: int) -> None:
        try:
            server.start()
        except OSError as error:
            error.what = f"cannot listen on {self.settings.proxy_host}:{port} ({variable})"  # type: ignore[attr-defined]
            raise
        self.servers.append(server)

    # -- steps 1-3: accept, read and parse the head --------------------------------

    def handle(self, stream: Stream, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        del address
        flow = Flow(peer)
        conn = flow.conn
        flow.client_stream = stream
        admission = self.admission
        try:
            if len(self.connections) > self.settings.max_connections:
                if stream.tls:  # nothing to answer in before the handshake; not worth one now
                    raise Refusal(Status.LIMITED, "too many connections; closed before the TLS handshake")
                raise Refusal.answer_http(503, "too many connections; retry shortly", headers=[("Retry-After", "1")])
            if stream.tls:
                flow.listener = "tls"
                handshake(stream, flow, admission.sweeper, self.settings.header_timeout)
                flow.certificate = stream.certificate
            buffered = b""
            while True:  # one request per CONNECT; several for keep-alive plain HTTP
                if flow.method:
                    flow = Flow(peer, conn, flow.listener, flow.certificate)
                    flow.client_stream = stream
                request, buffered = read_request(stream, buffered, flow, admission.sweeper,
                                                 self.settings.header_timeout)
                if request.method == "CONNECT":
                    self.tunnel(stream, request, buffered, flow)
                    return
                keep_alive, buffered = forward(admission, stream.to_gevent(), request, buffered, flow)
                if not keep_alive:
                    return
        except Refusal as refusal:
            admission.refuse(stream, flow, refusal)
        except Closed as closed:
            if closed.partial:
                self.records.decision(flow, Status.BAD_REQUEST, "client closed mid-request", level=logging.DEBUG)
        except OSError as error:
            log.debug("client connection error", extra={"conn": conn, "client": peer, "error": str(error)})
        except Exception:  # noqa: BLE001 - a bug ends this connection, never the server
            log.exception("internal error while handling a connection", extra={
                "conn": conn, "client": peer, "identity": flow.identity, "destination": flow.destination})

    # -- steps 4-10: one CONNECT ------------------------------------------------------

    def tunnel(self, client: Stream, request: Any, buffered: bytes, flow: Flow) -> None:
        """Admit, dial, answer 200, judge the first flight, then pump until both ends close."""
        admission = self.admission
        current, identity = admission.admit(flow, request)  # steps 4-5
        del request
        upstream = admission.connect(current, identity, flow)  # step 6
        try:
            client.send_all(ESTABLISHED)  # step 7
            flow.established = True
            admission.track(flow)  # from here on, a reload's revocation covers it
            flight = FirstFlight(self.stream_judge(current, identity, flow))
            late = first_flight(client, upstream, buffered, flight, flow, admission.sweeper,
                                require_tls=identity.require_tls, hello_timeout=self.settings.hello_timeout)  # 8-9
            # An open tunnel keeps nothing of its handshake alive (memory per idle
            # tunnel), nor the policy snapshot it was judged by.
            del current, identity, buffered, flight
            if late is None:
                self.admitted(flow)
            self.pump(flow, late)  # step 10
        finally:
            admission.release(flow)

    def admitted(self, flow: Flow) -> None:
        """The first flight is judged: drop what judging needed, write the decision."""
        flow.verdict = None
        self.records.admitted(flow)

    def stream_judge(self, current: Policy, identity: Identity, flow: Flow) -> Callable[[ClientHello | None], None]:
        """Step 9 for the first flight: judge each ClientHello (None: the stream is not
        TLS) with everything this tunnel has established; raise its refusal."""

        def judge(hello: ClientHello | None) -> None:
            flow.tls = hello is not None
            flow.sni = hello.sni if hello is not None else None
            version = hello.record_version if hello is not None else 0x0303
            # Check 5 on top of the verdict on checks 1-4 (each hello is judged anew).
            apply(flow, policy.judge(current, flow.key, flow.question(), identity, prior=flow.verdict), version)
            self.admission.recheck(current, flow)

        return judge

    def pump(self, flow: Flow, late: LateFirstBytes | None = None) -> None:
        """Step 10: copy both ways until done (judging the client's first bytes on the
        way, `late`, when the server spoke first)."""
        counts = self.admission.metrics.counts
        counts.active_tunnels += 1
        refused = False
        try:
            relay(flow.client_stream, flow.upstream, flow, late, late and (lambda: self.admitted(flow)))
        except Refusal:
            refused = True  # the handler records it: the request's one decision
            raise
        except OSError:
            pass
        finally:
            counts.active_tunnels -= 1
            if not refused:
                if late is not None and not late.done:
                    self.admitted(flow)  # the client never spoke: the decision stands as it was
                self.records.tunnel_closed(flow)

    # -- around the connections ---------------------------------------------------

    def housekeeping(self, interval: float = 5.0) -> None:
        """Publish byte counts of long flows while they run, not only when they end."""
        while True:
            gevent.sleep(interval)
            for flow in list(self.admission.open):
                self.records.flush_bytes(flow)

    def drain(self) -> None:
        """Stop accepting, let open connections finish for SHUTDOWN_TIMEOUT, then close them."""
        self.admission.draining = True
        for server in self.servers:
            server.close()
        open_flows = self.admission.open
        log.info("draining", extra={"connections": len(self.connections), "tunnels": len(open_flows),
                                    "timeout_s": self.settings.shutdown_timeout})
        self.connections.join(timeout=self.settings.shutdown_timeout)
        if len(self.connections):
            log.warning("shutdown timeout: closing remaining connections",
                        extra={"connections": len(self.connections), "tunnels": len(open_flows)})
            for flow in list(open_flows):
                flow.close("shutdown")  # pumps end and log their summary
            self.connections.join(timeout=0.5)
            # Whatever is left is mid-handshake (reading a head or a hello): end it.
            self.connections.kill(timeout=2)


# ---------------------------------------------------------------------------
# main


def serve(settings: Settings) -> int:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process=True)
    holder: list[Admission] = []
    reloaders: list[Reloader] = []
    page = StatusPage(__version__, settings.hosts_file, lambda: holder[0] if holder else None,
                      lambda: reloaders[0] if reloaders else None) if settings.status_page else None
    admin = WSGIServer((settings.metrics_host, settings.metrics_port),
                       admin_app(lambda: holder[0] if holder else None, registry,
                                 lambda: reloaders[0].rejected if reloaders else None, page),
                       log=None, error_log=log)
    try:
        admin.start()
    except OSError as error:
        return _startup_error(f"cannot listen on {settings.metrics_host}:{settings.metrics_port} (METRICS_PORT)", error)
    loaded = file_state(settings.configmap_path)
    try:
        current = policy.load_policy_file(settings.configmap_path)
    except PolicyError as error:
        hint = ("; set CONFIGMAP_PATH to the policy file" if loaded is None
                else f"; check it with: {cli.invoked_as()} check-policy FILE")
        log.error(f"cannot load policy: {error}{hint}", extra={"path": settings.configmap_path})
        return 1
    hosts = {}
    if settings.hosts_file:
        try:
            hosts = load_hosts_file(settings.hosts_file)
        except (OSError, ValueError) as error:
            log.error(f"cannot load HOSTS_FILE: {error}")
            return 1
    admission = Admission(settings, current, metrics, log, system_resolver(hosts))
    reloader = Reloader(settings.configmap_path, admission, loaded)
    reloaders.append(reloader)
    digest, identities = current.digest, len(current.identities)
    del current  # admission holds the one reference; a reload must be able to free it
    server_tls = None
    if settings.tls:
        try:
            server_tls = ServerTLS(settings.proxy_tls_cert, settings.proxy_tls_key, settings.proxy_tls_client_ca,
                                   metrics, log)
        except TLSConfigError as error:
            log.error(f"cannot start the TLS listener: {error}")
            return 1
    proxy = Proxy(settings, admission, server_tls)
    try:
        proxy.listen()
    except OSError as error:
        return _startup_error(getattr(error, "what", "cannot listen"), error)
    holder.append(admission)
    stop = Event()

    def on_stop(signum: int) -> None:
        # Signal handlers only schedule work (as gunicorn's do).
        log.info("signal received; shutting down", extra={"signal": signal.Signals(signum).name})
        admission.draining = True
        stop.set()

    gevent.signal_handler(signal.SIGTERM, on_stop, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, on_stop, signal.SIGINT)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(reloader.request, "SIGHUP"))
    background = [gevent.spawn(reloader.watch, settings.watch_interval), gevent.spawn(proxy.housekeeping),
                  gevent.spawn(admission.sweeper.run)]
    if server_tls is not None:
        background.append(gevent.spawn(server_tls.watch, settings.watch_interval))
    log.info("egress-guard listening", extra={
        "version": __version__,
        "proxy": f"{settings.proxy_host}:{settings.proxy_port}" if settings.proxy_port else None,
        "proxy_tls": f"{settings.proxy_host}:{settings.proxy_tls_port}" if server_tls else None,
        "client_certificates": server_tls.client_certificates if server_tls else None,
        "metrics": f"{settings.metrics_host}:{settings.metrics_port}", "policy": digest,
        "path": settings.configmap_path, "identities": identities,
        "hosts_file": settings.hosts_file or None, "pinned_names": len(hosts),
    })
    stop.wait()
    proxy.drain()
    gevent.killall(background)
    admin.stop(timeout=1)
    log.info("stopped")
    return 0


def _startup_error(what: str, error: OSError) -> int:
    detail = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.EADDRINUSE:
        detail = "address already in use"
    log.error(f"{what}: {detail}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.build_parser().parse_args(argv)
    if args.command == "check-policy":
        return cli.check_policy(args.file)
    if args.command == "explain":
        return cli.explain(args.file, args.key, args.dest, args.sni, identity_name=args.identity,
                           addresses=args.address, http_request=args.http, certificate=cli.certificate_entries(args),
                           hosts_file=os.environ.get("HOSTS_FILE") or None)
    configure_logging(logging.INFO)
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as error:
        log.error(f"bad setting: {error}")
        return 1
    handler = configure_logging(settings.log_level, buffered=True).handlers[0]
    try:
        return serve(settings)
    finally:
        handler.flush()


if __name__ == "__main__":
    sys.exit(main())
