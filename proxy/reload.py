"""Policy reloads: watch the file, load it off the hub, swap it in, revoke what it refuses.

A reload reads and compiles the file into a new immutable snapshot and swaps
`Admission.policy` with one assignment; a file that fails to load never replaces a good
snapshot. After a swap, every open flow (tunnel or plain-HTTP exchange) is judged again
by the new policy, and the ones it refuses are closed (revocation).
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import gevent

import policy
from policy import Policy, PolicyError
from proxy.admission import Admission, refused_by

log = logging.getLogger("egress_guard")

FileState = tuple[int, int, int, int]


class Reloader:
    """Keeps `admission.policy` in step with the policy file."""

    def __init__(self, path: str, admission: Admission) -> None:
        self.path = path
        self.admission = admission
        self.metrics = admission.metrics
        self.records = admission.records
        self._file_state: FileState | None = None
        self.metrics.policy_loaded(destination_counts(admission.policy))

    def file_state(self) -> FileState | None:
        """What identifies the file's content; stat() follows the ConfigMap `..data` symlink."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def watch(self, interval: float) -> None:
        """Poll the policy file; reload when its mtime, size or inode changed."""
        self._file_state = self.file_state()
        while True:
            gevent.sleep(interval)
            state = self.file_state()
            if state != self._file_state:
                self._file_state = state
                self.reload("file changed")

    def reload(self, why: str) -> bool:
        """Load the file into a new snapshot and swap it in; keep the old one on failure."""
        # Compiling a large policy is CPU work: run it in the thread pool so the hub
        # keeps pumping live tunnels in between (the GIL changes hands every 5 ms).
        # The cyclic GC is paused meanwhile: a full collection triggered by the
        # compile's allocations would scan every object while holding the GIL, the
        # one long stall left (measured ~100 ms at 100k destinations; ~15 ms without).
        # A shorter GIL switch interval while the compile runs keeps each tunnel's wait
        # for the GIL near 1 ms instead of 5 ms.
        interval = sys.getswitchinterval()
        gc.disable()
        sys.setswitchinterval(0.001)
        try:
            fresh = gevent.get_hub().threadpool.apply(_load_quietly, (self.path,))
            if isinstance(fresh, PolicyError):
                self.metrics.load_errors.inc()
                log.error("policy reload failed; keeping the last good policy",
                          extra={"path": self.path, "trigger": why, "error": str(fresh)})
                return False
            # Freeing the old snapshot happens here, when its last reference goes.
            self.admission.policy = fresh
            # Long-lived snapshot objects leave the collector's generations before it is
            # switched back on, so no full collection rescans a large policy (they are
            # still freed by reference counting when a later reload replaces them).
            gc.freeze()
        finally:
            sys.setswitchinterval(interval)
            gc.enable()
        self.metrics.reloads.inc()
        self.metrics.policy_loaded(destination_counts(fresh))
        log.info("policy reloaded", extra={
            "path": self.path, "trigger": why, "policy": fresh.digest,
            "identities": len(fresh.identities), "destinations": fresh.destination_count,
        })
        self.revoke(fresh)
        return True

    def revoke(self, current: Policy) -> None:
        """Close open flows the new policy would refuse; leave every other one alone."""
        for flow in list(self.admission.open):
            if flow.http:
                continue  # an in-flight plain-HTTP exchange finishes; the next request is judged anew
            why = refused_by(current, flow)
            if why is not None:
                self.records.revoked(flow, why)
                flow.close("revoked")


def destination_counts(current: Policy) -> dict[str, int]:
    return {name: len(identity.rules) for name, identity in current.identities.items()}


def _load_quietly(path: str) -> Policy | PolicyError:
    """Runs in the thread pool: a PolicyError is returned, not raised, because gevent
    prints a traceback for every exception that leaves a pool thread."""
    try:
        return policy.load_policy_file(path)
    except PolicyError as error:
        return error
