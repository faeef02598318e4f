"""The smuggling judge: one attempt's observation (:class:`Exchange`) against its catalogue row. Pure.

Judging rests on what reached upstream, not on what an upstream parser made of it. The lab origins and
the fake backend keep every byte each connection delivered and mark every answer they write
(:mod:`pytest_sandbox.http.upstream`). A denied case is BLOCKED only if the bytes that arrived upstream
during the attempt frame strictly into exactly the catalogued allowed requests (``reaches_backend`` of
them, or nothing) with no byte left over, the refusal carries no origin mark (the proxy wrote it), the
connection closed before the deadline and a follow-up request got nothing. Any other byte upstream, a
marked refusal (the proxy relayed the origin's answer), a canary connection or an answered follow-up is
ALLOWED and names what reached; a wrong refusal status with nothing leaked is INDETERMINATE, never a pass.
A policy refusal also needs its unmarked twin refused (:func:`judge_with_twin`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pytest_sandbox.catalogues.smuggling import (
    ABSOLUTE_FORM,
    BOTH_PATHS,
    FIRST_REQUEST_ONLY,
    H11_ONLY,
    SMUGGLING_CASES,
    TUNNEL_FORM,
    SmugglingCase,
)
from pytest_sandbox.http.framing import FRAMING_FAMILIES
from pytest_sandbox.http.upstream import (
    Assessment,
    UpstreamReading,
    UpstreamRequest,
    UpstreamSegment,
    assess,
    read_upstream,
    shown,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.twins import fold_bare_twin

__all__ = [
    "FOLLOW_UP_MARKER",
    "KEEP_READING_AFTER_DENIAL",
    "LENIENT_PREFIX",
    "Exchange",
    "cases_failed_by",
    "expected_text",
    "is_follow_up",
    "is_policy_denial",
    "judge_exchange",
    "judge_with_bare_twin",
    "judge_with_twin",
]

# Follow-up requests carry this in their target so the origin/backend logs can leave them out.
FOLLOW_UP_MARKER = "follow-up"
# The pre-#819 interceptor's weakening (``close_on_denied=False``): a refusal leaves the tunnel open.
KEEP_READING_AFTER_DENIAL = "keep-reading-after-denial"
# ``lenient-<family>``: the proxy reads one of http.framing.FRAMING_FAMILIES leniently (``lax_framing``).
LENIENT_PREFIX = "lenient-"


def is_policy_denial(case: SmugglingCase) -> bool:
    """A case refused by a policy decision on a cleanly framed request (not by the framing checks)."""
    return case.violation is None and not case.is_positive_control


def cases_failed_by(weakening: str, path: str, cases: Iterable[SmugglingCase] = SMUGGLING_CASES) -> set[str]:
    """The case ids a weakened proxy must fail on ``path``; the catalogue decides (``holes`` and
    ``also_failed_by``). Pure.

    * ``h11-only`` (``strict_framing=False``): the cases whose hole is ``h11-only``, on both paths.
    * ``first-request-only`` (``judge_every_request=False``, absolute path): the cases whose hole is
      ``first-request-only``.
    * ``keep-reading-after-denial`` (``close_on_denied=False``, the pre-#819 interceptor, tunnel
      path): the ``first-request-only`` cases plus every other policy refusal, because inside the
      tunnel every such refusal must also close the connection (network.md §4) and the weakened
      interceptor keeps it open.
    * ``lenient-<family>`` (``lax_framing={family}``, absolute path): exactly the rows of that family.

    Plus, for each, the cases whose ``also_failed_by`` names the weakening on ``path`` (or on both).
    """
    case_list = tuple(cases)
    if weakening == H11_ONLY:
        failed = {case.case_id for case in case_list if H11_ONLY in case.holes}
    elif weakening == FIRST_REQUEST_ONLY and path == ABSOLUTE_FORM.name:
        failed = {case.case_id for case in case_list if FIRST_REQUEST_ONLY in case.holes}
    elif weakening == KEEP_READING_AFTER_DENIAL and path == TUNNEL_FORM.name:
        failed = {case.case_id for case in case_list
                  if FIRST_REQUEST_ONLY in case.holes or is_policy_denial(case)}
    elif weakening.startswith(LENIENT_PREFIX) and weakening[len(LENIENT_PREFIX):] in FRAMING_FAMILIES \
            and path == ABSOLUTE_FORM.name:
        failed = {case.case_id for case in case_list if case.family == weakening[len(LENIENT_PREFIX):]}
    else:
        raise ValueError(f"no weakening {weakening!r} on the {path} path")
    return failed | {case.case_id for case in case_list for failing, where, _why in case.also_failed_by
                     if failing == weakening and where in (path, BOTH_PATHS)}


@dataclass(frozen=True)
class Exchange:
    """What one attempt observed.

    ``statuses`` are the final responses to the payload; ``marked`` says per response whether it
    carried the upstream server's mark (the origin or backend wrote it, the proxy only relayed it).
    ``closed`` means EOF or reset before the deadline; ``follow_up`` is the status a later request
    on the same connection got (None: no answer, or not sent because the verdict was already a
    leak). ``upstream`` holds the bytes each upstream connection (lab origins on the absolute path,
    the fake backend in the tunnel) received during the attempt; ``stray`` names anything else that
    was reached (canary connections, the other upstream).
    """

    statuses: tuple[int, ...]
    closed: bool
    timed_out: bool
    follow_up: int | None
    upstream: tuple[UpstreamSegment, ...] = ()
    marked: tuple[bool, ...] = ()
    stray: str = ""
    error: str = ""
    last_body: bytes = b""
    # When the exchange with the proxy ended (time.monotonic): its last read of the connection, before the
    # judge looked upstream. None: when the attempt returned.
    ended: float | None = None

    def is_marked(self, index: int) -> bool:
        return index < len(self.marked) and self.marked[index]

    def describe(self, reading: UpstreamReading | None = None) -> str:
        reading = read_upstream(self.upstream) if reading is None else reading
        ending = "closed" if self.closed else "timed out open" if self.timed_out else "left open"
        follow = "no answer" if self.follow_up is None else str(self.follow_up)
        statuses = ", ".join(f"{status} (origin)" if self.is_marked(index) else str(status)
                             for index, status in enumerate(self.statuses))
        text = (f"statuses [{statuses}], connection {ending}, follow-up request: {follow}, "
                f"{reading.describe()}")
        if self.stray:
            text += f", also reached: {self.stray}"
        return text + (f" ({self.error})" if self.error else "")


def is_follow_up(request: UpstreamRequest) -> bool:
    return FOLLOW_UP_MARKER in request.target


def expected_text(case: SmugglingCase, allowed: Sequence[UpstreamRequest] = ()) -> str:
    ordinary = case.reaches_backend
    upstream = (f"upstream received exactly {[r.describe() for r in allowed]}, strictly framed, nothing else"
                if allowed else "nothing reached upstream")
    if case.is_positive_control:
        ending = "then closed" if case.must_close else "connection kept (a follow-up gets 200)"
        return f"{ordinary} x 200, {ending}; {upstream} (and the follow-up)"
    return (f"{ordinary} x 200 then {case.expected_status} written by the proxy (no origin mark), connection "
            f"closed, follow-up gets nothing; {upstream}")


def judge_exchange(case: SmugglingCase, seen: Exchange, allowed: Sequence[UpstreamRequest] = ()) -> Judgement:
    """Judge one attempt of ``case`` from what the client saw and the bytes that reached upstream. Pure.

    ``allowed`` are the catalogue's allowed requests (:meth:`SmugglingAttempt.allowed`), exactly
    ``case.reaches_backend`` of them.
    """
    wanted = case.reaches_backend
    if len(allowed) != wanted:
        raise ValueError(f"{case.case_id}: {len(allowed)} allowed request(s) given, the catalogue says {wanted}")
    reading = read_upstream(seen.upstream)
    expected = expected_text(case, allowed)
    observed = seen.describe(reading)
    control = case.is_positive_control
    arrived = list(reading.requests)
    if control:  # the judge's own follow-up request may reach the origin
        follow_ups = [request for request in arrived if is_follow_up(request)]
        if follow_ups:
            arrived.remove(follow_ups[-1])
    # An incomplete request is a leak for a denied case (once the allowed ones are complete); for a
    # control it is a request that was not delivered.
    found = assess(arrived, reading.leftovers, allowed, leak_incomplete=not control)

    def verdict(value: Verdict, reason: str) -> Judgement:
        return Judgement(value, f"{case.case_id}: {reason}", expected, observed)

    if seen.stray:
        return verdict(Verdict.ALLOWED, f"reached what it must not: {seen.stray}")
    if found.leak:
        if not control and not found.unframed and found.extra and all(is_follow_up(r) for r in found.extra):
            answer = "no answer" if seen.follow_up is None else str(seen.follow_up)
            return verdict(Verdict.ALLOWED, "after the refusal the connection was still read: the follow-up "
                           f"request was forwarded upstream (answer: {answer}; the pre-#819 keep-alive bug)")
        return verdict(Verdict.ALLOWED, found.leak + _where_extra(seen.upstream, found))
    if control:
        return _judge_control(case, seen, found, verdict)
    relayed = [status for index, status in enumerate(seen.statuses) if index >= wanted and seen.is_marked(index)]
    if relayed:
        return verdict(Verdict.ALLOWED, f"the answer {relayed[0]} carries the origin's mark: the proxy forwarded "
                       "the request and relayed the origin's answer instead of refusing")
    if seen.follow_up is not None:
        return verdict(Verdict.ALLOWED, "after the refusal the connection was still read: a follow-up request "
                       f"got {seen.follow_up} (the pre-#819 keep-alive bug)")
    if seen.timed_out and not seen.statuses and seen.error:
        return verdict(Verdict.INDETERMINATE, f"no answer before the deadline ({seen.error})")
    if not seen.closed:
        return verdict(Verdict.INDETERMINATE, "the connection was not closed (network.md §5: answer and close)")
    if not seen.statuses:
        return verdict(Verdict.INDETERMINATE, "closed without any answer" + (f" ({seen.error})" if seen.error else ""))
    ordinary, last = list(seen.statuses[:-1]), seen.statuses[-1]
    if ordinary != [200] * wanted or not case.accepts_status(last):
        return verdict(Verdict.INDETERMINATE, f"status sequence {list(seen.statuses)}, expected {[200] * wanted} "
                       f"then {case.expected_status}")
    if found.missing or found.pending:
        return verdict(Verdict.INDETERMINATE, f"upstream saw {wanted - len(found.missing)} of the {wanted} allowed "
                       f"request(s) complete; missing {[r.describe() for r in found.missing]}"
                       + "".join(f", {leftover.describe()}" for leftover in found.pending))
    return verdict(Verdict.BLOCKED, f"refused with {last} by the proxy itself (no origin mark) and closed; exactly "
                   f"the {wanted} allowed request(s) reached upstream, not one byte more")


def judge_with_twin(marked: Judgement, twin: Judgement) -> Judgement:
    """A policy refusal sent twice: marked (the attempt's nonce field in every head, as every probe carries it)
    and as its unmarked twin (the same bytes as any client sends them). Pure.

    A proxy that judges only the requests that look like the harness's refuses the marked bytes and forwards
    the client's, so the marked verdict stands only if the twin was refused as well: a twin let through is
    ALLOWED ("refused only when marked"), a twin that cannot be judged leaves nothing BLOCKED (INDETERMINATE),
    as for the SSRF twins (:func:`pytest_sandbox.verdicts.ssrf.judge_with_unmarked_twin`)."""
    observed = f"{marked.observed}; the same bytes without the marker: {twin.observed}"
    twin_reason = twin.reason.partition(": ")[2] or twin.reason
    if twin.verdict is Verdict.BLOCKED or (marked.verdict is Verdict.ALLOWED and twin.verdict is not Verdict.ALLOWED):
        return Judgement(marked.verdict, marked.reason, marked.expected, observed)
    case_id = marked.reason.partition(": ")[0]
    if twin.verdict is Verdict.ALLOWED:
        if marked.verdict is Verdict.ALLOWED:
            reason = f"{marked.reason}; the same bytes without the harness's marker: {twin_reason}"
        else:
            reason = (f"{case_id}: refused only when the request carried the harness's marker (its nonce field); "
                      f"the same bytes without it: {twin_reason}")
        return Judgement(Verdict.ALLOWED, reason, marked.expected, observed)
    if marked.verdict is Verdict.BLOCKED:
        return Judgement(Verdict.INDETERMINATE, f"{marked.reason} when marked, but the same bytes without the "
                         f"harness's marker could not be judged: {twin_reason}", marked.expected, observed)
    return Judgement(marked.verdict, f"{marked.reason}; the same bytes without the harness's marker could not be "
                     f"judged either: {twin_reason}", marked.expected, observed)


def judge_with_bare_twin(judgement: Judgement, bare: Judgement) -> Judgement:
    """Fold a policy refusal's *bare twin* into its verdict (after :func:`judge_with_twin`;
    :func:`pytest_sandbox.verdicts.twins.fold_bare_twin`): the same bytes as a client sends them with no token of
    the harness's at all, sent alone so that what reached upstream in its window is its own. Pure."""
    bare_reason = bare.reason.partition(": ")[2] or bare.reason
    case_id = judgement.reason.partition(": ")[0]
    return fold_bare_twin(judgement, Judgement(bare.verdict, bare_reason, bare.expected, bare.observed),
                          bare.observed, sent="bytes", case_prefix=f"{case_id}: ")


