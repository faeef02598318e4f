"""Reading a policy from its TOML file: syntax, keys, types, ranges and ``extends``, checked before anything runs.

Every error is one :class:`~pytest_sandbox.errors.PolicyError` naming the file, the field and the fix.
What a policy extends and the defaults it leaves out come from the loader (``load.py``), passed in as a
:class:`PolicyLibrary`, so this module imports only the model.
"""

from __future__ import annotations

import difflib
import errno as errno_module
import sys
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.inference.routes import InferenceRoute
from pytest_sandbox.policy.checks import read_policy_text
from pytest_sandbox.policy.model import (
    ACTIONS,
    ARG_MAX,
    EXTRA_ARCHES,
    MAX_ERRNO,
    NETWORK_MODES,
    OPERATORS,
    SOCKET_FAMILIES,
    ArgRule,
    NetworkPolicy,
    Policy,
    SeccompPolicy,
    known_syscall_names,
    resolve_native_syscall,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the py310 tox env
    import tomli as tomllib


class PolicyLibrary(Protocol):
    """What a TOML policy needs from the loader: the policy it extends and the baseline's defaults."""

    def extended_path(self, base: str, child: Path) -> Path:
        """Where ``extends = base`` in ``child`` points: a bundled policy, or a path beside ``child``."""
        ...

    def load(self, path: Path) -> Policy:
        """The parent policy at ``path`` (TOML or an OCI profile)."""
        ...

    def is_baseline(self, path: Path) -> bool:
        """Whether ``path`` is the bundled baseline, which sets every default itself."""
        ...

    def baseline(self) -> Policy:
        """The bundled baseline: what a policy without ``extends`` leaves out."""
        ...

    def __hash__(self) -> int:  # parsed policies are cached per (path, text, library)
        ...


def load_toml_policy(path: Path, library: PolicyLibrary) -> Policy:
    """Read and validate the TOML policy at ``path`` (resolved); ``library`` supplies what it extends."""
    return _parse_policy(path, read_policy_text(path), library)


@lru_cache(maxsize=64)  # keyed by content too: a policy edited during a run is parsed again
def _parse_policy(path: Path, text: str, library: PolicyLibrary) -> Policy:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML ({exc}); fix the syntax at that position") from None
    return _PolicyParser(path, library).parse(document)


class _PolicyParser:
    TOP_KEYS = ("name", "description", "extends", "seccomp", "network", "inference")
    SECCOMP_KEYS = (
        "default_action", "default_errno", "errno", "bad_arch_action", "extra_arches", "no_new_privs",
        "deny", "enosys", "arg_rules", "skip_in_network_modes", "allow", "allow_rules",
    )  # fmt: skip
    RULE_KEYS = ("syscall", "arg", "op", "value", "mask", "errno", "why")
    NETWORK_KEYS = ("mode", "allowed_hosts", "allowed_ports", "socket_domains")
    DOMAIN_SCOPES = ("all_modes", *NETWORK_MODES)

    def __init__(self, path: Path, library: PolicyLibrary) -> None:
        self.path = path
        self.library = library

    def fail(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.path}: {where}: {message}")

    def check_keys(self, table: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(where, f"must be a table, got {type(table).__name__}")
        for key in table:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.fail(f"{where}.{key}" if where else key,
                                f"unknown key{suggestion}; allowed keys: {', '.join(allowed)}")
        return table

    def parse(self, document: dict[str, Any]) -> Policy:
        self.check_keys(document, self.TOP_KEYS, "")
        parent: Policy | None = None
        if "extends" in document:
            base = self.string(document["extends"], "extends")
            base_path = self.library.extended_path(base, self.path)
            if base_path.resolve() == self.path:
                raise self.fail("extends", "a policy cannot extend itself")
            parent = self.library.load(base_path)
        name = self.string(document.get("name", self.path.stem), "name")
        description = self.string(document.get("description", ""), "description")
        seccomp = self.parse_seccomp(document.get("seccomp", {}), parent.seccomp if parent else None)
        if parent is not None:
            network_base: NetworkPolicy | None = parent.network
            routes_base: tuple[InferenceRoute, ...] | None = parent.inference_routes
        elif self.library.is_baseline(self.path):
            network_base = routes_base = None  # the baseline is where the defaults come from: it sets them all
        else:
            # Without extends, what the network section and the routes leave out is the baseline's
            # (its socket-domain rules excepted: those are seccomp rules, and a policy states its own).
            network_base = replace(self.library.baseline().network, socket_domains=())
            routes_base = self.library.baseline().inference_routes
        network = self.parse_network(document.get("network", {}), network_base)
        routes = self.parse_inference(document.get("inference", {}), routes_base)
        return Policy(name, str(self.path), description, seccomp, network, routes)

    # -- scalar helpers ------------------------------------------------------------------------

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, got {value!r}")
        return value

    def choice(self, value: Any, options: tuple[str, ...], where: str) -> str:
        text = self.string(value, where)
        if text not in options:
            raise self.fail(where, f"{text!r} is not one of {', '.join(options)}")
        return text

    def string_list(self, value: Any, where: str) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(where, f"must be a list of strings, got {value!r}")
        return tuple(value)

    def integer(self, value: Any, where: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise self.fail(where, f"{value} is out of range; it must lie in {low}..{high}")
        return value

    def errno_value(self, value: Any, where: str) -> int:
        if isinstance(value, str):
            number = getattr(errno_module, value, None)
            if not isinstance(number, int) or not value.startswith("E"):
                raise self.fail(where, f"unknown errno name {value!r}; use a name such as EPERM or a number")
            return number
        if value == MAX_ERRNO + 1 and not isinstance(value, bool):
            raise self.fail(where, f"libseccomp refuses errno {value} (SCMP_ACT_ERRNO takes 1..{MAX_ERRNO}); "
                                   "use a smaller errno")
        number = self.integer(value, where, 0, MAX_ERRNO)
        if number == 0:
            # SECCOMP_RET_ERRNO with data 0 makes a denied call look successful (selftest ERRNO_zero).
            raise self.fail(where, "errno 0 makes a denied call look successful; use EPERM (1) or another errno")
        return number

    def syscall_name(self, value: Any, where: str) -> str:
        name = self.string(value, where)
        if resolve_native_syscall(name) is None:
            hint = difflib.get_close_matches(name, known_syscall_names(), n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
            raise self.fail(where, f"unknown syscall {name!r} on this architecture{suggestion} "
                                   "(names follow libseccomp / the kernel syscall table)")
        return name

    def syscall_list(self, value: Any, where: str) -> tuple[str, ...]:
        names = self.string_list(value, where)
        return tuple(self.syscall_name(n, f"{where}[{i}]") for i, n in enumerate(names))

    # -- sections --------------------------------------------------------------------------------

    def parse_seccomp(self, table: Any, parent: SeccompPolicy | None) -> SeccompPolicy:
        table = self.check_keys(table, self.SECCOMP_KEYS, "seccomp")
        base = parent or SeccompPolicy()
        values: dict[str, Any] = {}
        if "default_action" in table:
            values["default_action"] = self.choice(table["default_action"], ACTIONS, "seccomp.default_action")
        if "default_errno" in table:
            values["default_errno"] = self.errno_value(table["default_errno"], "seccomp.default_errno")
        if "errno" in table:
            values["errno"] = self.errno_value(table["errno"], "seccomp.errno")
        if "bad_arch_action" in table:
            action = self.choice(table["bad_arch_action"], ACTIONS, "seccomp.bad_arch_action")
            if action == "allow":
                raise self.fail("seccomp.bad_arch_action", "'allow' lets every foreign-ABI call through; "
                                                           "use kill_process")
            values["bad_arch_action"] = action
        if "extra_arches" in table:
            arches = self.string_list(table["extra_arches"], "seccomp.extra_arches")
            for i, arch in enumerate(arches):
                self.choice(arch, EXTRA_ARCHES, f"seccomp.extra_arches[{i}]")
            values["extra_arches"] = arches
        if "no_new_privs" in table:
            if not isinstance(table["no_new_privs"], bool):
                raise self.fail("seccomp.no_new_privs", "must be true or false")
            values["no_new_privs"] = table["no_new_privs"]
        if "deny" in table:
            values["deny"] = _merge(base.deny, self.syscall_list(table["deny"], "seccomp.deny"))
        if "enosys" in table:
            values["enosys"] = _merge(base.enosys, self.syscall_list(table["enosys"], "seccomp.enosys"))
        if "skip_in_network_modes" in table:
            modes = self.string_list(table["skip_in_network_modes"], "seccomp.skip_in_network_modes")
            for i, mode in enumerate(modes):
                self.choice(mode, NETWORK_MODES, f"seccomp.skip_in_network_modes[{i}]")
            values["skip_in_network_modes"] = modes
        for key in ("arg_rules", "allow_rules"):
            if key in table:
                if not isinstance(table[key], list):
                    raise self.fail(f"seccomp.{key}", f"must be an array of tables ([[seccomp.{key}]])")
                rules = tuple(self.parse_rule(r, f"seccomp.{key}[{i}]") for i, r in enumerate(table[key]))
                values[key] = getattr(base, key) + tuple(r for r in rules if r not in getattr(base, key))
        if "allow" in table:
            values["allow"] = _merge(base.allow, self.syscall_list(table["allow"], "seccomp.allow"))
        merged = replace(base, **values)
        if (merged.allow or merged.allow_rules) and not merged.is_allowlist:
            raise self.fail("seccomp.allow", "allow rules only mean something when default_action refuses; "
                                             "set default_action = \"errno\" (an allowlist) or drop them")
        overlap = set(merged.deny) & set(merged.enosys)
        if overlap:
            raise self.fail("seccomp.enosys", f"{sorted(overlap)} also listed in seccomp.deny; keep each in one list")
        return merged

    def parse_rule(self, table: Any, where: str) -> ArgRule:
        table = self.check_keys(table, self.RULE_KEYS, where)
        for required in ("syscall", "arg", "op", "value"):
            if required not in table:
                raise self.fail(where, f"missing {required!r}; a rule needs syscall, arg, op and value")
        syscall = self.syscall_name(table["syscall"], f"{where}.syscall")
        arg = self.integer(table["arg"], f"{where}.arg", 0, 5)
        op = self.choice(table["op"], OPERATORS, f"{where}.op")
        value = self.integer(table["value"], f"{where}.value", 0, ARG_MAX)
        mask = self.integer(table.get("mask", 0xFFFFFFFF), f"{where}.mask", 1, 0xFFFFFFFF)
        if op in ("eq", "masked_eq") and value > 0xFFFFFFFF:
            raise self.fail(f"{where}.value", f"{value:#x} exceeds 32 bits; eq and masked_eq compare the low 32 bits")
        if op == "masked_eq" and value & ~mask:
            raise self.fail(f"{where}.value", f"{value:#x} has bits outside mask {mask:#x}, so it can never match")
        if op != "masked_eq" and "mask" in table:
            raise self.fail(f"{where}.mask", "mask is only meaningful with op = \"masked_eq\"")
        rule_errno = self.errno_value(table["errno"], f"{where}.errno") if "errno" in table else None
        why = self.string(table.get("why", ""), f"{where}.why")
        return ArgRule(syscall, arg, op, value, mask, rule_errno, why)

    def parse_network(self, table: Any, parent: NetworkPolicy | None) -> NetworkPolicy:
        """``parent`` None: the baseline itself, which must set every field (it has no defaults)."""
        table = self.check_keys(table, self.NETWORK_KEYS, "network")
        if parent is None:
            missing = [key for key in ("mode", "allowed_hosts", "allowed_ports") if key not in table]
            if missing:
                raise self.fail("network", f"the baseline policy must set {', '.join(missing)}: every "
                                           "other policy takes its defaults from it")
        values: dict[str, Any] = {}
        if "mode" in table:
            values["mode"] = self.choice(table["mode"], NETWORK_MODES, "network.mode")
        if "allowed_hosts" in table:
            values["allowed_hosts"] = self.string_list(table["allowed_hosts"], "network.allowed_hosts")
        if "allowed_ports" in table:
            ports = table["allowed_ports"]
            if not isinstance(ports, list):
                raise self.fail("network.allowed_ports", "must be a list of port numbers")
            values["allowed_ports"] = tuple(
                self.integer(p, f"network.allowed_ports[{i}]", 1, 65535) for i, p in enumerate(ports)
            )
        if "socket_domains" in table:
            domains = self.check_keys(table["socket_domains"], self.DOMAIN_SCOPES, "network.socket_domains")
            scoped = dict(parent.socket_domains if parent else ())
            for scope, families in domains.items():
                where = f"network.socket_domains.{scope}"
                if not isinstance(families, list):
                    raise self.fail(where, "must be a list of address families such as \"AF_PACKET\"")
                numbers = tuple(self.family(f, f"{where}[{i}]") for i, f in enumerate(families))
                scoped[scope] = tuple(dict.fromkeys(scoped.get(scope, ()) + numbers))
            values["socket_domains"] = tuple(sorted(scoped.items()))
        return NetworkPolicy(**values) if parent is None else replace(parent, **values)

    def family(self, value: Any, where: str) -> int:
        if isinstance(value, str):
            if value not in SOCKET_FAMILIES:
                hint = difflib.get_close_matches(value, list(SOCKET_FAMILIES), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise self.fail(where, f"unknown address family {value!r}{suggestion}")
            return SOCKET_FAMILIES[value]
        return self.integer(value, where, 0, 63)

    def parse_inference(self, table: Any, parent: tuple[InferenceRoute, ...] | None) -> tuple[InferenceRoute, ...]:
        """The routes replace the parent's (``routes = []``: nothing is inference traffic). ``parent``
        None: the baseline itself, which must list its routes."""
        table = self.check_keys(table, ("routes",), "inference")
        if "routes" not in table:
            if parent is None:
                raise self.fail("inference.routes", "the baseline policy must list its routes: every other "
                                                    "policy takes its defaults from it")
            return parent
        routes = table["routes"]
        if not isinstance(routes, list):
            raise self.fail("inference.routes", "must be an array of tables ([[inference.routes]])")
        parsed = []
        for i, route in enumerate(routes):
            where = f"inference.routes[{i}]"
            route = self.check_keys(route, ("method", "path"), where)
            method = self.choice(route.get("method"), ("GET", "POST", "PUT", "DELETE", "PATCH"), f"{where}.method")
            path = self.string(route.get("path"), f"{where}.path")
            if not path.startswith("/"):
                raise self.fail(f"{where}.path", f"{path!r} must start with '/'")
            try:
                parsed.append(InferenceRoute(method, path))
            except ValueError as error:  # a path the strict matcher could never match
                raise self.fail(f"{where}.path", f"{error}; write each segment literally (no %, '.', '..' or "
                                                 "empty segments), '*' for one segment") from None
        return tuple(dict.fromkeys(parsed))


def _merge(base: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(base + extra))
