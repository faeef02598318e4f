"""A readable summary of what a policy enforces and why (``pytest-sandbox explain``).

Pure text from a :class:`~pytest_sandbox.policy.model.Policy`, the catalogue's notes on each denied
syscall and the compiled filter's size (the caller compiles; this module launches nothing).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence

from pytest_sandbox.catalogues.syscalls import DEVICE_PATHS, PROBES_BY_NAME
from pytest_sandbox.policy.model import NETWORK_MODES, Policy, describe_rule, family_name
from pytest_sandbox.seccomp.filter_plan import implied_rules


def explain_policy(policy: Policy, mode: str, instruction_count: int, unprobed: Sequence[str] = ()) -> str:
    """A readable summary of what ``policy`` enforces in network mode ``mode``. ``unprobed``: one line per
    refused syscall with no harmless live probe, saying what covers it (probes.syscall_cases.unprobed_refusals)."""
    seccomp, network = policy.seccomp, policy.network
    out = [f"policy {policy.name} ({policy.source})"]
    if policy.description:
        out.append(f"  {policy.description}")
    out.append("")
    out.append(f"seccomp in {mode} mode:")
    if not policy.filter_applies(mode):
        out.append(f"  NO FILTER: this policy skips seccomp in {mode} mode (and sets no no_new_privs)")
    out.append(f"  default action: {seccomp.default_action}; a denied call fails with errno {seccomp.errno}")
    arches = ", ".join((f"{platform.machine()} (native)", *seccomp.extra_arches))
    refused_abis = [label for arch, label in (("x32", "x32"), ("x86", "i386 int 0x80"))
                    if arch not in seccomp.extra_arches]
    out.append(f"  architectures admitted: {arches}; any other ABI"
               + (f" ({', '.join(refused_abis)})" if refused_abis else "") + f": {seccomp.bad_arch_action}")
    # i386 socketcall/ipc carry their arguments in memory, so a rule on socket() cannot see them there:
    # either the whole i386 ABI is refused, or libseccomp refuses the multiplexed call outright.
    out.append("  i386 socketcall(102)/ipc(117): " + ("refused with the whole i386 ABI (bad_arch_action "
               f"{seccomp.bad_arch_action})" if "x86" not in seccomp.extra_arches else "each socket/SysV IPC rule "
               "refuses its call through the multiplexer whatever the arguments (libseccomp: mux(call == N))" +
               ("; NOT ipc((v << 16) | N), which the kernel runs as call N (an OCI profile, as runc compiles it)"
                if policy.origin == "oci" else "; ipc also with a version in the high 16 bits (call & 0xffff == N)")))
    out.append(f"  no_new_privs: {'yes' if seccomp.no_new_privs and policy.filter_applies(mode) else 'no'}")
    out.append(f"  BPF: {instruction_count} instructions")
    unenforced = "" if policy.filter_applies(mode) else f", NOT ENFORCED in {mode} mode"
    out.append(f"denied syscalls ({len(seccomp.deny)}{unenforced}):")
    for name in seccomp.deny:
        probe = PROBES_BY_NAME.get(name)
        note = f"  -- {probe.note}" if probe and probe.note else ""
        out.append(f"  {name}{note}")
    out.append(f"ENOSYS rules ({len(seccomp.enosys)}{unenforced}):")
    for name in seccomp.enosys:
        out.append(f"  {name} -> ENOSYS (so glibc falls back to a call the filter can inspect)")
    out.append(f"argument rules ({len(seccomp.arg_rules)}{unenforced}):")
    for rule in seccomp.arg_rules:
        out.append(f"  {describe_rule(rule)}")
    implied = implied_rules(policy)
    out.append(f"implied by a refusal ({len(implied)}{unenforced}): the same kernel object by another path")
    for refused, rule in implied:
        out.append(f"  {describe_rule(rule)}  -- {refused}: {DEVICE_PATHS[refused].note}")
    out.append(f"refused with no live probe ({len(unprobed)}): never silent; the live probes cannot attempt "
               "these harmlessly")
    out += [f"  {line}" for line in unprobed]
    out.append("socket domains refused per network mode:")
    for each in NETWORK_MODES:
        families = ", ".join(family_name(f) for f in policy.network.blocked_domains(each)) or "none"
        skipped = "" if policy.filter_applies(each) else "  (NOT ENFORCED: filter skipped in this mode)"
        out.append(f"  {each}: {families}{skipped}")
    out.append("")
    out.append(f"network: mode {network.mode} (explained for {mode})")
    out.append(f"  allowed hosts: {', '.join(network.allowed_hosts) or 'none'}")
    out.append(f"  allowed ports: {', '.join(map(str, network.allowed_ports)) or 'none'}")
    out.append(f"inference routes ({len(policy.inference_routes)}):")
    for route in policy.inference_routes:
        out.append(f"  {route.method} {route.path}")
    return "\n".join(out) + "\n"
