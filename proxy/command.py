"""The `egress-guard` command that `pip install` creates (pyproject.toml).

It is `python egress_guard.py`: gevent's monkey patching comes first, before anything
imports socket or threading, so the server module is imported only here, inside
`main`. (The one import that runs upward in the module map.)
"""

from __future__ import annotations


def main() -> int:
    from gevent import monkey

    monkey.patch_all()
    import egress_guard

    return egress_guard.main()
