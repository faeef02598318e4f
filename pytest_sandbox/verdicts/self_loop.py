"""The self-connection judge: loop evidence the proxy cannot shape decides first, then the SSRF rule. Pure.

The evidence (:class:`LoopEvidence`: the lab's socket table and SYN counter, a nonce through the tunnel) is
gathered by ``probes/self_loop.py``; it is defined here, next to the judge that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pytest_sandbox.network.socket_table import Endpoint
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.ssrf import (
    HitCounts,
    JudgedAttempt,
    ProxyReply,
    endpoint_text,
    judge_attempt,
    refusal_text,
)

__all__ = ["EXPECTED", "LOOP_ORIGIN", "LoopEvidence", "LoopWindow", "judge_self_attempt"]

# The lab public origin the nonce request names (pytest_sandbox.network.lab.lab.LAB_PUBLIC_ORIGINS).
LOOP_ORIGIN = "11.0.0.10"
EXPECTED = "refused (400 or 403, connection closed); no connection to the proxy's own socket, no canary hit"


@dataclass(frozen=True)
class LoopWindow:
    """Dials to one endpoint that the harness did not make, seen between two reads of the lab.

    ``peers``: the far ends of new connections in the socket table. ``reused``: SYNs to the endpoint
    that were not the harness's own, beyond the new peers (the lab's SYN counter): dials that reused
    the 4-tuple of an earlier connection still in TIME_WAIT at the accepting end, where
    ``tcp_timewait_state_process`` accepts the newer SYN, so the table shows the same peer again.
    """

    peers: tuple[Endpoint, ...] = ()
    reused: int = 0

    def __bool__(self) -> bool:
        return bool(self.peers) or self.reused > 0

    def __add__(self, other: LoopWindow) -> LoopWindow:
        return LoopWindow(tuple(sorted({*self.peers, *other.peers})), self.reused + other.reused)


@dataclass(frozen=True)
class LoopEvidence:
    """What the lab saw of one attempt, independent of the proxy.

    ``window``: the dials to ``endpoint`` (the proxy's own socket address as attempted) that the harness did
    not make, during the attempt. ``nonce_request``: the request line at the origin that carried the
    tunnel's nonce. ``table_error``: why the socket table could not be read.
    """

    endpoint: Endpoint
    window: LoopWindow = LoopWindow()
    nonce_request: str | None = None
    table_error: str = ""

    def describe(self) -> str:
        parts = []
        if self.window.peers:
            peers = ", ".join(endpoint_text(*peer) for peer in self.window.peers)
            parts.append(f"the lab's socket table shows {len(self.window.peers)} connection(s) to "
                         f"{endpoint_text(*self.endpoint)} the harness did not make (from {peers})")
        if self.window.reused:
            parts.append(f"the lab counted {self.window.reused} SYN(s) to {endpoint_text(*self.endpoint)} the "
                         "harness did not send and the socket table shows no new peer for (a 4-tuple in TIME_WAIT "
                         "reused)")
        if self.nonce_request is not None:
            parts.append(f"origin {LOOP_ORIGIN} received {self.nonce_request!r}, which was sent only "
                         "inside the tunnel as a proxy request")
        if self.table_error:
            parts.append(f"socket table unreadable: {self.table_error}")
        return "; ".join(parts) or f"no connection to {endpoint_text(*self.endpoint)} but the harness's own"

    @property
    def looped(self) -> bool:
        return bool(self.window) or self.nonce_request is not None


def judge_self_attempt(attempt: JudgedAttempt, reply: ProxyReply, hits: HitCounts, evidence: LoopEvidence
                       ) -> Judgement:
    """Judge one self-connection attempt. Loop evidence decides first; then the SSRF judgement."""
    base = judge_attempt(attempt, reply, hits)
    observed = f"{base.observed}; loop evidence: {evidence.describe()}"
    if evidence.looped:
        return Judgement(Verdict.ALLOWED, f"{attempt.target!r} looped to the proxy itself: "
                         f"{evidence.describe()}", EXPECTED, observed)
    if base.verdict is Verdict.BLOCKED and evidence.table_error:
        return Judgement(Verdict.INDETERMINATE, f"refused, but whether it looped cannot be told: "
                         f"{evidence.table_error}", EXPECTED, observed)
    if base.verdict is Verdict.BLOCKED:
        # The refusal and the lab's evidence; not the SSRF judge's canary note (a self case has no canary:
        # the loop evidence takes its place).
        return Judgement(Verdict.BLOCKED, f"proxy refused: {refusal_text(reply)}; {evidence.describe()}",
                         EXPECTED, observed)
    return replace(base, expected=EXPECTED, observed=observed)
