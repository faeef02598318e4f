"""The smuggling probe: each catalogue case sent on two paths, the raw exchange read, then judged.

Every :class:`~pytest_sandbox.catalogues.smuggling.SmugglingCase` is attempted on two paths
(network.md §4, §5), its placeholders filled by the path's
:class:`~pytest_sandbox.catalogues.smuggling.PathForm`:

* ``absolute``: the catalogue's bytes on a plain connection to the proxy, ``{host}`` a lab public
  origin and ``{denied}`` a special-use canary. Evidence: the origin's request log and the canaries.
* ``tunnel``: inside ``CONNECT inference.local:443`` + TLS with the interception CA
  (:func:`tunnel_payload`: origin-form inference routes, ``Host: inference.local``, the "denied"
  request a non-inference path on the same host). Evidence: the fake backend's request log.

A row refused by a policy decision on cleanly framed requests (``verdicts.smuggling.is_policy_denial``: a request
to a denied host or, in the tunnel, a non-inference path behind allowed ones) is also sent as its unmarked twin
(:meth:`SmugglingAttempt.twin`), the same bytes as any client sends them, through the SSRF twins' machinery (the
nonce as :func:`~pytest_sandbox.network.lab.attribution.twin_nonce`'s UUID, read back through its registry;
curl's fields; ``X-Request-ID`` on half): a proxy that judges only the harness's requests fails there.

Campaigns send the attempts (up to :data:`SMUGGLING_CONCURRENCY` at a time where every upstream byte
they can cause carries their nonce; see :func:`run_smuggling_campaign`), then attribute what reached
upstream and judge each with the pure :func:`~pytest_sandbox.verdicts.smuggling.judge_exchange`.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from pytest_sandbox.catalogues.smuggling import (
    ABSOLUTE_FORM,
    SMUGGLING_CASES,
    TUNNEL_FORM,
    PathForm,
    SmugglingCase,
    render,
)
from pytest_sandbox.http.upstream import (
    ReceivedStream,
    UpstreamPiece,
    UpstreamRequest,
    UpstreamSegment,
    allowed_prefix,
    assess,
    attribute_pieces,
    attribute_since,
    nonce_in_every_head,
    read_upstream,
    received_counts,
    segments_of,
    shown,
    split_pieces,
    stream_address,
    with_nonce,
)
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.inference.routing import INFERENCE_HOST
from pytest_sandbox.network.lab.attribution import (
    NONCE_HEADER,
    AttemptWindow,
    CatchAllHit,
    attribute,
    describe_hit,
    new_nonce,
    twin_nonce,
)
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.probes.campaign import (
    CONFIRMATION_RERUNS,
    GRACE_SECONDS,
    RETRY_CONCURRENCY,
    RETRY_SUFFIX,
    ROUND_WAIT_LIMIT_GRACES,
    in_flight,
    isolation_rounds,
    round_wait,
    sleep_out_grace,
)
from pytest_sandbox.probes.exchange import SocketReader
from pytest_sandbox.probes.inference import (
    ATTEMPT_TIMEOUT_SECONDS,
    inference_request,
    open_inference_tunnel,
)
from pytest_sandbox.probes.ssrf import TWIN_CLIENT_FIELDS, TWIN_NONCE_FIELD, nonce_fields, twin_sends_request_id
from pytest_sandbox.probes.ssrf_exchanges import BARE_SUFFIX, UNMARKED_SUFFIX
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.smuggling import (
    FOLLOW_UP_MARKER,
    Exchange,
    is_policy_denial,
    judge_exchange,
    judge_with_bare_twin,
    judge_with_twin,
)

__all__ = [
    "ABSOLUTE",
    "FOLLOW_UP_MARKER",
    "PATHS",
    "SMUGGLING_CONCURRENCY",
    "TUNNEL",
    "Sighting",
    "SmugglingAttempt",
    "absolute_follow_up",
    "build_attempts",
    "exchange",
    "first_reruns",
    "likely_causes_first",
    "next_causes",
    "possible_causes",
    "reproduced_by",
    "run_smuggling_attempt",
    "run_smuggling_campaign",
    "tunnel_follow_up",
    "tunnel_payload",
]

ABSOLUTE = ABSOLUTE_FORM.name
TUNNEL = TUNNEL_FORM.name
PATHS: tuple[str, ...] = (ABSOLUTE, TUNNEL)
# While a must-close attempt waits for the proxy, the upstream record is looked at this often: a
# proxy that forwarded the payload and stays silent is caught without waiting out the deadline.
LEAK_POLL_SECONDS = 0.05
# At most this many attempts of a campaign are rerun alone to settle evidence without a nonce: each rerun
# costs a grace period, and the suite must stay within its time against any responsive proxy (issue #9).
ISOLATION_RERUN_BUDGET = 32
# How many attempts whose every upstream byte carries their nonce are in flight at once (as SSRF):
# a must-close case against a proxy that keeps the connection open waits its whole deadline.
SMUGGLING_CONCURRENCY = 16
_campaign_ids = itertools.count(1)

def tunnel_payload(case: SmugglingCase) -> bytes:
    """The case's bytes for the inside of ``CONNECT inference.local:443``: every authority is
    inference.local (the inner-Host mismatch has its own test). Pure."""
    return render(case, TUNNEL_FORM, host=INFERENCE_HOST, denied=INFERENCE_HOST)


def absolute_follow_up(origin: str, nonce: str | None = None, *, marked: bool = True,
                       request_id: bool = True) -> bytes:
    """A plain GET to an allowed origin, marked so the origin log can leave it out (and carrying the
    attempt's nonce, when given, so the bytes it puts upstream are attributed to the attempt; an unmarked
    twin's as :func:`twin_fields` carries it)."""
    return inference_request("GET", _with_query(f"http://{origin}/{FOLLOW_UP_MARKER}", nonce, marked), host=origin,
                             headers=_nonce_headers(nonce, marked, request_id))


def tunnel_follow_up(nonce: str | None = None, *, marked: bool = True, request_id: bool = True) -> bytes:
    """A routed GET /v1/models (the query is ignored by routing), marked for the backend log."""
    return inference_request("GET", _with_query(f"/v1/models?{FOLLOW_UP_MARKER}", nonce, marked, "&"),
                             headers=_nonce_headers(nonce, marked, request_id))


def twin_fields(nonce: str, request_id: bool) -> list[str]:
    """The header lines of an unmarked twin whose nonce is ``nonce``: an ordinary client's fields and, when
    ``request_id``, the nonce in ``X-Request-ID``, spelt as :func:`~pytest_sandbox.network.lab.attribution.
    twin_nonce` spells it (the SSRF twins' :func:`~pytest_sandbox.probes.ssrf.nonce_fields`)."""
    return nonce_fields(twin_nonce(nonce), marked=False, request_id=request_id)


def _nonce_headers(nonce: str | None, marked: bool, request_id: bool) -> list[tuple[str, str]]:
    if nonce is None:
        return []
    lines = [f"{NONCE_HEADER}: {nonce}"] if marked else twin_fields(nonce, request_id)
    return [(name, value) for name, _colon, value in (line.partition(": ") for line in lines)]


def _with_query(target: str, nonce: str | None, marked: bool, separator: str = "?") -> str:
    """``target`` with an unmarked twin's nonce as its query (routes and origins match the path alone), as a
    client's own request id would ride; a marked request's target is left as it is."""
    return target if nonce is None or marked else f"{target}{separator}{twin_nonce(nonce)}"


def _twin_form(form: PathForm, nonce: str) -> PathForm:
    """``form`` with every request-target carrying the twin's nonce in its query (:func:`_with_query`)."""
    return replace(form, targets=MappingProxyType({placeholder: _with_query(target.decode("ascii"), nonce, False)
                                                   .encode("ascii") for placeholder, target in form.targets.items()}))


def _unmark(payload: bytes, nonce: str, lines: Sequence[str]) -> bytes:
    """``payload`` as :func:`~pytest_sandbox.http.upstream.with_nonce` marked it with ``nonce``, each of its
    ``X-Sandbox-Probe`` lines replaced by ``lines`` with that line's own ending: the twin's fields go exactly
    where the marked attempt's nonce went (every strictly framed head, the head strict framing stopped at, and
    every block after a CONNECT), so nothing a case tests moves. Pure."""
    field = re.compile(re.escape(f"{NONCE_HEADER}: {nonce}".encode("ascii")) + rb"(\r?\n)")
    return field.sub(lambda match: b"".join(line.encode("ascii") + match.group(1) for line in lines), payload)


@dataclass(frozen=True)
class SmugglingAttempt:
    """One catalogue case on one path; ``test_id`` is stable (``absolute-cl-te-both``). ``marked=False`` is
    its unmarked twin (:meth:`twin`): the same bytes as any client sends them, judged with the marked one."""

    case: SmugglingCase
    path: str
    marked: bool = True
    bare: bool = False  # with marked=False: the bare twin, no token of any kind (bare_twin)

    @property
    def test_id(self) -> str:
        suffix = "" if self.marked else BARE_SUFFIX if self.bare else UNMARKED_SUFFIX
        return f"{self.path}-{self.case.case_id}{suffix}"

    @property
    def base_id(self) -> str:
        """The marked attempt's test id (a twin's verdict is folded into it)."""
        return self.test_id.removesuffix(UNMARKED_SUFFIX).removesuffix(BARE_SUFFIX)

    def twin(self) -> SmugglingAttempt | None:
        """The unmarked twin a refusal decided by policy (not by framing) is proven with as well: a proxy that
        judges only the harness's requests refuses the marked bytes and forwards the same bytes from a client.
        None for a framing refusal (refused whoever sends it), a positive control, or a twin."""
        return replace(self, marked=False) if self.marked and is_policy_denial(self.case) else None

    def bare_twin(self) -> SmugglingAttempt | None:
        """The bare twin of a policy refusal: its bytes with curl's fields where the marker goes and no token at
        all (the unmarked twin's UUID is a token a proxy could key on). Its bytes carry no nonce, so the campaign
        sends it alone and attributes what reaches upstream by time. None where :meth:`twin` is None."""
        return replace(self, marked=False, bare=True) if self.twin() is not None else None

    def payload(self, *, origin: str, denied: str, nonce: str | None = None) -> bytes:
        """The bytes sent; with ``nonce``, carried by every strictly framed request (or the first
        head) as :data:`~pytest_sandbox.network.lab.attribution.NONCE_HEADER`
        (:func:`~pytest_sandbox.http.upstream.with_nonce`). An unmarked twin carries no harness field: each
        request-target carries :func:`~pytest_sandbox.network.lab.attribution.twin_nonce`'s UUID in its query,
        and where the nonce field would be go curl's ``User-Agent`` and ``Accept`` and, on half the twins (fixed
        per test id, and always where a head has no target to carry it: a CONNECT), ``X-Request-ID``."""
        form, host, other = (TUNNEL_FORM, INFERENCE_HOST, INFERENCE_HOST) if self.path == TUNNEL else (
            ABSOLUTE_FORM, origin, denied)
        if nonce is None:
            return render(self.case, form, host=host, denied=other)
        if self.marked:
            return with_nonce(render(self.case, form, host=host, denied=other), nonce)
        if self.bare:  # curl's fields exactly where the marker goes, and the nonce nowhere
            return _unmark(with_nonce(render(self.case, form, host=host, denied=other), nonce), nonce,
                           TWIN_CLIENT_FIELDS)
        marked = with_nonce(render(self.case, _twin_form(form, nonce), host=host, denied=other), nonce)
        payload = _unmark(marked, nonce, twin_fields(nonce, request_id=False))
        if twin_sends_request_id(self.base_id) or not nonce_in_every_head(payload, twin_nonce(nonce)):
            payload = _unmark(marked, nonce, twin_fields(nonce, request_id=True))
        return payload

    def follow_up(self, origin: str, nonce: str, payload: bytes) -> bytes:
        """The request tried on the connection after ``payload``'s answers, carrying ``nonce`` as ``payload``
        does (a twin's with ``X-Request-ID`` where ``payload``'s has it)."""
        if self.bare:  # no token in the follow-up either: it goes out on the same connection
            return tunnel_follow_up() if self.path == TUNNEL else absolute_follow_up(origin)
        request_id = f"{TWIN_NONCE_FIELD}: {twin_nonce(nonce)}".encode("ascii") in payload
        if self.path == TUNNEL:
            return tunnel_follow_up(nonce, marked=self.marked, request_id=request_id)
        return absolute_follow_up(origin, nonce, marked=self.marked, request_id=request_id)

    def allowed(self, *, origin: str, denied: str) -> tuple[UpstreamRequest, ...]:
        """The requests of this payload that may reach upstream: its first ``reaches_backend``."""
        return allowed_prefix(self.payload(origin=origin, denied=denied), self.case.reaches_backend)

    def describe(self) -> str:
        where = "inside CONNECT inference.local:443 (TLS)" if self.path == TUNNEL else "absolute-form to the proxy"
        return f"{self.case.case_id} {where}: {self.case.description} ({self.case.rfc})"


def build_attempts(cases: Iterable[SmugglingCase] = SMUGGLING_CASES,
                   paths: Iterable[str] = PATHS) -> tuple[SmugglingAttempt, ...]:
    wanted = tuple(paths)
    return tuple(SmugglingAttempt(case, path) for path in wanted for case in cases)


# --------------------------------------------------------------------------------------------------
# Sending (sockets come from the caller: lab sockets only)
# --------------------------------------------------------------------------------------------------


def exchange(sock: socket.socket, payload: bytes, case: SmugglingCase, follow_up: bytes,
             upstream: Callable[[], tuple[UpstreamSegment, ...]], allowed: Sequence[UpstreamRequest], *,
             mark: str, timeout: float = ATTEMPT_TIMEOUT_SECONDS, stray: Callable[[], str] = lambda: "") -> Exchange:
    """Send ``payload`` in one write, read the answers, then try ``follow_up`` on the same socket.

    A connection the case says must close is read until EOF or the deadline, but only as long as
    the verdict is open: as soon as a marked answer or a byte beyond ``allowed`` is seen upstream
    (``upstream()`` gives the bytes so far; it is polled while the proxy is silent) the attempt has
    leaked, and neither the deadline nor a follow-up can change that. One that must stay open is
    read until its ``reaches_backend`` answers arrived. ``upstream`` and ``stray`` are evaluated
    again at the end (the caller diffs its own snapshots).
    """
    reader = SocketReader(sock, time.monotonic() + timeout, bytearray())

    def relayed() -> bool:
        """A marked answer beyond the allowed ones: the origin answered what the proxy forwarded."""
        return not case.is_positive_control and any(
            response.carries(mark) for response in reader.responses()[case.reaches_backend:])

    def leaked() -> bool:
        if case.is_positive_control:
            return False
        reading = read_upstream(upstream())
        return relayed() or bool(assess(reading.requests, reading.leftovers, allowed).leak)

    looked: list[float] = []

    def watch() -> bool:
        """``leaked()``, remembering when it began to look when it says yes: on a loaded machine looking
        upstream can take longer than a late forwarder waits after closing, and the exchange with the proxy
        ended before the look (a close still unread then was sent before the bytes it found)."""
        began = time.monotonic()
        if leaked():
            looked.append(began)
            return True
        return False

    try:
        sock.sendall(payload)
    except (OSError, ssl.SSLError) as send_error:
        reader.eof, reader.error = True, f"send failed: {send_error}"
    if case.must_close:
        _fill_until_close(reader, relayed, watch, case.reaches_backend + 1, timeout)
    else:
        _fill_answers(reader, case.reaches_backend, timeout)
    ended = looked[0] if looked else time.monotonic()
    responses = reader.responses()
    closed, timed_out, error = reader.eof, reader.timed_out, reader.error
    # An attempt whose deadline ran out before its answers were complete gets no follow-up: the first answer
    # after it would be a late answer to the payload (an allowed request's 200 read as the follow-up's: "the
    # pre-#819 keep-alive bug" on a loaded machine). The campaign sends such an attempt again (_needs_retry); a
    # positive control whose answers did not all come in time is judged broken whatever a follow-up gets.
    late = _deadline_bound(case, reader.timed_out, len(responses))
    skip = closed or leaked() or late
    follow_status = None if skip else _follow_up(reader, follow_up, len(responses), timeout)
    if not skip:
        ended = time.monotonic()
        # A follow-up that got no answer before its deadline timed out open too (a control then is measured
        # again in a batch: _needs_retry).
        timed_out = timed_out or (follow_status is None and reader.timed_out)
    return Exchange(
        # parse_responses gives every response a status; the filter only narrows the type.
        statuses=tuple(r.status for r in responses if r.status is not None), closed=closed,
        timed_out=timed_out and not closed,
        follow_up=follow_status, upstream=upstream(), marked=tuple(r.carries(mark) for r in responses),
        stray=stray(), error=error, last_body=responses[-1].body if responses else b"", ended=ended,
    )


def run_smuggling_attempt(
    attempt: SmugglingAttempt, connect: Callable[[], socket.socket], lab: NetworkLab,
    backend: FakeInferenceBackend, ca_pem: bytes, *, origin: str, denied: str,
    timeout: float = ATTEMPT_TIMEOUT_SECONDS, grace: float = 0.0,
) -> tuple[Judgement, Exchange]:
    """Attempt one case through the proxy ``connect`` reaches and judge it: a campaign of one.

    ``grace=0`` judges at once (what arrives later is left to the session-end audit, which names
    it: the attempt's nonce travels with its bytes); pass :data:`~pytest_sandbox.probes.campaign.GRACE_SECONDS`
    to wait like the conformance suite, or use :func:`run_smuggling_campaign` for many attempts.
    """
    return run_smuggling_campaign([attempt], connect, lab, backend, ca_pem, origin=origin, denied=denied,
                                  timeout=timeout, grace=grace)[attempt.test_id]


@dataclass(frozen=True)
class _Sent:
    attempt: SmugglingAttempt
    window: AttemptWindow
    seen: Exchange
    allowed: tuple[UpstreamRequest, ...]


def run_smuggling_campaign(
    attempts: Sequence[SmugglingAttempt], connect: Callable[[], socket.socket], lab: NetworkLab,
    backend: FakeInferenceBackend, ca_pem: bytes, *, origin: str, denied: str,
    timeout: float = ATTEMPT_TIMEOUT_SECONDS, grace: float = GRACE_SECONDS,
    concurrency: int = SMUGGLING_CONCURRENCY, isolation_budget: int = ISOLATION_RERUN_BUDGET, twins: bool = True,
) -> dict[str, tuple[Judgement, Exchange]]:
    """Send every attempt through the proxy, wait ``grace``, then attribute and judge.

    With ``twins`` (the default), every attempt whose refusal is a policy decision also sends its unmarked
    twin (:meth:`SmugglingAttempt.twin`) as an attempt of its own in the same campaign (its own nonce, window,
    retries and reruns alone; its bytes upstream carry its UUID, read back through the twin registry, so they
    are attributed to the twin), and the twin's verdict is folded into the marked one's
    (:func:`~pytest_sandbox.verdicts.smuggling.judge_with_twin`): only the marked test ids are returned.

    Each attempt carries a fresh nonce (:meth:`SmugglingAttempt.payload`, and in its follow-up
    request) and is registered as a window in the lab's ledgers. Sending, in three steps:

    1. one positive control per path (the shortest), one after another; the paths on which its
       forwarded request carries its nonce are the paths whose proxy passes the nonce field upstream;
    2. on those paths, every attempt whose bytes put the nonce into every request they can turn into
       (:func:`~pytest_sandbox.http.upstream.nonce_in_every_head`), ``concurrency`` at a time: whatever
       a proxy forwards of them carries its attempt's nonce, so overlapping windows mix no evidence;
    3. after the grace period, every batch attempt whose deadline ran out before the proxy's answers
       were complete without a leak, again with a fresh nonce and at most :data:`RETRY_CONCURRENCY` at a
       time (sixteen in flight share one machine: its deadline is measured again with fewer); its
       verdict is the retry's, unless what its batch run put upstream is a leak;
    4. the rest one after another on each path (the two paths side by side: their upstreams are
       disjoint, the lab origins and canaries for ``absolute``, the backend for ``tunnel``): attempts
       that smuggle a request behind a body (a proxy may forward it on a connection of its own without
       the nonce), and everything on a path whose proxy dropped the nonce. Bytes without a nonce are
       attributed by time and destination, and on one destination these windows do not overlap. One
       whose deadline ran out before its answers were complete is sent again at once, alone (as in 3).

    Only after the last attempt and
    the grace period (longer for a proxy whose bytes came after their attempt ended: twice the latest
    lateness, :func:`~pytest_sandbox.probes.campaign.round_wait`) is every byte the lab origins and
    ``backend`` received since the first one
    attributed (:func:`~pytest_sandbox.http.upstream.split_pieces`,
    :func:`~pytest_sandbox.http.upstream.attribute_pieces`): by nonce where its bytes carry one, else to
    every attempt that can have caused it (the same connection's, and every one whose window plus
    grace holds its arrival). So bytes a proxy forwards after it refused and closed count against
    the case that sent them, not the next one. Catch-all hits are attributed the same way
    (:func:`~pytest_sandbox.network.lab.attribution.attribute`). Every byte and hit attributed here is marked
    judged; the session-end audit reports any that arrive later. Evidence without a nonce blamed on
    more than one attempt is then settled by isolation (:func:`_isolate`): every suspect is rerun
    alone and keeps the blame only if its rerun reproduces it; one whose late leak can have landed in a
    later rerun's round is rerun alone again before anything is taken off it; if no rerun reproduces it
    unmistakably, every suspect keeps it and the verdict says so. Returns test id -> (judgement,
    what it saw, with the upstream bytes attributed to it).
    """
    if twins:
        given = {attempt.test_id for attempt in attempts}
        attempts = [*attempts, *(twin for attempt in attempts for twin in (attempt.twin(), attempt.bare_twin())
                                 if twin is not None and twin.test_id not in given)]
    tests = [attempt.test_id for attempt in attempts]
    if len(set(tests)) != len(tests):
        raise ValueError(f"attempts repeat: {sorted(t for t in set(tests) if tests.count(t) > 1)}")
    if not attempts:
        return {}
    prefix = f"smuggling{next(_campaign_ids)}/"
    backend_name = f"backend {backend.name}"
    start = {**received_counts(lab.origin_streams()), **received_counts(backend.received_streams())}
    hit_mark = lab.hit_mark()
    planned = [_plan(attempt, prefix, origin=origin, denied=denied, backend_name=backend_name) for attempt in attempts]
    known = {plan.nonce: plan.key for plan in planned}
    sent: list[_Sent] = []

    def by_key(key: str) -> _Sent:
        return next(item for item in sent if item.window.key == key)
    # One snapshot per poll period for all the attempts in flight (see _StreamView).
    views = {ABSOLUTE: _StreamView(lab.origin_streams), TUNNEL: _StreamView(backend.received_streams)}

    def send(plan: _Plan, alone: bool) -> None:
        begin = time.monotonic()
        seen = _attempt(plan, connect, lab, backend, ca_pem, origin=origin, timeout=timeout,
                        known=known, alone=alone, views=views)
        # list.append is atomic: worker threads share ``sent``.
        sent.append(_Sent(plan.attempt, AttemptWindow(plan.key, plan.nonce, plan.destinations, begin,
                                                      time.monotonic()), seen, plan.allowed))

    retries: list[_Plan] = []

    def replan(attempt: SmugglingAttempt) -> _Plan:
        return _plan(attempt, prefix, origin=origin, denied=denied, backend_name=backend_name)
    try:
        # One positive control per path first (the shortest): whether its forwarded request carries
        # its nonce shows that the proxy passes the nonce field upstream on that path (RFC 9110
        # §7.6); an interceptor that drops it leaves nothing to attribute concurrent bytes by.
        probes = _nonce_probes(planned)
        for plan in probes:
            send(plan, alone=True)
        carried = _nonce_carried(probes, start, [*lab.origin_streams(), *backend.received_streams()])
        chosen = {plan.key for plan in probes}
        together = [plan for plan in planned if concurrency > 1 and plan.key not in chosen
                    and plan.attributable and plan.attempt.path in carried]
        chosen |= {plan.key for plan in together}
        alone = [plan for plan in planned if plan.key not in chosen]
        if probes and (together or alone) and grace > 0:
            # Past the probes' grace period: bytes without a nonce of a later attempt are never
            # blamed on a control (whose verdict such bytes would break) as well.
            time.sleep(grace)
        if together:
            in_flight(together, lambda plan: send(plan, alone=False), concurrency, "smuggling")
            if alone and grace > 0:
                # Past the batch's grace period first: bytes without a nonce of an attempt sent alone
                # are then never blamed on the batch (whose windows all overlap) as well.
                time.sleep(grace)
        # Sixteen in flight share the machine: one whose deadline ran out before its answers were
        # complete (and that showed no leak) is measured again with fewer in flight, with a fresh nonce;
        # what its batch run put upstream is still judged (see below), so a leak can only be added. A
        # proxy that never answers some valid request costs one deadline per RETRY_CONCURRENCY of them.
        retries += [_retry_plan(plan, replan=replan) for plan in together if _needs_retry(plan, by_key(plan.key))]
        for again in retries:
            known[again.nonce] = again.key
        in_flight(retries, lambda plan: send(plan, alone=False), min(concurrency, RETRY_CONCURRENCY),
                   "smuggling-retry")
        # Sent alone: each path's attempts one after another, the two paths side by side (what an
        # absolute-form attempt can reach, the lab origins and canaries, is disjoint from what a tunnel
        # attempt can reach, the backend, and bytes without a nonce are attributed to the windows of
        # their destination first: network/lab/attribution.candidates_at).
        # Bare twins last: their bytes carry no nonce at all, their allowed requests included (the same `GET /`
        # as the next bare twin's), so only time can name them, and each waits out the grace period of whatever
        # went before it on its path; the campaign's own grace period follows the last.
        sequences = [sorted((plan for plan in alone if plan.attempt.path == path), key=lambda plan: plan.attempt.bare)
                     for path in PATHS]
        def one_after_another(sequence: list[_Plan]) -> None:
            for plan in sequence:
                if plan.attempt.bare and grace > 0:
                    time.sleep(grace)
                send(plan, alone=True)
                # One whose deadline ran out before its answers were complete (a loaded machine: a tunnel's
                # handshake, a late refusal) is measured again at once, still alone, as a batch attempt is.
                if _needs_retry(plan, by_key(plan.key)):
                    again = _retry_plan(plan, replan=replan)
                    known[again.nonce] = again.key
                    retries.append(again)
                    if plan.attempt.bare and grace > 0:  # as above: the first send's bytes are named by time
                        time.sleep(grace)
                    send(again, alone=True)
        in_flight(sequences, one_after_another, 2 if concurrency > 1 else 1, "smuggling-path")
    finally:
        # Registered even if an attempt raised: what it sent must stay attributable.
        lab.register_attempts(item.window for item in sent)
        lab.upstream_ledger.register(item.window for item in sent)
    order = {plan.key: index for index, plan in enumerate(planned)}
    sent.sort(key=lambda item: (order[_original(item.window.key)], item.window.key))
    ledger = lab.upstream_ledger
    ends = {item.window.key: item.window.end for item in sent}
    if grace > 0:
        last = max(ends.values())
        sleep_out_grace(last, grace)
        # A proxy whose leaks come late (a loaded machine, a proxy that forwards after refusing) gets the wait
        # an isolation round would give it, twice the latest lateness seen (bounded): the last attempts' late
        # bytes are then judged with them, not left to the session-end audit. One that never leaks pays nothing.
        seen = attribute_since(ledger, (*lab.origin_streams(), *backend.received_streams()), start, grace)
        time.sleep(max(0.0, last + round_wait(grace, _latest_after(seen, ends)) - time.monotonic()))
    known = {window.nonce: window.key for window in ledger.windows}
    attributed = attribute_since(ledger, (*lab.origin_streams(), *backend.received_streams()), start, grace)
    ours = {item.window.key for item in sent}
    hits = lab.hits(since=hit_mark)
    attribution = attribute(hits, lab.attempt_windows(), grace)
    hit_owners = dict(attribution.owners)
    blind = _blind_evidence(attributed, hits, hit_owners, attribution.exact, ours)
    isolation = _Isolation()
    if blind and grace > 0:
        suspects = {plan.key: plan for plan in [*planned, *retries] if plan.key in ours}
        # Blame can only turn a pass into a failure: the attempts that fail without the blind evidence
        # gain nothing from being cleared, so the reruns go to the others (see _isolate).
        unseen = {item.evidence for item in blind}
        without = _judge_sent(sent, [(piece, frozenset() if ("piece", index) in unseen else keys)
                                     for index, (piece, keys) in enumerate(attributed)],
                              hits, {index: frozenset() if ("hit", index) in unseen else keys
                                     for index, keys in hit_owners.items()},
                              _Isolation(), backend_name=backend_name)
        passing = {test_id for test_id, (judgement, _seen) in without.items() if judgement.passed}
        isolation = _isolate(blind, suspects, send_alone=lambda plan:
                             _attempt(plan, connect, lab, backend, ca_pem, origin=origin, timeout=timeout,
                                      known=known, alone=True, views=views),
                             replan=replan,
                             lab=lab, backend=backend, known=known, grace=grace, budget=isolation_budget,
                             needed=frozenset(key for key, plan in suspects.items()
                                              if plan.attempt.test_id in passing),
                             slowest=_latest_after(attributed, ends))
        attributed = [(piece, isolation.owners.get(("piece", index), keys))
                      for index, (piece, keys) in enumerate(attributed)]
        hit_owners.update({index: keys for (kind, index), keys in isolation.owners.items() if kind == "hit"})
    for piece, keys in attributed:
        if keys & ours:
            ledger.account(piece, keys)
    judged = _judge_sent(sent, attributed, hits, hit_owners, isolation, backend_name=backend_name, lab=lab)
    return _fold_twins(judged) if twins else judged


def _fold_twins(judged: Mapping[str, tuple[Judgement, Exchange]]) -> dict[str, tuple[Judgement, Exchange]]:
    """``judged`` with each unmarked twin's verdict folded into its marked attempt's
    (:func:`~pytest_sandbox.verdicts.smuggling.judge_with_twin`), then each bare twin's
    (:func:`~pytest_sandbox.verdicts.smuggling.judge_with_bare_twin`); a twin whose marked attempt is not there
    keeps its own entry. Pure."""
    folded: dict[str, tuple[Judgement, Exchange]] = {}
    for test_id, (judgement, seen) in judged.items():
        if any(test_id.endswith(suffix) and test_id.removesuffix(suffix) in judged
               for suffix in (UNMARKED_SUFFIX, BARE_SUFFIX)):
            continue  # folded into its marked attempt's
        twin, bare = judged.get(test_id + UNMARKED_SUFFIX), judged.get(test_id + BARE_SUFFIX)
        if twin is not None:
            judgement = judge_with_twin(judgement, twin[0])
        if bare is not None:
            judgement = judge_with_bare_twin(judgement, bare[0])
        folded[test_id] = (judgement, seen)
    return folded


def _latest_after(attributed: Sequence[tuple[UpstreamPiece, frozenset[str]]], ends: Mapping[str, float]) -> float:
    """How long after its attempt (the latest-ending one it is attributed to) ended the latest piece arrived;
    0 if none came after. Pure."""
    return max((piece.at - max(ends[key] for key in keys if key in ends)
                for piece, keys in attributed if keys & ends.keys()), default=0.0)


def _judge_sent(sent: Sequence[_Sent], attributed: Sequence[tuple[UpstreamPiece, frozenset[str]]],
                hits: Sequence[CatchAllHit], hit_owners: Mapping[int, frozenset[str]], isolation: _Isolation, *,
                backend_name: str, lab: NetworkLab | None = None) -> dict[str, tuple[Judgement, Exchange]]:
    """Test id -> (judgement, what it saw with the upstream bytes and hits attributed to it). A batch
    attempt sent again (``<key>#retry``) is judged on the retry's answers, unless its batch run's upstream
    evidence is a leak. With ``lab``, every hit is accounted to the attempts it is blamed on."""

    def name(key: str) -> str:
        return key.partition("/")[2] or key

    pieces_of: dict[str, list[int]] = {}  # one pass over the evidence, not one per attempt
    for index, (_piece, keys) in enumerate(attributed):
        for key in keys:
            pieces_of.setdefault(key, []).append(index)
    hits_of: dict[str, list[CatchAllHit]] = {}
    for hit in hits:
        for key in hit_owners.get(hit.index, frozenset()):
            hits_of.setdefault(key, []).append(hit)
    judged: dict[str, tuple[Judgement, Exchange]] = {}
    for item in sent:
        key = item.window.key
        mine = [(index, *attributed[index]) for index in pieces_of.get(key, [])]
        at_backend = [(piece, keys) for _index, piece, keys in mine if piece.listener == backend_name]
        at_origins = [(piece, keys) for _index, piece, keys in mine if piece.listener != backend_name]
        upstream, elsewhere = (at_backend, at_origins) if item.attempt.path == TUNNEL else (at_origins, at_backend)
        # "arrived ... after the attempt ended": after its exchange with the proxy ended.
        ended = item.window.end if item.seen.ended is None else min(item.seen.ended, item.window.end)
        blamed = hits_of.get(key, [])
        if lab is not None:
            lab.account([hit.index for hit in blamed], by=key)
        reached = [f"canary {describe_hit(hit)}{isolation.note(('hit', hit.index), key)}" for hit in blamed]
        other = "a lab origin (the tunnel must only reach the backend)" if item.attempt.path == TUNNEL \
            else "the inference backend"
        notes = {piece.where: note for index, piece, _keys in mine if (note := isolation.note(("piece", index), key))}
        reached += [f"{other}, {segment.where}: {shown(segment.data)}"
                    for segment in _noted(segments_of(elsewhere, key, name, ended=ended), notes)]
        seen = replace(item.seen, upstream=_noted(segments_of(upstream, key, name, ended=ended), notes),
                       stray=", ".join(reached))
        judged[key] = (judge_exchange(item.attempt.case, seen, item.allowed), seen)
    results: dict[str, tuple[Judgement, Exchange]] = {}
    for item in sent:
        key = item.window.key
        if key.endswith(RETRY_SUFFIX):
            continue
        retry = judged.get(key + RETRY_SUFFIX)
        if retry is None:
            results[item.attempt.test_id] = judged[key]
            continue
        # The batch run's upstream evidence judged with the retry's answers: a leak there stands.
        first = replace(retry[1], upstream=judged[key][1].upstream, stray=judged[key][1].stray)
        verdict = judge_exchange(item.attempt.case, first, item.allowed)
        results[item.attempt.test_id] = (verdict, first) if verdict.verdict is Verdict.ALLOWED else retry
    return results


class _StreamView:
    """The upstream streams as the attempts in flight poll them: one snapshot shared by every attempt,
    taken at most once per :data:`LEAK_POLL_SECONDS`.

    A snapshot runs on the lab's loop thread (or under the backend's lock) and copies every
    connection's bytes; that loop also serves the origins the proxy forwards to. Sixteen attempts each
    polling on their own starved it under load (a control then missed its deadline because the
    origin answered late, not because the proxy did): the polling now costs the same whether one
    attempt or sixteen wait."""

    def __init__(self, fetch: Callable[[], list[ReceivedStream]], max_age: float = LEAK_POLL_SECONDS) -> None:
        self._fetch, self._max_age = fetch, max_age
        self._lock = threading.Lock()
        self._taken = -math.inf
        self._streams: list[ReceivedStream] = []

    def streams(self) -> list[ReceivedStream]:
        with self._lock:
            if time.monotonic() - self._taken >= self._max_age:
                self._streams, self._taken = self._fetch(), time.monotonic()
            return self._streams


@dataclass(frozen=True)
class _Plan:
    """One attempt ready to send: its nonce, its bytes, what may reach upstream, where a careless proxy
    could dial for it, and whether every request its bytes can turn into carries the nonce."""

    attempt: SmugglingAttempt
    key: str
    nonce: str
    payload: bytes
    allowed: tuple[UpstreamRequest, ...]
    destinations: frozenset[str]
    attributable: bool

    @property
    def token(self) -> str:
        """The nonce as this plan's bytes spell it: itself, or an unmarked twin's UUID (registered in
        :func:`~pytest_sandbox.network.lab.attribution.twin_nonce`, so attribution reads it back to ``nonce``)."""
        return self.nonce if self.attempt.marked else twin_nonce(self.nonce)


def _plan(attempt: SmugglingAttempt, prefix: str, *, origin: str, denied: str, backend_name: str) -> _Plan:
    nonce = new_nonce()
    payload = attempt.payload(origin=origin, denied=denied, nonce=nonce)
    destinations = frozenset({backend_name}) if attempt.path == TUNNEL else frozenset(
        {origin} | ({denied} if denied.encode() in payload else set()))
    return _Plan(attempt, prefix + attempt.test_id, nonce, payload,
                 allowed_prefix(payload, attempt.case.reaches_backend), destinations,
                 nonce_in_every_head(payload, nonce if attempt.marked else twin_nonce(nonce)))


def _original(key: str) -> str:
    return key.removesuffix(RETRY_SUFFIX)


def _retry_plan(plan: _Plan, *, replan: Callable[[SmugglingAttempt], _Plan]) -> _Plan:
    """``plan`` again, with a fresh nonce, under the key ``<key>#retry``."""
    return replace(replan(plan.attempt), key=plan.key + RETRY_SUFFIX)


def _needs_retry(plan: _Plan, item: _Sent) -> bool:
    """Whether a batch attempt's deadline ran out before the proxy's answers (for a keep-alive control, its
    follow-up's too) were complete while it
    saw no leak (neither bytes beyond ``allowed`` carrying its nonce nor a relayed answer). Pure."""
    seen, case = item.seen, plan.attempt.case
    if case.is_positive_control and seen.timed_out and seen.follow_up is None and not case.must_close:
        return True  # its follow-up's answer was late
    if not _deadline_bound(case, seen.timed_out, len(seen.statuses)):
        return False
    reading = read_upstream(seen.upstream)
    relayed = any(seen.is_marked(index) for index in range(case.reaches_backend, len(seen.statuses)))
    return case.is_positive_control or not (relayed or assess(reading.requests, reading.leftovers,
                                                              plan.allowed).leak)


def _nonce_probes(planned: Sequence[_Plan]) -> list[_Plan]:
    """Per path, the shortest plain positive control (``GET {get} HTTP/1.1``, ASCII, only GETs without a
    body reach upstream, so any working proxy forwards it at once) whose requests carry the nonce; none on
    a path without one (everything there is then sent alone). Pure."""
    probes = []
    for path in PATHS:
        fit = [plan for plan in planned if plan.attempt.path == path and plan.attempt.case.is_positive_control
               and plan.allowed and plan.attributable and plan.payload.isascii()
               # the plainest request line: HTTP/1.0 closes, and a query a cautious proxy may refuse
               and plan.attempt.case.payload.startswith(b"GET {get} HTTP/1.1\r\n")
               and all(request.method == "GET" and not request.body for request in plan.allowed)]
        if fit:
            probes.append(min(fit, key=lambda plan: len(plan.payload)))
    return probes


def _nonce_carried(controls: Sequence[_Plan], start: Mapping[tuple[str, int], int],
                   streams: Sequence[ReceivedStream]) -> frozenset[str]:
    """The paths on which every control whose requests reached upstream arrived with its nonce (and
    at least one did). Pure."""
    arrived = b"".join(stream.data[start.get(stream.key, 0):] for stream in streams)
    reached = [plan for plan in controls if plan.allowed]
    return frozenset(path for path in PATHS
                     if (mine := [plan for plan in reached if plan.attempt.path == path])
                     and all(plan.nonce.encode() in arrived for plan in mine))


def _attempt(plan: _Plan, connect: Callable[[], socket.socket], lab: NetworkLab, backend: FakeInferenceBackend,
             ca_pem: bytes, *, origin: str, timeout: float, known: Mapping[str, str], alone: bool,
             views: Mapping[str, _StreamView]) -> Exchange:
    """One attempt's exchange with the proxy. While it runs, the bytes upstream since it began are
    watched (to stop waiting as soon as it has leaked); the campaign attributes them afterwards.

    What is watched: the pieces carrying this attempt's nonce and, when it is sent ``alone``, those
    carrying none; never another attempt's (``known``: every nonce of the campaign)."""
    attempt = plan.attempt
    before = received_counts(backend.received_streams() if attempt.path == TUNNEL else lab.origin_streams())
    view = views[attempt.path]

    token = plan.token.encode("ascii")

    def upstream() -> tuple[UpstreamSegment, ...]:
        streams = view.streams()
        # Sent together with others, only pieces carrying its nonce count: skip streams without it.
        fresh = [stream for stream in streams if stream.received > before.get(stream.key, 0)
                 and (alone or token in stream.data[before.get(stream.key, 0):])]
        pieces = [piece for stream in fresh
                  for piece in split_pieces(stream, before.get(stream.key, 0), stream.received, known)]
        return tuple(UpstreamSegment(piece.where, piece.data, piece.truncated) for piece in pieces
                     if plan.nonce in piece.nonces or (alone and not piece.nonces))

    mark = backend.mark if attempt.path == TUNNEL else lab.origin_mark
    with connect() as sock:
        if attempt.path == ABSOLUTE:
            return exchange(sock, plan.payload, attempt.case, attempt.follow_up(origin, plan.nonce, plan.payload),
                            upstream, plan.allowed, mark=mark, timeout=timeout)
        try:
            tls = open_inference_tunnel(sock, ca_pem, timeout=timeout)
        except OSError as error:  # ConnectionError, ssl.SSLError, a timeout: no tunnel, no answer
            # A deadline that ran out (sixteen handshakes in flight on a loaded machine) is a late answer, not
            # a refusal: a batch attempt is then measured again (_needs_retry).
            late = isinstance(error, TimeoutError)
            return Exchange((), not late, late, None, error=f"the tunnel could not be opened: {error}")
        with tls:
            return exchange(tls, plan.payload, attempt.case, attempt.follow_up(origin, plan.nonce, plan.payload),
                            upstream, plan.allowed, mark=mark, timeout=timeout)


def _fill_answers(reader: SocketReader, wanted: int, timeout: float) -> None:
    """Read until ``wanted`` answers arrived: the deadline counts ``timeout`` from the last sign of
    progress (the send, then each complete answer), at most ``wanted`` times.

    A proxy answers pipelined requests in order (RFC 9112 §9.3.2), and one that opens a connection of
    its own per forwarded request (the reference interceptor does, over TLS) starts on the n-th only
    after the (n-1)-th: under load, a single deadline for all of them turned a control served slowly
    into "not served". Waiting longer can only show more of what the proxy does; it never hides
    bytes that reached upstream (those are judged from the upstream record)."""
    for _ in range(max(1, wanted)):
        answered = len(reader.responses())
        reader.fill(functools.partial(_more_than, reader, min(answered, wanted - 1)))
        now = len(reader.responses())
        if now >= wanted or reader.eof or reader.error or now == answered:
            return
        reader.deadline, reader.timed_out = time.monotonic() + timeout, False


def _fill_until_close(reader: SocketReader, relayed: Callable[[], bool], leaked: Callable[[], bool], wanted: int,
                      timeout: float) -> None:
    """Read a connection that must close until EOF, a relayed answer, a leak (``leaked``, asked every
    :data:`LEAK_POLL_SECONDS` while the proxy is silent) or the deadline; each new answer, up to ``wanted``,
    moves the deadline to ``timeout`` after it. On a loaded machine a refusal can come just before the
    deadline and its close just after: the close is waited for from the refusal, not from the send. A proxy
    that answers at once and never closes costs no more than before."""
    for _ in range(max(1, wanted)):
        answered = len(reader.responses())
        reader.fill(functools.partial(_relayed_or_more, relayed, reader, answered), poll=LEAK_POLL_SECONDS,
                    idle=leaked)
        if relayed() or reader.eof or reader.error or reader.timed_out or len(reader.responses()) == answered:
            return
        reader.deadline = max(reader.deadline, time.monotonic() + timeout)
    reader.fill(relayed, poll=LEAK_POLL_SECONDS, idle=leaked)


def _deadline_bound(case: SmugglingCase, timed_out: bool, answers: int) -> bool:
    """Whether the deadline ran out before the proxy's answers were complete (every allowed request's,
    and for a denied case the refusal). Pure."""
    return timed_out and answers < case.reaches_backend + (0 if case.is_positive_control else 1)


def _more_than(reader: SocketReader, count: int) -> bool:
    return len(reader.responses()) > count


def _relayed_or_more(relayed: Callable[[], bool], reader: SocketReader, count: int) -> bool:
    return relayed() or _more_than(reader, count)


def _follow_up(reader: SocketReader, request: bytes, answered: int, timeout: float) -> int | None:
    """The status a further request on a still-open connection gets, or None.

    The same reader (and buffer) goes on: bytes of a late answer to the payload must not be lost.
    """
    reader.deadline = time.monotonic() + timeout
    reader.timed_out = False
    try:
        reader.sock.sendall(request)
    except (OSError, ssl.SSLError):
        return None
    reader.fill(lambda: len(reader.responses()) > answered)
    responses = reader.responses()
    return responses[-1].status if len(responses) > answered else None


# --------------------------------------------------------------------------------------------------
# Isolation: evidence without a nonce blamed on several attempts, settled by rerunning each alone
# --------------------------------------------------------------------------------------------------

EvidenceId = tuple[str, int]  # ("piece", index in the attributed pieces) or ("hit", catch-all hit index)


@dataclass(frozen=True)
class _Blind:
    """Evidence without a nonce blamed on more than one of the campaign's attempts: where it arrived
    (a listener or a canary address), its first line, its suspects (the campaign's own owners) and
    when it arrived."""

    evidence: EvidenceId
    address: str
    line: bytes
    suspects: frozenset[str]
    at: float = 0.0


@dataclass(frozen=True)
class Sighting:
    """Evidence without a nonce an isolation round caused: where it arrived (``address`` as in
    :class:`_Blind`, ``destination`` as in a plan's destinations), its first line, when, and the reruns
    of that round it was attributed to (their original keys)."""

    address: str
    destination: str
    line: bytes
    at: float
    owners: frozenset[str]


def _first_line(data: bytes) -> bytes:
    """What must recur for a rerun to reproduce a leak: the request line (RFC 9112 §3) the proxy
    wrote, which carries no nonce and nothing that changes between runs. Pure."""
    return data.split(b"\n", 1)[0].rstrip(b"\r")


def _blind_evidence(attributed: Sequence[tuple[UpstreamPiece, frozenset[str]]], hits: Sequence[CatchAllHit],
                    hit_owners: Mapping[int, frozenset[str]], exact: frozenset[int],
                    ours: set[str]) -> list[_Blind]:
    """The pieces and catch-all hits without a nonce that more than one of ``ours`` is blamed for. Pure."""
    blind = [_Blind(("piece", index), piece.listener, _first_line(piece.data), keys & ours, piece.at)
             for index, (piece, keys) in enumerate(attributed) if not piece.nonces and len(keys & ours) > 1]
    blind += [_Blind(("hit", hit.index), hit.address, _first_line(hit.received),
                     hit_owners.get(hit.index, frozenset()) & ours, hit.at)
              for hit in hits if hit.index not in exact and len(hit_owners.get(hit.index, frozenset()) & ours) > 1]
    return blind


@dataclass
class _Isolation:
    """What the isolation reruns settled: narrowed owners per evidence, and the notes verdicts show."""

    owners: dict[EvidenceId, frozenset[str]] = field(default_factory=dict)
    reproduced: set[EvidenceId] = field(default_factory=set)  # narrowed to the suspects whose rerun did it
    # -> the suspects whose rerun alone reproduced it with no other rerun able to have caused what it saw
    confirmed: dict[EvidenceId, frozenset[str]] = field(default_factory=dict)
    unreproduced: dict[EvidenceId, int] = field(default_factory=dict)  # -> how many suspects keep it
    not_rerun: dict[EvidenceId, int] = field(default_factory=dict)  # beyond the rerun budget -> suspects
    moot: dict[EvidenceId, int] = field(default_factory=dict)  # every suspect fails anyway -> suspects
    rerun: set[str] = field(default_factory=set)  # the suspects that were rerun alone

    def note(self, evidence: EvidenceId, key: str) -> str:
        if evidence in self.reproduced:
            if key in self.confirmed.get(evidence, frozenset()):
                return " (no nonce; reproduced when this attempt was rerun alone)"
            if key in self.rerun:
                return (" (no nonce; reproduced by another attempt rerun alone, but what this attempt's "
                        f"{1 + CONFIRMATION_RERUNS} reruns alone caused cannot be told apart from it (a late leak "
                        "lands in the next rerun's round), so it stays blamed together with it)")
            return (" (no nonce; reproduced by another attempt rerun alone; this one was not rerun: it fails on "
                    "its own evidence, so it stays blamed)")
        if evidence in self.moot:
            return (f" (no nonce; all {self.moot[evidence]} attempts that can have caused it fail on their own "
                    "evidence, so none was rerun alone and it stays blamed on all of them)")
        if evidence in self.not_rerun:
            return (f" (no nonce; its {self.not_rerun[evidence]} possible causes are beyond the campaign's budget "
                    "of reruns alone, so it stays blamed on all of them)")
        if evidence in self.unreproduced:
            return (f" (no nonce; no rerun alone reproduced it, so it stays blamed on all "
                    f"{self.unreproduced[evidence]} attempts that can have caused it)")
        return ""


def _matches(item: _Blind, sighting: Sighting) -> bool:
    """Whether a rerun's sighting reproduces ``item``: the same address and the same first line (one
    without bytes, a byte-less dial, matches any). Pure."""
    return sighting.address == item.address and (sighting.line == item.line or not sighting.line or not item.line)


def possible_causes(sighting: Sighting, ends: Mapping[str, Sequence[float]],
                    destinations: Mapping[str, frozenset[str]], spill: float) -> frozenset[str]:
    """Every rerun alone that can have caused ``sighting``: those of its own round, and every earlier one on
    its destination that ended at most ``spill`` before it arrived. On a loaded machine a rerun's leak can
    come after its own round was read; it then lands in a later round and would be credited to that
    round's rerun, clearing the real cause (the SSRF campaign's false pass, probes/campaign.py). Pure."""
    late = {key for key, times in ends.items() if sighting.destination in destinations.get(key, frozenset())
            and any(end < sighting.at <= end + spill for end in times)}
    return sighting.owners | late


def reproduced_by(blind: Sequence[_Blind], found: Sequence[Sighting], ends: Mapping[str, Sequence[float]],
                  destinations: Mapping[str, frozenset[str]], spill: float
                  ) -> tuple[dict[EvidenceId, frozenset[str]], dict[EvidenceId, frozenset[str]], set[EvidenceId],
                             frozenset[str]]:
    """Which suspects each blind piece of evidence stays blamed on after the reruns alone. Pure.

    ``found``: what every rerun round caused without a nonce; ``ends``: per rerun attempt, when each of its
    reruns alone ended (how many times it was rerun). A sighting that matches the evidence reproduces it
    *unmistakably* when only one rerun can have caused it (:func:`possible_causes`). Evidence some suspect
    reproduced unmistakably is narrowed to those suspects, to the suspects never rerun, and to every suspect
    that is still *unsure*: a rerun that can have caused a matching sighting but did not unmistakably,
    rerun alone at most :data:`~pytest_sandbox.probes.campaign.CONFIRMATION_RERUNS` times (it is rerun again
    before anything is taken off it). Evidence no suspect reproduced unmistakably keeps every suspect
    (sound over precise: a target that leaks only sometimes, or whose leaks cannot be told apart, still
    fails, "together with" the others). Returns (narrowed owners, the unmistakable reproducers, the evidence
    not reproduced, the unsure reruns to confirm).
    """
    narrowed: dict[EvidenceId, frozenset[str]] = {}
    confirmed: dict[EvidenceId, frozenset[str]] = {}
    missing: set[EvidenceId] = set()
    unsure: set[str] = set()
    for item in blind:
        causes = [possible_causes(sighting, ends, destinations, spill) for sighting in found
                  if _matches(item, sighting)]
        clean = frozenset(key for keys in causes if len(keys) == 1 for key in keys)
        doubtful = frozenset(key for keys in causes if len(keys) > 1 for key in keys) - clean
        pending = frozenset(key for key in doubtful if len(ends.get(key, ())) <= CONFIRMATION_RERUNS)
        unsure |= pending
        if clean & item.suspects:
            confirmed[item.evidence] = clean & item.suspects
            narrowed[item.evidence] = (clean | pending | (item.suspects - ends.keys())) & item.suspects
        else:
            missing.add(item.evidence)
    return narrowed, confirmed, missing, frozenset(unsure)


def _sighted(item: _Blind, found: Sequence[Sighting]) -> bool:
    """Whether any rerun of a suspect of ``item`` caused a sighting matching it. Pure."""
    return any(_matches(item, sighting) and sighting.owners & item.suspects for sighting in found)


def likely_causes_first(item: _Blind, keys: Iterable[str], payloads: Mapping[str, bytes]) -> list[str]:
    """``keys`` ordered by how likely their bytes are to have caused ``item``: first the attempts whose
    payload holds the request line the proxy wrote, then those holding its request-target (RFC 9112
    §3.2; a proxy rewrites an absolute-form target to origin-form), then the rest. Only an order:
    what decides is a rerun reproducing it. Pure."""
    parts = item.line.split(b" ")
    target = parts[1] if len(parts) == 3 and parts[1] else None

    def rank(key: str) -> tuple[int, str]:
        payload = payloads.get(key, b"")
        if item.line and item.line in payload:
            return 0, key
        return (1 if target is not None and target in payload else 2), key
    return sorted(keys, key=rank)


def first_reruns(blind: Sequence[_Blind], needed: frozenset[str], known: frozenset[str], budget: int
                 ) -> tuple[list[_Blind], list[str], list[_Blind], list[_Blind]]:
    """Step 1 of :func:`_isolate`. Pure. Returns (the evidence whose ``needed`` suspects fit the ``budget``,
    fewest first; those suspects, each once, in the order to rerun; the evidence beyond the budget; the
    evidence with no needed suspect, which no rerun can change a verdict for)."""
    relevant = [item for item in blind if item.suspects & needed]
    settled: list[_Blind] = []
    first: list[str] = []
    for item in sorted(relevant, key=lambda item: len(item.suspects & needed)):
        mine = [key for key in sorted(item.suspects & needed) if key in known and key not in first]
        if len(first) + len(mine) <= budget:
            settled.append(item)
            first += mine
    beyond = [item for item in relevant if item not in settled]
    return settled, first, beyond, [item for item in blind if not item.suspects & needed]


def next_causes(open_items: Sequence[_Blind], rerun: set[str], payloads: Mapping[str, bytes]) -> list[str]:
    """Step 2 of :func:`_isolate`: for each piece of evidence no rerun reproduced yet, its most likely cause
    not rerun so far (:func:`likely_causes_first`), each key once. Pure."""
    picks: list[str] = []
    for item in open_items:
        untried = [key for key in item.suspects - rerun - set(picks) if key in payloads]
        if untried:
            picks.append(likely_causes_first(item, untried, payloads)[0])
    return picks


def _isolate(blind: Sequence[_Blind], plans: Mapping[str, _Plan], *, replan: Callable[[SmugglingAttempt], _Plan],
             send_alone: Callable[[_Plan], Exchange], lab: NetworkLab, backend: FakeInferenceBackend,
             known: dict[str, str], grace: float, budget: int = 0,
             needed: frozenset[str] | None = None, slowest: float = 0.0) -> _Isolation:
    """Rerun suspects of ``blind`` alone (fresh nonce; suspects with disjoint destinations share a round,
    :func:`~pytest_sandbox.probes.campaign.isolation_rounds`), record the evidence without a nonce each round
    caused, and narrow the blame (:func:`reproduced_by`).

    Only a suspect in ``needed`` (default: all) can change its verdict by being cleared: the others fail on
    their own evidence already, and blame never turns a failure into a pass. So, at most ``budget`` attempts
    are rerun:

    1. every needed suspect of each piece of evidence (fewest first; evidence whose needed suspects do not
       fit stays blamed on all of them); evidence with no needed suspect is left blamed on all (moot);
    2. evidence none of those reruns reproduced still needs a cause before its needed suspects can be
       cleared (:func:`reproduced_by`: a rerun must reproduce it): its other suspects are rerun, the most
       likely first (:func:`likely_causes_first`), one per round, until one reproduces it;
    3. confirmation (as the SSRF campaign's, probes/campaign.py): every rerun that can have caused a sighting
       it did not unmistakably cause (its late leak may have landed in a later round) is rerun alone again,
       up to :data:`~pytest_sandbox.probes.campaign.CONFIRMATION_RERUNS` more times, in rounds that start only
       once every earlier rerun's leaks have had their longest wait to arrive and that wait as long
       themselves (:data:`~pytest_sandbox.probes.campaign.ROUND_WAIT_LIMIT_GRACES` grace periods).

    Rounds of steps 1 and 2 wait twice the latest lateness seen so far (``slowest``: the campaign's, then
    the reruns'; :func:`~pytest_sandbox.probes.campaign.round_wait`). Everything the reruns put upstream or at a
    canary is accounted to the rerun (the session-end audit does not report it again); its verdict is the
    original attempt's."""
    # Each rerun alone costs a round (against squid, 33 pieces without a nonce had over 150 suspects:
    # 104 s of reruns with every suspect rerun).
    wanted = needed if needed is not None else frozenset(key for item in blind for key in item.suspects)
    settled, first, beyond, moot = first_reruns(blind, wanted, frozenset(plans), budget)
    found: list[Sighting] = []
    ends: dict[str, list[float]] = {}
    destinations = {key: plan.destinations for key, plan in plans.items()}
    spill = ROUND_WAIT_LIMIT_GRACES * grace
    rounds = 0

    def run(keys: list[str], wait: float | None = None) -> None:
        nonlocal rounds, slowest
        for members in isolation_rounds(keys, {key: destinations[key] for key in keys}):
            rounds += 1
            late = _rerun_round(members, rounds, plans, replan=replan, send_alone=send_alone, lab=lab,
                                backend=backend, known=known, wait=round_wait(grace, slowest) if wait is None else wait,
                                found=found, ends=ends)
            slowest = max(slowest, late)

    run(first)
    payloads = {key: plan.payload for key, plan in plans.items()}
    open_items = [item for item in settled if not _sighted(item, found)]
    while open_items and len(ends) < budget:
        picks = next_causes(open_items, set(ends), payloads)
        if not picks:
            break
        run(picks[:budget - len(ends)])
        open_items = [item for item in open_items if not _sighted(item, found)]
    for _ in range(CONFIRMATION_RERUNS):
        again = sorted(key for key in reproduced_by(settled, found, ends, destinations, spill)[3] if key in plans)
        if not again:
            break
        # Past every earlier rerun's longest wait first: none of their leaks can land in these rounds.
        time.sleep(max(0.0, max(end for times in ends.values() for end in times) + spill - time.monotonic()))
        run(again, wait=spill)
    narrowed, confirmed, missing, _unsure = reproduced_by(settled, found, ends, destinations, spill)
    by_id = {item.evidence: item for item in settled}
    return _Isolation(owners=dict(narrowed), reproduced=set(narrowed), confirmed=confirmed,
                      unreproduced={evidence: len(by_id[evidence].suspects) for evidence in missing},
                      not_rerun={item.evidence: len(item.suspects) for item in beyond},
                      moot={item.evidence: len(item.suspects) for item in moot}, rerun=set(ends))


def _rerun_round(members: Sequence[str], number: int, plans: Mapping[str, _Plan], *,
                 replan: Callable[[SmugglingAttempt], _Plan], send_alone: Callable[[_Plan], Exchange],
                 lab: NetworkLab, backend: FakeInferenceBackend, known: dict[str, str], wait: float,
                 found: list[Sighting], ends: dict[str, list[float]]) -> float:
    """Rerun ``members`` (disjoint destinations) alone one after another, wait ``wait`` after the last one
    ended, record when each ended in ``ends`` and add to ``found`` every piece of evidence without a nonce
    that arrived since the round began. Returns the latest such evidence came after the rerun it is
    attributed to ended (0 if none came after)."""
    start = {**received_counts(lab.origin_streams()), **received_counts(backend.received_streams())}
    mark = lab.hit_mark()
    ledger = lab.upstream_ledger
    windows: list[AttemptWindow] = []
    try:
        for key in members:
            plan = replace(replan(plans[key].attempt), key=f"{key}#alone{number}")
            known[plan.nonce] = plan.key
            begin = time.monotonic()
            try:
                send_alone(plan)
            finally:
                windows.append(AttemptWindow(plan.key, plan.nonce, plan.destinations, begin, time.monotonic()))
    finally:
        lab.register_attempts(windows)
        ledger.register(windows)
    time.sleep(max(0.0, max(window.end for window in windows) + wait - time.monotonic()))
    original = {window.key: window.key.rpartition("#alone")[0] for window in windows}
    ended = {window.key: window.end for window in windows}
    for window in windows:
        ends.setdefault(original[window.key], []).append(window.end)
    latest = 0.0
    pieces = [piece for stream in (*lab.origin_streams(), *backend.received_streams())
              for piece in split_pieces(stream, start.get(stream.key, 0), stream.received, known)]
    for piece, keys in zip(pieces, attribute_pieces(pieces, windows, wait), strict=True):
        if keys:
            ledger.account(piece, keys)
        if not piece.nonces:
            found.append(Sighting(piece.listener, stream_address(piece.listener), _first_line(piece.data), piece.at,
                                  frozenset(original[key] for key in keys)))
            latest = max([latest, *(piece.at - ended[key] for key in keys)])
    round_hits = lab.hits(since=mark)
    local = attribute(round_hits, windows, wait)
    for hit in round_hits:
        keys = local.owners.get(hit.index, frozenset())
        if keys:
            lab.account([hit.index], by=sorted(keys)[0])
        if hit.index not in local.exact:
            found.append(Sighting(hit.address, hit.address, _first_line(hit.received), hit.at,
                                  frozenset(original[key] for key in keys)))
            latest = max([latest, *(hit.at - ended[key] for key in keys)])
    return latest


def _noted(segments: tuple[UpstreamSegment, ...], notes: Mapping[str, str]) -> tuple[UpstreamSegment, ...]:
    """``segments`` with the isolation note of their connection (keyed by ``where``) appended."""
    return tuple(replace(segment, where=segment.where + next(
        (note for where, note in notes.items() if segment.where == where or segment.where.startswith(where + " ")),
        ""))
        for segment in segments)
