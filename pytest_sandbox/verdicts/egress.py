"""The egress judges: where the sandboxed process ran and what its direct connects met -> Judgements. Pure.

The probe (``probes/egress.py``) runs a stdlib script inside the sandbox and the harness's listeners
watch; what they report (:class:`ProbeReport`, the listeners that saw an attempt) is judged here, so
the rules of the category can be read and table-tested without a sandbox.
"""

from __future__ import annotations

import errno as errno_module
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_sandbox.verdicts.judgement import Judgement, Outcome, Verdict

if TYPE_CHECKING:
    from pytest_sandbox.network.netns import NetnsId

__all__ = [
    "DIRECT_EXPECTED",
    "ESCAPE_EXPECTED",
    "LAUNCHER_NAMESPACE_EXPECTED",
    "LOOPBACK_EXPECTED",
    "NAMESPACE_EXPECTED",
    "PROXY_EXPECTED",
    "PUBLIC_ORIGIN",
    "EgressTarget",
    "EscapeAttempt",
    "EscapeAttempts",
    "HeldSocket",
    "Namespaces",
    "ProbeReport",
    "SetnsResult",
    "TargetOutcome",
    "judge_direct",
    "judge_escape",
    "judge_loopback_control",
    "judge_namespace",
    "judge_proxy_control",
]

PUBLIC_ORIGIN = "11.0.0.10"  # the lab origin the proxy control must reach


@dataclass(frozen=True)
class EgressTarget:
    """One direct connection (``tcp``) or datagram (``udp``) the sandboxed process attempts. ``loopback``
    targets never leave the machine, so they are attempted from any namespace; the others only from one the
    harness made."""

    target_id: str
    address: str
    port: int
    what: str
    loopback: bool = False
    transport: str = "tcp"  # tcp | udp

    @property
    def attempt(self) -> str:
        return "UDP datagram" if self.transport == "udp" else "connection"


@dataclass(frozen=True)
class Namespaces:
    """The namespaces the harness can name: the host's (its own), the lab's, and either the one it made for the
    process (``own``: the reference launcher) or the one it started a third party's launcher in (``stand_in``,
    wired into the lab: ``network/lab/wired.py``), which makes the process's namespace its own business."""

    host: NetnsId
    lab: NetnsId
    own: NetnsId | None
    stand_in: NetnsId | None = None
    # Whether every interface of the host's namespace is a loopback (None: not looked at). The stand-in and the lab
    # never are: they hold the veth pair that wires one to the other.
    host_loopback_only: bool | None = None

    @property
    def harness_made(self) -> tuple[NetnsId, ...]:
        """Where the probe may dial off-host destinations: every packet there stays in the harness's namespaces."""
        return tuple(netns for netns in (self.own, self.stand_in, self.lab) if netns is not None)

    def name(self, netns: NetnsId | None) -> str:
        if netns is None:
            return "an unknown"
        names = {self.host: "the host's", self.lab: "the lab's"}
        if self.own is not None:
            names[self.own] = "its own (made by the harness)"
        if self.stand_in is not None:
            names[self.stand_in] = "the stand-in host's (the harness's, where its launcher started, wired into the lab)"
        return names.get(netns, f"a launcher-made (inode {netns[1]})" if self.own is None
                         else f"an unknown one (inode {netns[1]})")

    def isolated(self, report: ProbeReport) -> bool:
        """Did the process run where nothing but its own loopback is reachable? With the reference launcher: in
        the namespace made for it. With a third party's: in a namespace that is none of the harness's and whose
        every interface is a loopback (a namespace a launcher made that holds only ``lo``)."""
        if self.own is not None:
            return report.netns == self.own
        if report.netns is None:
            # Its identity unknown (no /proc, no CAP_NET_ADMIN for SIOCGSKNS): a namespace with nothing but loopbacks
            # is none of the harness's when none of those is loopback-only.
            return self.stand_in is not None and self.host_loopback_only is False and report.loopback_only
        return report.netns not in (self.host, self.lab, self.stand_in) and report.loopback_only


