"""Proof that a proxy which refuses, closes and forwards the refused bytes afterwards earns no BLOCKED.

The broken target is ``tests/broken_proxies/late_forwarder.py``: every answer the client sees is the
reference proxy's (so positive controls work and every denied smuggling case gets a genuine
refusal and a close), but 200 ms after a refusal it dials upstream itself and writes the client's
bytes. Before the smuggling category ran as a campaign, the judge looked at the upstream record at
once: the late bytes landed in a later attempt's window, so that case failed (naming the wrong
case) and the leaking case was BLOCKED; bytes after the last attempt were never seen at an origin.

Now every upstream byte is attributed to the attempt whose nonce it carries, after the grace
period: the late forwarder must fail exactly the cases it forwarded, each failure naming the case
and the bytes, no positive control may be blamed, and bytes that arrive after an immediate verdict
are named by the session-end upstream audit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from broken_proxies.harness import (
    DENIED_CANARY,
    PUBLIC_ORIGIN,
    TIMEOUT_SECONDS,
    backend_config,
    judge_catalogue,
    private_backend,
    proxy_with_interceptor,
    quoted_prefix,
)
from broken_proxies.late_forwarder import LateForwardingInterceptor
from broken_proxies.raw_relay import destination

from pytest_sandbox.catalogues.smuggling import SMUGGLING_CASES, case_by_id, render
from pytest_sandbox.http.framing import frame_pipeline
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.network.harness import RunningProxy, interception_of
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.third_party import start_proxy_command
from pytest_sandbox.probes.campaign import GRACE_SECONDS, audit_upstream
from pytest_sandbox.probes.smuggling import (
    ABSOLUTE,
    TUNNEL,
    build_attempts,
    run_smuggling_attempt,
    run_smuggling_campaign,
    tunnel_payload,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

ROOT = Path(__file__).resolve().parent.parent
FORWARDER = Path(__file__).resolve().parent / "broken_proxies" / "late_forwarder.py"
FORWARDER_COMMAND = f"{sys.executable} {FORWARDER} --port {{port}} --address {{address}}"
# Its own backend, so what it forwards never lands in the session backend's log.
LATE_BACKEND_NAME = "late-backend.inference.test"
LATE_BACKEND_ADDRESS = "11.0.0.22"
LATE_BACKEND_KEY = "route-key-late-backend"
LATE_PROXY_PORT = 3162
CONTROLS = frozenset(case.case_id for case in SMUGGLING_CASES if case.is_positive_control)
# The reference answers http10-keep-alive 200 and closes (HTTP/1.0) without reading the denied
# request behind it, so it refuses nothing there: no late forward.
ABSOLUTE_NOT_FORWARDED = CONTROLS
# Where raw_relay.destination sends these, the lab's catch-all canary answers: case -> port.
DIALS_THE_CANARY = {"target-userinfo": 80, "target-backslash": 80, "denied-connect-with-trailing-bytes": 443}


def quoted_first_line(payload: bytes, path: str = ABSOLUTE) -> str:
    """The payload's first request line as a verdict quotes it; for a CONNECT the forwarder tunnels,
    the line after its head (the bytes a proxy must never forward, which is what the verdict quotes).
    On the absolute path the forwarder tunnels a CONNECT to host:port (raw_relay.destination); in the
    tunnel the late interceptor forwards what follows a CONNECT strict framing accepted. Any other
    CONNECT is forwarded whole."""
    tunnelled = destination(payload, (PUBLIC_ORIGIN, 80))[2] if path == ABSOLUTE \
        else frame_pipeline(payload).violation is None
    if payload.startswith(b"CONNECT ") and tunnelled:
        payload = payload.partition(b"\r\n\r\n")[2]
    return quoted_prefix(payload, payload.index(b"\n"))


@pytest.fixture(scope="module")
def late_absolute(_network_lab: NetworkLab) -> dict[str, Judgement]:
    running = start_proxy_command(_network_lab, FORWARDER_COMMAND)
    interception = interception_of(_network_lab)
    try:
        # One attempt at a time: these tests read when the late bytes arrived against when their attempt ended,
        # which sixteen attempts in flight in a long session blur (the concurrent campaign's attribution of
        # late bytes has its own tests: tests/test_smuggling_concurrency.py).
        return judge_catalogue(running, _network_lab, interception.backend, interception.trust.cert_pem, ABSOLUTE,
                               concurrency=1)
    finally:
        running.stop()


@pytest.fixture(scope="module")
def late_backend(_network_lab: NetworkLab) -> Iterator[FakeInferenceBackend]:
    with private_backend(_network_lab, LATE_BACKEND_NAME, LATE_BACKEND_ADDRESS, LATE_BACKEND_KEY) as backend:
        yield backend


@pytest.fixture(scope="module")
def late_tunnel_proxy(_network_lab: NetworkLab, late_backend: FakeInferenceBackend) -> Iterator[RunningProxy]:
    trust = interception_of(_network_lab).trust
    handler = LateForwardingInterceptor(trust.ca, backend_config(late_backend), resolver=_network_lab.resolver(),
                                        socket_factory=_network_lab.socket, record=lambda decision: None)
    with proxy_with_interceptor(_network_lab, handler, LATE_PROXY_PORT) as running:
        yield running


@pytest.fixture(scope="module")
def late_tunnel(_network_lab: NetworkLab, late_backend: FakeInferenceBackend,
                late_tunnel_proxy: RunningProxy) -> dict[str, Judgement]:
    return judge_catalogue(late_tunnel_proxy, _network_lab, late_backend,
                           interception_of(_network_lab).trust.cert_pem, TUNNEL)


def _summary(judgements: dict[str, Judgement]) -> dict[str, str]:
    return {case_id: f"{j.verdict.value}: {j.reason}" for case_id, j in judgements.items()}


# --- absolute-form, through --sandbox-proxy-cmd inside the lab ------------------------------------------


def test_late_forwarder_earns_no_blocked_and_fails_every_case_it_forwarded(late_absolute) -> None:
    counts = Counter(j.verdict for j in late_absolute.values())
    assert counts[Verdict.BLOCKED] == 0, _summary(late_absolute)
    leaked = {case_id: j for case_id, j in late_absolute.items() if case_id not in ABSOLUTE_NOT_FORWARDED}
    not_allowed = {case_id: f"{j.verdict.value}: {j.reason}" for case_id, j in leaked.items()
                   if j.verdict is not Verdict.ALLOWED}
    assert not_allowed == {}
    for case_id, judgement in late_absolute.items():
        assert judgement.reason.startswith(f"{case_id}:"), judgement.reason


def test_no_positive_control_is_blamed_for_a_late_forward(late_absolute) -> None:
    """The controls are served by the inner reference proxy and must stay WORKS: a late byte of a
    neighbouring case lands in their window, and it carries that case's nonce, not theirs."""
    assert {case_id: late_absolute[case_id].verdict for case_id in CONTROLS} == dict.fromkeys(CONTROLS, Verdict.WORKS)


