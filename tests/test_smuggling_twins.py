"""A proxy that recognises the harness's smuggling probes must not pass the rows its policy decides.

Every smuggling attempt carries its nonce in ``X-Sandbox-Probe`` in every head (that is how its upstream bytes are
attributed). Six rows are refused by a policy decision on cleanly framed requests, not by the framing checks:
routed-then-denied, pipelined-denied-in-the-middle, cl0-then-denied, body-then-denied,
upgrade-websocket-then-denied and denied-connect-with-trailing-bytes. ``broken_proxies/marker_keyed.py``'s
:func:`marker_keyed_lab_proxy` applies the reference's checks to the requests that carry the marker and forwards
the same requests from a client unchecked (the pipelined GET to 10.0.0.1 dialled, ``CONNECT 10.0.0.1:443``
tunnelled, the non-inference ``GET /secret`` in the tunnel forwarded to the backend). Before the twins it earned
804 BLOCKED and 56 WORKS over the 860 attempts of both paths: every test passed, and 12 of those BLOCKED rows (the
six above on both paths) are forwarded for any client. Now each of those rows is also sent as its unmarked twin
(``SmugglingAttempt.twin``: curl's User-Agent and Accept, the nonce as a UUID in each target's query and, on half,
in ``X-Request-ID``), and the fake fails exactly them, naming the marker.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from broken_proxies.harness import DENIED_CANARY, PUBLIC_ORIGIN, private_backend
from broken_proxies.marker_keyed import KEYED_INTERCEPTORS, marker_keyed_lab_proxy

from pytest_sandbox.catalogues.smuggling import SMUGGLING_CASES
from pytest_sandbox.http.framing import frame_pipeline
from pytest_sandbox.http.upstream import nonce_in_every_head
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.network.harness import interception_of, start_proxy
from pytest_sandbox.network.lab.attribution import find_nonce, new_nonce, twin_nonce
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.probes.smuggling import PATHS, SmugglingAttempt, build_attempts, run_smuggling_campaign
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.smuggling import judge_with_bare_twin, judge_with_twin

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
MARKER_HOLE = "refused only when the request carried the harness's marker (its nonce field)"
POLICY_ROWS = frozenset({"routed-then-denied", "pipelined-denied-in-the-middle", "cl0-then-denied",
                         "body-then-denied", "upgrade-websocket-then-denied", "denied-connect-with-trailing-bytes"})
ATTEMPTS = build_attempts()
TWINNED = tuple(attempt for attempt in ATTEMPTS if attempt.twin() is not None)
CONTROLS = tuple(attempt for attempt in ATTEMPTS if attempt.case.is_positive_control)
SELECTED = (*TWINNED, *CONTROLS)
UUID4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
BACKEND_NAME = "marker-keyed-backend.inference.test"
BACKEND_ADDRESS = "11.0.0.23"
BACKEND_KEY = "route-key-marker-keyed"
# Every key with an interceptor keyed the same way (the smuggling fake is both).
PORTS = {name: 3193 + index for index, name in enumerate(KEYED_INTERCEPTORS)}


def twin_payload(attempt: SmugglingAttempt, nonce: str) -> bytes:
    twin = attempt.twin()
    assert twin is not None
    return twin.payload(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, nonce=nonce)


def has_request_id(attempt: SmugglingAttempt) -> bool:
    return b"\r\nX-Request-ID: " in twin_payload(attempt, new_nonce())


# --- which rows have twins, and what a twin looks like (pure) -------------------------------------------------


def test_exactly_the_policy_decided_rows_have_twins_on_both_paths():
    assert {attempt.test_id for attempt in TWINNED} == {f"{path}-{row}" for path in PATHS for row in POLICY_ROWS}
    assert all(attempt.twin().twin() is None for attempt in TWINNED)  # a twin has no twin
    assert all(attempt.twin().test_id == attempt.test_id + "~unmarked" for attempt in TWINNED)


@pytest.mark.parametrize("attempt", TWINNED, ids=[attempt.test_id for attempt in TWINNED])
def test_a_twin_carries_no_marker_but_its_uuid_in_every_head_and_frames_as_the_marked_bytes(attempt):
    nonce = new_nonce()
    marked = attempt.payload(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, nonce=nonce)
    sent = twin_payload(attempt, nonce)
    assert b"X-Sandbox-Probe" not in sent and b"sbx-" not in sent and b"/sandbox-probe/" not in sent, sent
    assert b"\r\nUser-Agent: curl/" in sent and b"\r\nAccept: */*\r\n" in sent, sent
    token = twin_nonce(nonce)
    assert set(UUID4.findall(sent)) == {token.encode()} and nonce_in_every_head(sent, token), sent
    assert find_nonce(sent) == nonce  # read back through the registry of issued twin UUIDs
    # The same requests, framed the same way: only the nonce's carrier differs.
    assert frame_pipeline(sent).violation == frame_pipeline(marked).violation
    assert [(head.method, head.target.partition("?")[0]) for head, _body in frame_pipeline(sent).requests] == \
        [(head.method, head.target) for head, _body in frame_pipeline(marked).requests]
    assert attempt.twin().allowed(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY) == \
        attempt.allowed(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY)


# Anything a proxy could key on: the harness's marks, a UUID, a long hex run.
TOKEN = re.compile(rb"sbx-|sandbox-probe|X-Sandbox-Probe|X-Request-ID|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-|[0-9a-fA-F]{16}")


@pytest.mark.parametrize("attempt", TWINNED, ids=[attempt.test_id for attempt in TWINNED])
def test_a_bare_twin_carries_no_token_at_all_and_frames_as_the_marked_bytes(attempt):
    bare = attempt.bare_twin()
    assert bare is not None and bare.test_id == attempt.test_id + "~bare" and bare.base_id == attempt.test_id
    assert bare.twin() is None and bare.bare_twin() is None
    nonce = new_nonce()
    marked = attempt.payload(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, nonce=nonce)
    sent = bare.payload(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, nonce=nonce)
    follow_up = bare.follow_up(PUBLIC_ORIGIN, nonce, sent)
    assert TOKEN.search(sent + follow_up) is None, (sent, follow_up)
    assert b"\r\nUser-Agent: curl/" in sent and b"\r\nAccept: */*\r\n" in sent, sent
    assert frame_pipeline(sent).violation == frame_pipeline(marked).violation
    assert [(head.method, head.target) for head, _body in frame_pipeline(sent).requests] == \
        [(head.method, head.target) for head, _body in frame_pipeline(marked).requests]
    assert bare.allowed(origin=PUBLIC_ORIGIN, denied=DENIED_CANARY) != () or attempt.allowed(
        origin=PUBLIC_ORIGIN, denied=DENIED_CANARY) == ()
    assert find_nonce(sent) is None


def test_half_the_twins_carry_x_request_id_and_a_connect_always_does():
    carrying = {attempt.test_id for attempt in TWINNED if has_request_id(attempt)}
    assert 0 < len(carrying) < len(TWINNED), carrying
    assert {f"{path}-denied-connect-with-trailing-bytes" for path in PATHS} <= carrying  # no target to carry it


# --- the judge (pure) ------------------------------------------------------------------------------------------


def _judgement(verdict: Verdict, reason: str) -> Judgement:
    return Judgement(verdict, f"routed-then-denied: {reason}", "expected", f"observed {verdict.value}")


BLOCKED = _judgement(Verdict.BLOCKED, "refused with 403 by the proxy itself")
FORWARDED = _judgement(Verdict.ALLOWED, "reached what it must not: canary 10.0.0.1:80")
OPEN = _judgement(Verdict.INDETERMINATE, "the connection was not closed")


def test_a_row_refused_marked_and_unmarked_is_blocked_and_shows_both():
    judged = judge_with_twin(BLOCKED, BLOCKED)
    assert judged.verdict is Verdict.BLOCKED and judged.reason == BLOCKED.reason
    assert "the same bytes without the marker: observed BLOCKED" in judged.observed


def test_a_row_refused_only_when_marked_is_allowed_and_names_the_marker():
    judged = judge_with_twin(BLOCKED, FORWARDED)
    assert judged.verdict is Verdict.ALLOWED, judged
    assert judged.reason.startswith(f"routed-then-denied: {MARKER_HOLE}") and "canary 10.0.0.1:80" in judged.reason


def test_a_twin_that_cannot_be_judged_leaves_nothing_blocked():
    judged = judge_with_twin(BLOCKED, OPEN)
    assert judged.verdict is Verdict.INDETERMINATE and "could not be judged" in judged.reason, judged


def test_a_bare_twin_let_through_fails_the_row_naming_the_token_and_anything_else_leaves_it_as_it_was():
    judged = judge_with_bare_twin(judge_with_twin(BLOCKED, BLOCKED), FORWARDED)
    assert judged.verdict is Verdict.ALLOWED, judged
    assert judged.reason.startswith("routed-then-denied: refused only requests carrying a token"), judged
    assert "canary 10.0.0.1:80" in judged.reason and "no token at all, sent alone: observed ALLOWED" in judged.observed
    for other in (BLOCKED, OPEN):
        kept = judge_with_bare_twin(BLOCKED, other)
        assert (kept.verdict, kept.reason) == (Verdict.BLOCKED, BLOCKED.reason), kept
    both = judge_with_bare_twin(FORWARDED, FORWARDED)
    assert both.verdict is Verdict.ALLOWED and both.reason.startswith(FORWARDED.reason), both


def test_a_marked_row_that_could_not_be_judged_whose_twin_was_forwarded_is_allowed():
    assert judge_with_twin(OPEN, FORWARDED).verdict is Verdict.ALLOWED
    assert judge_with_twin(FORWARDED, BLOCKED).reason == FORWARDED.reason  # a marked leak keeps its own reason


# --- the fakes and the reference, in process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_backend(_network_lab: NetworkLab) -> Iterator[FakeInferenceBackend]:
    with private_backend(_network_lab, BACKEND_NAME, BACKEND_ADDRESS, BACKEND_KEY) as backend:
        yield backend


def campaign(lab: NetworkLab, backend: FakeInferenceBackend, connect, attempts=SELECTED, **options
             ) -> dict[str, Judgement]:
    results = run_smuggling_campaign(list(attempts), connect, lab, backend, interception_of(lab).trust.cert_pem,
                                     origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, **options)
    return {test_id: judgement for test_id, (judgement, _seen) in results.items()}


def keyed_run(lab: NetworkLab, backend: FakeInferenceBackend, keyed_on: str, **options) -> dict[str, Judgement]:
    with marker_keyed_lab_proxy(lab, backend, PORTS[keyed_on], keyed_on) as running:
        return campaign(lab, backend, running.connect, **options)


@needs_netns
def test_the_reference_refuses_every_twin_and_passes(_network_lab):
    interception = interception_of(_network_lab)
    reference = start_proxy(_network_lab, port=3192, interception=interception)
    try:
        verdicts = campaign(_network_lab, interception.backend, reference.connect)
    finally:
        reference.stop()
    assert set(verdicts) == {attempt.test_id for attempt in SELECTED}  # the twins are folded in
    assert all(verdicts[a.test_id].verdict is Verdict.WORKS for a in CONTROLS), verdicts
    for attempt in TWINNED:
        judged = verdicts[attempt.test_id]
        assert judged.verdict is Verdict.BLOCKED and "the same bytes without the marker: statuses" in judged.observed, \
            (attempt.test_id, judged)


@needs_netns
def test_without_twins_the_marker_keyed_fake_passes_every_row(_network_lab, keyed_backend):
    """The old behaviour: the rows alone, marked, are BLOCKED against a proxy that forwards them for any client."""
    verdicts = keyed_run(_network_lab, keyed_backend, "marker", twins=False)
    assert {test_id for test_id, judged in verdicts.items() if judged.verdict is Verdict.BLOCKED} == \
        {attempt.test_id for attempt in TWINNED}, verdicts
    assert all(verdicts[a.test_id].verdict is Verdict.WORKS for a in CONTROLS)
    # ... while the same bytes without the marker are forwarded: each twin alone is ALLOWED.
    alone = keyed_run(_network_lab, keyed_backend, "marker", attempts=[a.twin() for a in TWINNED], twins=False)
    assert {test_id for test_id, judged in alone.items() if judged.verdict is Verdict.ALLOWED} == \
        {a.twin().test_id for a in TWINNED}, alone


# Which twinned rows each fake lets a twin of through: the unmarked twin, or the bare twin (no token at all), which
# every fake that judges requests by a token (the marker, X-Request-ID, a UUID, the nonce text) lets through.
LETS_THROUGH = {
    "marker": lambda attempt: True,
    "marker-stripping": lambda attempt: True,
    "request-id": lambda attempt: True,  # the twin without X-Request-ID, else the bare twin
    "no-request-id": has_request_id,  # judges the bare twin: it has no X-Request-ID
    "nonce-text": lambda attempt: True,
    "no-user-agent": lambda attempt: True,
    "uuid": lambda attempt: True,  # every unmarked twin holds a UUID: only the bare twin goes through
}
TOKEN_HOLE = "refused only requests carrying a token"


@needs_netns
@pytest.mark.parametrize("keyed_on", sorted(KEYED_INTERCEPTORS))
def test_a_marker_keyed_fake_fails_exactly_the_twins_it_lets_through_and_its_controls_work(
        _network_lab, keyed_backend, keyed_on):
    verdicts = keyed_run(_network_lab, keyed_backend, keyed_on)
    expected = {attempt.test_id for attempt in TWINNED if LETS_THROUGH[keyed_on](attempt)}
    assert expected, "the selection must hold twins this fake lets through"
    failed = {test_id for test_id, judged in verdicts.items() if not judged.passed}
    assert failed == expected, (keyed_on, {t: verdicts[t].reason for t in failed ^ expected})
    for test_id in failed:
        judged = verdicts[test_id]
        hole = TOKEN_HOLE if keyed_on == "uuid" else MARKER_HOLE
        assert judged.verdict is Verdict.ALLOWED and (hole in judged.reason or TOKEN_HOLE in judged.reason), \
            (test_id, judged)
        hole = "canary 10.0.0.1:" if test_id.startswith("absolute-") else f"backend {BACKEND_NAME}"
        assert hole in judged.reason, (test_id, judged.reason)
    assert all(verdicts[a.test_id].verdict is Verdict.WORKS for a in CONTROLS), keyed_on


def test_a_twin_is_the_same_attempt_unmarked():
    attempt = TWINNED[0]
    assert replace(attempt, marked=False) == attempt.twin()


# --- through the conformance module ----------------------------------------------------------------------------

CONFTEST = '''
import sys

import pytest

sys.path.insert(0, {tests!r})
from broken_proxies.marker_keyed import marker_keyed_lab_proxy

from pytest_sandbox.network.harness import interception_of


@pytest.fixture(scope="session")
def sandbox_proxy(sandbox_session, sandbox_lab):
    """The marker-keyed fake (proxy and interceptor) in front of the session's own backend."""
    with marker_keyed_lab_proxy(sandbox_lab, interception_of(sandbox_lab).backend, 3199) as running:
        yield running