@dataclass(frozen=True)
class TargetOutcome:
    """What the probe met: ``connected`` (a TCP connect, or a UDP reply), ``errno`` (at ``stage``: connect, send
    or recv; a UDP ECONNREFUSED at recv is an ICMP port unreachable, RFC 1122 §4.1.3.3), ``timeout`` (TCP),
    ``sent`` (a UDP datagram left without error and nothing answered), ``skipped`` or ``missing``."""

    kind: str
    errno: int | None = None
    stage: str = "connect"

    def describe(self) -> str:
        if self.kind == "errno" and self.errno is not None:
            return f"{self.stage} failed with {errno_module.errorcode.get(self.errno, str(self.errno))}"
        return {"connected": "connected", "timeout": "connect timed out", "missing": "no result",
                "sent": "datagram sent without error, no reply and no refusal",
                "skipped": "not attempted (from where it runs, a packet could leave the machine)",
                }.get(self.kind, self.kind)


@dataclass(frozen=True)
class SetnsResult:
    """One way of calling setns(2) on one handle: ``stage`` is ``entered`` (``way``: native, native nstype 0,
    native high bits, i386), ``open`` (the handle would not open: ``number`` is the errno), ``setns`` (every such
    call failed: the first errno), ``nofd`` (no handle on its own namespace, so setns(-1): EBADF means the call
    reached the kernel, which checks the fd first; any other errno is the filter's), ``killed`` (the child trying it
    died: ``number`` is the signal) or ``lost``."""

    stage: str
    number: int | None = None
    way: str | None = None

    @property
    def entered(self) -> bool:
        return self.stage == "entered"

    def describe(self) -> str:
        if self.stage == "entered":
            return f"entered ({self.way})"
        if self.stage == "killed" and self.number:
            return Outcome.killed_by(self.number).describe()
        if self.stage == "setns" and not self.number:
            return "setns returned 0 and moved nothing (a filter's ERRNO(0))"
        if self.stage in ("open", "setns") and self.number:
            return f"{self.stage} failed with {Outcome.errno(self.number).describe()}"
        if self.stage == "nofd":
            answer = f"failed with {Outcome.errno(self.number).describe()}" if self.number else "returned 0"
            return f"setns(-1) {answer}" + (" (it reached the kernel)" if self.reached_kernel
                                            else " (its filter answered)")
        return "no result"

    @property
    def reached_kernel(self) -> bool:
        """setns(-1) answered by the kernel itself (EBADF), not by a filter."""
        return self.stage == "nofd" and self.number == errno_module.EBADF

    @property
    def refused(self) -> bool:
        """setns(2) failed or killed the caller; with no handle (``nofd``), a filter's refusal, not EBADF."""
        return self.stage in ("setns", "killed") or (self.stage == "nofd" and not self.reached_kernel)


@dataclass(frozen=True)
class EscapeAttempt:
    """setns(2) into one network namespace (``path`` None: its own), natively and through i386 (None: not tried)."""

    path: str | None
    netns: NetnsId | None
    native: SetnsResult
    i386: SetnsResult | None

    @property
    def entered(self) -> SetnsResult | None:
        return next((way for way in (self.native, self.i386) if way is not None and way.entered), None)

    @property
    def refused(self) -> bool:
        """Every way tried failed at setns(2) or killed the caller (not: a handle that would not open)."""
        return self.entered is None and self.native.refused and (self.i386 is None or self.i386.refused)

    @property
    def kept_out(self) -> bool:
        """Refused, or the kernel would not let it open the handle (EACCES, EPERM: ptrace access mode, proc(5));
        not a handle that vanished (its process ended) or a result that was lost."""
        return self.refused or (self.native.stage == "open" and self.native.number in (errno_module.EACCES,
                                                                                        errno_module.EPERM))

    def describe(self) -> str:
        if (way := self.entered) is not None:
            return way.describe()
        return f"native: {self.native.describe()}" + (f"; i386: {self.i386.describe()}" if self.i386 else "")


