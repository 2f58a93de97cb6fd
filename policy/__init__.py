"""egress-guard policy: load, validate, compile and decide. Pure: no I/O beyond reading
the policy file in `load_policy_file`, no sockets, no logging.

Typical use by the proxy::

    policy = load_policy_file(path)                 # PolicyError lists every problem
    target = parse_host(host_text)                  # HostError: 400
    verdict = judge(policy, api_key, Question(target, port))
    verdict.allowed, verdict.status, verdict.reason, verdict.rule
    # later, as the proxy learns more (same function, more facts):
    verdict = judge(policy, api_key, Question(target, port, addresses=resolved, tls=True, sni=sni))
"""

from .addresses import DEFAULT_FORBIDDEN, ForbiddenRanges
from .decide import (
    Decision,
    Question,
    Status,
    Verdict,
    decide_addresses,
    decide_destination,
    decide_http,
    decide_plaintext,
    decide_sni,
    judge,
)
from .destinations import DestinationError, parse_destination
from .hosts import Host, HostError, parse_host, unwrap
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
    "Question",
    "Rule",
    "Status",
    "Verdict",
    "decide_addresses",
    "decide_destination",
    "decide_http",
    "decide_plaintext",
    "decide_sni",
    "judge",
    "load_policy_file",
    "load_policy_text",
    "parse_destination",
    "parse_host",
    "unwrap",
]
