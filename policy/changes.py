"""What a new policy changes compared with the one in force, for the reload log line.

Pure and cheap to read: names of identities added, removed and changed (and what about
them changed), and the destinations each kept identity gained or lost. API keys are
compared by digest and only ever reported as "api_keys changed", never shown.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .model import Identity, Policy

SHOWN = 20  # entries per list in the log line; the rest are counted


class Changes(NamedTuple):
    identities_added: tuple[str, ...]
    identities_removed: tuple[str, ...]
    identities_changed: tuple[str, ...]  # "name (what changed)"
    destinations_added: tuple[str, ...]  # "identity: entry", for identities in both policies
    destinations_removed: tuple[str, ...]
    forbidden_ranges_changed: bool

    def fields(self) -> dict[str, Any]:
        """The non-empty changes as log fields; long lists end with "... and N more"."""
        out: dict[str, Any] = {}
        for name, value in zip(self._fields, self):
            if isinstance(value, tuple) and value:
                shown = list(value[:SHOWN])
                if len(value) > SHOWN:
                    shown.append(f"... and {len(value) - SHOWN} more")
                out[name] = shown
            elif value is True:
                out[name] = True
        return out


def changes(old: Policy, new: Policy) -> Changes:
    """How `new` differs from `old`."""
    old_keys, new_keys = _keys_by_identity(old), _keys_by_identity(new)
    added = tuple(name for name in new.identities if name not in old.identities)
    removed = tuple(name for name in old.identities if name not in new.identities)
    changed: list[str] = []
    gained: list[str] = []
    lost: list[str] = []
    for name, fresh in new.identities.items():
        before = old.identities.get(name)
        if before is None:
            continue
        what = [option for option in ("mode", "require_tls", "allow_http", "max_tunnels")
                if getattr(before, option) != getattr(fresh, option)]
        if old_keys.get(name) != new_keys.get(name):
            what.append("api_keys")
        old_texts, new_texts = _texts(before), _texts(fresh)
        if old_texts != new_texts:
            what.append("allowed_destinations")
            kept = set(old_texts)
            gained += (f"{name}: {text}" for text in dict.fromkeys(new_texts) if text not in kept)
            fresh_set = set(new_texts)
            lost += (f"{name}: {text}" for text in dict.fromkeys(old_texts) if text not in fresh_set)
        if what:
            changed.append(f"{name} ({', '.join(what)})")
    forbidden = old.forbidden.ranges != new.forbidden.ranges
    return Changes(added, removed, tuple(changed), tuple(gained), tuple(lost), forbidden)


def _texts(identity: Identity) -> tuple[str, ...]:
    return identity._texts  # noqa: SLF001 - the rules as written, without building Rule values


def _keys_by_identity(policy: Policy) -> dict[str, set[bytes]]:
    found: dict[str, set[bytes]] = {}
    for digest, name in policy.key_digests.items():
        found.setdefault(name, set()).add(digest)
    return found
