"""Loading a policy: text -> YAML -> validated raw data -> compiled `Policy`.

Validation collects every problem before failing, so an operator fixes a file in one
pass. Each problem names the identity and the entry (``allowed_destinations[3] '*a.com'``)
but refers to API keys only by position (``api_keys[2]``): the message ends up in logs
and CI output, keys must not. Unknown keys are errors at every level, because a typo
such as ``allowed_destination`` would otherwise silently allow nothing (or everything).
Duplicate YAML keys are errors too; PyYAML would silently keep the last one.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .addresses import DEFAULT_FORBIDDEN, ForbiddenRanges, NetworkError, network_key, parse_network
from .certificates import EntryError, parse_entry
from .destinations import DestinationError, parse_destination
from .expectations import Expectation, parse_tests, run_tests
from .model import MODES, Identity, Policy, PolicyError, Rule, key_digest, release
from .problems import show, type_name, unknown_keys

__all__ = ["load_policy_file", "load_policy_text", "warnings"]

TOP_KEYS = ("identities", "settings", "tests")
SETTINGS_KEYS = ("forbidden_ranges",)
IDENTITY_KEYS = ("api_keys", "client_certificates", "allowed_destinations", "mode", "require_tls", "allow_http", "max_tunnels")

# "-" is the identity label of unauthenticated requests in metrics and logs.
RESERVED_IDENTITY_NAMES = frozenset({"-"})
MAX_IDENTITY_NAME = 128
_HASHED_PREFIX = "sha256:"
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """Read, validate and compile a policy file; raise PolicyError with a clear message."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PolicyError(["file not found"], source) from None
    except IsADirectoryError:
        raise PolicyError(["is a directory, not a policy file"], source) from None
    except PermissionError:
        raise PolicyError(["permission denied"], source) from None
    except OSError as err:
        raise PolicyError([f"cannot read: {err.strerror or err}"], source) from None
    try:
        # utf-8-sig: editors on some platforms prepend a byte order mark.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PolicyError([f"not valid UTF-8 (byte {err.start})"], source) from None
    return load_policy_text(text, source)


