"""The loaded filter read back (PTRACE_SECCOMP_GET_FILTER) and judged (category ``syscall-evaluation``).

The deliberately broken target: tests/broken_targets/allows_uselib.toml refuses ptrace but not uselib
and lookup_dcookie, which tests/broken_targets/requires_uselib.toml requires refused and for which the
catalogue has no harmless live probe. The evaluation must name both, through the reference launcher and
through a third party's launcher (``--sandbox-exec``), and pass when the requirement is enforced.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_sandbox.seccomp.bpf_eval import FilterResult
from pytest_sandbox.seccomp.readback import ReadBackError, hold_script, new_token, read_back, read_filters
from pytest_sandbox.verdicts.judgement import Outcome, Verdict
from pytest_sandbox.verdicts.loaded_filter import Prediction, judge_agreement

ROOT = Path(__file__).resolve().parents[1]
BROKEN = ROOT / "tests/broken_targets"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="PTRACE_SECCOMP_GET_FILTER needs root")

# Two filters with distinguishable errnos, loaded in this order, then the process holds still.
TWO_FILTERS = """
import pyseccomp as s, sys, time
for number in (11, 22):
    f = s.SyscallFilter(s.ALLOW)
    f.add_rule(s.ERRNO(number), "uselib")
    f.load()
print("loaded", flush=True)
time.sleep(30)
"""


@needs_root
def test_filters_come_back_in_load_order():
    process = subprocess.Popen([sys.executable, "-c", TWO_FILTERS], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"loaded\n"
        programs = read_filters(process.pid)
    finally:
        process.kill()
        process.wait()
    from pytest_sandbox.seccomp.behaviour import ABIS, number_of
    from pytest_sandbox.seccomp.bpf_eval import run_stack

    uselib = number_of(ABIS[0], "uselib")
    assert uselib is not None
    assert len(programs) == 2
    # evaluated alone, the first program read back is the first loaded (errno 11)
    assert [run_stack((p,), uselib, ABIS[0].audit_arch, ()).data for p in programs] == [11, 22]
    # and the stack answers as the kernel does: the newest filter wins a tie of actions
    assert run_stack(programs, uselib, ABIS[0].audit_arch, ()).data == 22


@needs_root
def test_a_process_without_filters_reads_back_as_none():
    process = subprocess.Popen([sys.executable, "-c", "print('x', flush=True); import time; time.sleep(30)"],
                               stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline() == b"x\n"
        assert read_filters(process.pid) == ()
    finally:
        process.kill()
        process.wait()


@needs_root
def test_a_runner_that_never_reports_is_a_clear_error():
    token = new_token()
    with pytest.raises(ReadBackError, match="exited before it could be read back"):
        read_back(lambda: subprocess.Popen([sys.executable, "-S", "-"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE), b"print('nothing')\n", token, timeout=20)
    # and one that does is found by its token and read (no filter here)
    loaded = read_back(lambda: subprocess.Popen([sys.executable, "-S", "-"], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE), hold_script(token).encode(), token)
    assert loaded.programs == () and loaded.pid == loaded.inner_pid


def test_a_disagreement_between_evaluation_and_live_probe_is_a_finding():
    errno_1 = FilterResult(0x00050001)
    allow = FilterResult(0x7FFF0000)
    agreeing = [Prediction("ptrace-native", errno_1, Outcome.errno(3), Outcome.errno(1)),
                Prediction("getppid-native", allow, Outcome("return", 5), Outcome("return", 5))]
    assert judge_agreement(agreeing, 0, "loaded").verdict is Verdict.WORKS
    differing = [*agreeing, Prediction("setns-x32", errno_1, Outcome.errno(22), Outcome.errno(22))]
    judgement = judge_agreement(differing, 0, "loaded")
    assert judgement.verdict is Verdict.BROKEN
    assert "setns-x32: evaluation ERRNO(1) predicts EPERM, live probe observed EINVAL" in judgement.reason
    unavailable = [Prediction("x-i386", errno_1, Outcome.errno(3), Outcome("unavailable"))]
    assert judge_agreement(unavailable, 0, "loaded").verdict is Verdict.INDETERMINATE


def run_evaluation(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", "--sandbox-modes=allow",
         "--sandbox-identities=current", *options, "conformance/test_loaded_filter.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "1000"})


def failures(completed: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """test function -> its one-line failure message."""
    return dict(re.findall(r"^FAILED \S+::(\w+)\[\S+\] - (.*)$", completed.stdout, re.MULTILINE))


def evaluation_row(completed: subprocess.CompletedProcess[str]) -> list[int]:
    row = re.search(r"^syscall-evaluation\s+([\d ]+)$", completed.stdout, re.MULTILINE)
    assert row, completed.stdout[-3000:]
    return [int(n) for n in row.group(1).split()]


@needs_root
@pytest.mark.parametrize("target", ["reference", "exec"])
def test_a_loaded_filter_that_lets_a_required_call_without_live_probe_through_is_named(target: str):
    policy = str(BROKEN / "allows_uselib.toml")
    where = ([f"--sandbox-policy={policy}"] if target == "reference" else
             [f"--sandbox-exec={sys.executable} -m pytest_sandbox.cli run --policy {policy} --"])
    completed = run_evaluation(*where, f"--sandbox-require={BROKEN / 'requires_uselib.toml'}")
    failed = failures(completed)
    assert set(failed) == {"test_loaded_filter_refuses_what_the_requirement_refuses"}, completed.stdout[-3000:]
    message = failed["test_loaded_filter_refuses_what_the_requirement_refuses"]
    assert "ALLOWED" in message and "uselib" in message and "lookup_dcookie" in message
    assert "ptrace" not in message  # refused by the broken target too: not a hole
    assert "(x86_64): ERRNO(1) -> ALLOW" in message
    # x32 and i386 meet the target's bad-arch kill: refused there, as the requirement's own rules demand
    assert "(x32)" not in message and "(i386)" not in message
    assert evaluation_row(completed) == [0, 1, 0, 1, 0]  # BLOCKED ALLOWED INDETERMINATE WORKS BROKEN


@needs_root
def test_the_reference_enforcing_the_requirement_passes_the_evaluation():
    requirement = str(BROKEN / "requires_uselib.toml")
    completed = run_evaluation(f"--sandbox-policy={requirement}", f"--sandbox-require={requirement}")
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert evaluation_row(completed) == [1, 0, 0, 1, 0]


@needs_root
def test_a_target_that_shows_the_read_back_another_filter_than_the_probes_fails_the_agreement():
    launcher = BROKEN / "two_faced.sh"
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", f"--sandbox-exec={launcher}",
         f"--sandbox-require={BROKEN / 'requires_uselib.toml'}", "conformance/test_loaded_filter.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "COLUMNS": "1000", "PYTHON": sys.executable})
    failed = failures(completed)
    # the read-back filter itself refuses what is required: only the agreement check can see the lie
    assert set(failed) == {"test_evaluation_agrees_with_the_live_probes"}, completed.stdout[-3000:]
    message = failed["test_evaluation_agrees_with_the_live_probes"]
    assert "BROKEN" in message
    assert "ptrace-native: evaluation ERRNO(1) predicts EPERM, live probe observed" in message
    assert evaluation_row(completed) == [1, 0, 0, 0, 1]
