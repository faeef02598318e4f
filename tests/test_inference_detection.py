"""Detection proof for the smuggling and inference suites: weakened proxies fail exactly their cases.

Each weakened reference proxy runs in the same lab as the conformance one, with the same
interception and fake backend; the suite must flag precisely the cases the catalogue says it fails
(its ``holes`` and ``also_failed_by``) and keep passing every other case, and each failure names its case.
squid and tinyproxy are then run through the plain absolute-form cases inside the lab and their
results recorded, not asserted: they are third parties, and what they do is the finding.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broken_proxies.harness import backend_config, private_backend
from broken_proxies.lenient_families import LENIENT_PROXY_PORTS, start_lenient_proxy
from wire import read_head

from pytest_sandbox.catalogues.smuggling import FIRST_REQUEST_ONLY, H11_ONLY, SMUGGLING_CASES, case_by_id
from pytest_sandbox.http.framing import FRAMING_FAMILIES
from pytest_sandbox.http.responses import parse_responses
from pytest_sandbox.http.upstream import UpstreamRequest, UpstreamSegment
from pytest_sandbox.inference.routing import forwardable_request_headers
from pytest_sandbox.network.harness import (
    InferenceInterception,
    RunningProxy,
    interception_of,
    lab_proxy_config,
    start_proxy,
)
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.third_party import squid_command, start_proxy_command, tinyproxy_command
from pytest_sandbox.probes.smuggling import (
    ABSOLUTE,
    PATHS,
    TUNNEL,
    SmugglingAttempt,
    build_attempts,
    run_smuggling_campaign,
    tunnel_payload,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.smuggling import (
    KEEP_READING_AFTER_DENIAL,
    LENIENT_PREFIX,
    Exchange,
    cases_failed_by,
    judge_exchange,
)

PUBLIC_ORIGIN = "11.0.0.10"
DENIED_CANARY = "10.0.0.1"
# A weakened proxy answers in milliseconds; the deadline only bounds the cases it leaves open.
DETECTION_TIMEOUT_SECONDS = 1.0
THIRD_PARTY_TIMEOUT_SECONDS = 0.75
THIRD_PARTY_START_SECONDS = 10.0
SMUGGLING_CASES_BY_ID = {case.case_id: case for case in SMUGGLING_CASES}


def judge_all(running: RunningProxy, path: str, timeout: float = DETECTION_TIMEOUT_SECONDS,
              interception: InferenceInterception | None = None) -> dict[str, Judgement]:
    """Every case on ``path`` against ``running``; tunnel evidence from ``interception``'s backend (the
    session's when None)."""
    lab = running.lab
    interception = interception or interception_of(lab)
    attempts = build_attempts(paths=[path])
    results = run_smuggling_campaign(attempts, running.connect, lab, interception.backend, interception.trust.cert_pem,
                                     origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, timeout=timeout)
    return {attempt.case.case_id: results[attempt.test_id][0] for attempt in attempts}


def failing(judgements: dict[str, Judgement]) -> set[str]:
    return {case_id for case_id, judgement in judgements.items() if not judgement.passed}


# A backend of its own for the weakened interceptors: what they let through (an h11-only hole such as
# ``?x=%zz`` or a lone HTTP2-Settings) must never land in the session backend's log, which the conformance
# suite judges as a whole (tests/broken_proxies/harness.py, private_backend).
WEAK_BACKEND_NAME = "weak-backend.inference.test"
WEAK_BACKEND_ADDRESS = "11.0.0.23"
WEAK_BACKEND_KEY = "route-key-weak-backend"


@pytest.fixture(scope="module")
def weak_interception(_network_lab: NetworkLab) -> Iterator[InferenceInterception]:
    shared = interception_of(_network_lab)
    with private_backend(_network_lab, WEAK_BACKEND_NAME, WEAK_BACKEND_ADDRESS, WEAK_BACKEND_KEY) as backend:
        yield InferenceInterception(shared.trust, backend, backend_config(backend))


@pytest.fixture
def weakened_proxy(request: pytest.FixtureRequest, _network_lab: NetworkLab,
                   weak_interception: InferenceInterception) -> Iterator[RunningProxy]:
    overrides, close_on_denied, port = request.param
    running = start_proxy(_network_lab, lab_proxy_config(**overrides), port=port,
                          interception=weak_interception, close_on_denied=close_on_denied)
    try:
        yield running
    finally:
        running.stop()