def load_policy_text(text: str, source: str = "<policy>") -> Policy:
    """Validate and compile policy text; raise PolicyError listing every problem."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    data, problems = _parse_yaml(text, source)
    compiler = _Compiler(problems)
    policy = compiler.compile(data, digest)
    _let_go(data)
    if problems or policy is None:
        raise PolicyError(problems, source)
    # The tests: section is judged only against a policy that is otherwise valid.
    failures = run_tests(policy, compiler.tests)
    if failures:
        raise PolicyError(failures, source)
    return policy


def _let_go(data: Any) -> None:
    """Free the parsed document one identity at a time. Freeing a container is C code that
    holds the GIL until everything inside it is gone: a 100,000-destination document
    dropped whole would stop the proxy's event loop (reloads run in a thread) for tens of
    milliseconds; piece by piece, the loop gets the GIL back in between."""
    identities = data.get("identities") if isinstance(data, dict) else None
    if isinstance(identities, dict):
        while identities:
            identities.popitem()


# --- YAML -------------------------------------------------------------------------------

_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _PolicyLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """The safe loader (libyaml when available); duplicate keys are found on its nodes."""


# Networks at least this wide get a warning: a /8 of IPv4, a /32 of IPv6 (an ISP's share).
WIDE_PREFIX = {4: 8, 6: 32}


def warnings(policy: Policy) -> list[str]:
    """Things a valid policy allows that are rarely meant: one line each (never a key)."""
    found = []
    for name, identity in policy.identities.items():
        for rule in identity.rules:
            if rule.kind != "cidr":
                continue
            version, _, prefix = network_key(rule.target)
            if prefix <= WIDE_PREFIX[version]:
                found.append(
                    f"identity {show(name)}: allowed_destinations {show(rule.text)} is a /{prefix} network "
                    f"(as wide as a /{WIDE_PREFIX[version]} or wider): it reaches a large share of the "
                    "internet; it never unlocks a forbidden address (list those by address)"
                )
    return found


def _parse_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    loader = _PolicyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        problems = _duplicate_keys(loader, node)
        return loader.construct_document(node), problems
    except yaml.MarkedYAMLError as err:
        raise _yaml_error(err, text, source) from None
    except yaml.YAMLError as err:
        raise PolicyError([f"invalid YAML: {err}"], source) from None
    except RecursionError:
        raise PolicyError(["invalid YAML: nested too deeply"], source) from None
    finally:
        loader.dispose()


def _yaml_error(err: yaml.MarkedYAMLError, text: str, source: str) -> PolicyError:
    """A YAML syntax error: one problem, at the line and column the parser names, with a
    hint when it is one of the classic mistakes."""
    mark = err.problem_mark or err.context_mark
    what = ": ".join(part for part in (err.context, err.problem) if part) or "syntax error"
    what = " ".join(what.split())  # one line, whatever the parser put in its message
    hint = _yaml_hint(err, _yaml_lines(text))
    problem = f"invalid YAML: {what}" + (f"; hint: {hint}" if hint else "")
    position = None if mark is None else (mark.line + 1, mark.column + 1)
    return PolicyError([problem], source, position)


# The line breaks YAML counts lines by (str.splitlines knows more, e.g. form feed).
_YAML_LINE_BREAK_RE = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")
# An alias as written: "*" and what follows up to a space or a flow indicator.
_ALIAS_TOKEN_RE = re.compile(r"\*[^\s,\[\]{}#]*")


def _yaml_lines(text: str) -> list[str]:
    return _YAML_LINE_BREAK_RE.split(text)


def _char_at(lines: list[str], mark: Any) -> str:
    """The character `mark` points at ("" past the end of a line or the text)."""
    if mark is None or mark.line >= len(lines):
        return ""
    return lines[mark.line][mark.column : mark.column + 1]


def _yaml_hint(err: yaml.MarkedYAMLError, lines: list[str]) -> str | None:
    """What to do about the two mistakes that account for most broken policy files, when
    the parser's error and the offending text show it is one of them (never a guess):

    - an unquoted wildcard, ``- *.example.com``: YAML reads a leading ``*`` as an alias
      (libyaml: "while scanning an alias: did not find expected alphabetic or numeric
      character"; a name such as ``*example`` is "found undefined alias");
    - a tab in the indentation ("found character that cannot start any token" at a tab,
      or "found a tab character that violates indentation").
    """
    problem = err.problem or ""
    if "tab character" in problem or _char_at(lines, err.problem_mark) == "\t":
        return "indent with spaces; YAML does not allow tabs"
    if err.context == "while scanning an alias":
        star = err.context_mark
    elif problem.startswith("found undefined alias"):
        star = err.problem_mark
    else:
        return None
    if _char_at(lines, star) != "*":
        return None
    token = _ALIAS_TOKEN_RE.match(lines[star.line], star.column)
    # An alias name is letters, digits, "-" and "_": with a dot it can only be a host name.
    if token is None or "." not in token.group():
        return None
    # The entry itself is not echoed: whatever the line holds might be a key.
    return 'quote wildcard entries, as in "*.example.com" (YAML reads a leading * as an alias)'


def _duplicate_keys(loader: Any, root: Node) -> list[str]:
    """Every mapping key that occurs twice in one mapping, with both line numbers."""
    found: list[tuple[int, str]] = []
    visited: set[int] = set()
    stack: list[tuple[Node, tuple[Any, ...]]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in visited:  # aliases share nodes; walk each once
            continue
        visited.add(id(node))
        if isinstance(node, MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key: Any = None
                if isinstance(key_node, ScalarNode):
                    key = loader.construct_object(key_node)
                    try:
                        hash(key)
                    except TypeError:
                        key = None
                line = key_node.start_mark.line + 1
                if key is not None and key in first_line:
                    found.append((line, _duplicate_message(path, key, first_line[key], line)))
                elif key is not None:
                    first_line[key] = line
                stack.append((value_node, path + (key,)))
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                stack.append((item, path + (index,)))
    return [message for _, message in sorted(found)]


def _duplicate_message(path: tuple[Any, ...], key: Any, first: int, again: int) -> str:
    lines = f"(lines {first} and {again})"
    if "api_keys" in path:
        # Whatever sits under api_keys may be a secret; say where, not what.
        return f"{_where(path)}: duplicate mapping key {lines}"
    if path == ("identities",):
        return f"identities: duplicate identity {show(key)} {lines}"
    where = _where(path)
    return f"{where + ': ' if where else ''}duplicate key {show(key)} {lines}"


def _where(path: tuple[Any, ...]) -> str:
    if len(path) >= 2 and path[0] == "identities":
        rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[2:])
        return f"identity {show(path[1])}" + (f" {rest.lstrip('.')}" if rest else "")
    return ".".join(str(p) for p in path)


def _bad_text(value: str) -> bool:
    """Whitespace, control or format characters: invisible in logs, or able to fake a line."""
    if value.isascii():
        return any(ch <= " " or ch == "\x7f" for ch in value)
    return any(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in value)


# --- validation and compilation -----------------------------------------------------------


class _Compiler:
    """Turns raw YAML data into a Policy, appending every problem to `problems`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        # digest -> (identity name, index) of the first key with that digest
        self.keys: dict[bytes, tuple[str, int]] = {}
        # canonical client_certificates entry -> (identity name, index) of its first use
        self.certificates: dict[str, tuple[str, int]] = {}
        # the tests: section, validated (run by load_policy_text once the policy compiled)
        self.tests: tuple[Expectation, ...] = ()

    def compile(self, data: Any, digest: str) -> Policy | None:
        problems = self.problems
        if data is None:
            problems.append("policy is empty: expected a mapping with an 'identities' key")
            return None
        if not isinstance(data, dict):
            problems.append(f"policy must be a mapping with an 'identities' key, not {type_name(data)}")
            return None
        problems.extend(unknown_keys("", data, TOP_KEYS))
        forbidden = self.settings(data.get("settings"))
        raw_identities = data.get("identities")
        if "identities" not in data:
            problems.append("missing 'identities': the policy defines no identity")
            return None
        if not isinstance(raw_identities, dict):
            problems.append(
                f"'identities' must be a mapping of identity name to settings, not {type_name(raw_identities)}"
            )
            return None
        if not raw_identities:
            problems.append("'identities' is empty: define at least one identity")
            return None
        identities = {}
        for name, raw in raw_identities.items():
            identity = self.identity(name, raw)
            if identity is not None:
                identities[name] = identity
        self.tests, found = parse_tests(data.get("tests"), raw_identities, self.keys)
        problems.extend(found)
        if problems:
            return None
        key_digests = {d: name for d, (name, _) in self.keys.items()}
        certificates = {entry: name for entry, (name, _) in self.certificates.items()}
        return Policy(identities=identities, key_digests=key_digests, certificates=certificates,
                      forbidden=forbidden, digest=digest, test_count=len(self.tests))

    def settings(self, raw: Any) -> ForbiddenRanges:
        if raw is None:
            return DEFAULT_FORBIDDEN
        if not isinstance(raw, dict):
            self.problems.append(f"settings: must be a mapping, not {type_name(raw)}")
            return DEFAULT_FORBIDDEN
        self.problems.extend(unknown_keys("settings: ", raw, SETTINGS_KEYS))
        if "forbidden_ranges" not in raw:
            return DEFAULT_FORBIDDEN
        entries = raw["forbidden_ranges"]
        if not isinstance(entries, list):
            self.problems.append(
                f"settings: forbidden_ranges must be a list of CIDRs or IP addresses ([] disables the guard), "
                f"not {type_name(entries)}"
            )
            return DEFAULT_FORBIDDEN
        ranges = []
        for index, entry in enumerate(entries):
            where = f"settings: forbidden_ranges[{index}]"
            if not isinstance(entry, str):
                self.problems.append(f"{where} {show(entry)}: must be a string CIDR or IP address")
                continue
            try:
                ranges.append((parse_network(entry), "configured"))
            except NetworkError as err:
                self.problems.append(f"{where} {show(entry)}: {err}")
        return ForbiddenRanges(tuple(ranges))

    def identity(self, name: Any, raw: Any) -> Identity | None:
        where = f"identity {show(name)}: "
        start = len(self.problems)
        self.identity_name(name)
        if not isinstance(raw, dict):
            self.problems.append(
                f"{where}must be a mapping with api_keys (or client_certificates) and allowed_destinations, "
                f"not {type_name(raw)}"
            )
            return None
        self.problems.extend(unknown_keys(where, raw, IDENTITY_KEYS))
        mode = raw.get("mode", "enforce")
        if mode not in MODES:
            self.problems.append(f"{where}mode {show(mode)}: must be 'enforce' or 'report'")
        options = {}
        for option in ("require_tls", "allow_http"):
            value = raw.get(option, True)
            if not isinstance(value, bool):
                self.problems.append(f"{where}{option} {show(value)}: must be true or false")
            options[option] = value
        max_tunnels = raw.get("max_tunnels")
        # bool is an int subclass in Python; "max_tunnels: yes" is a mistake, not 1.
        if max_tunnels is not None and (type(max_tunnels) is not int or max_tunnels < 1):
            self.problems.append(f"{where}max_tunnels {show(max_tunnels)}: must be a positive integer")
        elif "max_tunnels" in raw and max_tunnels is None:
            self.problems.append(f"{where}max_tunnels: must be a positive integer (omit it for no limit)")
        certificates = self.client_certificates(name, where, raw)
        listed = raw.get("client_certificates")
        self.api_keys(name, where, raw, required=not (isinstance(listed, list) and listed))
        rules = self.destinations(where, raw, report=mode == "report")
        if len(self.problems) > start:
            return None
        identity = Identity(
            name=name,
            mode=mode,
            require_tls=options["require_tls"],
            allow_http=options["allow_http"],
            max_tunnels=max_tunnels,
            rules=rules,
            certificates=certificates,
        )
        release(rules)  # the Rule values are not kept (model.release says why this way)
        return identity

    def identity_name(self, name: Any) -> None:
        if not isinstance(name, str):
            self.problems.append(f"identity name {show(name)}: must be a string")
        elif not name:
            self.problems.append("identity name '': must not be empty")
        elif len(name) > MAX_IDENTITY_NAME:
            self.problems.append(f"identity name {show(name)}: longer than {MAX_IDENTITY_NAME} characters")
        elif _bad_text(name):
            self.problems.append(f"identity name {show(name)}: must not contain whitespace or control characters")
        elif name in RESERVED_IDENTITY_NAMES:
            self.problems.append(f"identity name {name!r}: reserved for unauthenticated requests")

    def api_keys(self, name: Any, where: str, raw: dict[Any, Any], *, required: bool) -> None:
        """`required`: the identity has no client_certificates entry, so it needs a key."""
        if "api_keys" not in raw:
            if required:
                self.problems.append(f"{where}missing api_keys (or client_certificates): "
                                     "an identity needs at least one way to prove it")
            return
        keys = raw["api_keys"]
        if not isinstance(keys, list):
            # The value is not shown: it may be a key written without the list dash.
            self.problems.append(f"{where}api_keys must be a list of keys, not {type_name(keys)}")
            return
        if not keys and required:
            self.problems.append(f"{where}api_keys is empty: an identity needs at least one key "
                                 "(or a client_certificates entry)")
        for index, key in enumerate(keys):
            label = f"{where}api_keys[{index}]"
            digest = self.key(label, key)
            if digest is None:
                continue
            seen = self.keys.get(digest)
            if seen is None:
                self.keys[digest] = (name, index)
            elif seen[0] == name:
                self.problems.append(f"{label}: same key as api_keys[{seen[1]}]")
            else:
                self.problems.append(
                    f"{label}: same key as identity {show(seen[0])} api_keys[{seen[1]}]; "
                    f"keys must be unique across identities"
                )

    def client_certificates(self, name: Any, where: str, raw: dict[Any, Any]) -> tuple[str, ...]:
        """The canonical `client_certificates` entries of one identity (policy/certificates.py);
        each entry may name one identity only."""
        if "client_certificates" not in raw:
            return ()
        entries = raw["client_certificates"]
        if not isinstance(entries, list):
            self.problems.append(f"{where}client_certificates must be a list of entries such as "
                                 f"'uri:spiffe://...', not {type_name(entries)}")
            return ()
        found: list[str] = []
        for index, entry in enumerate(entries):
            label = f"{where}client_certificates[{index}] {show(entry)}"
            try:
                canonical = parse_entry(entry)
            except EntryError as err:
                self.problems.append(f"{label}: {err}")
                continue
            seen = self.certificates.get(canonical)
            if seen is None:
                self.certificates[canonical] = (name, index)
                found.append(canonical)
            elif seen[0] == name:
                self.problems.append(f"{label}: same entry as client_certificates[{seen[1]}]")
            else:
                self.problems.append(f"{label}: also in identity {show(seen[0])} client_certificates[{seen[1]}]; "
                                     "a certificate must name one identity")
        return tuple(found)

    def key(self, label: str, key: Any) -> bytes | None:
        """The stored digest of one api_keys entry, or None after recording a problem."""
        if not isinstance(key, str):
            self.problems.append(f"{label}: must be a string, not {type_name(key)} (quote it in YAML)")
            return None
        if not key:
            self.problems.append(f"{label}: empty key")
            return None
        if key.startswith(_HASHED_PREFIX):
            hexdigits = key[len(_HASHED_PREFIX) :]
            if not _HEX64_RE.fullmatch(hexdigits):
                self.problems.append(f"{label}: 'sha256:' must be followed by exactly 64 hex digits")
                return None
            return bytes.fromhex(hexdigits)
        if ":" in key:
            self.problems.append(f"{label}: contains ':', which a Basic auth username cannot")
            return None
        if _bad_text(key):
            self.problems.append(f"{label}: contains whitespace or control characters")
            return None
        return key_digest(key)

    def destinations(self, where: str, raw: dict[Any, Any], report: bool) -> list[Rule]:
        if "allowed_destinations" not in raw:
            self.problems.append(f"{where}missing allowed_destinations")
            return []
        entries = raw["allowed_destinations"]
        if not isinstance(entries, list):
            self.problems.append(f"{where}allowed_destinations must be a list, not {type_name(entries)}")
            return []
        if not entries and not report:
            # In report mode an empty list is useful: it records everything the workload calls.
            self.problems.append(f"{where}allowed_destinations is empty: it would deny everything")
        rules = []
        for index, entry in enumerate(entries):
            try:
                rules.append(parse_destination(entry))
            except DestinationError as err:
                self.problems.append(f"{where}allowed_destinations[{index}] {show(entry)}: {err}")
        return rules
