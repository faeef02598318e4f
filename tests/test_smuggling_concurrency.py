"""The smuggling campaign runs attempts concurrently without mixing their evidence.

Attempts whose every possible upstream request carries their nonce run 16 at a time
(:func:`pytest_sandbox.probes.smuggling.run_smuggling_campaign`); the rest run one after another.
The end-to-end proof: a proxy that leaks exactly one row (``tests/broken_proxies/one_row_leak.py``)
on both paths, judged over the whole catalogue in one campaign. The leak must land on that row on
both paths and on nothing else: a leak credited to a neighbour, or hidden by one, would change
some other row's verdict. The pure parts (which attempts qualify, which paths pass the nonce) are
table-tested without sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
from broken_proxies.drifting_forwarder import DriftingForwarder
from broken_proxies.harness import DENIED_CANARY, PUBLIC_ORIGIN, backend_config, private_backend, proxy_with_interceptor
from broken_proxies.nonce_stripping_leak import StrippingLeakFront, StrippingLeakInterceptor, strip_nonces
from broken_proxies.one_row_leak import OneRowLeakFront, OneRowLeakInterceptor

from pytest_sandbox.catalogues.smuggling import SMUGGLING_CASES, case_by_id, render
from pytest_sandbox.http.upstream import (
    ReceivedStream,
    UpstreamSegment,
    nonce_in_every_head,
    stream_address,
    with_nonce,
)
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.network.harness import interception_of, lab_proxy_config, start_proxy
from pytest_sandbox.network.lab.attribution import AttemptWindow
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.probes.campaign import GRACE_SECONDS
from pytest_sandbox.probes.smuggling import (
    ABSOLUTE,
    PATHS,
    SMUGGLING_CONCURRENCY,
    TUNNEL,
    Sighting,
    SmugglingAttempt,
    _Blind,
    _deadline_bound,
    _needs_retry,
    _nonce_carried,
    _nonce_probes,
    _Plan,
    _plan,
    _Sent,
    build_attempts,
    first_reruns,
    likely_causes_first,
    next_causes,
    reproduced_by,
    run_smuggling_campaign,
    tunnel_payload,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.smuggling import Exchange

LEAKED_ROW = "host-comma-list"
# Its Host line on each path: in no other row's bytes (checked below), so the proxy leaks exactly it.
MARKERS = {ABSOLUTE: b"\r\nHost: 11.0.0.10, 10.0.0.1\r\n", TUNNEL: b"\r\nHost: inference.local, inference.local\r\n"}
LEAK_BACKEND_NAME = "one-row-leak-backend.inference.test"
LEAK_BACKEND_ADDRESS = "11.0.0.24"
LEAK_BACKEND_KEY = "route-key-one-row-leak"
INNER_PORT = 3190
FRONT_PORT = 3191
TIMEOUT_SECONDS = 3.0  # the default deadline: a shared, loaded machine must not make a control look broken
NONCE = "sbx-0123456789abcdef"


def _payloads(path: str) -> dict[str, bytes]:
    return {case.case_id: tunnel_payload(case) if path == TUNNEL else render(case, host=PUBLIC_ORIGIN,
                                                                             denied=DENIED_CANARY)
            for case in SMUGGLING_CASES}


@pytest.mark.parametrize("path", PATHS)
def test_the_marker_is_in_the_leaked_row_alone(path: str) -> None:
    holding = [case_id for case_id, payload in _payloads(path).items() if MARKERS[path] in payload]
    assert holding == [LEAKED_ROW]


@pytest.fixture(scope="module")
def leak_backend(_network_lab: NetworkLab) -> Iterator[FakeInferenceBackend]:
    with private_backend(_network_lab, LEAK_BACKEND_NAME, LEAK_BACKEND_ADDRESS, LEAK_BACKEND_KEY) as backend:
        yield backend


@pytest.fixture(scope="module")
def one_row_leak(_network_lab: NetworkLab, leak_backend: FakeInferenceBackend
                 ) -> Iterator[dict[str, Judgement]]:
    """Every row on both paths through the one-row leaker, as one campaign: test id -> judgement."""
    trust = interception_of(_network_lab).trust
    handler = OneRowLeakInterceptor(trust.ca, backend_config(leak_backend), resolver=_network_lab.resolver(),
                                    socket_factory=_network_lab.socket, record=lambda decision: None,
                                    marker=MARKERS[TUNNEL])
    with proxy_with_interceptor(_network_lab, handler, INNER_PORT) as inner:
        front = OneRowLeakFront(_network_lab, "127.0.0.1", FRONT_PORT, (inner.address, inner.port),
                                marker=MARKERS[ABSOLUTE], default=(PUBLIC_ORIGIN, 80))
        try:
            results = run_smuggling_campaign(build_attempts(), front.connect, _network_lab, leak_backend,
                                             trust.cert_pem, origin=PUBLIC_ORIGIN, denied=DENIED_CANARY,
                                             timeout=TIMEOUT_SECONDS)
        finally:
            front.stop()
    yield {test_id: judgement for test_id, (judgement, _seen) in results.items()}


def _failed(judgements: dict[str, Judgement]) -> dict[str, str]:
    return {test_id: f"{j.verdict.value}: {j.reason}" for test_id, j in judgements.items()
            if j.verdict not in (Verdict.BLOCKED, Verdict.WORKS)}


def test_the_leaked_row_fails_on_both_paths_and_nothing_else_does(one_row_leak: dict[str, Judgement]) -> None:
    leaked = {f"{ABSOLUTE}-{LEAKED_ROW}", f"{TUNNEL}-{LEAKED_ROW}"}
    assert set(_failed(one_row_leak)) == leaked, _failed(one_row_leak)
    for test_id in leaked:
        assert one_row_leak[test_id].verdict is Verdict.ALLOWED


def test_each_failure_names_the_row_and_the_bytes_that_reached_upstream(one_row_leak: dict[str, Judgement]) -> None:
    absolute = one_row_leak[f"{ABSOLUTE}-{LEAKED_ROW}"].reason
    assert absolute.startswith(f"{LEAKED_ROW}:"), absolute
    assert f"{PUBLIC_ORIGIN}:80 connection" in absolute and "Host: 11.0.0.10, 10.0.0.1" in absolute, absolute
    assert "also blamed" not in absolute, absolute  # carried its nonce: its alone
    tunnel = one_row_leak[f"{TUNNEL}-{LEAKED_ROW}"].reason
    assert tunnel.startswith(f"{LEAKED_ROW}:"), tunnel
    assert f"backend {LEAK_BACKEND_NAME} connection" in tunnel, tunnel
    assert "Host: inference.local, inference.local" in tunnel and "also blamed" not in tunnel, tunnel


def test_the_leaked_row_ran_while_other_rows_were_in_flight(_network_lab: NetworkLab,
                                                              one_row_leak: dict[str, Judgement]) -> None:
    """Not a vacuous pass: on each path the leaked attempt's window overlapped other attempts'."""
    windows = _network_lab.upstream_ledger.windows
    for path in PATHS:
        mine = next(w for w in reversed(windows) if w.key.endswith(f"/{path}-{LEAKED_ROW}"))
        campaign = mine.key.partition("/")[0]
        overlapping = [w for w in windows if w.key.partition("/")[0] == campaign and w is not mine
                       and w.begin < mine.end and mine.begin < w.end]
        assert len(overlapping) >= 2, (path, mine)


# --- pure: which attempts run together, and on which paths -------------------------------------------


@pytest.mark.parametrize(("payload", "expected"), [
    (b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n", True),
    (b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\nGET http://d/secret HTTP/1.1\r\nHost: d\r\n\r\n", True),
    # A request smuggled behind a chunked body strict framing refused: only its first head gets the nonce.
    (b"POST http://h/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
     b"GET http://d/secret HTTP/1.1\r\nHost: d\r\n\r\n", False),
    # After a CONNECT: the chunked body gets it as a trailer, the request behind the body too.
    (b"CONNECT h:80 HTTP/1.1\r\nHost: h:80\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
     b"GET http://d/secret HTTP/1.1\r\nHost: d\r\n\r\n", True),
    (b"CONNECT h:80 HTTP/1.1\r\nHost: h:80\r\nContent-Length: 5\r\n\r\nhelloGET /s HTTP/1.1\r\nHost: d\r\n\r\n", True),
    # A Content-Length body holding a whole request: left as it is, so that request has no nonce.
    (b"CONNECT h:80 HTTP/1.1\r\nHost: h:80\r\nContent-Length: 29\r\n\r\nGET /s HTTP/1.1\r\nHost: d\r\n\r\n", False),
    # A head ended by LF CRLF: a lenient reader ends it there, before the nonce.
    (b"GET http://h/ HTTP/1.1\r\nHost: h\n\r\nX: y\r\n\r\n", False),
])
def test_an_attempt_runs_concurrently_only_if_every_request_it_can_become_carries_its_nonce(
        payload: bytes, expected: bool) -> None:
    assert nonce_in_every_head(with_nonce(payload, NONCE), NONCE) is expected


def test_the_restored_row_runs_concurrently_on_both_paths() -> None:
    for attempt in build_attempts():
        if attempt.case.case_id == "connect-chunked-body":
            plan = _plan(attempt, "t/", origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, backend_name="backend b")
            assert plan.attributable, plan.payload
            assert b"GET" in plan.payload.partition(b"0\r\n")[2]


def test_every_catalogue_control_qualifies_and_the_count_of_concurrent_attempts_is_known() -> None:
    plans = [_plan(a, "t/", origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, backend_name="backend b")
             for a in build_attempts()]
    assert all(plan.attributable for plan in plans if plan.attempt.case.is_positive_control)
    assert sum(plan.attributable for plan in plans) > SMUGGLING_CONCURRENCY


def _stream(data: bytes, connection: int = 1, listener: str = "11.0.0.10:80") -> ReceivedStream:
    return ReceivedStream(listener, connection, data, len(data), ((1.0, len(data)),))


def test_a_path_runs_concurrently_only_where_every_control_arrived_with_its_nonce() -> None:
    controls = [_plan(a, "t/", origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, backend_name="backend b")
                for a in build_attempts() if a.case.is_positive_control]
    by_path = {path: [plan for plan in controls if plan.attempt.path == path and plan.allowed] for path in PATHS}
    assert all(by_path.values())
    forwarded = b"".join(b"GET / HTTP/1.1\r\nX-Sandbox-Probe: " + plan.nonce.encode() + b"\r\n\r\n"
                         for plan in by_path[ABSOLUTE])
    stripped = b"GET /v1/models HTTP/1.1\r\nHost: b\r\n\r\n"  # an interceptor that drops the field
    assert _nonce_carried(controls, {}, [_stream(forwarded), _stream(stripped, listener="backend b")]) == {ABSOLUTE}
    # One control of the path arrived without its nonce: the path runs one attempt at a time.
    partial = forwarded.replace(by_path[ABSOLUTE][0].nonce.encode(), b"sbx-ffffffffffffffff")
    assert _nonce_carried(controls, {}, [_stream(partial)]) == frozenset()
    # Bytes before the campaign's start are not evidence.
    assert _nonce_carried(controls, {("11.0.0.10:80", 1): len(forwarded)}, [_stream(forwarded)]) == frozenset()


def test_one_control_per_path_probes_whether_the_proxy_passes_the_nonce() -> None:
    plans = [_plan(a, "t/", origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, backend_name="backend b")
             for a in build_attempts()]
    probes = _nonce_probes(plans)
    assert [plan.attempt.path for plan in probes] == list(PATHS)
    for probe in probes:
        assert probe.attempt.case.is_positive_control and probe.allowed and probe.attributable
        # Not the obs-text control nor a chunked POST (tinyproxy stalls on those): a probe any working
        # proxy forwards at once.
        assert probe.attempt.case.case_id == "pipeline-safe", probe.attempt.test_id
    # Without a control on a path, nothing there runs concurrently.
    assert _nonce_probes([plan for plan in plans if plan.attempt.path == TUNNEL]) == [probes[1]]
    assert _nonce_probes([plan for plan in plans if not plan.attempt.case.is_positive_control]) == []


# --- isolation reruns: a leak without a nonce lands on the row that reproduces it ----------------------

STRIP_INNER_PORT = 3192
STRIP_FRONT_PORT = 3193
ONCE_INNER_PORT = 3194
ONCE_FRONT_PORT = 3195


def _stripping_campaign(lab: NetworkLab, backend: FakeInferenceBackend, *, once: bool, inner_port: int,
                        front_port: int) -> dict[str, tuple[Judgement, Exchange]]:
    trust = interception_of(lab).trust
    handler = StrippingLeakInterceptor(trust.ca, backend_config(backend), resolver=lab.resolver(),
                                       socket_factory=lab.socket, record=lambda decision: None,
                                       marker=MARKERS[TUNNEL], once=once)
    with proxy_with_interceptor(lab, handler, inner_port) as inner:
        front = StrippingLeakFront(lab, "127.0.0.1", front_port, (inner.address, inner.port),
                                   marker=MARKERS[ABSOLUTE], default=(PUBLIC_ORIGIN, 80), once=once)
        try:
            # Every suspect rerun (about 190 here): these tests pin down the isolation itself.
            return run_smuggling_campaign(build_attempts(), front.connect, lab, backend, trust.cert_pem,
                                          origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, timeout=TIMEOUT_SECONDS,
                                          isolation_budget=1000)
        finally:
            front.stop()


@pytest.fixture(scope="module")
def stripped_leak(_network_lab: NetworkLab, leak_backend: FakeInferenceBackend
                  ) -> dict[str, tuple[Judgement, Exchange]]:
    """Every row on both paths through a proxy that leaks one row with its nonce stripped, every time."""
    return _stripping_campaign(_network_lab, leak_backend, once=False, inner_port=STRIP_INNER_PORT,
                               front_port=STRIP_FRONT_PORT)


@pytest.fixture(scope="module")
def stripped_leak_once(_network_lab: NetworkLab, leak_backend: FakeInferenceBackend
                       ) -> dict[str, tuple[Judgement, Exchange]]:
    """The same, but the row leaks only the first time on each path (a rerun does not reproduce it)."""
    return _stripping_campaign(_network_lab, leak_backend, once=True, inner_port=ONCE_INNER_PORT,
                               front_port=ONCE_FRONT_PORT)


def test_the_stripping_proxy_removes_every_nonce() -> None:
    payload = with_nonce(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n", NONCE)
    assert strip_nonces(payload) == b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n"
    assert strip_nonces(b"POST / HTTP/1.1\r\nContent-Length: 20\r\n\r\n" + NONCE.encode()).endswith(
        b"sbx-xxxxxxxxxxxxxxxx")


def test_a_leak_without_a_nonce_is_blamed_on_the_row_that_reproduces_it_alone(
        stripped_leak: dict[str, tuple[Judgement, Exchange]]) -> None:
    judgements = {test_id: judgement for test_id, (judgement, _seen) in stripped_leak.items()}
    leaked = {f"{ABSOLUTE}-{LEAKED_ROW}", f"{TUNNEL}-{LEAKED_ROW}"}
    assert set(_failed(judgements)) == leaked, _failed(judgements)
    absolute = judgements[f"{ABSOLUTE}-{LEAKED_ROW}"].reason
    assert "Host: 11.0.0.10, 10.0.0.1" in absolute and "reproduced when this attempt was rerun alone" in absolute, \
        absolute
    assert "also blamed" not in absolute, absolute
    tunnel = judgements[f"{TUNNEL}-{LEAKED_ROW}"].reason
    assert "Host: inference.local, inference.local" in tunnel, tunnel
    assert "reproduced when this attempt was rerun alone" in tunnel and "also blamed" not in tunnel, tunnel


def test_the_stripped_leak_was_first_blamed_on_neighbours_in_flight(
        _network_lab: NetworkLab, stripped_leak: dict[str, tuple[Judgement, Exchange]]) -> None:
    """Not a vacuous pass: the leak arrived while other attempts were in flight, so only the reruns
    (windows ``...#aloneN``) can have cleared them; the leaked row was rerun on both paths."""
    windows = _network_lab.upstream_ledger.windows
    for path in PATHS:
        mine = next(w for w in reversed(windows) if w.key.endswith(f"/{path}-{LEAKED_ROW}"))
        campaign = mine.key.partition("/")[0]
        reruns = [w.key for w in windows if w.key.partition("/")[0] == campaign and "#alone" in w.key]
        assert any(key.startswith(mine.key + "#alone") for key in reruns), (path, reruns)
        assert len({key.partition("#")[0] for key in reruns}) >= 2, reruns  # innocent neighbours rerun too


def test_a_leak_no_rerun_reproduces_stays_blamed_on_every_suspect(
        stripped_leak_once: dict[str, tuple[Judgement, Exchange]]) -> None:
    judgements = {test_id: judgement for test_id, (judgement, _seen) in stripped_leak_once.items()}
    failed = _failed(judgements)
    for path in PATHS:
        row = f"{path}-{LEAKED_ROW}"
        assert row in failed, failed
        reason = judgements[row].reason
        assert "no rerun alone reproduced it" in reason and "also blamed on" in reason, reason
    # Sound over precise: the neighbours blamed with it fail too, each saying why.
    assert len(failed) > 2, failed
    for test_id, reason in failed.items():
        assert "no rerun alone reproduced it" in reason, (test_id, reason)


def _seen(address: str, line: bytes, at: float, *owners: str) -> Sighting:
    return Sighting(address, stream_address(address), line, at, frozenset(owners))


# Every suspect rerun once, in rounds a second apart (ends at 1, 2, 3): a spill of 0.5 s joins none of them.
ONCE = {"a": [1.0], "b": [2.0], "c": [3.0]}
EVERYWHERE = dict.fromkeys("abcxy", frozenset({"10.0.0.1", "11.0.0.10"}))


def test_reruns_keep_the_blame_on_the_suspects_that_reproduce_it_and_never_drop_a_leak() -> None:
    leak = _Blind(("hit", 7), "10.0.0.1", b"helloGET /secret HTTP/1.1", frozenset({"a", "b", "c"}))
    byteless = _Blind(("hit", 8), "10.0.0.1", b"", frozenset({"a", "b"}))
    piece = _Blind(("piece", 0), "11.0.0.10:80", b"GET /secret HTTP/1.1", frozenset({"b", "c"}))
    found = [_seen("10.0.0.1", b"helloGET /secret HTTP/1.1", 2.1, "b"),
             _seen("10.0.0.1", b"GET /other HTTP/1.1", 3.1, "c"),
             _seen("11.0.0.10:80", b"GET /elsewhere HTTP/1.1", 3.2, "c")]
    narrowed, confirmed, missing, unsure = reproduced_by([leak, byteless, piece], found, ONCE, EVERYWHERE, 0.5)
    assert narrowed == {("hit", 7): frozenset({"b"}), ("hit", 8): frozenset({"b"})}
    assert confirmed == narrowed and not unsure
    # Nobody reproduced the piece (c reached the origin with another request): every suspect keeps it.
    assert missing == {("piece", 0)}
    # A suspect that was not rerun is never cleared.
    narrowed, _confirmed, missing, _unsure = reproduced_by([leak], found, {"b": [2.0]}, EVERYWHERE, 0.5)
    assert narrowed == {("hit", 7): frozenset({"a", "b", "c"})} and not missing


def test_a_late_leak_landing_in_the_next_round_clears_nobody_until_confirmed() -> None:
    """The flake's shape: a's rerun ended at 1.0 and its leak came 0.7 s later, in b's round (b ended at 1.6),
    which attributed it to b. Within the spill (2 s) either can have caused it: nothing is taken off a, and
    both are rerun again (unsure) until a rerun reproduces it unmistakably."""
    leak = _Blind(("piece", 0), "11.0.0.10:80", b"GET /secret HTTP/1.1", frozenset({"a", "b", "c"}))
    spilled = [_seen("11.0.0.10:80", b"GET /secret HTTP/1.1", 1.7, "b")]
    ends = {"a": [1.0], "b": [1.6], "c": [-1.0]}  # c's round was read long before
    narrowed, confirmed, missing, unsure = reproduced_by([leak], spilled, ends, EVERYWHERE, 2.0)
    assert not narrowed and not confirmed and missing == {("piece", 0)}  # stays on every suspect
    assert unsure == {"a", "b"}
    # The spill counts only on its destination: a rerun on another one cannot have caused it.
    elsewhere = {**EVERYWHERE, "a": frozenset({"backend b"})}
    assert reproduced_by([leak], spilled, ends, elsewhere, 2.0)[1] == {("piece", 0): frozenset({"b"})}
    # Confirmation: a's rerun alone (after every earlier rerun's spill) reproduces it; b's two more do not.
    again = [*spilled, _seen("11.0.0.10:80", b"GET /secret HTTP/1.1", 5.3, "a")]
    narrowed, confirmed, missing, unsure = reproduced_by(
        [leak], again, {"a": [1.0, 5.0], "b": [1.6, 7.5, 10.0], "c": [-1.0]}, EVERYWHERE, 2.0)
    assert confirmed == {("piece", 0): frozenset({"a"})} and narrowed == confirmed and not missing
    # b rerun only once more so far: still unsure, so it keeps the blame "together with" a.
    narrowed, confirmed, _missing, unsure = reproduced_by(
        [leak], again, {"a": [1.0, 5.0], "b": [1.6, 7.5], "c": [-1.0]}, EVERYWHERE, 2.0)
    assert narrowed == {("piece", 0): frozenset({"a", "b"})} and confirmed[("piece", 0)] == {"a"} and unsure == {"b"}


def test_reruns_go_only_to_suspects_whose_verdict_clearing_can_change() -> None:
    """Blame never turns a failure into a pass: a suspect that fails on its own evidence is not rerun to
    be cleared, and evidence all of whose suspects fail anyway costs no rerun at all."""
    moot = _Blind(("piece", 0), "11.0.0.10:80", b"POST /upload HTTP/1.1", frozenset({"x", "y"}))
    wide = _Blind(("piece", 1), "11.0.0.10:80", b"GET /a HTTP/1.1", frozenset({"a", "b", "c", "x"}))
    narrow = _Blind(("hit", 2), "10.0.0.1", b"GET /b HTTP/1.1", frozenset({"c", "y"}))
    known = frozenset({"a", "b", "c", "x", "y"})
    settled, first, beyond, idle = first_reruns([moot, wide, narrow], frozenset({"a", "b", "c"}), known, budget=10)
    assert idle == [moot] and not beyond
    assert settled == [narrow, wide]  # fewest needed suspects first
    assert first == ["c", "a", "b"]  # each needed suspect once; x and y fail anyway
    # The budget counts reruns: evidence whose needed suspects do not fit stays blamed on all of them.
    settled, first, beyond, idle = first_reruns([moot, wide, narrow], frozenset({"a", "b", "c"}), known, budget=2)
    assert settled == [narrow] and first == ["c"] and beyond == [wide]


def test_the_cause_looked_for_first_is_the_attempt_whose_bytes_hold_what_arrived() -> None:
    item = _Blind(("piece", 0), "11.0.0.10:80", b"GET /smuggled HTTP/1.1", frozenset({"a", "b", "c", "d"}))
    payloads = {"a": b"POST / HTTP/1.1\r\n\r\n",
                "b": b"POST / HTTP/1.1\r\n\r\nGET http://11.0.0.10/smuggled HTTP/1.1\r\n\r\n",
                "c": b"POST / HTTP/1.1\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
                "d": b"GET / HTTP/1.1\r\n\r\n"}
    # The request line as written first, then its target (a proxy rewrites absolute-form), then the rest.
    assert likely_causes_first(item, payloads, payloads) == ["c", "b", "a", "d"]
    # One pick per open piece of evidence, never a key rerun already nor twice in a round.
    other = _Blind(("hit", 1), "10.0.0.1", b"GET /smuggled HTTP/1.1", frozenset({"c", "b"}))
    assert next_causes([item, other], set(), payloads) == ["c", "b"]
    assert next_causes([item, other], {"c", "b"}, payloads) == ["a"]
    assert next_causes([other], {"c", "b"}, payloads) == []


# --- load: a deadline shared with fifteen other attempts is measured again alone ---------------------------


def _sent(case_id: str, seen: Exchange) -> tuple[_Plan, _Sent]:
    attempt = next(a for a in build_attempts(paths=[ABSOLUTE]) if a.case.case_id == case_id)
    plan = _plan(attempt, "t/", origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, backend_name="backend b")
    return plan, _Sent(attempt, AttemptWindow(plan.key, plan.nonce, plan.destinations, 0.0, 1.0), seen, plan.allowed)


def test_only_an_attempt_whose_deadline_ran_out_before_its_answers_and_that_showed_no_leak_is_sent_again() -> None:
    control, denied = case_by_id("pipeline-safe-chunked-then-get"), case_by_id("routed-then-denied")
    assert control.reaches_backend == 2 and denied.reaches_backend == 1 and not denied.is_positive_control
    late = Exchange(statuses=(200,), closed=False, timed_out=True, follow_up=None)
    assert _needs_retry(*_sent(control.case_id, late))  # the second answer was late
    plan, item = _sent(denied.case_id, late)
    allowed_only = UpstreamSegment("11.0.0.10:80 connection 1", plan.payload.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert _needs_retry(plan, replace(item, seen=replace(late, upstream=(allowed_only,))))  # the refusal was late
    # Answered completely and left open: a real finding, not a late answer.
    assert not _needs_retry(plan, replace(item, seen=replace(late, statuses=(200, 403))))
    # The denied request reached upstream: a leak, whatever the deadline.
    leaked = UpstreamSegment("11.0.0.10:80 connection 1", plan.payload)
    assert not _needs_retry(plan, replace(item, seen=replace(late, upstream=(leaked,))))
    # The origin's answer relayed where the refusal belongs: a leak too.
    relayed = replace(late, statuses=(200, 200), marked=(True, True), timed_out=True)
    assert not _deadline_bound(denied, True, 2) and not _needs_retry(plan, replace(item, seen=relayed))
    assert not _needs_retry(*_sent(control.case_id, replace(late, timed_out=False)))


# --- a late forwarder whose lateness drifts: its rerun's leak lands in the next round ----------------------

DRIFT_INNER_PORT = 3196
DRIFT_FRONT_PORT = 3197


def _drift_attempts() -> list[SmugglingAttempt]:
    """The leaked row, four attributable denied rows sorting after it and two before (so the batch blames the
    leak on all of them and the rerun after the leaked row's is an innocent one's), and the control that shows
    the path carries the nonce."""
    plans = {a.case.case_id: _plan(a, "t/", origin=PUBLIC_ORIGIN, denied=DENIED_CANARY, backend_name="backend b")
             for a in build_attempts(paths=[ABSOLUTE])}
    denied = sorted(case_id for case_id, plan in plans.items() if plan.attributable and case_id != LEAKED_ROW
                    and not plan.attempt.case.is_positive_control and MARKERS[ABSOLUTE] not in plan.payload)
    after = [case_id for case_id in denied if case_id > LEAKED_ROW][:4]
    before = [case_id for case_id in denied if case_id < LEAKED_ROW][-2:]
    return [plans[case_id].attempt for case_id in ["pipeline-safe", *before, LEAKED_ROW, *after]]


@pytest.fixture(scope="module")
def drifting(_network_lab: NetworkLab) -> Iterator[tuple[dict[str, Judgement], dict[str, Judgement], list[float]]]:
    """The drifting forwarder and the reference it fronts, each over the same attempts: (its judgements, the
    reference's, when each of its late forwards was written)."""
    interception = interception_of(_network_lab)
    attempts = _drift_attempts()
    inner = start_proxy(_network_lab, lab_proxy_config(), port=DRIFT_INNER_PORT, interception=interception)
    try:
        front = DriftingForwarder(_network_lab, "127.0.0.1", DRIFT_FRONT_PORT, (inner.address, inner.port),
                                  marker=MARKERS[ABSOLUTE], default=(PUBLIC_ORIGIN, 80))
        try:
            results = run_smuggling_campaign(attempts, front.connect, _network_lab, interception.backend,
                                             interception.trust.cert_pem, origin=PUBLIC_ORIGIN,
                                             denied=DENIED_CANARY, timeout=TIMEOUT_SECONDS)
        finally:
            front.stop()
        reference = run_smuggling_campaign(attempts, inner.connect, _network_lab, interception.backend,
                                           interception.trust.cert_pem, origin=PUBLIC_ORIGIN,
                                           denied=DENIED_CANARY, timeout=TIMEOUT_SECONDS)
    finally:
        inner.stop()
    yield ({a.case.case_id: results[a.test_id][0] for a in attempts},
           {a.case.case_id: reference[a.test_id][0] for a in attempts}, front.forwarded)


def test_a_late_forwarder_whose_lateness_drifts_fails_exactly_the_row_it_leaks(drifting) -> None:
    """Against isolation that trusts one rerun, the leaked row was BLOCKED (its rerun's forward landed in the
    next round and cleared it) and that round's innocent row failed instead. Now nothing is taken off a
    rerun whose leak can have landed later until it is rerun alone again: exactly the leaked row fails."""
    judgements, reference, _forwarded = drifting
    failed = {case_id: f"{j.verdict.value}: {j.reason}" for case_id, j in judgements.items() if not j.passed}
    assert set(failed) == {LEAKED_ROW}, failed
    reason = judgements[LEAKED_ROW].reason
    assert judgements[LEAKED_ROW].verdict is Verdict.ALLOWED, reason
    assert "Host: 11.0.0.10, 10.0.0.1" in reason and "reproduced when this attempt was rerun alone" in reason, reason
    assert "also blamed" not in reason, reason
    assert {case_id: j.verdict for case_id, j in reference.items() if not j.passed} == {}


def test_the_drifting_forward_landed_in_another_rows_round(_network_lab: NetworkLab, drifting) -> None:
    """Not a vacuous pass: the leaked row's first rerun alone reached nothing in its own round; its forward
    was written while the next rerun, another row's, was running or being waited for."""
    _judgements, _reference, forwarded = drifting
    windows = _network_lab.upstream_ledger.windows
    leaked = next(w for w in reversed(windows) if w.key.endswith(f"/{ABSOLUTE}-{LEAKED_ROW}")
                  and any(other.key.startswith(w.key + "#alone") for other in windows))
    campaign = leaked.key.partition("/")[0]
    reruns = sorted((w for w in windows if w.key.partition("/")[0] == campaign and "#alone" in w.key),
                    key=lambda w: w.begin)
    first = next(w for w in reruns if w.key.startswith(leaked.key + "#alone"))
    spilled = next(at for at in forwarded if at > first.end)
    assert spilled - first.end > GRACE_SECONDS, (spilled - first.end)
    following = reruns[reruns.index(first) + 1]
    assert not following.key.startswith(leaked.key) and following.begin < spilled, (following, spilled)
    assert len(forwarded) >= 3  # the campaign's, the first rerun's, a confirmation rerun's
