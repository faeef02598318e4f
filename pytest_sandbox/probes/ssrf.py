"""The SSRF category's attempts: built from the catalogue, sent raw on lab sockets, read back.

Each :class:`~pytest_sandbox.catalogues.ssrf_cases.SsrfCase` is attempted through the proxy in every
request form it lists (network.md §3, RFC 9112 §3.2): as a ``CONNECT`` authority, as an absolute-form
``GET``, as an origin-form ``GET`` whose Host names the destination (what a transparent proxy
receives), as a ``GET`` whose request-target is the bare authority, and as ``OPTIONS *`` with the
destination in Host. Attempts are written as
raw bytes on a raw socket, so nothing on our side canonicalises, re-encodes or refuses the odd
spellings before the proxy sees them. Every request carries the attempt's nonce (path and header of
an absolute-form request, and of the request sent through an established tunnel), so a catch-all
hit that carries bytes names its attempt exactly (:mod:`pytest_sandbox.network.lab.attribution`).

The campaign that runs them and the exchanges beyond the catalogue are in
:mod:`pytest_sandbox.probes.ssrf_exchanges`; the judge (network.md §7) is
:func:`pytest_sandbox.verdicts.ssrf.judge_attempt`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pytest_sandbox.catalogues.ssrf_cases import ALL_FORMS, SSRF_CASES, SsrfCase, canary_addresses
from pytest_sandbox.http.framing import HEAD_END
from pytest_sandbox.http.responses import ParsedResponse, parse_head, parse_responses
from pytest_sandbox.network.addresses import embedded_ipv4
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, NONCE_PATH_PREFIX, CatchAllHit
from pytest_sandbox.network.lab.lab import HitSnapshot
from pytest_sandbox.probes.campaign import GRACE_SECONDS
from pytest_sandbox.probes.exchange import SocketReader
from pytest_sandbox.verdicts.ssrf import REFUSAL_STATUSES, HitCounts, ProxyReply, canary_is_observable

# Where half the unmarked twins (twin_sends_request_id) carry their nonce, and every twin whose request has no
# path to carry it: the de facto request-correlation field many clients and gateways send, not the harness's
# own marker.
TWIN_NONCE_FIELD = "X-Request-ID"
# What an ordinary client adds to every request, and so does every unmarked twin: curl's defaults (curl 8 sends
# ``User-Agent: curl/<version>`` and ``Accept: */*``). The marked probes send neither, so a proxy that judges only
# requests without a User-Agent (a harness's, not a browser's or an SDK's) is caught by the twins.
TWIN_CLIENT_FIELDS: tuple[str, ...] = ("User-Agent: curl/8.5.0", "Accept: */*")

__all__ = [
    "ALL_FORMS",
    "ATTEMPT_FORMS",
    "ATTEMPT_TIMEOUT_SECONDS",
    "EXTRA_CANARIES",
    "EXTRA_NAMES",
    "GRACE_SECONDS",
    "Attempt",
    "build_attempts",
    "canary_is_observable",
    "hit_counts",
    "lab_canaries",
    "lab_names",
    "new_hits",
    "nonce_fields",
    "nonce_path",
    "plausible_destinations",
    "read_one_response",
    "send_attempt",
    "twin_keeps_alive",
    "twin_sends_request_id",
]

# The two forms a forward proxy serves (the default of build_attempts and of the self-connection cases);
# ALL_FORMS adds origin-form with Host, the bare authority with GET, and OPTIONS *.
ATTEMPT_FORMS: tuple[str, ...] = ("connect", "absolute")
# form -> (method, what the request-target is); the Host-carried forms name the destination in Host.
_METHODS = {"connect": "CONNECT", "absolute": "GET", "origin": "GET", "authority": "GET", "asterisk": "OPTIONS"}
_HOST_CARRIED = frozenset({"origin", "asterisk"})
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
ATTEMPT_TIMEOUT_SECONDS = 3.0
MAX_REPLY_BYTES = 256 * 1024
# Host header value used when the case's authority is not valid field text (RFC 9110 §5.5): the
# request target must be what the proxy judges, not a header the framing checks reject first.
FALLBACK_HOST = "lab.invalid"

# Names the conformance controls need in the lab DNS, besides the catalogue's own name cases.
# 11.0.0.10 / 2600:9000::10 are lab public origins; the rest are canaries (network.md §7: mixed
# answers, one public and one private, must be denied if any answer is special).
EXTRA_NAMES: Mapping[str, tuple[str, ...]] = {
    "public-origin.lab.test": ("11.0.0.10",),
    "mixed-public-first.lab.test": ("11.0.0.10", "10.0.0.1"),
    "mixed-private-first.lab.test": ("10.0.0.1", "11.0.0.10"),
    "mixed-v6-public-first.lab.test": ("2600:9000::10", "fd00:ec2::254"),
    "mixed-metadata.lab.test": ("11.0.0.11", "169.254.169.254"),
}
EXTRA_CANARIES: tuple[str, ...] = ("10.0.0.1", "127.0.0.1", "169.254.169.254", "fd00:ec2::254")



# --------------------------------------------------------------------------------------------------
# What the lab must hold
# --------------------------------------------------------------------------------------------------


def lab_canaries() -> tuple[str, ...]:
    """Every canary of the catalogue, plus those the controls need (all observable by the catch-all)."""
    wanted = (*canary_addresses(), *EXTRA_CANARIES)
    return tuple(dict.fromkeys(a for a in wanted if canary_is_observable(a)))


def _zone_name(host: str) -> str:
    # DNS names are case-insensitive (RFC 4343) and one trailing dot is the root (RFC 1034 §3.1).
    return host.lower().removesuffix(".")


def lab_names() -> dict[str, tuple[str, ...]]:
    """The lab DNS zone: each catalogue ``name`` case resolves to its canary, plus EXTRA_NAMES."""
    names: dict[str, tuple[str, ...]] = {
        _zone_name(case.target_host): (case.canary,)
        for case in SSRF_CASES if case.kind == "name" and case.canary is not None
    }
    names.update(EXTRA_NAMES)
    return names


# Where an authority can be cut into host-like pieces by one parser or another: userinfo, backslash,
# brackets, zone ids, whitespace, path (RFC 3986 §3.2, and the WHATWG URL parser's backslash).
_AUTHORITY_SEPARATORS = re.compile(r"[@\\\[\]\s%/]+")
_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _reached(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Where Linux delivers a TCP connect to ``address``: the IPv4 inside an IPv4-mapped address
    (RFC 4291 §2.5.5.2), and 127.0.0.1 / ::1 for the unspecified address (ip_route_output_key_hash_rcu,
    tcp_v6_connect)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return "127.0.0.1" if address.version == 4 else "::1"
    return str(address)


# RFC 8215 local-use NAT64 prefix: where the IPv4 sits depends on the prefix length a deployment
# picks (RFC 6052 §2.2), so network.addresses.embedded_ipv4 does not unwrap it; a proxy reading the
# low 32 bits (as for /96) is one plausible reading.
_NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")


def plausible_destinations(case: SsrfCase) -> frozenset[str]:
    """Every address a proxy could dial for ``case``: its canary, any IP literal in its authority
    (and the IPv4 inside an IPv6 one), and for loopback names both loopback addresses (a hosts file
    lists ``localhost`` as 127.0.0.1 and ::1).

    Used to blame a catch-all hit that carries no nonce; a reading not foreseen here is still caught
    (see :func:`pytest_sandbox.network.lab.attribution.candidates_for`), only less exactly.
    """
    found: set[str] = set()
    if case.canary is not None:
        found.add(_reached(ipaddress.ip_address(case.canary)))
        if case.kind in ("name", "encoding") and ipaddress.ip_address(case.canary).is_loopback:
            found.update(("127.0.0.1", "::1"))
    for piece in _AUTHORITY_SEPARATORS.split(case.authority):
        # The piece itself, else with a port cut off after the last or the first colon ("a:80:80").
        for text in (piece, piece.rsplit(":", 1)[0], piece.split(":", 1)[0]):
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            found.add(_reached(address))
            if isinstance(address, ipaddress.IPv6Address):
                found.update(_reached(embedded) for embedded in embedded_ipv4(address))
                if address in _NAT64_LOCAL_USE:
                    found.add(_reached(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)))
            break
    return frozenset(found)


# --------------------------------------------------------------------------------------------------
# Attempts (pure)
# --------------------------------------------------------------------------------------------------


def _is_field_text(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text and bool(text)


@dataclass(frozen=True)
class Attempt:
    """One case sent in one form of :data:`ALL_FORMS`: ``connect`` (authority-form CONNECT),
    ``absolute`` (absolute-form GET), ``origin`` (``GET /`` with the authority in Host), ``authority``
    (the authority as a GET's request-target) or ``asterisk`` (``OPTIONS *`` with the authority in Host)."""

    case: SsrfCase
    form: str

    @property
    def test_id(self) -> str:
        return f"{self.form}-{self.case.case_id}"

    @property
    def method(self) -> str:
        """The form's method; an absolute-form case of the ``method`` family names its own."""
        return self.case.method if self.case.method and self.form == "absolute" else _METHODS[self.form]

    @property
    def target(self) -> str:
        """The destination as sent: the request-target, or for the Host-carried forms the Host."""
        if self.form in ("connect", "authority"):
            return self.case.authority
        if self.form == "absolute":
            return self.case.absolute_url
        return f"{'*' if self.form == 'asterisk' else '/'} with Host: {self.case.authority}"

    def describe(self) -> str:
        return f"{self.method} {self.target!r} ({self.form}-form; {self.case.note})"

    @property
    def nonce_in_path(self) -> bool:
        """Whether a request of this attempt has a path to carry a nonce: absolute and origin form with a plain
        path suffix (a '?@' or '#@' suffix is sent exactly), and CONNECT (the request through its tunnel)."""
        return self.form == "connect" or (self.form in ("absolute", "origin") and self.case.suffix.startswith("/"))

    def request_target(self, nonce: str | None = None, *, marked: bool = True) -> str:
        """The request-target as sent; the nonce goes into an absolute or origin-form path when the
        case's own suffix is a plain path (a '?@' or '#@' suffix is sent exactly, nonce in the header).
        ``marked=False`` is the unmarked twin: the nonce is one opaque path segment, not under
        :data:`NONCE_PATH_PREFIX`, as a client's own token would be."""
        case = self.case
        if self.form in ("connect", "authority"):
            return case.authority
        if self.form == "asterisk":
            return "*"
        path = case.suffix
        if nonce is not None and path.startswith("/"):
            path = f"{nonce_path(nonce, marked)}{'' if path == '/' else path}"
        if self.form == "origin":
            return path if path.startswith("/") else "/"
        return f"{case.scheme}://{case.authority}{path}"

    def request_bytes(self, nonce: str | None = None, *, marked: bool = True, request_id: bool = True,
                      keep_alive: bool = False) -> bytes:
        """The request head exactly as sent; odd characters go out as UTF-8, unescaped. In the
        Host-carried forms the Host is the case's authority whatever it holds (it is the destination).
        ``marked=False``: no :data:`NONCE_HEADER` field and no nonce path prefix (the unmarked twin, whose
        ``nonce`` is :func:`~pytest_sandbox.network.lab.attribution.twin_nonce`'s UUID); the nonce rides in
        :data:`TWIN_NONCE_FIELD` too when ``request_id`` or when the request has no path to carry it.
        ``keep_alive``: no ``Connection: close`` (a persistent request, RFC 9112 §9.3, as curl sends: half the
        twins, :func:`twin_keeps_alive`); a CONNECT never carries one. ``nonce=None, marked=False`` is a bare twin:
        curl's fields and no nonce anywhere."""
        authority = self.case.authority
        host = authority if self.form in _HOST_CARRIED or _is_field_text(authority) else FALLBACK_HOST
        lines = [f"{self.method} {self.request_target(nonce, marked=marked)} HTTP/{self.case.http_version}",
                 f"Host: {host}"]
        if nonce is not None:
            # The twin's nonce in a correlation field any client may send: its bytes at a canary then name
            # their exchange even when the path carries no nonce ('?@' suffixes, a proxy that rewrites the
            # path), so a leaking proxy's twin hits need no isolation reruns.
            lines += nonce_fields(nonce, marked, request_id or not self.nonce_in_path)
        elif not marked:  # a bare twin: a client's request and nothing else (no token of any kind)
            lines += TWIN_CLIENT_FIELDS
        if self.method in _METHODS_WITH_BODY:
            lines.append("Content-Length: 0")  # RFC 9110 §8.6: sent for these even when the body is empty, as curl does
        if self.form != "connect" and not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    def tunnel_request_bytes(self, nonce: str | None = None) -> bytes:
        """What goes through an established tunnel: a plain GET the catch-all answers, with the nonce."""
        return self._tunnel_get(nonce, marked=True, request_id=True)

    def unmarked_tunnel_request_bytes(self, nonce: str, *, request_id: bool) -> bytes:
        """What an unmarked twin sends through its tunnel: the GET carrying ``nonce`` as the twin does."""
        return self._tunnel_get(nonce, marked=False, request_id=request_id)

    def _tunnel_get(self, nonce: str | None, *, marked: bool, request_id: bool) -> bytes:
        authority = self.case.authority
        host = authority if _is_field_text(authority) else FALLBACK_HOST
        if nonce is None:
            return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        lines = [f"GET {nonce_path(nonce, marked)} HTTP/1.1", f"Host: {host}", *nonce_fields(nonce, marked, request_id),
                 "Connection: close"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


def nonce_path(nonce: str, marked: bool = True) -> str:
    """The path that carries ``nonce``: under :data:`NONCE_PATH_PREFIX`, or for an unmarked twin one opaque
    segment (``/<uuid>``, as a client's own token would be)."""
    return f"{NONCE_PATH_PREFIX}{nonce}" if marked else f"/{nonce}"


def nonce_fields(nonce: str, marked: bool = True, request_id: bool = True) -> list[str]:
    """The header lines that carry ``nonce``: :data:`NONCE_HEADER`; for an unmarked twin an ordinary client's
    fields (:data:`TWIN_CLIENT_FIELDS`) and :data:`TWIN_NONCE_FIELD` when ``request_id`` (else the path alone
    carries the nonce)."""
    if marked:
        return [f"{NONCE_HEADER}: {nonce}"]
    return [*TWIN_CLIENT_FIELDS, *([f"{TWIN_NONCE_FIELD}: {nonce}"] if request_id else [])]


def twin_keeps_alive(key: str) -> bool:
    """Whether the unmarked twin of exchange ``key`` is a persistent request (no ``Connection: close``; HTTP/1.1's
    default, RFC 9112 §9.3, and what curl sends) where every marked probe asks for the close. Half the twins do,
    fixed per key and independent of :func:`twin_sends_request_id` (another bit of the same CRC-32): a proxy that
    judges only requests asking for the close, or only first requests of persistent connections, fails the
    other half."""
    return (zlib.crc32(key.encode("utf-8", "surrogateescape")) >> 1) % 2 == 0


def twin_sends_request_id(key: str) -> bool:
    """Whether the unmarked twin of exchange ``key`` carries :data:`TWIN_NONCE_FIELD` (where its path can carry
    the nonce). Half the twins do, half do not, fixed per key (CRC-32, so a run is reproducible): a proxy that
    judges only requests with the field, or only those without it, fails the other half."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % 2 == 0


def build_attempts(cases: Iterable[SsrfCase] = SSRF_CASES,
                   forms: Iterable[str] = ATTEMPT_FORMS) -> tuple[Attempt, ...]:
    """Every case in each of ``forms`` it lists, in catalogue order (connect first).

    The default is the two forms a forward proxy serves; pass :data:`ALL_FORMS` for every form.
    """
    wanted = tuple(forms)
    return tuple(Attempt(case, form) for case in cases for form in wanted if form in case.forms)


def hit_counts(hits: Iterable[CatchAllHit]) -> dict[tuple[str, int], int]:
    """Catch-all hits per (address, port)."""
    counts: dict[tuple[str, int], int] = {}
    for hit in hits:
        counts[(hit.address, hit.port)] = counts.get((hit.address, hit.port), 0) + 1
    return counts


def new_hits(before: HitCounts, after: HitCounts) -> dict[tuple[str, int], int]:
    """Destinations (address, port) the catch-all saw new connections to between two snapshots.

    When both are :class:`~pytest_sandbox.network.lab.lab.HitSnapshot` of one lab, the hits in between are
    recorded in its ledger as counted by the caller's verdict (the caller judges them), so the
    session-end audit does not report them a second time.
    """
    if isinstance(before, HitSnapshot) and isinstance(after, HitSnapshot) and after.lab is not None \
            and after.lab is before.lab and after.through >= before.through:
        after.lab.account(range(before.through, after.through), by="a before/after hit window")
    return {key: count - before.get(key, 0) for key, count in after.items() if count > before.get(key, 0)}


# --------------------------------------------------------------------------------------------------
# Sending (sockets come from the caller: lab sockets only)
# --------------------------------------------------------------------------------------------------


_NO_ANSWER = ParsedResponse(None, (), b"")


def _read(sock: socket.socket, buffer: bytearray, deadline: float,
          until: Callable[[], bool] | None = None) -> tuple[bool, bool, str]:
    """Read into ``buffer`` until ``until()``, EOF or the deadline: (eof, timed_out, error)."""
    reader = SocketReader(sock, deadline, buffer, limit=MAX_REPLY_BYTES)
    if until is None:
        reader.fill()
    else:
        reader.fill(until)
    error = reader.exception
    if error is None:
        return reader.eof, reader.timed_out, ""
    # The SSRF evidence text: a reset is named as such, any other socket error by its message.
    return reader.eof, reader.timed_out, f"reset: {error}" if isinstance(error, ConnectionResetError) else str(error)


# After an answer whose judgement does not rest on the close, how long a close that is already on its
# way may take to arrive (so the evidence says "closed" for a proxy that closes, without waiting for
# one that keeps the connection, which RFC 9112 §9.3 lets it do).
CLOSE_SETTLE_SECONDS = 0.05


def _answer_without_close(buffer: bytearray, close_requested: bool = True) -> bool:
    """Whether ``buffer`` holds a complete final response (framed as RFC 9112 §6.3 says) whose verdict
    does not need the close: anything but a refusal of a request that asked for the close. Such a refusal
    (400/403) must close (network.md §5, RFC 9112 §9.6 for the ``Connection: close`` the attempt sent), so
    it is read to EOF; after a persistent request's (a keep-alive twin's) the proxy may keep the
    connection (RFC 9112 §9.3). Pure."""
    try:
        responses, _used = parse_responses(bytes(buffer))
    except ValueError:
        return False  # not HTTP: read to EOF or the deadline
    return bool(responses) and (not close_requested or responses[0].status not in REFUSAL_STATUSES)


def _read_answer(sock: socket.socket, buffer: bytearray, deadline: float,
                 close_requested: bool = True) -> tuple[bool, bool, str]:
    """Read one answer: to EOF where its verdict needs the close, else to its framed end (then a
    moment for a close already sent)."""
    eof, timed_out, error = _read(sock, buffer, deadline, lambda: _answer_without_close(buffer, close_requested))
    if eof or timed_out or error:
        return eof, timed_out, error
    eof, _timed_out, error = _read(sock, buffer, min(deadline, time.monotonic() + CLOSE_SETTLE_SECONDS))
    return eof, False, error


def send_attempt(sock: socket.socket, attempt: Attempt,
                 timeout: float = ATTEMPT_TIMEOUT_SECONDS, *, nonce: str | None = None,
                 marked: bool = True, request_id: bool = True, keep_alive: bool = False) -> ProxyReply:
    """Send ``attempt`` on a fresh connection to the proxy and read its answer: until the proxy closes
    the connection where the verdict rests on the close (a refusal), else until the answer is complete.
    ``marked=False`` sends the unmarked twin (:meth:`Attempt.request_bytes`; ``request_id`` as there), and a
    tunnel it opens carries an unmarked GET as well: nothing a twin sends holds the harness's marks.
    ``keep_alive``: a persistent request (no ``Connection: close``), whose refusal need not close (the reply's
    ``close_requested`` is False)."""
    deadline = time.monotonic() + timeout
    close_requested = attempt.form == "connect" or not keep_alive
    try:
        sock.sendall(attempt.request_bytes(nonce, marked=marked, request_id=request_id, keep_alive=keep_alive))
    except OSError as exc:
        return ProxyReply(_NO_ANSWER, None, closed=True, timed_out=False, error=str(exc))
    buffer = bytearray()
    if attempt.form == "connect":
        eof, timed_out, error = _read(sock, buffer, deadline, lambda: HEAD_END in buffer)
        proxy = parse_head(bytes(buffer))
        if not eof and not timed_out and proxy.status is not None and 200 <= proxy.status < 300:
            # Whatever followed the proxy's head already belongs to the tunnel.
            tunnel = bytearray(proxy.body)
            proxy = ParsedResponse(proxy.status, proxy.headers, b"")
            try:
                sock.sendall(attempt.tunnel_request_bytes(nonce) if marked or nonce is None
                             else attempt.unmarked_tunnel_request_bytes(nonce, request_id=request_id))
            except OSError as exc:
                return ProxyReply(proxy, parse_head(bytes(tunnel)), closed=True, timed_out=False, error=str(exc))
            eof, timed_out, error = _read_answer(sock, tunnel, deadline)
            return ProxyReply(proxy, parse_head(bytes(tunnel)), closed=eof, timed_out=timed_out, error=error)
        if not eof and not timed_out:
            eof, timed_out, error = _read_answer(sock, buffer, deadline)
        return ProxyReply(parse_head(bytes(buffer)), None, closed=eof, timed_out=timed_out, error=error)
    eof, timed_out, error = _read_answer(sock, buffer, deadline, close_requested)
    return ProxyReply(parse_head(bytes(buffer)), None, closed=eof, timed_out=timed_out, error=error,
                      close_requested=close_requested)


def read_one_response(sock: socket.socket, deadline: float, *, to_connect: bool = False) -> tuple[ParsedResponse, bool]:
    """Read exactly one response framed by Content-Length (or by EOF): (reply, connection_closed).

    For keep-alive checks, where the connection must stay usable after the first response.
    ``to_connect``: the request was a CONNECT, whose 2xx answer ends at its head (RFC 9110 §9.3.6:
    the connection is a tunnel from there on, and waiting for its close would wait for nothing).
    """
    buffer = bytearray()
    eof, timed_out, _error = _read(sock, buffer, deadline, lambda: HEAD_END in buffer)
    reply = parse_head(bytes(buffer))
    if eof or timed_out or reply.status is None or (to_connect and 200 <= reply.status < 300):
        return reply, eof
    length_text = reply.header("content-length")
    if length_text is None or not length_text.isdigit():
        eof, _timed_out, _error = _read(sock, buffer, deadline)
        return parse_head(bytes(buffer)), eof
    head_length = bytes(buffer).index(HEAD_END) + len(HEAD_END)
    wanted = head_length + int(length_text)
    eof, _timed_out, _error = _read(sock, buffer, deadline, lambda: len(buffer) >= wanted)
    return parse_head(bytes(buffer[:wanted])), eof



# Names that left this module in the layout change; step 3 rewrites their importers and drops these lines.
