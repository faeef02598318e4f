"""The allowlist judge: a CONNECT the policy admits must be reached, one it refuses never dialled. Pure.

:class:`AllowlistProbe` (what the enforced policy says of one ``host:port``) is built by
``probes/allowlist.py`` from the policy; the judge reads it with the proxy's answer and the listener's count.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_sandbox.verdicts.judgement import Judgement, Verdict

__all__ = ["AllowlistProbe", "judge_allowlist_probe"]


@dataclass(frozen=True)
class AllowlistProbe:
    """``CONNECT host:port``; ``admitted`` is what the enforced policy says."""

    host: str
    port: int
    admitted: bool

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def test_id(self) -> str:
        return f"connect-{self.host}-{self.port}"


def judge_allowlist_probe(probe: AllowlistProbe, status: int | None, dialled: int, late: int = 0) -> Judgement:
    """From the proxy's answer to the CONNECT (None: none) and the connections counted for it at its listener:
    ``dialled`` in all, ``late`` of them after its round's grace period (blamed on it with every other refused
    probe of that listener). Pure."""
    observed = f"answer {status}, connections at {probe.authority}: {dialled}"
    if late:
        observed += f" ({late} after its round's grace period, a late dial)"
    if probe.admitted:
        expected = "200 Connection Established and a connection at the listener"
        if status == 200 and dialled:
            return Judgement(Verdict.WORKS, f"{probe.authority} is admitted by the policy and was reached",
                                 expected, observed)
        return Judgement(Verdict.BROKEN, f"{probe.authority} is admitted by the policy but was not reached",
                             expected, observed)
    expected = "refused (4xx) with no connection at the listener"
    if dialled or status == 200:
        return Judgement(Verdict.ALLOWED, f"{probe.authority} is outside the policy's allowlist, yet the proxy "
                             f"{'dialled it' if dialled else 'answered 200'}", expected, observed)
    if status is not None and 400 <= status < 500:
        return Judgement(Verdict.BLOCKED, f"{probe.authority} is outside the policy's allowlist and was refused "
                             "before any dial", expected, observed)
    return Judgement(Verdict.INDETERMINATE, f"{probe.authority}: no refusal seen (answer {status})",
                         expected, observed)
