"""Detection proof for the egress category: launchers that do not isolate the network earn no BLOCKED.

The category (``pytest_sandbox.probes.egress``) runs one probe under a launcher and judges where the
process ran and what it reached. Three deliberately broken launchers are kept here: one that runs the
command in the harness's own (host) network namespace, as a launcher that isolates nothing would, one
that runs it in the lab namespace, next to every destination the proxy guards, and one that gives the
process a namespace of its own wired into the lab, whose filter refuses TCP and forgets UDP. The first two
must earn 0 BLOCKED, the third none on a UDP target, with verdicts that name the hole; the reference
launcher in proxy mode must earn BLOCKED everywhere and pass its proxy control. The judges are also
checked without sockets.

Safety: the probe attempts non-loopback destinations only from a namespace the harness made (its
own check, inside the process); from the host namespace it tries the harness's loopback listeners only.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from pytest_sandbox.network.harness import ProxiedSandbox
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.lab.wired import wire_into_lab
from pytest_sandbox.network.netns import NetnsHolder
from pytest_sandbox.probes.egress import (
    DIRECT_TARGETS,
    host_loopback_target_id,
    host_netns,
    parse_report,
    run_egress_probe,
)
from pytest_sandbox.verdicts.egress import (
    EgressTarget,
    Namespaces,
    ProbeReport,
    TargetOutcome,
    judge_direct,
    judge_namespace,
    judge_proxy_control,
)
from pytest_sandbox.verdicts.judgement import Verdict


@dataclass
class HostNetworkLauncher:
    """A broken launcher: it runs the command as is, in the caller's (the host's) network namespace."""

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> Any:
        return subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)


@dataclass
class LabNetworkLauncher:
    """A broken launcher: it puts the command into the lab's namespace instead of a private one."""

    lab: NetworkLab

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> Any:
        return self.lab.run(list(argv), capture_output=True, timeout=timeout, check=False)


# The TCP-only filter: everything the process sends over TCP to anything but its own loopback is answered with a
# reset (nft reject, which gives connect(2) ECONNREFUSED); UDP is not looked at.
TCP_ONLY_FILTER = """
table inet tcp_only {
    chain out {
        type filter hook output priority filter; policy accept;
        oif != lo meta l4proto tcp reject with tcp reset
    }
}
"""


@dataclass
class TcpOnlyFilterLauncher:
    """A broken launcher: the namespace made for the process has a veth pair into the lab and default routes
    through it (:func:`wire_into_lab`), and its filter (:data:`TCP_ONLY_FILTER`) refuses TCP only, as a firewall
    written for the proxy's port and nothing else would. A harness that probed only TCP would call it BLOCKED
    everywhere. Every packet stays in the two namespaces the harness made.
    """

    namespace: NetnsHolder
    lab: NetworkLab

    def __post_init__(self) -> None:
        wire_into_lab(self.namespace, self.lab, link="egress")
        nft = self.namespace.run(["nft", "-f", "-"], input=TCP_ONLY_FILTER, capture_output=True, text=True,
                                 timeout=30, check=False)
        assert nft.returncode == 0, nft.stderr

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> Any:
        return self.namespace.run(list(argv), capture_output=True, timeout=timeout, check=False)



@pytest.fixture
def scratch_namespace() -> Iterator[NetnsHolder]:
    """A namespace the harness made for the process, for launchers that ignore it."""
    with NetnsHolder.start(name="egress-unused") as holder:
        yield holder


def test_launcher_that_isolates_nothing_earns_no_blocked_and_is_named(_network_lab, scratch_namespace):
    evidence = run_egress_probe(HostNetworkLauncher(), _network_lab, scratch_namespace.netns_id)
    verdicts = evidence.verdicts()
    assert Verdict.BLOCKED not in verdicts.values(), verdicts
    assert evidence.namespace.verdict is Verdict.ALLOWED
    assert "shares the host's network namespace" in evidence.namespace.reason
    _target, loopback = evidence.direct["direct-host-loopback-v4"]
    assert loopback.verdict is Verdict.ALLOWED and "host's loopback listener" in loopback.reason
    _target, metadata = evidence.direct["direct-169.254.169.254"]
    assert metadata.verdict is Verdict.ALLOWED
    assert "not attempted" in metadata.observed  # the probe never dials off the host from the host
    assert evidence.control.verdict is Verdict.BROKEN


