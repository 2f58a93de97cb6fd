"""Policy reloads: watch the file, load it off the hub, swap it in, revoke what it refuses.

A reload reads and compiles the file into a new immutable snapshot and swaps
`Admission.policy` with one assignment; a file that fails to load never replaces a good
snapshot. After a swap, every open flow (tunnel or plain-HTTP exchange) is judged again
by the new policy, and the ones it refuses are closed (revocation).

Reloads are serialized: the watcher and SIGHUP only ask for one (`request`); one greenlet
at a time loads, and asks that arrive meanwhile are coalesced into one more load. The
file's state is taken before each read and compared after it, so a file that changed
while a large policy was compiling is loaded again: the newest content always wins.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time

import gevent

import policy
from policy import Policy, PolicyError
from policy.changes import Changes, changes
from proxy.admission import Admission, refused_by

log = logging.getLogger("egress_guard")

FileState = tuple[int, int, int, int]


class Reloader:
    """Keeps `admission.policy` in step with the policy file."""

    def __init__(self, path: str, admission: Admission, loaded: FileState | None = None) -> None:
        """`loaded`: the file's state taken just before the policy in force was read."""
        self.path = path
        self.admission = admission
        self.metrics = admission.metrics
        self.records = admission.records
        self._file_state = loaded  # the file as last read (loaded or refused)
        self._pending: str | None = None  # why another load was asked for meanwhile
        self._loading = False
        # Why the newest file was refused, while the last good policy serves (None: the
        # file in force is the newest); /ready reports it.
        self.rejected: str | None = None
        # Unix times of the swap of the policy in force and of the last rejection (the
        # status page shows both).
        self.loaded_at = time.time()
        self.rejected_at: float | None = None
        self.metrics.policy_loaded(destination_counts(admission.policy))

    def file_state(self) -> FileState | None:
        return file_state(self.path)

    def watch(self, interval: float) -> None:
        """Poll the policy file; reload when its mtime, size or inode changed since it
        was last read."""
        if self._file_state is None:
            self._file_state = self.file_state()
        while True:
            gevent.sleep(interval)
            if self.file_state() != self._file_state:
                self.request("file changed")

    def request(self, why: str) -> None:
        """Reload now, or once more after the reload under way (asks are coalesced)."""
        self._pending = why
        if self._loading:
            return
        self._loading = True
        try:
            while self._pending is not None:
                why, self._pending = self._pending, None
                state = self.file_state()
                self.reload(why)
                self._file_state = state
                if self.file_state() != state and self._pending is None:
                    self._pending = "file changed during reload"
        finally:
            self._loading = False

    def reload(self, why: str) -> bool:
        """Load the file into a new snapshot and swap it in; keep the old one on failure.
        Call through `request`, which keeps reloads one at a time."""
        # Compiling a large policy is CPU work: run it in the thread pool so the hub
        # keeps pumping live tunnels in between, with a short GIL switch interval so each
        # tunnel waits about 1 ms for the GIL rather than 5 ms. The cyclic collector is
        # paused meanwhile: the YAML parser's node tree is large, and full collections
        # triggered by its allocations would scan it again and again while holding the
        # GIL (stalls of hundreds of ms at 100k destinations). It is switched back on
        # afterwards, and finds little to scan: the compiled policy holds almost nothing
        # it tracks. (Nothing is frozen: that would also pin whatever garbage exists at
        # that moment, for good.)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.001)
        gc.disable()
        try:
            old = self.admission.policy
            loaded = gevent.get_hub().threadpool.apply(_load_quietly, (self.path, old))
        finally:
            gc.enable()
            sys.setswitchinterval(interval)
        if isinstance(loaded, PolicyError):
            self.metrics.load_errors.inc()
            self.rejected, self.rejected_at = str(loaded), time.time()
            log.error("policy reload failed; keeping the last good policy",
                      extra={"path": self.path, "trigger": why, "policy": old.digest, "error": str(loaded)})
            return False
        self.rejected = None
        fresh, changed = loaded
        if changed is None:
            # The same text (a touched file, a ConfigMap update that changed another
            # key): nothing to swap, count or re-judge.
            log.debug("policy file unchanged", extra={"path": self.path, "trigger": why, "policy": fresh.digest})
            return False
        self.admission.policy = fresh
        self.loaded_at = time.time()
        previous = old.digest
        retired = old  # freed below, in a turn of the loop of its own
        del old
        self.metrics.reloads.inc()
        self.metrics.policy_loaded(destination_counts(fresh))
        log.info("policy reloaded", extra={
            "path": self.path, "trigger": why, "policy": fresh.digest, "previous": previous,
            "identities": len(fresh.identities), "destinations": fresh.destination_count, **changed.fields(),
        })
        self.revoke(fresh)
        # Freeing a big snapshot holds the GIL until it is all gone (~13 ms at 100,000
        # destinations): not in the same turn as the swap's own work, so live tunnels
        # get a turn in between.
        gevent.sleep(0)
        del retired
        return True

    def revoke(self, current: Policy) -> None:
        """Close open flows the new policy would refuse; leave every other one alone."""
        for flow in list(self.admission.open):
            why = refused_by(current, flow)
            if why is not None:
                self.records.revoked(flow, why)
                flow.close("revoked")


def file_state(path: str) -> FileState | None:
    """What identifies a file's content; stat() follows the ConfigMap `..data` symlink."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def destination_counts(current: Policy) -> dict[str, int]:
    return {name: identity.rule_count for name, identity in current.identities.items()}


def _load_quietly(path: str, old: Policy) -> tuple[Policy, Changes | None] | PolicyError:
    """Runs in the thread pool: the new policy and how it differs from `old` (None: the
    same text), computed here too, off the hub. A PolicyError is returned, not raised,
    because gevent prints a traceback for every exception that leaves a pool thread."""
    try:
        fresh = policy.load_policy_file(path)
    except PolicyError as error:
        return error
    # The collector is paused (Reloader.reload): everything the load made is still young,
    # and the first collection would look at all of it (~10-20 ms at 100,000
    # destinations, holding the GIL). Here, rather than at the swap.
    gc.collect(0)
    if fresh.digest == old.digest:
        return fresh, None
    return fresh, changes(old, fresh)
