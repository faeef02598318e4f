"""Run attempts through a proxy in a lab and collect the catch-all hits each one caused, late ones included.

A :class:`Campaign` sends a batch of exchanges (each one test's traffic) one after another, each
with a fresh nonce, registers their windows in the lab's ledger, waits the grace period after the
last one and only then attributes the catch-all hits (:func:`pytest_sandbox.network.lab.attribution.attribute`).
So a proxy that answers 403, closes and dials 200 ms later is caught on the case it leaked, not on
whichever test runs next, and a denied case is judged only after its grace period.

Sending the batch back to back keeps the category fast (hundreds of attempts in about a second),
but then a hit without a nonce (a late CONNECT dial sends no bytes) can be explained by several
attempts on the same destination. Such a hit is never dropped: every attempt that could have caused
it is blamed (sound). To be exact as well, the campaign then *isolates*: it reruns every attempt
blamed for such a hit, alone on its destinations (attempts on other destinations share a round),
waits the grace period and records what each one's rerun reached and how long after it ended. A
rerun that reproduced n hits at an address explains at most n of the first hits there, those whose
delay after that attempt matches; a hit no rerun explains stays blamed on every attempt that could
have caused it (a target that leaks only sometimes). A reference proxy never leaks, so it never
pays for isolation.

On a loaded machine two things go wrong with one rerun. Its dial can come so late that it lands in
the next round, on that round's exchange for the same destination (the true leaker's rerun then
reached nothing); and the lateness of one dial varies by more than the tolerance, so a hit matches no
rerun. So the campaign *confirms* before it takes a hit from any candidate: every candidate whose
rerun reached nothing where a hit without a nonce arrived is rerun alone :data:`CONFIRMATION_RERUNS`
more times (a leaker among them reaches it there and fails on those hits of its own). Only then are
the hits matched by lateness, and a hit no lateness matches is put on a candidate whose reruns did
reproduce hits there and has one left unexplained (by count, nearest lateness first; its verdict
says so). A hit the counts cannot place stays blamed on every candidate, and its verdicts say
"together with". Each isolation round also waits twice the latest lateness the campaign has seen
(bounded), so a slow proxy's rerun dial is usually read in its own round.

On a loaded machine an exchange sometimes gets no answer at all before its deadline (a timeout, a
reset), which says nothing about the proxy. Given ``retry`` (which first results went unanswered), the
campaign then *retries*: every such exchange that no hit at all is attributed to (a hit is evidence,
and a retry must never be a way to wash a leak out) is sent once more, under ``<key>#retry`` with a
fresh nonce, at most :data:`RETRY_CONCURRENCY` at a time and :data:`RETRY_BUDGET` per campaign.
After the grace period :meth:`Campaign.settle_retries` attributes every hit that arrived since the
first pass was read, to the first sends and the retries alike (by nonce, else by window and
destination; both sends of one exchange, or several exchanges, when it cannot tell). A retried
exchange is judged on the retry's answer and the hits of both sends (:func:`retry_evidence`): a proxy
that dials on the retry, or dials the first send's destination late and refuses the retry, fails.

:func:`audit_lab` is the session-end check: after one more grace period, every hit no verdict
accounted for fails the run, with its destination and the attempts that could have caused it.
:func:`audit_upstream` does the same for the bytes the lab's origins and inference backends received
(the smuggling and inference evidence): every byte no verdict judged that an upstream attempt
accounts for (it carries the attempt's nonce, continues a connection the attempt used, or arrived
within an attempt's window plus the grace period) fails the run, naming where it arrived, its
first bytes and the attempt(s).
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from pytest_sandbox.http.upstream import ReceivedStream, UpstreamLedger, attribute_pieces, shown, split_pieces
from pytest_sandbox.network.lab.attribution import (
    AttemptWindow,
    Attribution,
    CatchAllHit,
    attribute,
    describe_hit,
    new_nonce,
)
from pytest_sandbox.network.lab.lab import NetworkLab

__all__ = [
    "GRACE_SECONDS",
    "RETRY_BUDGET",
    "RETRY_CONCURRENCY",
    "RETRY_SUFFIX",
    "Campaign",
    "Exchange",
    "ExchangeContext",
    "ExchangeResult",
    "LateHits",
    "audit_lab",
    "audit_upstream",
    "in_flight",
    "isolation_rounds",
    "match_hits",
    "plan_retries",
    "retry_candidates",
    "retry_evidence",
    "round_wait",
    "settle_late_hits",
    "sleep_out_grace",
]

# How long after an attempt's end a dial is still blamed on it before judging. A proxy that dials
# later than this is still caught (by the batch if the batch is still running, else by the audit),
# but then the run fails rather than the one test.
GRACE_SECONDS = 0.5
# How closely a hit's delay after a candidate must match that candidate's delay when rerun alone for
# the hit to be its alone (the others confirmed by isolation leak anyway).
LATENESS_TOLERANCE_SECONDS = 0.05
# How many more times each candidate whose rerun alone reached nothing is rerun before a hit without a
# nonce whose lateness matched no rerun (a loaded machine) may be put, by count, on a candidate whose
# rerun reproduced it: a candidate that leaks at all is then seen leaking on one of 1 + this many tries.
CONFIRMATION_RERUNS = 2
# An isolation round waits at least twice the latest lateness seen so far in the campaign (at most this many
# grace periods): a proxy whose dials come late on a loaded machine then cannot land a rerun's dial in the
# next round, where the round's own attribution would give it to that round's exchange on the destination.
ROUND_WAIT_LIMIT_GRACES = 4
# How many attempts that got no answer before their deadline are sent again at once (the smuggling and SSRF
# campaigns): few enough that the machine is not what made them late again, enough that a proxy which never
# answers some valid request (tinyproxy and a chunked body) costs a deadline per four of them, not per one
# (issue #9: <= 60 s per proxy).
RETRY_CONCURRENCY = 4
# An attempt sent again is keyed ``<key>#retry`` (its window in the ledger, its hits, what the audit names).
RETRY_SUFFIX = "#retry"
# At most this many exchanges of a campaign are sent again: each retry can cost one deadline / RETRY_CONCURRENCY
# (a proxy that never answers), so this bounds what retrying adds to a campaign against any proxy (16 deadlines,
# about 48 s at the SSRF default of 3 s) while leaving room for every exchange a loaded machine starves; the rest
# keep their first result, and their verdicts say the budget ran out.
RETRY_BUDGET = 64
_campaign_ids = itertools.count(1)


@dataclass(frozen=True)
class ExchangeContext:
    """What an exchange may use: the lab (origins, DNS, sockets) and a way to reach the proxy under test."""

    lab: NetworkLab
    connect: Callable[[], socket.socket]


class Exchange(Protocol):
    """One test's traffic through the proxy. ``perform`` must be repeatable (isolation reruns it)."""

    @property
    def key(self) -> str: ...

    def destinations(self) -> frozenset[str]:
        """Every address a proxy could dial for it (any reading of its target): blame for byte-less hits."""
        ...

    def control(self) -> str | None:
        """The address a positive control must reach, or None for a denial."""
        ...

    def perform(self, context: ExchangeContext, nonce: str) -> Any:
        """Send it, carrying ``nonce`` in every request; return what came back (the observation)."""
        ...


