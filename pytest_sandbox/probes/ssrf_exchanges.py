"""SSRF exchanges: one test's traffic, run in a campaign and judged -- the catalogue attempts and the rest.

:class:`AttemptExchange` sends one catalogue attempt. The others attack what a per-request table check
misses (network.md §3): a private follow-up on a keep-alive connection, a Host header that disagrees
with the request target, a name with one private answer among public ones, and a name that rebinds to
loopback. All run in one :class:`~pytest_sandbox.probes.campaign.Campaign` (:func:`run_ssrf_campaign`):
back to back, then the grace period, then attribution, so every request carries the exchange's
nonce, catch-all hits are attributed (late ones included) and the origin requests that count as
"reached" are only those carrying the nonce. An exchange the proxy gave no answer at all and no hit
(:func:`went_unanswered`: on a loaded machine, a deadline that ran out) is sent once more and judged on
the retry's answer and the hits of both sends (the campaign's retry); its verdict says so
(:func:`retry_note`). Judging is :mod:`pytest_sandbox.verdicts.ssrf`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import secrets
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from pytest_sandbox.catalogues.ssrf_cases import SsrfCase
from pytest_sandbox.http.responses import ParsedResponse
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, twin_nonce
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.probes.campaign import GRACE_SECONDS, RETRY_BUDGET, Campaign, ExchangeContext, ExchangeResult
from pytest_sandbox.probes.ssrf import (
    ATTEMPT_FORMS,
    ATTEMPT_TIMEOUT_SECONDS,
    TWIN_NONCE_FIELD,
    Attempt,
    hit_counts,
    new_hits,
    nonce_fields,
    nonce_path,
    plausible_destinations,
    read_one_response,
    send_attempt,
    twin_keeps_alive,
    twin_sends_request_id,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.ssrf import (
    HitCounts,
    ProxyReply,
    case_category,
    judge_attempt,
    judge_with_bare_twin,
    judge_with_unmarked_twin,
)

__all__ = [
    "BARE_SUFFIX",
    "BARE_TWIN_SAMPLE",
    "PUBLIC_ORIGIN",
    "UNMARKED_SUFFIX",
    "AttemptBound",
    "AttemptExchange",
    "BareTwin",
    "Carrier",
    "HostMismatchControl",
    "HostMismatchDenial",
    "KeepAliveFollowUp",
    "MixedAnswers",
    "Rebinding",
    "SsrfExchange",
    "SsrfVerdict",
    "Twinned",
    "bare_twin_sample",
    "custom_case",
    "retry_note",
    "run_attempt",
    "run_ssrf_campaign",
    "went_unanswered",
    "with_hit_notes",
    "with_retry_notes",
]

PUBLIC_ORIGIN = "11.0.0.10"


@dataclass(frozen=True)
class SsrfVerdict:
    """What one SSRF test reports: its scorecard category, id, judgement and what was attempted."""

    category: str
    test_id: str
    judgement: Judgement
    attempted: str


class SsrfExchange(Protocol):
    """A :class:`~pytest_sandbox.probes.campaign.Exchange` that can also judge what it observed."""

    @property
    def key(self) -> str: ...

    def destinations(self) -> frozenset[str]: ...

    def control(self) -> str | None: ...

    def perform(self, context: ExchangeContext, nonce: str) -> Any: ...

    def judge(self, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
        """The verdict on ``result`` and, for a denial with an unmarked twin, the twin's ``twin``."""
        ...


# The key suffix of an exchange's unmarked twin (its own exchange in the campaign, judged with the marked one).
UNMARKED_SUFFIX = "~unmarked"


