"""SSRF exchanges: one test's traffic, run in a campaign and judged -- the catalogue attempts and the rest.

:class:`AttemptExchange` sends one catalogue attempt. The others attack what a per-request table check
misses (network.md §3): a private follow-up on a keep-alive connection, a Host header that disagrees
with the request target, a name with one private answer among public ones, and a name that rebinds to
loopback. All run in one :class:`~pytest_sandbox.probes.campaign.Campaign` (:func:`run_ssrf_campaign`):
back to back, then the grace period, then attribution, so every request carries the exchange's
nonce, catch-all hits are attributed (late ones included) and the origin requests that count as
"reached" are only those carrying the nonce. Judging is :mod:`pytest_sandbox.verdicts.ssrf`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pytest_sandbox.catalogues.ssrf_cases import SsrfCase
from pytest_sandbox.http.responses import ParsedResponse
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, NONCE_PATH_PREFIX
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.probes.campaign import GRACE_SECONDS, Campaign, ExchangeContext, ExchangeResult
from pytest_sandbox.probes.ssrf import (
    ATTEMPT_TIMEOUT_SECONDS,
    Attempt,
    hit_counts,
    new_hits,
    plausible_destinations,
    read_one_response,
    send_attempt,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.ssrf import (
    HitCounts,
    ProxyReply,
    case_category,
    judge_attempt,
    judge_with_unmarked_twin,
)

__all__ = [
    "PUBLIC_ORIGIN",
    "UNMARKED_SUFFIX",
    "AttemptBound",
    "AttemptExchange",
    "HostMismatchControl",
    "HostMismatchDenial",
    "KeepAliveFollowUp",
    "MixedAnswers",
    "Rebinding",
    "SsrfExchange",
    "SsrfVerdict",
    "custom_case",
    "run_attempt",
    "run_ssrf_campaign",
    "with_hit_notes",
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

    def judge(self, result: ExchangeResult) -> SsrfVerdict: ...


def with_hit_notes(judgement: Judgement, result: ExchangeResult) -> Judgement:
    """Add how each attributed hit relates to its attempt (timing, bytes, shared blame) to ``observed``."""
    if not result.blamed:
        return judgement
    return dataclasses.replace(judgement, observed=f"{judgement.observed} [{result.describe_hits()}]")


def _failed_reply(error: OSError) -> ProxyReply:
    return ProxyReply(ParsedResponse(None, (), b""), None, closed=True, timed_out=False,
                      error=f"could not reach the proxy: {error}")


@dataclass(frozen=True)
class AttemptBound:
    """An exchange about one :class:`~pytest_sandbox.probes.ssrf.Attempt`: keyed by its test id, blamed
    for the destinations its case could reach, never a positive control unless a subclass says so."""

    attempt: Attempt
    timeout: float = ATTEMPT_TIMEOUT_SECONDS

    @property
    def key(self) -> str:
        return self.attempt.test_id

    def destinations(self) -> frozenset[str]:
        return plausible_destinations(self.attempt.case)

    def control(self) -> str | None:
        return None


# The key suffix of an attempt's unmarked twin (its own exchange in the campaign, judged with the attempt).
UNMARKED_SUFFIX = "~unmarked"


@dataclass(frozen=True)
class AttemptExchange(AttemptBound):
    """A catalogue attempt as a campaign exchange. ``marked=False`` is a denial's unmarked twin: the same
    request without the nonce field and nonce path (:meth:`~pytest_sandbox.probes.ssrf.Attempt.request_bytes`),
    an exchange of its own (its own nonce, window and hits), judged together with the marked attempt."""

    marked: bool = True

    @property
    def key(self) -> str:
        return self.attempt.test_id if self.marked else self.attempt.test_id + UNMARKED_SUFFIX

    @property
    def category(self) -> str:
        return case_category(self.attempt.case)

    def control(self) -> str | None:
        return self.attempt.case.canary if self.attempt.case.expected == "allowed" else None

    def unmarked_twin(self) -> AttemptExchange | None:
        """The twin a denial is proven with as well (None for a positive control or a twin)."""
        if not self.marked or self.attempt.case.expected == "allowed":
            return None
        return dataclasses.replace(self, marked=False)

    def perform(self, context: ExchangeContext, nonce: str) -> ProxyReply:
        try:
            with context.connect() as sock:
                return send_attempt(sock, self.attempt, self.timeout, nonce=nonce, marked=self.marked)
        except OSError as exc:
            return _failed_reply(exc)

    def judge(self, result: ExchangeResult, twin: ExchangeResult | None = None) -> SsrfVerdict:
        """The verdict on ``result`` and, for a denial, its unmarked twin's ``twin`` (hits of either count)."""
        blamed = (*result.blamed, *(twin.blamed if twin is not None else ()))
        judgement = judge_with_unmarked_twin(self.attempt, result.observation,
                                             twin.observation if twin is not None else None, hit_counts(blamed))
        judgement = with_hit_notes(judgement, result)
        if twin is not None:
            judgement = with_hit_notes(judgement, twin)
        return SsrfVerdict(self.category, self.key, judgement, self.attempt.describe())