def test_launcher_that_joins_the_lab_earns_no_blocked_and_is_named(_network_lab, scratch_namespace):
    evidence = run_egress_probe(LabNetworkLauncher(_network_lab), _network_lab, scratch_namespace.netns_id)
    verdicts = evidence.verdicts()
    assert Verdict.BLOCKED not in verdicts.values(), verdicts
    assert "lab's namespace" in evidence.namespace.reason
    _target, metadata = evidence.direct["direct-169.254.169.254"]
    assert metadata.verdict is Verdict.ALLOWED and "lab's catch-all (169.254.169.254:80)" in metadata.reason
    assert _network_lab.unaccounted_hits() == []  # the category counted every hit it caused


@pytest.mark.skipif(not shutil.which("nft") or not shutil.which("ip"), reason="the TCP-only filter needs nft and ip")
def test_a_filter_that_refuses_tcp_and_forgets_udp_earns_no_blocked_on_a_udp_target(_network_lab,
                                                                                     scratch_namespace):
    evidence = run_egress_probe(TcpOnlyFilterLauncher(scratch_namespace, _network_lab), _network_lab,
                                scratch_namespace.netns_id, proxy=None)
    udp = {target_id: judgement for target_id, (target, judgement) in evidence.direct.items()
           if target.transport == "udp" and not target.loopback}
    assert len(udp) == 5
    assert {judgement.verdict for judgement in udp.values()} == {Verdict.ALLOWED}, udp
    metadata = udp["direct-udp-169.254.169.254-53"]
    assert "lab's UDP socket on 169.254.169.254:53 (1 datagram(s))" in metadata.reason
    # TCP is refused in the namespace made for the process, as that filter means it to be: what TCP alone
    # would have certified.
    tcp = [judgement.verdict for target, judgement in evidence.direct.values() if target.transport == "tcp"]
    assert set(tcp) == {Verdict.BLOCKED}
    # The host's loopback over UDP is still out of reach: the ICMP port unreachable came from its own loopback.
    _target, loopback = evidence.direct[host_loopback_target_id("udp", "127.0.0.1")]
    assert loopback.verdict is Verdict.BLOCKED and "ECONNREFUSED" in loopback.observed


def test_reference_launcher_in_proxy_mode_is_blocked_everywhere_and_reaches_its_proxy(
        _network_lab, sandbox_proxied: ProxiedSandbox):
    evidence = run_egress_probe(sandbox_proxied, _network_lab, sandbox_proxied.holder.netns_id)
    verdicts = evidence.verdicts()
    assert verdicts.pop("proxy-control") is Verdict.WORKS, evidence.control
    assert set(verdicts.values()) == {Verdict.BLOCKED}, {k: evidence.direct[k][1] for k in evidence.direct}
    assert {"direct-host-loopback-v4", "direct-udp-host-loopback-v4", *(t.target_id for t in DIRECT_TARGETS)} <= set(
        verdicts)
    _target, metadata = evidence.direct["direct-udp-169.254.169.254-53"]
    assert "connect failed with ENETUNREACH" in metadata.observed, metadata  # no route out of its namespace


# --- the judges, without sockets ------------------------------------------------------------------

SPACES = Namespaces(host=(1, 100), lab=(1, 200), own=(1, 300))
TARGET = EgressTarget("direct-10.0.0.1", "10.0.0.1", 80, "private 10/8 address")


def _report(netns: tuple[int, int] | None, outcome: TargetOutcome) -> ProbeReport:
    return ProbeReport(netns, {TARGET.target_id: outcome}, None)


def test_refusal_in_the_namespace_made_for_the_process_is_blocked():
    judgement = judge_direct(TARGET, _report(SPACES.own, TargetOutcome("errno", errno.ENETUNREACH)), SPACES, "")
    assert judgement.verdict is Verdict.BLOCKED and "ENETUNREACH" in judgement.reason


def test_a_timeout_is_indeterminate_never_blocked():
    judgement = judge_direct(TARGET, _report(SPACES.own, TargetOutcome("timeout")), SPACES, "")
    assert judgement.verdict is Verdict.INDETERMINATE and "timed out" in judgement.reason


def test_a_refusal_in_an_unknown_namespace_proves_nothing():
    judgement = judge_direct(TARGET, _report((1, 999), TargetOutcome("errno", errno.ECONNREFUSED)), SPACES, "")
    assert judgement.verdict is Verdict.INDETERMINATE


