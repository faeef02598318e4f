"""The SSRF conformance category: attempts built from the catalogue, sent raw, judged with the catch-all.

Each :class:`~pytest_sandbox.catalogues.ssrf_cases.SsrfCase` is attempted twice through the proxy
(network.md §3): as a ``CONNECT`` authority and as an absolute-form ``GET``. Attempts are written as
raw bytes on a raw socket, so nothing on our side canonicalises, re-encodes or refuses the odd
spellings before the proxy sees them. Every request carries the attempt's nonce (path and header of
an absolute-form request, and of the request sent through an established tunnel), so a catch-all
hit that carries bytes names its attempt exactly (:mod:`pytest_sandbox.network.lab.attribution`).

The category runs as one :class:`~pytest_sandbox.probes.campaign.Campaign` (:func:`run_ssrf_campaign`):
all attempts back to back, then the grace period, then attribution, so a late dial is blamed on the
case that caused it. Judging is pure (:func:`judge_attempt`) and follows network.md §7: a denied case
is BLOCKED only if the proxy refused it (400/403 and closed the connection) **and** no catch-all hit
is attributed to it; a hit is ALLOWED whatever the proxy answered; a 502/504 means the proxy tried
to dial, which is ALLOWED too (unroutability is not blocking); a silent timeout is INDETERMINATE,
never a pass. A positive control WORKS only if the catch-all answered 200 for its destination
through the proxy and recorded the connection, so a proxy that refuses everything cannot score 100 %.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES, SsrfCase, canary_addresses
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, NONCE_PATH_PREFIX, CatchAllHit
from pytest_sandbox.network.lab.lab import HitSnapshot, NetworkLab
from pytest_sandbox.probes.campaign import GRACE_SECONDS, Campaign, ExchangeContext, ExchangeResult
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

__all__ = [
    "ATTEMPT_FORMS",
    "ATTEMPT_TIMEOUT_SECONDS",
    "EXTRA_CANARIES",
    "EXTRA_NAMES",
    "GRACE_SECONDS",
    "Attempt",
    "AttemptExchange",
    "HttpReply",
    "ProxyReply",
    "SsrfExchange",
    "SsrfVerdict",
    "build_attempts",
    "canary_is_observable",
    "hit_counts",
    "judge_attempt",
    "lab_canaries",
    "lab_names",
    "new_hits",
    "parse_reply",
    "plausible_destinations",
    "read_one_response",
    "run_attempt",
    "run_ssrf_campaign",
    "send_attempt",
    "with_hit_notes",
]

ATTEMPT_FORMS: tuple[str, ...] = ("connect", "absolute")
ATTEMPT_TIMEOUT_SECONDS = 3.0
READ_SIZE = 65536
MAX_REPLY_BYTES = 256 * 1024
HEAD_END = b"\r\n\r\n"
# A refusal is an answer the proxy gives itself before any dial: 403 (policy, SSRF) or 400
# (authority that cannot be canonicalised, network.md §3). 502/504 mean it tried to dial.
REFUSAL_STATUSES = frozenset({400, 403})
DIALLED_STATUSES = frozenset({502, 504})
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


def canary_is_observable(address: str) -> bool:
    """Whether a TCP peer can exist at ``address`` in the lab, so the catch-all can see a dial there.

    Every unicast address can, IPv6 link-local included (a proxy dials fe80::/10 only with a scope
    id, RFC 4007 §6, and the lab's lo then routes it locally). Multicast and the limited broadcast
    cannot: tcp_v4_connect() refuses multicast/broadcast routes and tcp_v6_connect() multicast
    destinations before any packet exists, so nothing there can ever be reached.
    """
    parsed = ipaddress.ip_address(address)
    return not (parsed.is_multicast or parsed == ipaddress.IPv4Address("255.255.255.255"))


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


# Prefixes whose low 32 bits carry an IPv4 address: NAT64 well-known and local-use (RFC 6052,
# RFC 8215), IPv4-compatible (RFC 4291 §2.5.5.1) and SIIT IPv4-translated (RFC 2765).
_LOW_32_BITS_IPV4 = tuple(ipaddress.IPv6Network(prefix) for prefix in
                          ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96"))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses a "helpful" proxy could unwrap from an IPv6 one: 6to4 (RFC 3056), Teredo server
    and client (RFC 4380), and the low 32 bits of NAT64, SIIT and IPv4-compatible forms."""
    found = [ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)] if any(
        address in prefix for prefix in _LOW_32_BITS_IPV4) else []
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found += list(address.teredo)
    return found


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
                found.update(_reached(embedded) for embedded in _embedded_ipv4(address))
            break
    return frozenset(found)


