"""Self-connection cases: the proxy's own address, in every spelling, judged on evidence it cannot shape.

The cases come from :mod:`pytest_sandbox.catalogues.self_cases`; the harness fills in a *target*:
where an instance of the proxy under test listens (its own address; a lab public address the harness
started it on, where only the self check can refuse; or a local address of a wildcard listener) and
attempts each spelling as CONNECT and as absolute-form.

A loop is judged from two kinds of evidence, neither of which comes from the proxy:

* **The kernel's socket table** of the lab (:mod:`pytest_sandbox.network.socket_table`): every connection to
  the target's (address, port) that the harness did not make itself is the proxy dialling itself.
  Both ends of such a connection live in the lab, and one stays in TIME-WAIT for 60 s, so the
  evidence outlives the attempt.
* **A nonce through the tunnel** (CONNECT only): when the proxy answers 2xx, the harness sends, inside
  the tunnel, a *proxy* request (absolute-form) for a lab public origin with a unique path. Only a
  proxy at the far end of the tunnel forwards that; if the origin records the nonce, the tunnel
  reached the proxy itself.

Judging (:func:`pytest_sandbox.verdicts.self_loop.judge_self_attempt`, pure): any loop evidence is
ALLOWED, whatever the proxy answered (the inner instance's 400 for an origin-form request is not a
refusal of the outer one); otherwise the ordinary SSRF judgement applies (refused and closed =
BLOCKED, 2xx = ALLOWED, silence = INDETERMINATE); a refusal whose loop evidence could not be read is
INDETERMINATE.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_sandbox.catalogues.self_cases import SELF_SPELLINGS, WILDCARD_SPELLINGS, SelfSpelling
from pytest_sandbox.catalogues.ssrf_cases import SsrfCase
from pytest_sandbox.network.socket_table import Endpoint, TcpSocket, peers_of, read_active_opens, read_tcp_table
from pytest_sandbox.network.third_party import find_free_lab_port
from pytest_sandbox.probes.ssrf import (
    ATTEMPT_FORMS,
    ATTEMPT_TIMEOUT_SECONDS,
    Attempt,
    new_hits,
    read_one_response,
    send_attempt,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.self_loop import LOOP_ORIGIN, LoopEvidence, LoopWindow, judge_self_attempt
from pytest_sandbox.verdicts.ssrf import endpoint_text

__all__ = [
    "ADDED_LATER_POOL",
    "LOOP_ORIGIN",
    "SELF_CASES",
    "SELF_PUBLIC_ADDRESS",
    "SELF_PUBLIC_PORT",
    "SELF_WILDCARD_LOCAL_ADDRESS",
    "SELF_WILDCARD_PORT",
    "LateLoops",
    "LoopLedger",
    "SelfAttempt",
    "SelfCase",
    "SelfTarget",
    "SelfTargets",
    "describe_late_loops",
    "lab_ledger",
    "run_instance_control",
    "run_self_attempt",
    "self_attempt",
    "self_case_names",
    "spelling_for",
    "start_self_targets",
]

# The lab public address the harness starts a second instance of the proxy on: outside every
# special-use range, so only a self check can refuse it (network.md section 1.3).
SELF_PUBLIC_ADDRESS = "11.0.0.20"
SELF_PUBLIC_PORT = 8080
SELF_WILDCARD_PORT = 8081
# A wildcard listener's local addresses: a lab public origin (on lo since the lab started) and one the
# harness adds to lo only after the proxy started (a proxy that snapshots its addresses misses it),
# the first of ADDED_LATER_POOL not yet in the lab.
SELF_WILDCARD_LOCAL_ADDRESS = "11.0.0.10"
ADDED_LATER_POOL = tuple(f"11.0.0.{host}" for host in range(21, 64))
NONCE_PATH_PREFIX = "/proxy-self-loop-"

# --------------------------------------------------------------------------------------------------
# Cases (pure)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfCase:
    """One spelling of one target's address in one form; ``role`` tells a wildcard's addresses apart."""

    kind: str  # own | public | wildcard
    role: str  # "" | "local" | "added-later"
    spelling: SelfSpelling
    form: str  # connect | absolute

    @property
    def case_id(self) -> str:
        role = f"-{self.role}" if self.role else ""
        return f"proxy-self-{self.kind}{role}-{self.spelling.spelling_id}"

    @property
    def test_id(self) -> str:
        return f"{self.form}-{self.case_id}"

    @property
    def dns_name(self) -> str:
        return f"{self.case_id}.lab.test" if self.spelling.is_name else ""


def _build_cases() -> tuple[SelfCase, ...]:
    cases: list[SelfCase] = []
    for kind in ("own", "public"):
        cases += [SelfCase(kind, "", spelling, form) for spelling in SELF_SPELLINGS if spelling.version == 4
                  for form in ATTEMPT_FORMS]
    wildcard = [s for s in SELF_SPELLINGS if s.version == 4 and s.spelling_id in WILDCARD_SPELLINGS]
    for role in ("local", "added-later"):
        cases += [SelfCase("wildcard", role, spelling, form) for spelling in wildcard for form in ATTEMPT_FORMS]
    return tuple(cases)


# The harness starts the public and wildcard instances on IPv4 addresses it picks; an attached IPv6
# proxy's "own" cases use the IPv6 spellings of the same id (see ``spelling_for``).
SELF_CASES: tuple[SelfCase, ...] = _build_cases()
_IPV6_EQUIVALENT = {"dotted": "literal", "name-a": "name-aaaa", "name-aaaa-mapped": "name-aaaa"}


def spelling_for(case: SelfCase, address: str) -> SelfSpelling | None:
    """The case's spelling for a target whose address is ``address``; None if it has no equivalent."""
    if ":" not in address:
        return case.spelling
    wanted = _IPV6_EQUIVALENT.get(case.spelling.spelling_id)
    return next((s for s in SELF_SPELLINGS if s.version == 6 and s.spelling_id == wanted), None)


