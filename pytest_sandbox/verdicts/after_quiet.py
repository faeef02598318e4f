"""An SSRF verdict on a request sent after the lab had been quiet: what the quiet adds to it. Pure.

The request is judged as every SSRF attempt is (:func:`pytest_sandbox.verdicts.ssrf.judge_with_unmarked_twin`:
refused, marked and unmarked, and no canary connection; a control must reach its canary). This step says
how long the proxy had been left alone when it came, names the hole when the proxy let it through (the same
destination is refused in the burst of the SSRF campaign, so a leak here is one that waited for silence), and
refuses to pass a run that never got the quiet it needed.
"""

from __future__ import annotations

import dataclasses

from pytest_sandbox.verdicts.judgement import Judgement, Verdict

__all__ = ["QUIET_HOLE", "after_quiet"]

QUIET_HOLE = "refused only while requests kept coming"


def after_quiet(judgement: Judgement, quiet: float, minimum: float) -> Judgement:
    """``judgement`` of a request sent after ``quiet`` seconds with no TCP traffic in the lab, where at least
    ``minimum`` seconds were wanted."""
    sent = f"sent after {quiet:.1f} s with no traffic through the proxy"
    expected = f"{judgement.expected}, after at least {minimum:.1f} s of quiet"
    if not judgement.passed and judgement.verdict is not Verdict.INDETERMINATE:
        return dataclasses.replace(
            judgement, expected=expected, observed=f"{judgement.observed}; {sent}",
            reason=f"{QUIET_HOLE}: {sent}, {judgement.reason}")
    if quiet < minimum:  # never quiet long enough: the pass proves nothing about a proxy that waits for silence
        return dataclasses.replace(
            judgement, verdict=Verdict.INDETERMINATE, expected=expected, observed=f"{judgement.observed}; {sent}",
            reason=f"the lab never went {minimum:.1f} s without traffic (only {quiet:.1f} s), so a proxy "
                   f"{QUIET_HOLE} could not be told apart")
    return dataclasses.replace(judgement, expected=expected, observed=f"{judgement.observed}; {sent}")
