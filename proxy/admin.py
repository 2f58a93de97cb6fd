"""The health and metrics app served by gevent.pywsgi on METRICS_PORT.

`/health` is liveness (the process answers), `/ready` is readiness (a policy is in
force and the proxy is not draining), `/metrics` is Prometheus text.

`/ready` names the policy digest in force and, while the newest policy file is
rejected, why (`rejected`): still 200, because the last good policy keeps serving.

The status page (`/`, `/status`, `/status.json`; proxy/status_page.py) is served here
too unless STATUS_PAGE=false, when those paths are 404 like any other.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

def admin_app(guard_ref: Callable[[], Any], registry: CollectorRegistry,
              rejected: Callable[[], str | None] = lambda: None, page: Any = None) -> Callable:
    """`guard_ref`: the Admission once serving (None before); `rejected`: why the newest
    policy file was refused, if it was; `page`: the status page's WSGI handler (None: off)."""
    endpoints = ["/health", "/ready", "/metrics", *(sorted(page.paths) if page is not None else ())]

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", {"error": "use GET"}, [("Allow", "GET, HEAD")])
        if path == "/health":
            return _reply(start_response, "200 OK", {"status": "healthy"})
        if path == "/ready":
            guard = guard_ref()
            if guard is None:
                return _reply(start_response, "503 Service Unavailable", {"status": "not ready", "reason": "no policy loaded"})
            if guard.draining:
                return _reply(start_response, "503 Service Unavailable", {"status": "not ready", "reason": "draining"})
            payload: dict[str, Any] = {"status": "ready", "policy": guard.policy.digest}
            why = rejected()
            if why is not None:
                payload["rejected"] = why
            return _reply(start_response, "200 OK", payload)
        if path == "/metrics":
            body = generate_latest(registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return [body]
        if page is not None and path in page.paths:
            return page(environ, start_response)
        return _reply(start_response, "404 Not Found", {"error": "not found", "endpoints": endpoints})

    return app


def _reply(start_response: Callable, status: str, payload: dict, headers: Sequence = ()) -> list[bytes]:
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers])
    return [body]
