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

import bisect
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pytest_sandbox.http.framing import (
    HEAD_END,
    MAX_HEAD_BYTES,
    ChunkedBodyParser,
    FramingViolation,
    check_request_head,
    frame_pipeline,
)
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, AttemptWindow, candidates_at, nonce_positions

__all__ = [
    "MARK_HEADER",
    "SHOWN_BYTES",
    "STREAM_RECORD_LIMIT",
    "Assessment",
    "Leftover",
    "ReceivedStream",
    "UpstreamLedger",
    "UpstreamPiece",
    "UpstreamReading",
    "UpstreamRequest",
    "UpstreamSegment",
    "allowed_prefix",
    "assess",
    "attribute_pieces",
    "attribute_since",
    "compare_requests",
    "new_mark",
    "new_segments",
    "nonce_in_every_head",
    "origin_form",
    "read_upstream",
    "received_counts",
    "segments_of",
    "shown",
    "split_pieces",
    "stream_address",
    "with_nonce",
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
    # (time.monotonic() when bytes arrived, bytes received in all after them), oldest first: which
    # bytes came when, so that every byte can be attributed to the attempt that caused it.
    arrivals: tuple[tuple[float, int], ...] = ()

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
    # The checked header fields as they arrived (lower-case names), for a judge that reads them (the inference
    # category: which credential reached the backend); never compared.
    fields: tuple[tuple[bytes, bytes], ...] = field(default=(), compare=False, repr=False)

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
        requests += [UpstreamRequest(head.method, origin_form(head.target), body, head.headers)
                     for head, body in framed.requests]
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


# --------------------------------------------------------------------------------------------------
# Per-attempt nonces in what reaches upstream, and attributing every upstream byte to its attempt
# --------------------------------------------------------------------------------------------------


def _clean_request_length(data: bytes) -> int:
    """The length of the strictly framed request at the start of ``data`` (ValueError if it is not one)."""
    found = data.find(HEAD_END)
    if found == -1:
        raise ValueError("no complete request head")
    end = found + len(HEAD_END)
    try:
        kind, length = check_request_head(data[:end]).body_framing
    except FramingViolation as violation:
        raise ValueError(f"not a clean request ({violation.case})") from None
    after = data[end:]
    if kind == "chunked":
        result = ChunkedBodyParser().feed(after)
        if result is None:
            raise ValueError("incomplete chunked body")
        return len(data) - len(result.leftover)
    if len(after) < length:
        raise ValueError("incomplete body")
    return end + length


def _head_end_insertion(data: bytes) -> tuple[int, bytes] | None:
    """Where a header line goes at the end of the first head, and its line ending (the head's own)."""
    ends = [(index, ending) for index, ending in ((data.find(b"\r\n\r\n"), b"\r\n"), (data.find(b"\n\n"), b"\n"))
            if index != -1]
    if not ends:
        return None
    index, ending = min(ends)
    return index + len(ending), ending  # after the last field line, before the empty line


def with_nonce(payload: bytes, nonce: str, clean: int | None = None) -> bytes:
    """``payload`` with ``X-Sandbox-Probe: <nonce>`` added as the last field of request heads. Pure.

    The field goes into each of the first ``clean`` requests (default: every request up to the
    first that strict framing stops at; strictly framed, so their heads are known; a proxy forwards
    end-to-end fields, RFC 9110 §7.6), then into the head of the request after them, where strict
    framing stopped (before its empty line, with that head's own line ending). After a CONNECT head
    it also goes before every empty line of the bytes that follow (:func:`_nonce_in_tunnel_bytes`):
    a proxy may forward them as tunnel bytes, read a body first, or read them as requests of their
    own, and whichever request it makes of them ends its head at one of those empty lines, so it
    carries the nonce. Nothing a case tests moves: the request line, every field the payload had and
    their order, the bodies and whatever follows are byte for byte the same
    (tests/test_upstream_attribution.py checks the framing verdict of every catalogue row is unchanged).
    """
    if clean is None:
        clean = _clean_prefix_count(payload)
    out, rest = bytearray(), payload
    for _ in range(clean):
        length = _clean_request_length(rest)
        request, rest = rest[:length], rest[length:]
        where = _head_end_insertion(request)
        assert where is not None  # a clean request has a head
        index, ending = where
        out += request[:index] + f"{NONCE_HEADER}: {nonce}".encode("ascii") + ending + request[index:]
    if rest:
        # The request strict framing stopped at (or the first, when none is clean): a proxy with
        # looser framing may forward it on a connection of its own.
        rest = _nonce_in_first_head(rest, nonce)
        if rest.startswith(b"CONNECT "):
            # What follows a CONNECT head is tunnel payload a proxy must never parse or forward
            # (RFC 9110 §9.3.6); it carries the nonce too, so a late dial that sends it is named.
            head_end = rest.find(HEAD_END)
            if head_end != -1:
                cut = head_end + len(HEAD_END)
                rest = rest[:cut] + _nonce_in_tunnel_bytes(rest[:cut], rest[cut:], nonce)
    return bytes(out + rest)


def _nonce_in_tunnel_bytes(head: bytes, data: bytes, nonce: str) -> bytes:
    """``data`` (what follows the CONNECT ``head``) with the nonce before every empty line that ends
    a non-empty block, past the body the head declares. Pure.

    The declared body (RFC 9110 §9.3.6 gives a CONNECT none; a lenient proxy may read one anyway) is
    left byte for byte as it is, so its length or chunk sizes still hold: a Content-Length body is
    skipped, and a chunked body gets the nonce as a trailer field (RFC 9112 §7.1.2), before the
    empty line that ends it. The bytes after the body are the requests a proxy reading one would
    parse next.
    """
    line = f"{NONCE_HEADER}: {nonce}".encode("ascii")
    try:
        kind, length = check_request_head(head, max_head=UPSTREAM_MAX_HEAD,
                                          lax=frozenset({"connect-body"})).body_framing
    except FramingViolation:
        kind, length = "length", 0  # no body a strict reading agrees on: every block is a head
    out = bytearray()
    if kind == "chunked":
        try:
            result = ChunkedBodyParser().feed(data)
        except FramingViolation:
            result = None
        if result is not None:
            end = len(data) - len(result.leftover)  # the body's last two bytes are its empty line
            out += data[:end - 2] + line + b"\r\n" + data[end - 2:end]
            data = result.leftover
    else:
        out += data[:length]
        data = data[length:]
    while (where := _head_end_insertion(data)) is not None:
        index, ending = where
        block, data = data[:index], data[index + len(ending):]
        out += (block + line + ending if block.strip() else block) + ending
    return bytes(out + data)


def _head_ends(data: bytes) -> list[int]:
    """Where each block of ``data`` ends: the offset just after every empty line (CRLF or bare LF
    line endings, in any mix: a lenient reader may take any of them). Pure."""
    ends: list[int] = []
    position = 0
    while True:
        found = [index + len(pattern) for pattern in (b"\n\r\n", b"\n\n")
                 if (index := data.find(pattern, position)) != -1]
        if not found:
            return ends
        position = min(found)
        ends.append(position)


def nonce_in_every_head(sent: bytes, nonce: str) -> bool:
    """Whether every request a reading of ``sent`` can make carries ``nonce``. Pure.

    The strictly framed requests at the start (their heads and bodies are what every reading that
    accepts them agrees on) must carry it in their heads. After them, a request head ends at an empty
    line, whatever a lenient reader makes of the bytes before it, so it is enough that every
    non-empty block between empty lines (CRLF or bare LF) holds the nonce. Bytes after the last
    empty line are no complete head. When this is false, bytes of ``sent`` can reach upstream
    without the nonce (a request smuggled in a body, forwarded on a connection of its own): only time
    and destination can then attribute them.
    """
    token, rest = nonce.encode("ascii"), sent
    for _ in range(_clean_prefix_count(sent)):
        length = _clean_request_length(rest)
        if token not in rest[:rest.find(HEAD_END)]:
            return False
        rest = rest[length:]
    start = 0
    for end in _head_ends(rest):
        block = rest[start:end]
        start = end
        if block.strip() and token not in block:
            return False
    return True


def _clean_prefix_count(payload: bytes) -> int:
    """How many requests at the start of ``payload`` are strictly framed (a CONNECT ends the count:
    what follows it is tunnel payload)."""
    framed = frame_pipeline(payload)
    count = 0
    for head, _body in framed.requests:
        if head.method == "CONNECT":
            break
        count += 1
    return count


def _nonce_in_first_head(data: bytes, nonce: str) -> bytes:
    where = _head_end_insertion(data)
    if where is None:
        return data
    index, ending = where
    return data[:index] + f"{NONCE_HEADER}: {nonce}".encode("ascii") + ending + data[index:]


def stream_address(listener: str) -> str:
    """The address part of a listener name: ``11.0.0.10:80`` -> ``11.0.0.10``; others unchanged."""
    if listener.startswith("["):
        return listener[1:].partition("]")[0]
    host, sep, port = listener.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else listener


@dataclass(frozen=True)
class UpstreamPiece:
    """A run of bytes one upstream connection received: from a chunk that carried a known nonce
    (or the first byte looked at) up to the next chunk carrying another attempt's nonce.

    ``nonces`` are the known nonces that start it (empty: bytes without a nonce, e.g. a request a
    proxy forwarded on a connection of its own); ``at`` is when its first byte arrived.
    """

    listener: str
    connection: int
    start: int
    end: int
    data: bytes
    at: float
    nonces: frozenset[str] = frozenset()

    @property
    def key(self) -> StreamKey:
        return (self.listener, self.connection)

    @property
    def where(self) -> str:
        return f"{self.listener} connection {self.connection}"

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.end - self.start


def _chunk_starts(stream: ReceivedStream) -> list[tuple[int, float]]:
    """(offset where a chunk of arrivals begins, when it arrived), oldest first."""
    starts, previous = [], 0
    for at, total in stream.arrivals:
        if total > previous:
            starts.append((previous, at))
            previous = total
    if previous < stream.received:  # bytes without an arrival record (never for the lab's servers)
        starts.append((previous, stream.arrivals[-1][0] if stream.arrivals else 0.0))
    return starts


def split_pieces(stream: ReceivedStream, start: int, end: int, known: Mapping[str, str]) -> list[UpstreamPiece]:
    """Cut bytes ``start``..``end`` of ``stream`` into pieces at the chunks that carry a new attempt's
    nonce (``known``: nonce -> attempt key). Pure.

    A chunk is what one read of the server delivered; a proxy writes each forwarded request in one
    go, so a chunk carrying an attempt's nonce begins that attempt's bytes. Bytes after it on the
    same connection stay with it (connection identity) until another attempt's nonce arrives.
    """
    if end <= start:
        return []
    chunks = [(offset, at) for offset, at in _chunk_starts(stream) if start <= offset < end]
    if not chunks or chunks[0][0] != start:
        earlier = [at for offset, at in _chunk_starts(stream) if offset <= start]
        chunks.insert(0, (start, earlier[-1] if earlier else 0.0))
    found: dict[int, set[str]] = {}
    offsets = [offset for offset, _ in chunks]
    for position, nonce in nonce_positions(stream.data, start, end):
        if nonce in known:
            found.setdefault(bisect.bisect_right(offsets, position) - 1, set()).add(known[nonce])
    nonce_of = {key: nonce for nonce, key in known.items()}
    pieces: list[UpstreamPiece] = []
    owners: set[str] = set()
    cut, cut_at = start, chunks[0][1]
    for index, (offset, at) in enumerate(chunks):
        keys = found.get(index, set())
        if index == 0:
            owners = set(keys)
            continue
        if keys and keys != owners:
            pieces.append(_piece(stream, cut, offset, cut_at, owners, nonce_of))
            cut, cut_at, owners = offset, at, set(keys)
    pieces.append(_piece(stream, cut, end, cut_at, owners, nonce_of))
    return pieces


def _piece(stream: ReceivedStream, start: int, end: int, at: float, owners: set[str],
           nonce_of: Mapping[str, str]) -> UpstreamPiece:
    return UpstreamPiece(stream.listener, stream.connection, start, end, stream.data[start:end], at,
                         frozenset(nonce_of[key] for key in owners))


def attribute_pieces(pieces: Sequence[UpstreamPiece], windows: Sequence[AttemptWindow], grace: float, *,
                     before: Mapping[StreamKey, frozenset[str]] | None = None,
                     graced_only: bool = False) -> list[frozenset[str]]:
    """The attempt keys each piece is attributed to (parallel to ``pieces``). Pure.

    A piece that carries nonces belongs to their attempts. One without (the start of a connection
    whose first bytes carry none) belongs to every attempt that can have caused it
    (:func:`pytest_sandbox.network.lab.attribution.candidates_at`: sound, never dropped), and, when the same
    connection already carried bytes of an attempt (``before``, or an earlier piece), to that one
    too. ``pieces`` must be in order per connection.
    """
    by_nonce = {window.nonce: window.key for window in windows}
    last: dict[StreamKey, frozenset[str]] = dict(before or {})
    owners: list[frozenset[str]] = []
    for piece in pieces:
        keys = frozenset(by_nonce[nonce] for nonce in piece.nonces if nonce in by_nonce)
        if not keys:
            keys = candidates_at(piece.at, stream_address(piece.listener), windows, grace,
                                 graced_only=graced_only) | last.get(piece.key, frozenset())
        owners.append(keys)
        last[piece.key] = keys
    return owners


def attribute_since(ledger: UpstreamLedger, streams: Iterable[ReceivedStream], start: Mapping[StreamKey, int],
                    grace: float) -> list[tuple[UpstreamPiece, frozenset[str]]]:
    """Every byte ``streams`` received from ``start`` on (per stream; from 0 for one not in it), cut into pieces
    at the ledger's nonces and attributed to its attempts (:func:`split_pieces`, :func:`attribute_pieces`); a
    stream that carried an attempt's bytes before its start goes on with that attempt. Pure."""
    known = {window.nonce: window.key for window in ledger.windows}
    pieces: list[UpstreamPiece] = []
    before: dict[StreamKey, frozenset[str]] = {}
    for stream in streams:
        offset = start.get(stream.key, 0)
        pieces += split_pieces(stream, offset, stream.received, known)
        if offset:
            before[stream.key] = ledger.owners_before(stream, offset)
    return list(zip(pieces, attribute_pieces(pieces, ledger.windows, grace, before=before), strict=True))


def segments_of(pieces: Iterable[tuple[UpstreamPiece, frozenset[str]]], key: str,
                name: Callable[[str], str] = str, *, ended: float | None = None) -> tuple[UpstreamSegment, ...]:
    """The bytes attributed to attempt ``key``, one segment per connection (pieces joined in order).

    A segment whose bytes are also blamed on other attempts says so in its ``where`` (sound: bytes
    without a nonce are blamed on every attempt that can have caused them); ``name`` turns an
    attempt key into what a report shows; with ``ended`` (when the attempt ended) a connection
    whose bytes began arriving after it says how long after.
    """
    joined: dict[StreamKey, list[UpstreamPiece]] = {}
    shared: dict[StreamKey, set[str]] = {}
    for piece, owners in pieces:
        if key in owners:
            joined.setdefault(piece.key, []).append(piece)
            shared.setdefault(piece.key, set()).update(owners - {key})
    segments = []
    for stream_key, parts in joined.items():
        others = sorted(name(other) for other in shared[stream_key])
        where = parts[0].where
        if ended is not None and parts[0].at > ended:
            where += f" (arrived {parts[0].at - ended:.3f} s after the attempt ended)"
        if others:
            where += (f" (bytes without a nonce, also blamed on {', '.join(others[:3])}"
                      + (f" and {len(others) - 3} more" if len(others) > 3 else "") + ")")
        segments.append(UpstreamSegment(where, b"".join(part.data for part in parts),
                                        any(part.truncated for part in parts)))
    return tuple(segments)


@dataclass
class UpstreamLedger:
    """Which upstream bytes a verdict already judged, and the attempts whose nonces travel upstream.

    State, owned by one lab (one per xdist worker): ``judged`` maps a connection to the byte ranges
    some verdict counted, with the attempts they were attributed to; ``windows`` are every upstream
    attempt sent (its nonce, its window). The session-end audit (:func:`pytest_sandbox.probes.campaign.
    audit_upstream`) reports every byte outside ``judged`` that an attempt accounts for.
    """

    windows: list[AttemptWindow] = field(default_factory=list)
    judged: dict[StreamKey, list[tuple[int, int, frozenset[str]]]] = field(default_factory=dict)

    def register(self, windows: Iterable[AttemptWindow]) -> None:
        self.windows.extend(windows)

    def account(self, piece: UpstreamPiece, owners: frozenset[str]) -> None:
        self.judged.setdefault(piece.key, []).append((piece.start, piece.end, owners))

    def gaps(self, stream: ReceivedStream, start: int = 0) -> list[tuple[int, int]]:
        """The byte ranges of ``stream`` from ``start`` that no verdict judged."""
        ranges = sorted((begin, end) for begin, end, _ in self.judged.get(stream.key, []))
        gaps, position = [], start
        for begin, end in ranges:
            if begin > position:
                gaps.append((position, min(begin, stream.received)))
            position = max(position, end)
        if position < stream.received:
            gaps.append((position, stream.received))
        return [(begin, end) for begin, end in gaps if end > begin]

    def owners_before(self, stream: ReceivedStream, offset: int) -> frozenset[str]:
        """Who the judged bytes just before ``offset`` on ``stream`` were attributed to."""
        return next((owners for begin, end, owners in self.judged.get(stream.key, []) if begin < offset <= end),
                    frozenset())

    def clear(self) -> None:
        self.windows.clear()
        self.judged.clear()