@dataclass(frozen=True)
class HeldSocket:
    """A TCP or UDP socket the process held without making it (a launcher's leak), ``state`` unconnected, connected,
    listening or spent (a TCP connection that ended: it cannot connect again). Its namespace: ``netns``
    (SIOCGSKNS), else ``here``: did it reach a socket of the process's on its own loopback (False: made in another
    namespace; None: not known)."""

    fd: int
    transport: str
    state: str
    netns: NetnsId | None = None
    here: bool | None = None

    @property
    def leads_out(self) -> bool:
        """Can it reach a destination of the process's choosing? An unconnected TCP socket, any UDP socket."""
        return self.transport == "udp" or self.state == "unconnected"

    def foreign(self, own: NetnsId | None) -> bool | None:
        if self.netns is not None and own is not None:
            return self.netns != own
        return None if self.here is None else not self.here

    def describe(self, namespaces: Namespaces) -> str:
        where = (f"of {namespaces.name(self.netns)} namespace" if self.netns is not None else
                 {True: "of its own namespace", False: "made in another namespace (it could not reach its own "
                  "loopback)", None: "of a namespace it could not tell"}[self.here])
        article = "an" if self.state[0] in "aeiou" else "a"
        return f"{article} {self.state} {self.transport.upper()} socket (fd {self.fd}) {where}"


@dataclass(frozen=True)
class EscapeAttempts:
    """The probe's way back out of its network namespace: setns(2) into its own (``own``: does the call work at all)
    and into each other namespace it could name (``others``: every process's in /proc, /run/netns, its open fds);
    ``unreadable`` counts the handles the kernel would not let it look at, by errno (ptrace access mode, proc(5));
    ``proc`` is whether it had a /proc to look in; ``i386_error`` why the i386 way was not tried."""

    own: EscapeAttempt | None
    others: tuple[EscapeAttempt, ...]
    unreadable: dict[str, int]
    proc: bool
    i386_error: str | None = None
    error: str = ""
    sockets: tuple[HeldSocket, ...] = ()
    cap_sys_admin: bool | None = None  # in its effective set (capget(2)); None: not known

    def refusals(self) -> int:
        """Handles the kernel would not let it look at or open, or whose every setns(2) failed."""
        return sum(self.unreadable.values()) + sum(1 for attempt in self.others if attempt.kept_out)


@dataclass(frozen=True)
class ProbeReport:
    netns: NetnsId | None
    outcomes: dict[str, TargetOutcome]
    proxy: dict[str, Any] | None
    error: str = ""  # why the probe did not report (non-zero exit, no JSON)
    interfaces: tuple[tuple[str, bool], ...] | None = None  # (name, is a loopback) in the process's namespace
    loopback_control: dict[str, Any] | None = None  # the TCP round trip over its own loopback, when asked
    escape: EscapeAttempts | None = None  # its setns(2) attempts, when asked

    def outcome(self, target_id: str) -> TargetOutcome:
        return self.outcomes.get(target_id, TargetOutcome("missing"))

    @property
    def loopback_only(self) -> bool:
        return bool(self.interfaces) and all(loopback for _name, loopback in self.interfaces or ())

    def describe_interfaces(self) -> str:
        if self.interfaces is None:
            return "its interfaces unknown"
        return "interfaces " + ", ".join(f"{name}{' (loopback)' if loopback else ''}"
                                         for name, loopback in self.interfaces)


NAMESPACE_EXPECTED = "the process runs in the network namespace the harness made for it (not the host's or the lab's)"
LAUNCHER_NAMESPACE_EXPECTED = ("the process runs in a network namespace of its own whose every interface is a loopback "
                               "(not the one its launcher was started in, the host's or the lab's)")
DIRECT_EXPECTED = ("connect (a UDP datagram: connect, send or the wait for a reply) fails with an errno where the "
                   "process runs, and no listener (host loopback, lab) sees it")
PROXY_EXPECTED = "a GET through the proxy's address reaches the lab origin (200 from it, request recorded)"
ESCAPE_EXPECTED = ("setns(2) into any other network namespace the process can name (/proc/<pid>/ns/net, /run/netns, "
                   "its open fds) is refused, and so is setns(2) itself if it can name none; it holds no unconnected "
                   "TCP or any UDP socket of another namespace")
LOOPBACK_EXPECTED = "a TCP round trip over the process's own loopback (127.0.0.1) carries the probe's nonce"