'''


@needs_netns
def test_conformance_run_against_the_marker_keyed_fake_fails_the_twinned_rows_and_names_the_marker(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    (pytester.path / "conformance").mkdir(exist_ok=True)
    (pytester.path / "conformance" / "test_smuggling.py").write_text(
        (ROOT / "conformance" / "test_smuggling.py").read_text())
    pytester.makeconftest(CONFTEST.format(tests=str(ROOT / "tests")))
    selection = " or ".join([*sorted(POLICY_ROWS), "pipeline-safe-chunked-then-get"])
    result = pytester.runpytest_subprocess("--sandbox", "-p", "no:cacheprovider", "-p", "no:randomly", "-rf",
                                           "conformance/test_smuggling.py", "-k", selection)
    output = result.stdout.str()
    failed = {line.split("[", 1)[1].split("]", 1)[0] if "[" in line else line.split("::")[-1].split(" ")[0]
              for line in output.splitlines() if line.startswith("FAILED")}
    twinned = {attempt.test_id for attempt in TWINNED}
    assert failed == twinned, output[-4000:]
    assert f"{len(twinned)} failed, 2 passed" in output, output[-4000:]
    assert output.count(MARKER_HOLE) >= len(twinned), output[-4000:]
    assert len(SMUGGLING_CASES) > len(POLICY_ROWS)
