"""A certification run spread over pytest-xdist's execnet gateways (``--tx``): the README recipe "Across hosts".

Each gateway is a worker process with its own session: its own policy, its own probe runs and its own
network lab (the lab fixtures are session-scoped, so one lab per worker). The controller collects
every worker's verdicts into one scorecard and one ``--sandbox-report`` per target, the same as a
serial run's. Tested here with ``popen`` gateways on this host; ``ssh=`` and ``socket=`` gateways
differ only in where the worker runs. README's main job spreads the suite the same way over two local
workers (``-n 2 --dist loadfile``: each module on one worker, so its campaign runs once), checked here too.
A broken target must fail the distributed run exactly as it fails the serial one: spreading the run may
never hide a hole.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.report.writers import verdict_map

ROOT = Path(__file__).resolve().parents[1]
# Syscall probes, the direct-egress category and the SSRF cases that each need a lab of their own
# (DNS rebinding, keep-alive reuse, mixed answers, Host header): every kind of worker-side state.
SUBSET = ["conformance/test_syscalls.py", "conformance/test_egress.py", "conformance/test_ssrf.py",
          "-k", "test_syscalls or test_egress or rebinding or keep_alive or one_private_answer or public_host_header"]
GATEWAYS = ["-d", "--tx", f"2*popen//python={sys.executable}"]
# README's main job on one host: two local workers, each module on one of them (its campaign runs once).
LOADFILE = ["-n", "2", "--dist", "loadfile"]
SPREADS = {"popen-gateways": GATEWAYS, "two-workers-loadfile": LOADFILE}


def run(report: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "1000",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--sandbox", "--sandbox-modes=block",
         f"--sandbox-report={report}", *extra, *SUBSET],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env,
    )


def merged(report: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The scorecard (without the wording of summaries) and test id -> verdict of one report."""
    data = json.loads(report.read_text())
    scorecard = {name: {key: value for key, value in counts.items() if key != "summary"}
                 for name, counts in data["scorecard"].items()}
    return scorecard, verdict_map(data)


def workers_by_module(output: str) -> dict[str, set[str]]:
    """Module path -> the workers that ran its tests, from ``-v`` lines (``[gw0] [ 10%] PASSED conformance/...``)."""
    found: dict[str, set[str]] = {}
    for line in output.splitlines():
        words = line.split()
        if words and words[0].startswith("[gw") and words[0].endswith("]"):
            module = next((word.split("::")[0] for word in words if "::" in word), None)
            if module is not None:
                found.setdefault(module, set()).add(words[0].strip("[]"))
    return found


def workers_that_ran(output: str) -> set[str]:
    return {worker for workers in workers_by_module(output).values() for worker in workers}


@pytest.mark.parametrize("spread_options", list(SPREADS.values()), ids=list(SPREADS))
def test_spread_run_merges_into_the_serial_report(tmp_path: Path, spread_options: list[str]) -> None:
    serial = run(tmp_path / "serial.json")
    assert serial.returncode == 0, serial.stdout[-3000:] + serial.stderr[-2000:]
    spread = run(tmp_path / "spread.json", *spread_options)
    assert spread.returncode == 0, spread.stdout[-3000:] + spread.stderr[-2000:]
    assert workers_that_ran(spread.stdout) == {"gw0", "gw1"}, "both workers must have run tests"
    if spread_options == LOADFILE:
        by_module = workers_by_module(spread.stdout)
        assert set(by_module) == {path for path in SUBSET if path.endswith(".py")}
        assert all(len(workers) == 1 for workers in by_module.values()), by_module
    serial_card, serial_verdicts = merged(tmp_path / "serial.json")
    spread_card, spread_verdicts = merged(tmp_path / "spread.json")
    assert serial_card["syscall"]["BLOCKED"] > 100 and serial_card["ssrf"]["BLOCKED"] > 0
    assert serial_card["egress"]["status"] == "ran"
    assert spread_card == serial_card
    assert spread_verdicts == serial_verdicts


@pytest.mark.parametrize("spread_options", list(SPREADS.values()), ids=list(SPREADS))
@pytest.mark.parametrize("launcher", ["env"], ids=["no-sandbox-at-all"])
def test_a_broken_target_fails_the_spread_run_as_it_fails_the_serial_one(tmp_path: Path, launcher: str,
                                                                         spread_options: list[str]) -> None:
    """A "launcher" that runs the probes with no sandbox: every required refusal is ALLOWED, serial or spread."""
    target = ["--sandbox-exec", launcher]
    serial = run(tmp_path / "serial.json", *target)
    spread = run(tmp_path / "spread.json", *target, *spread_options)
    assert serial.returncode == spread.returncode == 1, spread.stdout[-3000:] + spread.stderr[-2000:]
    serial_card, serial_verdicts = merged(tmp_path / "serial.json")
    spread_card, spread_verdicts = merged(tmp_path / "spread.json")
    assert serial_card["syscall"]["ALLOWED"] > 100
    assert spread_card == serial_card
    assert spread_verdicts == serial_verdicts
    assert "ALLOWED" in spread.stdout and "exec-" in spread.stdout  # the hole is named per test id