def test_late_forward_failures_name_the_case_and_the_bytes_at_the_origin(late_absolute) -> None:
    for case_id, judgement in late_absolute.items():
        if case_id in ABSOLUTE_NOT_FORWARDED or case_id in DIALS_THE_CANARY:
            continue
        payload = render(case_by_id(case_id), host=PUBLIC_ORIGIN, denied=DENIED_CANARY)
        assert f"{PUBLIC_ORIGIN}:80 connection" in judgement.reason, (case_id, judgement.reason)
        assert "s after the attempt ended)" in judgement.reason, (case_id, judgement.reason)
        assert quoted_first_line(payload) in judgement.reason, (case_id, judgement.reason)
    kelvin = late_absolute["te-kelvin-sign"].reason
    assert kelvin.startswith("te-kelvin-sign: bytes beyond the 0 allowed request(s) reached 11.0.0.10:80")
    assert r"chun\xe2\x84\xaaed" in kelvin


def test_late_dial_to_a_denied_destination_is_a_canary_hit_of_its_own_case(late_absolute) -> None:
    """Three cases make the forwarder dial 10.0.0.1 itself (the authority after userinfo, with or
    without a backslash, and the CONNECT destination): the catch-all hit carries the case's nonce
    and is blamed on it alone."""
    for case_id, port in DIALS_THE_CANARY.items():
        judgement = late_absolute[case_id]
        assert judgement.verdict is Verdict.ALLOWED
        assert f"reached what it must not: canary {DENIED_CANARY}:{port}" in judgement.reason, judgement.reason


# --- inside the intercepted inference.local tunnel ---------------------------------------------------


