"""Policy reloads in process: one at a time, the newest file wins, nothing pinned.

A real `Reloader` over a real `Admission`, with policy files on disk and the compile in
gevent's thread pool, as the server runs it; the triggers are called the way SIGHUP and
the watcher call them.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import weakref
from pathlib import Path

import gevent
from prometheus_client import CollectorRegistry

import policy
from proxy.admission import Admission
from proxy.observe import Metrics
from proxy.reload import Reloader, file_state
from proxy.settings import Settings


def big_policy(n: int) -> str:
    rules = "\n".join(f'      - "host{i}.big.example.test"' for i in range(n))
    return ("identities:\n  big:\n    api_keys: [big-key]\n    allowed_destinations:\n" + rules + "\n"
            "  gone:\n    api_keys: [gone-key]\n    allowed_destinations: [gone.example.test]\n")


SMALL = "identities:\n  big:\n    api_keys: [big-key]\n    allowed_destinations: [small.example.test]\n"


def reloader_for(path: Path, text: str) -> Reloader:
    path.write_text(text)
    loaded = file_state(str(path))
    admission = Admission(Settings(), policy.load_policy_file(path), Metrics(CollectorRegistry()),
                          logging.getLogger("test-reload"))
    return Reloader(str(path), admission, loaded)


def digest_of(text: str) -> str:
    return policy.load_policy_text(text).digest


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_overlapping_reloads_end_with_the_newest_file(tmp_path: Path) -> None:
    """SIGHUP after a large policy, then a small one written and SIGHUP again while the
    large one still compiles: the small one must be in force at the end (not the large
    one finishing last), and the GIL switch interval must be back to what it was."""
    path = tmp_path / "policy.yaml"
    reloader = reloader_for(path, SMALL.replace("small", "first"))
    interval = sys.getswitchinterval()
    write(path, big_policy(60_000))
    first = gevent.spawn(reloader.request, "SIGHUP")
    gevent.sleep(0.2)  # the large compile is under way
    assert reloader._loading  # noqa: SLF001
    write(path, SMALL)
    second = gevent.spawn(reloader.request, "SIGHUP")
    gevent.joinall([first, second], timeout=60, raise_error=True)
    assert reloader.admission.policy.digest == digest_of(SMALL)
    assert reloader.admission.policy.authenticate("gone-key") is None
    assert sys.getswitchinterval() == interval


def test_a_file_changed_during_a_reload_is_loaded_again(tmp_path: Path) -> None:
    """No second trigger at all: the file's state after the load differs from before it,
    so the reload runs again (the watcher would otherwise think it current)."""
    path = tmp_path / "policy.yaml"
    reloader = reloader_for(path, SMALL.replace("small", "first"))
    write(path, big_policy(60_000))
    loading = gevent.spawn(reloader.request, "file changed")
    gevent.sleep(0.2)
    write(path, SMALL)
    loading.join(timeout=60)
    assert loading.successful()
    assert reloader.admission.policy.digest == digest_of(SMALL)
    # ...and the watcher, seeing the state it last read, has nothing more to do.
    assert reloader.file_state() == reloader._file_state  # noqa: SLF001


def test_a_refused_file_is_not_retried_until_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    reloader = reloader_for(path, SMALL)
    write(path, "identities: [broken\n")
    reloader.request("file changed")
    errors = reloader.metrics.load_errors._value.get()  # noqa: SLF001
    assert errors == 1 and reloader.admission.policy.digest == digest_of(SMALL)
    assert reloader.file_state() == reloader._file_state  # noqa: SLF001


def test_reloads_pin_no_garbage(tmp_path: Path) -> None:
    """Cyclic garbage that exists when a reload runs (a failed upload's traceback, say)
    is still collected afterwards: nothing is frozen."""
    path = tmp_path / "policy.yaml"
    reloader = reloader_for(path, SMALL)

    class Node:
        pass

    gc.collect()
    probes = []
    for round_ in range(5):
        node = Node()
        node.self = node  # a reference cycle: only the cyclic collector frees it
        probes.append(weakref.ref(node))
        del node
        write(path, SMALL.replace("small", f"v{round_}"))
        reloader.request("SIGHUP")
    gc.collect()
    assert all(probe() is None for probe in probes), "garbage survived a reload"
    assert gc.get_freeze_count() == 0


def test_a_large_policy_gives_the_collector_almost_nothing_to_track(tmp_path: Path) -> None:
    """Why nothing needs freezing: rules are stored as plain data."""
    gc.collect()
    before = len(gc.get_objects())
    big = policy.load_policy_text(big_policy(20_000))
    tracked = len(gc.get_objects()) - before
    assert big.destination_count == 20_001
    # Not one object per rule (the host-name cache holds at most 4,096 entries).
    assert tracked < 5_000, f"{tracked} tracked objects for a 20,001-rule policy"
    assert big.identities["big"].match(policy.parse_host("host7.big.example.test"), 443) is not None


def test_the_replaced_snapshot_is_freed_once_the_reload_is_done(tmp_path: Path) -> None:
    """The old snapshot is let go a loop turn after the swap (proxy/reload.py), not kept:
    by reference counting alone, with the remembered verdicts on it."""
    path = tmp_path / "policy.yaml"
    reloader = reloader_for(path, big_policy(2_000))
    old = reloader.admission.policy
    policy.judge(old, "big-key", policy.Question(policy.parse_host("host7.big.example.test"), 443))
    assert old.verdicts  # the memory goes with the snapshot

    class Probe:  # a Policy takes no weak reference: something only it holds does
        pass

    probe = Probe()
    old.verdicts[("probe",)] = (None, probe)
    gone = weakref.ref(probe)
    del old, probe
    write(path, SMALL)
    gc.disable()  # reference counting alone must free it
    try:
        reloader.request("SIGHUP")
        assert gone() is None, "the replaced snapshot is still alive after the reload"
    finally:
        gc.enable()
    assert reloader.admission.policy.identities["big"].rule_count == 1
