"""The sandbox policy: a documented TOML file, loaded into frozen dataclasses and validated.

A policy says what the reference sandbox enforces (seccomp denylist, argument rules, ENOSYS rules,
socket-domain rules per network mode, the network mode, the egress allowlist and inference routes).
Validation fails closed: every error names the file, the field and the fix, before anything runs.
The format is documented field by field in README.md, section "Policy format".
"""

from __future__ import annotations

import difflib
import errno as errno_module
import fnmatch
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.inference.routes import InferenceRoute

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the py310 tox env
    import tomli as tomllib

NETWORK_MODES = ("block", "proxy", "allow")
ACTIONS = ("allow", "errno", "kill_process", "kill_thread", "trap", "log")
OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")
EXTRA_ARCHES = ("x86", "x32")
BUNDLED_POLICIES = ("baseline", "openshell-pre-819", "strict")
# The kernel caps SECCOMP_RET_ERRNO data at MAX_ERRNO, 4095 (selftest ERRNO_capped); libseccomp's
# SCMP_ACT_ERRNO refuses 4095 itself (EINVAL from sys_chk_seccomp_action: data must be below 4095).
MAX_ERRNO = 4094
ARG_MAX = (1 << 64) - 1

# Address families by name (include/linux/socket.h); the numbers are ABI and never change.
SOCKET_FAMILIES: Mapping[str, int] = {
    "AF_UNIX": 1, "AF_INET": 2, "AF_AX25": 3, "AF_IPX": 4, "AF_APPLETALK": 5, "AF_NETROM": 6,
    "AF_BRIDGE": 7, "AF_ATMPVC": 8, "AF_X25": 9, "AF_INET6": 10, "AF_ROSE": 11, "AF_DECnet": 12,
    "AF_NETBEUI": 13, "AF_SECURITY": 14, "AF_KEY": 15, "AF_NETLINK": 16, "AF_PACKET": 17,
    "AF_ASH": 18, "AF_ECONET": 19, "AF_ATMSVC": 20, "AF_RDS": 21, "AF_SNA": 22, "AF_IRDA": 23,
    "AF_PPPOX": 24, "AF_WANPIPE": 25, "AF_LLC": 26, "AF_IB": 27, "AF_MPLS": 28, "AF_CAN": 29,
    "AF_TIPC": 30, "AF_BLUETOOTH": 31, "AF_IUCV": 32, "AF_RXRPC": 33, "AF_ISDN": 34,
    "AF_PHONET": 35, "AF_IEEE802154": 36, "AF_CAIF": 37, "AF_ALG": 38, "AF_NFC": 39,
    "AF_VSOCK": 40, "AF_KCM": 41, "AF_QIPCRTR": 42, "AF_SMC": 43, "AF_XDP": 44, "AF_MCTP": 45,
}  # fmt: skip
SOCKET_FAMILY_NAMES: Mapping[int, str] = {number: name for name, number in SOCKET_FAMILIES.items()}