@dataclass(frozen=True)
class Carrier:
    """How one exchange's requests carry its nonce. Marked (every probe): ``X-Sandbox-Probe`` and a
    ``/sandbox-probe/`` path. An unmarked twin: the nonce as :func:`~pytest_sandbox.network.lab.attribution.
    twin_nonce` spells it (a UUID4, no ``sbx-`` text), as one opaque path segment and, for half the twins
    (:func:`~pytest_sandbox.probes.ssrf.twin_sends_request_id`), in ``X-Request-ID``: what any client sends;
    and half of them (:func:`~pytest_sandbox.probes.ssrf.twin_keeps_alive`) as persistent requests, without the
    ``Connection: close`` every marked probe sends."""

    text: str
    marked: bool = True
    request_id: bool = True
    keep_alive: bool = False

    @classmethod
    def of(cls, nonce: str, marked: bool, key: str) -> Carrier:
        """The carrier of exchange ``key`` (its marked key) for the campaign's ``nonce``."""
        if marked:
            return cls(nonce)
        return cls(twin_nonce(nonce), marked=False, request_id=twin_sends_request_id(key),
                   keep_alive=twin_keeps_alive(key))

    @property
    def path(self) -> str:
        return nonce_path(self.text, self.marked)

    @property
    def fields(self) -> list[str]:
        return nonce_fields(self.text, self.marked, self.request_id)

    def send(self, sock: socket.socket, attempt: Attempt, timeout: float = ATTEMPT_TIMEOUT_SECONDS) -> ProxyReply:
        """:func:`~pytest_sandbox.probes.ssrf.send_attempt` with the nonce carried this way."""
        return send_attempt(sock, attempt, timeout, nonce=self.text, marked=self.marked, request_id=self.request_id,
                            keep_alive=self.keep_alive)

    def carried_by(self, target: str, header: Callable[[str], str | None]) -> bool:
        """Whether a request with ``target`` and fields ``header`` carries this nonce (an origin's record)."""
        return self.text in target or self.text in (header(NONCE_HEADER), header(TWIN_NONCE_FIELD))


def twin_key(key: str, marked: bool) -> str:
    return key if marked else key + UNMARKED_SUFFIX


class Twinned:
    """What an exchange with an unmarked twin shares (a frozen dataclass with a ``marked`` field): its key (the
    twin's ends in :data:`UNMARKED_SUFFIX`), its twin and how its requests carry the nonce."""

    marked: bool

    @property
    def base_key(self) -> str:
        raise NotImplementedError

    @property
    def key(self) -> str:
        return twin_key(self.base_key, self.marked)

    def unmarked_twin(self) -> Any:
        """The same exchange sent unmarked, judged with this one (None for a twin)."""
        return dataclasses.replace(cast(Any, self), marked=False) if self.marked else None

    def carrier(self, nonce: str) -> Carrier:
        return Carrier.of(nonce, self.marked, self.base_key)


def with_hit_notes(judgement: Judgement, result: ExchangeResult) -> Judgement:
    """Add how each attributed hit relates to its attempt (timing, bytes, shared blame) to ``observed``."""
    if not result.blamed:
        return judgement
    return dataclasses.replace(judgement, observed=f"{judgement.observed} [{result.describe_hits()}]")


def went_unanswered(result: ExchangeResult) -> bool:
    """Whether the proxy gave ``result``'s exchange no HTTP answer at all before its deadline (no parsed response:
    a timeout, a reset, a close before a status line) and nothing else in what it saw is evidence either (an origin
    dialled). On a loaded machine that is as often the machine's doing as the proxy's, so the campaign sends it
    again (a hit is checked there: an exchange with one is never sent again). Each observation says it itself
    (``unanswered``); one that cannot say counts as answered."""
    return bool(getattr(result.observation, "unanswered", False))


def _describe_observation(observation: Any) -> str:
    describe = getattr(observation, "describe", None)
    if callable(describe):
        return str(describe())
    reply = getattr(observation, "reply", None)
    return reply.describe() if isinstance(reply, ProxyReply) else "no HTTP answer"


def retry_note(result: ExchangeResult) -> str:
    """What a verdict adds about retrying ``result``'s exchange: "" when it was sent once."""
    if result.first_send is not None:
        return (f"sent again after no answer: the first send got {_describe_observation(result.first_send.observation)}"
                "; judged on the retry's answer and the hits of both sends")
    if result.retry_skipped:
        return (f"not sent again after no answer: the campaign's {RETRY_BUDGET} retries were spent, so it is judged "
                "on its one send")
    return ""


