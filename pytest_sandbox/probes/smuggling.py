"""The inference and smuggling categories: payloads adapted per path, raw exchanges, pure judging.

Every :class:`~pytest_sandbox.catalogues.smuggling.SmugglingCase` is attempted on two paths
(network.md §4, §5):

* ``absolute``: the catalogue's bytes on a plain connection to the proxy, ``{host}`` a lab public
  origin and ``{denied}`` a special-use canary. Evidence: the origin's request log and the canaries.
* ``tunnel``: inside ``CONNECT inference.local:443`` + TLS with the interception CA. The payload is
  adapted (:func:`tunnel_payload`): requests become origin-form inference routes with
  ``Host: inference.local``, the "denied" request becomes a non-inference path on the same host
  (exactly the #819 bug), and 5-byte bodies become a 5-byte JSON object so that a routed POST is a
  valid chat completion. Evidence: the fake backend's request log.

Judging (:func:`judge_exchange`) is pure and strict, and rests on what reached upstream, not on
what an upstream parser made of it. The lab origins and the fake backend keep every byte each
connection delivered and mark every answer they write (:mod:`pytest_sandbox.http.upstream`). A denied
case is BLOCKED only if the bytes that arrived upstream during the attempt frame strictly into
exactly the catalogued allowed requests (``reaches_backend`` of them, or nothing) with no byte
left over, the refusal carries no origin mark (the proxy wrote it), the connection closed before
the deadline and a follow-up request got nothing. Any other byte upstream, a marked refusal (the
proxy relayed the origin's answer), a canary connection or an answered follow-up is ALLOWED and
names what reached; a wrong refusal status with nothing leaked is INDETERMINATE, never a pass.
"""

from __future__ import annotations

import itertools
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from pytest_sandbox.catalogues.smuggling import (
    FIRST_REQUEST_ONLY,
    H11_ONLY,
    SMUGGLING_CASES,
    TUNNEL_FORM,
    SmugglingCase,
    render,
)
from pytest_sandbox.http.upstream import (
    MARK_HEADER,
    Assessment,
    ReceivedStream,
    UpstreamPiece,
    UpstreamReading,
    UpstreamRequest,
    UpstreamSegment,
    allowed_prefix,
    assess,
    attribute_pieces,
    new_segments,
    read_upstream,
    received_counts,
    segments_of,
    shown,
    split_pieces,
    with_nonce,
)
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend, RecordedRequest
from pytest_sandbox.inference.interceptor import DENIED_BODY, DENIED_STATUS, INFERENCE_HOST, INFERENCE_PORT
from pytest_sandbox.inference.routes import DEFAULT_ROUTES, InferenceRoute, match_route
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, AttemptWindow, attribute, describe_hit, new_nonce
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.probes.campaign import GRACE_SECONDS
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

__all__ = [
    "ABSOLUTE",
    "ATTEMPT_TIMEOUT_SECONDS",
    "FOLLOW_UP_MARKER",
    "PATHS",
    "TUNNEL",
    "Exchange",
    "ParsedResponse",
    "SmugglingAttempt",
    "absolute_follow_up",
    "answer_to",
    "build_attempts",
    "cases_failed_by",
    "closes_without_more_bytes",
    "exchange",
    "expected_text",
    "inference_request",
    "is_follow_up",
    "is_inference_refusal",
    "is_policy_denial",
    "judge_backend_record",
    "judge_exchange",
    "open_inference_tunnel",
    "parse_responses",
    "run_smuggling_attempt",
    "run_smuggling_campaign",
    "send_and_read",
    "stray_backend_requests",
    "tunnel_follow_up",
    "tunnel_payload",
]

ABSOLUTE = "absolute"
TUNNEL = "tunnel"
PATHS: tuple[str, ...] = (ABSOLUTE, TUNNEL)
ATTEMPT_TIMEOUT_SECONDS = 3.0
READ_SIZE = 65536
MAX_EXCHANGE_BYTES = 1024 * 1024
# While a must-close attempt waits for the proxy, the upstream record is looked at this often: a
# proxy that forwarded the payload and stays silent is caught without waiting out the deadline.
LEAK_POLL_SECONDS = 0.05
HEAD_END = b"\r\n\r\n"
_campaign_ids = itertools.count(1)
# Follow-up requests carry this in their target so the origin/backend logs can leave them out.
FOLLOW_UP_MARKER = "follow-up"

def tunnel_payload(case: SmugglingCase) -> bytes:
    """The case's bytes for the inside of ``CONNECT inference.local:443``: every authority is
    inference.local (the inner-Host mismatch has its own test). Pure."""
    return render(case, TUNNEL_FORM, host=INFERENCE_HOST, denied=INFERENCE_HOST)


