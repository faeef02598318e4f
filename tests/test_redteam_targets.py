"""Broken syscall targets that attack the syscall category's evidence and earn nothing they should not.

``broken_targets/userns_root_uselib_only.sh``: root of a user namespace of its own, all capabilities there, and
a filter that refuses only uselib (and kills every x32/i386 call). The kernel refuses that caller much of what
the baseline requirement refuses (capability checks against the initial namespace), with EPERM: a baseline
taken outside a user namespace would credit the filter with those. Measured: 0 BLOCKED on the native ABI,
61 BLOCKED on x32/i386 (the filter's real kills), the five EPERM rows INDETERMINATE.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USERNS_UID0 = ROOT / "tests/broken_targets/userns_root_uselib_only.sh"
KERNEL_REFUSES_USERNS_ROOT = ("fsopen", "fsmount", "fspick", "move_mount", "pivot_root")


def _userns_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True,
                          check=False).returncode == 0


@pytest.mark.skipif(not _userns_ok(), reason="needs unshare(1) and unprivileged user namespaces")
def test_root_of_a_user_namespace_with_no_real_filter_earns_no_native_blocked(tmp_path):
    report = tmp_path / "report.json"
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--sandbox", "--sandbox-exec",
         str(USERNS_UID0), f"--sandbox-report={report}", str(ROOT / "conformance" / "test_syscalls.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output[-3000:]
    verdicts = {p["test"]: p for p in json.loads(report.read_text())["probes"]}
    assert verdicts and all(test.startswith("exec-uid0-allcaps-userns-") for test in verdicts), sorted(verdicts)[:5]
    blocked = sorted(test for test, p in verdicts.items() if p["verdict"] == "BLOCKED")
    # Every BLOCKED is the filter's own kill of a foreign ABI; nothing on the native ABI but uselib's refusal.
    assert blocked and all(test.endswith("-x32") or "-i386" in test or "-uselib-" in test for test in blocked), blocked
    for name in KERNEL_REFUSES_USERNS_ROOT:
        row = verdicts[f"exec-uid0-allcaps-userns-{name}-native"]
        assert row["verdict"] == "INDETERMINATE" and "unfiltered kernel already answers EPERM" in row["reason"], row