def with_retry_notes(verdict: SsrfVerdict, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
    """``verdict`` with :func:`retry_note` of the exchange and of its unmarked twin added to ``observed``."""
    twin_note = retry_note(twin) if twin is not None else ""
    notes = [note for note in (retry_note(result), twin_note and f"the same request without the marker {twin_note}")
             if note]
    if not notes:
        return verdict
    judgement = verdict.judgement
    observed = f"{judgement.observed} [{'; '.join(notes)}]"
    return dataclasses.replace(verdict, judgement=dataclasses.replace(judgement, observed=observed))


def _failed_reply(error: OSError) -> ProxyReply:
    return ProxyReply(ParsedResponse(None, (), b""), None, closed=True, timed_out=False,
                      error=f"could not reach the proxy: {error}")


@dataclass(frozen=True)
class AttemptBound(Twinned):
    """An exchange about one :class:`~pytest_sandbox.probes.ssrf.Attempt`: keyed by its test id, blamed
    for the destinations its case could reach, never a positive control unless a subclass says so.
    ``marked=False`` is the exchange's unmarked twin (:class:`Carrier`)."""

    attempt: Attempt
    timeout: float = ATTEMPT_TIMEOUT_SECONDS
    marked: bool = True

    @property
    def base_key(self) -> str:
        return self.attempt.test_id

    def unmarked_twin(self) -> Any:
        """The twin a denial is proven with as well (None for a positive control or a twin)."""
        return None if self.attempt.case.expected == "allowed" else super().unmarked_twin()

    def destinations(self) -> frozenset[str]:
        return plausible_destinations(self.attempt.case)

    def control(self) -> str | None:
        return None


def _judged_with_twin(attempt: Attempt, reply: ProxyReply, twin_reply: ProxyReply | None, result: ExchangeResult,
                      twin: ExchangeResult | None) -> Judgement:
    """:func:`judge_with_unmarked_twin` on an exchange's reply and its twin's, with the hits either caused."""
    blamed = (*result.blamed, *(twin.blamed if twin is not None else ()))
    judgement = with_hit_notes(judge_with_unmarked_twin(attempt, reply, twin_reply, hit_counts(blamed)), result)
    return judgement if twin is None else with_hit_notes(judgement, twin)


@dataclass(frozen=True)
class AttemptExchange(AttemptBound):
    """A catalogue attempt as a campaign exchange. ``marked=False`` is a denial's unmarked twin: the same
    request without the nonce field and nonce path (:meth:`~pytest_sandbox.probes.ssrf.Attempt.request_bytes`),
    an exchange of its own (its own nonce, window and hits), judged together with the marked attempt."""

    @property
    def category(self) -> str:
        return case_category(self.attempt.case)

    def control(self) -> str | None:
        return self.attempt.case.canary if self.attempt.case.expected == "allowed" else None

    def perform(self, context: ExchangeContext, nonce: str) -> ProxyReply:
        carrier = self.carrier(nonce)
        try:
            with context.connect() as sock:
                return carrier.send(sock, self.attempt, self.timeout)
        except OSError as exc:
            return _failed_reply(exc)

    def judge(self, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
        """The verdict on ``result`` and, for a denial, its unmarked twin's ``twin`` (hits of either count)."""
        judgement = _judged_with_twin(self.attempt, result.observation,
                                      twin.observation if twin is not None else None, result, twin)
        return SsrfVerdict(self.category, self.key, judgement, self.attempt.describe())


# The key suffix of a denial's bare twin: the request with no token at all, sent alone (BareTwin).
BARE_SUFFIX = "~bare"
# How many denials of a campaign also send a bare twin, drawn at random per campaign (bare_twin_sample): each runs
# alone, so a proxy that never answers one costs a whole deadline (3 s); a proxy that judges only requests carrying
# a token leaks every bare twin, so any one of them fails it, and it cannot tell in advance which denials they are.
BARE_TWIN_SAMPLE = 8


@dataclass(frozen=True)
class BareTwin(AttemptExchange):
    """A catalogue denial sent as curl sends it, with no token of any kind: no marker, no nonce, no request id
    (the unmarked twin still carries a UUID). Its bytes name nobody, so it runs alone (``sequential``): a canary
    hit in its window, at one of its destinations, is its own. Judged with the marked attempt
    (:func:`~pytest_sandbox.verdicts.ssrf.judge_with_bare_twin`)."""

    marked: bool = False
    # Its evidence carries no nonce: run alone, after the batch's grace period (Campaign._perform_all).
    sequential = True

    @property
    def key(self) -> str:
        return self.attempt.test_id + BARE_SUFFIX

    def unmarked_twin(self) -> Any:
        return None

    def perform(self, context: ExchangeContext, nonce: str) -> ProxyReply:
        del nonce  # registered for its window only: nothing it sends carries it
        try:
            with context.connect() as sock:
                return send_attempt(sock, self.attempt, self.timeout, nonce=None, marked=False,
                                    keep_alive=twin_keeps_alive(self.attempt.test_id))
        except OSError as exc:
            return _failed_reply(exc)


def bare_twin_sample(exchanges: Sequence[SsrfExchange], sample: int | Collection[str],
                     chooser: random.Random | None = None) -> dict[str, BareTwin]:
    """Marked exchange key -> its bare twin, for ``sample`` of the catalogue's policy denials in ``exchanges`` sent
    in a form a forward proxy serves (:data:`~pytest_sandbox.probes.ssrf.ATTEMPT_FORMS`; malformed targets and the
    other forms are refused as malformed whoever sends them): that many drawn at random (``chooser``, by default
    the system's random source: a proxy cannot predict them), or exactly the keys given."""
    denials = [e for e in exchanges if type(e) is AttemptExchange and e.marked and e.attempt.case.expected == "denied"
               and e.attempt.form in ATTEMPT_FORMS]
    if isinstance(sample, int):
        chosen = (chooser or random.SystemRandom()).sample(denials, min(sample, len(denials)))
    else:
        chosen = [e for e in denials if e.key in sample]
    return {e.key: BareTwin(e.attempt, e.timeout) for e in chosen}


# How many SSRF exchanges are in flight at once: each waits on the proxy (a refusal's close, a dial),
# so overlapping them bounds the category's time by the slowest ones, not by their sum.
SSRF_CONCURRENCY = 16


def _twins_of(exchanges: Sequence[SsrfExchange]) -> dict[str, SsrfExchange]:
    """Exchange key -> its unmarked twin, for every exchange of ``exchanges`` that has one."""
    twins: dict[str, SsrfExchange] = {}
    for exchange in exchanges:
        make_twin = getattr(exchange, "unmarked_twin", None)
        twin = make_twin() if make_twin is not None else None
        if twin is not None:
            twins[exchange.key] = twin
    return twins


def run_ssrf_campaign(lab: NetworkLab, connect_to_proxy: Callable[[], socket.socket],
                      exchanges: Sequence[SsrfExchange], *, grace: float = GRACE_SECONDS,
                      concurrency: int | None = SSRF_CONCURRENCY,
                      then: Sequence[SsrfExchange] = (), retry: bool = True,
                      bare: int | Collection[str] = BARE_TWIN_SAMPLE) -> dict[str, SsrfVerdict]:
    """Run ``exchanges`` through the proxy as one campaign and judge each: test id -> verdict.

    Every denial that has one also runs its unmarked twin (``unmarked_twin()``: the catalogue attempts, the
    keep-alive follow-ups, the Host-mismatch denials, the mixed answers and the rebinding names), so a proxy
    that judges only requests carrying the harness's marker fails it. ``then`` (judged too) is queued behind
    ``exchanges`` and their twins; ``concurrency=None`` puts exactly those in flight at once, so an exchange of
    ``then`` starts only when one of them has ended (the after-quiet set: its controls never end the quiet).
    An exchange that :func:`went_unanswered` with no hit is sent once more (the campaign's retry);
    ``retry=False`` judges every exchange on its one send (the after-quiet check, whose verdict is about
    what the proxy does with the first request after a silence). ``bare`` denials of ``exchanges`` (a number drawn
    at random, or the keys) also send a bare twin (:class:`BareTwin`), run alone after the others."""
    twins = _twins_of(exchanges)
    bare_twins = bare_twin_sample(exchanges, bare)
    first_wave = [*exchanges, *twins.values(), *bare_twins.values()]
    later_twins = _twins_of(then)
    twins.update(later_twins)
    campaign = Campaign(ExchangeContext(lab, connect_to_proxy), grace=grace,
                        concurrency=len(first_wave) if concurrency is None else concurrency)
    results = campaign.run([*first_wave, *then, *later_twins.values()], retry=went_unanswered if retry else None)
    verdicts = {}
    for exchange in (*exchanges, *then):
        twin = results[twins[exchange.key].key] if exchange.key in twins else None
        verdict = with_retry_notes(exchange.judge(results[exchange.key], twin), results[exchange.key], twin)
        if exchange.key in bare_twins:
            verdict = _with_bare_twin(verdict, bare_twins[exchange.key], results[bare_twins[exchange.key].key])
        verdicts[exchange.key] = verdict
    return verdicts


def _with_bare_twin(verdict: SsrfVerdict, bare: BareTwin, result: ExchangeResult) -> SsrfVerdict:
    """``verdict`` with its bare twin's ``result`` folded in (:func:`judge_with_bare_twin`, retry notes kept)."""
    judgement = with_hit_notes(judge_with_bare_twin(bare.attempt, verdict.judgement, result.observation,
                                                    hit_counts(result.blamed)), result)
    note = retry_note(result)
    if note:
        judgement = dataclasses.replace(judgement, observed=f"{judgement.observed} [the bare twin {note}]")
    return dataclasses.replace(verdict, judgement=judgement)


def run_attempt(attempt: Attempt, connect_to_proxy: Callable[[], socket.socket],
                lab: NetworkLab | Callable[[], HitCounts], timeout: float = ATTEMPT_TIMEOUT_SECONDS, *,
                grace: float = 0.0) -> Judgement:
    """Send ``attempt`` on a new proxy connection and judge it with the catch-all hits it caused.

    ``lab`` is the lab (or its bound ``all_hits``, as older callers pass it): the attempt is
    registered in the lab's ledger and hits are attributed as the campaign does, so a late hit of an
    earlier attempt is not blamed on this one. ``grace=0`` judges at once; a dial after that is left
    to the session-end audit. Pass :data:`~pytest_sandbox.probes.campaign.GRACE_SECONDS` to wait like
    the conformance suite, or use :func:`run_ssrf_campaign` for many attempts.
    """
    source = lab if isinstance(lab, NetworkLab) else getattr(lab, "__self__", None)
    if not isinstance(source, NetworkLab):
        snapshot: Callable[[], HitCounts] = lab  # type: ignore[assignment]
        before = snapshot()
        with connect_to_proxy() as sock:
            reply = send_attempt(sock, attempt, timeout)
        return judge_attempt(attempt, reply, new_hits(before, snapshot()))
    exchange = AttemptExchange(attempt, timeout)
    results = Campaign(ExchangeContext(source, connect_to_proxy), grace=grace, isolate=grace > 0).run([exchange])
    return exchange.judge(results[exchange.key]).judgement


def custom_case(case_id: str, host: str, canary: str | None, note: str, *, expected: str = "denied",
                port: int = 80, kind: str = "name") -> SsrfCase:
    """A case outside the catalogue, for the tests here."""
    return SsrfCase(case_id, host, port, kind, expected, canary, note)


def _nonce_requests(context: ExchangeContext, carrier: Carrier, origin: str = PUBLIC_ORIGIN) -> list[Any]:
    """The requests ``origin`` answered that carry the exchange's nonce: what this exchange itself delivered."""
    return [request for request in context.lab.origin_requests(origin) if carrier.carried_by(request.target,
                                                                                            request.header)]


def _get(url: str, host: str, carrier: Carrier, *, close: bool = False) -> bytes:
    lines = [f"GET {url} HTTP/1.1", f"Host: {host}", *carrier.fields]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _twin_not_run(judgement: Judgement, what: str) -> Judgement:
    """A denial whose unmarked twin could not show anything: never BLOCKED on the marked request alone."""
    if not judgement.passed:
        return judgement
    return Judgement(Verdict.INDETERMINATE, f"refused when marked, but the same request without the harness's "
                     f"marker could not be judged: {what}", judgement.expected, judgement.observed)


@dataclass(frozen=True)
class _KeepAliveObservation:
    first_status: int | None
    first_closed: bool
    reply: ProxyReply | None
    reached: int

    @property
    def usable(self) -> bool:
        return self.reply is not None and self.reached == 1

    @property
    def unanswered(self) -> bool:
        """No answer to the allowed first request (the follow-up was never sent), or none to the follow-up."""
        return self.first_status is None or (self.reply is not None and self.reply.unanswered)

    def describe(self) -> str:
        return f"{self.first_status}, closed={self.first_closed}, origin requests {self.reached}"


@dataclass(frozen=True)
class KeepAliveFollowUp(Twinned):
    """An allowed GET, then ``follow_up`` on the same connection: every request must be judged."""

    follow_up: SsrfCase
    timeout: float = ATTEMPT_TIMEOUT_SECONDS
    marked: bool = True

    @property
    def base_key(self) -> str:
        return f"keepalive-{self.follow_up.case_id}"

    @property
    def attempted(self) -> str:
        return f"GET http://{PUBLIC_ORIGIN}/ then {self.follow_up.absolute_url} on one connection"

    def destinations(self) -> frozenset[str]:
        return plausible_destinations(self.follow_up)

    def control(self) -> str | None:
        return None

    def perform(self, context: ExchangeContext, nonce: str) -> _KeepAliveObservation:
        deadline = time.monotonic() + self.timeout
        carrier = self.carrier(nonce)
        with context.connect() as sock:
            sock.sendall(_get(f"http://{PUBLIC_ORIGIN}{carrier.path}", PUBLIC_ORIGIN, carrier))
            first, first_closed = read_one_response(sock, deadline)
            if first.status != 200 or first_closed:
                return _KeepAliveObservation(first.status, first_closed, None, len(_nonce_requests(context, carrier)))
            sock.sendall(_get(f"http://{self.follow_up.authority}{carrier.path}", self.follow_up.authority, carrier))
            second, closed = read_one_response(sock, deadline)
            if not closed:
                _rest, closed = read_one_response(sock, deadline)
        reply = ProxyReply(second, None, closed=closed, timed_out=second.status is None and not closed)
        return _KeepAliveObservation(first.status, first_closed, reply, len(_nonce_requests(context, carrier)))

    def judge(self, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
        seen: _KeepAliveObservation = result.observation
        if seen.reply is None or not seen.usable:
            judgement = Judgement(
                Verdict.BROKEN, "the allowed first request did not leave a usable keep-alive connection "
                "that reached the public origin exactly once", "200, the connection kept open, one origin request",
                seen.describe())
            return SsrfVerdict("ssrf-controls", self.key, judgement, self.attempted)
        twin_seen: _KeepAliveObservation | None = twin.observation if twin is not None else None
        attempt = Attempt(self.follow_up, "absolute")
        judgement = _judged_with_twin(attempt, seen.reply, twin_seen.reply if twin_seen is not None else None,
                                      result, twin)
        if twin_seen is not None and not twin_seen.usable:
            judgement = _twin_not_run(judgement, "its allowed first request did not leave a usable keep-alive "
                                      f"connection ({twin_seen.describe()})")
        return SsrfVerdict("ssrf", self.key, judgement, self.attempted)


@dataclass(frozen=True)
class _HostMismatchObservation:
    status: int | None
    reached: tuple[tuple[str, str | None], ...]  # (target, Host) of each request the origin received

    @property
    def unanswered(self) -> bool:
        return self.status is None

    def describe(self) -> str:
        return f"{self.status}, origin requests {list(self.reached)}"


@dataclass(frozen=True)
class HostMismatchControl:
    """A public target with ``Host: 127.0.0.1``: the target decides (RFC 9112 §3.2.2), not the Host."""

    timeout: float = ATTEMPT_TIMEOUT_SECONDS

    @property
    def key(self) -> str:
        return "host-mismatch-public-target"

    def destinations(self) -> frozenset[str]:
        return frozenset({"127.0.0.1"})

    def control(self) -> str | None:
        return None  # it must reach an origin (a listener), never the catch-all

    def perform(self, context: ExchangeContext, nonce: str) -> _HostMismatchObservation:
        carrier = Carrier(nonce)
        with context.connect() as sock:
            sock.sendall(_get(f"http://{PUBLIC_ORIGIN}/host-mismatch{carrier.path}", "127.0.0.1", carrier, close=True))
            reply, _closed = read_one_response(sock, time.monotonic() + self.timeout)
        reached = tuple((r.target, r.header("host")) for r in _nonce_requests(context, carrier))
        return _HostMismatchObservation(reply.status, reached)

    def judge(self, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
        seen: _HostMismatchObservation = result.observation
        hits = hit_counts(result.blamed)
        expected = "routed to the target 11.0.0.10 with Host rewritten (or 400 on mismatch); no catch-all hit"
        observed = f"{seen.status}, origin requests {list(seen.reached)}, hits {hits}"
        if hits:
            judgement = Judgement(Verdict.ALLOWED, "the Host header steered the proxy to a canary", expected,
                                      observed)
        elif seen.status == 400 and not seen.reached:
            judgement = Judgement(Verdict.WORKS, "strict proxy: 400 on Host/target mismatch", expected, observed)
        elif seen.status == 200 and len(seen.reached) == 1 and seen.reached[0][1] == PUBLIC_ORIGIN:
            judgement = Judgement(Verdict.WORKS, "routed by the target; Host replaced", expected, observed)
        else:
            judgement = Judgement(Verdict.BROKEN, "not routed by the request target", expected, observed)
        return SsrfVerdict("ssrf-controls", self.key, with_hit_notes(judgement, result),
                           f"GET http://{PUBLIC_ORIGIN}/ with Host: 127.0.0.1")


@dataclass(frozen=True)
class HostMismatchDenial(AttemptBound):
    """A private target with a public ``Host`` header: still denied (and so is its unmarked twin)."""

    # Run alone: a dial its CONNECT causes before any tunnel exists carries no nonce, and overlapping
    # windows on the same canary would make every such exchange a suspect.
    sequential = True

    @property
    def base_key(self) -> str:
        return self.attempt.case.case_id

    @property
    def method(self) -> str:
        return "CONNECT" if self.attempt.form == "connect" else "GET"

    def perform(self, context: ExchangeContext, nonce: str) -> ProxyReply:
        carrier = self.carrier(nonce)
        target = self.attempt.request_target(carrier.text, marked=carrier.marked)
        lines = [f"{self.method} {target} HTTP/1.1", f"Host: {PUBLIC_ORIGIN}", *carrier.fields, "Connection: close"]
        with context.connect() as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            connect = self.method == "CONNECT"
            reply, closed = read_one_response(sock, time.monotonic() + self.timeout, to_connect=connect)
            if connect and not closed and reply.status is not None and 200 <= reply.status < 300:
                # A tunnel: the nonce goes through it, so whatever it reached names this exchange.
                with contextlib.suppress(OSError):
                    sock.sendall(self.attempt.tunnel_request_bytes(carrier.text) if carrier.marked else
                                 self.attempt.unmarked_tunnel_request_bytes(carrier.text,
                                                                            request_id=carrier.request_id))
                    read_one_response(sock, time.monotonic() + self.timeout)
            elif not closed and reply.status is not None:
                _rest, closed = read_one_response(sock, time.monotonic() + self.timeout)
        return ProxyReply(reply, None, closed=closed, timed_out=reply.status is None)

    def judge(self, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
        judgement = _judged_with_twin(self.attempt, result.observation,
                                      twin.observation if twin is not None else None, result, twin)
        return SsrfVerdict("ssrf", self.key, judgement,
                           f"{self.method} {self.attempt.target} with Host: {PUBLIC_ORIGIN}")


@dataclass(frozen=True)
class _MixedObservation:
    reply: ProxyReply
    dialled: tuple[tuple[str, int], ...]  # (origin, new connections) for each public origin

    @property
    def unanswered(self) -> bool:
        """No answer, and no public answer dialled (that is a leak whatever came back: never washed out)."""
        return self.reply.unanswered and not any(count for _origin, count in self.dialled)


@dataclass(frozen=True)
class MixedAnswers(AttemptBound):
    """A name with one special answer among public ones: denied, and the public answer never dialled."""

    # Its evidence is the public origins' connection counts, which carry no nonce: run it alone.
    sequential = True

    def perform(self, context: ExchangeContext, nonce: str) -> _MixedObservation:
        lab = context.lab
        carrier = self.carrier(nonce)
        # Exchanges in a campaign run one at a time, so the origins' connection counts move only
        # for this one (a CONNECT the proxy dials but refuses sends no bytes that could carry the nonce).
        before = {origin: lab.origin_connections(origin) for origin in lab.public_origins}
        with context.connect() as sock:
            reply = carrier.send(sock, self.attempt, self.timeout)
        dialled = tuple((origin, lab.origin_connections(origin) - count) for origin, count in before.items())
        return _MixedObservation(reply, dialled)

    def judge(self, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
        seen: _MixedObservation = result.observation
        twin_seen: _MixedObservation | None = twin.observation if twin is not None else None
        judgement = _judged_with_twin(self.attempt, seen.reply, twin_seen.reply if twin_seen is not None else None,
                                      result, twin)
        dialled = {origin: count for origin, count in seen.dialled if count}
        twin_dialled = {origin: count for origin, count in (twin_seen.dialled if twin_seen is not None else ())
                        if count}
        if (dialled or twin_dialled) and judgement.verdict is Verdict.BLOCKED:
            which = f"{dialled}" if dialled else f"{twin_dialled}, for the same request without the harness's marker"
            judgement = Judgement(Verdict.ALLOWED, f"the public answer was dialled anyway: {which}",
                                  judgement.expected, judgement.observed)
        return SsrfVerdict("ssrf", self.key, judgement, self.attempt.describe())


@dataclass(frozen=True)
class _RebindingObservation:
    name: str
    reply: ProxyReply
    first_status: int | None
    reached: int

    @property
    def first_served(self) -> bool:
        return self.first_status == 200 and self.reached == 1

    @property
    def unanswered(self) -> bool:
        """No answer to the request that must be refused (the name's second resolution)."""
        return self.reply.unanswered


@dataclass(frozen=True)
class Rebinding(Twinned):
    """A name that answers the public origin, then 127.0.0.1 (TTL 0): every resolution is judged again.

    ``form`` is ``connect``, ``absolute`` (two connections) or ``keepalive`` (one connection).
    """

    form: str
    timeout: float = 2 * ATTEMPT_TIMEOUT_SECONDS
    marked: bool = True

    @property
    def base_key(self) -> str:
        return f"{self.form}-dns-rebinding"

    def destinations(self) -> frozenset[str]:
        return frozenset({"127.0.0.1"})

    def control(self) -> str | None:
        return None

    def _case(self, name: str) -> SsrfCase:
        return custom_case(f"rebind-{self.form}", name, "127.0.0.1", "public first, then 127.0.0.1 (TTL 0)")

    def perform(self, context: ExchangeContext, nonce: str) -> _RebindingObservation:
        # A fresh name per run: the stub alternates per query, and an isolation rerun must start over.
        name = f"rebind-{secrets.token_hex(4)}.lab.test"
        context.lab.add_rebinding_name(name, PUBLIC_ORIGIN, "127.0.0.1")
        deadline = time.monotonic() + self.timeout
        carrier = self.carrier(nonce)
        if self.form == "keepalive":
            with context.connect() as sock:
                sock.sendall(_get(f"http://{name}{carrier.path}", name, carrier))
                first, _ = read_one_response(sock, deadline)
                sock.sendall(_get(f"http://{name}{carrier.path}/again", name, carrier))
                second, closed = read_one_response(sock, deadline)
                if not closed and second.status is not None:
                    _rest, closed = read_one_response(sock, deadline)
            reply = ProxyReply(second, None, closed=closed, timed_out=second.status is None and not closed)
            first_status = first.status
        else:
            first_attempt = Attempt(custom_case("rebind-first", name, PUBLIC_ORIGIN, "first", expected="allowed"),
                                    self.form)
            with context.connect() as sock:
                first_reply = carrier.send(sock, first_attempt)
            first_status = first_reply.final.status
            with context.connect() as sock:
                reply = carrier.send(sock, Attempt(self._case(name), self.form))
        return _RebindingObservation(name, reply, first_status, len(_nonce_requests(context, carrier)))

    def judge(self, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
        seen: _RebindingObservation = result.observation
        twin_seen: _RebindingObservation | None = twin.observation if twin is not None else None
        form = "absolute" if self.form == "keepalive" else self.form
        judgement = _judged_with_twin(Attempt(self._case(seen.name), form), seen.reply,
                                      twin_seen.reply if twin_seen is not None else None, result, twin)
        if judgement.passed and not seen.first_served:
            judgement = Judgement(
                Verdict.INDETERMINATE, f"the first, public resolution was not served (status "
                f"{seen.first_status}, origin requests {seen.reached}): rebinding not shown",
                judgement.expected, judgement.observed)
        if twin_seen is not None and not twin_seen.first_served:
            judgement = _twin_not_run(judgement, f"its first, public resolution was not served (status "
                                      f"{twin_seen.first_status}, origin requests {twin_seen.reached})")
        return SsrfVerdict("ssrf", self.key, judgement,
                           f"{self.form}: {seen.name} answers {PUBLIC_ORIGIN}, then 127.0.0.1")