def test_late_forwarding_interceptor_earns_no_blocked_in_the_tunnel(late_tunnel) -> None:
    counts = Counter(j.verdict for j in late_tunnel.values())
    assert counts[Verdict.BLOCKED] == 0, _summary(late_tunnel)
    denied = {case_id: j for case_id, j in late_tunnel.items() if case_id not in CONTROLS}
    assert {case_id: j.verdict for case_id, j in denied.items()} == dict.fromkeys(denied, Verdict.ALLOWED), \
        _summary(denied)
    assert {case_id: late_tunnel[case_id].verdict for case_id in CONTROLS} == dict.fromkeys(CONTROLS, Verdict.WORKS)


def test_late_forward_failures_name_the_bytes_at_the_backend(late_tunnel) -> None:
    for case_id, judgement in late_tunnel.items():
        if case_id in CONTROLS:
            continue
        payload = tunnel_payload(case_by_id(case_id))
        assert judgement.reason.startswith(f"{case_id}:"), judgement.reason
        assert f"backend {LATE_BACKEND_NAME} connection" in judgement.reason, (case_id, judgement.reason)
        assert "s after the attempt ended)" in judgement.reason, (case_id, judgement.reason)
        assert quoted_first_line(payload, TUNNEL) in judgement.reason, (case_id, judgement.reason)


# --- after the last attempt: the session-end audit ----------------------------------------------------


def test_a_forward_after_an_immediate_verdict_is_named_by_the_upstream_audit(
        _network_lab: NetworkLab, late_backend: FakeInferenceBackend, late_tunnel_proxy: RunningProxy) -> None:
    """Judged at once (grace 0), as a last attempt would be if nothing waited: the bytes arrive
    after the verdict, carrying the attempt's nonce, and the audit names the case and the bytes."""
    attempt = next(a for a in build_attempts(paths=[TUNNEL]) if a.case.case_id == "te-cl")
    judgement, _seen = run_smuggling_attempt(attempt, late_tunnel_proxy.connect, _network_lab, late_backend,
                                             interception_of(_network_lab).trust.cert_pem, origin=PUBLIC_ORIGIN,
                                             denied=DENIED_CANARY, timeout=TIMEOUT_SECONDS, grace=0)
    assert judgement.verdict is Verdict.BLOCKED  # the false pass an immediate verdict gives...
    time.sleep(GRACE_SECONDS)
    problem = audit_upstream(_network_lab.upstream_ledger, late_backend.received_streams())
    assert problem is not None  # ...and what the session-end audit makes of it
    assert f"backend {LATE_BACKEND_NAME} connection" in problem and "tunnel-te-cl" in problem, problem
    assert "carries its nonce" in problem and "POST /v1/chat/completions HTTP/1.1" in problem, problem
    # Account for it here, so the session's own audit does not fail the project's test run.
    rerun = run_smuggling_campaign([attempt], late_tunnel_proxy.connect, _network_lab, late_backend,
                                   interception_of(_network_lab).trust.cert_pem, origin=PUBLIC_ORIGIN,
                                   denied=DENIED_CANARY, timeout=TIMEOUT_SECONDS)
    assert rerun[attempt.test_id][0].verdict is Verdict.ALLOWED


# --- end to end: pytest --sandbox --sandbox-proxy-cmd LATE-FORWARDER ---------------------------------


def test_conformance_run_with_the_late_forwarder_has_no_blocked_smuggling_verdict(tmp_path: Path) -> None:
    report = tmp_path / "late.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox", "--sandbox-proxy-cmd", FORWARDER_COMMAND,
         "--sandbox-report", str(report), str(ROOT / "conformance" / "test_smuggling.py"),
         "-p", "no:cacheprovider", "-q", "-p", "no:randomly"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    probes = {record["test"]: record for record in json.loads(report.read_text())["probes"]
              if record["category"] == "smuggling"}
    # Its command form does not intercept inference.local and no --sandbox-proxy-ca is given: the tunnel
    # cases (and the backend record) are not run, failing the run with the reason (issue #9).
    assert len(probes) == len(SMUGGLING_CASES), output
    assert all(test.startswith("absolute-") for test in probes), output
    assert "not run: the proxy under test is a third party and --sandbox-proxy-ca was not given" in output, output
    assert [test for test, record in probes.items() if record["verdict"] == "BLOCKED"] == []
    for case_id in CONTROLS:
        assert probes[f"absolute-{case_id}"]["verdict"] == "WORKS", probes[f"absolute-{case_id}"]
    kelvin = probes["absolute-te-kelvin-sign"]
    assert kelvin["verdict"] == "ALLOWED"
    assert kelvin["reason"].startswith("te-kelvin-sign: bytes beyond the 0 allowed request(s) reached 11.0.0.10:80")
    assert "s after the attempt ended)" in kelvin["reason"] and r"chun\xe2\x84\xaaed" in kelvin["reason"]
    assert "te-kelvin-sign: bytes beyond the 0 allowed request(s) reached 11.0.0.10:80" in output