def self_case_names(cases: Iterable[SelfCase], address_of: Callable[[SelfCase], str | None]
                    ) -> dict[str, tuple[str, ...]]:
    """The lab DNS names the name cases need: name -> answers, for each target's address."""
    names: dict[str, tuple[str, ...]] = {}
    for case in cases:
        address = address_of(case)
        spelling = None if address is None else spelling_for(case, address)
        if address is not None and spelling is not None and spelling.is_name:
            names[case.dns_name] = spelling.render(address, case.dns_name)[1]
    return names


@dataclass(frozen=True)
class SelfAttempt(Attempt):
    """An :class:`Attempt` whose tunnel payload is a proxy request carrying a nonce.

    Through a tunnel to an origin that request would be answered by the origin itself; only a proxy at
    the far end forwards it, in origin-form, so the nonce path arriving at :data:`LOOP_ORIGIN` proves
    the tunnel reached a proxy: the one under test, since the tunnel was to its own socket address.
    """

    nonce: str = ""

    @property
    def nonce_path(self) -> str:
        return f"{NONCE_PATH_PREFIX}{self.nonce}"

    def tunnel_request_bytes(self, nonce: str | None = None) -> bytes:
        # The loop evidence is this attempt's own nonce path; a campaign nonce, if given, is not used.
        return (f"GET http://{LOOP_ORIGIN}{self.nonce_path} HTTP/1.1\r\nHost: {LOOP_ORIGIN}\r\n"
                "Connection: close\r\n\r\n").encode()


def self_attempt(case: SelfCase, endpoint: Endpoint, listening: str = "",
                 nonce: str | None = None) -> SelfAttempt | None:
    """The attempt for ``case`` at the proxy's socket address ``endpoint``; None if no spelling fits.

    ``listening`` says where the instance listens, for the message (e.g. a wildcard).
    """
    address, port = endpoint
    spelling = spelling_for(case, address)
    if spelling is None:
        return None
    host, _records = spelling.render(address, case.dns_name)
    note = f"{spelling.note}; {listening or 'the proxy listens on ' + endpoint_text(*endpoint)}"
    ssrf_case = SsrfCase(case.case_id, host, port, "name" if spelling.is_name else "literal", "denied", None, note)
    return SelfAttempt(ssrf_case, case.form, nonce or secrets.token_hex(8))


