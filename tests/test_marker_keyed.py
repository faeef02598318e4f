"""A proxy that recognises the harness's probes must not pass: every denial is also sent unmarked.

Every SSRF probe carries its attempt's nonce in ``X-Sandbox-Probe`` and a ``/sandbox-probe/<nonce>`` path
(that is how its evidence is attributed). ``broken_proxies/marker_keyed.py`` judges exactly the requests
that carry those markers and dials everything else unchecked. Before the unmarked twin existed, the SSRF
module gave it 1159 BLOCKED and 85 WORKS (all 1244 tests passed); it must now fail every denial the
reference refuses by policy, naming the marker, while its positive controls still work and the reference
passes the same attempts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from broken_proxies.marker_keyed import COMMAND, MarkerKeyedProxy
from broken_proxies.weak_ssrf import start_weak_proxy
from ssrf_selection import catalogue_selection, failed_params

from pytest_sandbox.http.responses import parse_head
from pytest_sandbox.inference.routes import route_probes
from pytest_sandbox.network.harness import start_proxy
from pytest_sandbox.network.lab.attribution import twin_nonce
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.probes.ssrf import ALL_FORMS, build_attempts
from pytest_sandbox.probes.ssrf_exchanges import AttemptExchange, run_ssrf_campaign
from pytest_sandbox.verdicts.judgement import Verdict
from pytest_sandbox.verdicts.ssrf import ProxyReply, judge_with_unmarked_twin

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
MARKER_HOLE = "refused only when the request carried the harness's marker"

# A slice of the catalogue in every form: metadata and private literals, names resolving to special
# addresses, malformed encodings (refused by the parser, marked or not) and the positive controls.
SLICE = tuple(a for a in build_attempts(forms=ALL_FORMS)
              if a.case.family in ("dns-name", "control", "ip-encoding") or a.case.case_id.startswith("meta-"))

METADATA = next(a for a in SLICE if a.form == "absolute" and a.case.case_id.startswith("meta-imds"))
CONTROL = next(a for a in SLICE if a.form == "absolute" and a.case.expected == "allowed")
REFUSED = ProxyReply(parse_head(b'HTTP/1.1 403 Forbidden\r\nconnection: close\r\n\r\n{"error":"ssrf_denied"}'),
                     None, closed=True, timed_out=False)
FORWARDED = ProxyReply(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), None, closed=True,
                       timed_out=False)
HELD_OPEN = ProxyReply(REFUSED.proxy, None, closed=False, timed_out=True)


def test_a_denial_refused_marked_and_unmarked_is_blocked():
    judgement = judge_with_unmarked_twin(METADATA, REFUSED, REFUSED, {})
    assert judgement.verdict is Verdict.BLOCKED, judgement
    assert "without the marker: 403" in judgement.observed


def test_a_denial_refused_only_when_marked_is_allowed_and_names_the_marker():
    judgement = judge_with_unmarked_twin(METADATA, REFUSED, FORWARDED, {("169.254.169.254", 80): 1})
    assert judgement.verdict is Verdict.ALLOWED, judgement
    assert MARKER_HOLE in judgement.reason and "proxy answered 200" in judgement.reason, judgement
    assert "reached canary 169.254.169.254:80" in judgement.reason, judgement


def test_an_unmarked_twin_left_open_is_not_a_pass():
    assert judge_with_unmarked_twin(METADATA, REFUSED, HELD_OPEN, {}).verdict is Verdict.INDETERMINATE


def test_a_leak_of_the_marked_request_itself_keeps_its_own_reason():
    judgement = judge_with_unmarked_twin(METADATA, FORWARDED, REFUSED, {})
    assert judgement.verdict is Verdict.ALLOWED and MARKER_HOLE not in judgement.reason, judgement


def test_a_positive_control_has_no_twin():
    canary = CONTROL.case.canary
    answer = parse_head(f"HTTP/1.1 200 OK\r\nX-Lab-Canary: {canary}\r\n\r\nok".encode())
    reply = ProxyReply(answer, None, closed=True, timed_out=False)
    assert judge_with_unmarked_twin(CONTROL, reply, None, {(canary, 80): 1}).verdict is Verdict.WORKS


def test_the_unmarked_twin_carries_no_marker_but_its_nonce():
    nonce = "sbx-0123456789abcdef"
    for form in ("connect", "absolute"):
        attempt = next(a for a in SLICE if a.form == form and a.case.case_id.startswith("meta-imds"))
        marked = attempt.request_bytes(nonce)
        unmarked = attempt.request_bytes(twin_nonce(nonce), marked=False)
        assert b"X-Sandbox-Probe" in marked and b"X-Sandbox-Probe" not in unmarked
        assert b"/sandbox-probe/" not in unmarked and b"sbx-" not in unmarked
        if form == "absolute":
            assert f"/{twin_nonce(nonce)}".encode() in unmarked  # opaque path segment: attributed exactly


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_marker_keyed_proxy_fails_every_policy_denial_and_no_control_while_the_reference_passes(_network_lab):
    exchanges = [AttemptExchange(a) for a in SLICE]
    reference = start_proxy(_network_lab, port=3161)
    try:
        reference_verdicts = run_ssrf_campaign(_network_lab, reference.connect, exchanges)
        # What the reference refuses by policy (403), as opposed to as malformed before any lookup (400).
        policy_refused = {key for key, v in reference_verdicts.items() if "ssrf_denied" in v.judgement.observed}
    finally:
        reference.stop()
    assert all(v.judgement.passed for v in reference_verdicts.values()), \
        [v.judgement for v in reference_verdicts.values() if not v.judgement.passed]
    assert len(policy_refused) >= 40, policy_refused
    running = start_weak_proxy(_network_lab, MarkerKeyedProxy, 3162)
    try:
        verdicts = run_ssrf_campaign(_network_lab, running.connect, exchanges)
    finally:
        running.stop()
    failed = {key: v.judgement for key, v in verdicts.items() if not v.judgement.passed}
    assert set(failed) == policy_refused
    for key, judgement in failed.items():
        assert judgement.verdict is Verdict.ALLOWED and MARKER_HOLE in judgement.reason, (key, judgement)
    controls = [v for v in verdicts.values() if v.category == "ssrf-controls"]
    assert controls and all(v.judgement.verdict is Verdict.WORKS for v in controls)


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_conformance_run_against_the_marker_keyed_proxy_fails_and_names_the_marker():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly", "-rf", "--sandbox",
         "--sandbox-proxy-cmd", COMMAND, str(ROOT / "conformance" / "test_ssrf.py"),
         "-k", catalogue_selection("meta-imds-169 or ctl-v4-private-10-above")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    # meta-imds in origin, authority and asterisk form: refused (400) before any lookup, marked or not
    assert "2 failed, 5 passed" in output, output
    failed = failed_params(output)
    assert failed == {"connect-meta-imds-169.254.169.254", "absolute-meta-imds-169.254.169.254"}, output
    assert MARKER_HOLE in output and "reached canary 169.254.169.254:80" in output, output


# --- inside the intercepted inference.local tunnel -----------------------------------------------------------

MARKER_INTERCEPTOR_CONFTEST = '''
import sys

import pytest

sys.path.insert(0, {tests!r})
from broken_proxies.harness import backend_config, proxy_with_interceptor
from broken_proxies.{module} import KEYED_INTERCEPTORS

MarkerKeyedInterceptor = KEYED_INTERCEPTORS[{keyed_on!r}]

from pytest_sandbox.fixtures.network import interception_of


@pytest.fixture(scope="session")
def sandbox_proxy(sandbox_session, sandbox_lab):
    """The reference proxy, intercepting inference.local with the marker-keyed interceptor (the session's own
    backend and CA): #819's answers to the harness's marked requests, anything unmarked forwarded."""
    interception = interception_of(sandbox_lab)
    handler = MarkerKeyedInterceptor(interception.trust.ca, backend_config(interception.backend),
                                     resolver=sandbox_lab.resolver(), socket_factory=sandbox_lab.socket,
                                     record=lambda decision: None)
    with proxy_with_interceptor(sandbox_lab, handler, 3163) as running:
        yield running