def test_reference_proxy_passes_every_case_on_both_paths(_network_lab: NetworkLab) -> None:
    """The baseline for the comparisons below: the unweakened proxy fails nothing."""
    running = start_proxy(_network_lab, port=3150, interception=interception_of(_network_lab))
    try:
        for path in PATHS:
            judgements = judge_all(running, path)
            assert failing(judgements) == set(), {k: judgements[k].reason for k in failing(judgements)}
    finally:
        running.stop()


@pytest.mark.parametrize("weakened_proxy", [({}, False, 3151)], indirect=True)
def test_interceptor_with_the_pre_819_keep_alive_rule_fails_exactly_the_policy_refusals_in_the_tunnel(
        weakened_proxy: RunningProxy, weak_interception: InferenceInterception) -> None:
    expected = cases_failed_by(KEEP_READING_AFTER_DENIAL, TUNNEL)
    assert {c.case_id for c in SMUGGLING_CASES if FIRST_REQUEST_ONLY in c.holes} <= expected
    assert "routed-then-denied" in expected
    judgements = judge_all(weakened_proxy, TUNNEL, interception=weak_interception)
    assert failing(judgements) == expected
    for case_id in expected:
        assert judgements[case_id].reason.startswith(f"{case_id}:"), judgements[case_id].reason
    assert "after the refusal the connection was still read" in judgements["routed-then-denied"].reason


@pytest.mark.parametrize("weakened_proxy", [({"judge_every_request": False}, True, 3152)], indirect=True)
def test_proxy_judging_only_the_first_request_fails_exactly_the_first_request_only_cases(
        weakened_proxy: RunningProxy, weak_interception: InferenceInterception) -> None:
    expected = cases_failed_by(FIRST_REQUEST_ONLY, ABSOLUTE)
    assert len(expected) >= 5
    judgements = judge_all(weakened_proxy, ABSOLUTE, interception=weak_interception)
    assert failing(judgements) == expected
    for case_id in expected:
        assert judgements[case_id].reason.startswith(f"{case_id}:"), judgements[case_id].reason


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weakened_proxy", [({"strict_framing": False}, True, 3153)], indirect=True)
def test_proxy_and_interceptor_with_h11_framing_only_fail_exactly_the_h11_only_cases(
        weakened_proxy: RunningProxy, weak_interception: InferenceInterception, path: str) -> None:
    expected = cases_failed_by(H11_ONLY, path)  # the catalogue's holes and also_failed_by rows
    assert len({case.case_id for case in SMUGGLING_CASES if H11_ONLY in case.holes}) >= 15
    judgements = judge_all(weakened_proxy, path, interception=weak_interception)
    assert failing(judgements) == expected, {k: judgements[k].reason for k in failing(judgements) ^ expected}
    for case_id in expected:
        assert judgements[case_id].reason.startswith(f"{case_id}:"), judgements[case_id].reason
    # A framing weakening never breaks a positive control or a policy refusal.
    assert all(SMUGGLING_CASES_BY_ID[case_id].violation is not None for case_id in expected)


# --- third-party proxies: recorded, not asserted ---------------------------------------------------

THIRD_PARTY_COMMANDS = {"tinyproxy": tinyproxy_command, "squid": squid_command}


def verdict_table(name: str, judgements: dict[str, Judgement]) -> str:
    width = max(len(case_id) for case_id in judgements)
    lines = [f"{name}: plain absolute-form smuggling cases", f"{'case':<{width}}  verdict        observed"]
    lines += [f"{case_id:<{width}}  {judgement.verdict.value:<13}  {judgement.observed}"
              for case_id, judgement in judgements.items()]
    counts = Counter(judgement.verdict.value for judgement in judgements.values())
    lines.append(f"{name} totals: " + ", ".join(f"{verdict} {count}" for verdict, count in sorted(counts.items())))
    return "\n".join(lines)


@pytest.mark.parametrize("name", sorted(THIRD_PARTY_COMMANDS))
def test_third_party_proxy_is_run_through_every_absolute_form_case_and_its_verdicts_recorded(
        name: str, _network_lab: NetworkLab, tmp_path: Path, record_property: Callable[[str, object], None],
        capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} is not installed here (CI installs tinyproxy only); nothing to record")
    tmp_path.chmod(0o755)  # squid drops to its own user and must reach its state directory
    running = start_proxy_command(_network_lab, THIRD_PARTY_COMMANDS[name](tmp_path))
    try:
        judgements = judge_all(running, ABSOLUTE, THIRD_PARTY_TIMEOUT_SECONDS)  # type: ignore[arg-type]
    finally:
        running.stop()
    assert list(judgements) == [case.case_id for case in SMUGGLING_CASES]
    table = verdict_table(name, judgements)
    record_property(f"{name}_smuggling_verdicts", {k: j.verdict.value for k, j in judgements.items()})
    with capsys.disabled():
        print("\n" + table)


