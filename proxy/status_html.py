"""The status page as HTML: one self-contained document built from the data of
`proxy/status_page.py` (the same dictionary `/status.json` returns).

No script, no external asset, one inline style sheet allowed by its hash in the
Content-Security-Policy: the page works air-gapped and under the strictest policy.
Every value that came from a client, the policy or the operator (names, destinations,
SNIs, reasons, query fields) goes through `_e` (html.escape with quote=True); the only
unescaped text is this module's own markup.
"""

from __future__ import annotations

import base64
import hashlib
import html
from typing import Any, Iterable

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 1.5em 2em;color:#1d2430;background:#fafbfc}
h1{font-size:1.5em;margin:.8em 0 .3em}h1 small{font-size:.6em;color:#667}
h2{font-size:1.15em;margin:1.6em 0 .4em;border-bottom:1px solid #d8dde6;padding-bottom:.2em}
h3{font-size:1em;margin:1em 0 .3em;color:#445}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.5em 0}
dl.facts dt{color:#667}dl.facts dd{margin:0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #e4e8ee;vertical-align:top}
th{background:#eef1f5;font-weight:600;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
td.mono{white-space:nowrap}td.w{white-space:normal;overflow-wrap:break-word}
.alert{background:#fdecea;border:1px solid #f5c2bd;padding:.5em .8em;border-radius:4px}
.note{color:#667;font-size:12px}
.s{display:inline-block;padding:0 .45em;border-radius:3px;font-size:12px;background:#e4e8ee;white-space:nowrap}
.s-allowed{background:#d6f0dd}.s-reported{background:#fff1c2}.s-denied,.s-sni_mismatch{background:#fbd3cf}
.s-auth_required{background:#e5d9f6}.s-limited,.s-timeout{background:#ffe0b8}
.s-connection_failed,.s-bad_request{background:#dde3ea}
form{display:flex;flex-wrap:wrap;gap:.5em 1em;align-items:end;background:#eef1f5;padding:.7em;border-radius:4px}
label{display:flex;flex-direction:column;font-size:12px;color:#445}
input[type=text],select{font:inherit;padding:.2em .35em;min-width:14em}
.verdict{margin:.7em 0;padding:.6em .8em;border-radius:4px;border:1px solid #d8dde6;background:#fff}
.verdict b{font-size:1.1em}
footer{margin-top:2em;color:#778;font-size:12px}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
# Nothing but the one style sheet above; forms submit only to this page.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
                           "base-uri 'none'; frame-ancestors 'none'")


def _e(value: Any) -> str:
    """A value as HTML text (None: a dash)."""
    if value is None:
        return "&ndash;"
    return html.escape(str(value), quote=True)


def render(data: dict[str, Any], query: dict[str, Any], elapsed: float) -> str:
    """The page for `data` (status_page.snapshot, with `explain` when asked)."""
    refresh = query.get("refresh")
    parts = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">']
    if refresh is not None:
        parts.append(f'<meta http-equiv="refresh" content="{int(refresh)}">')
    parts.append('<meta name="viewport" content="width=device-width, initial-scale=1">'
                 f'<title>egress-guard status</title><style>{STYLE}</style></head><body>')
    parts += _header(data, refresh)
    parts += _identities(data["identities"])
    parts += _explain(data, query)
    parts += _refusals(data["refusals"])
    parts += _tunnels(data["tunnels"])
    parts.append(f'<footer>Generated {_e(data["now"])} in {elapsed * 1000:.1f} ms. This page shows client '
                 'addresses and destinations (never keys, URL paths or payloads): keep the metrics port '
                 'cluster-internal, or set STATUS_PAGE=false. Same data: <a href="status.json">status.json</a>.'
                 '</footer></body></html>\n')
    return "".join(parts)


def _header(data: dict[str, Any], refresh: int | None) -> Iterable[str]:
    policy = data["policy"]
    yield f'<header><h1>egress-guard <small>{_e(data["version"])}</small></h1><dl class="facts">'
    facts = [
        ("uptime", duration(data["uptime_s"])),
        ("policy in force", f'<code>{_e(policy["digest"])}</code>, loaded {_e(policy["loaded_at"])} '
                            f'({_e(policy["identities"])} identities, {_e(policy["destinations"])} destinations)'),
        ("state", "<b>draining</b>: not taking new connections" if data["draining"] else "serving"),
        ("auto-refresh", (f'every {int(refresh)} s (<a href="?">stop</a>)' if refresh is not None else
                          'off (<a href="?refresh=5">every 5 s</a>, <a href="?refresh=30">30 s</a>)')),
    ]
    for name, value in facts:
        yield f"<dt>{name}</dt><dd>{value}</dd>"
    yield "</dl>"
    if policy["rejected"] is not None:
        yield (f'<p class="alert" id="rejected"><b>The newest policy file was rejected</b> at '
               f'{_e(policy["rejected_at"])}; the policy above stays in force.<br>'
               f'<code>{_e(policy["rejected"])}</code></p>')
    yield "</header>"


def _identities(rows: list[dict[str, Any]]) -> Iterable[str]:
    yield ('<section id="identities"><h2>Identities</h2><table><thead><tr><th>identity</th><th>mode</th>'
           '<th>open / max_tunnels</th><th>requests in the last minute</th><th>bytes up</th><th>bytes down</th>'
           '</tr></thead><tbody>')
    for row in rows:
        mode = _e(row["mode"]) if row["in_policy"] else '<span class="note">not in the policy</span>'
        limit = _e(row["max_tunnels"]) if row["max_tunnels"] is not None else "no limit"
        counts = " ".join(f'<span class="s s-{_e(status)}">{_e(status)} {count}</span>'
                          for status, count in row["last_minute"].items()) or '<span class="note">none</span>'
        yield (f'<tr><td class="w">{_e(row["name"])}</td><td>{mode}</td><td class="n">{row["open"]} / {limit}</td>'
               f'<td>{counts}</td><td class="n">{size(row["bytes_up"])}</td>'
               f'<td class="n">{size(row["bytes_down"])}</td></tr>')
    yield "</tbody></table></section>"


def _explain(data: dict[str, Any], query: dict[str, Any]) -> Iterable[str]:
    names = [row["name"] for row in data["identities"] if row["in_policy"]]
    chosen = query.get("identity", "")
    yield ('<section id="explain"><h2>Explain a request</h2><p class="note">Judged by the policy in force, '
           'with the same checks as live traffic (and as <code>egress_guard.py explain</code>). '
           'A name is not resolved: give the addresses it resolves to, or it is looked up in HOSTS_FILE.</p>'
           '<form method="get" action=""><label>identity<select name="identity">'
           '<option value="">choose one</option>')
    for name in names:
        selected = " selected" if name == chosen else ""
        yield f'<option value="{_e(name)}"{selected}>{_e(name)}</option>'
    yield "</select></label>"
    for field, label, hint in (("dest", "destination", "api.example.com:443"), ("sni", "SNI (optional)", ""),
                               ("address", "addresses (optional)", "10.0.0.7, 10.0.0.8")):
        yield (f'<label>{label}<input type="text" name="{field}" value="{_e(query.get(field, ""))}" '
               f'placeholder="{_e(hint)}"></label>')
    checked = " checked" if query.get("http") else ""
    yield (f'<label>plain HTTP<input type="checkbox" name="http" value="on"{checked}></label>'
           '<button type="submit">explain</button></form>')
    result = data.get("explain")
    if result is None:
        yield "</section>"
        return
    if "error" in result:
        yield f'<p class="alert" id="explain-error">{_e(result["error"])}</p></section>'
        return
    yield (f'<div class="verdict" id="verdict"><b>{_e(result["decision"])}</b> '
           f'<span class="s s-{_e(result["status"])}">{_e(result["status"])}</span> '
           f'for <b>{_e(result["identity"])}</b> &rarr; <code>{_e(result["destination"])}</code>'
           f'<dl class="facts"><dt>reason</dt><dd>{_e(result["reason"] or "allowed by the rule below")}</dd>'
           f'<dt>rule</dt><dd><code>{_e(result["rule"])}</code></dd>')
    for note in result["notes"]:
        yield f'<dt>note</dt><dd class="note">{_e(note)}</dd>'
    yield "</dl></div></section>"


def _refusals(rows: list[dict[str, Any]]) -> Iterable[str]:
    yield (f'<section id="refusals"><h2>Refusals and report-mode passes <small class="note">(the last '
           f'{len(rows)}, newest first)</small></h2>')
    if not rows:
        yield '<p class="note">None since the proxy started.</p></section>'
        return
    yield ('<table><thead><tr><th>time (UTC)</th><th>client</th><th>via</th><th>identity</th><th>destination</th>'
           '<th>status</th><th>reason</th><th>rule</th></tr></thead><tbody>')
    for row in rows:
        error = f'<br><span class="note">{_e(row["error"])}</span>' if row["error"] else ""
        yield (f'<tr><td class="mono">{_e(row["time"][5:23].replace("T", " "))}</td>'
               f'<td class="mono">{_e(row["client"])}</td><td>{_e(row["listener"])}</td>'
               f'<td class="w">{_e(row["identity"])}</td>'
               f'<td class="w mono">{_e(row["destination"] or None)}</td>'
               f'<td><span class="s s-{_e(row["status"])}">{_e(row["status"])}</span></td>'
               f'<td class="w">{_e(row["reason"])}{error}</td><td class="w mono">{_e(row["rule"])}</td></tr>')
    yield "</tbody></table></section>"


def _tunnels(tunnels: dict[str, Any]) -> Iterable[str]:
    yield f'<section id="tunnels"><h2>Open tunnels: {int(tunnels["open"])}</h2>'
    for key, title in (("longest_lived", "The longest-lived"), ("busiest", "The busiest (bytes either way)")):
        rows = tunnels[key]
        yield f'<h3>{title} <small class="note">({len(rows)} shown)</small></h3>'
        if not rows:
            yield '<p class="note">None.</p>'
            continue
        yield ('<table id="' + key + '"><thead><tr><th>identity</th><th>destination</th><th>SNI</th>'
               '<th>address dialled</th><th>client</th><th>via</th>'
               '<th>age</th><th>idle</th><th>bytes up</th><th>bytes down</th></tr></thead><tbody>')
        for row in rows:
            how = f'<td>{_e(row["listener"])} / {_e(row["auth"])}</td>'
            idle = duration(row["idle_s"]) if row["idle_s"] is not None else "&ndash;"
            kind = ' <span class="note">(http)</span>' if row["kind"] == "http" else ""
            yield (f'<tr><td class="w">{_e(row["identity"])}</td><td class="w mono">{_e(row["destination"])}{kind}</td>'
                   f'<td class="w mono">{_e(row["sni"])}</td><td class="mono">{_e(row["address"])}</td>'
                   f'<td class="mono">{_e(row["client"])}</td>{how}<td class="n">{duration(row["age_s"])}</td>'
                   f'<td class="n">{idle}</td><td class="n">{size(row["bytes_up"])}</td>'
                   f'<td class="n">{size(row["bytes_down"])}</td></tr>')
        yield "</tbody></table>"
    yield "</section>"


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 3 h 02 min, 2 d 07 h."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def size(count: int) -> str:
    """Bytes, in B, KiB, MiB, GiB or TiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
