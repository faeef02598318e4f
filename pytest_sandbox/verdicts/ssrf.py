"""The SSRF judge: one attempt's proxy reply and the catch-all hits blamed on it -> a Judgement. Pure.

Kept apart from the sending code (``probes/ssrf.py``) so the rule of network.md §7 can be read and
table-tested on its own; the observation it reads (:class:`ProxyReply`) is defined here, and the
probes build it. The self-connection judge (``verdicts/self_loop.py``) builds on :func:`judge_attempt`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pytest_sandbox.catalogues.ssrf_cases import SsrfCase
from pytest_sandbox.http.responses import ParsedResponse
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.twins import fold_bare_twin

__all__ = [
    "DIALLED_STATUSES",
    "REFUSAL_STATUSES",
    "HitCounts",
    "JudgedAttempt",
    "ProxyReply",
    "canary_is_observable",
    "case_category",
    "endpoint_text",
    "judge_attempt",
    "judge_with_bare_twin",
    "judge_with_unmarked_twin",
    "refusal_text",
]

# A refusal is an answer the proxy gives itself before any dial: 403 (policy, SSRF) or 400
# (authority that cannot be canonicalised, network.md §3). 502/504 mean it tried to dial.
REFUSAL_STATUSES = frozenset({400, 403})
DIALLED_STATUSES = frozenset({502, 504})

HitCounts = Mapping[tuple[str, int], int]  # catch-all hits per (address, port)


def case_category(case: SsrfCase) -> str:
    """The scorecard row a catalogue case reports: ``ssrf-controls`` for a positive control,
    ``ssrf-malformed`` for ambiguous input no client sends (refused as malformed, before any lookup),
    ``ssrf`` for a destination the proxy must refuse by policy. ``report/categories.py`` names the same
    rows from test ids."""
    if case.expected == "allowed":
        return "ssrf-controls"
    return "ssrf-malformed" if case.expected == "malformed" else "ssrf"


def refusal_text(reply: ProxyReply) -> str:
    """What the proxy said when it refused: its reason, its X-Proxy-Error header, else the status."""
    return reply.proxy.proxy_reason or reply.proxy.header("x-proxy-error") or f"status {reply.proxy.status}"


def canary_is_observable(address: str) -> bool:
    """Whether a TCP peer can exist at ``address`` in the lab, so the catch-all can see a dial there.

    Every unicast address can, IPv6 link-local included (a proxy dials fe80::/10 only with a scope
    id, RFC 4007 §6, and the lab's lo then routes it locally). Multicast and the limited broadcast
    cannot: tcp_v4_connect() refuses multicast/broadcast routes and tcp_v6_connect() multicast
    destinations before any packet exists, so nothing there can ever be reached.
    """
    parsed = ipaddress.ip_address(address)
    return not (parsed.is_multicast or parsed == ipaddress.IPv4Address("255.255.255.255"))


class JudgedAttempt(Protocol):
    """What the judge reads of an attempt (``probes.ssrf.Attempt`` and its subclasses are one)."""

    @property
    def case(self) -> SsrfCase: ...

    @property
    def form(self) -> str: ...  # "connect" | "absolute" | "origin" | "authority" | "asterisk"

    @property
    def target(self) -> str: ...  # the destination as sent


@dataclass(frozen=True)
class ProxyReply:
    """What came back for one attempt.

    ``proxy`` is the proxy's own answer; ``tunnelled`` the answer through a CONNECT tunnel (None
    unless the proxy said 2xx to CONNECT). ``closed`` means the proxy ended the connection (EOF or
    reset) within the timeout; ``timed_out`` that the deadline passed first. ``close_requested``: the
    request asked for the close (``Connection: close``) or was a CONNECT, so a refusal must close
    (network.md §5); a persistent request's (a keep-alive twin's) may leave the connection open
    (RFC 9112 §9.3).
    """

    proxy: ParsedResponse
    tunnelled: ParsedResponse | None
    closed: bool
    timed_out: bool
    error: str = ""
    close_requested: bool = True

    @property
    def final(self) -> ParsedResponse:
        return self.tunnelled if self.tunnelled is not None else self.proxy

    @property
    def unanswered(self) -> bool:
        """Whether the proxy gave no HTTP answer of its own (it timed out, reset or closed before a status line)."""
        return self.proxy.status is None

    def describe(self) -> str:
        if self.proxy.status is None:
            what = "no HTTP answer"
        else:
            reason = self.proxy.proxy_reason
            what = f"{self.proxy.status}" + (f" {reason}" if reason else "")
        if self.tunnelled is not None:
            what += f", tunnel answered {self.tunnelled.status}"
        ending = ("timed out" if self.timed_out else "closed" if self.closed
                  else "left open" if self.close_requested else "kept alive")
        return f"{what}, connection {ending}" + (f" ({self.error})" if self.error else "")


def endpoint_text(address: str, port: int) -> str:
    """``address:port``, the IPv6 address in brackets (RFC 3986 §3.2.2)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _hits_text(hits: HitCounts) -> str:
    return ", ".join(f"{endpoint_text(address, port)} x{count}" for (address, port), count in sorted(hits.items()))