# --------------------------------------------------------------------------------------------------
# Running (lab sockets only)
# --------------------------------------------------------------------------------------------------


class SelfLoopLab(Protocol):
    """What running a case needs from a :class:`~pytest_sandbox.network.lab.lab.NetworkLab`."""

    @property
    def holder(self) -> Any: ...

    def all_hits(self) -> dict[tuple[str, int], int]: ...

    def origin_requests(self, addr: str | None = None, port: int | None = None) -> list[Any]: ...


@dataclass(frozen=True)
class SelfTarget:
    """An instance of the proxy under test and the socket address the cases spell.

    ``endpoint`` is what the cases attempt; ``connect`` opens a harness connection to the instance
    (not necessarily to ``endpoint``: a wildcard instance is reached on loopback). ``instance`` names
    the instance in messages.
    """

    kind: str
    role: str
    endpoint: Endpoint
    connect: Callable[[], socket.socket]
    instance: str


@dataclass(frozen=True)
class LateLoops:
    """What :meth:`LoopLedger.sweep` found at one endpoint that no attempt was charged with."""

    window: LoopWindow
    attempts: tuple[str, ...]  # the attempts that targeted the endpoint, in order


@dataclass
class LoopLedger:
    """Who connected to each watched endpoint: the harness (its own connections) or the proxy.

    ``table(port)`` reads the lab's socket table (rows with that port); ``opens()`` the lab's
    ``ActiveOpens`` counter; ``syns()`` (optional) the lab's per-destination count of SYNs that were not
    the harness's own, which sees what the table cannot (:class:`LoopWindow`). Both are read only when
    the counter moved by more than the harness's own connections, so an attempt the proxy refuses
    without dialling anything costs two counter reads. Dials that happen *between* attempts (a proxy
    that answers first and dials itself later) are kept as late loops for :meth:`sweep`, never charged
    to the next attempt.
    """

    table: Callable[[int], Sequence[TcpSocket]]
    opens: Callable[[], int]
    syns: Callable[[], Mapping[Endpoint, int]] | None = None
    ours: set[Endpoint] = field(default_factory=set)
    known: dict[Endpoint, frozenset[Endpoint]] = field(default_factory=dict)
    known_syns: dict[Endpoint, int] = field(default_factory=dict)
    quiet: dict[Endpoint, int] = field(default_factory=dict)  # ActiveOpens when ``known`` was last valid
    late: dict[Endpoint, LoopWindow] = field(default_factory=dict)
    attempts: dict[Endpoint, list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self, target: SelfTarget) -> socket.socket:
        """A harness connection to ``target``'s instance (one active open), remembered as the harness's own."""
        sock = target.connect()
        local = sock.getsockname()
        with self._lock:
            self.ours.add((_unmapped(str(local[0])), int(local[1])))
        return sock

    def _read(self, endpoint: Endpoint) -> frozenset[Endpoint]:
        found = peers_of(self.table(endpoint[1]), endpoint)
        with self._lock:
            return frozenset(found - self.ours)

    def _syn_counts(self) -> Mapping[Endpoint, int]:
        return self.syns() if self.syns is not None else {}

    def _observe(self, endpoint: Endpoint, now: int, current: frozenset[Endpoint],
                 syn_counts: Mapping[Endpoint, int]) -> LoopWindow:
        """What reached ``endpoint`` since it was last read (``current``: its table now; ``syn_counts``: read after
        the table, so a SYN the table shows is always counted); what is there now becomes known."""
        syns = syn_counts.get(endpoint, 0)
        new = current - self.known.get(endpoint, current)
        reused = max(0, syns - self.known_syns.get(endpoint, syns) - len(new))
        self.known[endpoint], self.known_syns[endpoint], self.quiet[endpoint] = current, syns, now
        return LoopWindow(tuple(sorted(new)), reused)

    def _keep_late(self, endpoints: Sequence[Endpoint]) -> None:
        """What reached ``endpoints`` since each was last read, outside any attempt's window, kept as late
        loops; the SYN counts (two ``nft`` reads in the lab) are read once for all of them, after their tables."""
        now = self.opens()
        stale = [endpoint for endpoint in endpoints if endpoint not in self.known or now != self.quiet[endpoint]]
        tables = {endpoint: self._read(endpoint) for endpoint in stale}
        syn_counts = self._syn_counts() if stale else {}
        for endpoint in stale:
            late = self._observe(endpoint, now, tables[endpoint], syn_counts)
            if late:
                self.late[endpoint] = self.late.get(endpoint, LoopWindow()) + late

    def begin(self, endpoint: Endpoint) -> None:
        """Open an attempt's window on ``endpoint``. Raises OSError if the lab cannot be read."""
        self._keep_late([endpoint])

    def end(self, endpoint: Endpoint, test_id: str, connects: int = 1) -> LoopWindow:
        """Close the window in which the harness opened ``connects`` connections: what reached
        ``endpoint`` that the harness did not make. Raises OSError."""
        self.attempts.setdefault(endpoint, []).append(test_id)
        now = self.opens()
        if now == self.quiet[endpoint] + connects:
            self.quiet[endpoint] = now
            return LoopWindow()
        current = self._read(endpoint)
        return self._observe(endpoint, now, current, self._syn_counts())

    def sweep(self) -> dict[Endpoint, LateLoops]:
        """The loops no attempt was charged with, per endpoint, read now."""
        self._keep_late(list(self.known))
        return {endpoint: LateLoops(window, tuple(self.attempts.get(endpoint, ())))
                for endpoint, window in self.late.items() if window}


