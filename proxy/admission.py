"""Admission: from a parsed request head to an open upstream connection.

Both kinds of request go through here in the same order (docs/ARCHITECTURE.md, steps
4-6): authenticate and judge the target (`admit`), take a `max_tunnels` slot, resolve
once, judge every address and dial one of them (`connect`), and finally give it all
back (`release`). Every judgement is the policy's one check list (`policy.judge`),
asked again as the request learns more; a refusal at any point is a `Refusal`.

`Admission.policy` is the one reference to the policy in force: `reload.Reloader`
swaps it, and each request reads it once, in `admit`. `Admission.open` holds every
admitted flow with an upstream connection (tunnels and plain-HTTP exchanges), which is
what revocation re-judges and draining closes.
"""

from __future__ import annotations

import logging
import time

from policy import Identity, Policy, Status, Verdict, judge, unwrap
from policy.addresses import IPv4Address
from proxy.deadlines import Sweeper
from proxy.dial import Address, ResolveError, Resolver, dial, system_resolver
from proxy.flow import Flow
from proxy.observe import Metrics, Records
from proxy.refusal import Refusal, from_decision, from_parse_error
from proxy.settings import Settings
from proxy.status import Activity
from proxy.stream import Stream
from wire import http, tls


class Admission:
    """Authenticate, judge, count slots, resolve and dial; record every decision."""

    def __init__(self, settings: Settings, current: Policy, metrics: Metrics, logger: logging.Logger,
                 resolver: Resolver | None = None) -> None:
        self.settings = settings
        self.policy = current  # the one reference; a reload swaps it
        self.metrics = metrics
        self.records = Records(metrics, logger, Activity() if settings.status_page else None)
        self.resolve = resolver or system_resolver({})
        self.open: set[Flow] = set()
        self.sweeper = Sweeper(self.open, settings.idle_timeout)
        self.open_per_identity: dict[str, int] = {}
        self.draining = False  # shutdown began: kept-alive connections take no further requests

    def admit(self, flow: Flow, request: http.Request) -> tuple[Policy, Identity]:
        """Steps 4-5: who is asking, and may they reach this target? The policy snapshot
        this request is judged by (read once, here) and the identity."""
        current = self.policy
        flow.method = request.method
        flow.target(request.host, request.port)
        flow.http = request.method != "CONNECT"
        flow.key = credentials(request)
        certificate = flow.certificate
        verdict = judge(current, flow.key, flow.question(), certificate=certificate)
        identity = verdict.identity
        if identity is not None:
            flow.identity = identity.name
            flow.auth = auth = "certificate" if certificate and current.by_certificate(certificate) else "api_key"
            self.metrics.count_auth(identity.name, auth, flow.listener)
        apply(flow, verdict)
        flow.verdict = verdict
        assert verdict.identity is not None
        return current, verdict.identity

    def connect(self, current: Policy, identity: Identity, flow: Flow) -> Stream:
        """Step 6: a slot, then an upstream connection to a vetted address."""
        self.take_slot(identity, flow)
        try:
            upstream = open_upstream(current, identity, flow, self.resolve, self.settings.connect_timeout,
                                     self.sweeper)
        except BaseException:
            self.release(flow)
            raise
        return upstream

    def track(self, flow: Flow) -> None:
        """The flow joins the open flows: revocation re-judges them, draining closes them."""
        self.open.add(flow)

    def take_slot(self, identity: Identity, flow: Flow) -> None:
        if identity.max_tunnels is None:
            return
        count = self.open_per_identity.get(identity.name, 0)
        if count >= identity.max_tunnels:
            raise Refusal.answer_http(
                429, f"identity {identity.name} already has {count} open tunnels (max_tunnels)",
                headers=[("Retry-After", "1")])
        self.open_per_identity[identity.name] = count + 1
        flow.slot = True

    def release(self, flow: Flow) -> None:
        """Give back what `connect` took: the slot, the upstream socket, the open entry."""
        self.open.discard(flow)
        flow.verdict = None
        if flow.slot:
            flow.slot = False
            left = self.open_per_identity.get(flow.identity, 1) - 1
            if left > 0:
                self.open_per_identity[flow.identity] = left
            else:
                self.open_per_identity.pop(flow.identity, None)
        if flow.upstream is not None:
            flow.upstream.close()
            flow.upstream = None

    def recheck(self, current: Policy, flow: Flow) -> None:
        """Apply a reload that landed while this request was being judged against
        `current`: revocation only sees what was known when it ran."""
        fresh = self.policy
        if fresh is not current:
            why = refused_by(fresh, flow)
            if why is not None:
                raise Refusal(Status.DENIED, f"policy reloaded while connecting: {why}", http=403,
                              alert=tls.ACCESS_DENIED if flow.tls else None)

    def refuse(self, client: Stream, flow: Flow, refusal: Refusal) -> None:
        """Record a refusal and tell the client (the one place that does both).

        A request that report mode let through although enforcement would deny it stays
        `reported` whatever stops it later (the destination is down, the name does not
        resolve, the client goes quiet): the reported count must show every dependency
        that enforcing would break. The later failure goes in the line's `error`. Only a
        refusal report mode never relaxes (authentication, a forbidden address) is
        recorded as itself: the client was refused, as it would be under enforcement.
        """
        status, reason, error = refusal.status, refusal.reason, refusal.error
        if flow.status == Status.REPORTED and status not in _ENFORCED:
            error = f"{reason}: {error}" if error else reason
            status, reason = Status.REPORTED, flow.reason
        self.records.decision(flow, status, reason, error=error, level=refusal.level)
        answer = refusal.answer(flow.established)
        if answer and not refusal.answered:
            try:
                client.send_all(answer)
            except OSError:
                pass