@dataclass(frozen=True)
class ArgRule:
    """Deny ``syscall`` when argument ``arg`` satisfies ``op`` (EPERM unless ``errno`` is set).

    ``eq`` and ``masked_eq`` compare only the low 32 bits (``bits = 32``, every TOML rule): the kernel
    reads int-typed arguments (flags, domains, operations) as 32-bit values after the filter ran, so a
    64-bit comparison lets ``value | 1 << 32`` through (syscalls.md §3 "32/64-bit argument high bits").
    An OCI profile's rules are compiled as runc and crun compile them (``bits = 64``: libseccomp compares
    all 64 bits), holes included, so that the suite shows what a runtime really enforces.
    ``also``: further conditions on the same call that must hold too (an OCI rule with several ``args``
    on different indexes: libseccomp ANDs them); only their arg/op/value/mask/bits are read.
    ``action``: what the rule returns, ``errno`` (with ``errno``) or kill_process, kill_thread, trap, trace
    (OCI profiles only).
    """

    syscall: str
    arg: int
    op: str
    value: int
    mask: int = 0xFFFFFFFF
    errno: int | None = None
    why: str = ""
    bits: int = 32
    also: tuple[ArgRule, ...] = ()
    action: str = "errno"

    @property
    def key(self) -> str:
        text = self.syscall + "(" + " && ".join(c.condition_text for c in (self, *self.also)) + ")"
        return text if self.action == "errno" else f"{text}->{self.action}"

    @property
    def condition_text(self) -> str:
        mask = f"&{self.mask:#x}" if self.op == "masked_eq" else ""
        width = "/64" if self.bits == 64 and self.op in ("eq", "masked_eq") else ""
        return f"arg{self.arg}{mask} {self.op}{width} {self.value:#x}"

    def matches(self, args: tuple[int, ...]) -> bool:
        """Whether the compiled comparison fires for these arguments (pure BPF semantics)."""
        return all(rule.matches_one(args) for rule in (self, *self.also))

    def matches_one(self, args: tuple[int, ...]) -> bool:
        raw = args[self.arg] & ARG_MAX if self.arg < len(args) else 0
        compared = raw if self.bits == 64 else raw & 0xFFFFFFFF
        if self.op == "masked_eq":
            return (compared & self.mask) == self.value
        if self.op == "eq":
            return compared == self.value
        return {
            "ne": raw != self.value, "lt": raw < self.value, "le": raw <= self.value,
            "gt": raw > self.value, "ge": raw >= self.value,
        }[self.op]  # fmt: skip


@dataclass(frozen=True)
class SeccompPolicy:
    default_action: str = "allow"
    default_errno: int = errno_module.EPERM
    errno: int = errno_module.EPERM
    bad_arch_action: str = "kill_process"
    extra_arches: tuple[str, ...] = ()
    no_new_privs: bool = True
    deny: tuple[str, ...] = ()
    enosys: tuple[str, ...] = ()
    arg_rules: tuple[ArgRule, ...] = ()
    skip_in_network_modes: tuple[str, ...] = ()
    # Allowlist policies (default_action other than "allow", e.g. Docker/OCI profiles): calls allowed
    # unconditionally, and calls allowed when one argument satisfies a rule (rules for one syscall are ORed).
    allow: tuple[str, ...] = ()
    allow_rules: tuple[ArgRule, ...] = ()
    # OCI profiles only: (syscall, action, errno) for names in ``deny`` that do not return ``errno``
    # (a rule's own errnoRet, or kill_process, kill_thread, trap, trace).
    deny_actions: tuple[tuple[str, str, int], ...] = ()

    @property
    def is_allowlist(self) -> bool:
        # SECCOMP_RET_LOG lets the call through after logging it: a LOG default refuses nothing.
        return self.default_action not in ("allow", "log")

    def allows(self, syscall: str, args: tuple[int, ...]) -> bool:
        """Whether an allowlist lets this call through to the deny rules (pure BPF semantics)."""
        if not self.is_allowlist or syscall in self.allow:
            return True
        return any(rule.syscall == syscall and rule.matches(args) for rule in self.allow_rules)

    def effective_denies(self) -> tuple[str, ...]:
        """Every syscall refused whatever its arguments: the deny list, or for an allowlist every known
        syscall it neither allows nor allows conditionally."""
        if not self.is_allowlist:
            return self.deny
        open_ = set(self.allow) | {rule.syscall for rule in self.allow_rules} | set(self.enosys)
        return tuple(sorted(set(self.deny) | {n for n in known_syscall_names() if n not in open_}))


@lru_cache(maxsize=1)
def baseline_policy() -> Policy:
    """The bundled baseline: also where every network and inference default comes from."""
    return load_policy("baseline")


def _baseline_network_default(name: str) -> Any:
    return lambda: getattr(baseline_policy().network, name)


def _baseline_routes() -> tuple[InferenceRoute, ...]:
    return baseline_policy().inference_routes