def _unmapped(address: str) -> str:
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def lab_ledger(lab: SelfLoopLab) -> LoopLedger:
    """A ledger reading the lab's socket table and counters through the lab holder's /proc entry."""
    pid = int(lab.holder.pid)

    def table(port: int) -> Sequence[TcpSocket]:
        return read_tcp_table(pid, port=port)

    return LoopLedger(table, lambda: read_active_opens(pid), lab.holder.syn_counts)


def _nonce_request(lab: SelfLoopLab, attempt: SelfAttempt, already: int) -> str | None:
    # In origin-form: a proxy forwarded it (RFC 9112 §3.2.1). Had the tunnel led straight to the origin,
    # the origin would have seen the absolute-form target the harness wrote.
    for request in lab.origin_requests(LOOP_ORIGIN)[already:]:
        if request.target == attempt.nonce_path:
            return f"{request.method} {request.target}"
    return None


def run_self_attempt(attempt: SelfAttempt, target: SelfTarget, lab: SelfLoopLab, ledger: LoopLedger
                     ) -> tuple[Judgement, LoopEvidence]:
    """Send ``attempt`` to ``target``'s instance; judge it with the canaries and the loop evidence."""
    endpoint = target.endpoint
    error = ""
    try:
        ledger.begin(endpoint)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    hits_before = lab.all_hits()
    origin_before = len(lab.origin_requests(LOOP_ORIGIN)) if attempt.form == "connect" else 0
    with ledger.connect(target) as sock:
        reply = send_attempt(sock, attempt)
    window = LoopWindow()
    if not error:
        try:
            window = ledger.end(endpoint, attempt.test_id)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    # The nonce goes out only inside an established tunnel; without one it cannot reach the origin.
    nonce = _nonce_request(lab, attempt, origin_before) if reply.tunnelled is not None else None
    evidence = LoopEvidence(endpoint, window, nonce, error)
    return judge_self_attempt(attempt, reply, new_hits(hits_before, lab.all_hits()), evidence), evidence