def judge_namespace(report: ProbeReport, namespaces: Namespaces) -> Judgement:
    expected = NAMESPACE_EXPECTED if namespaces.own is not None else LAUNCHER_NAMESPACE_EXPECTED
    observed = f"runs in {namespaces.name(report.netns)} network namespace, {report.describe_interfaces()}" + (
        f" ({report.error})" if report.error else "")
    if report.netns is None:
        if namespaces.isolated(report):
            return Judgement(Verdict.BLOCKED, "the process runs in a namespace with nothing but a loopback, which none "
                             "of the harness's is (its identity unknown: no /proc/self/ns/net, no SIOCGSKNS)", expected,
                             observed)
        return Judgement(Verdict.INDETERMINATE, "the probe could not tell which namespace it runs in (no "
                         "/proc/self/ns/net, no SIOCGSKNS)", expected, observed)
    if report.netns == namespaces.host:
        return Judgement(Verdict.ALLOWED, "the process shares the host's network namespace: the launcher "
                         "isolated nothing", expected, observed)
    if report.netns == namespaces.lab:
        return Judgement(Verdict.ALLOWED, "the process runs in the lab's namespace, next to every destination "
                         "the proxy is meant to guard", expected, observed)
    if report.netns == namespaces.stand_in:
        return Judgement(Verdict.ALLOWED, "the process stayed in the namespace its launcher was started in: the "
                         "launcher isolated nothing (from there every lab address is reachable)", expected, observed)
    if namespaces.isolated(report):
        return Judgement(Verdict.BLOCKED, "the process runs in the namespace made for it" if namespaces.own
                         is not None else "the process runs in a namespace of its own with nothing but a loopback",
                         expected, observed)
    if namespaces.own is None:
        return Judgement(Verdict.INDETERMINATE, "the process runs in a namespace its launcher made with an "
                         "interface that is not a loopback: where it leads is not probed (a packet there could leave "
                         "the machine)", expected, observed)
    return Judgement(Verdict.INDETERMINATE, "the process runs in a namespace the harness did not make, so "
                     "nothing here can say what it reaches", expected, observed)


def judge_direct(target: EgressTarget, report: ProbeReport, namespaces: Namespaces, seen: str) -> Judgement:
    """``seen`` names the harness listeners that saw this attempt ("" if none)."""
    outcome = report.outcome(target.target_id)
    where = namespaces.name(report.netns)
    observed = f"{outcome.describe()}; runs in {where} namespace; " + (f"seen by {seen}" if seen else "no listener "
                                                                        "saw it") + (f" ({report.error})"
                                                                                    if report.error else "")
    if seen:
        return Judgement(Verdict.ALLOWED, f"direct {target.attempt} to the {target.what} reached {seen}",
                         DIRECT_EXPECTED, observed)
    if outcome.kind == "connected":
        return Judgement(Verdict.ALLOWED, f"direct {target.attempt} to the {target.what} "
                         f"{'was answered' if target.transport == 'udp' else 'succeeded'}", DIRECT_EXPECTED,
                         observed)
    if report.netns == namespaces.host:
        return Judgement(Verdict.ALLOWED, f"the process shares the host's network namespace: nothing stands "
                         f"between it and the {target.what}", DIRECT_EXPECTED, observed)
    if report.netns == namespaces.lab:
        return Judgement(Verdict.ALLOWED, f"the process runs in the lab's namespace, where the {target.what} "
                         "is reachable", DIRECT_EXPECTED, observed)
    if outcome.kind == "timeout":
        return Judgement(Verdict.INDETERMINATE, "the connect timed out: neither refused nor shown isolated",
                         DIRECT_EXPECTED, observed)
    if outcome.kind != "errno":
        return Judgement(Verdict.INDETERMINATE, f"no refusal to judge ({outcome.describe()})", DIRECT_EXPECTED,
                         observed)
    # A refusal counts where everything the process could reach is known: its own isolated namespace, or the
    # launcher's starting namespace, from which every lab address is reachable and watched (so its filter refused).
    watched = report.netns is not None and report.netns == namespaces.stand_in
    if not (namespaces.isolated(report) or watched):
        return Judgement(Verdict.INDETERMINATE, f"refused, but in {where} namespace ({report.describe_interfaces()}), "
                         "which nothing shows isolated", DIRECT_EXPECTED, observed)
    if target.transport == "udp" and outcome.stage == "recv" and not target.loopback:
        # The datagram left: an ICMP error came back (RFC 1122 §4.1.3.3), which a REJECT rule on its way and a
        # host it reached both send. Only the loopback targets' ICMP is known to come from the process's own
        # namespace (no host listener saw the datagram).
        return Judgement(Verdict.INDETERMINATE, f"the datagram was sent and an ICMP error came back "
                         f"({outcome.describe()}): from a filter or from a host it reached", DIRECT_EXPECTED,
                         observed)
    if watched:
        return Judgement(Verdict.BLOCKED, f"direct {target.attempt} refused ({outcome.describe()}) where every lab "
                         "address is reachable and watched: the sandbox refused it", DIRECT_EXPECTED, observed)
    return Judgement(Verdict.BLOCKED, f"direct {target.attempt} refused ({outcome.describe()}) in the process's "
                     "own namespace", DIRECT_EXPECTED, observed)