@dataclass(frozen=True)
class NetworkPolicy:
    """The network section. What it does not set comes from the bundled baseline policy, the one
    place the defaults are written down (``policy/bundled/baseline.toml``)."""

    mode: str = field(default_factory=_baseline_network_default("mode"))
    # fnmatch patterns on the proxy's canonical (lowercase) host, and the ports it may dial
    allowed_hosts: tuple[str, ...] = field(default_factory=_baseline_network_default("allowed_hosts"))
    allowed_ports: tuple[int, ...] = field(default_factory=_baseline_network_default("allowed_ports"))
    # (mode or "all_modes", families) pairs; a tuple of pairs keeps the dataclass hashable.
    socket_domains: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def admits(self, host: str, port: int) -> bool:
        """Whether the allowlist lets a request for ``host:port`` reach the address checks (the
        reference proxy's rule: the port is listed and a pattern matches the lowercase host)."""
        return port in self.allowed_ports and any(
            fnmatch.fnmatchcase(host.lower(), pattern.lower()) for pattern in self.allowed_hosts)

    def blocked_domains(self, mode: str) -> tuple[int, ...]:
        blocked: list[int] = []
        for scope, families in self.socket_domains:
            if scope in ("all_modes", mode):
                blocked.extend(f for f in families if f not in blocked)
        return tuple(blocked)


@dataclass(frozen=True)
class Policy:
    name: str
    source: str
    description: str = ""
    seccomp: SeccompPolicy = field(default_factory=SeccompPolicy)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    # the requests the proxy forwards from inference.local to the model backend (network.md §4)
    inference_routes: tuple[InferenceRoute, ...] = field(default_factory=_baseline_routes)
    origin: str = "policy"  # "oci" for an OCI/Docker seccomp profile, which says nothing about the network
    # OCI profiles: the capability set that resolved includes.caps/excludes.caps (--sandbox-caps), and its name
    capabilities: tuple[str, ...] = ()
    capability_set: str = ""

    def filter_applies(self, mode: str) -> bool:
        """False only for a (deliberately weakened) policy that skips seccomp in ``mode``."""
        return mode not in self.seccomp.skip_in_network_modes

    def rules_for_mode(self, mode: str) -> tuple[ArgRule, ...]:
        """The argument rules in force in ``mode``: the policy's own plus its socket-domain rules."""
        domain_rules = tuple(
            ArgRule("socket", 0, "eq", family, why=f"socket domain {SOCKET_FAMILY_NAMES.get(family, family)}")
            for family in self.network.blocked_domains(mode)
        )
        return self.seccomp.arg_rules + domain_rules

    def refused_domains(self, mode: str) -> tuple[int, ...]:
        """socket() families refused in ``mode``: the per-mode table plus plain ``socket(arg0 == F)`` rules."""
        ruled = tuple(r.value for r in self.seccomp.arg_rules if is_domain_rule(r))
        unlisted = tuple(f for f in SOCKET_FAMILY_NAMES if not self.seccomp.allows("socket", (f,)))
        return tuple(dict.fromkeys(self.network.blocked_domains(mode) + ruled + unlisted))

    def with_network_mode(self, mode: str) -> Policy:
        if mode not in NETWORK_MODES:
            raise PolicyError(f"unknown network mode {mode!r}: use one of {', '.join(NETWORK_MODES)}")
        return replace(self, network=replace(self.network, mode=mode))


def is_domain_rule(rule: ArgRule) -> bool:
    """A ``socket(arg0 == family)`` rule: the same thing as a socket-domain entry, however it is written."""
    return rule.syscall == "socket" and rule.arg == 0 and rule.op == "eq"


# --------------------------------------------------------------------------------------------
# Loading


def bundled_policy_path(name: str) -> Path:
    return Path(str(resources.files("pytest_sandbox.policy") / "bundled" / f"{name}.toml"))