'''
INFERENCE_MARKER_HOLE = "refused only when the request carried the harness's marker (its nonce field)"
# The path spellings the framing checks refuse (400: a backslash is no pchar) before any interceptor decides: one
# per route of the baseline table.
FRAMING_REFUSED = frozenset(probe.test_id for probe in route_probes(baseline_policy().inference_routes)
                            if "\\" in probe.path)


def decided_by_the_interceptor(refusals: set[str]) -> set[str]:
    """The refusals an interceptor decides (another inner Host, a request that is no route, the non-inference
    request after a routed one), not its framing checks."""
    return {test for test in refusals if test.startswith(("inner-host-", "route-"))
            or test == "routed-then-non-inference"} - FRAMING_REFUSED


def _inference_run(pytester: pytest.Pytester, marker_keyed: bool, keyed_on: str = "marker",
                   module: str = "marker_keyed") -> tuple[pytest.RunResult, dict[str, str]]:
    """``conformance/test_inference.py`` against the reference, or (``marker_keyed``) against the interceptor
    ``KEYED_INTERCEPTORS[keyed_on]`` of ``broken_proxies.<module>``: the run and the report's verdicts by test."""
    (pytester.path / "conformance").mkdir(exist_ok=True)
    (pytester.path / "conformance" / "test_inference.py").write_text(
        (ROOT / "conformance" / "test_inference.py").read_text())
    if marker_keyed:
        pytester.makeconftest(MARKER_INTERCEPTOR_CONFTEST.format(tests=str(ROOT / "tests"), keyed_on=keyed_on,
                                                                 module=module))
    report = pytester.path / (f"{keyed_on}.json" if marker_keyed else "reference.json")
    result = pytester.runpytest_subprocess("--sandbox", f"--sandbox-report={report}", "-p", "no:cacheprovider",
                                           "-p", "no:randomly", "-rf", "conformance/test_inference.py")
    return result, {p["test"]: p["verdict"] for p in json.loads(report.read_text())["probes"]}


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_inference_category_fails_every_refusal_a_marker_keyed_interceptor_forwards(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the unmarked twins, all 23 inference tests passed against it (14 BLOCKED, 9 WORKS). Now every
    refusal the interceptor decides (another inner Host, a request that is no route, the non-inference request
    after a routed one) fails naming the marker, and so does the backend record; the positive controls work,
    and the reference passes everything."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    reference, verdicts = _inference_run(pytester, marker_keyed=False)
    assert reference.ret == 0, reference.stdout.str()[-3000:]
    controls = {test for test, verdict in verdicts.items() if verdict == "WORKS"}
    refusals = {test for test, verdict in verdicts.items() if verdict == "BLOCKED"}
    decided_by_interceptor = decided_by_the_interceptor(refusals)
    assert len(decided_by_interceptor) >= 9 and "routed-then-non-inference" in decided_by_interceptor, refusals
    keyed, keyed_verdicts = _inference_run(pytester, marker_keyed=True)
    output = keyed.stdout.str()
    failed = {test for test, verdict in keyed_verdicts.items() if verdict == "ALLOWED"}
    assert failed == decided_by_interceptor | {"backend-record"}, output[-4000:]
    assert {test for test, verdict in keyed_verdicts.items() if verdict == "WORKS"} == controls, output[-4000:]
    assert output.count(INFERENCE_MARKER_HOLE) >= len(decided_by_interceptor), output[-4000:]


INFERENCE_TOKEN_HOLE = "refused only requests carrying a token"
BARE_TWIN_SAMPLE = 3  # conformance/test_inference.py's


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_inference_category_fails_the_refusals_whose_bare_twin_an_interceptor_judging_only_uuids_forwards(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every unmarked twin carries its nonce as a UUID in its query, so an interceptor that applies #819 only to
    requests holding a UUID (``uuid`` in ``KEYED_INTERCEPTORS``) refused every marked request and every twin and
    passed all 23 inference tests while forwarding a client's ``GET /admin``. Now BARE_TWIN_SAMPLE of the refusals
    it decides, drawn at random, also send a bare twin (no token at all), run after the others a grace period
    apart: it forwards each, and exactly those fail, naming the token, with the backend record; nothing else
    changes (each bare twin's bytes are named by its own window)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    reference, reference_verdicts = _inference_run(pytester, marker_keyed=False)
    assert reference.ret == 0, reference.stdout.str()[-3000:]
    refusals = {test for test, verdict in reference_verdicts.items() if verdict == "BLOCKED"}
    decided_by_interceptor = decided_by_the_interceptor(refusals)
    assert len(decided_by_interceptor) >= 9, refusals
    keyed, verdicts = _inference_run(pytester, marker_keyed=True, keyed_on="uuid")
    output = keyed.stdout.str()
    failed = {test for test, verdict in verdicts.items() if verdict != reference_verdicts[test]}
    assert "backend-record" in failed and verdicts["backend-record"] == "ALLOWED", output[-4000:]
    # The refusals drawn for a bare twin say so in what they observed; the framing checks refuse one of them
    # whatever its token, so it passes if drawn.
    observed = {probe["test"]: probe["observed"] for probe in json.loads((pytester.path / "uuid.json").read_text())
                ["probes"]}
    drawn = {test for test, seen in observed.items() if "with no token at all" in seen}
    assert len(drawn) == BARE_TWIN_SAMPLE, sorted(drawn)
    bare = failed - {"backend-record"}
    assert bare == drawn - FRAMING_REFUSED and bare <= decided_by_interceptor, (sorted(failed), output[-4000:])
    assert all(verdicts[test] == "ALLOWED" for test in bare), verdicts
    assert output.count(INFERENCE_TOKEN_HOLE) >= len(bare), output[-4000:]
