"""The SSRF tests beyond the catalogue, as campaign exchanges: keep-alive, Host header, DNS answers.

Each attacks what a per-request table check misses (network.md §3): a private follow-up on a
keep-alive connection, a Host header that disagrees with the request target, a name with one private
answer among public ones, and a name that rebinds to loopback. They run in the same
:class:`~pytest_sandbox.probes.campaign.Campaign` as the catalogue attempts, so they get the same evidence:
every request carries the exchange's nonce, catch-all hits are attributed (late ones included) and
the origin requests that count as "reached" are only those carrying the nonce.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from pytest_sandbox.catalogues.ssrf_cases import SsrfCase
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, NONCE_PATH_PREFIX
from pytest_sandbox.probes.campaign import ExchangeContext, ExchangeResult
from pytest_sandbox.probes.ssrf import (
    ATTEMPT_TIMEOUT_SECONDS,
    Attempt,
    ProxyReply,
    SsrfVerdict,
    hit_counts,
    judge_attempt,
    plausible_destinations,
    read_one_response,
    send_attempt,
    with_hit_notes,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

__all__ = [
    "PUBLIC_ORIGIN",
    "HostMismatchControl",
    "HostMismatchDenial",
    "KeepAliveFollowUp",
    "MixedAnswers",
    "Rebinding",
    "custom_case",
]

PUBLIC_ORIGIN = "11.0.0.10"


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
class HostMismatchDenial:
    """A private target with a public ``Host`` header: still denied."""

    attempt: Attempt
    timeout: float = ATTEMPT_TIMEOUT_SECONDS

    @property
    def key(self) -> str:
        return self.attempt.case.case_id

    @property
    def method(self) -> str:
        return "CONNECT" if self.attempt.form == "connect" else "GET"

    def destinations(self) -> frozenset[str]:
        return plausible_destinations(self.attempt.case)

    def control(self) -> str | None:
        return None

    def perform(self, context: ExchangeContext, nonce: str) -> ProxyReply:
        raw = (f"{self.method} {self.attempt.request_target(nonce)} HTTP/1.1\r\nHost: {PUBLIC_ORIGIN}\r\n"
               f"{NONCE_HEADER}: {nonce}\r\nConnection: close\r\n\r\n").encode()
        with context.connect() as sock:
            sock.sendall(raw)
            reply, closed = read_one_response(sock, time.monotonic() + self.timeout)
            if not closed and reply.status is not None:
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
class MixedAnswers:
    """A name with one special answer among public ones: denied, and the public answer never dialled."""

    attempt: Attempt
    timeout: float = ATTEMPT_TIMEOUT_SECONDS

    @property
    def key(self) -> str:
        return self.attempt.test_id

    def destinations(self) -> frozenset[str]:
        return plausible_destinations(self.attempt.case)

    def control(self) -> str | None:
        return None

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

