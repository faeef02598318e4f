"""The egress category against a third party's launcher (``--sandbox-exec``): the launcher is judged, not ours.

Until this was built, ``pytest --sandbox --sandbox-exec env`` (a "launcher" that isolates nothing) scored 15
BLOCKED egress rows: the category probed the reference launcher whatever the run's target was. Now the third
party's launcher is started in a namespace of the harness's wired into the lab (``network/lab/wired.py``), standing
in for the host, and judged on where its process ends up and what it reaches. Each launcher here is the cheapest
one that could fake a pass: one that isolates nothing, one that hands the process the host's own namespace, one
whose namespace has an interface that is not a loopback; none may earn BLOCKED. A real isolating launcher
(bubblewrap with ``--unshare-net``) earns BLOCKED everywhere and passes the loopback control; one that leaves the
loopback down (``unshare -n``) fails that control.

Safety: the probe dials off-host destinations only in the stand-in (wired into the lab alone), the lab, or a
namespace whose every interface is a loopback; from the host's namespace or one with other interfaces it tries
loopback listeners only (``test_a_launcher_that_joins_the_host_namespace_...`` checks nothing reached the lab).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from exec_targets import ROOT, scorecard_row

from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES
from pytest_sandbox.network.lab.wired import WIRED_ADDRESSES
from pytest_sandbox.probes.egress import DIRECT_TARGETS
from pytest_sandbox.verdicts.egress import (
    EgressTarget,
    Namespaces,
    ProbeReport,
    TargetOutcome,
    judge_direct,
    judge_loopback_control,
    judge_namespace,
)
from pytest_sandbox.verdicts.judgement import Verdict

STAND_IN, HOST, LAB, LAUNCHERS = (1, 400), (1, 100), (1, 200), (1, 500)
SPACES = Namespaces(host=HOST, lab=LAB, own=None, stand_in=STAND_IN)
METADATA = EgressTarget("direct-169.254.169.254", "169.254.169.254", 80, "metadata address")
REFUSED = {METADATA.target_id: TargetOutcome("errno", 101)}  # ENETUNREACH
LOOPBACK_ONLY = (("lo", True),)


def _report(netns: tuple[int, int] | None, interfaces: tuple[tuple[str, bool], ...] | None = LOOPBACK_ONLY,
            outcomes: dict[str, TargetOutcome] | None = None) -> ProbeReport:
    return ProbeReport(netns, REFUSED if outcomes is None else outcomes, None, interfaces=interfaces)


# --- the judges, without sockets ------------------------------------------------------------------------


@pytest.mark.parametrize(("netns", "interfaces", "verdict", "reason"), [
    (LAUNCHERS, LOOPBACK_ONLY, Verdict.BLOCKED, "nothing but a loopback"),
    (LAUNCHERS, (("lo", True), ("eth0", False)), Verdict.INDETERMINATE, "not a loopback"),
    (LAUNCHERS, None, Verdict.INDETERMINATE, "not a loopback"),
    (LAUNCHERS, (), Verdict.INDETERMINATE, "not a loopback"),
    (STAND_IN, (("lo", True), ("standin-own", False)), Verdict.ALLOWED, "isolated nothing"),
    (STAND_IN, LOOPBACK_ONLY, Verdict.ALLOWED, "isolated nothing"),
    (HOST, LOOPBACK_ONLY, Verdict.ALLOWED, "host's network namespace"),
    (LAB, LOOPBACK_ONLY, Verdict.ALLOWED, "lab's namespace"),
    (None, LOOPBACK_ONLY, Verdict.INDETERMINATE, "could not tell"),
])
def test_a_third_party_s_namespace_is_judged_by_what_it_holds(netns, interfaces, verdict, reason):
    judgement = judge_namespace(_report(netns, interfaces), SPACES)
    assert judgement.verdict is verdict and reason in judgement.reason, judgement


@pytest.mark.parametrize(("netns", "interfaces", "verdict"), [
    (LAUNCHERS, LOOPBACK_ONLY, Verdict.BLOCKED),  # its own namespace, nothing but lo: nowhere to go
    (STAND_IN, (("lo", True), ("standin-own", False)), Verdict.BLOCKED),  # everything reachable is watched
    (LAUNCHERS, (("lo", True), ("eth0", False)), Verdict.INDETERMINATE),  # an interface nobody watches
    (LAUNCHERS, None, Verdict.INDETERMINATE),
    (None, LOOPBACK_ONLY, Verdict.INDETERMINATE),
    (HOST, LOOPBACK_ONLY, Verdict.ALLOWED),
    (LAB, LOOPBACK_ONLY, Verdict.ALLOWED),
])
def test_a_refused_direct_connect_counts_only_where_the_process_is_shown_isolated_or_watched(netns, interfaces,
                                                                                                verdict):
    assert judge_direct(METADATA, _report(netns, interfaces), SPACES, "").verdict is verdict


def test_the_stand_in_s_refusal_still_needs_an_errno_and_no_listener():
    timed_out = _report(STAND_IN, outcomes={METADATA.target_id: TargetOutcome("timeout")})
    assert judge_direct(METADATA, timed_out, SPACES, "").verdict is Verdict.INDETERMINATE
    seen = judge_direct(METADATA, _report(STAND_IN), SPACES, "the lab's catch-all (169.254.169.254:80)")
    assert seen.verdict is Verdict.ALLOWED
    udp = EgressTarget("direct-udp-169.254.169.254-53", "169.254.169.254", 53, "metadata address", transport="udp")
    icmp = _report(STAND_IN, outcomes={udp.target_id: TargetOutcome("errno", 111, "recv")})
    assert judge_direct(udp, icmp, SPACES, "").verdict is Verdict.INDETERMINATE


def test_the_loopback_control_needs_the_nonce_back():
    def control(value: dict[str, str] | None) -> Verdict:
        return judge_loopback_control(ProbeReport(LAUNCHERS, {}, None, loopback_control=value), "egress-n1").verdict

    assert control({"echoed": "egress-n1"}) is Verdict.WORKS
    assert control({"echoed": "egress-n2"}) is Verdict.BROKEN
    assert control({"error": "OSError: [Errno 101] Network is unreachable"}) is Verdict.BROKEN
    assert control(None) is Verdict.BROKEN


def test_the_probe_is_told_only_the_harness_s_own_namespaces():
    assert SPACES.harness_made == (STAND_IN, LAB)
    assert Namespaces(host=HOST, lab=LAB, own=(1, 300)).harness_made == ((1, 300), LAB)


def test_no_ssrf_case_dials_an_address_the_wiring_routes_out_of_the_lab():
    """While a namespace is wired in, the lab routes its two addresses to it; a case dialling one would be diverted
    from the catch-all."""
    for case in SSRF_CASES:
        assert case.canary not in WIRED_ADDRESSES, case.case_id
        assert case.target_host.strip("[]") not in WIRED_ADDRESSES, case.case_id
    assert not {target.address for target in DIRECT_TARGETS} & set(WIRED_ADDRESSES)


# --- real launchers, started in the stand-in ---------------------------------------------------------------


# probe_launcher (tests/conftest.py): the egress evidence of a prefix started in a fresh stand-in.


def test_a_launcher_that_isolates_nothing_earns_no_blocked_and_every_attempt_is_seen(probe_launcher, _network_lab):
    evidence = probe_launcher("env")
    verdicts = evidence.verdicts()
    assert Verdict.BLOCKED not in verdicts.values(), verdicts
    assert evidence.namespace.verdict is Verdict.ALLOWED and "isolated nothing" in evidence.namespace.reason
    for target_id, (target, judgement) in evidence.direct.items():
        assert judgement.verdict is Verdict.ALLOWED, (target_id, judgement)
        if target.address not in ("11.0.0.10", "2600:9000::10") or target.transport == "udp":
            assert "seen by" in judgement.observed, (target_id, judgement)  # a listener of the harness's saw it
    assert evidence.control_id == "loopback-control" and evidence.control.verdict is Verdict.WORKS
    assert _network_lab.unaccounted_hits() == []


def test_a_launcher_that_joins_the_host_namespace_earns_no_blocked_and_dials_nothing_off_the_host(probe_launcher,
                                                                                                 _network_lab):
    mark = _network_lab.hit_mark()
    evidence = probe_launcher(f"nsenter --net=/proc/{os.getpid()}/ns/net --")
    assert Verdict.BLOCKED not in evidence.verdicts().values()
    assert "host's network namespace" in evidence.namespace.reason
    _target, metadata = evidence.direct["direct-169.254.169.254"]
    assert metadata.verdict is Verdict.ALLOWED and "not attempted" in metadata.observed
    assert _network_lab.hits(since=mark) == []


LAUNCHER_WITH_A_LINK = (
    "unshare -n sh -c 'ip link set lo up && ip link add v0 type veth peer name v1 && ip link set v0 up && "
    "ip link set v1 up && ip address add 10.99.0.2/24 dev v0 && ip route add default via 10.99.0.1 dev v0 && "
    "exec \"$@\"' sh"
)


@pytest.mark.skipif(not shutil.which("ip") or not shutil.which("unshare"), reason="needs ip and unshare")
def test_a_launcher_whose_namespace_has_another_interface_is_not_probed_off_host_and_earns_no_blocked(
        probe_launcher, _network_lab):
    # The veth pair's two ends are both in the launcher's namespace, so even an attempt would stay there.
    mark = _network_lab.hit_mark()
    evidence = probe_launcher(LAUNCHER_WITH_A_LINK)
    verdicts = evidence.verdicts()
    assert Verdict.BLOCKED not in verdicts.values(), verdicts
    assert evidence.namespace.verdict is Verdict.INDETERMINATE and "not a loopback" in evidence.namespace.reason
    assert "v0" in evidence.namespace.observed
    assert all(evidence.report.outcome(target.target_id).kind == "skipped" for target in DIRECT_TARGETS)
    assert _network_lab.hits(since=mark) == []


# bubblewrap run as root keeps every capability unless told otherwise (bwrap(1) --cap-drop), and with CAP_SYS_ADMIN
# and the host's processes in its /proc setns(2) takes the process home: tests/test_egress_escape.py.
BWRAP_ISOLATED = "bwrap --unshare-net --dev-bind / / --proc /proc --cap-drop ALL --"


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap is not installed")
def test_bubblewrap_with_its_own_network_namespace_earns_blocked_everywhere_and_works(probe_launcher):
    evidence = probe_launcher(BWRAP_ISOLATED)
    verdicts = evidence.verdicts()
    assert verdicts.pop("loopback-control") is Verdict.WORKS, evidence.control
    assert set(verdicts.values()) == {Verdict.BLOCKED}, verdicts
    assert "nothing but a loopback" in evidence.namespace.reason


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare")
def test_a_namespace_whose_loopback_is_down_blocks_but_fails_the_control(probe_launcher):
    evidence = probe_launcher("unshare -n")
    verdicts = evidence.verdicts()
    assert verdicts.pop("loopback-control") is Verdict.BROKEN
    # unshare(1) as root keeps CAP_SYS_ADMIN and filters nothing: setns(2) leads straight back out
    assert verdicts.pop("netns-escape") is Verdict.ALLOWED, evidence.escape
    assert set(verdicts.values()) == {Verdict.BLOCKED}, verdicts


# --- the whole category, as a third party runs it ------------------------------------------------------------


def _run_egress(launcher: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", f"--sandbox-exec={launcher}",
         "conformance/test_egress.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "1000"},
    )


def test_a_launcher_that_isolates_nothing_fails_the_egress_category_it_used_to_pass():
    completed = _run_egress("env")
    assert completed.returncode == 1, completed.stdout[-3000:]
    assert scorecard_row(completed, "egress") == {"BLOCKED": 0, "ALLOWED": 16, "INDETERMINATE": 0, "WORKS": 1,
                                                  "BROKEN": 0}


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap is not installed")
def test_bubblewrap_with_its_own_network_namespace_passes_the_egress_category(tmp_path: Path):
    completed = _run_egress(BWRAP_ISOLATED)
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert scorecard_row(completed, "egress") == {"BLOCKED": 16, "ALLOWED": 0, "INDETERMINATE": 0, "WORKS": 1,
                                                  "BROKEN": 0}