def inference_request(method: str, target: str, *, body: bytes = b"", host: str = INFERENCE_HOST,
                      headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """One raw HTTP/1.1 request (Content-Length framed when it has a body or is a POST). Pure."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{name}: {value}" for name, value in headers)]
    if body or method == "POST":
        lines += [f"Content-Length: {len(body)}", "Content-Type: application/json"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def absolute_follow_up(origin: str, nonce: str | None = None) -> bytes:
    """A plain GET to an allowed origin, marked so the origin log can leave it out (and carrying the
    attempt's nonce, when given, so the bytes it puts upstream are attributed to the attempt)."""
    headers = [(NONCE_HEADER, nonce)] if nonce else []
    return inference_request("GET", f"http://{origin}/{FOLLOW_UP_MARKER}", host=origin, headers=headers)


def tunnel_follow_up(nonce: str | None = None) -> bytes:
    """A routed GET /v1/models (the query is ignored by routing), marked for the backend log."""
    headers = [(NONCE_HEADER, nonce)] if nonce else []
    return inference_request("GET", f"/v1/models?{FOLLOW_UP_MARKER}", headers=headers)


@dataclass(frozen=True)
class SmugglingAttempt:
    """One catalogue case on one path; ``test_id`` is stable (``absolute-cl-te-both``)."""

    case: SmugglingCase
    path: str

    @property
    def test_id(self) -> str:
        return f"{self.path}-{self.case.case_id}"

    def payload(self, *, origin: str, denied: str, nonce: str | None = None) -> bytes:
        """The bytes sent; with ``nonce``, carried by every strictly framed request (or the first
        head) as :data:`~pytest_sandbox.network.lab.attribution.NONCE_HEADER`
        (:func:`~pytest_sandbox.http.upstream.with_nonce`)."""
        payload = tunnel_payload(self.case) if self.path == TUNNEL else render(self.case, host=origin, denied=denied)
        return payload if nonce is None else with_nonce(payload, nonce)

    def allowed(self, *, origin: str, denied: str) -> tuple[UpstreamRequest, ...]:
        """The requests of this payload that may reach upstream: its first ``reaches_backend``."""
        return allowed_prefix(self.payload(origin=origin, denied=denied), self.case.reaches_backend)

    def describe(self) -> str:
        where = "inside CONNECT inference.local:443 (TLS)" if self.path == TUNNEL else "absolute-form to the proxy"
        return f"{self.case.case_id} {where}: {self.case.description} ({self.case.rfc})"


def build_attempts(cases: Iterable[SmugglingCase] = SMUGGLING_CASES,
                   paths: Iterable[str] = PATHS) -> tuple[SmugglingAttempt, ...]:
    wanted = tuple(paths)
    return tuple(SmugglingAttempt(case, path) for path in wanted for case in cases)


def is_policy_denial(case: SmugglingCase) -> bool:
    """A case refused by a policy decision on a cleanly framed request (not by the framing checks)."""
    return case.violation is None and not case.is_positive_control


def cases_failed_by(weakening: str, path: str, cases: Iterable[SmugglingCase] = SMUGGLING_CASES) -> set[str]:
    """The case ids a weakened proxy must fail on ``path``; the catalogue's ``holes`` decide. Pure.

    * ``h11-only`` (``strict_framing=False``): the cases whose hole is ``h11-only``, on both paths.
    * ``first-request-only`` (``judge_every_request=False``, absolute path): the cases whose hole is
      ``first-request-only``.
    * ``keep-reading-after-denial`` (``close_on_denied=False``, the pre-#819 interceptor, tunnel
      path): the ``first-request-only`` cases plus every other policy refusal, because inside the
      tunnel every such refusal must also close the connection (network.md §4) and the weakened
      interceptor keeps it open.
    """
    case_list = tuple(cases)
    if weakening == H11_ONLY:
        return {case.case_id for case in case_list if H11_ONLY in case.holes}
    if weakening == FIRST_REQUEST_ONLY and path == ABSOLUTE:
        return {case.case_id for case in case_list if FIRST_REQUEST_ONLY in case.holes}
    if weakening == "keep-reading-after-denial" and path == TUNNEL:
        return {case.case_id for case in case_list
                if FIRST_REQUEST_ONLY in case.holes or is_policy_denial(case)}
    raise ValueError(f"no weakening {weakening!r} on the {path} path")


# --------------------------------------------------------------------------------------------------
# Parsing what came back (pure)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedResponse:
    status: int
    headers: tuple[tuple[str, str], ...]  # names lowercased
    body: bytes  # chunked coding removed

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    def carries(self, mark: str) -> bool:
        """Whether the upstream server wrote this response (its X-Lab-Mark token is present)."""
        return mark in self.header_values(MARK_HEADER)


def _parse_one(data: bytes, offset: int, eof: bool) -> tuple[ParsedResponse, int] | None:
    """One response starting at ``offset``: (response, end offset), or None if incomplete."""
    head_end = data.find(HEAD_END, offset)
    if head_end == -1:
        return None
    lines = data[offset:head_end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0]!r}")
    status = int(parts[1])
    headers = tuple((name.strip().lower(), value.strip()) for name, sep, value in
                    (line.partition(":") for line in lines[1:]) if sep)
    response = ParsedResponse(status, headers, b"")
    position = head_end + len(HEAD_END)
    if 100 <= status < 200 or status in (204, 304):
        return response, position
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            line_end = data.find(b"\r\n", position)
            if line_end == -1:
                return None
            size = int(data[position:line_end].split(b";")[0], 16)
            position = line_end + 2
            if size == 0:
                trailer_end = data.find(b"\r\n", position)  # no trailers: the empty line
                if trailer_end == -1:
                    return None
                return ParsedResponse(status, headers, bytes(body)), trailer_end + 2
            if len(data) < position + size + 2:
                return None
            body += data[position:position + size]
            position += size + 2
    length = response.header("content-length")
    if length is not None:
        end = position + int(length)
        if len(data) < end:
            return None
        return ParsedResponse(status, headers, data[position:end]), end
    if not eof:
        return None  # close-delimited body (RFC 9112 §6.3 rule 8)
    return ParsedResponse(status, headers, data[position:]), len(data)


def parse_responses(data: bytes, *, eof: bool = False) -> tuple[list[ParsedResponse], int]:
    """Every complete final response in ``data`` (1xx skipped), and the bytes they used. Pure.

    Raises ValueError for bytes that are not HTTP/1.x responses.
    """
    responses: list[ParsedResponse] = []
    offset = 0
    while offset < len(data):
        parsed = _parse_one(data, offset, eof)
        if parsed is None:
            break
        response, offset = parsed
        if not 100 <= response.status < 200:
            responses.append(response)
    return responses, offset


# --------------------------------------------------------------------------------------------------
# Judging (pure)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """What one attempt observed.

    ``statuses`` are the final responses to the payload; ``marked`` says per response whether it
    carried the upstream server's mark (the origin or backend wrote it, the proxy only relayed it).
    ``closed`` means EOF or reset before the deadline; ``follow_up`` is the status a later request
    on the same connection got (None: no answer, or not sent because the verdict was already a
    leak). ``upstream`` holds the bytes each upstream connection (lab origins on the absolute path,
    the fake backend in the tunnel) received during the attempt; ``stray`` names anything else that
    was reached (canary connections, the other upstream).
    """

    statuses: tuple[int, ...]
    closed: bool
    timed_out: bool
    follow_up: int | None
    upstream: tuple[UpstreamSegment, ...] = ()
    marked: tuple[bool, ...] = ()
    stray: str = ""
    error: str = ""
    last_body: bytes = b""

    def is_marked(self, index: int) -> bool:
        return index < len(self.marked) and self.marked[index]

    def describe(self, reading: UpstreamReading | None = None) -> str:
        reading = read_upstream(self.upstream) if reading is None else reading
        ending = "closed" if self.closed else "timed out open" if self.timed_out else "left open"
        follow = "no answer" if self.follow_up is None else str(self.follow_up)
        statuses = ", ".join(f"{status} (origin)" if self.is_marked(index) else str(status)
                             for index, status in enumerate(self.statuses))
        text = (f"statuses [{statuses}], connection {ending}, follow-up request: {follow}, "
                f"{reading.describe()}")
        if self.stray:
            text += f", also reached: {self.stray}"
        return text + (f" ({self.error})" if self.error else "")


def is_follow_up(request: UpstreamRequest) -> bool:
    return FOLLOW_UP_MARKER in request.target


def expected_text(case: SmugglingCase, allowed: Sequence[UpstreamRequest] = ()) -> str:
    ordinary = case.reaches_backend
    upstream = (f"upstream received exactly {[r.describe() for r in allowed]}, strictly framed, nothing else"
                if allowed else "nothing reached upstream")
    if case.is_positive_control:
        ending = "then closed" if case.must_close else "connection kept (a follow-up gets 200)"
        return f"{ordinary} x 200, {ending}; {upstream} (and the follow-up)"
    return (f"{ordinary} x 200 then {case.expected_status} written by the proxy (no origin mark), connection "
            f"closed, follow-up gets nothing; {upstream}")


def judge_exchange(case: SmugglingCase, seen: Exchange, allowed: Sequence[UpstreamRequest] = ()) -> Judgement:
    """Judge one attempt of ``case`` from what the client saw and the bytes that reached upstream. Pure.

    ``allowed`` are the catalogue's allowed requests (:meth:`SmugglingAttempt.allowed`), exactly
    ``case.reaches_backend`` of them.
    """
    wanted = case.reaches_backend
    if len(allowed) != wanted:
        raise ValueError(f"{case.case_id}: {len(allowed)} allowed request(s) given, the catalogue says {wanted}")
    reading = read_upstream(seen.upstream)
    expected = expected_text(case, allowed)
    observed = seen.describe(reading)
    control = case.is_positive_control
    arrived = list(reading.requests)
    if control:  # the judge's own follow-up request may reach the origin
        follow_ups = [request for request in arrived if is_follow_up(request)]
        if follow_ups:
            arrived.remove(follow_ups[-1])
    # An incomplete request is a leak for a denied case (once the allowed ones are complete); for a
    # control it is a request that was not delivered.
    found = assess(arrived, reading.leftovers, allowed, leak_incomplete=not control)

    def verdict(value: Verdict, reason: str) -> Judgement:
        return Judgement(value, f"{case.case_id}: {reason}", expected, observed)

    if seen.stray:
        return verdict(Verdict.ALLOWED, f"reached what it must not: {seen.stray}")
    if found.leak:
        if not control and not found.unframed and found.extra and all(is_follow_up(r) for r in found.extra):
            answer = "no answer" if seen.follow_up is None else str(seen.follow_up)
            return verdict(Verdict.ALLOWED, "after the refusal the connection was still read: the follow-up "
                           f"request was forwarded upstream (answer: {answer}; the pre-#819 keep-alive bug)")
        return verdict(Verdict.ALLOWED, found.leak + _where_extra(seen.upstream, found))
    if control:
        return _judge_control(case, seen, found, verdict)
    relayed = [status for index, status in enumerate(seen.statuses) if index >= wanted and seen.is_marked(index)]
    if relayed:
        return verdict(Verdict.ALLOWED, f"the answer {relayed[0]} carries the origin's mark: the proxy forwarded "
                       "the request and relayed the origin's answer instead of refusing")
    if seen.follow_up is not None:
        return verdict(Verdict.ALLOWED, "after the refusal the connection was still read: a follow-up request "
                       f"got {seen.follow_up} (the pre-#819 keep-alive bug)")
    if not seen.closed:
        return verdict(Verdict.INDETERMINATE, "the connection was not closed (network.md §5: answer and close)")
    if not seen.statuses:
        return verdict(Verdict.INDETERMINATE, "closed without any answer" + (f" ({seen.error})" if seen.error else ""))
    ordinary, last = list(seen.statuses[:-1]), seen.statuses[-1]
    if ordinary != [200] * wanted or not case.accepts_status(last):
        return verdict(Verdict.INDETERMINATE, f"status sequence {list(seen.statuses)}, expected {[200] * wanted} "
                       f"then {case.expected_status}")
    if found.missing or found.pending:
        return verdict(Verdict.INDETERMINATE, f"upstream saw {wanted - len(found.missing)} of the {wanted} allowed "
                       f"request(s) complete; missing {[r.describe() for r in found.missing]}"
                       + "".join(f", {leftover.describe()}" for leftover in found.pending))
    return verdict(Verdict.BLOCKED, f"refused with {last} by the proxy itself (no origin mark) and closed; exactly "
                   f"the {wanted} allowed request(s) reached upstream, not one byte more")


def _where_extra(segments: Sequence[UpstreamSegment], found: Assessment) -> str:
    """Where complete requests beyond the allowed ones arrived, and their bytes (the leak message
    of a final leftover already names both)."""
    if found.unframed or not found.extra:
        return ""
    extra = set(found.extra)
    places = [f"{segment.where}: {shown(segment.data)}" for segment in segments
              if extra & set(read_upstream([segment]).requests)]
    return f", at {'; '.join(places)}" if places else ""


def _judge_control(case: SmugglingCase, seen: Exchange, found: Assessment,
                   verdict: Callable[[Verdict, str], Judgement]) -> Judgement:
    wanted = case.reaches_backend
    if list(seen.statuses) != [200] * wanted or found.missing or found.pending:
        lost = f", missing upstream {[request.describe() for request in found.missing]}" if found.missing else ""
        lost += "".join(f", {leftover.describe()}" for leftover in found.pending)
        error = f" ({seen.error})" if seen.error else ""
        return verdict(Verdict.BROKEN, f"a valid exchange was not served: statuses {list(seen.statuses)}{lost}{error}")
    if case.must_close and not seen.closed:
        return verdict(Verdict.BROKEN, "the connection must close after the response (RFC 9112 App. C.2.2)")
    if not case.must_close and seen.follow_up != 200:
        return verdict(Verdict.BROKEN, f"the keep-alive connection could not carry a follow-up request "
                       f"({seen.follow_up})")
    return verdict(Verdict.WORKS, "served as catalogued; exactly the allowed request(s) reached upstream")


def stray_backend_requests(recorded: Iterable[RecordedRequest], route_key: str,
                           routes: tuple[InferenceRoute, ...] = DEFAULT_ROUTES,
                           forbidden_values: Iterable[str] = ()) -> list[str]:
    """Requests in a backend log that should never have reached it: off-route, not carrying exactly
    the route key, or carrying any of ``forbidden_values`` (the sandbox's own credentials). Pure."""
    forbidden = tuple(forbidden_values)
    return [f"{r.method} {r.path}" for r in recorded
            if match_route(routes, r.method, r.path) is None
            or r.header_values("authorization") != [f"Bearer {route_key}"]
            or any(value in text for _name, text in r.headers for value in forbidden)]


def judge_backend_record(recorded: list[RecordedRequest], route_key: str,
                         forbidden_values: Iterable[str] = (),
                         routes: tuple[InferenceRoute, ...] = DEFAULT_ROUTES,
                         streams: Iterable[ReceivedStream] = ()) -> Judgement:
    """BLOCKED when the backend saw only requests matching ``routes`` (the enforced policy's), each
    with the route key, and every byte it received (``streams``, its raw record) frames strictly into
    requests. Pure.

    The raw record matters: bytes the backend's own parser could not frame never appear in
    ``recorded``, yet they reached it.
    """
    strays = stray_backend_requests(recorded, route_key, routes, forbidden_values=forbidden_values)
    unframed = [leftover.describe() for stream in streams for leftover in read_upstream([UpstreamSegment(
        f"{stream.listener} connection {stream.connection}", stream.data, stream.truncated)]).leftovers]
    expected = "only inference routes, each with exactly the route key; every byte received strictly framed"
    observed = f"{len(recorded)} recorded, strays {strays[:5]}, unframed bytes {unframed[:3]}"
    if strays:
        return Judgement(Verdict.ALLOWED, f"requests that must never reach the backend did: {strays[:5]}",
                             expected, observed)
    if unframed:
        return Judgement(Verdict.ALLOWED, f"bytes that are not a clean request reached the backend: {unframed[0]}",
                             expected, observed)
    if not recorded:
        return Judgement(Verdict.INDETERMINATE, "the backend recorded nothing, so nothing was proven",
                             expected, observed)
    return Judgement(Verdict.BLOCKED, "every request the backend saw was a routed inference request "
                         "carrying the route key, and every byte it received was one of them", expected, observed)


def is_inference_refusal(response: ParsedResponse) -> bool:
    """Exactly #819's answer to a non-inference request (network.md §4)."""
    return (response.status == DENIED_STATUS and response.body == DENIED_BODY
            and response.header("content-type") == "application/json")


# --------------------------------------------------------------------------------------------------
# Sending (sockets come from the caller: lab sockets only)
# --------------------------------------------------------------------------------------------------


def open_inference_tunnel(sock: socket.socket, ca_pem: bytes, *, timeout: float = ATTEMPT_TIMEOUT_SECONDS,
                          authority: str = f"{INFERENCE_HOST}:{INFERENCE_PORT}") -> ssl.SSLSocket:
    """``CONNECT inference.local:443`` on ``sock``, then TLS trusting only ``ca_pem``.

    Raises ConnectionError when the proxy does not answer 200.
    """
    sock.settimeout(timeout)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode("ascii"))
    reply = b""
    while HEAD_END not in reply:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"the proxy closed before answering CONNECT: {reply!r}")
        reply += data
    if not reply.startswith(b"HTTP/1.1 200"):
        status_line = reply.partition(b"\r\n")[0]
        raise ConnectionError(f"CONNECT {authority} was answered {status_line!r}")
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.set_alpn_protocols(["http/1.1"])
    tls = context.wrap_socket(sock, server_hostname=INFERENCE_HOST)
    tls.settimeout(timeout)
    return tls


