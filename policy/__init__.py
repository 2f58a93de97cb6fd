"""egress-guard policy: load, validate, compile and decide. Pure: no I/O beyond reading
the policy file in `load_policy_file`, no sockets, no logging.

Typical use by the proxy::

    policy = load_policy_file(path)            # PolicyError lists every problem
    identity = policy.authenticate(api_key)    # None: 407
    target = parse_host(host_text)             # HostError: 400
    decision = decide_destination(identity, target, port)
    decision = decide_addresses(policy, identity, resolved, port)
    decision = decide_sni(identity, target, port, sni)   # or decide_plaintext(identity)
"""

from .addresses import DEFAULT_FORBIDDEN, ForbiddenRanges
from .decide import Decision, decide_addresses, decide_destination, decide_http, decide_plaintext, decide_sni
from .destinations import DestinationError, parse_destination
from .hosts import Host, HostError, parse_host
from .load import load_policy_file, load_policy_text
from .model import Identity, Policy, PolicyError, PortRange, Rule

__all__ = [
    "DEFAULT_FORBIDDEN",
    "Decision",
    "DestinationError",
    "ForbiddenRanges",
    "Host",
    "HostError",
    "Identity",
    "Policy",
    "PolicyError",
    "PortRange",
    "Rule",
    "decide_addresses",
    "decide_destination",
    "decide_http",
    "decide_plaintext",
    "decide_sni",
    "load_policy_file",
    "load_policy_text",
    "parse_destination",
    "parse_host",
]