def describe_late_loops(late: Mapping[Endpoint, LateLoops]) -> str:
    """One line per endpoint that was dialled after its attempts were judged."""
    lines = []
    for endpoint, found in late.items():
        sources = [endpoint_text(*peer) for peer in found.window.peers]
        if found.window.reused:
            more = " more" if sources else ""
            sources.append(f"{found.window.reused}{more} that reused a 4-tuple still in TIME_WAIT, counted by the "
                           "lab's SYN counter")
        lines.append(f"{len(found.window.peers) + found.window.reused} late connection(s) to the proxy's own "
                     f"{endpoint_text(*endpoint)} (from {', '.join(sources)}) after the attempts "
                     f"{', '.join(found.attempts)}")
    return "; ".join(lines)


# --------------------------------------------------------------------------------------------------
# Targets: the instances the cases run against
# --------------------------------------------------------------------------------------------------


class ProxyInstance(Protocol):
    """A proxy reachable from the lab (``RunningProxy``, ``ThirdPartyProxy``, ``AttachedProxy``)."""

    address: str
    port: int

    def connect(self, timeout: float = ...) -> socket.socket: ...

    def stop(self) -> None: ...


class TargetLab(SelfLoopLab, Protocol):
    def popen(self, argv: list[str], **kwargs: Any) -> Any: ...

    def connect(self, addr: str, port: int, timeout: float = ...) -> socket.socket: ...

    def socket(self, family: int = ..., type: int = ..., proto: int = ...) -> socket.socket: ...

    def add_name(self, name: str, addresses: Iterable[str]) -> None: ...


StartInstance = Callable[[str, int], ProxyInstance]


@dataclass
class SelfTargets:
    """The targets of one run of the self cases, the ledger that watches them, and what to stop."""

    targets: dict[tuple[str, str], SelfTarget]
    unavailable: dict[str, str]  # kind -> why the harness has no instance for it
    ledger: LoopLedger
    instances: list[ProxyInstance] = field(default_factory=list)

    def target(self, case: SelfCase) -> SelfTarget | str:
        """The target for ``case``, or why there is none (an INDETERMINATE reason)."""
        found = self.targets.get((case.kind, case.role))
        return found if found is not None else self.unavailable.get(case.kind, f"no {case.kind} target")

    def stop(self) -> None:
        for instance in self.instances:
            instance.stop()
        self.instances.clear()


def _reachable(lab: TargetLab, address: str, port: int) -> bool:
    try:
        lab.connect(address, port, timeout=1.0).close()
    except OSError:
        return False
    return True


def _describe_instance(instance: ProxyInstance, how: str) -> str:
    return f"{how} listens on {endpoint_text(instance.address, instance.port)}"