# Refusals that stand in report mode too (see policy/decide.py): recorded as themselves.
_ENFORCED = frozenset({Status.DENIED, Status.AUTH_REQUIRED, Status.SNI_MISMATCH})


def refused_by(current: Policy, flow: Flow) -> str | None:
    """Why `current` would refuse `flow`, judged on everything it has established so
    far; None if it would not."""
    verdict = judge(current, flow.key, flow.question(), certificate=flow.certificate)
    identity = verdict.identity
    if identity is None:
        if flow.auth == "certificate":
            return f"the client certificate no longer proves an identity: {verdict.reason}"
        return "API key no longer in the policy"
    if identity.name != flow.identity:
        return f"the credentials now name identity {identity.name}, not {flow.identity}"
    refusal = verdict.refusal
    return refusal.reason if refusal is not None else None


def credentials(request: http.Request) -> str | None:
    """The API key the request presents (None: none); a malformed header is refused."""
    try:
        return http.proxy_credentials(request)
    except http.HeadError as error:
        raise from_parse_error(error) from None
    except ValueError as error:
        raise Refusal.answer_http(407, str(error)) from None


def apply(flow: Flow, verdict: Verdict, version: int = 0x0303) -> None:
    """Act on a verdict: raise its refusal, or note it for the decision record (it covers
    every check so far). `version`: the record version of the client's ClientHello, for
    the alert."""
    refusal = verdict.refusal
    if refusal is not None:
        raise from_decision(refusal, established=flow.established, in_tls=bool(flow.tls), version=version)
    flow.status, flow.reason = verdict.status, verdict.reason
    rule = verdict.rule
    flow.rule = rule.text if rule is not None else None


def open_upstream(current: Policy, identity: Identity, flow: Flow, resolve: Resolver,
                  timeout: float, sweeper: Sweeper) -> Stream:
    """Resolve once, judge every address, dial one of those addresses.

    Every address is judged before any is dialled: a name that resolves to one public
    and one metadata address is refused outright, not raced.
    """
    host, port = flow.host, flow.port
    assert host is not None
    started = time.monotonic()
    addresses: tuple[Address, ...]
    if host.ip is not None:
        addresses = (host.ip,)
    else:
        try:
            found = resolve(host.name, timeout)
        except ResolveError as error:
            raise Refusal.answer_http(502, f"could not resolve {host.name}", error=str(error),
                                      kind=error.kind) from None
        if not found:
            raise Refusal.answer_http(502, f"could not resolve {host.name}", error="no addresses", kind="dns_error")
        # IPv4-mapped IPv6 addresses are judged and dialled as the IPv4 address they are.
        addresses = (found[0],) if len(found) == 1 and type(found[0]) is IPv4Address \
            else tuple([unwrap(address) for address in found])
    verdict = judge(current, flow.key, flow.question(addresses), identity, prior=flow.verdict)
    apply(flow, verdict)
    flow.verdict = verdict
    return dial(flow, addresses, port, sweeper, timeout - (time.monotonic() - started))
