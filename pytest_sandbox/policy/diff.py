"""What became weaker or stronger between two policies (``pytest-sandbox diff``), before anything runs.

A pure comparison of two :class:`~pytest_sandbox.policy.model.Policy` values, rule by rule, with its
text and JSON renderings; the console script only loads the two policies and prints the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_sandbox.policy.model import NETWORK_MODES, ArgRule, Policy, describe_rule, family_name, is_domain_rule

# How much a setting refuses, weakest first. Network modes: ``allow`` reaches everything, ``proxy``
# only the egress proxy, ``block`` nothing. Filter actions: every kill/trap ends in a signal death
# (kill_thread leaves the rest of the process running, trap can be caught by a SIGSYS handler).
NETWORK_MODE_STRENGTH = {"allow": 0, "proxy": 1, "block": 2}
ACTION_STRENGTH = {"allow": 0, "log": 1, "errno": 2, "trap": 3, "kill_thread": 4, "kill_process": 5}


@dataclass(frozen=True)
class PolicyDiff:
    """What changed from ``old`` to ``new``: each line names the rule and the direction."""

    old: str
    new: str
    weaker: tuple[str, ...]
    stronger: tuple[str, ...]

    @property
    def is_weaker(self) -> bool:
        return bool(self.weaker)


def _rule_identity(rule: ArgRule) -> tuple[str, int, str, int, int]:
    # The mask only means something for masked_eq; eq always compares the low 32 bits (model.py).
    return (rule.syscall, rule.arg, rule.op, rule.mask if rule.op == "masked_eq" else 0xFFFFFFFF, rule.value)


def _set_changes(old: Iterable[str], new: Iterable[str]) -> tuple[list[str], list[str]]:
    """(removed, added), each in the order the policies list them."""
    old_list, new_list = list(dict.fromkeys(old)), list(dict.fromkeys(new))
    return [x for x in old_list if x not in new_list], [x for x in new_list if x not in old_list]


def _compare_strength(what: str, old: str, new: str, ranking: dict[str, int],
                      weaker: list[str], stronger: list[str]) -> None:
    if old == new:
        return
    line = f"{what}: {old} -> {new}"
    (weaker if ranking[new] < ranking[old] else stronger).append(line)


def diff_policies(old: Policy, new: Policy, *, modes: Sequence[str] = NETWORK_MODES) -> PolicyDiff:
    """Compare two policies rule by rule; ``modes`` limits the per-network-mode comparisons."""
    weaker: list[str] = []
    stronger: list[str] = []
    o, n = old.seccomp, new.seccomp
    if (old.origin == "oci") != (new.origin == "oci"):
        # A profile has no network modes: compare it with the policy in that policy's own mode.
        modes = ((new if old.origin == "oci" else old).network.mode,)

    # Allowlists (OCI/Docker profiles) are compared by what they refuse, like denylists.
    removed, added = _set_changes(o.effective_denies(), n.effective_denies())
    weaker += [f"syscall {name} no longer denied" for name in removed]
    stronger += [f"syscall {name} now denied" for name in added]

    # An ENOSYS rule exists so that glibc falls back to a call the filter can inspect (clone3 ->
    # clone); losing it lets the uninspectable call reach the kernel.
    removed, added = _set_changes(o.enosys, n.enosys)
    weaker += [f"syscall {name} no longer returns ENOSYS (reaches the kernel)" for name in removed]
    stronger += [f"syscall {name} now returns ENOSYS" for name in added]

    old_rules = {_rule_identity(r): r for r in o.arg_rules if not is_domain_rule(r)}
    new_rules = {_rule_identity(r): r for r in n.arg_rules if not is_domain_rule(r)}
    weaker += [f"argument rule removed: {describe_rule(r)}"
               for k, r in old_rules.items() if k not in new_rules]
    stronger += [f"argument rule added: {describe_rule(r)}"
                 for k, r in new_rules.items() if k not in old_rules]
    # Conditional allows only mean something in an allowlist; between two allowlists more is weaker.
    both_allowlists = o.is_allowlist and n.is_allowlist
    old_allows = {_rule_identity(r): r for r in o.allow_rules if both_allowlists}
    new_allows = {_rule_identity(r): r for r in n.allow_rules if both_allowlists}
    weaker += [f"conditional allow added: {describe_rule(r)}" for k, r in new_allows.items() if k not in old_allows]
    stronger += [f"conditional allow removed: {describe_rule(r)}"
                 for k, r in old_allows.items() if k not in new_allows]

    for mode in modes:
        old_applies, new_applies = old.filter_applies(mode), new.filter_applies(mode)
        if old_applies and not new_applies:
            weaker.append(f"{mode} mode: seccomp filter skipped (no filter, no no_new_privs)")
        elif new_applies and not old_applies:
            stronger.append(f"{mode} mode: seccomp filter now applied")
        removed_domains, added_domains = _set_changes(
            map(family_name, old.refused_domains(mode)), map(family_name, new.refused_domains(mode)))
        weaker += [f"{mode} mode: socket domain {name} no longer refused" for name in removed_domains]
        stronger += [f"{mode} mode: socket domain {name} now refused" for name in added_domains]

    _compare_strength("default action", o.default_action, n.default_action, ACTION_STRENGTH, weaker, stronger)
    _compare_strength("bad-arch action", o.bad_arch_action, n.bad_arch_action, ACTION_STRENGTH,
                      weaker, stronger)

    # A foreign ABI (x32, i386 via int 0x80) not listed in the filter meets the bad-arch action;
    # listing it admits its calls and leaves only the rules between them and the kernel.
    removed, added = _set_changes(o.extra_arches, n.extra_arches)
    weaker += [f"{arch} ABI now admitted by the filter (was the bad-arch action)" for arch in added]
    stronger += [f"{arch} ABI no longer admitted (now the bad-arch action)" for arch in removed]

    outside_weaker, outside_stronger = diff_outside_the_filter(old, new)
    return PolicyDiff(old.name, new.name, tuple(weaker + outside_weaker), tuple(stronger + outside_stronger))


def diff_outside_the_filter(old: Policy, new: Policy) -> tuple[list[str], list[str]]:
    """(weaker, stronger) for what no seccomp filter expresses: no_new_privs and the network settings.

    ``pytest-sandbox diff`` compares the filters by behaviour (seccomp/semantic_diff.py) and these as settings.
    """
    weaker: list[str] = []
    stronger: list[str] = []
    # An OCI profile says nothing about the network: compare network settings only between two policies.
    networked = old.origin != "oci" and new.origin != "oci"
    if networked:
        _compare_strength("network mode", old.network.mode, new.network.mode, NETWORK_MODE_STRENGTH,
                          weaker, stronger)
    if old.seccomp.no_new_privs and not new.seccomp.no_new_privs:
        weaker.append("no_new_privs disabled: setuid binaries regain privileges across execve")
    elif new.seccomp.no_new_privs and not old.seccomp.no_new_privs:
        stronger.append("no_new_privs enabled")

    if networked:
        removed, added = _set_changes(old.network.allowed_hosts, new.network.allowed_hosts)
        weaker += [f"egress host {host!r} now allowed" for host in added]
        stronger += [f"egress host {host!r} no longer allowed" for host in removed]
        removed_ports, added_ports = _set_changes(map(str, old.network.allowed_ports),
                                                  map(str, new.network.allowed_ports))
        weaker += [f"egress port {port} now allowed" for port in added_ports]
        stronger += [f"egress port {port} no longer allowed" for port in removed_ports]

        # More inference routes means more requests the proxy forwards to the model backend.
        removed, added = _set_changes((f"{r.method} {r.path}" for r in old.inference_routes),
                                      (f"{r.method} {r.path}" for r in new.inference_routes))
        weaker += [f"inference route {route} now routed" for route in added]
        stronger += [f"inference route {route} no longer routed" for route in removed]
    return weaker, stronger
