"""Quick kills (issue #12): an i386 call the harness expects the filter to kill is attempted first by a child that
shares the runner's memory, and only its real death by SIGSYS is taken as the outcome (x32 calls likewise).

The proofs, each in a runner process of its own (the real runner module, a filter loaded with pyseccomp where
asked): under a native-only filter that kills every i386 call the quick kills give exactly the outcomes of a child
per probe with a fraction of the forks; an expectation that is wrong (no filter at all) changes no outcome, and a
runner that took the expectation for the outcome is caught; a wrongly expected call that blocks is ended by the
quick child's alarm and then judged as a child of its own judges it; the calls that act on the caller's memory
are never attempted that way; the harness marks exactly the calls its own evaluation of the loaded filter kills.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.probes.syscall import expect_kills
from pytest_sandbox.probes.syscall_cases import denial_cases, requirements_of
from pytest_sandbox.probes.syscall_runner import (
    QUICK_KILL_EXCLUDED,
    QUICK_KILL_MIN_KERNEL,
    _kernel_at_least,
    quick_kill_candidate,
)
from pytest_sandbox.seccomp.compiler import compile_policy

ROOT = Path(__file__).resolve().parents[1]
MODE = "proxy"
# i386 numbers (syscall_32.tbl): close 6, dup 41, dup2 63, ioctl 54, pause 29, munmap 91; x32 and native
# (syscall_64.tbl): close 3, dup 32, dup2 33, ioctl 514 (x32's own row), munmap 11.
I386_CALLS = (6, 41, 63, 54)
X32_CALLS = (3, 32, 33, 514)
NR_PAUSE_I386, NR_MUNMAP_I386, NR_MUNMAP_X32, NR_CLOSE_NATIVE = 29, 91, 11, 3
CALLS = len(I386_CALLS) * 5 + len(X32_CALLS) * 3

# Runs the real runner module's run_plan in this fresh process, after loading (or not) a filter whose bad-arch
# action kills the process (as the reference's native-only filter does), counting the forks it makes itself.
RUNNER_HARNESS = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
options = json.loads(sys.argv[2])
from pytest_sandbox.probes import syscall_runner as runner
if options["filter"]:
    import pyseccomp
    native_only = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    native_only.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.KILL_PROCESS)
    native_only.load()
if options.get("alarm_handler"):
    import signal
    signal.signal(signal.SIGALRM, lambda *_: None)
runner.PROBE_TIMEOUT_SECONDS = options.get("timeout", runner.PROBE_TIMEOUT_SECONDS)
if options.get("trust_the_expectation"):  # the cheapest fake: report the expected kill without attempting it
    runner.quick_kill = lambda machine, probe: {"type": "signal", "value": 31}
forks = [0]
real_fork = os.fork
def counting_fork():
    forks[0] += 1
    return real_fork()
os.fork = counting_fork
machine = runner._Machine()
outcomes = {}
runner.run_plan(machine, options["plan"], lambda probe, outcome: outcomes.__setitem__(probe["id"], outcome),
                lanes=1)
print(json.dumps({"ready": machine.quick_kill, "forks": forks[0], "outcomes": outcomes}))
"""


def run_runner(plan: list[dict[str, Any]], *, native_only_filter: bool, **options: Any) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", RUNNER_HARNESS, str(ROOT),
                             json.dumps({"plan": plan, "filter": native_only_filter, **options})],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def i386_probe(probe_id: str, nr: int, *args: int, expect_kill: bool = True) -> dict[str, Any]:
    probe: dict[str, Any] = {"id": probe_id, "kind": "syscall", "abi": "i386", "nr": nr, "args": list(args),
                             "setup": []}
    return {**probe, "expect_kill": True} if expect_kill else probe


def plan_of(expect_kill: bool) -> list[dict[str, Any]]:
    plan = [i386_probe(f"i386-{index}-{nr}", nr, -1, 0, 0, expect_kill=expect_kill)
            for index, nr in enumerate(I386_CALLS * 5)]
    plan += [{**i386_probe(f"x32-{index}-{nr}", nr, -1, 0, 0, expect_kill=expect_kill), "abi": "x32"}
             for index, nr in enumerate(X32_CALLS * 3)]
    # A native refusal between them, and one at the end: the children that run them see what they always saw.
    plan.insert(7, {"id": "native-close-7", "kind": "syscall", "abi": "native", "nr": NR_CLOSE_NATIVE, "args": [-1],
                    "setup": []})
    return [*plan, {"id": "native-close-end", "kind": "syscall", "abi": "native", "nr": NR_CLOSE_NATIVE,
                    "args": [-1], "setup": []}]


@pytest.fixture(scope="module")
def quick_kills_possible() -> None:
    if not _kernel_at_least(os.uname().release, QUICK_KILL_MIN_KERNEL):
        pytest.skip(f"kernel {os.uname().release}: quick kills need {'.'.join(map(str, QUICK_KILL_MIN_KERNEL))}")
    pytest.importorskip("pyseccomp")


def test_expected_kills_give_the_outcomes_of_a_child_each_with_a_fraction_of_the_forks(quick_kills_possible):
    forked = run_runner(plan_of(expect_kill=False), native_only_filter=True)
    quick = run_runner(plan_of(expect_kill=True), native_only_filter=True)
    assert quick["ready"] is True
    assert quick["outcomes"] == forked["outcomes"]
    killed = {probe_id for probe_id, outcome in forked["outcomes"].items()
              if outcome == {"type": "signal", "value": signal.SIGSYS}}
    assert len(killed) == CALLS  # every i386 and x32 call died, by the filter, in both runs
    assert forked["outcomes"]["native-close-end"] == {"type": "errno", "value": 9}
    # A child per death before; the quick kills come first, after which the native refusals between them share
    # one batch child, and every outcome is still reported at its place in the plan.
    assert forked["forks"] >= len(killed)
    assert quick["forks"] == 1, quick
    assert list(quick["outcomes"]) == [probe["id"] for probe in plan_of(expect_kill=True)]


