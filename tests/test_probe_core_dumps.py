"""A probe child a filter kills dumps no core (issue #12: a crash handler per SIGSYS death).

SIGSYS is a core-dumping signal (signal(7)), and a sentinel plan has 61 children that die by it. Where
core_pattern pipes to a crash handler (apport, systemd-coredump) the kernel ignores RLIMIT_CORE and starts
the handler for each of them, except when the limit is exactly 1 (fs/coredump.c: its guard against a
handler's own crash recursing); the runner therefore sets its soft limit to 1 (syscall_runner
``refuse_core_dumps``). core_pattern is one setting for the whole host, so these tests do not change it:
they use the file pattern a host like CI's has, where the same limit decides whether a core is written.
A child that starts with RLIMIT_CORE unlimited, loads a filter that kills setns, and execs the real runner
on a plan that calls setns: the probe must be reported killed by SIGSYS and no core written; the same runner
with ``refuse_core_dumps`` made a no-op writes one, so the test can tell.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_sandbox.probes import syscall
from pytest_sandbox.probes.syscall import parse_runner_report, runner_script
from pytest_sandbox.verdicts.judgement import Outcome

NR_SETNS = 308  # unistd_64.h
UNUSED_FD = 999_999
LIMIT_CALL = "    refuse_core_dumps(machine.libc)\n"

# Runs in the child before the runner: no core limit, cwd = the test's directory, a filter that kills
# setns (KILL_PROCESS: the probe child dies by SIGSYS), then the runner itself reads its script on stdin.
PRELUDE = """
import os, resource, sys, pyseccomp
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
os.chdir(sys.argv[1])
rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
rules.add_rule(pyseccomp.KILL_PROCESS, "setns")
rules.load()
os.execv(sys.executable, [sys.executable, "-S", "-"])
"""


@pytest.fixture
def file_core_pattern() -> str:
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern is {pattern!r}: these tests need a relative file pattern (a core in the cwd)")
    if resource.getrlimit(resource.RLIMIT_CORE)[1] != resource.RLIM_INFINITY and os.geteuid() != 0:
        pytest.skip("raising RLIMIT_CORE's hard limit needs root")
    return pattern


def _run_killed_probe(directory: Path) -> tuple[Outcome, list[str]]:
    plan = [{"id": "setns-killed", "kind": "syscall", "abi": "native", "nr": NR_SETNS, "args": [UNUSED_FD, 0],
             "setup": []}]
    done = subprocess.run([sys.executable, "-c", PRELUDE, str(directory)], input=runner_script(plan),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = parse_runner_report(done.stdout)
    return report.outcomes["setns-killed"], sorted(path.name for path in directory.iterdir())


def test_a_probe_child_killed_by_its_filter_writes_no_core(file_core_pattern, tmp_path):
    outcome, files = _run_killed_probe(tmp_path)
    assert outcome == Outcome("signal", signal.SIGSYS)
    assert files == []


def test_a_runner_that_leaves_the_core_limit_alone_is_seen_writing_one(file_core_pattern, tmp_path, monkeypatch):
    assert LIMIT_CALL in syscall._RUNNER_SOURCE
    monkeypatch.setattr(syscall, "_RUNNER_SOURCE", syscall._RUNNER_SOURCE.replace(LIMIT_CALL, ""))
    outcome, files = _run_killed_probe(tmp_path)
    assert outcome == Outcome("signal", signal.SIGSYS)
    assert [name for name in files if name.startswith(file_core_pattern.split("%")[0])], files


def test_a_hard_limit_of_zero_is_left_as_it_is_and_the_probes_still_run():
    """An unprivileged target may not raise a hard limit of 0; the runner goes on without lowering it."""
    plan = [{"id": "setns", "kind": "syscall", "abi": "native", "nr": NR_SETNS, "args": [UNUSED_FD, 0], "setup": []}]
    limit_then_run = ("import resource, os, sys; resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
                      "os.execv(sys.executable, [sys.executable, '-S', '-'])")
    done = subprocess.run([sys.executable, "-c", limit_then_run], input=runner_script(plan), capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert parse_runner_report(done.stdout).outcomes["setns"] == Outcome("errno", 9)  # EBADF
