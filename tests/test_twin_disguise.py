"""The unmarked twin must look like any client's request, and every denial must have one.

Before this, the twin carried its nonce (``sbx-`` and 16 hex digits) in ``X-Request-ID`` and its path, so a
proxy that judged the marked requests plus those with an ``X-Request-ID`` field
(``RequestIdKeyedProxy``), or only requests whose bytes hold ``sbx-`` (``NonceTextKeyedProxy``), passed all
1244 SSRF tests. Now the twin's nonce is a UUID4 (``attribution.twin_nonce``), half the twins carry
``X-Request-ID`` and half do not (``probes.ssrf.twin_sends_request_id``), and nothing in a twin holds the
harness's text, while every twin sends curl's ``User-Agent`` and ``Accept`` (the marked probes send neither);
each of those proxies, one that judges only requests *without* ``X-Request-ID`` (``RequestIdAbsentKeyedProxy``)
and one that judges only requests without a ``User-Agent`` (``UserAgentAbsentKeyedProxy``, which passed all 1244
too), fails the twins it can tell apart, naming the marker. The keep-alive
follow-ups, Host-mismatch denials, mixed answers and rebinding names have twins too.

Every marked probe also asks for the close (``Connection: close``). A proxy that judged only CONNECTs, requests
asking for the close and later requests on a connection (``ConnectionCloseKeyedProxy``) passed all 1244 SSRF
tests while forwarding any client's first persistent request; now half the twins
(``probes.ssrf.twin_keeps_alive``, independent of the X-Request-ID half) are persistent requests, as curl's are, and
their refusal need not close (RFC 9112 §9.3), and that proxy fails them.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from broken_proxies.marker_keyed import (
    ConnectionCloseKeyedProxy,
    MarkerKeyedProxy,
    NonceTextKeyedProxy,
    RequestIdAbsentKeyedProxy,
    RequestIdKeyedProxy,
    UserAgentAbsentKeyedProxy,
    command,
)
from broken_proxies.weak_ssrf import start_weak_proxy
from ssrf_selection import catalogue_selection, failed_params, is_catalogues_own
from test_marker_keyed import FORWARDED, MARKER_HOLE, METADATA, REFUSED, SLICE

from pytest_sandbox.http.responses import parse_head
from pytest_sandbox.network.harness import start_proxy
from pytest_sandbox.network.lab.attribution import (
    AttemptWindow,
    CatchAllHit,
    attribute,
    find_nonce,
    new_nonce,
    nonce_positions,
    twin_nonce,
)
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.probes.ssrf import (
    ALL_FORMS,
    Attempt,
    build_attempts,
    send_attempt,
    twin_keeps_alive,
    twin_sends_request_id,
)
from pytest_sandbox.probes.ssrf_exchanges import (
    UNMARKED_SUFFIX,
    AttemptExchange,
    HostMismatchDenial,
    KeepAliveFollowUp,
    MixedAnswers,
    Rebinding,
    SsrfVerdict,
    custom_case,
    run_ssrf_campaign,
)
from pytest_sandbox.verdicts.judgement import Verdict
from pytest_sandbox.verdicts.ssrf import ProxyReply, judge_attempt, judge_with_unmarked_twin

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
EVERY_ATTEMPT = build_attempts(forms=ALL_FORMS)


def twin_has_request_id(attempt: Attempt) -> bool:
    """Whether the twin of ``attempt`` sends X-Request-ID (always where its path cannot carry the nonce)."""
    return twin_sends_request_id(attempt.test_id) or not attempt.nonce_in_path


def twin_is_persistent(attempt: Attempt) -> bool:
    """Whether the twin of ``attempt`` sends no ``Connection: close`` (a CONNECT never sends one, marked or not)."""
    return twin_keeps_alive(attempt.test_id) and attempt.form != "connect"


# --- what a twin looks like (pure) ------------------------------------------------------------------------


def test_a_twin_nonce_is_a_uuid4_that_attribution_reads_back_and_a_foreign_uuid_names_nothing():
    nonce = new_nonce()
    text = twin_nonce(nonce)
    assert UUID4.fullmatch(text) and uuid.UUID(text).version == 4 and "sbx" not in text
    assert twin_nonce(nonce) == text and twin_nonce(new_nonce()) != text
    assert find_nonce(f"GET /{text} HTTP/1.1".encode()) == nonce
    assert find_nonce(f"X-Request-ID: {text}".encode(), {nonce}) == nonce
    assert find_nonce(str(uuid.uuid4()).encode()) is None  # a proxy's own request id is not a twin
    other = new_nonce()
    assert nonce_positions(f"{uuid.uuid4()} {text} {other}".encode()) == [(37, nonce), (74, other)]


def test_a_canary_hit_carrying_a_twin_nonce_is_credited_to_that_twin_alone():
    marked, twin = new_nonce(), new_nonce()
    windows = [AttemptWindow("a", marked, frozenset({"169.254.169.254"}), 0.0, 1.0),
               AttemptWindow("a~unmarked", twin, frozenset({"169.254.169.254"}), 0.0, 1.0)]
    hit = CatchAllHit(0, 0.5, "169.254.169.254", 80, f"GET /{twin_nonce(twin)} HTTP/1.1\r\n\r\n".encode())
    attribution = attribute([hit], windows, 0.5)
    assert attribution.owners[0] == {"a~unmarked"} and attribution.exact == {0}


def test_no_twin_carries_the_harness_marker_or_nonce_text_and_each_carries_its_nonce():
    for attempt in EVERY_ATTEMPT:
        text = twin_nonce(new_nonce())
        request_id = twin_sends_request_id(attempt.test_id)
        sent = attempt.request_bytes(text, marked=False, request_id=request_id)
        if attempt.form == "connect":
            sent += attempt.unmarked_tunnel_request_bytes(text, request_id=request_id)
        assert b"sbx-" not in sent and b"X-Sandbox-Probe" not in sent and b"/sandbox-probe/" not in sent, sent
        assert text.encode() in sent, sent
        assert (b"X-Request-ID: " in sent) is twin_has_request_id(attempt), sent
        assert b"\r\nUser-Agent: curl/" in sent and b"\r\nAccept: */*\r\n" in sent, sent


def test_half_the_twins_are_persistent_requests_independently_of_x_request_id_and_every_marked_probe_asks_to_close():
    plain = [a for a in EVERY_ATTEMPT if a.form != "connect" and a.case.expected == "denied"]
    persistent = [a for a in plain if twin_is_persistent(a)]
    assert 0.4 < len(persistent) / len(plain) < 0.6, (len(persistent), len(plain))
    pairs = {(twin_is_persistent(a), twin_sends_request_id(a.test_id)) for a in plain}
    assert pairs == {(True, True), (True, False), (False, True), (False, False)}
    for attempt in plain:
        nonce = new_nonce()
        assert b"\r\nConnection: close\r\n" in attempt.request_bytes(nonce)
        twin = attempt.request_bytes(twin_nonce(nonce), marked=False, keep_alive=twin_is_persistent(attempt))
        assert (b"\r\nConnection:" not in twin) is twin_is_persistent(attempt), twin


def _answer_and_keep_open(answer: bytes) -> tuple[socket.socket, socket.socket, threading.Thread]:
    """A socket pair whose far end reads one request head, writes ``answer`` and keeps the connection open
    (a proxy that keeps a persistent connection after its refusal); the caller closes both ends."""
    near, far = socket.socketpair()

    def serve() -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = far.recv(4096)
            if not chunk:
                return
            received += chunk
        far.sendall(answer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    return near, far, server


KEPT_OPEN_REFUSAL = b'HTTP/1.1 403 Forbidden\r\ncontent-length: 24\r\n\r\n{"error":"ssrf_denied"}\n'


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent-twin", "asks-to-close"])
def test_a_refusal_that_keeps_a_persistent_connection_open_is_a_refusal_but_not_after_connection_close(persistent):
    """RFC 9112 §9.3: after answering a persistent request a proxy may keep the connection; a request that asked
    for the close must see it (network.md §5). The persistent twin is read to its answer's framed end."""
    attempt = next(a for a in EVERY_ATTEMPT if a.form == "absolute" and a.case.expected == "denied")
    sock, far, server = _answer_and_keep_open(KEPT_OPEN_REFUSAL)
    try:
        reply = send_attempt(sock, attempt, 1.0, nonce=twin_nonce(new_nonce()), marked=False, keep_alive=persistent)
    finally:
        sock.close()
        server.join(5)
        far.close()
    assert reply.proxy.status == 403 and not reply.closed
    assert reply.timed_out is not persistent, reply  # asked to close: read to the deadline, as before
    judgement = judge_attempt(attempt, reply, {})
    expected = Verdict.BLOCKED if persistent else Verdict.INDETERMINATE
    assert judgement.verdict is expected, judgement
    assert ("kept alive" in reply.describe()) is persistent, reply.describe()