# --- the pure pieces the verdicts rest on ------------------------------------------------------------


def test_tunnel_payload_turns_the_denied_request_into_a_non_inference_path_on_inference_local() -> None:
    assert tunnel_payload(case_by_id("routed-then-denied")) == (
        b"GET /v1/models HTTP/1.1\r\nHost: inference.local\r\n\r\n"
        b"GET /secret HTTP/1.1\r\nHost: inference.local\r\n\r\n")


def test_tunnel_payload_keeps_body_lengths_exact_with_a_json_object() -> None:
    payload = tunnel_payload(case_by_id("pipeline-safe-chunked-then-get"))
    assert b"POST /v1/chat/completions HTTP/1.1\r\n" in payload
    assert b"5\r\n{   }\r\n0\r\n\r\n" in payload
    assert b"{host}" not in payload and b"{denied}" not in payload


def test_parse_responses_reads_chunked_and_sized_bodies_and_skips_interim_responses() -> None:
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno"
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\npart")
    responses, used = parse_responses(data)
    assert [(r.status, r.body) for r in responses] == [(200, b"abc"), (403, b"no")]
    assert data[used:].startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 9")


ALLOWED_GET = b"GET / HTTP/1.1\r\nHost: 11.0.0.10\r\n\r\n"


def absolute_allowed(case_id: str) -> tuple[UpstreamRequest, ...]:
    return SmugglingAttempt(case_by_id(case_id), ABSOLUTE).allowed(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY)


def test_refusal_left_open_is_never_a_pass_and_an_answered_follow_up_is_a_leak() -> None:
    case = case_by_id("routed-then-denied")
    allowed = absolute_allowed("routed-then-denied")
    upstream = (UpstreamSegment("11.0.0.10:80 connection 1", ALLOWED_GET),)
    left_open = Exchange((200, 403), False, True, None, upstream, marked=(True, False))
    still_read = Exchange((200, 403), False, True, 200, upstream, marked=(True, False))
    refused = Exchange((200, 403), True, False, None, upstream, marked=(True, False))
    assert judge_exchange(case, left_open, allowed).verdict is Verdict.INDETERMINATE
    assert judge_exchange(case, still_read, allowed).verdict is Verdict.ALLOWED
    assert judge_exchange(case, refused, allowed).verdict is Verdict.BLOCKED


def test_more_requests_at_the_origin_than_catalogued_is_allowed_whatever_the_statuses() -> None:
    case = case_by_id("cl-te-both")
    smuggled = Exchange(statuses=(400,), closed=True, timed_out=False, follow_up=None,
                        upstream=(UpstreamSegment("11.0.0.10:80 connection 1", ALLOWED_GET),))
    judgement = judge_exchange(case, smuggled)
    assert judgement.verdict is Verdict.ALLOWED and judgement.reason.startswith("cl-te-both:")
    assert "GET /" in judgement.reason


def test_wrong_refusal_status_with_nothing_leaked_is_indeterminate() -> None:
    judgement = judge_exchange(case_by_id("cl-te-both"), Exchange((403,), True, False, None))
    assert judgement.verdict is Verdict.INDETERMINATE


# --- one lenient framing family per proxy (issue #9): exactly that family's rows fail -----------------


@pytest.mark.parametrize("family", sorted(LENIENT_PROXY_PORTS))
def test_proxy_reading_one_family_leniently_fails_exactly_that_familys_cases(
        family: str, _network_lab: NetworkLab) -> None:
    expected = cases_failed_by(LENIENT_PREFIX + family, ABSOLUTE)
    assert expected == {case.case_id for case in SMUGGLING_CASES if case.family == family}
    assert len(expected) >= 3, f"the {family} family has too few rows to mean anything"
    running = start_lenient_proxy(_network_lab, family)
    try:
        judgements = judge_all(running, ABSOLUTE)
    finally:
        running.stop()
    failed = failing(judgements)
    assert failed == expected, {k: judgements[k].reason for k in failed ^ expected}
    for case_id in expected:
        assert judgements[case_id].reason.startswith(f"{case_id}:"), judgements[case_id].reason
    # Most rows of a family are caught by what reached the origin, not only by a different status.
    leaked = {case_id for case_id in expected if judgements[case_id].verdict is Verdict.ALLOWED}
    assert len(leaked) * 2 >= len(expected), {k: judgements[k].reason for k in expected - leaked}