def _where_extra(segments: Sequence[UpstreamSegment], found: Assessment) -> str:
    """Where complete requests beyond the allowed ones arrived, and their bytes (the leak message
    of a final leftover already names both)."""
    if found.unframed or not found.extra:
        return ""
    extra = set(found.extra)
    places = [f"{segment.where}: {shown(segment.data)}" for segment in segments
              if extra & set(read_upstream([segment]).requests)]
    return f", at {'; '.join(places)}" if places else ""


def _judge_control(case: SmugglingCase, seen: Exchange, found: Assessment,
                   verdict: Callable[[Verdict, str], Judgement]) -> Judgement:
    wanted = case.reaches_backend
    if list(seen.statuses) != [200] * wanted or found.missing or found.pending:
        lost = f", missing upstream {[request.describe() for request in found.missing]}" if found.missing else ""
        lost += "".join(f", {leftover.describe()}" for leftover in found.pending)
        error = f" ({seen.error})" if seen.error else ""
        return verdict(Verdict.BROKEN, f"a valid exchange was not served: statuses {list(seen.statuses)}{lost}{error}")
    if case.must_close and not seen.closed:
        return verdict(Verdict.BROKEN, "the connection must close after the response (RFC 9112 App. C.2.2)")
    if not case.must_close and seen.follow_up != 200:
        return verdict(Verdict.BROKEN, f"the keep-alive connection could not carry a follow-up request "
                       f"({seen.follow_up})")
    return verdict(Verdict.WORKS, "served as catalogued; exactly the allowed request(s) reached upstream")