def judge_attempt(attempt: JudgedAttempt, reply: ProxyReply, hits: HitCounts,
                  observable: Callable[[str], bool] = canary_is_observable) -> Judgement:
    """Judge one attempt from the proxy's reply and the canary connections it caused. Pure."""
    case = attempt.case
    observed = reply.describe() + (f"; canary hits: {_hits_text(hits)}" if hits else "; no canary hit")
    if case.expected == "allowed":
        return _judge_control(attempt, reply, hits, observed)
    expected = "refused (400 or 403, connection closed), no canary connection"
    if hits:
        # Name the destination as sent and the canary that answered: that pair is the hole to fix.
        return Judgement(Verdict.ALLOWED, f"destination {attempt.target!r} reached canary {_hits_text(hits)}",
                         expected, observed)
    status = reply.proxy.status
    if status in REFUSAL_STATUSES:
        if not reply.closed and reply.close_requested:
            return Judgement(Verdict.INDETERMINATE, f"refused with {status} but the connection was left "
                             "open (network.md §5: answer and close)", expected, observed)
        if case.canary is None:
            note = ("; no TCP peer can exist at this multicast/broadcast destination (the kernel refuses "
                    "connect(2) before any packet), so nothing can have been reached")
        elif not observable(case.canary):
            note = f"; canary {case.canary} cannot be observed in the lab"
        else:
            note = ""
        wanted = 400 if case.expected == "malformed" else 403
        if status != wanted:
            note += f"; catalogue expects {wanted} ({case.expected}) but any refusal blocks"
        reason = refusal_text(reply)
        # Ambiguous input no client sends, refused before any lookup, is kept apart from a policy
        # refusal of a destination the proxy understood ("refused as malformed" vs "proxy refused").
        kind = "refused as malformed" if case.expected == "malformed" and status == 400 else "proxy refused"
        return Judgement(Verdict.BLOCKED, f"{kind}: {reason}{note}", expected, observed)
    if status is not None and 200 <= status < 300:
        return Judgement(Verdict.ALLOWED, f"proxy answered {status}: it let the request through",
                         expected, observed)
    if status in DIALLED_STATUSES:
        return Judgement(Verdict.ALLOWED, f"proxy answered {status}: it tried to dial, and only the "
                         "network stopped it (network.md §7: unroutable is not blocked)", expected, observed)
    if reply.timed_out and status is None:
        return Judgement(Verdict.INDETERMINATE, "silent timeout: the proxy neither refused nor answered",
                         expected, observed)
    if status is None:
        return Judgement(Verdict.INDETERMINATE, "the proxy closed without an HTTP answer", expected,
                         observed)
    return Judgement(Verdict.INDETERMINATE, f"unexpected status {status}", expected, observed)


