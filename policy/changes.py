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
    destinations_added: tuple[str, ...]  # "identity: entry", for identities in both; the first SHOWN
    destinations_removed: tuple[str, ...]
    forbidden_ranges_changed: bool
    destinations_added_count: int = 0  # all of them
    destinations_removed_count: int = 0

    def fields(self) -> dict[str, Any]:
        """The non-empty changes as log fields; long lists end with "... and N more"."""
        counts = {"destinations_added": self.destinations_added_count,
                  "destinations_removed": self.destinations_removed_count}
        out: dict[str, Any] = {}
        for name, value in zip(self._fields, self):
            if isinstance(value, tuple) and value:
                total = counts.get(name, len(value))
                shown = list(value[:SHOWN])
                if total > SHOWN:
                    shown.append(f"... and {total - SHOWN} more")
                out[name] = shown
            elif value is True:
                out[name] = True
        return out


def changes(old: Policy, new: Policy) -> Changes:
    """How `new` differs from `old`. Cheap for large policies (a reload computes it off the
    hub, but it still shares the GIL with live tunnels): destinations are compared as
    sets, and only the first SHOWN differences are formatted."""
    old_keys, new_keys = _keys_by_identity(old), _keys_by_identity(new)
    added = tuple(name for name in new.identities if name not in old.identities)
    removed = tuple(name for name in old.identities if name not in new.identities)
    changed: list[str] = []
    gained: list[str] = []
    lost: list[str] = []
    counts = [0, 0]
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
            old_set, new_set = set(old_texts), set(new_texts)
            if old_set != new_set:  # not only reordered
                what.append("allowed_destinations")
                counts[0] += _first(name, new_texts, new_set - old_set, gained)
                counts[1] += _first(name, old_texts, old_set - new_set, lost)
            else:
                what.append("allowed_destinations order")
        if what:
            changed.append(f"{name} ({', '.join(what)})")
    forbidden = old.forbidden.ranges != new.forbidden.ranges
    return Changes(added, removed, tuple(changed), tuple(gained), tuple(lost), forbidden, *counts)


def _first(name: str, texts: tuple[str, ...], different: set[str], shown: list[str]) -> int:
    """Append the first of `different` in policy order (up to SHOWN in all) to `shown`;
    how many there are."""
    if different and len(shown) < SHOWN:
        taken: set[str] = set()
        for text in texts:
            if text in different and text not in taken:
                taken.add(text)
                shown.append(f"{name}: {text}")
                if len(shown) >= SHOWN:
                    break
    return len(different)


def _texts(identity: Identity) -> tuple[str, ...]:
    return identity._texts  # noqa: SLF001 - the rules as written, without building Rule values


def _keys_by_identity(policy: Policy) -> dict[str, set[bytes]]:
    found: dict[str, set[bytes]] = {}
    for digest, name in policy.key_digests.items():
        found.setdefault(name, set()).add(digest)
    return found