# How many SSRF exchanges are in flight at once: each waits on the proxy (a refusal's close, a dial),
# so overlapping them bounds the category's time by the slowest ones, not by their sum.
SSRF_CONCURRENCY = 16


def run_ssrf_campaign(lab: NetworkLab, connect_to_proxy: Callable[[], socket.socket],
                      exchanges: Sequence[SsrfExchange], *, grace: float = GRACE_SECONDS,
                      concurrency: int = SSRF_CONCURRENCY) -> dict[str, SsrfVerdict]:
    """Run ``exchanges`` through the proxy as one campaign and judge each: test id -> verdict.

    Every catalogue denial also runs its unmarked twin (:meth:`AttemptExchange.unmarked_twin`), so a proxy
    that judges only requests carrying the harness's marker fails it."""
    twins = {exchange.key: twin for exchange in exchanges if isinstance(exchange, AttemptExchange)
             and (twin := exchange.unmarked_twin()) is not None}
    campaign = Campaign(ExchangeContext(lab, connect_to_proxy), grace=grace, concurrency=concurrency)
    results = campaign.run([*exchanges, *twins.values()])
    verdicts: dict[str, SsrfVerdict] = {}
    for exchange in exchanges:
        twin = twins.get(exchange.key)
        verdicts[exchange.key] = exchange.judge(results[exchange.key], results[twin.key]) \
            if isinstance(exchange, AttemptExchange) and twin is not None else exchange.judge(results[exchange.key])
    return verdicts


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


def _nonce_requests(context: ExchangeContext, nonce: str, origin: str = PUBLIC_ORIGIN) -> list[Any]:
    """The requests ``origin`` answered that carry ``nonce``: what this exchange itself delivered."""
    return [request for request in context.lab.origin_requests(origin)
            if nonce in request.target or request.header(NONCE_HEADER) == nonce]