def test_a_wrong_expectation_changes_no_outcome_and_a_runner_that_trusts_it_is_caught(quick_kills_possible):
    forked = run_runner(plan_of(expect_kill=False), native_only_filter=False)
    # Refused by the kernel, none killed: EBADF for fd -1, or ENOSYS for x32 on a kernel built without it.
    assert all(outcome["type"] == "errno" and outcome["value"] in (9, 38) for outcome in forked["outcomes"].values())
    quick = run_runner(plan_of(expect_kill=True), native_only_filter=False)
    assert quick["outcomes"] == forked["outcomes"]  # nothing killed them: each was attempted in a child of its own
    trusting = run_runner(plan_of(expect_kill=True), native_only_filter=False, trust_the_expectation=True)
    wrong = [probe_id for probe_id, outcome in trusting["outcomes"].items() if outcome != forked["outcomes"][probe_id]]
    assert len(wrong) == CALLS


def test_a_wrongly_expected_call_that_blocks_ends_by_the_alarm_and_is_judged_in_a_child_of_its_own(
        quick_kills_possible):
    plan = [i386_probe("pause", NR_PAUSE_I386), i386_probe("close-after", 6, -1)]
    quick = run_runner(plan, native_only_filter=False, timeout=1)
    forked = run_runner([{**probe, "expect_kill": False} for probe in plan], native_only_filter=False, timeout=1)
    assert quick["outcomes"] == forked["outcomes"] == {"pause": {"type": "timeout"},
                                                       "close-after": {"type": "errno", "value": 9}}


def test_calls_on_the_callers_memory_are_never_quick_and_a_signal_handler_turns_quick_kills_off(
        quick_kills_possible):
    munmap = [i386_probe("munmap", NR_MUNMAP_I386, 0, 4096), {**i386_probe("munmap-x32", NR_MUNMAP_X32, 0, 4096),
                                                               "abi": "x32"}]
    assert NR_MUNMAP_I386 in QUICK_KILL_EXCLUDED["i386"] and NR_MUNMAP_X32 in QUICK_KILL_EXCLUDED["x32"]
    ran = run_runner(munmap, native_only_filter=True)
    assert ran["forks"] == 2  # a child of its own each, killed there
    assert all(outcome == {"type": "signal", "value": int(signal.SIGSYS)} for outcome in ran["outcomes"].values())
    handled = run_runner(plan_of(expect_kill=True), native_only_filter=True, alarm_handler=True)
    assert handled["ready"] is False
    assert handled["forks"] >= CALLS
    assert handled["outcomes"] == run_runner(plan_of(expect_kill=False), native_only_filter=True)["outcomes"]


def test_the_kernel_gate_reads_the_release():
    assert not _kernel_at_least("5.15.0-91-generic", (5, 16))
    assert _kernel_at_least("5.16", (5, 16))
    assert _kernel_at_least("6.18.44-fc-v1045", (5, 16))
    assert not _kernel_at_least("4.19.0", (5, 16))


def test_the_harness_expects_a_kill_exactly_where_its_evaluation_of_the_filter_says_kill():
    policy = load_policy("baseline")
    plan = [case.runner_probe() for case in denial_cases(requirements_of(policy, MODE)) if case.nr is not None]
    marked = expect_kills(plan, compile_policy(policy, MODE))
    expected = {probe["id"] for probe in marked if probe.get("expect_kill")}
    plain = {probe["id"] for probe in plan if probe.get("abi") in ("i386", "x32") and not probe.get("setup")
             and all(type(a) is int for a in probe["args"]) and probe.get("mux") in (None, "socketcall")}
    # A native-only filter kills every i386 call at its arch check and every x32 call by its number.
    assert expected == plain and {probe["abi"] for probe in marked if probe.get("expect_kill")} == {"i386", "x32"}
    assert not any(probe.get("abi") == "native" and probe.get("expect_kill") for probe in marked)
    # Podman's profile admits i386 (SCMP_ARCH_X86 in its archMap): its i386 calls are judged by its rules, and
    # only those its rules kill could be expected (it kills none: its refusals are ERRNO).
    podman = load_policy(str(ROOT / "fixtures" / "profiles" / "podman-default-2026.json"))
    assert not any(probe.get("expect_kill")
                   for probe in expect_kills(plan, compile_policy(podman, podman.network.mode)))


def test_the_runner_attempts_only_plain_expected_i386_calls_quickly():
    class Ready:
        quick_kill = True
        block_error = ""

    plain = i386_probe("p", 6, -1)
    assert quick_kill_candidate(Ready(), plain)  # type: ignore[arg-type]
    assert quick_kill_candidate(Ready(), {**plain, "abi": "x32", "nr": 3})  # type: ignore[arg-type]
    for not_quick in ({**plain, "expect_kill": False}, {**plain, "abi": "native"}, {**plain, "setup": ["setsid"]},
                      {**plain, "abi": "x32", "nr": NR_MUNMAP_X32},
                      {**plain, "control": True}, {**plain, "args": ["pid"]}, {**plain, "nr": NR_MUNMAP_I386},
                      {**plain, "kind": "thread_start"}):
        assert not quick_kill_candidate(Ready(), not_quick), not_quick  # type: ignore[arg-type]
    Ready.quick_kill = False
    assert not quick_kill_candidate(Ready(), plain)  # type: ignore[arg-type]