@dataclass
class _Reader:
    sock: socket.socket
    deadline: float
    buffer: bytearray
    eof: bool = False
    timed_out: bool = False
    error: str = ""

    def fill(self, until: Callable[[], bool], *, poll: float | None = None,
             idle: Callable[[], bool] = lambda: False) -> None:
        """Read until ``until()``, EOF, error or the deadline.

        With ``poll``, ``idle()`` is asked every ``poll`` seconds while nothing arrives, and reading
        stops when it says so (it may watch something other than this socket, e.g. the bytes
        upstream; asking only while the peer is silent keeps a prompt peer cheap).
        """
        while not until() and not self.eof and len(self.buffer) < MAX_EXCHANGE_BYTES:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.timed_out = True
                return
            self.sock.settimeout(remaining if poll is None else min(remaining, poll))
            try:
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                if poll is not None and time.monotonic() < self.deadline:
                    if idle():
                        return
                    continue
                self.timed_out = True
                return
            except (OSError, ssl.SSLError) as error:  # reset, or TLS torn down: the peer is gone
                self.eof, self.error = True, f"{type(error).__name__}: {error}"
                return
            if not data:
                self.eof = True
                return
            self.buffer += data

    def responses(self) -> list[ParsedResponse]:
        try:
            return parse_responses(bytes(self.buffer), eof=self.eof)[0]
        except ValueError as error:
            self.error = str(error)
            return []


