"""Third-party proxies in the network lab: tinyproxy fails the SSRF category, the reference proxy passes it.

tinyproxy has no destination-address classification (network.md §6), so run through the same
attempts as the conformance suite, inside the same lab, it must let a large part of the denied cases
reach their canaries, and each such failure must name the destination and the canary. It is a
working proxy, so it must pass every positive control. Starting commands inside the lab
(:mod:`pytest_sandbox.network.third_party`) is tested with small stand-in commands.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broken_self_check_proxy import COMMAND as BROKEN_SELF_CHECK
from late_self_dialer_proxy import COMMAND as LATE_SELF_DIALER
from ssrf_selection import catalogue_selection

from pytest_sandbox.network.harness import start_proxy
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.third_party import (
    THIRD_PARTY_PROXIES,
    ProxyStartError,
    ThirdPartyProxy,
    attach_proxy_url,
    main,
    reference_command,
    start_proxy_command,
    third_party_command,
    tinyproxy_command,
    tinyproxy_conf_text,
)
from pytest_sandbox.probes.self_loop import (
    SELF_CASES,
    SelfTarget,
    describe_late_loops,
    run_instance_control,
    run_self_attempt,
    self_attempt,
    start_self_targets,
)
from pytest_sandbox.probes.ssrf import Attempt, build_attempts
from pytest_sandbox.probes.ssrf_exchanges import run_attempt
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

ROOT = Path(__file__).resolve().parent.parent
ATTEMPTS = build_attempts()
TINYPROXY = shutil.which("tinyproxy") or ("/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None)
needs_tinyproxy = pytest.mark.skipif(TINYPROXY is None, reason="tinyproxy is not installed "
                                     "(.ci/run installs it: apt-get install tinyproxy)")
# A listener in a few lines of stdlib Python: stands in for a proxy when only start/stop is tested.
LISTENER = (f"{sys.executable} -c \"import socket,time; s=socket.socket(); "
            "s.bind(('{address}', {port})); s.listen(); time.sleep(60)\"")
# The metadata service, the canonical SSRF target, in the forms any SSRF-safe proxy must refuse.
METADATA_ATTEMPTS = ("connect-meta-imds-169.254.169.254", "absolute-meta-imds-169.254.169.254",
                     "absolute-name-metadata-google-internal")


CANARY_IN_REASON = re.compile(r"reached canary (\[[0-9a-f:]+\]|[0-9.]+):[0-9]+ x[0-9]+")


@pytest.fixture(scope="module")
def tinyproxy(_network_lab: NetworkLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThirdPartyProxy]:
    if TINYPROXY is None:
        pytest.skip("tinyproxy is not installed (.ci/run installs it: apt-get install tinyproxy)")
    running = start_proxy_command(_network_lab, tinyproxy_command(tmp_path_factory.mktemp("tinyproxy")))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def tinyproxy_judgements(tinyproxy: ThirdPartyProxy) -> dict[Attempt, Judgement]:
    """Every catalogue attempt through tinyproxy, judged exactly as the conformance suite judges it."""
    lab = tinyproxy.lab
    assert isinstance(lab, NetworkLab)
    return {attempt: run_attempt(attempt, tinyproxy.connect, lab.all_hits) for attempt in ATTEMPTS}


def _denied(judgements: dict[Attempt, Judgement]) -> dict[Attempt, Judgement]:
    return {a: j for a, j in judgements.items() if a.case.expected != "allowed"}


# --- tinyproxy against the SSRF category ----------------------------------------------------------


@needs_tinyproxy
def test_tinyproxy_fails_the_ssrf_category_with_a_large_share_of_denied_cases_reaching_canaries(
        tinyproxy_judgements):
    denied = _denied(tinyproxy_judgements)
    allowed = {a.test_id for a, j in denied.items() if j.verdict is Verdict.ALLOWED}
    assert not all(j.passed for j in denied.values())
    # 356 denied + 122 malformed attempts; tinyproxy dials every literal and name it can parse.
    assert len(allowed) >= len(denied) // 2, f"only {len(allowed)} of {len(denied)} denied attempts got through"
    assert set(METADATA_ATTEMPTS) <= allowed


@needs_tinyproxy
def test_each_tinyproxy_failure_names_the_destination_and_the_canary_that_was_hit(tinyproxy_judgements):
    through = {a: j for a, j in _denied(tinyproxy_judgements).items()
               if j.verdict is Verdict.ALLOWED and "reached canary" in j.reason}
    assert len(through) >= 200
    for attempt, judgement in through.items():
        assert repr(attempt.target) in judgement.reason, (attempt.test_id, judgement.reason)
        # The canary that answered, as address:port: usually the case's own, but tinyproxy may pick
        # another port (443 when a CONNECT port does not parse) or address (::1 for localhost).
        named = CANARY_IN_REASON.search(judgement.reason)
        assert named is not None, (attempt.test_id, judgement.reason)
        assert named.group(0).removeprefix("reached canary ") in judgement.observed, (attempt.test_id, judgement.reason)


@needs_tinyproxy
def test_tinyproxy_metadata_failure_reads_as_the_hole_it_is(tinyproxy_judgements):
    judgement = next(j for a, j in tinyproxy_judgements.items()
                     if a.test_id == "connect-meta-imds-169.254.169.254")
    assert judgement.reason == "destination '169.254.169.254:80' reached canary 169.254.169.254:80 x1"


@needs_tinyproxy
def test_tinyproxy_resolves_names_with_the_lab_dns_so_name_cases_reach_their_canaries(
        tinyproxy, tinyproxy_judgements):
    names = {a.test_id: j for a, j in tinyproxy_judgements.items() if a.case.kind == "name"}
    assert tinyproxy.uses_lab_dns
    assert names["absolute-name-localtest.me"].verdict is Verdict.ALLOWED
    assert "127.0.0.1:80" in names["absolute-name-localtest.me"].reason


@needs_tinyproxy
def test_tinyproxy_passes_every_positive_control_because_it_is_a_working_proxy(tinyproxy_judgements):
    controls = {a.test_id: j for a, j in tinyproxy_judgements.items() if a.case.expected == "allowed"}
    assert len(controls) >= 40
    assert {test_id: j.reason for test_id, j in controls.items() if j.verdict is not Verdict.WORKS} == {}


@needs_tinyproxy
def test_reference_proxy_passes_every_case_tinyproxy_fails_in_the_same_lab(_network_lab, tinyproxy_judgements):
    failed_by_tinyproxy = [a for a, j in tinyproxy_judgements.items() if not j.passed]
    running = start_proxy(_network_lab, port=3140)
    try:
        failing = {a.test_id: j.reason for a in failed_by_tinyproxy
                   if not (j := run_attempt(a, running.connect, _network_lab.all_hits)).passed}
    finally:
        running.stop()
    assert len(failed_by_tinyproxy) >= 200
    assert failing == {}


# --- end to end: pytest --sandbox --sandbox-proxy-cmd ---------------------------------------------

@needs_tinyproxy
def test_conformance_run_with_tinyproxy_command_fails_and_names_destination_and_canary(tmp_path):
    command = tinyproxy_command(tmp_path / "conf")
    selection = catalogue_selection("meta-imds-169 or ctl-v4-private-10-above")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox", "--sandbox-proxy-cmd", command,
         str(ROOT / "conformance" / "test_ssrf.py"), "-k", selection, "-p", "no:cacheprovider", "-q",
         "-p", "no:randomly"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "169.254.169.254:80" in output and "reached canary 169.254.169.254:80" in output, output
    assert "2 passed" in output, output  # the two positive controls still pass


# --- starting and stopping a command inside the lab -----------------------------------------------


def test_command_without_port_placeholder_is_refused(_network_lab):
    with pytest.raises(ValueError, match=r"\{port\}"):
        start_proxy_command(_network_lab, "tinyproxy -d")


def test_started_command_listens_inside_the_lab_and_is_stopped_by_pid(_network_lab):
    running = start_proxy_command(_network_lab, LISTENER, port=3141)
    try:
        assert running.url == "http://127.0.0.1:3141"
        assert running.decisions == []
        namespace = os.stat(f"/proc/{running.pid}/ns/net")
        assert (namespace.st_dev, namespace.st_ino) == _network_lab.netns_id
        with running.connect():
            pass
    finally:
        running.stop()
    assert running.process.returncode is not None
    running.stop()  # idempotent


def test_address_placeholder_is_substituted(_network_lab):
    running = start_proxy_command(_network_lab, LISTENER, address="127.0.0.9", port=3142)
    try:
        assert running.url == "http://127.0.0.9:3142"
        with running.connect():
            pass
    finally:
        running.stop()


def test_command_that_exits_before_listening_raises_with_its_output(_network_lab):
    with pytest.raises(ProxyStartError, match=r"exited with status 3[\s\S]*no config here"):
        start_proxy_command(_network_lab, "sh -c 'echo no config here >&2; exit 3' {port}")


class _RecordingLab:
    """The real lab, recording every process it starts."""

    def __init__(self, lab: NetworkLab) -> None:
        self.lab = lab
        self.started: list[subprocess.Popen[bytes]] = []

    def popen(self, argv, **kwargs):
        process = self.lab.popen(argv, **kwargs)
        self.started.append(process)
        return process

    def connect(self, addr, port, timeout=5.0):
        return self.lab.connect(addr, port, timeout=timeout)

    def socket(self, *args):
        return self.lab.socket(*args)


def test_command_that_never_listens_is_stopped_and_reported(_network_lab):
    recording = _RecordingLab(_network_lab)
    with pytest.raises(ProxyStartError, match=r"did not accept a connection on 127.0.0.1:3143"):
        start_proxy_command(recording, "sh -c 'echo waiting; sleep 60' {port}", port=3143, start_timeout=0.5)
    proxy_process = recording.started[-1]
    assert proxy_process.returncode is not None  # killed and reaped, not left behind


def test_tinyproxy_configuration_listens_locally_and_names_no_upstream(tmp_path):
    text = tinyproxy_conf_text(3200, tmp_path / "pid")
    lines = set(text.splitlines())
    assert {"Port 3200", "Listen 127.0.0.1", "Allow 127.0.0.1", "LogLevel Critical"} <= lines
    assert not any(line.startswith("Upstream") for line in lines)
    assert "{port}" in tinyproxy_command(tmp_path)


def test_launcher_with_wrong_arguments_prints_usage():
    assert main(["haproxy", "/tmp", "80"]) == 2


def test_every_table_row_has_a_command_with_port_and_address(tmp_path):
    assert set(THIRD_PARTY_PROXIES) >= {"tinyproxy", "squid"}
    for name, spec in THIRD_PARTY_PROXIES.items():
        command = third_party_command(name, tmp_path)
        assert "{port}" in command and "{address}" in command and f" {name} " in command
        conf = spec.conf_path(tmp_path, 3200)
        assert conf.is_relative_to(tmp_path) and str(conf) in spec.exec_argv("/bin/proxy", conf)
        assert "3200" in spec.conf_text(3200, conf.parent, "127.0.0.1")
    with pytest.raises(ValueError, match="unknown third-party proxy 'haproxy'"):
        third_party_command("haproxy", tmp_path)


@pytest.mark.parametrize("name", sorted(THIRD_PARTY_PROXIES))
def test_every_table_row_starts_inside_the_lab_and_stops_by_pid(_network_lab, tmp_path, name):
    if shutil.which(name) is None and not Path(THIRD_PARTY_PROXIES[name].fallback_binary).exists():
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    running = start_proxy_command(_network_lab, third_party_command(name, tmp_path))
    try:
        with running.connect():
            pass
        assert THIRD_PARTY_PROXIES[name].conf_path(tmp_path, running.port).is_file()
    finally:
        running.stop()
    assert running.process.poll() is not None


# --- --sandbox-proxy URL: only a proxy inside the lab -------------------------------------------


def test_proxy_url_inside_the_lab_is_attached(_network_lab):
    running = start_proxy_command(_network_lab, LISTENER, port=3144)
    try:
        attached = attach_proxy_url(_network_lab, "http://127.0.0.1:3144")
        assert (attached.address, attached.port, attached.decisions) == ("127.0.0.1", 3144, [])
        with attached.connect():
            pass
        attached.stop()
        assert running.process.poll() is None  # attaching never owns the user's proxy
    finally:
        running.stop()


@pytest.mark.parametrize("url, message", [
    ("http://10.20.30.40:3128", "no proxy listens on 10.20.30.40:3128 inside the lab"),
    ("http://127.0.0.1:3145", "no proxy listens on 127.0.0.1:3145 inside the lab"),
    ("http://proxy.example:3128", "must be an IP address inside the lab"),
    ("https://127.0.0.1:3128", "expected http://ADDRESS:PORT"),
    ("http://127.0.0.1", "give the port explicitly"),
])
def test_proxy_url_that_is_not_a_lab_proxy_is_refused(_network_lab, url, message):
    with pytest.raises(ValueError, match=message):
        attach_proxy_url(_network_lab, url, timeout=1.0)


# --- {address}: the self-connection cases against third parties ----------------------------------
#
# The harness starts further instances of a --sandbox-proxy-cmd on a lab public address and on 0.0.0.0
# (pytest_sandbox.probes.self_loop), where only a self check can refuse the proxy's own address. Loops
# are seen in the lab's socket table and by a nonce sent through the tunnel, never in a proxy's log.

def run_self_cases(lab: NetworkLab, command: str, cases=SELF_CASES) -> tuple[dict[str, Judgement],
                                                                            dict, dict[str, Judgement]]:
    """Every self case through ``command`` started as the conformance suite starts it: (judgements by
    test id, late loops found by the sweep, the two instance controls)."""
    main = start_proxy_command(lab, command)
    try:
        targets = start_self_targets(
            lab, main, lambda address, port: start_proxy_command(lab, command, address=address, port=port),
            no_instance_reason="unused")
        try:
            judgements = {}
            for case in cases:
                target = targets.target(case)
                assert isinstance(target, SelfTarget), target
                attempt = self_attempt(case, target.endpoint, target.instance)
                judgements[case.test_id] = run_self_attempt(attempt, target, lab, targets.ledger)[0]
            controls = {kind: run_instance_control(targets.target(next(c for c in SELF_CASES if c.kind == kind)),
                                                   lab, targets.ledger) for kind in ("public", "wildcard")}
            time.sleep(0.3)
            late = targets.ledger.sweep()
        finally:
            targets.stop()
    finally:
        main.stop()
    return judgements, late, controls


# What the pre-fix check (tests/broken_self_check_proxy.py) lets loop: the IPv4-mapped spellings of a
# specific listening address, and every local address of a wildcard listener but 127.0.0.1 / ::1.
PRE_FIX_LOOPS = {
    f"{form}-proxy-self-{target}"
    for form in ("connect", "absolute")
    for target in ("public-mapped", "public-mapped-hex", "public-mapped-expanded", "public-name-aaaa-mapped",
                   "wildcard-local-dotted", "wildcard-local-mapped", "wildcard-local-name-a",
                   "wildcard-added-later-dotted", "wildcard-added-later-mapped", "wildcard-added-later-name-a")
}


def test_address_placeholder_puts_a_lab_public_address_on_lo_first(_network_lab):
    running = start_proxy_command(_network_lab, LISTENER, address="11.0.0.31", port=3143)
    try:
        assert running.url == "http://11.0.0.31:3143"
        with running.connect():
            pass
    finally:
        running.stop()


def test_reference_proxy_started_as_a_third_party_passes_every_self_case(_network_lab):
    judgements, late, controls = run_self_cases(_network_lab, reference_command())
    failing = {test_id: j.reason for test_id, j in judgements.items() if j.verdict is not Verdict.BLOCKED}
    assert failing == {}
    assert late == {}
    assert {kind: j.verdict for kind, j in controls.items()} == {"public": Verdict.WORKS, "wildcard": Verdict.WORKS}


def test_pre_fix_self_check_fails_exactly_the_mapped_and_wildcard_self_cases_with_loop_evidence(_network_lab):
    judgements, _late, controls = run_self_cases(_network_lab, BROKEN_SELF_CHECK)
    allowed = {test_id for test_id, j in judgements.items() if j.verdict is Verdict.ALLOWED}
    assert allowed == PRE_FIX_LOOPS
    assert all(j.verdict is Verdict.BLOCKED for t, j in judgements.items() if t not in PRE_FIX_LOOPS)
    for test_id in PRE_FIX_LOOPS:
        reason = judgements[test_id].reason
        assert "looped to the proxy itself" in reason and "socket table shows" in reason, (test_id, reason)
        if test_id.startswith("connect-"):
            assert "received 'GET /proxy-self-loop-" in reason, (test_id, reason)
    mapped = judgements["absolute-proxy-self-public-mapped-hex"]
    assert re.search(r"'http://\[::ffff:b00:14\]:(\d+)/' looped .* to 11\.0\.0\.20:\1 ", mapped.reason), mapped.reason
    assert "400" in mapped.observed  # the inner instance's answer; only the loop evidence reveals it
    assert {kind: j.verdict for kind, j in controls.items()} == {"public": Verdict.WORKS, "wildcard": Verdict.WORKS}


def test_a_proxy_that_refuses_then_dials_itself_is_caught_by_the_sweep_not_the_case(_network_lab):
    cases = [c for c in SELF_CASES if c.kind == "public" and c.spelling.spelling_id == "dotted"]
    judgements, late, controls = run_self_cases(_network_lab, LATE_SELF_DIALER, cases)
    assert {j.verdict for j in judgements.values()} == {Verdict.BLOCKED}  # it did answer 403 first
    ((endpoint, found),) = late.items()
    assert endpoint[0] == "11.0.0.20" and len(found.window.peers) + found.window.reused == 2
    assert found.attempts == ("connect-proxy-self-public-dotted", "absolute-proxy-self-public-dotted")
    assert f"late connection(s) to the proxy's own 11.0.0.20:{endpoint[1]}" in describe_late_loops(late)
    assert controls["public"].verdict is Verdict.BROKEN  # and refusing everything is not a working proxy


def test_command_without_address_placeholder_has_no_public_or_wildcard_target(_network_lab):
    main = start_proxy_command(_network_lab, reference_command().replace("{address}", "127.0.0.1"))
    try:
        targets = start_self_targets(_network_lab, main, None, no_instance_reason="put {address} in it")
        try:
            by_kind = {case.kind: targets.target(case) for case in SELF_CASES}
        finally:
            targets.stop()
    finally:
        main.stop()
    assert isinstance(by_kind["own"], SelfTarget) and by_kind["own"].endpoint == ("127.0.0.1", main.port)
    assert by_kind["public"] == by_kind["wildcard"] == "put {address} in it"


@needs_tinyproxy
def test_tinyproxy_on_a_lab_public_address_dials_itself(_network_lab, tmp_path):
    cases = [c for c in SELF_CASES if c.kind == "public" and c.spelling.spelling_id == "dotted"]
    judgements, _late, _controls = run_self_cases(_network_lab, tinyproxy_command(tmp_path), cases)
    for test_id in ("connect-proxy-self-public-dotted", "absolute-proxy-self-public-dotted"):
        judgement = judgements[test_id]
        assert judgement.verdict is Verdict.ALLOWED, judgement
        assert ("socket table shows 1 connection(s) to 11.0.0.20:" in judgement.reason
                or "the lab counted 1 SYN(s) to 11.0.0.20:" in judgement.reason), judgement
    # tinyproxy 1.11 can only notice a loop once it has been made ("Prevented endless loop"), and then
    # not always: the inner hop sometimes refuses the nonce request with 400, sometimes forwards it.
    # Either way the kernel saw the dial, which is what the verdict rests on. The second dial sometimes
    # reuses the first one's 4-tuple (its TIME_WAIT is at tinyproxy's accepting end, which takes a newer
    # SYN): no new peer in the table then, one SYN more in the lab's counter (about 1 run in 10 before
    # the counter, when this case was judged BLOCKED).


def _conformance_self_run(command: str, *select: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox", "--sandbox-proxy-cmd", command,
         str(ROOT / "conformance" / "test_ssrf_self.py"), "-p", "no:cacheprovider", "-q", "-rfE", *select],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)


def test_conformance_self_cases_fail_the_pre_fix_proxy_exactly_where_it_loops():
    result = _conformance_self_run(BROKEN_SELF_CHECK)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    failed = set(re.findall(r"FAILED \S+::test_proxy_never_connects_to_its_own_address\[([^\]]+)\]", output))
    assert failed == PRE_FIX_LOOPS, output
    assert f"{len(PRE_FIX_LOOPS)} failed" in output and "ERROR" not in output, output
    assert "looped to the proxy itself: the lab's socket table shows 1 connection(s) to 11.0.0.20:8080" in output


def test_conformance_self_cases_fail_a_late_self_dialer_at_module_teardown():
    # Only the two dotted attempts at the public instance, so the last dial to it (150 ms after the last
    # answer) can only be found by the sweep. In the whole module a dial lands late or inside a later
    # attempt's window (and fails that attempt) depending on how fast the attempts run: both fail the
    # proxy, but only the first proves the teardown sweep.
    result = _conformance_self_run(LATE_SELF_DIALER, "-k", "public-dotted")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "ERROR at teardown" in output or "ERROR conformance/test_ssrf_self.py" in output, output
    assert "the proxy connected to itself after answering" in output, output
    assert "late connection(s) to the proxy's own 11.0.0.20:8080" in output, output
