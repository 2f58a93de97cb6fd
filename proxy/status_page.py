"""The status page on METRICS_PORT: `GET /` (or `/status`) is one server-rendered HTML
page, `GET /status.json` the same data as JSON (its shape is in the README).

Everything is read when the page is asked for: the policy in force and the reload state
(`Reloader`), the open flows (`Admission.open`), the byte counters (`Metrics`), and the
little the hot path keeps for the page (`proxy/status.py: Activity`). The explain form
runs the command line's own judgement (`cli.judge_request`, which is `policy.judge`)
against the policy in force: one decision path.

The page shows client addresses and destinations, never a key, a certificate serial, a
URL path or payload bytes (nothing that holds them is read); the metrics port must stay
cluster-internal. Rendering is in `proxy/status_html.py`.
"""

from __future__ import annotations

import heapq
import json
import re
import time
import urllib.parse
from collections import Counter
from datetime import datetime, timezone
from operator import attrgetter
from typing import Any, Callable

from proxy import cli
from proxy.status_html import CONTENT_SECURITY_POLICY, render

PATHS = frozenset({"/", "/status", "/status.json"})
REFRESH_MIN, REFRESH_MAX = 1, 3600  # seconds between reloads of the page (?refresh=N)
TUNNEL_ROWS = 100  # rows per tunnel list (the longest-lived, the busiest)
FIELD_LIMIT = 1000  # characters per query parameter
# The query parameters: `refresh`, and the explain form's fields.
EXPLAIN_FIELDS = ("identity", "dest", "sni", "address", "http")
FIELDS = ("refresh", *EXPLAIN_FIELDS)
# How explain's problems name the form's fields.
FORM_NAMES = {"dest": "destination", "sni": "SNI", "address": "address", "http": "plain HTTP"}
_TRUE, _FALSE = ("on", "1", "true"), ("off", "0", "false")


class BadQuery(ValueError):
    """A query string the page cannot use; str() names the parameter and the problem."""


def parse_query(text: str) -> dict[str, Any]:
    """{field: value} for the fields given: `refresh` an int, `http` a bool, others str."""
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=len(FIELDS),
                                       errors="strict")
    except UnicodeDecodeError:
        raise BadQuery("the query string is not UTF-8") from None
    except ValueError:
        raise BadQuery(f"too many query parameters (at most {len(FIELDS)}: {', '.join(FIELDS)})") from None
    query: dict[str, Any] = {}
    for name, value in pairs:
        if name not in FIELDS:
            raise BadQuery(f"unknown query parameter {_short(name)!r} (known: {', '.join(FIELDS)})")
        if name in query:
            raise BadQuery(f"query parameter {name!r} given twice")
        if len(value) > FIELD_LIMIT:
            raise BadQuery(f"query parameter {name!r} is longer than {FIELD_LIMIT} characters")
        query[name] = value
    if "refresh" in query:
        query["refresh"] = _refresh(query["refresh"])
    if "http" in query:
        flag = query["http"].lower()
        if flag not in _TRUE + _FALSE:
            raise BadQuery(f"http={_short(query['http'])!r}: expected on or off")
        query["http"] = flag in _TRUE
    return query