def test_half_the_twins_carry_x_request_id_and_half_do_not():
    with_path = [a for a in EVERY_ATTEMPT if a.nonce_in_path and a.case.expected == "denied"]
    carrying = sum(twin_sends_request_id(a.test_id) for a in with_path)
    assert 0.4 < carrying / len(with_path) < 0.6, (carrying, len(with_path))


# --- the judge on a twin that could not be judged (pure) ------------------------------------------------


def test_a_refusal_whose_twin_timed_out_is_indeterminate_and_says_the_twin_could_not_be_judged():
    held = ProxyReply(parse_head(b""), None, closed=False, timed_out=True)
    judgement = judge_with_unmarked_twin(METADATA, REFUSED, held, {})
    assert judgement.verdict is Verdict.INDETERMINATE, judgement
    assert "could not be judged" in judgement.reason and MARKER_HOLE not in judgement.reason, judgement


def test_a_marked_timeout_whose_twin_was_let_through_is_allowed():
    held = ProxyReply(parse_head(b""), None, closed=False, timed_out=True)
    judgement = judge_with_unmarked_twin(METADATA, held, FORWARDED, {})
    assert judgement.verdict is Verdict.ALLOWED and "without the harness's marker" in judgement.reason, judgement


# --- the fakes, in process ------------------------------------------------------------------------------