@dataclass(frozen=True)
class ExchangeResult:
    """An exchange's observation and the catch-all hits attributed to it.

    ``hits`` are its own: carrying its nonce, explained by it alone, or caused by its rerun alone.
    ``shared`` are hits without a nonce it is blamed for together with ``shared_with`` (sound, not
    exact); ``isolated`` says it was rerun alone to settle such a hit. An exchange sent again after no
    answer (:func:`retry_evidence`) has the retry's observation and window, the hits of both sends, and
    its first send's own result in ``first_send``; ``retry_skipped`` marks one that went unanswered but
    was not sent again (:data:`RETRY_BUDGET` was spent).
    """

    key: str
    observation: Any
    window: AttemptWindow
    hits: tuple[CatchAllHit, ...]
    delays: tuple[float, ...] = ()  # per hit: seconds after the (re)run that caused it ended
    shared: tuple[CatchAllHit, ...] = ()
    shared_with: tuple[str, ...] = ()
    isolated: bool = False
    counted: int = 0  # of ``hits``: put on it by count after the confirmation reruns (lateness off by load)
    first_send: ExchangeResult | None = None
    retry_skipped: bool = False

    @property
    def blamed(self) -> tuple[CatchAllHit, ...]:
        """What a verdict must count: its own hits, or failing those, the shared ones."""
        return self.hits or self.shared

    def describe_hits(self) -> str:
        """How each hit relates to the attempt: ``10.0.0.1:80 0.203 s after it ended, no bytes`` etc."""
        notes = []
        # A retried exchange's hits: its first send's first (retry_evidence), each said to be whose.
        firsts = len(self.first_send.hits) if self.first_send is not None else 0
        for position, (hit, delay) in enumerate(zip(self.hits, _delays(self), strict=True)):
            when = f"{delay:.3f} s after it ended" if delay > 0 else "during it"
            send = "" if self.first_send is None else "first send: " if position < firsts else "retry: "
            notes.append(f"{send}{hit.endpoint} {when}, "
                         + (f"{len(hit.received)} bytes" if hit.received else "no bytes"))
        if self.isolated:
            notes.append("rerun alone to attribute hits without a nonce")
        if self.counted:
            notes.append(f"{self.counted} hit(s) without a nonce put on it by count: its lateness matched no rerun "
                         "(a loaded machine), its reruns alone reproduced them and the other candidates' "
                         f"{1 + CONFIRMATION_RERUNS} reruns alone reached nothing there")
        if self.shared:
            where = ", ".join(sorted({hit.endpoint for hit in self.shared}))
            notes.append(f"{len(self.shared)} hit(s) without a nonce at {where} blamed on it together with "
                         f"{', '.join(self.shared_with)}")
        return "; ".join(notes)