def load_policy(name_or_path: str | Path, caps: str | None = None) -> Policy:
    """Load a bundled policy by name (``baseline``), or a file by path: a TOML policy, or an OCI seccomp
    profile (JSON, or a Security Profiles Operator ``SeccompProfile`` YAML resource) told apart by content,
    not suffix. ``caps`` (``--sandbox-caps``) names the capability set that resolves a profile's
    ``includes.caps``/``excludes.caps`` (default: Docker's default set); validate it fully."""
    text = str(name_or_path)
    if text in BUNDLED_POLICIES:
        return _load_file(bundled_policy_path(text).resolve())
    path = Path(text)
    if not path.exists():
        raise PolicyError(
            f"policy {text!r} not found: give a path to a TOML policy file or one of the bundled "
            f"names {', '.join(BUNDLED_POLICIES)}"
        )
    from pytest_sandbox.policy.from_oci import load_oci_profile, looks_like_oci_profile

    if looks_like_oci_profile(path):
        return load_oci_profile(path.resolve(), caps)
    return _load_file(path.resolve())


def _load_file(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text; a policy is a TOML file") from None
    return _parse_policy(path, text)


@lru_cache(maxsize=64)  # keyed by content too: a policy edited during a run is parsed again
def _parse_policy(path: Path, text: str) -> Policy:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML ({exc}); fix the syntax at that position") from None
    return _PolicyParser(path).parse(document)


class _PolicyParser:
    TOP_KEYS = ("name", "description", "extends", "seccomp", "network", "inference")
    SECCOMP_KEYS = (
        "default_action", "default_errno", "errno", "bad_arch_action", "extra_arches", "no_new_privs",
        "deny", "enosys", "arg_rules", "skip_in_network_modes", "allow", "allow_rules",
    )  # fmt: skip
    RULE_KEYS = ("syscall", "arg", "op", "value", "mask", "errno", "why")
    NETWORK_KEYS = ("mode", "allowed_hosts", "allowed_ports", "socket_domains")
    DOMAIN_SCOPES = ("all_modes", *NETWORK_MODES)

    def __init__(self, path: Path) -> None:
        self.path = path

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
            base_path = bundled_policy_path(base) if base in BUNDLED_POLICIES else self.path.parent / base
            if base_path.resolve() == self.path:
                raise self.fail("extends", "a policy cannot extend itself")
            parent = load_policy(base_path)
        name = self.string(document.get("name", self.path.stem), "name")
        description = self.string(document.get("description", ""), "description")
        seccomp = self.parse_seccomp(document.get("seccomp", {}), parent.seccomp if parent else None)
        if parent is not None:
            network_base: NetworkPolicy | None = parent.network
            routes_base: tuple[InferenceRoute, ...] | None = parent.inference_routes
        elif self.path == bundled_policy_path("baseline").resolve():
            network_base = routes_base = None  # the baseline is where the defaults come from: it sets them all
        else:
            # Without extends, what the network section and the routes leave out is the baseline's
            # (its socket-domain rules excepted: those are seccomp rules, and a policy states its own).
            network_base = replace(baseline_policy().network, socket_domains=())
            routes_base = baseline_policy().inference_routes
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


# --------------------------------------------------------------------------------------------
# Syscall names: pyseccomp's resolve_syscall never raises for unknown names (syscalls.md §5 trap 1)


@lru_cache(maxsize=1024)
def resolve_native_syscall(name: str) -> int | None:
    """The native syscall number of ``name``, or None when libseccomp does not know it natively."""
    import pyseccomp

    if not name or not name.replace("_", "").isalnum():
        return None
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    # -1 means unknown; <= -100 is a pseudo-number for calls absent or multiplexed on this arch.
    return number if number >= 0 else None


@lru_cache(maxsize=1)
def known_syscall_names() -> tuple[str, ...]:
    import pyseccomp

    names = []
    for number in range(0, 600):
        try:
            names.append(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number).decode())
        except ValueError:
            continue
    return tuple(names)