EXCHANGES = [AttemptExchange(a) for a in SLICE]
BY_KEY = {a.test_id: a for a in SLICE}


@pytest.fixture(scope="module")
def policy_refused(_network_lab) -> set[str]:
    """The slice's denials the reference refuses by policy (403, not as malformed): all pass there."""
    reference = start_proxy(_network_lab, port=3171)
    try:
        verdicts = run_ssrf_campaign(_network_lab, reference.connect, EXCHANGES)
    finally:
        reference.stop()
    assert all(v.judgement.passed for v in verdicts.values()), [v.judgement for v in verdicts.values()
                                                                 if not v.judgement.passed]
    refused = {key for key, v in verdicts.items() if "ssrf_denied" in v.judgement.observed}
    assert len(refused) >= 40, refused
    return refused


def failures(verdicts: dict[str, SsrfVerdict]) -> dict[str, SsrfVerdict]:
    return {key: v for key, v in verdicts.items() if not v.judgement.passed}


@needs_netns
@pytest.mark.parametrize(("proxy_class", "port", "fails"), [
    (RequestIdKeyedProxy, 3172, lambda attempt: not twin_has_request_id(attempt)),
    (RequestIdAbsentKeyedProxy, 3173, twin_has_request_id),
    (NonceTextKeyedProxy, 3174, lambda attempt: True),
    (UserAgentAbsentKeyedProxy, 3178, lambda attempt: True),
    (ConnectionCloseKeyedProxy, 3179, twin_is_persistent),
], ids=["request-id-keyed", "request-id-absent-keyed", "nonce-text-keyed", "user-agent-absent-keyed",
        "connection-close-keyed"])
def test_a_proxy_that_tells_the_twin_apart_fails_the_twins_it_lets_through(_network_lab, policy_refused,
                                                                            proxy_class, port, fails):
    running = start_weak_proxy(_network_lab, proxy_class, port)
    try:
        # The twins alone: a bare twin (tests/test_bare_twins.py) would fail a random sample of the others too.
        verdicts = run_ssrf_campaign(_network_lab, running.connect, EXCHANGES, bare=())
    finally:
        running.stop()
    failed = failures(verdicts)
    expected = {key for key in policy_refused if fails(BY_KEY[key])}
    assert expected, "the slice must hold twins this proxy lets through"
    assert set(failed) == expected, (sorted(set(failed) ^ expected), proxy_class.__name__)
    for key, verdict in failed.items():
        assert verdict.judgement.verdict is Verdict.ALLOWED and MARKER_HOLE in verdict.judgement.reason, (key, verdict)
    controls = [v for v in verdicts.values() if v.category == "ssrf-controls"]
    assert controls and all(v.judgement.verdict is Verdict.WORKS for v in controls)


