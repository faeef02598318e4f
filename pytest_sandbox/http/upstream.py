"""What reached an upstream server, byte for byte, and how the smuggling judge reads it.

The lab's public origins (:mod:`pytest_sandbox.network.lab.lab`) and the fake inference backend
(:mod:`pytest_sandbox.inference.fake_backend`) are the servers *behind* the proxy under test. Each keeps
**every byte** it receives per connection (:class:`ReceivedStream`, bounded by a generous cap that is
recorded when reached), accepts anything (it never refuses on its own parse: its parser is not the
one under test), and marks every response it sends with :data:`MARK_HEADER` carrying a per-server
random token (:func:`new_mark`). The proxy never learns the token before it relays a marked
response, so a response without it was written by the proxy itself.

The judge diffs the streams around one attempt (:func:`new_segments`) and frames what arrived with
the proxy's own strict framing (:func:`pytest_sandbox.http.framing.frame_pipeline`,
:func:`read_upstream`): the smuggling verdicts then rest on the bytes that reached the origin, not on
what the origin's parser made of them. Everything here is pure.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pytest_sandbox.http.framing import MAX_HEAD_BYTES, frame_pipeline

__all__ = [
    "MARK_HEADER",
    "SHOWN_BYTES",
    "STREAM_RECORD_LIMIT",
    "Assessment",
    "Leftover",
    "ReceivedStream",
    "UpstreamReading",
    "UpstreamRequest",
    "UpstreamSegment",
    "allowed_prefix",
    "assess",
    "compare_requests",
    "new_mark",
    "new_segments",
    "origin_form",
    "read_upstream",
    "received_counts",
    "shown",
]

# The header every response of an upstream lab server carries: "X-Lab-Mark: <token>".
MARK_HEADER = "X-Lab-Mark"
# Per connection: far above any catalogue payload (the largest is ~13 KiB) and any inference
# request the suites send; beyond it the stream is marked truncated (and judged as more than allowed).
STREAM_RECORD_LIMIT = 1024 * 1024
# How many bytes of a stray byte string a verdict quotes.
SHOWN_BYTES = 160
# Upstream heads are framed with a looser size limit than the proxy's 8 KiB: a proxy may add fields
# (Via, X-Forwarded-For) to an allowed request; an oversized head is still never an allowed request.
UPSTREAM_MAX_HEAD = 4 * MAX_HEAD_BYTES

StreamKey = tuple[str, int]  # (listener, 1-based connection index on it)


def new_mark() -> str:
    """A fresh 128-bit token for :data:`MARK_HEADER` (one per lab / backend)."""
    return secrets.token_hex(16)


def shown(data: bytes, limit: int = SHOWN_BYTES) -> str:
    """``repr`` of at most ``limit`` bytes of ``data``, saying how many there were in all."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes)"


@dataclass(frozen=True)
class ReceivedStream:
    """Every byte one connection to an upstream lab server delivered, up to a cap.

    ``listener`` names the server (``"11.0.0.10:80"``), ``connection`` is the 1-based index of the
    connection on it, ``data`` the first ``len(data)`` bytes received, ``received`` how many arrived
    in all (more than ``len(data)``: the record was truncated at the cap).
    """

    listener: str
    connection: int
    data: bytes
    received: int

    @property
    def key(self) -> StreamKey:
        return (self.listener, self.connection)

    @property
    def truncated(self) -> bool:
        return self.received > len(self.data)


@dataclass(frozen=True)
class UpstreamSegment:
    """The bytes one upstream connection received during one attempt."""

    where: str  # "11.0.0.10:80 connection 3"
    data: bytes
    truncated: bool = False  # more arrived than the record kept


def received_counts(streams: Iterable[ReceivedStream]) -> dict[StreamKey, int]:
    """A snapshot to diff against later: bytes received so far per connection."""
    return {stream.key: stream.received for stream in streams}


def new_segments(before: Mapping[StreamKey, int], streams: Iterable[ReceivedStream]) -> tuple[UpstreamSegment, ...]:
    """The bytes each connection received since ``before`` (connections opened since included)."""
    segments = []
    for stream in streams:
        start = before.get(stream.key, 0)
        if stream.received > start:
            segments.append(UpstreamSegment(f"{stream.listener} connection {stream.connection}",
                                            stream.data[start:], stream.truncated))
    return tuple(segments)


@dataclass(frozen=True)
class UpstreamRequest:
    """A request as the judge compares it: method, origin-form target, decoded body.

    Header fields are not compared: a proxy legitimately rewrites them (Via, X-Forwarded-For,
    hop-by-hop fields; the inference interceptor replaces Host and Authorization).
    """

    method: str
    target: str  # origin-form (RFC 9112 §3.2.1); an absolute-form target is reduced to it
    body: bytes = b""

    def describe(self) -> str:
        body = f" body {shown(self.body, 40)}" if self.body else ""
        return f"{self.method} {self.target}{body}"


def origin_form(target: str) -> str:
    """``http://host/path?q`` -> ``/path?q`` (RFC 9112 §3.2.2: same resource); others unchanged."""
    if "://" not in target:
        return target
    parts = urlsplit(target)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