# --------------------------------------------------------------------------------------------------
# Attempts (pure)
# --------------------------------------------------------------------------------------------------


def _is_field_text(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text and bool(text)


@dataclass(frozen=True)
class Attempt:
    """One case sent in one form: ``connect`` (authority-form) or ``absolute`` (absolute-form GET)."""

    case: SsrfCase
    form: str

    @property
    def test_id(self) -> str:
        return f"{self.form}-{self.case.case_id}"

    @property
    def target(self) -> str:
        return self.case.authority if self.form == "connect" else self.case.absolute_url

    def describe(self) -> str:
        method = "CONNECT" if self.form == "connect" else "GET"
        return f"{method} {self.target!r} ({self.case.note})"

    def request_target(self, nonce: str | None = None) -> str:
        """The request-target as sent: the authority for CONNECT, else the URL with the nonce's path."""
        if self.form == "connect" or nonce is None:
            return self.target
        return f"http://{self.case.authority}{NONCE_PATH_PREFIX}{nonce}"

    def request_bytes(self, nonce: str | None = None) -> bytes:
        """The request head exactly as sent; odd characters go out as UTF-8, unescaped."""
        authority = self.case.authority
        host = authority if _is_field_text(authority) else FALLBACK_HOST
        method = "CONNECT" if self.form == "connect" else "GET"
        lines = [f"{method} {self.request_target(nonce)} HTTP/1.1", f"Host: {host}"]
        if nonce is not None:
            lines.append(f"{NONCE_HEADER}: {nonce}")
        if self.form == "absolute":
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    def tunnel_request_bytes(self, nonce: str | None = None) -> bytes:
        """What goes through an established tunnel: a plain GET the catch-all answers, with the nonce."""
        authority = self.case.authority
        host = authority if _is_field_text(authority) else FALLBACK_HOST
        if nonce is None:
            return f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        return (f"GET {NONCE_PATH_PREFIX}{nonce} HTTP/1.1\r\nHost: {host}\r\n{NONCE_HEADER}: {nonce}\r\n"
                "Connection: close\r\n\r\n").encode()


def build_attempts(cases: Iterable[SsrfCase] = SSRF_CASES) -> tuple[Attempt, ...]:
    """Every case in every form, in catalogue order (connect first)."""
    return tuple(Attempt(case, form) for case in cases for form in ATTEMPT_FORMS)


@dataclass(frozen=True)
class HttpReply:
    """One parsed response head (and whatever body followed it)."""

    status: int | None
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)

    @property
    def proxy_reason(self) -> str | None:
        """The reference proxy's JSON ``error`` code, if the body carries one."""
        try:
            decoded = json.loads(self.body)
        except ValueError:
            return None
        reason = decoded.get("error") if isinstance(decoded, dict) else None
        return reason if isinstance(reason, str) else None


def parse_reply(data: bytes) -> HttpReply:
    """Parse ``data`` as one HTTP/1.x response head plus body; status None if it is not one."""
    head, found, body = data.partition(HEAD_END)
    if not found:
        return HttpReply(None, (), data)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status: int | None = None
    if len(parts) >= 2 and parts[0].startswith("HTTP/1.") and parts[1].isdigit() and len(parts[1]) == 3:
        status = int(parts[1])
    headers = tuple((name.strip().lower(), value.strip()) for name, sep, value in
                    (line.partition(":") for line in lines[1:]) if sep)
    return HttpReply(status, headers, body)