# --- the inference category against the late-forwarding interceptor -------------------------------------

LATE_INTERCEPTOR_CONFTEST = '''
import sys

import pytest

sys.path.insert(0, {tests!r})
sys.path.insert(0, {broken!r})
from broken_proxies.harness import backend_config, proxy_with_interceptor
from broken_proxies.late_forwarder import LateForwardingInterceptor

from pytest_sandbox.fixtures.network import interception_of


@pytest.fixture(scope="session")
def sandbox_proxy(sandbox_session, sandbox_lab):
    """The reference proxy, intercepting inference.local with the late-forwarding interceptor (the session's
    own backend and CA): #819's answers, then every refused connection's bytes forwarded 200 ms later."""
    interception = interception_of(sandbox_lab)
    handler = LateForwardingInterceptor(interception.trust.ca, backend_config(interception.backend),
                                        resolver=sandbox_lab.resolver(), socket_factory=sandbox_lab.socket,
                                        record=lambda decision: None)
    with proxy_with_interceptor(sandbox_lab, handler, {port}) as running:
        yield running
'''


def _inference_run(pytester: pytest.Pytester, late: bool) -> tuple[pytest.RunResult, dict[str, str]]:
    (pytester.path / "conformance").mkdir(exist_ok=True)
    (pytester.path / "conformance" / "test_inference.py").write_text(
        (ROOT / "conformance" / "test_inference.py").read_text())
    if late:
        pytester.makeconftest(LATE_INTERCEPTOR_CONFTEST.format(
            tests=str(ROOT / "tests"), broken=str(ROOT / "tests" / "broken_proxies"), port=LATE_PROXY_PORT + 10))
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("--sandbox", f"--sandbox-report={report}", "-p", "no:cacheprovider",
                                           "-p", "no:randomly", "conformance/test_inference.py")
    return result, {p["test"]: p["verdict"] for p in json.loads(report.read_text())["probes"]}


def test_the_inference_category_fails_exactly_the_refusals_a_late_forwarding_interceptor_forwards(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Judged at once, each refusal test passed (the forward came 200 ms after its verdict) and the forwards
    landed on the next tests instead. As a campaign (nonce per exchange, judged after the grace period),
    exactly the refused exchanges fail, each naming what reached the backend, every positive control
    passes, and the reference passes everything."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    reference, verdicts = _inference_run(pytester, late=False)
    assert reference.ret == 0, reference.stdout.str()[-3000:]
    refusals = {test for test, verdict in verdicts.items() if verdict == "BLOCKED"}
    controls = {test for test, verdict in verdicts.items() if verdict == "WORKS"}
    assert {"routed-then-non-inference", "inner-host-10.0.0.1", "route-GET-/admin", "backend-record"} <= refusals
    late, late_verdicts = _inference_run(pytester, late=True)
    output = late.stdout.str()
    # The two CONNECTs to other ports are never intercepted, so nothing is forwarded for them.
    forwarded = refusals - {"connect-other-port-80", "connect-other-port-8443"}
    failed = {test for test, verdict in late_verdicts.items() if verdict == "ALLOWED"}
    assert {test for test, verdict in late_verdicts.items() if verdict == "WORKS"} == controls, output[-4000:]
    # A forward that came after the campaign's grace period (a very loaded machine) is named by the backend record
    # instead (bytes of that exchange after its verdict): never dropped.
    assert "backend-record" in failed and failed <= forwarded, output[-4000:]
    record = next(p for p in json.loads((pytester.path / "report.json").read_text())["probes"]
                  if p["test"] == "backend-record")
    assert all(f"inference/{test}" in record["reason"] for test in forwarded - failed), record
    assert "s after the attempt ended)" in output, output[-4000:]
