"""Helpers for tests that drive a third party's launcher through ``--sandbox-exec``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from pytest_sandbox.probes.syscall import ExecTarget, all_capabilities, harness_identity

ROOT = Path(__file__).resolve().parents[1]


def id_prefix(launcher: str) -> str:
    """``exec-<who the runner is in there>-``: test ids name the caller the target showed."""
    return f"exec-{ExecTarget(launcher).preflight().test_name(harness_identity(), all_capabilities())}-"


def run_syscall_suite(launcher: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", f"--sandbox-exec={launcher}",
         *extra, "conformance/test_syscalls.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "1000"},
    )


def run_with_report(launcher: str, report: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str],
                                                                        dict[str, dict[str, Any]]]:
    """Run the syscall suite against ``launcher``; return the run and each test's evidence record."""
    completed = run_syscall_suite(launcher, f"--sandbox-report={report}", *extra)
    assert report.exists(), completed.stdout[-3000:] + completed.stderr[-2000:]
    return completed, {record["test"]: record for record in json.loads(report.read_text())["probes"]}


def failed_lines(completed: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """test id -> the one-line failure message pytest printed for it."""
    return dict(re.findall(r"^FAILED [^[]+\[(\S+)\] - (.*)$", completed.stdout, re.MULTILINE))


def scorecard_row(completed: subprocess.CompletedProcess[str], category: str) -> dict[str, int]:
    header = re.search(r"^category\s+(.+)$", completed.stdout, re.MULTILINE)
    row = re.search(rf"^{re.escape(category)}\s+([\d ]+)$", completed.stdout, re.MULTILINE)
    assert header and row, completed.stdout[-3000:]
    return dict(zip(header.group(1).split(), map(int, row.group(1).split()), strict=True))