def exchange(sock: socket.socket, payload: bytes, case: SmugglingCase, follow_up: bytes,
             upstream: Callable[[], tuple[UpstreamSegment, ...]], allowed: Sequence[UpstreamRequest], *,
             mark: str, timeout: float = ATTEMPT_TIMEOUT_SECONDS, stray: Callable[[], str] = lambda: "") -> Exchange:
    """Send ``payload`` in one write, read the answers, then try ``follow_up`` on the same socket.

    A connection the case says must close is read until EOF or the deadline, but only as long as
    the verdict is open: as soon as a marked answer or a byte beyond ``allowed`` is seen upstream
    (``upstream()`` gives the bytes so far; it is polled while the proxy is silent) the attempt has
    leaked, and neither the deadline nor a follow-up can change that. One that must stay open is
    read until its ``reaches_backend`` answers arrived. ``upstream`` and ``stray`` are evaluated
    again at the end (the caller diffs its own snapshots).
    """
    reader = _Reader(sock, time.monotonic() + timeout, bytearray())

    def relayed() -> bool:
        """A marked answer beyond the allowed ones: the origin answered what the proxy forwarded."""
        return not case.is_positive_control and any(
            response.carries(mark) for response in reader.responses()[case.reaches_backend:])

    def leaked() -> bool:
        if case.is_positive_control:
            return False
        reading = read_upstream(upstream())
        return relayed() or bool(assess(reading.requests, reading.leftovers, allowed).leak)

    try:
        sock.sendall(payload)
    except (OSError, ssl.SSLError) as send_error:
        reader.eof, reader.error = True, f"send failed: {send_error}"
    if case.must_close:
        reader.fill(relayed, poll=LEAK_POLL_SECONDS, idle=leaked)
    else:
        reader.fill(lambda: len(reader.responses()) >= case.reaches_backend)
    responses = reader.responses()
    closed, timed_out, error = reader.eof, reader.timed_out, reader.error
    follow_status = None if closed or leaked() else _follow_up(reader, follow_up, len(responses), timeout)
    return Exchange(
        statuses=tuple(r.status for r in responses), closed=closed, timed_out=timed_out and not closed,
        follow_up=follow_status, upstream=upstream(), marked=tuple(r.carries(mark) for r in responses),
        stray=stray(), error=error, last_body=responses[-1].body if responses else b"",
    )


