#!/usr/bin/env python3
"""egress-guard: an HTTP CONNECT egress proxy that lets each pod identity reach only
its allowed destinations, and checks the TLS SNI before a byte goes through.

This file is the entry point and the server. It reads in the order a connection
lives: the handler (DESIGN.md steps 1-10), records, policy reloads and revocation,
draining, and main. Around it: `policy/` decides (pure), `wire/` parses (pure), and
`proxy/` holds, in the same order, settings, refusals -> responses, reading the head
and the ClientHello, resolving and dialling, the Attempt/Tunnel records, the byte
pump, plain-HTTP forwarding, metrics/logging, the health app and the command line.
"""

if __name__ == "__main__":
    # Before anything imports socket or threading.
    from gevent import monkey

    monkey.patch_all()

import errno
import gc
import logging
import os
import signal
import sys
import time
from typing import Any, Sequence

import gevent
import gevent.pool
from gevent import socket
from gevent.event import Event
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer
from prometheus_client import CollectorRegistry

import policy
from policy import Decision, Identity, Policy, PolicyError
from proxy import cli
from proxy import forward as forwarding
from proxy.admin import admin_app
from proxy.dial import Address, ResolveError, Resolver, dial, load_hosts_file, system_resolver, unwrap
from proxy.errors import ESTABLISHED, Refusal, auth_required, response
from proxy.observe import Events, Metrics, configure_logging
from proxy.pump import has_input, relay, send_all, wait_readable
from proxy.reading import Closed, HelloTimeout, read_head, read_hello
from proxy.settings import Settings, SettingsError
from proxy.tunnel import Attempt, Tunnel
from wire import http, tls

__version__ = cli.__version__
log = logging.getLogger("egress_guard")
events = Events(log)


# ---------------------------------------------------------------------------
# The handler.