def _refresh(text: str) -> int:
    if re.fullmatch(r"[0-9]{1,6}", text) is None or not REFRESH_MIN <= int(text) <= REFRESH_MAX:
        raise BadQuery(f"refresh={_short(text)!r}: expected whole seconds from {REFRESH_MIN} to {REFRESH_MAX}")
    return int(text)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class StatusPage:
    """The WSGI handler of PATHS. `admission` and `reloader` return the proxy's
    Admission and Reloader once serving (None before)."""

    paths = PATHS

    def __init__(self, version: str, hosts_file: str, admission: Callable[[], Any],
                 reloader: Callable[[], Any]) -> None:
        self.version = version
        self.hosts_file = hosts_file or None  # explain reads the names it pins, as the server does
        self.admission = admission
        self.reloader = reloader

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        started = time.perf_counter()
        as_json = environ.get("PATH_INFO") == "/status.json"
        head = environ.get("REQUEST_METHOD") == "HEAD"  # the same answer without its body
        try:
            query = parse_query(environ.get("QUERY_STRING", ""))
        except BadQuery as error:
            return _reply(start_response, "400 Bad Request", "text/plain; charset=utf-8", f"{error}\n", head)
        admission, reloader = self.admission(), self.reloader()
        if admission is None or reloader is None:
            return _reply(start_response, "503 Service Unavailable", "text/plain; charset=utf-8",
                          "no policy loaded yet\n", head)
        data = self.snapshot(admission, reloader)
        status = "200 OK"
        if any(name in query for name in EXPLAIN_FIELDS):
            try:
                data["explain"] = self.explain(query, admission.policy)
            except cli.ExplainInputError as error:
                data["explain"] = {"error": str(error)}
                status = "400 Bad Request"
        if as_json:
            return _reply(start_response, status, "application/json", json.dumps(data, indent=1) + "\n", head)
        page = render(data, query, time.perf_counter() - started)
        return _reply(start_response, status, "text/html; charset=utf-8", page, head)

    # -- the data -------------------------------------------------------------------

    def snapshot(self, admission: Any, reloader: Any) -> dict[str, Any]:
        """Everything the page shows, as JSON-ready values."""
        wall, now = time.time(), time.monotonic()
        current = admission.policy
        activity = admission.records.activity
        flows = list(admission.open)
        open_by = Counter(flow.identity for flow in flows)
        moved = _bytes_by_identity(admission.metrics)
        for flow in flows:  # bytes not yet added to the counters (flushed every 5 s)
            row = moved.setdefault(flow.identity, [0, 0])
            row[0] += flow.up - flow.counted_up
            row[1] += flow.down - flow.counted_down
        recent = activity.recent.last_minute()
        names = sorted(current.identities)
        names += sorted((set(recent) | set(moved) | set(open_by)) - set(names))
        identities = []
        for name in names:
            identity = current.identities.get(name)
            up, down = moved.get(name, (0, 0))
            identities.append({
                "name": name,
                "in_policy": identity is not None,
                "mode": identity.mode if identity is not None else None,
                "open": open_by.get(name, 0),
                "max_tunnels": identity.max_tunnels if identity is not None else None,
                "last_minute": dict(sorted(recent.get(name, {}).items(), key=lambda item: -item[1])),
                "bytes_up": up,
                "bytes_down": down,
            })
        tracked = admission.sweeper.idle_timeout > 0
        longest = heapq.nsmallest(TUNNEL_ROWS, flows, key=attrgetter("started"))
        busiest = heapq.nlargest(TUNNEL_ROWS, flows, key=_traffic)
        return {
            "version": self.version,
            "now": iso(wall),
            "uptime_s": round(wall - activity.started, 1),
            "draining": bool(admission.draining),
            "policy": {
                "digest": current.digest,
                "loaded_at": iso(reloader.loaded_at),
                "identities": len(current.identities),
                "destinations": current.destination_count,
                "rejected": reloader.rejected,
                "rejected_at": iso(reloader.rejected_at) if reloader.rejected is not None else None,
            },
            "identities": identities,
            "tunnels": {
                "open": len(flows),
                "longest_lived": [_tunnel(flow, now, tracked) for flow in longest],
                "busiest": [_tunnel(flow, now, tracked) for flow in busiest if flow.up + flow.down],
            },
            "refusals": [_refusal(entry) for entry in reversed(activity.refusals)],
        }

    def explain(self, query: dict[str, Any], current: Any) -> dict[str, Any]:
        """The explain form's question, judged by the policy in force."""
        name, dest = query.get("identity", ""), query.get("dest", "")
        if not name:
            raise cli.ExplainInputError("choose an identity to explain a request for")
        if not dest:
            raise cli.ExplainInputError("give a destination, HOST:PORT")
        sni = query.get("sni") or None
        addresses = [text for text in re.split(r"[\s,]+", query.get("address", "")) if text]
        found = cli.judge_request(current, None, dest, sni, identity_name=name, addresses=addresses,
                                  http_request=query.get("http", False), hosts_file=self.hosts_file,
                                  fields=FORM_NAMES)
        return {
            "identity": found.identity,
            "destination": dest,
            "sni": sni,
            "addresses": addresses,
            "http": query.get("http", False),
            "decision": "allowed" if found.allowed else "denied",
            "status": found.status,
            "reason": found.reason,
            "rule": found.rule,
            "notes": list(found.notes),
        }


def _traffic(flow: Any) -> int:
    return flow.up + flow.down


def _tunnel(flow: Any, now: float, tracked: bool) -> dict[str, Any]:
    """One open flow's row. Idle time: plain-HTTP exchanges note their last byte; a
    tunnel's quiet spell is what the idleness sweep (once a second, only with an
    IDLE_TIMEOUT) saw: null when nothing measures it."""
    if flow.http:
        idle: float | None = now - flow.last
    elif not tracked:
        idle = None
    elif flow.up + flow.down != flow.seen:
        idle = 0.0  # bytes moved since the last sweep
    else:
        idle = now - flow.quiet_since
    row = {
        "conn": flow.conn,
        "kind": "http" if flow.http else "tunnel",
        "client": flow.client,
        "identity": flow.identity,
        "destination": flow.destination,
        "sni": flow.sni,
        "address": str(flow.address) if flow.address is not None else None,
        "age_s": round(now - flow.started, 1),
        "idle_s": round(idle, 1) if idle is not None else None,
        "bytes_up": flow.up,
        "bytes_down": flow.down,
        "listener": flow.listener,  # "plain" or "tls"
        "auth": flow.auth,  # "api_key" or "certificate"
    }
    return row


def _refusal(entry: Any) -> dict[str, Any]:
    return {
        "time": iso(entry.time),
        "client": entry.client,
        "identity": entry.identity,
        "destination": entry.destination,
        "status": entry.status,
        "reason": entry.reason,
        "rule": entry.rule,
        "error": entry.error,
        "sni": entry.sni,
        "address": str(entry.address) if entry.address is not None else None,
        "listener": entry.listener,
    }


def _bytes_by_identity(metrics: Any) -> dict[str, list[int]]:
    """{identity: [bytes up, bytes down]} from egress_proxy_bytes_total."""
    totals: dict[str, list[int]] = {}
    for (identity, direction), count in list(metrics.counts.bytes.items()):
        totals.setdefault(identity, [0, 0])[0 if direction == "upstream" else 1] += count
    return totals


def iso(moment: float) -> str:
    """RFC 3339, UTC, milliseconds."""
    return datetime.fromtimestamp(moment, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reply(start_response: Callable, status: str, content_type: str, text: str, head: bool = False) -> list[bytes]:
    body = text.encode()
    start_response(status, [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
    ])
    return [] if head else [body]
