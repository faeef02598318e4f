"""What became weaker or stronger between two policies in what no seccomp filter expresses (``pytest-sandbox diff``).

The filters themselves are compared by behaviour (seccomp/semantic_diff.py: both compiled, both evaluated on
every syscall and argument class), which rule text cannot do: an argument rule replaced by a refusal of the
whole call is no weakening. What is left is compared here as settings, purely: the network mode, the egress
hosts and ports, the inference routes, no_new_privs. A new policy field outside the filter gets its line here.
"""

from __future__ import annotations

from collections.abc import Iterable

from pytest_sandbox.policy.model import Policy

# How much a network mode refuses, weakest first: ``allow`` reaches everything, ``proxy`` only the egress
# proxy, ``block`` nothing.
NETWORK_MODE_STRENGTH = {"allow": 0, "proxy": 1, "block": 2}


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