class EgressGuard:
    """The proxy: accepts clients, judges each request, pumps allowed tunnels."""

    def __init__(self, settings: Settings, current: Policy, metrics: Metrics,
                 resolver: Resolver | None = None) -> None:
        self.settings = settings
        self.policy = current  # the one reference; a reload swaps it
        self.metrics = metrics
        self.resolve = resolver or system_resolver({})
        # Unbounded pool: MAX_CONNECTIONS is enforced in handle() with a quick 503, not
        # by leaving clients waiting in the accept backlog.
        self.connections = gevent.pool.Pool(None)
        self.tunnels: set[Tunnel] = set()
        self.open_per_identity: dict[str, int] = {}
        self.draining = False
        self.server: StreamServer | None = None
        self._file_state: tuple | None = None
        self.metrics.policy_loaded(self._destination_counts(current))
        # Read at scrape time: nothing to update on the hot path.
        self.metrics.client_connections.set_function(lambda: len(self.connections))

    # -- accepting (step 1) ------------------------------------------------

    def listen(self) -> None:
        self.server = StreamServer(
            (self.settings.proxy_host, self.settings.proxy_port),
            self.handle,
            spawn=self.connections,
            backlog=4096,
        )
        self.server.start()

    def handle(self, client: socket.socket, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        del address
        if len(self.connections) > self.settings.max_connections:
            attempt = Attempt(peer)
            self._refuse(client, attempt, Refusal(503, "too many connections; retry shortly",
                                                  headers=[("Retry-After", "1")]))
            return
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffered = b""
        while True:  # one request per CONNECT; several for keep-alive plain HTTP
            attempt = Attempt(peer)
            try:
                head, buffered = read_head(client, buffered, self.settings.header_timeout)
                try:
                    request = http.parse_head(head)
                except http.HeadError as error:
                    allow = [("Allow", http.ALLOWED_METHODS)] if error.status == 405 else ()
                    raise Refusal(error.status, error.message, headers=allow) from None
                attempt.method = request.method
                if request.is_connect:
                    tunnel = self.establish(client, request, buffered, attempt)
                    # An open tunnel keeps nothing of its handshake alive (memory per
                    # idle tunnel), nor the policy snapshot it was judged by.
                    del head, request, buffered
                    attempt = None
                    if tunnel is not None:
                        self.pump(tunnel)
                    return
                keep_alive, buffered = forwarding.forward(self, client, request, buffered, attempt)
                if not keep_alive:
                    return
            except Refusal as refusal:
                self._refuse(client, attempt, refusal)
                return
            except Closed as closed:
                if closed.partial:
                    self.record(attempt, "bad_request", "client closed mid-request", level=logging.DEBUG)
                return
            except OSError as error:
                log.debug("client connection error", extra={"client": peer, "error": str(error)})
                return
            except Exception:  # noqa: BLE001 - a bug ends this connection, never the server
                fields = {"client": peer}
                if attempt is not None:
                    fields.update(identity=attempt.identity, destination=attempt.destination)
                log.exception("internal error while handling a connection", extra=fields)
                return

    def _refuse(self, client: socket.socket, attempt: Attempt, refusal: Refusal) -> None:
        self.record(attempt, refusal.word, refusal.message, error=refusal.error)
        try:
            client.sendall(response(refusal.status, refusal.message, refusal.headers))
        except OSError:
            pass

    # -- one CONNECT (steps 4-10) ------------------------------------------

    def establish(self, client: socket.socket, request: http.Request, buffered: bytes,
                  attempt: Attempt) -> Tunnel | None:
        """Steps 4-9: the tunnel (holding the first bytes to forward), or None once refused."""
        current = self.policy  # read the reference once
        attempt.host, attempt.port = request.host, request.port
        key, identity = self.authenticate(current, request)
        attempt.identity = identity.name
        self.judge(attempt, policy.decide_destination(identity, request.host, request.port))
        slot = self.take_slot(identity)
        tunnel: Tunnel | None = None
        first: bytes | None = None
        try:
            upstream, address = self.resolve_and_dial(current, identity, attempt)
            tunnel = Tunnel(identity.name, key, request.host, request.port, address, client, upstream, slot)
            send_all(client, ESTABLISHED)
            first = self.first_bytes(client, upstream, buffered, identity, attempt, tunnel)
            if first is not None and self.policy is not current:
                # A reload landed while we resolved, dialled or waited for the hello:
                # revocation only sees open tunnels, so judge this one again now.
                why = self.still_allowed(self.policy, tunnel)
                if why is not None:
                    self.record(attempt, "denied", f"policy reloaded while connecting: {why}")
                    if tunnel.tls:
                        self._send_alert(client, tls.ACCESS_DENIED, first)
                    first = None
        finally:
            if first is None:
                if tunnel is not None:
                    tunnel.upstream.close()
                self.free_slot(identity.name, slot)
        if first is None:
            return None
        tunnel.first = first
        self.record(attempt, attempt.status, attempt.reason or "destination allowed")
        return tunnel

    def authenticate(self, current: Policy, request: http.Request) -> tuple[str, Identity]:
        try:
            key = http.proxy_credentials(request)
        except http.HeadError as error:
            raise Refusal(error.status, error.message) from None
        except ValueError as error:
            raise auth_required(str(error)) from None
        if key is None:
            raise auth_required("proxy authentication required (Proxy-Authorization: Basic, username = API key)")
        identity = current.authenticate(key)
        if identity is None:
            raise auth_required("unknown API key")
        return key, identity

    def judge(self, attempt: Attempt, decision: Decision) -> None:
        """Apply a policy decision: refuse, or note a report-mode pass and continue."""
        if decision.rule is not None and attempt.rule is None:
            attempt.rule = decision.rule.text
        if not decision.allowed:
            raise Refusal(403, decision.reason)
        self._note(attempt, decision)

    @staticmethod
    def _note(attempt: Attempt, decision: Decision) -> None:
        if decision.status == "reported":
            attempt.status = "reported"
            attempt.reason = f"{attempt.reason}; {decision.reason}" if attempt.reason else decision.reason

    def take_slot(self, identity: Identity) -> bool:
        if identity.max_tunnels is None:
            return False
        count = self.open_per_identity.get(identity.name, 0)
        if count >= identity.max_tunnels:
            raise Refusal(429, f"identity {identity.name} already has {count} open tunnels (max_tunnels)",
                          headers=[("Retry-After", "1")])
        self.open_per_identity[identity.name] = count + 1
        return True

    def free_slot(self, name: str, slot: bool) -> None:
        if slot:
            left = self.open_per_identity.get(name, 1) - 1
            if left > 0:
                self.open_per_identity[name] = left
            else:
                self.open_per_identity.pop(name, None)

    def resolve_and_dial(self, current: Policy, identity: Identity, attempt: Attempt) -> tuple[socket.socket, Address]:
        """Step 6: resolve once, judge every address, dial one of those addresses."""
        host, port = attempt.host, attempt.port
        deadline = time.monotonic() + self.settings.connect_timeout
        if host.ip is not None:
            addresses = [host.ip]
        else:
            try:
                addresses = [unwrap(a) for a in self.resolve(host.name, self.settings.connect_timeout)]
            except ResolveError as error:
                raise Refusal(502, f"could not resolve {host.name}", error=str(error)) from None
            if not addresses:
                raise Refusal(502, f"could not resolve {host.name}", error="no addresses")
        # Every address is judged before any is dialled: a name that resolves to one
        # public and one metadata address is refused outright, not raced.
        self.judge(attempt, policy.decide_addresses(current, identity, addresses, port))
        upstream, attempt.address = dial(addresses, port, deadline)
        return upstream, attempt.address

    def first_bytes(self, client: socket.socket, upstream: socket.socket, buffered: bytes,
                    identity: Identity, attempt: Attempt, tunnel: Tunnel) -> bytes | None:
        """Steps 8-9: peek and judge the ClientHello; the bytes to forward, or None."""
        if not buffered and not identity.require_tls:
            # Server-speaks-first protocols (SMTP, MySQL...) send nothing from the
            # client until greeted: do not wait for a hello that will never come.
            # Whichever side speaks first wakes us; only client bytes are peeked, so a
            # client that does send a ClientHello is still judged on it.
            wait_readable([client, upstream], self.settings.hello_timeout)
            if not has_input(client):
                tunnel.tls = False
                self._note(attempt, policy.decide_plaintext(identity))
                return b""
        outcome, data = read_hello(client, buffered, self.settings.hello_timeout)
        if outcome is HelloTimeout:
            self.record(attempt, "timeout", f"no TLS ClientHello within {self.settings.hello_timeout:g} s")
            return None
        if outcome is None and not data:
            self.record(attempt, "bad_request", "client closed before sending a ClientHello", level=logging.DEBUG)
            return None
        if not tls.is_tls_start(data[0]):
            tunnel.tls = False
            decision = policy.decide_plaintext(identity)
            if not decision.allowed:
                self.record(attempt, "denied", decision.reason)
                return None
            self._note(attempt, decision)
            return data
        if isinstance(outcome, tls.Invalid) or outcome is None:
            reason = outcome.reason if outcome is not None else "client closed mid-ClientHello"
            self.record(attempt, "bad_request", f"invalid TLS ClientHello: {reason}")
            self._send_alert(client, tls.DECODE_ERROR, data)
            return None
        attempt.sni = tunnel.sni = outcome.sni
        decision = policy.decide_sni(identity, attempt.host, attempt.port, outcome.sni)
        if not decision.allowed:
            self.record(attempt, decision.status, decision.reason)
            self._send_alert(client, tls.ACCESS_DENIED, data)
            return None
        self._note(attempt, decision)
        return data

    @staticmethod
    def _send_alert(client: socket.socket, description: int, hello: bytes) -> None:
        version = int.from_bytes(hello[1:3], "big") if len(hello) >= 3 else 0x0303
        try:
            client.sendall(tls.alert(description, version if version >> 8 == 3 else 0x0303))
        except OSError:
            pass

    def pump(self, tunnel: Tunnel) -> None:
        """Step 10: forward the peeked bytes, then copy both ways until done."""
        self.tunnels.add(tunnel)
        self.metrics.active_tunnels.inc()
        try:
            first, tunnel.first = tunnel.first, b""
            if first:
                send_all(tunnel.upstream, first)
                tunnel.traffic.add(True, len(first))
            del first  # the ClientHello buffer is not kept for the life of the tunnel
            relay(tunnel.client, tunnel.upstream, tunnel.traffic, self.settings.idle_timeout)
        except OSError:
            pass
        finally:
            self.tunnels.discard(tunnel)
            self.metrics.active_tunnels.dec()
            tunnel.upstream.close()
            self.free_slot(tunnel.identity, tunnel.slot)
            self.tunnel_closed(tunnel)

    # -- records -------------------------------------------------------------

    def record(self, attempt: Attempt, status: str, reason: str, *, error: str | None = None,
               level: int = logging.INFO) -> None:
        """Count and log one decision."""
        host = attempt.host.name if attempt.host is not None else ""
        self.metrics.count_request(attempt.identity, host, status)
        if events.enabled(level):
            fields = {
                "client": attempt.client,
                "method": attempt.method,
                "identity": attempt.identity,
                "destination": attempt.destination,
                "action": status,
                "reason": reason,
            }
            if attempt.address is not None:
                fields["address"] = str(attempt.address)
            if attempt.sni is not None:
                fields["sni"] = attempt.sni
            if attempt.rule is not None:
                fields["rule"] = attempt.rule
            if error is not None:
                fields["error"] = error
            events.write(level, "request", fields)

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        traffic = tunnel.traffic
        duration = time.monotonic() - tunnel.started
        self.metrics.tunnel_duration.observe(duration)
        self._flush_bytes(tunnel)
        ended_by = "idle timeout" if traffic.idle and tunnel.ended_by == "closed" else tunnel.ended_by
        if events.enabled(logging.INFO):
            events.write(logging.INFO, "tunnel closed", {
                "identity": tunnel.identity,
                "destination": tunnel.destination,
                "bytes_up": traffic.upstream,
                "bytes_down": traffic.downstream,
                "duration_ms": round(duration * 1000, 1),
                "ended_by": ended_by,
            })

    def _flush_bytes(self, tunnel: Tunnel) -> None:
        traffic = tunnel.traffic
        up, down = traffic.upstream - tunnel.counted_up, traffic.downstream - tunnel.counted_down
        tunnel.counted_up, tunnel.counted_down = traffic.upstream, traffic.downstream
        self.metrics.count_bytes(tunnel.identity, up, down)

    def housekeeping(self, interval: float = 5.0) -> None:
        """Publish byte counts of long tunnels while they run, not only when they end."""
        while True:
            gevent.sleep(interval)
            for tunnel in list(self.tunnels):
                self._flush_bytes(tunnel)

    # -- policy reloads ------------------------------------------------------

    @staticmethod
    def _destination_counts(current: Policy) -> dict[str, int]:
        return {name: len(identity.rules) for name, identity in current.identities.items()}

    def file_state(self) -> tuple | None:
        """What identifies the file's content; stat() follows the ConfigMap `..data` symlink."""
        try:
            st = os.stat(self.settings.configmap_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def watch(self) -> None:
        """Poll the policy file; reload when its mtime, size or inode changed."""
        self._file_state = self.file_state()
        while True:
            gevent.sleep(self.settings.watch_interval)
            state = self.file_state()
            if state != self._file_state:
                self._file_state = state
                self.reload("file changed")

    def reload(self, why: str) -> bool:
        """Load the file into a new snapshot and swap it in; keep the old one on failure."""
        path = self.settings.configmap_path
        # Compiling a large policy is CPU work: run it in the thread pool so the hub
        # keeps pumping live tunnels in between (the GIL changes hands every 5 ms).
        # The cyclic GC is paused meanwhile: a full collection triggered by the
        # compile's allocations would scan every object while holding the GIL, the
        # one long stall left (measured ~100 ms at 100k destinations; ~15 ms without).
        # A shorter GIL switch interval while the compile runs keeps each tunnel's wait
        # for the GIL near 1 ms instead of 5 ms.
        interval = sys.getswitchinterval()
        gc.disable()
        sys.setswitchinterval(0.001)
        try:
            fresh = gevent.get_hub().threadpool.apply(_load_quietly, (path,))
            if isinstance(fresh, PolicyError):
                self.metrics.load_errors.inc()
                log.error("policy reload failed; keeping the last good policy",
                          extra={"path": path, "trigger": why, "error": str(fresh)})
                return False
            # Freeing the old snapshot happens here, when its last reference goes.
            self.policy = fresh
            # Long-lived snapshot objects leave the collector's generations before it is
            # switched back on, so no full collection rescans a large policy (they are
            # still freed by reference counting when a later reload replaces them).
            gc.freeze()
        finally:
            sys.setswitchinterval(interval)
            gc.enable()
        self.metrics.reloads.inc()
        self.metrics.policy_loaded(self._destination_counts(fresh))
        log.info("policy reloaded", extra={
            "path": path, "trigger": why, "policy": fresh.digest,
            "identities": len(fresh.identities), "destinations": fresh.destination_count,
        })
        self.revoke(fresh)
        return True

    def revoke(self, current: Policy) -> None:
        """Close open tunnels the new policy would refuse; leave every other one alone."""
        for tunnel in list(self.tunnels):
            why = self.still_allowed(current, tunnel)
            if why is None:
                continue
            self.metrics.revoked.labels(tunnel.identity).inc()
            log.warning("tunnel revoked by policy reload", extra={
                "identity": tunnel.identity,
                "destination": tunnel.destination,
                "action": "denied",
                "reason": why,
            })
            tunnel.close("revoked")

    @staticmethod
    def still_allowed(current: Policy, tunnel: Tunnel) -> str | None:
        """None if `current` would still allow the tunnel, else the reason it would not."""
        identity = current.authenticate(tunnel.key)
        if identity is None:
            return "API key no longer in the policy"
        checks = [
            policy.decide_destination(identity, tunnel.host, tunnel.port),
            policy.decide_addresses(current, identity, [tunnel.address], tunnel.port),
        ]
        if tunnel.sni is not None:
            checks.append(policy.decide_sni(identity, tunnel.host, tunnel.port, tunnel.sni))
        if not tunnel.tls:
            checks.append(policy.decide_plaintext(identity))
        for decision in checks:
            if not decision.allowed:
                return decision.reason
        return None

    # -- draining ------------------------------------------------------------

    def drain(self) -> None:
        """Stop accepting, let open connections finish for SHUTDOWN_TIMEOUT, then close them."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        log.info("draining", extra={"connections": len(self.connections), "tunnels": len(self.tunnels),
                                    "timeout_s": self.settings.shutdown_timeout})
        self.connections.join(timeout=self.settings.shutdown_timeout)
        if len(self.connections):
            log.warning("shutdown timeout: closing remaining connections",
                        extra={"connections": len(self.connections), "tunnels": len(self.tunnels)})
            for tunnel in list(self.tunnels):
                tunnel.close("shutdown")  # pumps end and log their summary
            self.connections.join(timeout=0.5)
            # Whatever is left is mid-handshake (reading a head or a hello): end it.
            self.connections.kill(block=True, timeout=2)


def _load_quietly(path: str) -> Policy | PolicyError:
    """Runs in the thread pool: a PolicyError is returned, not raised, because gevent
    prints a traceback for every exception that leaves a pool thread."""
    try:
        return policy.load_policy_file(path)
    except PolicyError as error:
        return error


# ---------------------------------------------------------------------------
# main


def serve(settings: Settings) -> int:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process=True)
    holder: list[EgressGuard] = []
    admin = WSGIServer((settings.metrics_host, settings.metrics_port),
                       admin_app(lambda: holder[0] if holder else None, registry),
                       log=None, error_log=log)
    try:
        admin.start()
    except OSError as error:
        return _startup_error(f"cannot listen on {settings.metrics_host}:{settings.metrics_port} (METRICS_PORT)", error)
    try:
        current = policy.load_policy_file(settings.configmap_path)
    except PolicyError as error:
        log.error(f"cannot load policy: {error}", extra={"path": settings.configmap_path})
        return 1
    gc.freeze()  # see reload(): keep the policy out of future full collections
    hosts = {}
    if settings.hosts_file:
        try:
            hosts = load_hosts_file(settings.hosts_file)
        except (OSError, ValueError) as error:
            log.error(f"cannot load HOSTS_FILE: {error}")
            return 1
    guard = EgressGuard(settings, current, metrics, system_resolver(hosts))
    digest, identities = current.digest, len(current.identities)
    del current  # the guard holds the one reference; a reload must be able to free it
    try:
        guard.listen()
    except OSError as error:
        return _startup_error(f"cannot listen on {settings.proxy_host}:{settings.proxy_port} (PROXY_PORT)", error)
    holder.append(guard)
    stop = Event()

    def on_stop(signum: int) -> None:
        # Signal handlers only schedule work (as gunicorn's do).
        log.info("signal received; shutting down", extra={"signal": signal.Signals(signum).name})
        guard.draining = True
        stop.set()

    gevent.signal_handler(signal.SIGTERM, on_stop, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, on_stop, signal.SIGINT)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(guard.reload, "SIGHUP"))
    background = [gevent.spawn(guard.watch), gevent.spawn(guard.housekeeping)]
    log.info("egress-guard listening", extra={
        "version": __version__, "proxy": f"{settings.proxy_host}:{settings.proxy_port}",
        "metrics": f"{settings.metrics_host}:{settings.metrics_port}", "policy": digest,
        "path": settings.configmap_path, "identities": identities,
    })
    stop.wait()
    guard.drain()
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
        return cli.explain(args.file, args.key, args.dest, args.sni)
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
