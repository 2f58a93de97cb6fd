"""`python egress_guard.py`, counting its work: the budget test's proxy.

The same `main()` a user runs, started the same way (environment, cwd = the repo), with
two counters added: `greenlet.settrace` counts every switch into a greenlet, and
`sys.setprofile` every Python-level function call (calls into C included), in every
greenlet. The totals are written as JSON to $SWITCH_COUNT_FILE when the process exits.
Not part of the product.
"""

from gevent import monkey

monkey.patch_all()

import atexit  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import greenlet  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import egress_guard  # noqa: E402

switches = [0]
calls = [0]


def count(event: str, _args: object) -> None:
    if event in ("switch", "throw"):
        switches[0] += 1


def profile(_frame: object, event: str, _arg: object) -> None:
    if event == "call" or event == "c_call":
        calls[0] += 1


def report() -> None:
    sys.setprofile(None)
    with open(os.environ["SWITCH_COUNT_FILE"], "w") as out:
        json.dump({"switches": switches[0], "calls": calls[0]}, out)


greenlet.settrace(count)
sys.setprofile(profile)
atexit.register(report)
sys.exit(egress_guard.main([]))