@dataclass(frozen=True)
class ProxyReply:
    """What came back for one attempt.

    ``proxy`` is the proxy's own answer; ``tunnelled`` the answer through a CONNECT tunnel (None
    unless the proxy said 2xx to CONNECT). ``closed`` means the proxy ended the connection (EOF or
    reset) within the timeout; ``timed_out`` that the deadline passed first.
    """

    proxy: HttpReply
    tunnelled: HttpReply | None
    closed: bool
    timed_out: bool
    error: str = ""

    @property
    def final(self) -> HttpReply:
        return self.tunnelled if self.tunnelled is not None else self.proxy

    def describe(self) -> str:
        if self.proxy.status is None:
            what = "no HTTP answer"
        else:
            reason = self.proxy.proxy_reason
            what = f"{self.proxy.status}" + (f" {reason}" if reason else "")
        if self.tunnelled is not None:
            what += f", tunnel answered {self.tunnelled.status}"
        ending = "timed out" if self.timed_out else "closed" if self.closed else "left open"
        return f"{what}, connection {ending}" + (f" ({self.error})" if self.error else "")


@dataclass(frozen=True)
class SsrfVerdict:
    """What one SSRF test reports: its scorecard category, id, judgement and what was attempted."""

    category: str
    test_id: str
    judgement: Judgement
    attempted: str


HitCounts = Mapping[tuple[str, int], int]


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


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _hits_text(hits: HitCounts) -> str:
    return ", ".join(f"{_endpoint(address, port)} x{count}" for (address, port), count in sorted(hits.items()))


def judge_attempt(attempt: Attempt, reply: ProxyReply, hits: HitCounts,
                  observable: Callable[[str], bool] = canary_is_observable) -> Judgement:
    """Judge one attempt from the proxy's reply and the canary connections it caused. Pure."""
    case = attempt.case
    observed = reply.describe() + (f"; canary hits: {_hits_text(hits)}" if hits else "; no canary hit")
    if case.expected == "allowed":
        return _judge_control(attempt, reply, hits, observed)
    expected = "refused (400 or 403, connection closed), no canary connection"
    if hits:
        # Name the destination as sent and the canary that answered: that pair is the hole to fix.
        return Judgement(Verdict.ALLOWED, f"destination {attempt.target!r} reached canary {_hits_text(hits)}",
                             expected, observed)
    status = reply.proxy.status
    if status in REFUSAL_STATUSES:
        if not reply.closed:
            return Judgement(Verdict.INDETERMINATE, f"refused with {status} but the connection was left "
                                 "open (network.md §5: answer and close)", expected, observed)
        if case.canary is None:
            note = ("; no TCP peer can exist at this multicast/broadcast destination (the kernel refuses "
                    "connect(2) before any packet), so nothing can have been reached")
        elif not observable(case.canary):
            note = f"; canary {case.canary} cannot be observed in the lab"
        else:
            note = ""
        wanted = 400 if case.expected == "malformed" else 403
        if status != wanted:
            note += f"; catalogue expects {wanted} ({case.expected}) but any refusal blocks"
        reason = reply.proxy.proxy_reason or f"status {status}"
        return Judgement(Verdict.BLOCKED, f"proxy refused: {reason}{note}", expected, observed)
    if status is not None and 200 <= status < 300:
        return Judgement(Verdict.ALLOWED, f"proxy answered {status}: it let the request through",
                             expected, observed)
    if status in DIALLED_STATUSES:
        return Judgement(Verdict.ALLOWED, f"proxy answered {status}: it tried to dial, and only the "
                             "network stopped it (network.md §7: unroutable is not blocked)", expected, observed)
    if reply.timed_out and status is None:
        return Judgement(Verdict.INDETERMINATE, "silent timeout: the proxy neither refused nor answered",
                             expected, observed)
    if status is None:
        return Judgement(Verdict.INDETERMINATE, "the proxy closed without an HTTP answer", expected,
                             observed)
    return Judgement(Verdict.INDETERMINATE, f"unexpected status {status}", expected, observed)


def _judge_control(attempt: Attempt, reply: ProxyReply, hits: HitCounts, observed: str) -> Judgement:
    canary = attempt.case.canary
    expected = f"200 from the lab canary {canary}, and that canary counted the connection"
    own = {key: count for key, count in hits.items() if key[0] == canary}
    stray = {key: count for key, count in hits.items() if key[0] != canary}
    final = reply.final
    if attempt.form == "connect" and (reply.proxy.status is None or not 200 <= reply.proxy.status < 300):
        return Judgement(Verdict.BROKEN, f"CONNECT to a public address was not established "
                             f"({reply.proxy.status})", expected, observed)
    if final.status != 200:
        return Judgement(Verdict.BROKEN, f"a public address did not answer 200 through the proxy "
                             f"({final.status})", expected, observed)
    if final.header("x-lab-canary") != canary:
        return Judgement(Verdict.BROKEN, f"the 200 did not come from canary {canary} "
                             f"(X-Lab-Canary: {final.header('x-lab-canary')})", expected, observed)
    if not own:
        return Judgement(Verdict.BROKEN, f"canary {canary} counted no connection", expected, observed)
    if stray:
        return Judgement(Verdict.BROKEN, f"other canaries were reached too: {_hits_text(stray)}",
                             expected, observed)
    return Judgement(Verdict.WORKS, f"reached {canary} through the proxy", expected, observed)