# The exchanges beyond the catalogue (as conformance/test_ssrf.py builds them).
BEYOND = (
    KeepAliveFollowUp(custom_case("metadata", "169.254.169.254", "169.254.169.254", "metadata after an allowed "
                                  "request", kind="literal")),
    KeepAliveFollowUp(custom_case("localhost-name", "localhost", "127.0.0.1", "loopback name after a request")),
    HostMismatchDenial(Attempt(custom_case("host-mismatch-private-target", "127.0.0.1", "127.0.0.1",
                                           "private target, public Host", kind="literal"), "absolute")),
    HostMismatchDenial(Attempt(custom_case("host-mismatch-private-connect", "169.254.169.254", "169.254.169.254",
                                           "CONNECT to metadata, public Host", kind="literal"), "connect")),
    *(MixedAnswers(a) for a in build_attempts((
        custom_case("mixed-public-first", "mixed-public-first.lab.test", "10.0.0.1", "11.0.0.10 then 10.0.0.1"),
        custom_case("mixed-metadata", "mixed-metadata.lab.test", "169.254.169.254", "11.0.0.11 then 169.254.169.254"),
    ))),
    *(Rebinding(form) for form in ("connect", "absolute", "keepalive")),
)


@needs_netns
def test_every_denial_beyond_the_catalogue_has_a_twin_and_fails_a_marker_keyed_proxy(_network_lab):
    """Before their twins, all of these passed against MarkerKeyedProxy (15 of 15 in conformance)."""
    assert all(e.unmarked_twin() is not None and e.unmarked_twin().key == e.key + UNMARKED_SUFFIX for e in BEYOND)
    reference = start_proxy(_network_lab, port=3175)
    try:
        verdicts = run_ssrf_campaign(_network_lab, reference.connect, list(BEYOND))
    finally:
        reference.stop()
    assert set(verdicts) == {e.key for e in BEYOND}
    assert all(v.judgement.verdict is Verdict.BLOCKED for v in verdicts.values()), verdicts
    assert all("without the marker" in v.judgement.observed for v in verdicts.values()), verdicts
    for proxy_class, port in ((MarkerKeyedProxy, 3176), (NonceTextKeyedProxy, 3177)):
        running = start_weak_proxy(_network_lab, proxy_class, port)
        try:
            verdicts = run_ssrf_campaign(_network_lab, running.connect, list(BEYOND))
        finally:
            running.stop()
        for key, verdict in verdicts.items():
            assert verdict.judgement.verdict is Verdict.ALLOWED, (proxy_class.__name__, key, verdict.judgement)
            assert MARKER_HOLE in verdict.judgement.reason or "without the harness's marker" in \
                verdict.judgement.reason, (proxy_class.__name__, key, verdict.judgement)


# --- as a third party, through the conformance module ---------------------------------------------------

# Two metadata cases (connect and absolute form refused by policy; the other forms as malformed, marked or not):
# the first's twins carry no X-Request-ID, the second's do; and a positive control.
SELECTION = ("meta-imds-169", "meta-aws-ecs", "ctl-v4-private-10-above")
SELECTED = [a for a in EVERY_ATTEMPT if any(name in a.test_id for name in SELECTION) and is_catalogues_own(a.case)]


@needs_netns
@pytest.mark.parametrize("keyed_on", ["request-id", "no-request-id", "nonce-text", "connection-close"])
def test_conformance_run_against_a_proxy_that_tells_the_twin_apart_fails_and_names_the_marker(keyed_on):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly", "-rf", "--sandbox",
         "--sandbox-proxy-cmd", command(keyed_on), str(ROOT / "conformance" / "test_ssrf.py"),
         "-k", catalogue_selection(" or ".join(SELECTION))],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    refused = [a for a in SELECTED if a.case.expected == "denied" and a.form in ("connect", "absolute")]
    assert {twin_has_request_id(a) for a in refused} == {True, False}
    assert {twin_is_persistent(a) for a in refused} == {True, False}
    # Every refused denial selected here also sends a bare twin (fewer than BARE_TWIN_SAMPLE are selected), and a
    # proxy that judges only requests with X-Request-ID lets the bare twin through whatever its twin carried.
    lets_through = {"request-id": lambda a: True, "no-request-id": twin_has_request_id,
                    "nonce-text": lambda a: True, "connection-close": twin_is_persistent}[keyed_on]
    expected = {a.test_id for a in refused if lets_through(a)}
    failed = failed_params(output)
    assert failed == expected, output
    assert f"{len(expected)} failed, {len(SELECTED) - len(expected)} passed" in output, output
    assert MARKER_HOLE in output and "reached canary 169.254.1" in output, output