def test_a_refusal_in_the_host_namespace_is_still_allowed():
    judgement = judge_direct(TARGET, _report(SPACES.host, TargetOutcome("errno", errno.ECONNREFUSED)), SPACES, "")
    assert judgement.verdict is Verdict.ALLOWED and "host's network namespace" in judgement.reason


def test_anything_a_listener_saw_is_allowed_whatever_the_probe_says():
    judgement = judge_direct(TARGET, _report(SPACES.own, TargetOutcome("errno", errno.ECONNREFUSED)), SPACES,
                             "the lab's catch-all (10.0.0.1:80)")
    assert judgement.verdict is Verdict.ALLOWED


UDP_TARGET = EgressTarget("direct-udp-10.0.0.1-53", "10.0.0.1", 53, "private 10/8 address", transport="udp")
UDP_LOOPBACK = EgressTarget("direct-udp-host-loopback-v4", "127.0.0.1", 4000, "host's loopback UDP listener",
                            loopback=True, transport="udp")


def _udp(target: EgressTarget, outcome: TargetOutcome, seen: str = "") -> Verdict:
    return judge_direct(target, ProbeReport(SPACES.own, {target.target_id: outcome}, None), SPACES, seen).verdict


def test_a_datagram_refused_before_it_left_is_blocked():
    assert _udp(UDP_TARGET, TargetOutcome("errno", errno.ENETUNREACH, "connect")) is Verdict.BLOCKED
    assert _udp(UDP_TARGET, TargetOutcome("errno", errno.EPERM, "send")) is Verdict.BLOCKED  # an nft drop


def test_a_datagram_that_left_is_never_blocked():
    # Sent and unanswered: nothing refused it.
    assert _udp(UDP_TARGET, TargetOutcome("sent")) is Verdict.INDETERMINATE
    # An ICMP error after it left: a filter on its way or a host it reached; not proof either way.
    assert _udp(UDP_TARGET, TargetOutcome("errno", errno.ECONNREFUSED, "recv")) is Verdict.INDETERMINATE
    assert _udp(UDP_TARGET, TargetOutcome("errno", errno.ECONNREFUSED, "recv"),
                "the lab's UDP socket on 10.0.0.1:53 (1 datagram(s))") is Verdict.ALLOWED
    assert _udp(UDP_TARGET, TargetOutcome("connected")) is Verdict.ALLOWED  # something answered it


def test_the_own_loopback_answering_for_the_host_loopback_is_blocked():
    """The host's listener saw nothing and the ICMP port unreachable came from the process's own loopback."""
    assert _udp(UDP_LOOPBACK, TargetOutcome("errno", errno.ECONNREFUSED, "recv")) is Verdict.BLOCKED
    assert _udp(UDP_LOOPBACK, TargetOutcome("errno", errno.ECONNREFUSED, "recv"),
                "the host's loopback listener (1 datagram(s))") is Verdict.ALLOWED


def test_namespace_verdicts_name_where_the_process_ran():
    assert judge_namespace(ProbeReport(SPACES.own, {}, None), SPACES).verdict is Verdict.BLOCKED
    assert judge_namespace(ProbeReport(SPACES.host, {}, None), SPACES).verdict is Verdict.ALLOWED
    assert judge_namespace(ProbeReport(SPACES.lab, {}, None), SPACES).verdict is Verdict.ALLOWED
    assert judge_namespace(ProbeReport((1, 7), {}, None), SPACES).verdict is Verdict.INDETERMINATE
    assert judge_namespace(ProbeReport(None, {}, None, "no report"), SPACES).verdict is Verdict.INDETERMINATE


def test_a_probe_that_did_not_report_is_indeterminate_not_blocked():
    report = parse_report(1, b"", b"Traceback: boom")
    assert report.netns is None and "boom" in report.error
    assert judge_direct(TARGET, report, SPACES, "").verdict is Verdict.INDETERMINATE


def test_proxy_control_needs_the_origin_to_have_recorded_the_request():
    answered = ProbeReport(SPACES.own, {}, {"status_line": "HTTP/1.1 200 OK", "origin": "11.0.0.10"})
    assert judge_proxy_control(answered, 1).verdict is Verdict.WORKS
    assert judge_proxy_control(answered, 0).verdict is Verdict.BROKEN
    assert judge_proxy_control(ProbeReport(SPACES.host, {}, None), 0).verdict is Verdict.BROKEN


def test_host_netns_is_this_process_namespace():
    assert host_netns()[1] > 0