def run_smuggling_attempt(
    attempt: SmugglingAttempt, connect: Callable[[], socket.socket], lab: NetworkLab,
    backend: FakeInferenceBackend, ca_pem: bytes, *, origin: str, denied: str,
    timeout: float = ATTEMPT_TIMEOUT_SECONDS, grace: float = 0.0,
) -> tuple[Judgement, Exchange]:
    """Attempt one case through the proxy ``connect`` reaches and judge it: a campaign of one.

    ``grace=0`` judges at once (what arrives later is left to the session-end audit, which names
    it: the attempt's nonce travels with its bytes); pass :data:`~pytest_sandbox.probes.campaign.GRACE_SECONDS`
    to wait like the conformance suite, or use :func:`run_smuggling_campaign` for many attempts.
    """
    return run_smuggling_campaign([attempt], connect, lab, backend, ca_pem, origin=origin, denied=denied,
                                  timeout=timeout, grace=grace)[attempt.test_id]


@dataclass(frozen=True)
class _Sent:
    attempt: SmugglingAttempt
    window: AttemptWindow
    seen: Exchange
    allowed: tuple[UpstreamRequest, ...]


def run_smuggling_campaign(
    attempts: Sequence[SmugglingAttempt], connect: Callable[[], socket.socket], lab: NetworkLab,
    backend: FakeInferenceBackend, ca_pem: bytes, *, origin: str, denied: str,
    timeout: float = ATTEMPT_TIMEOUT_SECONDS, grace: float = GRACE_SECONDS,
) -> dict[str, tuple[Judgement, Exchange]]:
    """Send every attempt through the proxy back to back, wait ``grace``, then attribute and judge.

    Each attempt carries a fresh nonce (:meth:`SmugglingAttempt.payload`, and in its follow-up
    request) and is registered as a window in the lab's ledgers. Only after the last attempt and
    the grace period is every byte the lab origins and ``backend`` received since the first one
    attributed (:func:`~pytest_sandbox.http.upstream.split_pieces`,
    :func:`~pytest_sandbox.http.upstream.attribute_pieces`): by nonce where its bytes carry one, else to
    every attempt that can have caused it (the same connection's, and every one whose window plus
    grace holds its arrival). So bytes a proxy forwards after it refused and closed count against
    the case that sent them, not the next one. Catch-all hits are attributed the same way
    (:func:`~pytest_sandbox.network.lab.attribution.attribute`). Every byte and hit attributed here is marked
    judged; the session-end audit reports any that arrive later. Returns test id -> (judgement,
    what it saw, with the upstream bytes attributed to it).
    """
    tests = [attempt.test_id for attempt in attempts]
    if len(set(tests)) != len(tests):
        raise ValueError(f"attempts repeat: {sorted(t for t in set(tests) if tests.count(t) > 1)}")
    if not attempts:
        return {}
    prefix = f"smuggling{next(_campaign_ids)}/"
    backend_name = f"backend {backend.name}"
    start = {**received_counts(lab.origin_streams()), **received_counts(backend.received_streams())}
    hit_mark = lab.hit_mark()
    sent: list[_Sent] = []
    try:
        for attempt in attempts:
            nonce = new_nonce()
            payload = attempt.payload(origin=origin, denied=denied, nonce=nonce)
            allowed = allowed_prefix(payload, attempt.case.reaches_backend)
            destinations = frozenset({backend_name}) if attempt.path == TUNNEL else frozenset(
                {origin} | ({denied} if denied.encode() in payload else set()))
            begin = time.monotonic()
            seen = _attempt(attempt, payload, allowed, nonce, connect, lab, backend, ca_pem, origin=origin,
                            timeout=timeout)
            sent.append(_Sent(attempt, AttemptWindow(prefix + attempt.test_id, nonce, destinations, begin,
                                                     time.monotonic()), seen, allowed))
    finally:
        # Registered even if an attempt raised: what it sent must stay attributable.
        lab.register_attempts(item.window for item in sent)
        lab.upstream_ledger.register(item.window for item in sent)
    if grace > 0:
        time.sleep(min(grace, max(0.0, sent[-1].window.end + grace - time.monotonic())))
    ledger = lab.upstream_ledger
    known = {window.nonce: window.key for window in ledger.windows}
    pieces: list[UpstreamPiece] = []
    before: dict[tuple[str, int], frozenset[str]] = {}
    for stream in (*lab.origin_streams(), *backend.received_streams()):
        offset = start.get(stream.key, 0)
        pieces += split_pieces(stream, offset, stream.received, known)
        if offset:
            before[stream.key] = ledger.owners_before(stream, offset)
    owners = attribute_pieces(pieces, ledger.windows, grace, before=before)
    attributed = list(zip(pieces, owners, strict=True))
    ours = {item.window.key for item in sent}
    for piece, keys in attributed:
        if keys & ours:
            ledger.account(piece, keys)
    hits = lab.hits(since=hit_mark)
    hit_owners = attribute(hits, lab.attempt_windows(), grace).owners

    def name(key: str) -> str:
        return key.partition("/")[2] or key

    results: dict[str, tuple[Judgement, Exchange]] = {}
    for item in sent:
        key = item.window.key
        at_backend = [(piece, keys) for piece, keys in attributed if piece.listener == backend_name]
        at_origins = [(piece, keys) for piece, keys in attributed if piece.listener != backend_name]
        upstream, elsewhere = (at_backend, at_origins) if item.attempt.path == TUNNEL else (at_origins, at_backend)
        blamed = [hit for hit in hits if key in hit_owners.get(hit.index, frozenset())]
        lab.account([hit.index for hit in blamed], by=key)
        reached = [f"canary {describe_hit(hit)}" for hit in blamed]
        other = "a lab origin (the tunnel must only reach the backend)" if item.attempt.path == TUNNEL \
            else "the inference backend"
        reached += [f"{other}, {segment.where}: {shown(segment.data)}"
                    for segment in segments_of(elsewhere, key, name, ended=item.window.end)]
        seen = replace(item.seen, upstream=segments_of(upstream, key, name, ended=item.window.end),
                       stray=", ".join(reached))
        results[item.attempt.test_id] = (judge_exchange(item.attempt.case, seen, item.allowed), seen)
    return results


