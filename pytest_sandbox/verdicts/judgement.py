"""Turning (expected, baseline, observed) into BLOCKED / ALLOWED / INDETERMINATE. Pure.

syscalls.md §4: every probe runs twice with the same arguments, uid and ABI — in an unfiltered
child (baseline ``B``) and under the filter (``R``); ``E`` is what the policy or the requirement says.
A result that cannot tell the filter's refusal from the kernel's is INDETERMINATE, reported with its
reason and never counted as a pass.
"""

from __future__ import annotations

import errno as errno_module
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Verdict(str, Enum):
    BLOCKED = "BLOCKED"
    ALLOWED = "ALLOWED"
    INDETERMINATE = "INDETERMINATE"
    # positive controls: ordinary work that must still function
    WORKS = "WORKS"
    BROKEN = "BROKEN"


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: ``errno``, ``return`` (a value), ``signal``, ``timeout``, ``unavailable``,
    ``error``, ``ok`` / ``failed`` (controls) or ``status`` (a /proc/self/status snapshot)."""

    kind: str
    value: int | None = None
    detail: str = ""

    @classmethod
    def errno(cls, number: int) -> Outcome:
        return cls("errno", number)

    @classmethod
    def killed_by(cls, sig: int) -> Outcome:
        return cls("signal", sig)

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Outcome:
        kind = str(report.get("type", "error"))
        value = report.get("value")
        if kind == "status":
            return cls(kind, None, ", ".join(f"{k}: {v}" for k, v in sorted(dict(value or {}).items())))
        detail = str(report.get("reason") or report.get("detail") or "")
        return cls(kind, value if isinstance(value, int) else None, detail)

    @property
    def succeeded(self) -> bool:
        return self.kind == "return" and self.value is not None and self.value >= 0

    def describe(self) -> str:
        if self.kind == "errno" and self.value is not None:
            name = errno_module.errorcode.get(self.value)
            if name:
                return name
            return f"errno {self.value}" + (" (sentinel)" if self.value >= 1000 else "")
        if self.kind == "return":
            return f"returned {self.value}"
        if self.kind == "signal" and self.value is not None:
            try:
                return f"killed by {signal.Signals(self.value).name}"
            except ValueError:
                return f"killed by signal {self.value}"
        if self.kind == "timeout":
            return "timed out"
        if self.kind == "no_path" and self.value is not None:  # a device path's open failed (syscall_runner)
            return f"cannot open {self.detail}: {errno_module.errorcode.get(self.value, self.value)}"
        return f"{self.kind}{': ' + self.detail if self.detail else ''}"

    def same_as(self, other: Outcome) -> bool:
        return (self.kind, self.value) == (other.kind, other.value) and self.kind != "status"


@dataclass(frozen=True)
class Judgement:
    """One verdict with its reason and evidence: what was expected, what was observed and, where an
    unfiltered run was the reference (syscalls), what that baseline answered (``-`` where there is none)."""

    verdict: Verdict
    reason: str
    expected: str
    observed: str
    baseline: str = "-"

    @property
    def passed(self) -> bool:
        return self.verdict in (Verdict.BLOCKED, Verdict.WORKS)


def describe_set(outcomes: frozenset[Outcome]) -> str:
    return " or ".join(sorted(o.describe() for o in outcomes)) or "nothing"


def judge_denial(expected: frozenset[Outcome], baseline: Outcome, observed: Outcome, *,
                 abi: str = "native") -> Judgement:
    """Judge one attempt of a call that must be refused."""
    e, b, r = describe_set(expected), baseline.describe(), observed.describe()

    def verdict(v: Verdict, reason: str) -> Judgement:
        return Judgement(v, reason, e, r, baseline=b)

    for side, outcome in (("baseline", baseline), ("filtered run", observed)):
        if outcome.kind in ("unavailable", "error"):
            return verdict(Verdict.INDETERMINATE, f"path unavailable in the {side}: {outcome.describe()}")
    if baseline.kind == "timeout":
        return verdict(Verdict.INDETERMINATE, "the unfiltered baseline timed out")
    # An expected refusal that differs from the unfiltered answer is unambiguous, even when the kernel's
    # own answer is also in the expected set (x32 clone3: ENOSYS unfiltered, SIGSYS from a filter).
    if any(observed.same_as(x) for x in expected) and not observed.same_as(baseline):
        return verdict(Verdict.BLOCKED, f"refused with {r}; unfiltered the kernel answers {b}")
    if any(baseline.same_as(x) for x in expected):
        return verdict(Verdict.INDETERMINATE,
                       f"ambiguous: the unfiltered kernel already answers {b}, the same as the expected refusal")
    if observed.succeeded:
        return verdict(Verdict.ALLOWED, f"the call succeeded ({r}) where the policy requires a refusal")
    if observed.same_as(baseline):
        if abi == "x32" and baseline.kind == "errno" and baseline.value == errno_module.ENOSYS:
            return verdict(Verdict.ALLOWED, "ALLOWED by the filter (stopped only by the kernel: x32 ABI disabled "
                                            "on this host; a kernel with x32 would run the call)")
        return verdict(Verdict.ALLOWED, f"reached the kernel: same result as unfiltered ({r})")
    return verdict(Verdict.INDETERMINATE, f"observed {r} matches neither the expected refusal nor the baseline")


def judge_reaches_kernel(baseline: Outcome, observed: Outcome) -> Judgement:
    """Judge a positive control: the call must behave exactly as it does unfiltered."""
    b, r = baseline.describe(), observed.describe()
    if baseline.kind in ("unavailable", "error", "timeout"):
        return Judgement(Verdict.INDETERMINATE, f"baseline unusable: {b}", "same as baseline", r, baseline=b)
    if observed.same_as(baseline) or (observed.succeeded and baseline.succeeded):  # pids differ per run
        return Judgement(Verdict.WORKS, f"reaches the kernel ({r}) as unfiltered ({b})", "same as baseline", r,
                         baseline=b)
    return Judgement(Verdict.BROKEN, f"over-blocked: {r} where the unfiltered kernel answers {b}",
                     "same as baseline", r, baseline=b)


def judge_works(observed: Outcome, *, what: str) -> Judgement:
    """Judge a functional control (a thread starts, a socket opens)."""
    r = observed.describe()
    if observed.kind == "ok":
        return Judgement(Verdict.WORKS, f"{what} works", "ok", r, baseline="ok")
    return Judgement(Verdict.BROKEN, f"{what} failed: {r}", "ok", r, baseline="ok")