def _delays(result: ExchangeResult) -> tuple[float, ...]:
    """Per own hit, how long after the send that caused it ended it came (after the window when not recorded)."""
    return result.delays or tuple(hit.at - result.window.end for hit in result.hits)


def retry_candidates(results: Iterable[ExchangeResult],
                     went_unanswered: Callable[[ExchangeResult], bool]) -> list[str]:
    """The keys of the first results to send again, in campaign order: no answer (``went_unanswered``) and no hit,
    neither its own nor shared. A hit is evidence whatever the answer was, so an exchange that has one is judged
    on it as it is, never sent again. Pure."""
    return [result.key for result in results
            if not result.hits and not result.shared and went_unanswered(result)]


def plan_retries(candidates: Sequence[str], budget: int = RETRY_BUDGET) -> tuple[list[str], list[str]]:
    """(sent again, kept as they are): the first ``budget`` candidates, then the rest. Pure."""
    return list(candidates[:budget]), list(candidates[budget:])


def retry_evidence(first: ExchangeResult, retry: ExchangeResult) -> ExchangeResult:
    """What an exchange sent again is judged on: the retry's observation (the first send got no answer) and the
    hits of both sends, so a proxy that dials for the retry, or for the first send late and refuses the retry,
    is caught. The first send's own result stays in ``first_send``. Pure."""
    return ExchangeResult(
        first.key, retry.observation, retry.window, (*first.hits, *retry.hits), (*_delays(first), *_delays(retry)),
        (*first.shared, *retry.shared), tuple(sorted({*first.shared_with, *retry.shared_with})),
        first.isolated or retry.isolated, first.counted + retry.counted, first_send=first)


@dataclass
class LateHits:
    """The hits put on one send (a first send or a retry) after the first pass was judged."""

    hits: list[CatchAllHit] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    shared: list[CatchAllHit] = field(default_factory=list)
    shared_with: set[str] = field(default_factory=set)

    def added_to(self, result: ExchangeResult) -> ExchangeResult:
        return replace(result, hits=(*result.hits, *self.hits), delays=(*_delays(result), *self.delays),
                       shared=(*result.shared, *self.shared),
                       shared_with=tuple(sorted({*result.shared_with, *self.shared_with})))


def settle_late_hits(hits: Iterable[CatchAllHit], owners: Mapping[int, frozenset[str]],
                     ends: Mapping[str, float]) -> dict[str, LateHits]:
    """Put each hit on the sends it is attributed to (``owners``) that are in ``ends`` (send key -> when it
    ended): a send's own hit when every owner is one exchange's first send or its retry (``<key>#retry``): on
    the retry when the retry can have caused it, else on the first send; otherwise a hit shared by every owner
    in ``ends``, blamed together with the others (named as the owners are). An isolation rerun
    (``<key>#alone<n>``) is its exchange's too. Pure."""
    blamed: dict[str, LateHits] = {}
    for hit in hits:
        keys = owners.get(hit.index, frozenset())
        ours = sorted(key for key in keys if key in ends)
        if not ours:
            continue  # another campaign's, or nobody's: left to the session-end audit
        exchanges = {_exchange_of(key) for key in keys}
        if len(exchanges) == 1:
            send = next((key for key in ours if key.endswith(RETRY_SUFFIX)), ours[0])
            blame = blamed.setdefault(send, LateHits())
            blame.hits.append(hit)
            blame.delays.append(hit.at - ends[send])
            continue
        for key in ours:
            blame = blamed.setdefault(key, LateHits())
            blame.shared.append(hit)
            blame.shared_with.update(other for other in keys if _exchange_of(other) != _exchange_of(key))
    return blamed


