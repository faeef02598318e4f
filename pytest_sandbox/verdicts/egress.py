"""The egress judges: where the sandboxed process ran and what its direct connects met -> Judgements. Pure.

The probe (``probes/egress.py``) runs a stdlib script inside the sandbox and the harness's listeners
watch; what they report (:class:`ProbeReport`, the listeners that saw an attempt) is judged here, so
the rules of the category can be read and table-tested without a sandbox.
"""

from __future__ import annotations

import errno as errno_module
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_sandbox.verdicts.judgement import Judgement, Verdict

if TYPE_CHECKING:
    from pytest_sandbox.network.netns import NetnsId

__all__ = [
    "DIRECT_EXPECTED",
    "NAMESPACE_EXPECTED",
    "PROXY_EXPECTED",
    "PUBLIC_ORIGIN",
    "EgressTarget",
    "Namespaces",
    "ProbeReport",
    "TargetOutcome",
    "judge_direct",
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
    """The namespaces the harness can name: the host's (its own), the lab's, the one made for the process."""

    host: NetnsId
    lab: NetnsId
    own: NetnsId

    def name(self, netns: NetnsId | None) -> str:
        if netns is None:
            return "unknown"
        return {self.own: "its own (made by the harness)", self.host: "the host's",
                self.lab: "the lab's"}.get(netns, f"an unknown one (inode {netns[1]})")


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
                "skipped": "not attempted (not in a namespace the harness made)"}.get(self.kind, self.kind)


@dataclass(frozen=True)
class ProbeReport:
    netns: NetnsId | None
    outcomes: dict[str, TargetOutcome]
    proxy: dict[str, Any] | None
    error: str = ""  # why the probe did not report (non-zero exit, no JSON)

    def outcome(self, target_id: str) -> TargetOutcome:
        return self.outcomes.get(target_id, TargetOutcome("missing"))


NAMESPACE_EXPECTED = "the process runs in the network namespace the harness made for it (not the host's or the lab's)"
DIRECT_EXPECTED = ("connect (a UDP datagram: connect, send or the wait for a reply) fails with an errno in the "
                   "namespace made for the process, and no listener (host loopback, lab) sees it")
PROXY_EXPECTED = "a GET through the proxy's address reaches the lab origin (200 from it, request recorded)"


def judge_namespace(report: ProbeReport, namespaces: Namespaces) -> Judgement:
    observed = f"runs in {namespaces.name(report.netns)} network namespace" + (
        f" ({report.error})" if report.error else "")
    if report.netns is None:
        return Judgement(Verdict.INDETERMINATE, "the probe did not report its namespace", NAMESPACE_EXPECTED,
                             observed)
    if report.netns == namespaces.host:
        return Judgement(Verdict.ALLOWED, "the process shares the host's network namespace: the launcher "
                             "isolated nothing", NAMESPACE_EXPECTED, observed)
    if report.netns == namespaces.lab:
        return Judgement(Verdict.ALLOWED, "the process runs in the lab's namespace, next to every destination "
                             "the proxy is meant to guard", NAMESPACE_EXPECTED, observed)
    if report.netns == namespaces.own:
        return Judgement(Verdict.BLOCKED, "the process runs in the namespace made for it", NAMESPACE_EXPECTED,
                             observed)
    return Judgement(Verdict.INDETERMINATE, "the process runs in a namespace the harness did not make, so "
                         "nothing here can say what it reaches", NAMESPACE_EXPECTED, observed)


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
    if report.netns != namespaces.own:
        return Judgement(Verdict.INDETERMINATE, f"refused, but in {where} namespace, which the harness did not "
                             "make for the process", DIRECT_EXPECTED, observed)
    if target.transport == "udp" and outcome.stage == "recv" and not target.loopback:
        # The datagram left: an ICMP error came back (RFC 1122 §4.1.3.3), which a REJECT rule on its way and a
        # host it reached both send. Only the loopback targets' ICMP is known to come from the process's own
        # namespace (no host listener saw the datagram).
        return Judgement(Verdict.INDETERMINATE, f"the datagram was sent and an ICMP error came back "
                             f"({outcome.describe()}): from a filter or from a host it reached", DIRECT_EXPECTED,
                             observed)
    return Judgement(Verdict.BLOCKED, f"direct {target.attempt} refused ({outcome.describe()}) in the process's "
                         "own namespace", DIRECT_EXPECTED, observed)


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
