"""Client certificates as credentials: the `client_certificates:` entries of an identity,
and the same entries read off a verified certificate.

An entry names one thing a certificate the proxy verified (proxy/tls.py: chain to
PROXY_TLS_CLIENT_CA, validity, key usage for client authentication) must carry:

- ``uri:spiffe://cluster.local/ns/shop/sa/web`` - a URI subject alternative name (SPIFFE
  IDs, from cert-manager's csi-driver-spiffe or SPIRE); compared exactly;
- ``dns:web.shop.svc`` - a DNS subject alternative name; compared without case and
  without a trailing dot, as DNS names are;
- ``cn:web-frontend`` - the subject's common name; compared exactly.

Both sides are reduced to the same canonical text (``kind:value``), so matching is one
dictionary lookup per name the certificate carries. Pure: no I/O.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Iterable

KINDS = ("uri", "dns", "cn")
MAX_ENTRY = 1024


class EntryError(ValueError):
    """A `client_certificates` entry that cannot be used; str() says why."""


def parse_entry(text: Any) -> str:
    """The canonical form of one `client_certificates` entry (raise EntryError)."""
    if not isinstance(text, str):
        raise EntryError("must be a string such as 'uri:spiffe://...', 'dns:NAME' or 'cn:NAME'")
    kind, colon, value = text.partition(":")
    if not colon or kind not in KINDS:
        raise EntryError("must start with uri:, dns: or cn: (what the certificate must carry)")
    if not value:
        raise EntryError(f"nothing after {kind}:")
    if len(text) > MAX_ENTRY:
        raise EntryError(f"longer than {MAX_ENTRY} characters")
    if any(ch.isspace() or unicodedata.category(ch)[0] == "C" for ch in value):
        raise EntryError("must not contain whitespace or control characters")
    if kind == "uri" and ":" not in value:
        raise EntryError("a URI needs a scheme, as in uri:spiffe://cluster.local/ns/NAMESPACE/sa/ACCOUNT")
    return canonical(kind, value)


def canonical(kind: str, value: str) -> str:
    if kind == "dns":
        value = value.lower().rstrip(".")
    return f"{kind}:{value}"


def entries_of(peer: dict[str, Any] | None) -> tuple[str, ...]:
    """The entries a verified certificate carries, from `ssl`'s decoded form
    (`SSLObject.getpeercert()`): its URI and DNS alternative names (in the certificate's
    order), then its subject's common names. Never its serial or anything else."""
    if not peer:
        return ()
    found: list[str] = []
    for kind, value in peer.get("subjectAltName", ()):
        if kind == "URI":
            found.append(canonical("uri", value))
        elif kind == "DNS":
            found.append(canonical("dns", value))
    for rdn in peer.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                found.append(canonical("cn", value))
    return tuple(dict.fromkeys(found))


def describe(entries: Iterable[str], limit: int = 4) -> str:
    """A short list of entries for a message: the first `limit`, then how many more."""
    entries = list(entries)
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")
