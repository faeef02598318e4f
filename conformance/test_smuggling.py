"""Smuggling conformance: every catalogue case over raw sockets, on plain connections and in the tunnel.

Ids are ``absolute-<case>`` (the catalogue's bytes to the proxy, ``{host}`` a lab public origin,
``{denied}`` the 10.0.0.1 canary) and ``tunnel-<case>`` (the same trick inside the intercepted
``CONNECT inference.local:443`` TLS tunnel, its targets and body filled by the catalogue's ``TUNNEL_FORM``). Each
asserts the status sequence, that the refusal was written by the proxy (no origin mark), the close
(EOF before the deadline), that a follow-up request gets nothing after a close, and that the bytes
the origin or the fake backend received frame strictly into exactly the catalogue's allowed
requests and nothing else (network.md §5). Runs only with ``--sandbox``.

Evidence: the attempts of every selected test in this module run as one campaign on first use
(:func:`pytest_sandbox.probes.smuggling.run_smuggling_campaign`): back to back, each carrying its own
nonce upstream, then the grace period, then every byte the origins and the backend received (and
every catch-all hit) is attributed to the attempt that caused it, so a proxy that refuses, closes
and forwards the bytes afterwards fails the case it leaked. Bytes that arrive even later fail the
session when the lab closes (the upstream audit).
"""

from __future__ import annotations

import contextlib

import pytest

from pytest_sandbox.fixtures.conformance import selected_params
from pytest_sandbox.fixtures.network import VerdictCheck
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.network.harness import INFERENCE_ROUTE_KEY, InterceptionTrust, RunningProxy
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.probes.inference import inference_request, open_inference_tunnel, send_and_read
from pytest_sandbox.probes.smuggling import SmugglingAttempt, build_attempts, run_smuggling_campaign
from pytest_sandbox.session import SandboxSession
from pytest_sandbox.verdicts.inference import judge_backend_record
from pytest_sandbox.verdicts.judgement import Judgement

# The lab, proxy and verdict fixtures come from the plugin (rebinding them here would start a second
# session lab for this module).

ATTEMPTS = build_attempts()
PUBLIC_ORIGIN = "11.0.0.10"
DENIED_CANARY = "10.0.0.1"


@pytest.fixture(scope="module")
def smuggling_verdicts(request: pytest.FixtureRequest, sandbox_lab: NetworkLab, sandbox_proxy: RunningProxy,
                       inference_backend: FakeInferenceBackend, interception_ca: InterceptionTrust
                       ) -> dict[str, Judgement]:
    """Every selected attempt of this module, run as one campaign: test id -> judgement."""
    attempts: dict[str, SmugglingAttempt] = {
        attempt.test_id: attempt for attempt in selected_params(request, "attempt")}
    results = run_smuggling_campaign(list(attempts.values()), sandbox_proxy.connect, sandbox_lab, inference_backend,
                                     interception_ca.cert_pem, origin=PUBLIC_ORIGIN, denied=DENIED_CANARY)
    return {test_id: judgement for test_id, (judgement, _seen) in results.items()}


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[attempt.test_id for attempt in ATTEMPTS])
def test_smuggling_case_is_refused_and_closed_and_reaches_nothing(
        attempt: SmugglingAttempt, smuggling_verdicts: dict[str, Judgement], sandbox_lab: NetworkLab,
        sandbox_proxy: RunningProxy, inference_backend: FakeInferenceBackend, interception_ca: InterceptionTrust,
        network_verdict: VerdictCheck) -> None:
    judgement = smuggling_verdicts.get(attempt.test_id)
    if judgement is None:  # not in the campaign (selected after it ran): alone, with the grace period
        judgement = run_smuggling_campaign([attempt], sandbox_proxy.connect, sandbox_lab, inference_backend,
                                           interception_ca.cert_pem, origin=PUBLIC_ORIGIN,
                                           denied=DENIED_CANARY)[attempt.test_id][0]
    network_verdict("smuggling", attempt.test_id, judgement, attempt.describe())


def test_backend_record_shows_no_smuggled_request_ever_reached_it(
        sandbox_proxy: RunningProxy, inference_backend: FakeInferenceBackend, interception_ca: InterceptionTrust,
        network_verdict: VerdictCheck, sandbox_session: SandboxSession) -> None:
    """Runs after the tunnel cases of this module (those this worker ran, under xdist): the fake
    backend's whole log and every byte it received, judged at once. A routed request first, so the
    log is never empty (a proxy that cannot open the tunnel leaves it empty: INDETERMINATE)."""
    with contextlib.suppress(OSError), \
            open_inference_tunnel(sandbox_proxy.connect(), interception_ca.cert_pem) as tls:
        send_and_read(tls, inference_request("GET", "/v1/models"))
    judgement = judge_backend_record(inference_backend.requests, INFERENCE_ROUTE_KEY,
                                     routes=sandbox_session.policy.inference_routes,
                                     streams=inference_backend.received_streams())
    network_verdict("smuggling", "tunnel-backend-record", judgement,
                    "the fake backend's whole request log and raw record")