def _exchange_of(key: str) -> str:
    """The exchange a send's key names: its first send's key, without ``#retry`` or an isolation rerun's
    ``#alone<n>``."""
    return key.removesuffix(RETRY_SUFFIX).split("#alone", 1)[0]


@dataclass
class _Run:
    exchange: Exchange
    window: AttemptWindow
    observation: Any


@dataclass
class _Isolation:
    rerun: set[str] = field(default_factory=set)
    runs: dict[str, int] = field(default_factory=dict)  # own key -> how many times it was rerun alone
    # own key -> {address: how long after its rerun ended each hit without the nonce came there}
    lateness: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # (own key, address) -> the most hits without the nonce one of its reruns alone made there
    capacity: dict[tuple[str, str], int] = field(default_factory=dict)
    hits: dict[str, list[tuple[CatchAllHit, float]]] = field(default_factory=dict)  # (hit, delay after the rerun)
    reached: dict[str, set[str]] = field(default_factory=dict)  # own key -> addresses its reruns reached at all
    counted: dict[str, int] = field(default_factory=dict)  # own key -> hits put on it by count
    rounds: int = 0
    slowest: float = 0.0  # the latest a hit without a nonce came after an attempt that can have caused it


T = TypeVar("T")


def in_flight(items: Sequence[T], work: Callable[[T], object], concurrency: int, name: str) -> None:
    """``work(item)`` for every item, at most ``concurrency`` at a time (in this thread when 1 or when there
    is one item); the first exception is raised after every item ran."""
    if concurrency <= 1 or len(items) <= 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items)), thread_name_prefix=name) as pool:
        for future in [pool.submit(work, item) for item in items]:
            future.result()


def sleep_out_grace(last_end: float, grace: float) -> None:
    """Sleep until ``grace`` seconds after ``last_end`` (a ``time.monotonic()`` moment in the past): what an
    attempt that ended then can still cause has arrived before its evidence is read."""
    remaining = last_end + grace - time.monotonic()
    if remaining > 0:
        time.sleep(min(remaining, grace))


def round_wait(grace: float, slowest: float) -> float:
    """How long an isolation round waits after its last rerun ended: twice the latest lateness seen so far
    (``slowest``), at least ``grace``, at most :data:`ROUND_WAIT_LIMIT_GRACES` grace periods. Pure."""
    return min(max(grace, 2 * slowest), ROUND_WAIT_LIMIT_GRACES * grace)


def isolation_rounds(keys: Sequence[str], destinations: dict[str, frozenset[str]]) -> list[list[str]]:
    """Pack candidates into rounds whose destination sets are pairwise disjoint (order kept).

    A candidate with no predicted destination gets a round of its own: any hit then is its own.
    """
    rounds: list[list[str]] = []
    used: list[set[str]] = []
    for key in keys:
        wanted = destinations[key]
        for members, taken in zip(rounds, used, strict=True):
            if wanted and taken and not (wanted & taken):
                members.append(key)
                taken.update(wanted)
                break
        else:
            rounds.append([key])
            used.append(set(wanted))
    return rounds


Slot = TypeVar("Slot")


def match_hits(edges: dict[int, list[tuple[float, Slot]]], capacity: dict[Slot, int]) -> dict[int, Slot]:
    """The most hits (index) each given one slot that can explain it, a slot taking at most its capacity.

    ``edges`` holds, per hit, (gap, slot) for every slot that may explain it: the smaller the gap, the
    better the match. Hits are placed best gap first, each trying its slots best first; a slot that
    is full gives one of its hits up when that hit can move to another of its slots (an augmenting
    path, Kuhn's algorithm), so one early near-tie never leaves a later hit unexplained while a
    matching that explains both exists.
    """
    holders: dict[Slot, list[int]] = {}
    chosen: dict[int, Slot] = {}
    options = {index: sorted(pairs, key=lambda pair: pair[0]) for index, pairs in edges.items()}

    def place(index: int, visited: set[Slot]) -> bool:
        for _gap, slot in options[index]:
            if slot in visited:
                continue
            visited.add(slot)
            held = holders.setdefault(slot, [])
            if len(held) < capacity.get(slot, 0):
                held.append(index)
                chosen[index] = slot
                return True
            for other in list(held):
                if place(other, visited):  # ``other`` moved to another of its slots
                    held.remove(other)
                    held.append(index)
                    chosen[index] = slot
                    return True
        return False

    for index in sorted(options, key=lambda i: (options[i][0][0] if options[i] else float("inf"), i)):
        place(index, set())
    return chosen