def test_every_framing_family_has_a_lenient_proxy() -> None:
    assert set(LENIENT_PROXY_PORTS) == set(FRAMING_FAMILIES)


# --- CONNECT with a body, and obs-text values in the tunnel (issue #9) ---------------------------------

CONNECT_INFERENCE_WITH_BODY = (b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n"
                               b"Content-Length: 5\r\n\r\nhello")


def first_answer(running: RunningProxy, payload: bytes) -> bytes:
    """The first bytes the proxy answers ``payload`` with (a status line), read until the head ends."""
    with running.connect() as sock:
        sock.settimeout(DETECTION_TIMEOUT_SECONDS)
        sock.sendall(payload)
        return read_head(sock)


def test_connect_to_inference_local_with_a_body_is_refused_before_the_tunnel_opens(
        _network_lab: NetworkLab) -> None:
    """The body would otherwise be dropped and the interception tunnel opened, getting round the
    early-data refusal (RFC 9110 §9.3.6); the lenient connect-body proxy shows the test can fail."""
    reference = start_proxy(_network_lab, port=3180, interception=interception_of(_network_lab))
    try:
        answer = first_answer(reference, CONNECT_INFERENCE_WITH_BODY)
        decisions = reference.proxy.decisions
    finally:
        reference.stop()
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"connect-body" in answer
    assert [decision.reason for decision in decisions] == ["framing:connect-body"]
    assert reference.inference_decisions == [], "the interceptor must never see the connection"
    lenient = start_lenient_proxy(_network_lab, "connect-body")
    try:
        assert first_answer(lenient, CONNECT_INFERENCE_WITH_BODY).startswith(b"HTTP/1.1 200 ")
    finally:
        lenient.stop()


def test_interceptor_that_cannot_forward_obs_text_fails_the_obs_text_control(
        _network_lab: NetworkLab, weak_interception: InferenceInterception, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-fix interceptor handed h11 text headers (ASCII only): a value with a non-ASCII byte was
    never forwarded. Rebuilt here by giving the interceptor such an h11; the control must turn BROKEN,
    and the reference (the test above it, in the conformance run) serves it."""
    import h11

    from pytest_sandbox.inference import interceptor

    class AsciiOnlyH11:
        def __getattr__(self, name: str) -> object:
            return getattr(h11, name)

        @staticmethod
        def Request(*, method: str, target: str, headers: list[tuple[bytes, bytes]]) -> h11.Request:
            return h11.Request(method=method, target=target,
                               headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers])

    monkeypatch.setattr(interceptor, "h11", AsciiOnlyH11())
    interception = weak_interception
    running = start_proxy(_network_lab, port=3181, interception=interception)
    try:
        attempt = SmugglingAttempt(case_by_id("obs-text-header-value"), TUNNEL)
        judgement, _seen = run_smuggling_campaign(
            [attempt], running.connect, _network_lab, interception.backend, interception.trust.cert_pem,
            origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, timeout=DETECTION_TIMEOUT_SECONDS)[attempt.test_id]
    finally:
        running.stop()
    assert judgement.verdict is Verdict.BROKEN, judgement.reason
    assert judgement.reason.startswith("obs-text-header-value: a valid exchange was not served"), judgement.reason


def test_routing_override_fields_are_never_forwarded_to_the_backend() -> None:
    """Behind the strict reader's refusal, routing drops them too (a reader that lets one through)."""
    headers = [("Host", "inference.local"), ("X-HTTP-Method-Override", "DELETE"), ("X-Original-URL", "/admin"),
               ("Forwarded", "host=evil"), ("X-Forwarded-Host", "evil"), ("Accept", "*/*"),
               ("Transfer_Encoding", "chunked"), ("x_forwarded_host", "evil"), ("X_Custom", "kept")]
    forwarded = forwardable_request_headers(headers, api_key="k", host_header="backend.test", body_length=0,
                                            method="GET")
    names = {name.lower() for name, _ in forwarded}
    assert {"accept", "x_custom"} <= names
    assert not names & {"x-http-method-override", "x-original-url", "forwarded", "x-forwarded-host",
                        "transfer_encoding", "x_forwarded_host"}
