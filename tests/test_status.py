"""What the hot path keeps for the status page (proxy/status.py), the page's query
parsing and the STATUS_PAGE setting: tables over a fake clock and real Flow records.
The page itself, under real traffic, is e2e/test_status_page.py."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

import policy
from policy import Status
from proxy.admission import Admission
from proxy.flow import Flow
from proxy.observe import Metrics
from proxy.settings import Settings, SettingsError
from proxy.status import REFUSALS_KEPT, WINDOW_SECONDS, Activity, RecentCounts
from proxy.status_page import BadQuery, parse_query

POLICY = "identities:\n  app:\n    api_keys: [k]\n    allowed_destinations: [api.example.com]\n"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def flow(identity: str = "app", host: str = "api.example.com") -> Flow:
    made = Flow("10.0.0.1:5000")
    made.identity = identity
    made.target(policy.parse_host(host), 443)
    return made


def test_recent_counts_cover_the_last_minute_and_forget_the_rest() -> None:
    clock = Clock()
    counts = RecentCounts(clock)
    counts.count("app", "allowed")
    clock.now += 0.5
    counts.count("app", "allowed")
    counts.count("app", "denied")
    counts.count("web", "allowed")
    assert counts.last_minute() == {"app": {"allowed": 2, "denied": 1}, "web": {"allowed": 1}}
    clock.now += WINDOW_SECONDS - 1  # the first second is still inside the window
    counts.count("app", "denied")
    assert counts.last_minute() == {"app": {"allowed": 2, "denied": 2}, "web": {"allowed": 1}}
    clock.now += 1  # now it is not
    assert counts.last_minute() == {"app": {"denied": 1}}
    clock.now += WINDOW_SECONDS
    assert counts.last_minute() == {}
    for second in range(3 * WINDOW_SECONDS):  # one bucket a second, never more than a minute's
        clock.now += 1
        counts.count("app", "allowed")
    assert len(counts.buckets) == WINDOW_SECONDS
    assert counts.last_minute() == {"app": {"allowed": WINDOW_SECONDS}}


def test_activity_keeps_the_newest_refusals_and_no_flow() -> None:
    activity = Activity(Clock())
    activity.decided(flow(), Status.ALLOWED, "destination allowed", None)
    assert not activity.refusals, "a plain allow is counted, not kept"
    for number in range(REFUSALS_KEPT + 20):
        activity.decided(flow(host=f"h{number}.example.com"), Status.DENIED, "destination not allowed", None)
    activity.decided(flow(), Status.REPORTED, "would deny: destination not allowed", None)
    assert len(activity.refusals) == REFUSALS_KEPT
    assert activity.refusals[-1].status == Status.REPORTED
    assert activity.refusals[0].destination == "h21.example.com:443", "the oldest went first"
    assert not any(isinstance(value, Flow) for entry in activity.refusals for value in entry)
    assert activity.recent.last_minute() == {"app": {"allowed": 1, "denied": REFUSALS_KEPT + 20, "reported": 1}}


@pytest.mark.parametrize("enabled", [True, False])
def test_status_page_setting_decides_whether_anything_is_recorded(enabled: bool) -> None:
    settings = Settings.from_env({"STATUS_PAGE": " TRUE " if enabled else "false"})
    assert settings.status_page is enabled
    logger = logging.getLogger("test-status")
    admission = Admission(settings, policy.load_policy_text(POLICY), Metrics(CollectorRegistry()), logger)
    admission.records.decision(flow(), Status.DENIED, "destination not allowed")
    assert (admission.records.activity is not None) is enabled
    if enabled:
        assert len(admission.records.activity.refusals) == 1


@pytest.mark.parametrize("value", ["", "yes", "1", "on", "enabled"])
def test_status_page_setting_is_strict(value: str) -> None:
    with pytest.raises(SettingsError, match=r"STATUS_PAGE=.*expected true or false"):
        Settings.from_env({"STATUS_PAGE": value})


@pytest.mark.parametrize("query,expected", [
    ("", {}),
    ("refresh=1", {"refresh": 1}),
    ("refresh=3600&identity=app&dest=a.example:443", {"refresh": 3600, "identity": "app", "dest": "a.example:443"}),
    ("http=on&sni=&address=10.0.0.1,+10.0.0.2", {"http": True, "sni": "", "address": "10.0.0.1, 10.0.0.2"}),
    ("http=off", {"http": False}),
])
def test_query(query: str, expected: dict) -> None:
    assert parse_query(query) == expected


@pytest.mark.parametrize("query,words", [
    ("refresh=0", "refresh='0': expected whole seconds from 1 to 3600"),
    ("refresh=%EF%BC%95", "expected whole seconds"),  # a fullwidth digit: int() would take it
    ("refresh=+5", "expected whole seconds"),
    ("refresh=1&refresh=2", "'refresh' given twice"),
    ("nope=1", "unknown query parameter 'nope'"),
    ("a=1&b=2&c=3&d=4&e=5&f=6&g=7", "too many query parameters"),
    ("dest=%ff", "not UTF-8"),
    ("dest=" + "a" * 1001, "longer than 1000 characters"),
    ("http=yes", "http='yes': expected on or off"),
])
def test_bad_query(query: str, words: str) -> None:
    with pytest.raises(BadQuery) as raised:
        parse_query(query)
    assert words in str(raised.value)