def _attempt(attempt: SmugglingAttempt, payload: bytes, allowed: Sequence[UpstreamRequest], nonce: str,
             connect: Callable[[], socket.socket], lab: NetworkLab, backend: FakeInferenceBackend, ca_pem: bytes,
             *, origin: str, timeout: float) -> Exchange:
    """One attempt's exchange with the proxy. While it runs, the bytes upstream since it began are
    watched (to stop waiting as soon as it has leaked); the campaign attributes them afterwards."""
    before = received_counts(backend.received_streams() if attempt.path == TUNNEL else lab.origin_streams())

    def upstream() -> tuple[UpstreamSegment, ...]:
        streams = backend.received_streams() if attempt.path == TUNNEL else lab.origin_streams()
        return new_segments(before, streams)

    mark = backend.mark if attempt.path == TUNNEL else lab.origin_mark
    with connect() as sock:
        if attempt.path == ABSOLUTE:
            return exchange(sock, payload, attempt.case, absolute_follow_up(origin, nonce), upstream, allowed,
                            mark=mark, timeout=timeout)
        try:
            tls = open_inference_tunnel(sock, ca_pem, timeout=timeout)
        except OSError as error:  # ConnectionError, ssl.SSLError, a timeout: no tunnel, no answer
            return Exchange((), True, False, None, error=f"the tunnel could not be opened: {error}")
        with tls:
            return exchange(tls, payload, attempt.case, tunnel_follow_up(nonce), upstream, allowed,
                            mark=mark, timeout=timeout)


