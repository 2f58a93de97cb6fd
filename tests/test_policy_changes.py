"""What a reload's log line says changed (policy/changes.py)."""

from __future__ import annotations

import json

from policy import load_policy_text
from policy.changes import SHOWN, changes

BASE = """
identities:
  web:
    api_keys: ["web-key-1"]
    allowed_destinations: ["a.example.com", "b.example.com"]
  batch:
    api_keys: ["batch-key"]
    allowed_destinations: ["c.example.com"]
"""


def test_nothing_changed_is_empty() -> None:
    old, new = load_policy_text(BASE), load_policy_text(BASE + "\n# a comment\n")
    found = changes(old, new)
    assert found.fields() == {}


def test_identities_and_destinations_added_removed_and_changed() -> None:
    new_text = BASE.replace('"b.example.com"]', '"d.example.com"]\n    mode: report').replace(
        "  batch:", "  cron:")
    found = changes(load_policy_text(BASE), load_policy_text(new_text))
    assert found.fields() == {
        "identities_added": ["cron"],
        "identities_removed": ["batch"],
        "identities_changed": ["web (mode, allowed_destinations)"],
        "destinations_added": ["web: d.example.com"],
        "destinations_removed": ["web: b.example.com"],
    }


def test_a_key_change_is_named_but_never_shown() -> None:
    found = changes(load_policy_text(BASE), load_policy_text(BASE.replace("web-key-1", "web-key-2")))
    assert found.identities_changed == ("web (api_keys)",)
    assert "web-key" not in json.dumps(found.fields())


def test_forbidden_ranges_and_long_lists() -> None:
    many = ", ".join(f'"h{i}.example.com"' for i in range(SHOWN + 5))
    new_text = BASE.replace('"a.example.com", "b.example.com"', many) + \
        "settings:\n  forbidden_ranges: [\"169.254.0.0/16\"]\n"
    fields = changes(load_policy_text(BASE), load_policy_text(new_text)).fields()
    assert fields["forbidden_ranges_changed"] is True
    assert len(fields["destinations_added"]) == SHOWN + 1
    assert fields["destinations_added"][-1] == "... and 5 more"
    assert fields["destinations_removed"] == ["web: a.example.com", "web: b.example.com"]


def test_reordered_destinations_are_named_as_such_and_counts_are_exact() -> None:
    reordered = BASE.replace('["a.example.com", "b.example.com"]', '["b.example.com", "a.example.com"]')
    found = changes(load_policy_text(BASE), load_policy_text(reordered))
    assert found.fields() == {"identities_changed": ["web (allowed_destinations order)"]}
    many = ", ".join(f'"h{i}.example.com"' for i in range(50))
    grown = changes(load_policy_text(BASE), load_policy_text(BASE.replace('"b.example.com"]', f'"b.example.com", {many}]')))
    assert grown.destinations_added_count == 50 and grown.destinations_removed_count == 0
    assert grown.destinations_added[:2] == ("web: h0.example.com", "web: h1.example.com")


def test_large_identities_report_counts_not_entries(monkeypatch) -> None:
    import policy.changes

    monkeypatch.setattr(policy.changes, "DIFF_LIMIT", 2)
    grown = BASE.replace('"b.example.com"]', '"b.example.com", "c.example.com"]')
    found = changes(load_policy_text(BASE), load_policy_text(grown))
    assert found.fields() == {"identities_changed": [
        "web (allowed_destinations: 2 -> 3 entries, not compared one by one above 2)"]}
