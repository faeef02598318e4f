"""Attributing every upstream byte to the attempt that caused it: nonces, pieces, the ledger, the audit.

Pure (no socket, no clock): streams and attempt windows are built by hand with explicit arrival
times. They pin what lets the smuggling campaign fail a proxy that forwards refused bytes late,
and name the right case: bytes carrying an attempt's nonce are that attempt's wherever and whenever
they arrive; bytes without one are blamed on every attempt that can have caused them; and bytes no
verdict judged are reported by the session-end audit.
"""

from __future__ import annotations

import h11
import pytest

from pytest_sandbox.catalogues.smuggling import SMUGGLING_CASES, render
from pytest_sandbox.http.framing import frame_pipeline
from pytest_sandbox.http.upstream import (
    ReceivedStream,
    UpstreamLedger,
    attribute_pieces,
    segments_of,
    split_pieces,
    stream_address,
    with_nonce,
)
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, AttemptWindow
from pytest_sandbox.probes.campaign import audit_upstream
from pytest_sandbox.probes.smuggling import tunnel_payload

NONCE = "sbx-0123456789abcdef"
A, B = "sbx-aaaaaaaaaaaaaaaa", "sbx-bbbbbbbbbbbbbbbb"
GRACE = 0.5


def _h11_events(data: bytes) -> list[object]:
    """What h11 (the weakened proxies' parser) makes of ``data``, the nonce field left out."""
    connection, events = h11.Connection(h11.SERVER), []
    try:
        connection.receive_data(data)
        while (event := connection.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
            if isinstance(event, h11.Request):
                events.append((event.method, event.target,
                               [(k, v) for k, v in event.headers if k != NONCE_HEADER.lower().encode()]))
            elif isinstance(event, h11.Data):
                events.append(bytes(event.data))
            else:
                events.append(type(event).__name__)
    except h11.RemoteProtocolError:
        events.append("error")
    return events


PAYLOADS = [(f"{path}-{case.case_id}", payload) for case in SMUGGLING_CASES for path, payload in (
    ("absolute", render(case, host="11.0.0.10", denied="10.0.0.1")), ("tunnel", tunnel_payload(case)))]


@pytest.mark.parametrize("payload", [payload for _, payload in PAYLOADS], ids=[name for name, _ in PAYLOADS])
def test_the_nonce_changes_nothing_a_case_tests(payload: bytes) -> None:
    """Take the nonce lines out and the catalogue's bytes are back, byte for byte; strict framing
    and h11 see the same requests, bodies and violation with and without it."""
    sent = with_nonce(payload, NONCE)
    assert NONCE.encode() in sent
    assert sent.replace(f"{NONCE_HEADER}: {NONCE}\r\n".encode(), b"").replace(
        f"{NONCE_HEADER}: {NONCE}\n".encode(), b"") == payload
    before, after = frame_pipeline(payload), frame_pipeline(sent)
    assert [(h.method, h.target, b) for h, b in before.requests] == [(h.method, h.target, b) for h, b in after.requests]
    assert (before.violation and before.violation.case) == (after.violation and after.violation.case)
    assert _h11_events(payload) == _h11_events(sent)


def test_the_nonce_rides_in_every_clean_request_and_after_a_connect_head() -> None:
    pipeline = b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\nGET http://d/secret HTTP/1.1\r\nHost: d\r\n\r\n"
    assert with_nonce(pipeline, NONCE).count(NONCE.encode()) == 2
    connect = b"CONNECT d:443 HTTP/1.1\r\nHost: d:443\r\n\r\nGET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n"
    assert with_nonce(connect, NONCE).count(NONCE.encode()) == 2


_N = f"{NONCE_HEADER}: {NONCE}\r\n".encode()
_CONNECT_HEAD = b"CONNECT h:80 HTTP/1.1\r\nHost: h:80\r\n"
_GET = b"GET http://d/secret HTTP/1.1\r\nHost: d\r\n"


@pytest.mark.parametrize(("payload", "expected"), [
    # The gap: the nonce used to land in the chunked body's last empty line only, and the GET
    # behind the body reached upstream without it. Now: a trailer field, and the GET's head.
    (_CONNECT_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + _GET + b"\r\n",
     _CONNECT_HEAD + b"Transfer-Encoding: chunked\r\n" + _N + b"\r\n5\r\nhello\r\n0\r\n" + _N + b"\r\n"
     + _GET + _N + b"\r\n"),
    # A trailer the body already has stays first.
    (_CONNECT_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\n" + _GET + b"\r\n",
     _CONNECT_HEAD + b"Transfer-Encoding: chunked\r\n" + _N + b"\r\n0\r\nX-T: 1\r\n" + _N + b"\r\n"
     + _GET + _N + b"\r\n"),
    # A Content-Length body is left byte for byte, empty lines inside it included.
    (_CONNECT_HEAD + b"Content-Length: 6\r\n\r\na\r\n\r\nb" + _GET + b"\r\n",
     _CONNECT_HEAD + b"Content-Length: 6\r\n" + _N + b"\r\na\r\n\r\nb" + _GET + _N + b"\r\n"),
    # No body: every request after the head gets it, empty lines between them stay empty.
    (_CONNECT_HEAD + b"\r\n" + _GET + b"\r\n\r\n" + _GET + b"\r\n",
     _CONNECT_HEAD + _N + b"\r\n" + _GET + _N + b"\r\n\r\n" + _GET + _N + b"\r\n"),
    # Bare LF heads get a bare LF nonce line.
    (_CONNECT_HEAD + b"\r\nGET / HTTP/1.1\nHost: d\n\n",
     _CONNECT_HEAD + _N + b"\r\nGET / HTTP/1.1\nHost: d\n" + _N.replace(b"\r\n", b"\n") + b"\n"),
], ids=["chunked-body-then-get", "chunked-body-with-trailer", "content-length-body", "two-requests", "bare-lf"])
def test_after_a_connect_head_every_request_the_bytes_can_become_carries_the_nonce(payload: bytes,
                                                                                   expected: bytes) -> None:
    assert with_nonce(payload, NONCE) == expected


def stream(data: bytes, arrivals: list[tuple[float, int]], listener: str = "11.0.0.10:80",
           connection: int = 1) -> ReceivedStream:
    return ReceivedStream(listener, connection, data, len(data), tuple(arrivals))


def window(key: str, nonce: str, begin: float, end: float, *destinations: str) -> AttemptWindow:
    return AttemptWindow(key, nonce, frozenset(destinations or ("11.0.0.10",)), begin, end)


def request(nonce: str | None, path: str = "/") -> bytes:
    field = f"{NONCE_HEADER}: {nonce}\r\n" if nonce else ""
    return f"GET {path} HTTP/1.1\r\nHost: 11.0.0.10\r\n{field}\r\n".encode()


def test_a_late_connection_carrying_an_attempts_nonce_is_that_attempts_alone() -> None:
    """The late forwarder's bytes arrive during the next attempt's window: the nonce decides."""
    windows = [window("first", A, 0.0, 0.1), window("second", B, 0.1, 0.5)]
    late = stream(request(A, "/smuggled"), [(0.3, len(request(A, "/smuggled")))], connection=2)
    pieces = split_pieces(late, 0, late.received, {A: "first", B: "second"})
    assert attribute_pieces(pieces, windows, GRACE) == [frozenset({"first"})]
    (segment,) = segments_of(zip(pieces, [frozenset({"first"})], strict=True), "first", ended=0.1)
    assert segment.where == "11.0.0.10:80 connection 2 (arrived 0.200 s after the attempt ended)"


def test_bytes_without_a_nonce_are_blamed_on_every_attempt_that_can_have_caused_them() -> None:
    windows = [window("first", A, 0.0, 0.1), window("second", B, 0.1, 0.5), window("later", "sbx-cccccccccccccccc",
                                                                                     0.9, 1.0)]
    bare = stream(request(None), [(0.3, len(request(None)))])
    pieces = split_pieces(bare, 0, bare.received, {A: "first", B: "second"})
    assert attribute_pieces(pieces, windows, GRACE) == [frozenset({"first", "second"})]
    (segment,) = segments_of(zip(pieces, [frozenset({"first", "second"})], strict=True), "second")
    assert "bytes without a nonce, also blamed on first" in segment.where


def test_a_connection_keeps_its_attempt_until_another_nonce_arrives() -> None:
    """Connection identity: the follow-up bytes without a nonce stay with the attempt that opened
    the connection; a pooled connection's next nonce starts the next attempt's piece."""
    first, more, second = request(A), request(None, "/more"), request(B)
    data = first + more + second
    arrivals = [(0.05, len(first)), (0.07, len(first + more)), (0.2, len(data))]
    pieces = split_pieces(stream(data, arrivals), 0, len(data), {A: "first", B: "second"})
    assert [(piece.data, piece.nonces) for piece in pieces] == [(first + more, frozenset({A})),
                                                               (second, frozenset({B}))]
    windows = [window("first", A, 0.0, 0.1), window("second", B, 0.1, 0.3)]
    assert attribute_pieces(pieces, windows, GRACE) == [frozenset({"first"}), frozenset({"second"})]


def test_the_ledger_reports_only_what_no_verdict_judged() -> None:
    early, late = request(A), request(None, "/late")
    data = early + late
    record = stream(data, [(0.05, len(early)), (2.0, len(data))])
    ledger = UpstreamLedger()
    ledger.register([window("smuggling1/absolute-te-cl", A, 0.0, 0.1)])
    (piece,) = split_pieces(record, 0, len(early), {A: "smuggling1/absolute-te-cl"})
    ledger.account(piece, frozenset({"smuggling1/absolute-te-cl"}))
    assert ledger.gaps(record) == [(len(early), len(data))]
    problem = audit_upstream(ledger, [record], grace=GRACE)
    assert problem is not None
    # The late bytes continue the attempt's connection: named with it, where they arrived and what they are.
    assert "11.0.0.10:80 connection 1" in problem and "smuggling1/absolute-te-cl" in problem
    assert "GET /late HTTP/1.1" in problem


def test_the_audit_ignores_other_tests_bytes_and_names_a_late_nonce() -> None:
    ledger = UpstreamLedger()
    ledger.register([window("smuggling1/tunnel-te-cl", A, 10.0, 10.1, "backend api.inference.test")])
    other = stream(request(None, "/v1/models"), [(30.0, 40)], listener="backend api.inference.test")
    assert audit_upstream(ledger, [other], grace=GRACE) is None  # another test's request, long after
    late = stream(request(A, "/v1/chat/completions"), [(30.0, 60)], listener="backend api.inference.test",
                  connection=2)
    problem = audit_upstream(ledger, [other, late], grace=GRACE)
    assert problem is not None and "backend api.inference.test connection 2" in problem
    assert "carries its nonce smuggling1/tunnel-te-cl" in problem and "connection 1," not in problem


def test_stream_address_names_the_listeners_address() -> None:
    assert stream_address("11.0.0.10:80") == "11.0.0.10"
    assert stream_address("[2600:9000::10]:80") == "2600:9000::10"
    assert stream_address("backend api.inference.test") == "backend api.inference.test"