def _get(url: str, host: str, nonce: str, *, close: bool = False) -> bytes:
    lines = [f"GET {url} HTTP/1.1", f"Host: {host}", f"{NONCE_HEADER}: {nonce}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class _KeepAliveObservation:
    first_status: int | None
    first_closed: bool
    reply: ProxyReply | None
    reached: int


@dataclass(frozen=True)
class KeepAliveFollowUp:
    """An allowed GET, then ``follow_up`` on the same connection: every request must be judged."""

    follow_up: SsrfCase
    timeout: float = ATTEMPT_TIMEOUT_SECONDS

    @property
    def key(self) -> str:
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
        with context.connect() as sock:
            sock.sendall(_get(f"http://{PUBLIC_ORIGIN}{NONCE_PATH_PREFIX}{nonce}", PUBLIC_ORIGIN, nonce))
            first, first_closed = read_one_response(sock, deadline)
            if first.status != 200 or first_closed:
                return _KeepAliveObservation(first.status, first_closed, None, len(_nonce_requests(context, nonce)))
            sock.sendall(_get(f"http://{self.follow_up.authority}{NONCE_PATH_PREFIX}{nonce}",
                              self.follow_up.authority, nonce))
            second, closed = read_one_response(sock, deadline)
            if not closed:
                _rest, closed = read_one_response(sock, deadline)
        reply = ProxyReply(second, None, closed=closed, timed_out=second.status is None and not closed)
        return _KeepAliveObservation(first.status, first_closed, reply, len(_nonce_requests(context, nonce)))

    def judge(self, result: ExchangeResult) -> SsrfVerdict:
        seen: _KeepAliveObservation = result.observation
        if seen.reply is None or seen.reached != 1:
            judgement = Judgement(
                Verdict.BROKEN, "the allowed first request did not leave a usable keep-alive connection "
                "that reached the public origin exactly once", "200, the connection kept open, one origin request",
                f"{seen.first_status}, closed={seen.first_closed}, origin requests {seen.reached}")
            return SsrfVerdict("ssrf-controls", self.key, judgement, self.attempted)
        judgement = judge_attempt(Attempt(self.follow_up, "absolute"), seen.reply, hit_counts(result.blamed))
        return SsrfVerdict("ssrf", self.key, with_hit_notes(judgement, result), self.attempted)


@dataclass(frozen=True)
class _HostMismatchObservation:
    status: int | None
    reached: tuple[tuple[str, str | None], ...]  # (target, Host) of each request the origin received


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
        with context.connect() as sock:
            sock.sendall(_get(f"http://{PUBLIC_ORIGIN}/host-mismatch{NONCE_PATH_PREFIX}{nonce}", "127.0.0.1",
                              nonce, close=True))
            reply, _closed = read_one_response(sock, time.monotonic() + self.timeout)
        reached = tuple((r.target, r.header("host")) for r in _nonce_requests(context, nonce))
        return _HostMismatchObservation(reply.status, reached)

    def judge(self, result: ExchangeResult) -> SsrfVerdict:
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
    """A private target with a public ``Host`` header: still denied."""

    # Run alone: a dial its CONNECT causes before any tunnel exists carries no nonce, and overlapping
    # windows on the same canary would make every such exchange a suspect.
    sequential = True

    @property
    def key(self) -> str:
        return self.attempt.case.case_id

    @property
    def method(self) -> str:
        return "CONNECT" if self.attempt.form == "connect" else "GET"

    def perform(self, context: ExchangeContext, nonce: str) -> ProxyReply:
        raw = (f"{self.method} {self.attempt.request_target(nonce)} HTTP/1.1\r\nHost: {PUBLIC_ORIGIN}\r\n"
               f"{NONCE_HEADER}: {nonce}\r\nConnection: close\r\n\r\n").encode()
        with context.connect() as sock:
            sock.sendall(raw)
            connect = self.method == "CONNECT"
            reply, closed = read_one_response(sock, time.monotonic() + self.timeout, to_connect=connect)
            if connect and not closed and reply.status is not None and 200 <= reply.status < 300:
                # A tunnel: the nonce goes through it, so whatever it reached names this exchange.
                with contextlib.suppress(OSError):
                    sock.sendall(self.attempt.tunnel_request_bytes(nonce))
                    read_one_response(sock, time.monotonic() + self.timeout)
            elif not closed and reply.status is not None:
                _rest, closed = read_one_response(sock, time.monotonic() + self.timeout)
        return ProxyReply(reply, None, closed=closed, timed_out=reply.status is None)

    def judge(self, result: ExchangeResult) -> SsrfVerdict:
        judgement = judge_attempt(self.attempt, result.observation, hit_counts(result.blamed))
        return SsrfVerdict("ssrf", self.key, with_hit_notes(judgement, result),
                           f"{self.method} {self.attempt.target} with Host: {PUBLIC_ORIGIN}")


@dataclass(frozen=True)
class _MixedObservation:
    reply: ProxyReply
    dialled: tuple[tuple[str, int], ...]  # (origin, new connections) for each public origin


@dataclass(frozen=True)
class MixedAnswers(AttemptBound):
    """A name with one special answer among public ones: denied, and the public answer never dialled."""

    # Its evidence is the public origins' connection counts, which carry no nonce: run it alone.
    sequential = True

    def perform(self, context: ExchangeContext, nonce: str) -> _MixedObservation:
        lab = context.lab
        # Exchanges in a campaign run one at a time, so the origins' connection counts move only
        # for this one (a CONNECT the proxy dials but refuses sends no bytes that could carry the nonce).
        before = {origin: lab.origin_connections(origin) for origin in lab.public_origins}
        with context.connect() as sock:
            reply = send_attempt(sock, self.attempt, self.timeout, nonce=nonce)
        dialled = tuple((origin, lab.origin_connections(origin) - count) for origin, count in before.items())
        return _MixedObservation(reply, dialled)

    def judge(self, result: ExchangeResult) -> SsrfVerdict:
        seen: _MixedObservation = result.observation
        judgement = with_hit_notes(judge_attempt(self.attempt, seen.reply, hit_counts(result.blamed)), result)
        dialled = {origin: count for origin, count in seen.dialled if count}
        if dialled and judgement.verdict is Verdict.BLOCKED:
            judgement = Judgement(Verdict.ALLOWED, f"the public answer was dialled anyway: {dialled}",
                                      judgement.expected, judgement.observed)
        return SsrfVerdict("ssrf", self.key, judgement, self.attempt.describe())


@dataclass(frozen=True)
class _RebindingObservation:
    name: str
    reply: ProxyReply
    first_status: int | None
    reached: int


@dataclass(frozen=True)
class Rebinding:
    """A name that answers the public origin, then 127.0.0.1 (TTL 0): every resolution is judged again.

    ``form`` is ``connect``, ``absolute`` (two connections) or ``keepalive`` (one connection).
    """

    form: str
    timeout: float = 2 * ATTEMPT_TIMEOUT_SECONDS

    @property
    def key(self) -> str:
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
        if self.form == "keepalive":
            with context.connect() as sock:
                sock.sendall(_get(f"http://{name}{NONCE_PATH_PREFIX}{nonce}", name, nonce))
                first, _ = read_one_response(sock, deadline)
                sock.sendall(_get(f"http://{name}{NONCE_PATH_PREFIX}{nonce}/again", name, nonce))
                second, closed = read_one_response(sock, deadline)
                if not closed and second.status is not None:
                    _rest, closed = read_one_response(sock, deadline)
            reply = ProxyReply(second, None, closed=closed, timed_out=second.status is None and not closed)
            first_status = first.status
        else:
            first_attempt = Attempt(custom_case("rebind-first", name, PUBLIC_ORIGIN, "first", expected="allowed"),
                                    self.form)
            with context.connect() as sock:
                first_reply = send_attempt(sock, first_attempt, nonce=nonce)
            first_status = first_reply.final.status
            with context.connect() as sock:
                reply = send_attempt(sock, Attempt(self._case(name), self.form), nonce=nonce)
        return _RebindingObservation(name, reply, first_status, len(_nonce_requests(context, nonce)))

    def judge(self, result: ExchangeResult) -> SsrfVerdict:
        seen: _RebindingObservation = result.observation
        form = "absolute" if self.form == "keepalive" else self.form
        judgement = with_hit_notes(
            judge_attempt(Attempt(self._case(seen.name), form), seen.reply, hit_counts(result.blamed)), result)
        if judgement.passed and (seen.first_status != 200 or seen.reached != 1):
            judgement = Judgement(
                Verdict.INDETERMINATE, f"the first, public resolution was not served (status "
                f"{seen.first_status}, origin requests {seen.reached}): rebinding not shown",
                judgement.expected, judgement.observed)
        return SsrfVerdict("ssrf", self.key, judgement,
                           f"{self.form}: {seen.name} answers {PUBLIC_ORIGIN}, then 127.0.0.1")