def start_self_targets(lab: TargetLab, proxy: ProxyInstance, start_instance: StartInstance | None, *,
                       no_instance_reason: str, cases: Sequence[SelfCase] = SELF_CASES) -> SelfTargets:
    """Make the targets: the proxy as given; an instance on :data:`SELF_PUBLIC_ADDRESS`; one on 0.0.0.0.

    ``start_instance(address, port)`` starts another instance of the proxy under test (the reference
    proxy, or ``--sandbox-proxy-cmd`` with ``{address}``). Without it, the proxy as given is used
    for the public and wildcard targets if it answers on a lab public address (it listens on a
    wildcard); otherwise those targets are unavailable for ``no_instance_reason``. Names for the
    name cases are registered in the lab's DNS. The caller stops the returned targets.
    """
    lab.holder.add_address(SELF_PUBLIC_ADDRESS)
    ledger = lab_ledger(lab)
    own_address = "127.0.0.1" if proxy.address in ("0.0.0.0", "::") else proxy.address
    targets: dict[tuple[str, str], SelfTarget] = {
        ("own", ""): SelfTarget("own", "", (own_address, proxy.port), proxy.connect,
                                _describe_instance(proxy, "the proxy under test")),
    }
    result = SelfTargets(targets, {}, ledger)
    public: ProxyInstance | None = None
    wildcard: ProxyInstance | None = None
    if start_instance is not None:
        for kind, address, port in (("public", SELF_PUBLIC_ADDRESS, SELF_PUBLIC_PORT),
                                    ("wildcard", "0.0.0.0", SELF_WILDCARD_PORT)):
            try:
                # The preferred port unless something (or a TIME-WAIT socket of an earlier run) holds it.
                instance = start_instance(address, find_free_lab_port(lab, address, preferred=port))
            except (OSError, RuntimeError, ValueError) as exc:
                result.unavailable[kind] = f"could not start the proxy under test on {address}:{port}: {exc}"
                continue
            result.instances.append(instance)
            if kind == "public":
                public = instance
            else:
                wildcard = instance
    elif _reachable(lab, SELF_PUBLIC_ADDRESS, proxy.port):
        # The proxy as given answers on a lab public address: it listens on a wildcard.
        public = wildcard = proxy
    else:
        result.unavailable["public"] = result.unavailable["wildcard"] = no_instance_reason
    if public is not None:
        how = "the proxy under test" if public is proxy else "a second instance of the proxy under test"
        targets["public", ""] = SelfTarget("public", "", (SELF_PUBLIC_ADDRESS, public.port), public.connect,
                                           _describe_instance(public, how))
    if wildcard is not None:
        how = "the proxy under test" if wildcard is proxy else "an instance of the proxy under test"
        # "In the lab" means what a wildcard listener really receives on: the lab's own record
        # (NetnsHolder.owned_addresses), never a bind(2) probe, which the catch-all's AnyIP routes
        # answer "local" for every IPv4 address.
        owned = lab.holder.owned_addresses()
        later = next((a for a in ADDED_LATER_POOL if a not in owned), None)
        if later is None:
            result.unavailable["wildcard"] = "every address of the added-later pool is already in the lab"
        elif SELF_WILDCARD_LOCAL_ADDRESS not in owned:
            result.unavailable["wildcard"] = (f"{SELF_WILDCARD_LOCAL_ADDRESS} is not an address of the lab, so a "
                                              "wildcard listener would not receive connections to it")
        else:
            lab.holder.add_address(later)  # after the instance started: a snapshot taken at start misses it
            for role, address in (("local", SELF_WILDCARD_LOCAL_ADDRESS), ("added-later", later)):
                targets["wildcard", role] = SelfTarget("wildcard", role, (address, wildcard.port), wildcard.connect,
                                                       _describe_instance(wildcard, how))
    for name, answers in self_case_names(cases, lambda c: _address_of(result, c)).items():
        lab.add_name(name, answers)
    return result


def _address_of(targets: SelfTargets, case: SelfCase) -> str | None:
    found = targets.target(case)
    return found.endpoint[0] if isinstance(found, SelfTarget) else None


def run_instance_control(target: SelfTarget, lab: SelfLoopLab, ledger: LoopLedger) -> Judgement:
    """Positive control: the instance behind ``target`` forwards an ordinary request to the origin.

    Without it, an instance that refuses everything (or is not a proxy at all) would pass every
    self case.
    """
    path = f"/proxy-self-control-{secrets.token_hex(8)}"
    already = len(lab.origin_requests(LOOP_ORIGIN))
    expected = f"200 from origin {LOOP_ORIGIN}, which recorded GET {path}"
    with ledger.connect(target) as sock:
        sock.sendall(f"GET http://{LOOP_ORIGIN}{path} HTTP/1.1\r\nHost: {LOOP_ORIGIN}\r\n"
                     "Connection: close\r\n\r\n".encode())
        reply, _closed = read_one_response(sock, time.monotonic() + ATTEMPT_TIMEOUT_SECONDS)
    reached = [r for r in lab.origin_requests(LOOP_ORIGIN)[already:] if r.target.endswith(path)]
    observed = f"{reply.status}, origin requests with the path: {len(reached)}"
    if reply.status == 200 and reached:
        return Judgement(Verdict.WORKS, f"{target.instance} and forwards to {LOOP_ORIGIN}", expected, observed)
    return Judgement(Verdict.BROKEN, f"{target.instance} but did not forward an allowed request to "
                         f"{LOOP_ORIGIN}: its refusals of its own address prove nothing", expected, observed)
