"""A proxy that refuses only while requests keep coming must not pass: some denials are sent after a quiet.

``broken_proxies/idle_triggered.py`` is the reference proxy until the client goes quiet: the request that ends
``quiet_seconds`` of silence (or, per connection, the first request on a connection opened after it) is
dialled unchecked. Before the after-quiet module, a full conformance run gave it everything but the requests
that happened to come first after the suite's own pauses (the campaigns' report phases; none at all on an
idle machine for thresholds above them). ``conformance/test_after_quiet.py`` (run last) sends five denials,
marked and unmarked, and two controls once the lab has carried no TCP for at least ``MIN_QUIET_SECONDS``: a
threshold below the quiet reached fails there, naming the hole. A threshold above it still passes (the
documented limit: the quiet costs wall time the suite does not have).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from broken_proxies.idle_triggered import command, idle_triggered
from broken_proxies.weak_ssrf import start_weak_proxy
from ssrf_selection import catalogue_selection

from pytest_sandbox.fixtures.run_order import SESSION_TAIL, tail_order
from pytest_sandbox.network.harness import start_proxy
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.probes.after_quiet import (
    CONTROLS,
    DENIALS,
    QuietWatch,
    QuietWatchError,
    after_quiet_key,
    run_after_quiet,
    snmp_path_of,
    tcp_segments,
)
from pytest_sandbox.probes.ssrf_exchanges import AttemptExchange, run_ssrf_campaign
from pytest_sandbox.verdicts.after_quiet import QUIET_HOLE, judge_after_quiet
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
# Short enough for the project's own tests: the conformance module's floor is MIN_QUIET_SECONDS.
TEST_QUIET = 1.0

SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 2 64 10
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs
Tcp: 1 200 120000 -1 5 5 0 0 2 {in_segs} {out_segs}
Udp: InDatagrams NoPorts
Udp: 3 0
"""


# --- pure parts ----------------------------------------------------------------------------------------------

def test_tail_order_moves_the_proxy_free_modules_and_the_after_quiet_module_to_the_end():
    ids = ["tests/test_x.py::t", "conformance/test_syscalls.py::a", "conformance/test_after_quiet.py::q",
           "conformance/test_ssrf.py::s", "conformance/test_smuggling.py::m", "conformance/test_ssrf_self.py::o",
           "conformance/test_loaded_filter.py::f", "elsewhere/test_syscalls.py::z"]
    ordered = [ids[index] for index in tail_order(ids, "conformance")]
    assert ordered == ["tests/test_x.py::t", "conformance/test_smuggling.py::m", "conformance/test_ssrf_self.py::o",
                       "elsewhere/test_syscalls.py::z", "conformance/test_ssrf.py::s",
                       "conformance/test_loaded_filter.py::f", "conformance/test_syscalls.py::a",
                       "conformance/test_after_quiet.py::q"]
    assert SESSION_TAIL[0] == "test_ssrf.py" and SESSION_TAIL[-1] == "test_after_quiet.py"


def test_tcp_counters_are_read_from_the_namespace_snmp_file():
    assert tcp_segments(SNMP.format(in_segs=41, out_segs=43)) == (41, 43)
    with pytest.raises(ValueError, match="Tcp"):
        tcp_segments("Ip: Forwarding\nIp: 2\n")
    assert snmp_path_of("/proc/4242/ns/net") == "/proc/4242/net/snmp"
    with pytest.raises(QuietWatchError, match="not a /proc/<pid>/ns/net path"):
        snmp_path_of("/run/netns/lab")


BLOCKED = Judgement(Verdict.BLOCKED, "refused", "refused", "403 ssrf_denied")
WORKS = Judgement(Verdict.WORKS, "reached", "reached", "200")
LEAKED = Judgement(Verdict.ALLOWED, "destination '169.254.169.254:80' reached canary 169.254.169.254:80 x1",
                   "refused", "200")
BROKEN = Judgement(Verdict.BROKEN, "the control reached nothing", "reached", "403")


def test_a_leak_after_the_quiet_names_the_hole_the_quiet_and_the_exchange():
    judgement = judge_after_quiet([("a", BLOCKED), ("b", LEAKED), ("ctl", WORKS)], 4.2, 3.0)
    assert judgement.verdict is Verdict.ALLOWED
    assert judgement.reason.startswith(QUIET_HOLE) and "after 4.2 s with no traffic" in judgement.reason
    assert "b: destination '169.254.169.254:80' reached canary 169.254.169.254:80" in judgement.reason
    assert judgement.reason.count("reached canary") == 1


def test_a_set_without_the_quiet_it_needed_or_with_a_broken_control_is_not_a_pass():
    short = judge_after_quiet([("a", BLOCKED), ("ctl", WORKS)], 0.4, 3.0)
    assert short.verdict is Verdict.INDETERMINATE and "never went 3.0 s without traffic" in short.reason
    broken = judge_after_quiet([("a", BLOCKED), ("ctl", BROKEN)], 3.5, 3.0)
    assert broken.verdict is Verdict.INDETERMINATE and "ctl: BROKEN" in broken.reason
    passed = judge_after_quiet([("a", BLOCKED), ("ctl", WORKS)], 3.5, 3.0)
    assert passed.verdict is Verdict.BLOCKED and "sent after 3.5 s" in passed.observed
    assert passed.reason.startswith("1 denials refused and 1 controls worked")