def judge_escape(report: ProbeReport, namespaces: Namespaces) -> Judgement:
    """Can the process get back out of its namespace? A namespace of its own proves nothing if setns(2) takes it
    into the host's: a root launcher that keeps CAP_SYS_ADMIN and filters nothing (``unshare -n``, bubblewrap run as
    root without ``--cap-drop ALL``) lets it enter the namespace of any process it sees in /proc (setns(2) wants
    CAP_SYS_ADMIN over its own user namespace and the target's; #819 refuses setns outright). BLOCKED: setns(2)
    itself refused every way it was called (then no handle helps), or it works and every other namespace the
    process could name refused it; a process that could name none, with setns(2) working, is INDETERMINATE.
    The other way back is a socket made outside that the launcher leaked: an unconnected TCP socket or any UDP
    socket of another namespace connects or sends from there (ALLOWED; one whose namespace the probe could not
    tell is INDETERMINATE); a connected, listening or spent TCP socket reaches no destination of its choosing."""
    attempts = report.escape
    if attempts is None or attempts.own is None:
        reason = attempts.error if attempts is not None and attempts.error else "the probe made no setns(2) attempt"
        return Judgement(Verdict.INDETERMINATE, reason, ESCAPE_EXPECTED, report.error or "no attempts reported")
    # the namespaces the harness can name first (the host's above all), then any others
    known = (namespaces.host, namespaces.stand_in, namespaces.lab)
    own = attempts.own
    others = sorted(attempts.others, key=lambda attempt: known.index(attempt.netns) if attempt.netns in known
                    else len(known))
    unreadable = ", ".join(f"{count} {name}" for name, count in sorted(attempts.unreadable.items()))
    observed = (f"setns into its own namespace: {own.describe()}; {len(others)} other namespace(s) it could name"
                + (": " + "; ".join(f"{namespaces.name(attempt.netns)} ({attempt.path}) {attempt.describe()}"
                                    for attempt in others[:6]) if others else "")
                + (f" (+{len(others) - 6} more)" if len(others) > 6 else "")
                + (f"; handles it could not open: {unreadable}" if unreadable else "")
                + ("" if attempts.proc else "; no /proc")
                + (f"; i386 not tried: {attempts.i386_error}" if attempts.i386_error else ""))
    held = [sock for sock in attempts.sockets if sock.leads_out]
    if attempts.sockets:
        observed += "; it holds " + ", ".join(sock.describe(namespaces) for sock in attempts.sockets)
    leaked = [sock for sock in held if sock.foreign(report.netns)]
    if leaked:
        return Judgement(Verdict.ALLOWED, f"the process holds {leaked[0].describe(namespaces)}: a connection or "
                         "datagram from it leaves from there", ESCAPE_EXPECTED, observed)
    entered = [attempt for attempt in others if attempt.entered is not None]
    if entered:
        where = ", ".join(f"{namespaces.name(attempt.netns)} ({attempt.path}, {attempt.describe()})"
                          for attempt in entered[:3])
        return Judgement(Verdict.ALLOWED, f"setns(2) took the process into another network namespace, {where}: "
                         "its own namespace is no boundary", ESCAPE_EXPECTED, observed)
    unknown = [sock for sock in held if sock.foreign(report.netns) is None]
    if unknown:
        return Judgement(Verdict.INDETERMINATE, f"the process holds {unknown[0].describe(namespaces)}",
                         ESCAPE_EXPECTED, observed)
    if attempts.i386_error:
        return Judgement(Verdict.INDETERMINATE, f"setns(2) through the i386 ABI could not be tried "
                         f"({attempts.i386_error})", ESCAPE_EXPECTED, observed)
    if own.refused:
        return Judgement(Verdict.BLOCKED, f"setns(2) is refused every way it was called ({own.describe()}), whatever "
                         f"the namespace; {attempts.refusals()} other handle(s) it could name refused too",
                         ESCAPE_EXPECTED, observed)
    if own.native.stage == "nofd" and own.entered is None:
        # No handle on its own namespace, and setns(2) reaches the kernel: it refuses a network namespace to a caller
        # without CAP_SYS_ADMIN in its own user namespace whatever the handle (setns(2), net/core/net_namespace.c
        # netns_install).
        if attempts.cap_sys_admin is False:
            return Judgement(Verdict.BLOCKED, f"setns(2) reaches the kernel ({own.describe()}), which refuses it "
                             "whatever the namespace: CAP_SYS_ADMIN is not in the process's effective set (capget)",
                             ESCAPE_EXPECTED, observed + "; CAP_SYS_ADMIN not effective")
        held_cap = "unknown" if attempts.cap_sys_admin is None else "in its effective set"
        return Judgement(Verdict.INDETERMINATE, f"no handle on its own namespace to try setns(2) with, which "
                         f"reaches the kernel ({own.describe()}); CAP_SYS_ADMIN {held_cap}", ESCAPE_EXPECTED, observed)
    if own.entered is None:
        return Judgement(Verdict.INDETERMINATE, f"setns(2) into its own namespace gave no verdict ({own.describe()})",
                         ESCAPE_EXPECTED, observed)
    if not attempts.proc:
        return Judgement(Verdict.INDETERMINATE, f"setns(2) works ({own.entered.describe()}) and without /proc the "
                         "process could not look for other namespaces or the handles it holds", ESCAPE_EXPECTED,
                         observed)
    if attempts.refusals():
        return Judgement(Verdict.BLOCKED, f"setns(2) works ({own.entered.describe()}), but each of the "
                         f"{attempts.refusals()} other namespace handle(s) it could name refused it", ESCAPE_EXPECTED,
                         observed)
    return Judgement(Verdict.INDETERMINATE, f"setns(2) works ({own.entered.describe()}) and the process could name no "
                     "other network namespace to try", ESCAPE_EXPECTED, observed)


