"""What a new policy changes compared with the one in force, for the reload log line.

Pure and cheap to read: names of identities added, removed and changed (and what about
them changed), and the destinations each kept identity gained or lost. API keys are
compared by digest and only ever reported as "api_keys changed", never shown.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .model import Identity, Policy

SHOWN = 20  # entries per list in the log line; the rest are counted
# Identities with more rules than this are not compared entry by entry: a reload computes
# this in a thread beside the event loop, and every millisecond that thread holds the GIL
# is felt by live tunnels (a 100,000-entry comparison would add ~100 ms of it).
DIFF_LIMIT = 10_000


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
    """How `new` differs from `old`. Kept cheap: destinations are compared entry by entry
    only for identities of at most DIFF_LIMIT rules (larger ones report their counts),
    and only the first SHOWN differences are formatted."""
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
        if set(before.certificates) != set(fresh.certificates):
            what.append("client_certificates")
        old_texts, new_texts = _texts(before), _texts(fresh)
        if old_texts != new_texts and max(len(old_texts), len(new_texts)) > DIFF_LIMIT:
            what.append(f"allowed_destinations: {len(old_texts)} -> {len(new_texts)} entries, "
                        f"not compared one by one above {DIFF_LIMIT}")
        elif old_texts != new_texts:
            old_set, new_set = set(old_texts), set(new_texts)
            new_only, old_only = _missing(new_texts, old_set), _missing(old_texts, new_set)
            if new_only or old_only:
                what.append("allowed_destinations")
                counts[0] += _first(name, new_only, gained)
                counts[1] += _first(name, old_only, lost)
            else:
                what.append("allowed_destinations order")
        if what:
            changed.append(f"{name} ({', '.join(what)})")
    forbidden = old.forbidden.ranges != new.forbidden.ranges
    return Changes(added, removed, tuple(changed), tuple(gained), tuple(lost), forbidden, *counts)


def _missing(texts: tuple[str, ...], other: set[str]) -> list[str]:
    """The entries of `texts` not in `other`, in policy order, each once."""
    missing: list[str] = []
    seen: set[str] = set()
    for text in texts:
        if text not in other and text not in seen:
            seen.add(text)
            missing.append(text)
    return missing


def _first(name: str, different: list[str], shown: list[str]) -> int:
    """Append the first of `different` (up to SHOWN in all) to `shown`; how many there are."""
    for text in different[: max(0, SHOWN - len(shown))]:
        shown.append(f"{name}: {text}")
    return len(different)


def _texts(identity: Identity) -> tuple[str, ...]:
    return identity._texts  # noqa: SLF001 - the rules as written, without building Rule values


def _keys_by_identity(policy: Policy) -> dict[str, set[bytes]]:
    found: dict[str, set[bytes]] = {}
    for digest, name in policy.key_digests.items():
        found.setdefault(name, set()).add(digest)
    return found