@dataclass(frozen=True)
class Leftover:
    """Upstream bytes that are not a complete strictly framed request.

    ``incomplete``: the start of a request whose end has not arrived (yet); every other leftover is
    final (bytes after a framing violation, after a CONNECT head, or past the record's cap) and can
    never become an allowed request.
    """

    where: str
    data: bytes
    why: str
    incomplete: bool = False

    def describe(self) -> str:
        return f"{self.where}: {self.why}: {shown(self.data)}"


@dataclass(frozen=True)
class UpstreamReading:
    """Upstream bytes framed strictly: the complete requests, and every byte that is not one."""

    requests: tuple[UpstreamRequest, ...]
    leftovers: tuple[Leftover, ...]

    @property
    def empty(self) -> bool:
        return not self.requests and not self.leftovers

    def describe(self) -> str:
        if self.empty:
            return "nothing reached upstream"
        parts = [f"{len(self.requests)} request(s) {[r.describe() for r in self.requests]}"] if self.requests else []
        parts += [leftover.describe() for leftover in self.leftovers]
        return "upstream received " + "; ".join(parts)


def read_upstream(segments: Iterable[UpstreamSegment]) -> UpstreamReading:
    """Frame each segment with the proxy's strict framing. Pure."""
    requests: list[UpstreamRequest] = []
    leftovers: list[Leftover] = []
    for segment in segments:
        framed = frame_pipeline(segment.data, max_head=UPSTREAM_MAX_HEAD)
        requests += [UpstreamRequest(head.method, origin_form(head.target), body) for head, body in framed.requests]
        if framed.violation is not None:
            leftovers.append(Leftover(segment.where, framed.unparsed, f"not strictly framed ({framed.violation})"))
        elif framed.unparsed:
            if framed.requests and framed.requests[-1][0].method == "CONNECT":
                leftovers.append(Leftover(segment.where, framed.unparsed, "bytes after a CONNECT head"))
            else:
                leftovers.append(Leftover(segment.where, framed.unparsed, "an incomplete request", incomplete=True))
        if segment.truncated:
            leftovers.append(Leftover(segment.where, b"", f"more than {STREAM_RECORD_LIMIT} bytes arrived "
                                      "(record truncated)"))
    return UpstreamReading(tuple(requests), tuple(leftovers))


@dataclass(frozen=True)
class Assessment:
    """What arrived upstream, measured against the allowed requests.

    ``leak`` is empty, or says what reached upstream beyond the allowed requests: a final leftover,
    a complete request not allowed, or (with ``leak_incomplete``) the start of a request when every
    allowed request already arrived complete, so it can only be a further one. ``missing`` are
    allowed requests that did not arrive complete; ``pending`` the incomplete starts not counted
    as a leak.
    """

    leak: str
    extra: tuple[UpstreamRequest, ...]
    unframed: tuple[Leftover, ...]
    missing: tuple[UpstreamRequest, ...]
    pending: tuple[Leftover, ...]


def assess(requests: Sequence[UpstreamRequest], leftovers: Sequence[Leftover],
           allowed: Sequence[UpstreamRequest], *, leak_incomplete: bool = True) -> Assessment:
    """Compare what arrived with what may arrive. Pure."""
    extra, missing = compare_requests(requests, allowed)
    unframed = tuple(leftover for leftover in leftovers if not leftover.incomplete)
    incomplete = tuple(leftover for leftover in leftovers if leftover.incomplete)
    # Every allowed request arrived complete: an incomplete start can only be a further request.
    counted = bool(incomplete) and leak_incomplete and not missing
    beyond = f"beyond the {len(allowed)} allowed request(s)"
    leak = ""
    if unframed:
        leak = f"bytes {beyond} reached {unframed[0].describe()}"
    elif extra:
        leak = f"{len(extra)} request(s) {beyond} reached upstream: {[request.describe() for request in extra[:3]]}"
    elif counted:
        leak = f"bytes {beyond} reached {incomplete[0].describe()}"
    return Assessment(leak, tuple(extra), unframed, tuple(missing), () if counted else incomplete)


def allowed_prefix(payload: bytes, count: int) -> tuple[UpstreamRequest, ...]:
    """The first ``count`` requests of ``payload``, strictly framed: what may reach upstream. Pure.

    Raises ValueError when the payload does not begin with ``count`` strictly valid requests (a
    catalogue row whose allowed requests are not themselves clean).
    """
    framed = frame_pipeline(payload)
    if len(framed.requests) < count:
        raise ValueError(f"the payload frames into {len(framed.requests)} request(s), fewer than the "
                         f"{count} it allows ({framed.violation})")
    return tuple(UpstreamRequest(head.method, origin_form(head.target), body)
                 for head, body in framed.requests[:count])


def compare_requests(arrived: Sequence[UpstreamRequest], allowed: Sequence[UpstreamRequest]
                     ) -> tuple[list[UpstreamRequest], list[UpstreamRequest]]:
    """(extra, missing): what arrived beyond ``allowed`` and what of it did not arrive. Pure.

    A multiset comparison: a proxy may send pipelined requests on separate upstream connections,
    so their order across connections is not evidence.
    """
    arrived_count, allowed_count = Counter(arrived), Counter(allowed)
    extra = list((arrived_count - allowed_count).elements())
    missing = list((allowed_count - arrived_count).elements())
    return extra, missing
