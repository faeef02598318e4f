"""Judges of the loaded-filter evaluation (the ``syscall-evaluation`` category). Pure.

The filter read back from the probe runner (:mod:`pytest_sandbox.seccomp.readback`) is evaluated, never
executed (:mod:`pytest_sandbox.seccomp.behaviour`). This is evaluation, not proof: the live probes stay
the proof of a refusal. The evaluation widens the coverage to every syscall number on x86_64, x32 and
i386, calls with no harmless live probe included, and it is checked against the live probes, so that
evaluator and kernel never silently disagree.

- :func:`judge_coverage` (a): BLOCKED when, over every point, the loaded filter refuses whatever the
  requirement's own compiled filter refuses; ALLOWED naming every point where it does not.
- :func:`judge_agreement` (b): WORKS when the evaluation predicts every live denial probe's outcome in
  the same target; BROKEN naming every disagreement (a finding: the evaluator, the read-back or the
  target is wrong, and this run cannot tell which).
"""

from __future__ import annotations

import errno as errno_module
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_sandbox.seccomp.behaviour import BehaviourDiff, summarise
from pytest_sandbox.seccomp.bpf_eval import FilterResult
from pytest_sandbox.verdicts.judgement import Judgement, Outcome, Verdict

__all__ = ["Prediction", "judge_agreement", "judge_coverage", "predicted_outcome"]

EVALUATION_NOTE = "evaluation of the read-back filter (the live probes remain the proof)"


def judge_coverage(diffs: Sequence[tuple[str, BehaviourDiff]], loaded: str) -> Judgement:
    """(a) ``diffs``: (what is required, requirement -> loaded filter) per requirement; ``loaded`` says
    what was read back. Every point the requirement refuses and the loaded filter lets run is named."""
    holes = [f"{label}: {line}" for label, diff in diffs for line in summarise(diff.weaker)]
    points = sum(diff.points for _, diff in diffs)
    calls = max((diff.calls for _, diff in diffs), default=0)
    required = " and ".join(label for label, _ in diffs) or "nothing"
    expected = f"every call {required} refuses is refused"
    incomplete = sorted({call for _, diff in diffs for call in diff.incomplete})
    if holes:
        count = sum(len(diff.weaker) for _, diff in diffs)
        return Judgement(Verdict.ALLOWED, f"{EVALUATION_NOTE}: the loaded filter lets {count} point(s) run that "
                         f"the requirement refuses: " + "; ".join(holes), expected, "-", loaded)
    if incomplete:
        return Judgement(Verdict.INDETERMINATE, f"{EVALUATION_NOTE}: no hole found, but the argument classes of "
                         f"{', '.join(incomplete)} exceeded the exploration bound, so some may be unexamined",
                         expected, "-", loaded)
    return Judgement(Verdict.BLOCKED, f"{EVALUATION_NOTE}: the loaded filter refuses everything {required} refuses, "
                     f"over {calls} syscall numbers on x86_64, x32 and i386 and {points} argument classes",
                     expected, "-", loaded)


def predicted_outcome(result: FilterResult, baseline: Outcome) -> Outcome:
    """What a live probe observes when the filter answers ``result`` (seccomp(2) "Filter return values")."""
    if result.action == "errno":
        return Outcome.errno(result.data)
    if result.action in ("kill_process", "kill_thread", "trap"):
        return Outcome.killed_by(signal.SIGSYS)  # the probe child dies of SIGSYS (its handler is SIG_DFL)
    if result.action in ("trace", "user_notif"):
        return Outcome.errno(errno_module.ENOSYS)  # no tracer attached / no listener: ENOSYS
    return baseline  # allow, log: the call runs as unfiltered


@dataclass(frozen=True)
class Prediction:
    """One live denial probe: what the evaluation of the loaded filter answers, and what was observed."""

    case_id: str
    result: FilterResult
    baseline: Outcome
    observed: Outcome

    @property
    def comparable(self) -> bool:
        return self.observed.kind not in ("unavailable", "error", "timeout") and \
            self.baseline.kind not in ("unavailable", "error", "timeout")

    @property
    def agrees(self) -> bool:
        if self.result.action in ("allow", "log") and self.observed.succeeded and self.baseline.succeeded:
            return True  # the call ran, as unfiltered (a returned fd or pid number may differ between runs)
        return self.observed.same_as(predicted_outcome(self.result, self.baseline))


def judge_agreement(predictions: Sequence[Prediction], skipped: int, loaded: str) -> Judgement:
    """(b) The evaluation against the live probes of the same target (same launcher, same identity)."""
    compared = [p for p in predictions if p.comparable]
    differing = [p for p in compared if not p.agrees]
    expected = "each live denial probe observes what the evaluation predicts"
    note = f" ({skipped} probe(s) with a run-time pid or address argument not compared)" if skipped else ""
    if differing:
        shown = "; ".join(f"{p.case_id}: evaluation {p.result.describe()} predicts "
                          f"{predicted_outcome(p.result, p.baseline).describe()}, live probe observed "
                          f"{p.observed.describe()}" for p in differing)
        return Judgement(Verdict.BROKEN, f"evaluation and live probes disagree on {len(differing)} of {len(compared)} "
                         f"probe(s): {shown}{note}", expected, "-", loaded)
    if not compared:
        return Judgement(Verdict.INDETERMINATE, f"no live denial probe could be compared{note}", expected, "-",
                         loaded)
    return Judgement(Verdict.WORKS, f"the evaluation predicts all {len(compared)} live denial probe outcomes{note}",
                     expected, "-", loaded)