class Campaign:
    """Run exchanges through one proxy in ``context.lab`` and attribute every hit (see the module doc).

    ``grace=0`` and ``isolate=False`` give an immediate judgement: no wait, no reruns; a later dial
    is then left to :func:`audit_lab`.
    """

    def __init__(self, context: ExchangeContext, *, grace: float = GRACE_SECONDS, isolate: bool = True,
                 concurrency: int = 1) -> None:
        self.context = context
        self.grace = grace
        self.isolate = isolate
        self.concurrency = max(1, concurrency)
        self._prefix = f"c{next(_campaign_ids)}/"

    @property
    def lab(self) -> NetworkLab:
        return self.context.lab

    def run(self, exchanges: Sequence[Exchange],
            retry: Callable[[ExchangeResult], bool] | None = None) -> dict[str, ExchangeResult]:
        """Send ``exchanges``, wait the grace period, attribute every hit (isolating where it is needed): exchange
        key -> result. With ``retry`` (whether a first result went unanswered), each such result with no hit is
        sent once more and judged on both sends (:meth:`_retry`, the module doc)."""
        keys = [exchange.key for exchange in exchanges]
        if len(set(keys)) != len(keys):
            raise ValueError(f"exchange keys repeat: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
        if not exchanges:
            return {}
        mark = self.lab.hit_mark()
        runs = self._perform_all([(exchange, self._prefix + exchange.key) for exchange in exchanges])
        by_key = {run.window.key: run for run in runs}
        hits = self._settled_hits(mark, max(run.window.end for run in runs))
        attribution = attribute(hits, self.lab.attempt_windows(), self.grace)
        isolation = _Isolation()
        if self.isolate and self.grace > 0:
            attribution, isolation = self._isolate(attribution, hits, by_key)
        results: dict[str, ExchangeResult] = {}
        blamed_on: dict[str, list[CatchAllHit]] = {}  # one pass over the hits, not one per run
        for hit in hits:
            for owner in attribution.owners.get(hit.index, frozenset()):
                blamed_on.setdefault(owner, []).append(hit)
        for run in runs:
            key = run.window.key
            blamed = blamed_on.get(key, [])
            own = [hit for hit in blamed if attribution.owners[hit.index] == {key}]
            shared = [hit for hit in blamed if attribution.owners[hit.index] != {key}]
            others = sorted({owner.removeprefix(self._prefix) for hit in shared
                             for owner in attribution.owners[hit.index] if owner != key})
            alone = isolation.hits.get(key, [])
            results[run.exchange.key] = ExchangeResult(
                run.exchange.key, run.observation, run.window, (*own, *(hit for hit, _ in alone)),
                (*(hit.at - run.window.end for hit in own), *(delay for _, delay in alone)),
                tuple(shared), tuple(others), key in isolation.rerun, isolation.counted.get(key, 0))
            self.lab.account([hit.index for hit in blamed] + [hit.index for hit, _ in alone], by=key)
        if retry is not None:
            results = self._retry(results, runs, retry, through=mark + len(hits))
        return results

    # -- retrying what went unanswered ---------------------------------------------------------------

    def _retry(self, results: dict[str, ExchangeResult], runs: Sequence[_Run],
               went_unanswered: Callable[[ExchangeResult], bool], *, through: int) -> dict[str, ExchangeResult]:
        """Send every candidate (:func:`retry_candidates`, within :data:`RETRY_BUDGET`) once more, settle the
        hits since the first pass was read (``through``) and judge each retried exchange on both sends."""
        again, skipped = plan_retries(retry_candidates(results.values(), went_unanswered))
        results = {key: replace(result, retry_skipped=True) if key in skipped else result
                   for key, result in results.items()}
        if not again:
            return results
        exchange_of = {run.exchange.key: run.exchange for run in runs}
        # Fewer in flight than the first pass: the machine is not what makes them late again.
        retries = self._perform_all([(exchange_of[key], self._prefix + key + RETRY_SUFFIX) for key in again],
                                    concurrency=min(self.concurrency, RETRY_CONCURRENCY))
        blame = self.settle_retries([*runs, *retries], through)
        settled = {key: blame[self._prefix + key].added_to(result) if self._prefix + key in blame else result
                   for key, result in results.items()}
        for run in retries:
            key = run.exchange.key
            sent_again = ExchangeResult(key, run.observation, run.window, ())
            if run.window.key in blame:
                sent_again = blame[run.window.key].added_to(sent_again)
            settled[key] = retry_evidence(settled[key], sent_again)
        return settled

    def settle_retries(self, runs: Sequence[_Run], through: int) -> dict[str, LateHits]:
        """After the grace period that follows the last of ``runs``, attribute every hit from index ``through`` on
        that no verdict counted yet (late ones of the first pass included) to the sends in ``runs``
        (:func:`settle_late_hits`) and account each to them: send key -> what it is blamed for."""
        sleep_out_grace(max(run.window.end for run in runs), self.grace)
        fresh = [hit for hit in self.lab.unaccounted_hits() if hit.index >= through]
        if not fresh:
            return {}
        attribution = attribute(fresh, self.lab.attempt_windows(), self.grace)
        owners = {hit.index: attribution.owners.get(hit.index, frozenset()) for hit in fresh}
        blame = settle_late_hits(fresh, owners, {run.window.key: run.window.end for run in runs})
        for key, found in blame.items():
            self.lab.account([hit.index for hit in (*found.hits, *found.shared)], by=key)
            # Named as the first pass names them: this campaign's sends without its prefix.
            found.shared_with = {other.removeprefix(self._prefix) for other in found.shared_with}
        return blame

    # -- sending -----------------------------------------------------------------------------------

    def _perform_one(self, exchange: Exchange, key: str, runs: list[_Run]) -> None:
        nonce = new_nonce()
        begin = time.monotonic()
        run = _Run(exchange, AttemptWindow(key, nonce, exchange.destinations(), begin, begin, exchange.control()), None)
        try:
            run.observation = exchange.perform(self.context, nonce)
        finally:
            run.window = AttemptWindow(key, nonce, run.window.destinations, begin, time.monotonic(),
                                       run.window.control)
            runs.append(run)  # list.append is atomic: worker threads share ``runs``

    def _perform_all(self, planned: Sequence[tuple[Exchange, str]], concurrency: int | None = None) -> list[_Run]:
        """Perform ``planned``: up to ``concurrency`` (the campaign's when None) at a time, except exchanges that
        say ``sequential`` (their evidence is not keyed by their nonce), which run alone, after the others.

        Concurrency cannot mix evidence that carries a nonce; a hit without one is blamed on every
        exchange whose window (plus the grace period) holds it and whose destinations include it,
        then isolated (see the module doc), so overlapping windows cost a leaking proxy reruns,
        never a missed hit. Returned in the planned order.
        """
        runs: list[_Run] = []
        order = {key: index for index, (_exchange, key) in enumerate(planned)}
        concurrency = self.concurrency if concurrency is None else concurrency
        together = concurrency > 1
        parallel = [(e, k) for e, k in planned if together and not getattr(e, "sequential", False)]
        alone = [(e, k) for e, k in planned if not together or getattr(e, "sequential", False)]
        try:
            in_flight(parallel, lambda planned_one: self._perform_one(*planned_one, runs), concurrency,
                      "campaign")
            if parallel and alone and self.grace > 0:
                # Past the batch's grace period first: a byte-less hit of an exchange run alone is
                # then never blamed on the batch (whose windows all overlap) as well.
                time.sleep(self.grace)
            for exchange, key in alone:
                self._perform_one(exchange, key, runs)
        finally:
            # Registered even if an exchange raised: whatever it dialled must stay attributable.
            self.lab.register_attempts(run.window for run in runs)
        runs.sort(key=lambda run: order[run.window.key])
        return runs

    def _settled_hits(self, mark: int, last_end: float, wait: float | None = None) -> list[CatchAllHit]:
        sleep_out_grace(last_end, self.grace if wait is None else wait)
        return self.lab.hits(since=mark)

    # -- isolation ---------------------------------------------------------------------------------

    def _isolate(self, attribution: Attribution, hits: Sequence[CatchAllHit],
                 by_key: dict[str, _Run]) -> tuple[Attribution, _Isolation]:
        """Rerun every exchange blamed for a hit without a nonce alone (those that reached nothing
        there, 1 + CONFIRMATION_RERUNS times), then let each explain the phase-one hits its reruns
        reproduced (same address, same delay after it ended, else by count), one each (module doc)."""
        blind = [hit for hit in hits if hit.index not in attribution.exact
                 and attribution.owners.get(hit.index, frozenset()) & by_key.keys()]
        isolation = _Isolation()
        if not blind:
            return attribution, isolation
        # The least lateness each hit is consistent with (after the latest-ending attempt that can have caused it).
        isolation.slowest = max(min(hit.at - by_key[key].window.end for key in attribution.owners[hit.index]
                                    if key in by_key) for hit in blind)
        suspects = list(dict.fromkeys(owner for hit in blind
                                      for owner in sorted(attribution.owners[hit.index]) if owner in by_key))
        self._rerun_alone(suspects, by_key, isolation)
        owners = dict(attribution.owners)
        # A candidate whose rerun reached nothing where a hit arrived is rerun again before any hit is
        # taken from it: its dial may have come too late for its own round (a loaded machine).
        unsure = sorted({key for hit in blind for key in owners[hit.index]
                         if key in by_key and hit.address not in isolation.reached.get(key, set())})
        for _ in range(CONFIRMATION_RERUNS if unsure else 0):
            self._rerun_alone(unsure, by_key, isolation)
        explained = self._match_by_lateness(blind, owners, isolation, by_key)
        explained.update(self._match_by_count(blind, owners, isolation, by_key, explained))
        for index, key in explained.items():
            owners[index] = frozenset({key})
        return Attribution(owners, attribution.exact), isolation

    def _rerun_alone(self, keys: Sequence[str], by_key: dict[str, _Run], isolation: _Isolation) -> None:
        """Rerun ``keys``, each alone on its destinations (disjoint ones share a round), and record
        in ``isolation`` what each reached and how long after its rerun ended."""
        destinations = {key: by_key[key].window.destinations for key in keys}
        for members in isolation_rounds(keys, destinations):
            isolation.rounds += 1
            mark = self.lab.hit_mark()
            reruns = self._perform_all([(by_key[key].exchange, f"{key}#alone{isolation.rounds}")
                                        for key in members])
            ended = {run.window.key: run.window.end for run in reruns}
            round_hits = self._settled_hits(mark, max(ended.values()), round_wait(self.grace, isolation.slowest))
            # Only this round's windows: nothing else is running, so every hit now is one of them.
            local = attribute(round_hits, [run.window for run in reruns], self.grace)
            made: dict[tuple[str, str], int] = {}
            for hit in round_hits:
                for owner in local.owners.get(hit.index, frozenset()):
                    original = owner.split("#alone", 1)[0]
                    delay = hit.at - ended[owner]
                    isolation.slowest = max(isolation.slowest, delay)
                    isolation.hits.setdefault(original, []).append((hit, delay))
                    isolation.reached.setdefault(original, set()).add(hit.address)
                    if hit.index not in local.exact:  # a hit without the nonce, like the ones to explain
                        isolation.lateness.setdefault(original, {}).setdefault(hit.address, []).append(delay)
                        made[(original, hit.address)] = made.get((original, hit.address), 0) + 1
            for slot, count in made.items():
                isolation.capacity[slot] = max(isolation.capacity.get(slot, 0), count)
            for key in members:
                isolation.runs[key] = isolation.runs.get(key, 0) + 1
            isolation.rerun.update(members)

    @staticmethod
    def _cleared(hit: CatchAllHit, owners: dict[int, frozenset[str]], isolation: _Isolation,
                 by_key: dict[str, _Run]) -> bool:
        """Whether every candidate of ``hit`` in this campaign either reached its address when rerun
        alone (it fails on that anyway) or was rerun alone 1 + CONFIRMATION_RERUNS times and never did."""
        return all(hit.address in isolation.reached.get(key, set()) or isolation.runs.get(key, 0) > CONFIRMATION_RERUNS
                   for key in owners[hit.index] if key in by_key)

    @staticmethod
    def _gap(hit: CatchAllHit, key: str, isolation: _Isolation, by_key: dict[str, _Run]) -> float:
        """How far the hit's delay after ``key`` ended is from the nearest delay of ``key``'s reruns there."""
        after = hit.at - by_key[key].window.end
        return min(abs(after - delay) for delay in isolation.lateness[key][hit.address])

    def _match_by_lateness(self, blind: Sequence[CatchAllHit], owners: dict[int, frozenset[str]],
                           isolation: _Isolation, by_key: dict[str, _Run]) -> dict[int, str]:
        """A rerun that reproduced n hits at an address explains at most n of them, those whose delay
        after it matches within the tolerance; as many as can be explained are."""
        edges: dict[int, list[tuple[float, tuple[str, str]]]] = {}
        for hit in blind:
            if not self._cleared(hit, owners, isolation, by_key):
                continue
            for key in owners[hit.index] & isolation.rerun:
                if isolation.capacity.get((key, hit.address)):
                    gap = self._gap(hit, key, isolation, by_key)
                    if gap <= LATENESS_TOLERANCE_SECONDS:
                        edges.setdefault(hit.index, []).append((gap, (key, hit.address)))
        return {index: slot[0] for index, slot in match_hits(edges, dict(isolation.capacity)).items()}

    @staticmethod
    def _spare(blind: Sequence[CatchAllHit], isolation: _Isolation,
               explained: dict[int, str]) -> dict[tuple[str, str], int]:
        """(key, address) -> how many hits its reruns reproduced there that no phase-one hit is explained by yet."""
        spare = dict(isolation.capacity)
        address_of = {hit.index: hit.address for hit in blind}
        for index, key in explained.items():
            spare[(key, address_of[index])] -= 1
        return spare

    def _match_by_count(self, blind: Sequence[CatchAllHit], owners: dict[int, frozenset[str]],
                        isolation: _Isolation, by_key: dict[str, _Run], explained: dict[int, str]) -> dict[int, str]:
        """Put each hit the delays left unexplained on a candidate that reproduced hits at its address
        and has some left unexplained, when every other candidate was rerun alone 1 + CONFIRMATION_RERUNS
        times and never reached that address (nearest lateness first)."""
        spare = self._spare(blind, isolation, explained)
        edges: dict[int, list[tuple[float, tuple[str, str]]]] = {}
        for hit in blind:
            if hit.index in explained:
                continue
            reproducers = [key for key in owners[hit.index] if isolation.capacity.get((key, hit.address))]
            if reproducers and self._cleared(hit, owners, isolation, by_key) and all(
                    key in by_key for key in owners[hit.index]):
                edges[hit.index] = [(self._gap(hit, key, isolation, by_key), (key, hit.address))
                                    for key in reproducers]
        placed = {index: slot[0] for index, slot in match_hits(edges, spare).items()}
        for key in placed.values():
            isolation.counted[key] = isolation.counted.get(key, 0) + 1
        return placed


def audit_lab(lab: NetworkLab, *, grace: float = GRACE_SECONDS) -> str | None:
    """The session-end check: None, or one message naming every hit no verdict accounted for.

    Waits ``grace`` first (the session's --sandbox-watch-after, one grace period unless asked), so a dial made
    just after the last test is seen too.
    """
    if grace > 0:
        time.sleep(grace)
    unaccounted = lab.unaccounted_hits()
    if not unaccounted:
        return None
    windows = lab.attempt_windows()
    attribution = attribute(unaccounted, windows, grace)
    origin = min((window.begin for window in windows), default=unaccounted[0].at)
    parts = []
    for hit in unaccounted:
        owners = sorted(attribution.owners.get(hit.index, frozenset()))
        blamed = (f"can have come from {', '.join(owners[:5])}" + (f" and {len(owners) - 5} more" if len(owners) > 5
                                                                  else "")) if owners else "no attempt explains it"
        parts.append(f"{describe_hit(hit, origin)}: {blamed}")
    return (f"pytest-sandbox: {len(unaccounted)} connection(s) reached the lab's catch-all canary and no "
            "verdict accounted for them (a dial after its case was judged, or one no test watched); each "
            "is a destination the proxy must not reach: " + "; ".join(parts))


def audit_upstream(ledger: UpstreamLedger, streams: Sequence[ReceivedStream], *,
                   grace: float = GRACE_SECONDS) -> str | None:
    """None, or one message naming every upstream byte run an attempt accounts for and no verdict judged.

    Does not wait (call it after :func:`audit_lab`, which waits the grace period). Bytes without a
    nonce that arrived outside every upstream attempt's window plus grace, on a connection no
    attempt used, belong to another test (an inference request, an SSRF control) and are not
    reported here.
    """
    known = {window.nonce: window.key for window in ledger.windows}
    found: list[str] = []
    for stream in streams:
        for begin, end in ledger.gaps(stream):
            pieces = split_pieces(stream, begin, end, known)
            owners = attribute_pieces(pieces, ledger.windows, grace, graced_only=True,
                                      before={stream.key: ledger.owners_before(stream, begin)})
            for piece, keys in zip(pieces, owners, strict=True):
                if keys:
                    names = sorted(keys)
                    blamed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                    how = "carries its nonce" if piece.nonces else "no nonce; can have come from"
                    found.append(f"{piece.where}, bytes {piece.start}-{piece.end} ({how} {blamed}): "
                                 f"{shown(piece.data)}")
    if not found:
        return None
    return (f"pytest-sandbox: {len(found)} run(s) of bytes reached a lab origin or inference backend after the "
            "verdict of the attempt that sent them was given (the proxy forwarded them late, after refusing), "
            "so those verdicts did not see them: " + "; ".join(found))
