"""The inference category's exchanges as one campaign, judged on everything they caused upstream, late included.

Each exchange (one test's traffic through the intercepted ``inference.local`` tunnel) sends every request
with its own nonce (:data:`~pytest_sandbox.network.lab.attribution.NONCE_HEADER`, an end-to-end field the
interceptor forwards with a routed request). The exchanges run one after another; after the last one the
grace period passes, and only then is every byte the fake backend received since the campaign began
attributed (:func:`~pytest_sandbox.http.upstream.attribute_pieces`: by nonce, by the connection that already
carried an exchange's bytes, else to every exchange whose window plus the grace period holds it) and framed
into requests, and every catch-all hit attributed (:func:`~pytest_sandbox.network.lab.attribution.attribute`).
So an interceptor that answers #819's 403 and forwards the refused request to the backend 200 ms later fails
the exchange that sent it, not whichever test runs next; one that forwards later than the campaign is left
to the session-end audit (:func:`~pytest_sandbox.probes.campaign.audit_upstream`), which sees every window
registered here and every byte not accounted for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_sandbox.http.fields import HeaderLookup
from pytest_sandbox.http.incremental import decode_headers
from pytest_sandbox.http.upstream import UpstreamPiece, attribute_since, read_upstream, segments_of
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.network.lab.attribution import AttemptWindow, CatchAllHit, attribute, new_nonce
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.probes.campaign import GRACE_SECONDS, sleep_out_grace

__all__ = ["BackendArrival", "ExchangeEvidence", "InferenceExchange", "run_inference_campaign"]

CATEGORY = "inference"


@dataclass(frozen=True)
class InferenceExchange:
    """One test's traffic: ``perform(nonce)`` sends it (every request carrying ``nonce``) and returns what the
    client saw (the observation its judge reads)."""

    test_id: str
    perform: Callable[[str], Any]
    # Sends a refusal's twins (the same request without the marker, and maybe with no token at all).
    twinned: bool = False
    # Sends bytes that carry no nonce (a bare twin): run after the others, each a grace period after the one before,
    # so that what reaches upstream in its window is named by the window alone.
    alone: bool = False

    @property
    def key(self) -> str:
        return f"{CATEGORY}/{self.test_id}"


@dataclass(frozen=True)
class BackendArrival(HeaderLookup):
    """A request the backend received because of an exchange: framed from the bytes attributed to it."""

    method: str
    path: str  # origin-form
    headers: tuple[tuple[str, str], ...]  # lower-case names, values as they arrived
    where: str  # "backend api.inference.test connection 4", with a note if it arrived late or is shared


@dataclass(frozen=True)
class ExchangeEvidence:
    """What one exchange saw (``observation``) and what it caused: requests at the backend, bytes there that
    frame into no request (``unframed``, described), and catch-all hits."""

    observation: Any
    arrived: tuple[BackendArrival, ...] = ()
    unframed: tuple[str, ...] = ()
    hits: tuple[CatchAllHit, ...] = ()
    error: Exception | None = None  # what ``perform`` raised (then ``observation`` is None): that test's error

    @property
    def reached(self) -> str:
        """What reached the backend or a canary, for a report: empty when nothing did."""
        parts = [f"{a.method} {a.path} ({a.where})" for a in self.arrived] + list(self.unframed)
        parts += [f"canary {hit.endpoint}" for hit in self.hits]
        return "; ".join(parts)


def _arrivals(pieces: Sequence[tuple[UpstreamPiece, frozenset[str]]], key: str, ended: float
              ) -> tuple[tuple[BackendArrival, ...], tuple[str, ...]]:
    """The requests framed from the bytes attributed to ``key`` (:func:`~pytest_sandbox.http.upstream.read_upstream`,
    one connection at a time so each names where it arrived), and every byte that is not one, described."""
    arrived: list[BackendArrival] = []
    unframed: list[str] = []
    for segment in segments_of(pieces, key, lambda other: other.partition("/")[2], ended=ended):
        reading = read_upstream([segment])
        arrived += [BackendArrival(request.method, request.target, decode_headers(request.fields), segment.where)
                    for request in reading.requests]
        unframed += [leftover.describe() for leftover in reading.leftovers]
    return tuple(arrived), tuple(unframed)


def run_inference_campaign(lab: NetworkLab, backend: FakeInferenceBackend, exchanges: Sequence[InferenceExchange],
                           *, grace: float = GRACE_SECONDS) -> dict[str, ExchangeEvidence]:
    """Perform ``exchanges`` one after another (those that send bytes without a nonce last, each a grace period
    after the one before), wait the grace period, attribute and return: test id -> evidence.

    The backend bytes and hits counted for an exchange are accounted for (the lab's ledger and hit log), so
    the session-end audit reports only what arrived later.
    """
    listener = f"backend {backend.name}"
    start = {stream.key: stream.received for stream in backend.received_streams()}
    hit_mark = lab.hit_mark()
    windows: list[AttemptWindow] = []
    observations: dict[str, Any] = {}
    errors: dict[str, Exception] = {}
    ordered = [*(e for e in exchanges if not e.alone), *(e for e in exchanges if e.alone)]
    try:
        for exchange in ordered:
            if exchange.alone and windows and grace > 0:
                sleep_out_grace(windows[-1].end, grace)
            nonce, begin = new_nonce(), time.monotonic()
            try:
                observations[exchange.key] = exchange.perform(nonce)
            except Exception as error:  # that test's own error (e.g. a proxy that does not tunnel), not the module's
                observations[exchange.key], errors[exchange.key] = None, error
            windows.append(AttemptWindow(exchange.key, nonce, frozenset({listener}), begin, time.monotonic()))
    finally:
        # Registered even if the campaign is interrupted: whatever an exchange caused must stay attributable.
        lab.register_attempts(windows)
        lab.upstream_ledger.register(windows)
    if windows and grace > 0:
        sleep_out_grace(windows[-1].end, grace)
    ledger = lab.upstream_ledger
    attributed = attribute_since(ledger, backend.received_streams(), start, grace)
    ours = {window.key for window in windows}
    for piece, owners in attributed:
        if owners & ours:
            ledger.account(piece, owners)
    hits = lab.hits(since=hit_mark)
    hit_owners = attribute(hits, lab.attempt_windows(), grace).owners
    evidence: dict[str, ExchangeEvidence] = {}
    for exchange, window in zip(ordered, windows, strict=True):
        arrived, unframed = _arrivals(attributed, window.key, window.end)
        blamed = tuple(hit for hit in hits if window.key in hit_owners.get(hit.index, frozenset()))
        lab.account((hit.index for hit in blamed), by=window.key)
        evidence[exchange.test_id] = ExchangeEvidence(observations[window.key], arrived, unframed, blamed,
                                                      errors.get(window.key))
    return evidence