# --------------------------------------------------------------------------------------------------
# Sending (sockets come from the caller: lab sockets only)
# --------------------------------------------------------------------------------------------------


def _read(sock: socket.socket, buffer: bytearray, deadline: float,
          until: Callable[[bytearray], bool]) -> tuple[bool, bool, str]:
    """Read into ``buffer`` until ``until(buffer)``, EOF or the deadline: (eof, timed_out, error)."""
    while not until(buffer) and len(buffer) < MAX_REPLY_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, True, ""
        sock.settimeout(remaining)
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            return False, True, ""
        except ConnectionResetError as exc:
            return True, False, f"reset: {exc}"
        except OSError as exc:
            return True, False, str(exc)
        if not data:
            return True, False, ""
        buffer += data
    return False, False, ""


def _never(_buffer: bytearray) -> bool:
    return False


def _head_complete(buffer: bytearray) -> bool:
    return HEAD_END in buffer


def send_attempt(sock: socket.socket, attempt: Attempt,
                 timeout: float = ATTEMPT_TIMEOUT_SECONDS, *, nonce: str | None = None) -> ProxyReply:
    """Send ``attempt`` on a fresh connection to the proxy and read until the proxy closes it."""
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(attempt.request_bytes(nonce))
    except OSError as exc:
        return ProxyReply(HttpReply(None, (), b""), None, closed=True, timed_out=False, error=str(exc))
    buffer = bytearray()
    if attempt.form == "connect":
        eof, timed_out, error = _read(sock, buffer, deadline, _head_complete)
        proxy = parse_reply(bytes(buffer))
        if not eof and not timed_out and proxy.status is not None and 200 <= proxy.status < 300:
            # Whatever followed the proxy's head already belongs to the tunnel.
            tunnel = bytearray(proxy.body)
            proxy = HttpReply(proxy.status, proxy.headers, b"")
            try:
                sock.sendall(attempt.tunnel_request_bytes(nonce))
            except OSError as exc:
                return ProxyReply(proxy, parse_reply(bytes(tunnel)), closed=True, timed_out=False, error=str(exc))
            eof, timed_out, error = _read(sock, tunnel, deadline, _never)
            return ProxyReply(proxy, parse_reply(bytes(tunnel)), closed=eof, timed_out=timed_out, error=error)
        if not eof and not timed_out:
            eof, timed_out, error = _read(sock, buffer, deadline, _never)
        return ProxyReply(parse_reply(bytes(buffer)), None, closed=eof, timed_out=timed_out, error=error)
    eof, timed_out, error = _read(sock, buffer, deadline, _never)
    return ProxyReply(parse_reply(bytes(buffer)), None, closed=eof, timed_out=timed_out, error=error)


def run_attempt(attempt: Attempt, connect_to_proxy: Callable[[], socket.socket],
                lab: NetworkLab | Callable[[], HitCounts], timeout: float = ATTEMPT_TIMEOUT_SECONDS, *,
                grace: float = 0.0) -> Judgement:
    """Send ``attempt`` on a new proxy connection and judge it with the catch-all hits it caused.

    ``lab`` is the lab (or its bound ``all_hits``, as older callers pass it): the attempt is
    registered in the lab's ledger and hits are attributed as the campaign does, so a late hit of an
    earlier attempt is not blamed on this one. ``grace=0`` judges at once; a dial after that is left
    to the session-end audit. Pass :data:`GRACE_SECONDS` to wait like the conformance suite, or use
    :func:`run_ssrf_campaign` for many attempts.
    """
    source = lab if isinstance(lab, NetworkLab) else getattr(lab, "__self__", None)
    if not isinstance(source, NetworkLab):
        snapshot: Callable[[], HitCounts] = lab  # type: ignore[assignment]
        before = snapshot()
        with connect_to_proxy() as sock:
            reply = send_attempt(sock, attempt, timeout)
        return judge_attempt(attempt, reply, new_hits(before, snapshot()))
    exchange = AttemptExchange(attempt, timeout)
    results = Campaign(ExchangeContext(source, connect_to_proxy), grace=grace, isolate=grace > 0).run([exchange])
    return exchange.judge(results[exchange.key]).judgement


