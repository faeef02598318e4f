"""``pytest-sandbox diff A B`` by behaviour: both policies compiled, both filters evaluated on the same space.

Rule text says little about behaviour: an argument rule dropped from a profile that now refuses the whole
call is not a weakening, deny-everything is not weaker than a denylist, and an allowlist that gains a
conditional allow may refuse more than before. So the seccomp part of the diff compiles both policies
(:func:`~pytest_sandbox.seccomp.compiler.compile_policy`, the real build) and evaluates both program
stacks on every syscall number of x86_64, x32 and i386 and every argument class either program's
comparisons make (:mod:`pytest_sandbox.seccomp.behaviour`): a point refused before and allowed now is
WEAKER, the reverse STRONGER, a refusal that changed its form (another errno, a kill) CHANGED.

Network modes: a TOML policy compiles per mode (socket-domain rules, filters skipped in a mode), so two
TOML policies are compared in each mode asked for, and a change found in several modes is listed once
with the modes named. An OCI profile has no network mode: with one on either side the filters are
compared once, in the TOML policy's own mode (or, for two profiles, in any, as they do not vary).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_sandbox.policy.model import NETWORK_MODES, Policy
from pytest_sandbox.seccomp.behaviour import ABIS, BehaviourDiff, compare, summarise
from pytest_sandbox.seccomp.compiler import compile_policy

__all__ = ["SemanticDiff", "compared_modes", "format_semantic_json", "format_semantic_text", "semantic_diff"]

DIRECTIONS = ("weaker", "stronger", "changed")


@dataclass(frozen=True)
class SemanticDiff:
    old: str
    new: str
    modes: tuple[str, ...]  # the network modes compared (one for OCI inputs)
    weaker: tuple[str, ...]
    stronger: tuple[str, ...]
    changed: tuple[str, ...]  # still refused, another way (errno number, errno vs kill): neither direction
    calls: int  # syscall numbers evaluated per mode (all ABIs)
    points: int  # (syscall, ABI, argument class) points evaluated, all modes
    incomplete: tuple[str, ...] = ()  # calls whose argument classes hit the exploration bound

    @property
    def is_weaker(self) -> bool:
        return bool(self.weaker)


def compared_modes(old: Policy, new: Policy, requested: Sequence[str] = NETWORK_MODES) -> tuple[str, ...]:
    if old.origin == "oci" and new.origin == "oci":
        return (old.network.mode,)  # neither has network modes: the filters do not vary with one
    if old.origin == "oci" or new.origin == "oci":
        return ((new if old.origin == "oci" else old).network.mode,)
    return tuple(requested)


def semantic_diff(old: Policy, new: Policy, *, modes: Sequence[str] = NETWORK_MODES,
                  outside_filter: tuple[Sequence[str], Sequence[str]] = ((), ())) -> SemanticDiff:
    """Compare the compiled filters by behaviour; ``outside_filter`` adds (weaker, stronger) lines about
    what no filter expresses (network settings, no_new_privs), compared elsewhere."""
    chosen = compared_modes(old, new, modes)
    found: dict[tuple[str, str], list[str]] = {}  # (direction, line) -> modes
    diffs: dict[tuple[tuple[bytes, ...], tuple[bytes, ...]], BehaviourDiff] = {}
    points = calls = 0
    incomplete: dict[str, None] = {}
    for mode in chosen:
        pair = (compile_policy(old, mode).programs, compile_policy(new, mode).programs)
        if pair not in diffs:
            diffs[pair] = compare(*pair, ABIS)
        diff = diffs[pair]
        points += diff.points
        calls = diff.calls
        incomplete.update(dict.fromkeys(diff.incomplete))
        for direction in DIRECTIONS:
            for line in summarise(diff.of(direction)):
                found.setdefault((direction, line), []).append(mode)

    def lines(direction: str) -> tuple[str, ...]:
        out = []
        for (kind, line), where in found.items():
            if kind == direction:
                everywhere = len(chosen) == 1 or len(where) == len(chosen)
                out.append(line if everywhere else f"[{', '.join(where)} mode] {line}")
        return tuple(out)

    weaker_outside, stronger_outside = outside_filter
    return SemanticDiff(old.name, new.name, chosen, (*lines("weaker"), *weaker_outside),
                        (*lines("stronger"), *stronger_outside), lines("changed"), calls, points, tuple(incomplete))


def format_semantic_text(diff: SemanticDiff) -> str:
    modes = diff.modes[0] + " mode" if len(diff.modes) == 1 else ", ".join(diff.modes) + " modes"
    out = [f"policy diff {diff.old} -> {diff.new}",
           f"by behaviour: {diff.calls} syscall numbers on x86_64, x32 and i386 and {diff.points} argument classes "
           f"evaluated ({modes}); lines without [modes] hold in every mode compared"]
    if diff.incomplete:
        out.append(f"NOT FULLY EXPLORED (too many argument classes; a difference there may be missing): "
                   f"{', '.join(diff.incomplete)}")
    if not (diff.weaker or diff.stronger or diff.changed):
        out.append("no enforcement differences")
    for title, entries in (("WEAKER", diff.weaker), ("STRONGER", diff.stronger),
                           ("CHANGED (still refused, another way)", diff.changed)):
        if entries:
            out.append(f"{title} ({len(entries)}):")
            out += [f"  - {entry}" for entry in entries]
    return "\n".join(out) + "\n"


def format_semantic_json(diff: SemanticDiff) -> str:
    return json.dumps({"old": diff.old, "new": diff.new, "modes": list(diff.modes), "weaker": list(diff.weaker),
                       "stronger": list(diff.stronger), "changed": list(diff.changed),
                       "evaluated": {"syscall_numbers": diff.calls, "argument_classes": diff.points,
                                     "not_fully_explored": list(diff.incomplete)}},
                      indent=2) + "\n"
