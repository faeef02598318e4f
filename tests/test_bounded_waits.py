"""Every wait on a ``--sandbox-exec`` launcher has a bound, and its failure is cached per target.

Issue #10 items 3 and 4: a launcher that hung cost 300 s per test, retried for every test, and left a
grandchild behind each time; one that exited at once earned ``filter-present`` WORKS ("reported 0 of
113 probes"). The deliberately broken launchers (``tests/broken_targets/``) answer the identity
pre-flight and then hang (``hangs_when_probing.sh``, with a grandchild of its own) or run nothing
(``quits_when_probing.sh``). Each must end the syscall category with one reason, every test of the
target "not run" with it (never a pass), the launcher started twice in all (pre-flight, one probe run),
and nothing left behind. No wall-clock assertion: the bound is the subprocess timeout, and the reason
names the wait (``EXEC_RUN_TIMEOUT_SECONDS``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from proc_scan import processes_carrying

from pytest_sandbox.probes.syscall import EXEC_RUN_TIMEOUT_SECONDS, PREFLIGHT_TIMEOUT_SECONDS
from pytest_sandbox.probes.syscall_cases import ProbeCase
from pytest_sandbox.verdicts.judgement import Outcome, Verdict
from pytest_sandbox.verdicts.syscall import FilterRequirement, judge_exec, judge_filter_present

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "tests" / "broken_targets"


def processes_with(token: str) -> list[str]:
    """Live processes whose environment carries ``token`` (what the launcher and its children inherit)."""
    found = []
    for pid in processes_carrying(token):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append(f"{pid}: {command}")
    return found


def test_the_survivor_scan_sees_a_process_carrying_the_token():
    """Positive control for :func:`processes_with`: a process started with the token is found."""
    token = f"pytest-sandbox-bounded-{uuid.uuid4().hex}"
    sleeper = subprocess.Popen(["sleep", "60"], env={**os.environ, "BOUNDED_WAIT_TOKEN": token})
    try:
        assert [line.split(":")[0] for line in processes_with(token)] == [str(sleeper.pid)]
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
    assert processes_with(token) == []


def run_against(launcher: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[str], str]:
    token = f"pytest-sandbox-bounded-{uuid.uuid4().hex}"
    log = tmp_path / "launches"
    env = {**os.environ, "COLUMNS": "1000", "LAUNCH_LOG": str(log), "BOUNDED_WAIT_TOKEN": token}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", f"--sandbox-exec={launcher}",
         "-rf", "conformance/test_syscalls.py"],
        cwd=ROOT, capture_output=True, text=True, env=env,
        # the bound under test: pre-flight + one probe run, plus the suite's own start-up, with room for load
        timeout=PREFLIGHT_TIMEOUT_SECONDS + EXEC_RUN_TIMEOUT_SECONDS + 120,
    )
    launches = log.read_text().split() if log.exists() else []
    return completed, launches, token


def not_run_reasons(output: str) -> dict[str, str]:
    """node id -> its "not run" reason, from ``-rf``'s short summary."""
    return dict(re.findall(r"^FAILED (\S+) - \S*CategoryNotRun: pytest-sandbox: not run: (.*)$", output,
                           re.MULTILINE))


def test_a_launcher_that_hangs_ends_the_category_once_and_leaves_nothing(tmp_path: Path):
    completed, launches, token = run_against(str(TARGETS / "hangs_when_probing.sh"), tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output[-3000:]
    assert len(launches) == 2, launches  # the pre-flight and ONE probe run: never a launch (or a wait) per test
    reasons = not_run_reasons(completed.stdout)
    summary = re.search(r"^(\d+) failed in", completed.stdout, re.MULTILINE)
    assert summary and len(reasons) == int(summary.group(1)) > 100, completed.stdout[-3000:]
    assert len(set(reasons.values())) == 1, set(reasons.values())
    reason = next(iter(reasons.values()))
    assert f"did not finish in {EXEC_RUN_TIMEOUT_SECONDS:g} s" in reason
    assert "the launcher and everything it started were killed and nothing was judged" in reason
    assert " passed" not in completed.stdout
    for category in ("syscall", "syscall-controls"):  # the scorecard row is the reason, not counts
        assert re.search(rf"^{category}\s+not run: .*did not finish in", completed.stdout, re.MULTILINE), category
    assert processes_with(token) == []  # the sleeping launcher and its grandchild were killed by the guardian


def test_a_launcher_that_runs_nothing_earns_no_pass(tmp_path: Path):
    completed, launches, token = run_against(str(TARGETS / "quits_when_probing.sh"), tmp_path)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output[-3000:]
    assert len(launches) == 2, launches
    reasons = not_run_reasons(completed.stdout)
    summary = re.search(r"^(\d+) failed in", completed.stdout, re.MULTILINE)
    assert summary and len(reasons) == int(summary.group(1)) > 100, completed.stdout[-3000:]
    assert any(test.endswith("-filter-present]") for test in reasons)  # issue #10 item 4: it was WORKS
    reason = next(iter(set(reasons.values())))
    assert re.search(r"the launcher exited with 0 and reported 0 of \d+ probes; nothing was probed", reason)
    assert " passed" not in completed.stdout
    assert processes_with(token) == []


# -- filter-present reads a status, or it is not proven ---------------------------------------------------


FILTER_PRESENT = ProbeCase("filter-present", "status", "/proc/self/status shows the filters and NoNewPrivs")
MISSING = Outcome("error", None, "the probe runner in 'x' exited with 0 and reported 0 of 113 probes: ")


@pytest.mark.parametrize("required", [FilterRequirement("the requirement baseline (proxy mode)", 1, True),
                                      FilterRequirement("the requirement none (proxy mode)", 0, False)])
def test_filter_present_without_a_status_read_is_never_works(required: FilterRequirement):
    """Even when the requirement installs no filter (formerly WORKS "installs no filter"), an outcome that
    is not a /proc/self/status read means the runner never ran: not proven."""
    judgement = judge_exec(FILTER_PRESENT, Outcome("error"), MISSING, identity_problems=(), required=required)
    assert judgement.verdict is Verdict.INDETERMINATE
    assert judgement.reason.startswith("not run: ") and "reported 0 of 113 probes" in judgement.reason


def test_filter_present_without_a_status_read_fails_the_reference_too():
    judgement = judge_filter_present(MISSING, None)
    assert judgement.verdict is Verdict.INDETERMINATE