def judge_loopback_control(report: ProbeReport, nonce: str) -> Judgement:
    """The positive control of a third party's launcher, which has no proxy the harness knows of: ordinary
    networking inside the process's own namespace still works, so a launcher that breaks every socket does not
    score 100 %."""
    control = report.loopback_control or {}
    unreported = "no round trip reported" + (f" ({report.error})" if report.error else "")
    observed = f"echoed {control['echoed']!r}" if "echoed" in control else str(control.get("error") or unreported)
    if control.get("echoed") == nonce:
        return Judgement(Verdict.WORKS, "the process's own loopback works", LOOPBACK_EXPECTED, observed)
    return Judgement(Verdict.BROKEN, "the sandboxed process could not use even its own loopback", LOOPBACK_EXPECTED,
                     observed)


def judge_proxy_control(report: ProbeReport, reached_origin: int) -> Judgement:
    proxy = report.proxy or {}
    observed = (f"proxy answered {proxy.get('status_line')!r} from origin {proxy.get('origin')!r}" if "status_line"
                in proxy else str(proxy.get("error") or "not attempted (not in a namespace the harness made)"))
    observed += f"; origin recorded {reached_origin} request(s) with the probe's nonce"
    status = str(proxy.get("status_line", "")).split(" ")
    if len(status) >= 2 and status[1] == "200" and proxy.get("origin") == PUBLIC_ORIGIN and reached_origin == 1:
        return Judgement(Verdict.WORKS, "the proxy's address is reachable and routes to the lab origin",
                             PROXY_EXPECTED, observed)
    return Judgement(Verdict.BROKEN, "the sandboxed process could not use its proxy", PROXY_EXPECTED, observed)