def test_the_watch_restarts_the_quiet_when_the_counters_move(tmp_path):
    counters = tmp_path / "snmp"
    counters.write_text(SNMP.format(in_segs=1, out_segs=1))
    now = [100.0]
    watch = QuietWatch(str(counters), poll=0.01, clock=lambda: now[0])
    try:
        now[0] = 105.0
        assert watch.quiet_for() == 5.0
        counters.write_text(SNMP.format(in_segs=2, out_segs=2))
        now[0] = 106.0
        assert watch.quiet_for() == 0.0
        now[0] = 107.5
        assert watch.quiet_for() == 1.5
        assert watch.wait_quiet(1.0) == 1.5  # already quiet enough: no wait
    finally:
        watch.stop()
    with pytest.raises(QuietWatchError, match="cannot read the lab's TCP counters"):
        QuietWatch(str(tmp_path / "missing"))


# --- in the lab ----------------------------------------------------------------------------------------------

def _warm_up(lab, connect) -> None:
    """One burst of traffic (the positive controls), as the suite's campaigns give before the quiet."""
    verdicts = run_ssrf_campaign(lab, connect, [AttemptExchange(attempt) for attempt in CONTROLS], grace=0)
    assert all(v.judgement.passed for v in verdicts.values()), verdicts


def _after_quiet(lab, running):
    _warm_up(lab, running.connect)
    watch = QuietWatch.of_lab(lab)
    try:
        return run_after_quiet(lab, running.connect, watch, minimum=TEST_QUIET)
    finally:
        watch.stop()


@needs_netns
def test_the_reference_passes_after_the_quiet_and_its_controls_work(_network_lab):
    running = start_proxy(_network_lab, port=3241)
    try:
        run = _after_quiet(_network_lab, running)
    finally:
        running.stop()
    assert run.quiet >= TEST_QUIET
    assert len(run.verdicts) == len(DENIALS) + len(CONTROLS)
    for key, verdict in run.verdicts.items():
        expected = Verdict.WORKS if "-ctl-" in key else Verdict.BLOCKED
        assert verdict.judgement.verdict is expected, (key, verdict.judgement)
    assert run.judgement.verdict is Verdict.BLOCKED, run.judgement
    assert f"sent after {run.quiet:.1f} s" in run.judgement.observed


@needs_netns
@pytest.mark.parametrize("per_connection", [False, True], ids=["per-request", "per-connection"])
def test_a_proxy_that_leaks_after_the_quiet_fails_naming_the_hole(_network_lab, per_connection):
    running = start_weak_proxy(_network_lab, idle_triggered(TEST_QUIET / 2, per_connection=per_connection), 3242)
    try:
        run = _after_quiet(_network_lab, running)
    finally:
        running.stop()
    failed = {key: v.judgement for key, v in run.verdicts.items() if not v.judgement.passed}
    assert failed and running.proxy.leaked, (run.verdicts, "the exchanges were not sent after the fake's quiet")
    assert all(judgement.verdict is Verdict.ALLOWED for judgement in failed.values()), failed
    assert not any("-ctl-" in key for key in failed)
    assert all(run.verdicts[after_quiet_key(c)].judgement.verdict is Verdict.WORKS for c in CONTROLS)
    assert run.judgement.verdict is Verdict.ALLOWED and run.judgement.reason.startswith(QUIET_HOLE), run.judgement
    assert all(f"{key}: " in run.judgement.reason for key in failed), run.judgement
    if not per_connection:  # the request that ended the silence, and only it
        assert len(running.proxy.leaked) == 1 and len(failed) == 1, (running.proxy.leaked, failed)


@needs_netns
def test_a_threshold_longer_than_the_quiet_reached_still_passes(_network_lab):
    """The documented limit: the check proves nothing about a proxy that waits longer than the suite's quiet."""
    running = start_weak_proxy(_network_lab, idle_triggered(30.0), 3243)
    try:
        run = _after_quiet(_network_lab, running)
    finally:
        running.stop()
    assert run.quiet < 30.0 and not running.proxy.leaked
    assert run.judgement.verdict is Verdict.BLOCKED, run.judgement


@needs_netns
def test_conformance_run_against_the_idle_triggered_proxy_fails_after_the_quiet_only():
    """The SSRF campaign (one burst) passes it; the after-quiet module, run last, does not."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly", "-rf", "--sandbox",
         "--sandbox-proxy-cmd", command(2.0), str(ROOT / "conformance" / "test_after_quiet.py"),
         str(ROOT / "conformance" / "test_ssrf.py"), "-k", catalogue_selection("meta-imds-169 or after_quiet")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    failed = [line for line in output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "test_after_quiet.py" in failed[0], output
    assert QUIET_HOLE in output and "reached canary" in output, output
    assert "1 failed, 5 passed" in output, output  # meta-imds in every form passes the burst
    assert "after-quiet-absolute-meta-imds" in output or "after-quiet-connect-" in output, output
