"""The upstream evidence of the smuggling verdicts: raw bytes, strict reading, marks, and the pure judge.

The judging tests use no socket: an :class:`Exchange` is built by hand. They pin the rule that made
a byte-relaying proxy earn BLOCKED impossible: a denied case passes only if the refusal is the
proxy's own (no origin mark) and what reached upstream is exactly the allowed requests or nothing.
The fake backend's raw record is tested last, over TLS on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from pytest_sandbox.catalogues.smuggling import case_by_id, render
from pytest_sandbox.http.responses import ParsedResponse, parse_responses
from pytest_sandbox.http.upstream import (
    MARK_HEADER,
    STREAM_RECORD_LIMIT,
    ReceivedStream,
    UpstreamRequest,
    UpstreamSegment,
    allowed_prefix,
    assess,
    new_segments,
    origin_form,
    read_upstream,
    received_counts,
    shown,
)
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend, RecordedRequest
from pytest_sandbox.probes.smuggling import ABSOLUTE, TUNNEL, SmugglingAttempt, build_attempts
from pytest_sandbox.verdicts.inference import judge_backend_record
from pytest_sandbox.verdicts.judgement import Verdict
from pytest_sandbox.verdicts.smuggling import Exchange, judge_exchange

ORIGIN = "11.0.0.10"
DENIED = "10.0.0.1"
WHERE = "11.0.0.10:80 connection 1"
GET_ROOT = b"GET / HTTP/1.1\r\nHost: 11.0.0.10\r\n\r\n"
GET_SECRET = b"GET /secret HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"
FOLLOW_UP = b"GET /follow-up HTTP/1.1\r\nHost: 11.0.0.10\r\n\r\n"


def segment(data: bytes, where: str = WHERE, truncated: bool = False) -> UpstreamSegment:
    return UpstreamSegment(where, data, truncated)


def allowed(case_id: str, path: str = ABSOLUTE) -> tuple[UpstreamRequest, ...]:
    return SmugglingAttempt(case_by_id(case_id), path).allowed(origin=ORIGIN, denied=DENIED)


def refused(status: int, *upstream: UpstreamSegment, ordinary: int = 0, marked_refusal: bool = False,
            follow_up: int | None = None, closed: bool = True) -> Exchange:
    """``ordinary`` marked 200s from the origin, then ``status`` (the proxy's, unless ``marked_refusal``)."""
    return Exchange((200,) * ordinary + (status,), closed, not closed, follow_up, tuple(upstream),
                    marked=(True,) * ordinary + (marked_refusal,))


# --- recording and reading upstream bytes -----------------------------------------------------------


def test_new_segments_are_the_bytes_each_connection_received_since_the_snapshot() -> None:
    before = received_counts([ReceivedStream("o:80", 1, b"old", 3), ReceivedStream("o:80", 2, b"quiet", 5)])
    after = [ReceivedStream("o:80", 1, b"old+new", 7), ReceivedStream("o:80", 2, b"quiet", 5),
             ReceivedStream("o:80", 3, b"x" * 4, 9)]
    assert new_segments(before, after) == (UpstreamSegment("o:80 connection 1", b"+new", False),
                                           UpstreamSegment("o:80 connection 3", b"xxxx", True))


def test_reading_frames_strictly_and_keeps_every_byte_that_is_not_a_request() -> None:
    chunked = b"POST http://11.0.0.10/upload?a=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" \
              b"5\r\nhello\r\n0\r\n\r\n"
    reading = read_upstream([segment(chunked + GET_ROOT + b"GET /par"),
                             segment(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nGET / HTTP/1.1", "c2"),
                             segment(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                                     "c3"),
                             segment(GET_ROOT, "c4", truncated=True)])
    assert reading.requests == (UpstreamRequest("POST", "/upload?a=1", b"hello"), UpstreamRequest("GET", "/"),
                                UpstreamRequest("CONNECT", "a:443"), UpstreamRequest("GET", "/"))
    assert [(leftover.where, leftover.data, leftover.incomplete) for leftover in reading.leftovers] == [
        (WHERE, b"GET /par", True), ("c2", b"GET / HTTP/1.1", False),
        ("c3", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", False),
        ("c4", b"", False)]
    assert "cl-duplicate" in reading.leftovers[2].why and "truncated" in reading.leftovers[3].why


def test_absolute_form_compares_as_origin_form() -> None:
    assert origin_form("http://11.0.0.10/") == "/"
    assert origin_form("http://[2600:9000::10]:80") == "/"
    assert origin_form("http://h/p?q=1") == "/p?q=1"
    assert origin_form("/v1/models?follow-up") == "/v1/models?follow-up"


def test_an_incomplete_request_is_a_leak_only_once_every_allowed_request_is_complete() -> None:
    get = (UpstreamRequest("GET", "/"),)
    reading = read_upstream([segment(b"GET / HTTP/1.1\r\nHo")])
    streaming = assess(reading.requests, reading.leftovers, get)
    assert streaming.leak == "" and streaming.missing == get and streaming.pending == reading.leftovers
    reading = read_upstream([segment(GET_ROOT + b"GET /se")])
    assert "an incomplete request: b'GET /se'" in assess(reading.requests, reading.leftovers, get).leak
    assert assess(reading.requests, reading.leftovers, get, leak_incomplete=False).leak == ""


def test_shown_quotes_at_most_a_bounded_prefix() -> None:
    assert shown(b"abc") == "b'abc'"
    assert shown(b"x" * 500, 4) == "b'xxxx'... (500 bytes)"


@pytest.mark.parametrize("attempt", build_attempts(), ids=lambda attempt: attempt.test_id)
def test_every_catalogue_case_begins_with_exactly_its_allowed_requests_cleanly_framed(attempt) -> None:
    requests = attempt.allowed(origin=ORIGIN, denied=DENIED)
    assert len(requests) == attempt.case.reaches_backend
    assert all(request.target.startswith("/") for request in requests)


def test_allowed_prefix_refuses_a_payload_without_enough_clean_requests() -> None:
    with pytest.raises(ValueError, match="fewer than the 1 it allows"):
        allowed_prefix(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 1)


# --- the judge: what a relay that checks nothing produces is never BLOCKED --------------------------


DENIED_ATTEMPTS = [attempt for attempt in build_attempts() if not attempt.case.is_positive_control]


@pytest.mark.parametrize("attempt", DENIED_ATTEMPTS, ids=lambda attempt: attempt.test_id)
def test_payload_forwarded_verbatim_and_refused_by_the_origin_is_allowed_naming_the_bytes(attempt) -> None:
    """The issue's raw relay: every byte reached the origin, whose parser answered 400 (marked)."""
    payload = attempt.payload(origin=ORIGIN, denied=DENIED)
    seen = refused(400, segment(payload), ordinary=attempt.case.reaches_backend, marked_refusal=True)
    judgement = judge_exchange(attempt.case, seen, attempt.allowed(origin=ORIGIN, denied=DENIED))
    assert judgement.verdict is Verdict.ALLOWED, judgement.reason
    assert judgement.reason.startswith(f"{attempt.case.case_id}: ")
    assert "beyond the" in judgement.reason


@pytest.mark.parametrize("case_id", ["te-kelvin-sign", "te-xchunked", "cl-duplicate-different"])
def test_the_issues_examples_name_the_case_and_the_bytes(case_id: str) -> None:
    payload = render(case_by_id(case_id), host=ORIGIN, denied=DENIED)
    judgement = judge_exchange(case_by_id(case_id), refused(400, segment(payload), marked_refusal=True))
    assert judgement.reason.startswith(f"{case_id}: bytes beyond the 0 allowed request(s) reached {WHERE}: "
                                       "not strictly framed")
    assert repr(payload[:40])[:-1] in judgement.reason


def test_a_refusal_carrying_the_origins_mark_is_the_origins_answer_relayed() -> None:
    """Even with nothing left in the record (a proxy that rewrote what it sent), a marked refusal
    proves the request reached the origin."""
    judgement = judge_exchange(case_by_id("cl-te-both"), refused(400, marked_refusal=True))
    assert judgement.verdict is Verdict.ALLOWED
    assert "carries the origin's mark" in judgement.reason


def test_the_proxys_own_refusal_after_exactly_the_allowed_request_is_blocked() -> None:
    case = case_by_id("routed-then-denied")
    judgement = judge_exchange(case, refused(403, segment(GET_ROOT), ordinary=1), allowed("routed-then-denied"))
    assert judgement.verdict is Verdict.BLOCKED, judgement.reason
    assert "not one byte more" in judgement.reason


def test_allowed_requests_split_over_two_upstream_connections_still_count() -> None:
    case = case_by_id("head-too-large-after-good-request")
    seen = refused(431, segment(b"", "c0"), segment(GET_ROOT, "c1"), ordinary=1)
    assert judge_exchange(case, seen, allowed(case.case_id)).verdict is Verdict.BLOCKED


def test_a_denied_request_behind_the_allowed_one_is_allowed() -> None:
    judgement = judge_exchange(case_by_id("routed-then-denied"), refused(403, segment(GET_ROOT + GET_SECRET),
                                                                        ordinary=1), allowed("routed-then-denied"))
    assert judgement.verdict is Verdict.ALLOWED
    assert "1 request(s) beyond the 1 allowed request(s) reached upstream: ['GET /secret']" in judgement.reason


def test_an_allowed_request_with_another_body_is_a_smuggled_request() -> None:
    """CL.TE in miniature: the origin got the POST, but with a body the client never framed so."""
    case = case_by_id("body-then-denied")
    desynced = b"POST /upload HTTP/1.1\r\nHost: 11.0.0.10\r\nContent-Length: 3\r\n\r\nhel"
    judgement = judge_exchange(case, refused(403, segment(desynced), ordinary=1), allowed(case.case_id))
    assert judgement.verdict is Verdict.ALLOWED
    assert "POST /upload body b'hel'" in judgement.reason


def test_an_allowed_request_still_incomplete_upstream_is_not_a_pass() -> None:
    case = case_by_id("body-then-denied")
    head_only = b"POST /upload HTTP/1.1\r\nHost: 11.0.0.10\r\nContent-Length: 5\r\n\r\nhe"
    judgement = judge_exchange(case, refused(403, segment(head_only), ordinary=1), allowed(case.case_id))
    assert judgement.verdict is Verdict.INDETERMINATE
    assert "0 of the 1 allowed request(s) complete" in judgement.reason


def test_bytes_after_the_complete_allowed_requests_are_allowed_even_incomplete() -> None:
    judgement = judge_exchange(case_by_id("routed-then-denied"),
                               refused(403, segment(GET_ROOT + b"GET /sec"), ordinary=1), allowed("routed-then-denied"))
    assert judgement.verdict is Verdict.ALLOWED and "an incomplete request: b'GET /sec'" in judgement.reason


def test_a_truncated_record_is_more_than_any_catalogue_case_allows() -> None:
    judgement = judge_exchange(case_by_id("cl-te-both"), refused(400, segment(b"", truncated=True)))
    assert judgement.verdict is Verdict.ALLOWED
    assert f"more than {STREAM_RECORD_LIMIT} bytes arrived" in judgement.reason


def test_a_follow_up_forwarded_after_the_refusal_is_the_keep_alive_bug() -> None:
    case = case_by_id("routed-then-denied")
    seen = refused(403, segment(GET_ROOT + FOLLOW_UP), ordinary=1, closed=False)
    judgement = judge_exchange(case, seen, allowed(case.case_id))
    assert judgement.verdict is Verdict.ALLOWED
    assert "the follow-up request was forwarded upstream (answer: no answer" in judgement.reason


def test_a_stray_canary_connection_is_allowed_whatever_else_was_seen() -> None:
    seen = Exchange((403,), True, False, None, stray="canary 10.0.0.1 port 80 x1")
    judgement = judge_exchange(case_by_id("denied-connect-with-trailing-bytes"), seen)
    assert judgement.verdict is Verdict.ALLOWED and "canary 10.0.0.1 port 80 x1" in judgement.reason


def test_a_tunnel_that_cannot_be_opened_is_no_pass_and_breaks_the_controls() -> None:
    failed = Exchange((), True, False, None, error="the tunnel could not be opened: 502")
    denied = judge_exchange(case_by_id("cl-te-both"), failed)
    assert denied.verdict is Verdict.INDETERMINATE and "the tunnel could not be opened" in denied.reason
    control = judge_exchange(case_by_id("te-uppercase-chunked"), failed, allowed("te-uppercase-chunked", TUNNEL))
    assert control.verdict is Verdict.BROKEN


def test_the_judge_refuses_an_allowed_list_that_disagrees_with_the_catalogue() -> None:
    with pytest.raises(ValueError, match="the catalogue says 1"):
        judge_exchange(case_by_id("routed-then-denied"), refused(403))


# --- positive controls ------------------------------------------------------------------------------


def control(case_id: str, *upstream: UpstreamSegment, follow_up: int | None = 200) -> tuple[Verdict, str]:
    case = case_by_id(case_id)
    seen = Exchange((200,) * case.reaches_backend, case.must_close, False, follow_up, tuple(upstream),
                    marked=(True,) * case.reaches_backend)
    judgement = judge_exchange(case, seen, allowed(case_id))
    return judgement.verdict, judgement.reason


def test_a_control_with_exactly_its_requests_and_the_follow_up_works() -> None:
    assert control("pipeline-safe", segment(GET_ROOT + GET_ROOT + FOLLOW_UP))[0] is Verdict.WORKS


def test_a_control_missing_a_request_upstream_is_broken() -> None:
    verdict, reason = control("pipeline-safe", segment(GET_ROOT + FOLLOW_UP))
    assert verdict is Verdict.BROKEN and "missing upstream ['GET /']" in reason


def test_a_control_whose_request_never_completed_upstream_is_broken_not_allowed() -> None:
    verdict, reason = control("te-uppercase-chunked", segment(b"POST /upload HTTP/1.1\r\nHost: 11.0.0.10\r\n"
                                                              b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel"))
    assert verdict is Verdict.BROKEN and "an incomplete request" in reason


def test_a_control_with_an_extra_request_upstream_is_allowed() -> None:
    verdict, reason = control("pipeline-safe", segment(GET_ROOT + GET_ROOT + GET_SECRET + FOLLOW_UP))
    assert verdict is Verdict.ALLOWED and "GET /secret" in reason


# --- the backend's whole record ---------------------------------------------------------------------


ROUTED = RecordedRequest("GET", "/v1/models", (("authorization", "Bearer key"),), b"")


def test_backend_record_with_bytes_its_parser_never_framed_is_allowed() -> None:
    clean = ReceivedStream("backend b", 1, b"GET /v1/models HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer key\r\n\r\n",
                           60)
    garbage = ReceivedStream("backend b", 2, b"POST /x HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", 51)
    assert judge_backend_record([ROUTED], "key", streams=[clean]).verdict is Verdict.BLOCKED
    judgement = judge_backend_record([ROUTED], "key", streams=[clean, garbage])
    assert judgement.verdict is Verdict.ALLOWED
    assert "backend b connection 2: not strictly framed" in judgement.reason and "xchunked" in judgement.reason


# --- the fake backend keeps every byte and marks its answers (TLS on 127.0.0.1) --------------------


@pytest.fixture
def backend() -> Iterator[tuple[FakeInferenceBackend, int]]:
    server = FakeInferenceBackend("api.inference.test", "key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server.start_in_thread(listener)
    try:
        yield server, port
    finally:
        server.stop()


def exchange_with(server: FakeInferenceBackend, port: int, data: bytes, count: int) -> list[ParsedResponse]:
    context = ssl.create_default_context(cadata=server.ca_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=server.name) as tls:
        tls.sendall(data)
        received = b""
        while len(parse_responses(received)[0]) < count:
            chunk = tls.recv(65536)
            if not chunk:
                break
            received += chunk
    return parse_responses(received)[0]


def test_backend_marks_every_answer_and_answers_unframeable_bytes_without_refusing(backend) -> None:
    server, port = backend
    routed = b"GET /v1/models HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer key\r\n\r\n"
    smuggled = b"POST /v1/chat/completions HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chun\xe2\x84\xaaed\r\n\r\nhello"
    responses = exchange_with(server, port, routed + smuggled, count=2)
    assert [r.status for r in responses] == [200, 200]
    assert all(r.carries(server.mark) for r in responses)
    assert json.loads(responses[1].body)["lab"].startswith("could not frame the request")
    assert [r.path for r in server.requests] == ["/v1/models"]
    [stream] = server.received_streams()
    assert stream.data == routed + smuggled and not stream.truncated
    assert stream.listener == "backend api.inference.test"
    assert len(server.mark) == 32 and server.mark != FakeInferenceBackend().mark
    assert MARK_HEADER == "X-Lab-Mark"


def test_backend_keeps_recording_after_it_could_not_frame(backend) -> None:
    """Bytes sent after the unframeable ones still land in the record (nothing goes unseen)."""
    server, port = backend
    context = ssl.create_default_context(cadata=server.ca_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=server.name) as tls:
        tls.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert b"x-lab-unframed: 1" in tls.recv(65536)
        tls.sendall(b"GET /admin HTTP/1.1\r\nHost: b\r\n\r\n")
        deadline = time.monotonic() + 5
        while b"/admin" not in server.received_streams()[0].data and time.monotonic() < deadline:
            time.sleep(0.01)
    assert server.received_streams()[0].data.endswith(b"GET /admin HTTP/1.1\r\nHost: b\r\n\r\n")
    assert server.requests == []
