"""The sandbox policy model: frozen dataclasses for what the reference sandbox enforces.

A policy says what is enforced (seccomp denylist, argument rules, ENOSYS rules, socket-domain rules per
network mode, the network mode, the egress allowlist and inference routes). Reading one from TOML is
``from_toml.py``, from an OCI/Docker profile ``from_oci.py``; finding one by name or path is ``load.py``.
The format is documented field by field in README.md, section "Policy format".
"""

from __future__ import annotations

import errno as errno_module
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.inference.routes import InferenceRoute

NETWORK_MODES = ("block", "proxy", "allow")
ACTIONS = ("allow", "errno", "kill_process", "kill_thread", "trap", "log")
OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge", "masked_eq")
EXTRA_ARCHES = ("x86", "x32")
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

    def deny_action(self, name: str) -> tuple[str, int]:
        """How a name in ``deny`` is refused, (action, errno): the policy's errno unless an OCI rule says otherwise."""
        for denied, action, number in self.deny_actions:
            if denied == name:
                return action, number
        return "errno", self.errno

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


def _baseline() -> Policy:
    # The one import back up the stage (plan 5.1): the defaults of NetworkPolicy() and of a Policy's
    # routes are the bundled baseline.toml's, so they are read, lazily, through the loader.
    from pytest_sandbox.policy.load import baseline_policy

    return baseline_policy()


def _baseline_network_default(name: str) -> Any:
    return lambda: getattr(_baseline().network, name)


def _baseline_routes() -> tuple[InferenceRoute, ...]:
    return _baseline().inference_routes


def host_admitted(host: str, patterns: Iterable[str]) -> bool:
    """Whether an allowlist pattern admits ``host``: fnmatch on lowercase host and pattern (the
    reference proxy's rule; shared by :meth:`NetworkPolicy.admits` and the proxy's decision)."""
    host = host.lower()
    return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in patterns)


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
        return port in self.allowed_ports and host_admitted(host, self.allowed_hosts)

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


def family_name(number: int) -> str:
    """``AF_PACKET`` for 17; the number itself for a family the table does not name."""
    return SOCKET_FAMILY_NAMES.get(number, str(number))


def describe_rule(rule: ArgRule) -> str:
    """A rule as people read it: its key, then why it exists."""
    return f"{rule.key}" + (f" ({rule.why})" if rule.why else "")


def is_domain_rule(rule: ArgRule) -> bool:
    """A ``socket(arg0 == family)`` rule: the same thing as a socket-domain entry, however it is written."""
    return rule.syscall == "socket" and rule.arg == 0 and rule.op == "eq"


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