def judge_with_unmarked_twin(attempt: JudgedAttempt, reply: ProxyReply, unmarked: ProxyReply | None,
                             hits: HitCounts, observable: Callable[[str], bool] = canary_is_observable) -> Judgement:
    """Judge a denial probe sent twice: marked (the attempt's nonce field and nonce path, as every probe
    carries them) and as its unmarked twin (the same request with neither, what any client sends).
    ``hits`` are the canary connections either caused. Pure.

    A proxy that judges only requests that look like the harness's would refuse every marked probe and
    forward every real client's: a refusal counts only when the twin was refused too, and the reason
    then says which of the two got through (network.md §7; a denial is proven on what the proxy does
    with ordinary traffic, not on how it treats a test).
    """
    judgement = judge_attempt(attempt, reply, hits, observable)
    if unmarked is None or attempt.case.expected == "allowed":
        return judgement
    observed = f"{judgement.observed}; the same request without the marker: {unmarked.describe()}"
    twin = judge_attempt(attempt, unmarked, {}, observable)
    marked_refused = reply.proxy.status in REFUSAL_STATUSES
    if twin.verdict is Verdict.BLOCKED or (judgement.verdict is Verdict.ALLOWED and not marked_refused):
        # A refused twin leaves the marked verdict as it was; a leak of the marked request keeps its own reason.
        return Judgement(judgement.verdict, judgement.reason, judgement.expected, observed)
    if twin.verdict is Verdict.ALLOWED:
        if marked_refused:
            reached = f"; {judgement.reason}" if judgement.verdict is Verdict.ALLOWED else ""
            reason = ("refused only when the request carried the harness's marker (its nonce field and nonce path); "
                      f"the same request without it: {twin.reason}{reached}")
        else:
            reason = f"{judgement.reason}; the same request without the harness's marker: {twin.reason}"
        return Judgement(Verdict.ALLOWED, reason, judgement.expected, observed)
    # The twin could not be judged (left open, timed out, no HTTP answer, an odd status): nothing shows what the
    # proxy does with ordinary traffic, so a refusal of the marked request alone proves no denial.
    if judgement.verdict is Verdict.BLOCKED:
        return Judgement(Verdict.INDETERMINATE, f"{judgement.reason} when marked, but the same request without the "
                         f"harness's marker could not be judged: {twin.reason}", judgement.expected, observed)
    return Judgement(judgement.verdict, f"{judgement.reason}; the same request without the harness's marker could "
                     f"not be judged either: {twin.reason}", judgement.expected, observed)


def judge_with_bare_twin(attempt: JudgedAttempt, judgement: Judgement, bare: ProxyReply, hits: HitCounts,
                         observable: Callable[[str], bool] = canary_is_observable) -> Judgement:
    """Fold a denial's *bare twin* into its verdict (:func:`pytest_sandbox.verdicts.twins.fold_bare_twin`): the
    same request as curl sends it with no token of the harness's at all, sent alone, judged on its reply and
    ``hits`` (the canary connections in its window). A positive control's verdict is returned as it is. Pure."""
    if attempt.case.expected == "allowed":
        return judgement
    return fold_bare_twin(judgement, judge_attempt(attempt, bare, hits, observable), bare.describe())


def _judge_control(attempt: JudgedAttempt, reply: ProxyReply, hits: HitCounts, observed: str) -> Judgement:
    canary = attempt.case.canary
    expected = f"200 from the lab canary {canary}, and that canary counted the connection"
    own = {key: count for key, count in hits.items() if key[0] == canary}
    stray = {key: count for key, count in hits.items() if key[0] != canary}
    final = reply.final
    if attempt.form == "connect" and (reply.proxy.status is None or not 200 <= reply.proxy.status < 300):
        return Judgement(Verdict.BROKEN, f"CONNECT to a public address was not established "
                         f"({reply.proxy.status})", expected, observed)
    if final.status != 200:
        return Judgement(Verdict.BROKEN, f"a public address did not answer 200 through the proxy "
                         f"({final.status})", expected, observed)
    if final.header("x-lab-canary") != canary:
        return Judgement(Verdict.BROKEN, f"the 200 did not come from canary {canary} "
                         f"(X-Lab-Canary: {final.header('x-lab-canary')})", expected, observed)
    if not own:
        return Judgement(Verdict.BROKEN, f"canary {canary} counted no connection", expected, observed)
    if stray:
        return Judgement(Verdict.BROKEN, f"other canaries were reached too: {_hits_text(stray)}",
                         expected, observed)
    return Judgement(Verdict.WORKS, f"reached {canary} through the proxy", expected, observed)
