"""The plugin: inert without --sandbox, one readable error for bad input, fixtures work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def pytester_imports_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester's subprocesses run elsewhere, where an editable install may point at another checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_plugin_is_inert_without_the_flag(pytester):
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "scorecard" not in result.stdout.str()


def test_conformance_tests_skip_with_a_reason_without_the_flag(pytester):
    pytester.makepyfile(test_conf=(ROOT / "conformance/test_syscalls.py").read_text())
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*runs only with --sandbox*"])


def test_unknown_syscall_in_policy_stops_the_run_with_one_error(pytester, tmp_path):
    policy = tmp_path / "bad.toml"
    policy.write_text('[seccomp]\ndeny = ["ptrace", "pidfd_getfdd"]\n')
    pytester.makepyfile(test_conf=(ROOT / "conformance/test_syscalls.py").read_text())
    result = pytester.runpytest_subprocess("--sandbox", f"--sandbox-policy={policy}")
    assert result.ret == 4  # pytest's usage error: nothing was collected or run
    errors = [line for line in result.stderr.lines if "pytest-sandbox" in line]
    assert len(errors) == 1
    assert "seccomp.deny[1]" in errors[0] and "unknown syscall 'pidfd_getfdd'" in errors[0]
    assert "did you mean 'pidfd_getfd'" in errors[0]
    assert "Traceback" not in result.stderr.str()


def test_bad_network_mode_flag_is_a_usage_error(pytester):
    result = pytester.runpytest_subprocess("--sandbox", "--sandbox-modes=block,open")
    assert result.ret == 4
    assert "unknown network mode 'open'" in result.stderr.str()


def test_sandbox_fixture_runs_application_code_under_the_policy(pytester):
    pytester.makepyfile("""
        import sys, pytest

        def test_runs(sandbox):
            result = sandbox.run([sys.executable, "-c", "print('hello from inside')"])
            assert result.returncode == 0 and result.stdout == b"hello from inside\\n"
            status = sandbox.run(["/bin/cat", "/proc/self/status"]).stdout.decode()
            assert "Seccomp:\\t2" in status

        @pytest.mark.sandbox_policy("strict")
        def test_marker_selects_policy(sandbox, sandbox_policy):
            assert sandbox_policy.name == "strict"
            code = ("import ctypes; c=ctypes.CDLL(None,use_errno=True); "
                    "c.syscall(250,0xffff,0,0,0,0); print(ctypes.get_errno())")
            assert sandbox.run([sys.executable, "-c", code]).stdout.strip() == b"1"  # keyctl denied by strict
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_scorecard_is_printed_and_merged_under_xdist(pytester):
    pytester.makepyfile(test_conf=(ROOT / "conformance/test_syscalls.py").read_text())
    serial = pytester.runpytest_subprocess("--sandbox", "--sandbox-modes=block", "-p", "no:cacheprovider")
    parallel = pytester.runpytest_subprocess("--sandbox", "--sandbox-modes=block", "-n", "2", "-p", "no:cacheprovider")
    assert serial.ret == 0 and parallel.ret == 0

    def scorecard(result):
        lines = result.stdout.lines
        start = next(i for i, line in enumerate(lines) if "pytest-sandbox scorecard" in line)
        return [line.split() for line in lines[start + 1:start + 4]]

    assert scorecard(serial) == scorecard(parallel)
    assert scorecard(serial)[1][0] == "syscall" and int(scorecard(serial)[1][1]) > 100


# Records, in the xdist controller, whether it imported the fixture modules, and whether the fixtures reached
# the workers (a test below uses one).
CONTROLLER_RECORDER = """
import sys

def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):
        loaded = sorted(name for name in sys.modules if name.startswith("pytest_sandbox.fixtures.")
                        and name.rsplit(".", 1)[1] in ("network", "conformance", "loaded_filter", "sandbox"))
        print("controller imported:", loaded or "none")
"""


def test_an_xdist_controller_imports_no_fixture_module_and_its_workers_have_every_fixture(pytester):
    pytester.makeconftest(CONTROLLER_RECORDER)
    pytester.makepyfile(test_uses_fixtures="def test_policy(sandbox_policy):\n    assert sandbox_policy.name\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "-n", "1", "--sandbox",
                                           "--sandbox-modes=block", timeout=120)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*controller imported: none"])
    # Listed where they are asked for, even by a controller.
    listing = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "1", "--fixtures", timeout=120)
    listing.stdout.fnmatch_lines(["sandbox_policy*", "sandbox -- *"])


@pytest.mark.parametrize("option", ["--collect-only", "--setup-plan"])
def test_a_run_that_runs_no_test_owes_no_verdict(option):
    """Collecting or planning the suite is not a run that proved nothing: no scorecard, no failure."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--sandbox", option,
                             "conformance/test_egress.py", "conformance/test_ssrf_self.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scorecard" not in result.stdout and "could not run" not in result.stdout


PREFETCH_RECORDER = """
from pytest_sandbox.fixtures.stash import SESSION_KEY


def pytest_sessionfinish(session):
    running = session.config.stash.get(SESSION_KEY, None)
    print("probe runs started:", running is not None and running.prefetching)
"""


@pytest.mark.parametrize(("option", "started"), [("--setup-plan", False), ("--setup-only", False),
                                                  ("--collect-only", False), (None, True)])
def test_probe_runs_start_early_only_where_tests_run(tmp_path, option, started):
    """The reference's probe runs are started beside the first tests (``SandboxSession.prefetch``) only
    when the syscall tests will run: planning or listing them launches no sandbox."""
    (tmp_path / "prefetch_recorder.py").write_text(PREFETCH_RECORDER)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    selection = "conformance/test_syscalls.py"
    if started:
        selection += "::test_ordinary_work_still_functions"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "prefetch_recorder", "-q", "-s",
               "--sandbox", "--sandbox-modes=block", "--sandbox-identities=current", selection]
    result = subprocess.run(command + ([option] if option else []), cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"probe runs started: {started}" in result.stdout, result.stdout
