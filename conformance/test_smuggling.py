"""Smuggling conformance: every catalogue case over raw sockets, on plain connections and in the tunnel.

Ids are ``absolute-<case>`` (the catalogue's bytes to the proxy, ``{host}`` a lab public origin,
``{denied}`` the 10.0.0.1 canary) and ``tunnel-<case>`` (the same trick inside the intercepted
``CONNECT inference.local:443`` TLS tunnel, adapted by ``inference_suite.tunnel_payload``). Each
asserts the status sequence, the close (EOF before the deadline), that a follow-up request gets
nothing after a close, and that the origin or the fake backend recorded exactly the catalogued
number of requests (network.md §5). Runs only with ``--sandbox``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_sandbox import network_fixtures
from pytest_sandbox.fake_backend import FakeInferenceBackend
from pytest_sandbox.inference_suite import (
    ABSOLUTE,
    FOLLOW_UP_MARKER,
    SmugglingAttempt,
    absolute_follow_up,
    build_attempts,
    exchange,
    judge_backend_record,
    judge_exchange,
    open_inference_tunnel,
    tunnel_follow_up,
)
from pytest_sandbox.lab import NetworkLab
from pytest_sandbox.network_fixtures import INFERENCE_ROUTE_KEY, InterceptionTrust, RunningProxy
from pytest_sandbox.ssrf_suite import new_hits

# Fixtures, until plugin.py imports them from pytest_sandbox.network_fixtures itself.
_network_lab = network_fixtures._network_lab
sandbox_lab = network_fixtures.sandbox_lab
sandbox_proxy = network_fixtures.sandbox_proxy
inference_backend = network_fixtures.inference_backend
interception_ca = network_fixtures.interception_ca
network_verdict = network_fixtures.network_verdict

ATTEMPTS = build_attempts()
PUBLIC_ORIGIN = "11.0.0.10"
DENIED_CANARY = "10.0.0.1"


def origin_requests(lab: NetworkLab) -> int:
    return sum(FOLLOW_UP_MARKER not in request.target for request in lab.origin_requests())


def backend_requests(backend: FakeInferenceBackend) -> int:
    return sum(FOLLOW_UP_MARKER not in request.path for request in backend.requests)


def run_smuggling_attempt(attempt: SmugglingAttempt, lab: NetworkLab, proxy: RunningProxy,
                          backend: FakeInferenceBackend, trust: InterceptionTrust):
    """Attempt one case on its path and judge it; every counter is diffed around the attempt."""
    hits_before = lab.all_hits()
    origin_before = origin_requests(lab)
    backend_before = backend_requests(backend)
    payload = attempt.payload(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY)

    def stray() -> str:
        hits = new_hits(hits_before, lab.all_hits())
        reached = [f"canary {address} port {port} x{count}" for (address, port), count in sorted(hits.items())]
        if attempt.path != ABSOLUTE and origin_requests(lab) != origin_before:
            reached.append("a lab origin (the tunnel must only reach the backend)")
        if attempt.path == ABSOLUTE and backend_requests(backend) != backend_before:
            reached.append("the inference backend")
        return ", ".join(reached)

    count: Callable[[], int]
    with proxy.connect() as sock:
        if attempt.path == ABSOLUTE:
            count = lambda: origin_requests(lab) - origin_before  # noqa: E731
            seen = exchange(sock, payload, attempt.case, absolute_follow_up(PUBLIC_ORIGIN), count, stray=stray)
        else:
            count = lambda: backend_requests(backend) - backend_before  # noqa: E731
            with open_inference_tunnel(sock, trust.cert_pem) as tls:
                seen = exchange(tls, payload, attempt.case, tunnel_follow_up(), count, stray=stray)
    return judge_exchange(attempt.case, seen)


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[attempt.test_id for attempt in ATTEMPTS])
def test_smuggling_case_is_refused_and_closed_and_reaches_nothing(
        attempt, sandbox_lab, sandbox_proxy, inference_backend, interception_ca, network_verdict):
    judgement = run_smuggling_attempt(attempt, sandbox_lab, sandbox_proxy, inference_backend, interception_ca)
    network_verdict("smuggling", attempt.test_id, judgement, attempt.describe())


def test_backend_record_shows_no_smuggled_request_ever_reached_it(
        sandbox_proxy, inference_backend, network_verdict):
    """Runs after every tunnel case of this module: the fake backend's whole log, judged at once."""
    judgement = judge_backend_record(inference_backend.requests, INFERENCE_ROUTE_KEY)
    network_verdict("smuggling", "tunnel-backend-record", judgement, "the fake backend's whole request log")
