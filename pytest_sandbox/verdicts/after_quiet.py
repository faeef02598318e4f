"""The verdict on the SSRF exchanges sent after the lab had been quiet: one judgement for the set. Pure.

Each exchange is judged as every SSRF attempt is (:func:`pytest_sandbox.verdicts.ssrf.judge_with_unmarked_twin`:
a denial refused, marked and unmarked, with no canary connection; a control reaching its canary). The set
gets one verdict because which request ends the quiet (and so meets a proxy that waits for silence) is
whichever denial arrives first: ALLOWED when any denial got through, naming the hole (the SSRF campaign sends
the same requests in its burst: a proxy that refused them there and not here refused only while requests kept
coming); INDETERMINATE when anything else is unproven (a control that did not work, a denial left open) or
when the lab never got the quiet wanted; else BLOCKED, saying how long the proxy had been left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from pytest_sandbox.verdicts.judgement import Judgement, Verdict

__all__ = ["QUIET_HOLE", "judge_after_quiet"]

QUIET_HOLE = "refused only while requests kept coming"


def judge_after_quiet(judged: Sequence[tuple[str, Judgement]], quiet: float, minimum: float) -> Judgement:
    """One judgement for ``judged`` (exchange name, its own judgement), sent after ``quiet`` seconds with no TCP
    traffic in the lab where at least ``minimum`` were wanted."""
    sent = f"sent after {quiet:.1f} s with no traffic through the proxy"
    expected = (f"every denial refused, marked and unmarked, with no canary connection, and every control "
                f"reaching its canary, after at least {minimum:.1f} s of quiet")
    observed = f"{sent}: " + "; ".join(f"{name} {judgement.verdict.value} ({judgement.observed})"
                                       for name, judgement in judged)
    leaks = [f"{name}: {judgement.reason}" for name, judgement in judged if judgement.verdict is Verdict.ALLOWED]
    if leaks:
        return Judgement(Verdict.ALLOWED, f"{QUIET_HOLE}: {sent}, " + "; ".join(leaks), expected, observed)
    unproven = [f"{name}: {judgement.verdict.value} - {judgement.reason}"
                for name, judgement in judged if not judgement.passed]
    if unproven:
        return Judgement(Verdict.INDETERMINATE, "; ".join(unproven), expected, observed)
    if quiet < minimum:  # never quiet long enough: the refusals prove nothing about a proxy that waits for silence
        return Judgement(Verdict.INDETERMINATE,
                         f"the lab never went {minimum:.1f} s without traffic (only {quiet:.1f} s), so a proxy "
                         f"{QUIET_HOLE} could not be told apart", expected, observed)
    controls = sum(judgement.verdict is Verdict.WORKS for _name, judgement in judged)
    return Judgement(Verdict.BLOCKED, f"{len(judged) - controls} denials refused and {controls} controls worked, "
                                      f"{sent}", expected, observed)