# --------------------------------------------------------------------------------------------------
# Exchanges: one test's traffic, run in a campaign
# --------------------------------------------------------------------------------------------------


class SsrfExchange(Protocol):
    """A :class:`~pytest_sandbox.probes.campaign.Exchange` that can also judge what it observed."""

    @property
    def key(self) -> str: ...

    def destinations(self) -> frozenset[str]: ...

    def control(self) -> str | None: ...

    def perform(self, context: ExchangeContext, nonce: str) -> Any: ...

    def judge(self, result: ExchangeResult) -> SsrfVerdict: ...


def with_hit_notes(judgement: Judgement, result: ExchangeResult) -> Judgement:
    """Add how each attributed hit relates to its attempt (timing, bytes, shared blame) to ``observed``."""
    if not result.blamed:
        return judgement
    return dataclasses.replace(judgement, observed=f"{judgement.observed} [{result.describe_hits()}]")


def _failed_reply(error: OSError) -> ProxyReply:
    return ProxyReply(HttpReply(None, (), b""), None, closed=True, timed_out=False,
                      error=f"could not reach the proxy: {error}")


@dataclass(frozen=True)
class AttemptExchange:
    """A catalogue attempt as a campaign exchange."""

    attempt: Attempt
    timeout: float = ATTEMPT_TIMEOUT_SECONDS

    @property
    def key(self) -> str:
        return self.attempt.test_id

    @property
    def category(self) -> str:
        return "ssrf-controls" if self.attempt.case.expected == "allowed" else "ssrf"

    def destinations(self) -> frozenset[str]:
        return plausible_destinations(self.attempt.case)

    def control(self) -> str | None:
        return self.attempt.case.canary if self.attempt.case.expected == "allowed" else None

    def perform(self, context: ExchangeContext, nonce: str) -> ProxyReply:
        try:
            with context.connect() as sock:
                return send_attempt(sock, self.attempt, self.timeout, nonce=nonce)
        except OSError as exc:
            return _failed_reply(exc)

    def judge(self, result: ExchangeResult) -> SsrfVerdict:
        judgement = judge_attempt(self.attempt, result.observation, hit_counts(result.blamed))
        return SsrfVerdict(self.category, self.key, with_hit_notes(judgement, result), self.attempt.describe())


def run_ssrf_campaign(lab: NetworkLab, connect_to_proxy: Callable[[], socket.socket],
                      exchanges: Sequence[SsrfExchange], *, grace: float = GRACE_SECONDS) -> dict[str, SsrfVerdict]:
    """Run ``exchanges`` through the proxy as one campaign and judge each: test id -> verdict."""
    results = Campaign(ExchangeContext(lab, connect_to_proxy), grace=grace).run(exchanges)
    return {exchange.key: exchange.judge(results[exchange.key]) for exchange in exchanges}


def read_one_response(sock: socket.socket, deadline: float) -> tuple[HttpReply, bool]:
    """Read exactly one response framed by Content-Length (or by EOF): (reply, connection_closed).

    For keep-alive checks, where the connection must stay usable after the first response.
    """
    buffer = bytearray()
    eof, timed_out, _error = _read(sock, buffer, deadline, _head_complete)
    reply = parse_reply(bytes(buffer))
    if eof or timed_out or reply.status is None:
        return reply, eof
    length_text = reply.header("content-length")
    if length_text is None or not length_text.isdigit():
        eof, _timed_out, _error = _read(sock, buffer, deadline, _never)
        return parse_reply(bytes(buffer)), eof
    head_length = bytes(buffer).index(HEAD_END) + len(HEAD_END)
    wanted = head_length + int(length_text)
    eof, _timed_out, _error = _read(sock, buffer, deadline, lambda b: len(b) >= wanted)
    return parse_reply(bytes(buffer[:wanted])), eof