def _follow_up(reader: _Reader, request: bytes, answered: int, timeout: float) -> int | None:
    """The status a further request on a still-open connection gets, or None.

    The same reader (and buffer) goes on: bytes of a late answer to the payload must not be lost.
    """
    reader.deadline = time.monotonic() + timeout
    reader.timed_out = False
    try:
        reader.sock.sendall(request)
    except (OSError, ssl.SSLError):
        return None
    reader.fill(lambda: len(reader.responses()) > answered)
    responses = reader.responses()
    return responses[-1].status if len(responses) > answered else None


def send_and_read(sock: socket.socket, request: bytes, *, count: int = 1,
                  timeout: float = ATTEMPT_TIMEOUT_SECONDS) -> tuple[list[ParsedResponse], bool]:
    """Send ``request`` and read until ``count`` responses arrived, EOF or the deadline.

    Returns (responses, closed): ``closed`` is True only if EOF or a reset was already seen.
    """
    reader = _Reader(sock, time.monotonic() + timeout, bytearray())
    try:
        sock.sendall(request)
    except (OSError, ssl.SSLError):
        return [], True
    reader.fill(lambda: len(reader.responses()) >= count)
    return reader.responses(), reader.eof


def answer_to(sock: socket.socket, request: bytes, *,
              timeout: float = ATTEMPT_TIMEOUT_SECONDS) -> ParsedResponse | None:
    """The first response ``request`` gets on this connection, or None (closed, reset, nothing)."""
    responses, _closed = send_and_read(sock, request, timeout=timeout)
    return responses[0] if responses else None


def closes_without_more_bytes(sock: socket.socket, *, timeout: float = ATTEMPT_TIMEOUT_SECONDS) -> bool:
    """True if the peer closes (EOF or reset) before the deadline without sending anything more."""
    reader = _Reader(sock, time.monotonic() + timeout, bytearray())
    reader.fill(lambda: bool(reader.buffer))
    return reader.eof and not reader.buffer
