"""Runs without the source tree: the built wheel, installed into a fresh virtual environment, runs the
whole conformance suite against a third-party target with one documented command (issue #5)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.seccomp.compiler import compile_policy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("pytest_sandbox-*.whl")
    return built


def test_wheel_carries_the_suite_the_policies_and_the_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("pytest_sandbox/conformance/test_syscalls.py", "pytest_sandbox/conformance/test_ssrf.py",
                     "pytest_sandbox/policy/bundled/baseline.toml", "pytest_sandbox/network/special_use.csv",
                     "pytest_sandbox/probes/syscall_runner.py", "pytest_sandbox/seccomp/spawner.py"):
        assert required in names, required


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (the third-party target)")
def test_wheel_only_install_runs_the_conformance_suite_against_bubblewrap(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, timeout=900)
    where = subprocess.run([venv / "bin/python", "-c", "import pytest_sandbox; print(pytest_sandbox.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout

    compiled = compile_policy(load_policy("baseline"), "proxy")
    launcher = tmp_path / "bwrap-baseline.sh"
    lines = ["#!/bin/sh"]
    flags = []
    for index, program in enumerate(compiled.programs):
        (tmp_path / f"filter{index}.bpf").write_bytes(program)
        lines.append(f"exec {3 + index}<{tmp_path / f'filter{index}.bpf'}")
        flags.append(f"--add-seccomp-fd {3 + index}")
    # its own PID namespace and /proc, as tests/test_bubblewrap.py runs it: with the host's, the witness rows fail;
    # its own network namespace, as a proxy-mode sandbox has: the egress category judges this launcher
    lines.append(f'exec bwrap --dev-bind / / --unshare-pid --unshare-net --proc /proc --die-with-parent '
                 f'{" ".join(flags)} -- "$@"')
    launcher.write_text("\n".join(lines) + "\n")
    launcher.chmod(0o755)

    report = tmp_path / "report.md"
    completed = subprocess.run(
        [venv / "bin/pytest-sandbox", "conformance", "-q", "-p", "no:cacheprovider", f"--sandbox-exec={launcher}",
         "--sandbox-require=baseline", f"--sandbox-report={report}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    assert "pytest-sandbox scorecard" in completed.stdout
    text = report.read_text()
    assert "| syscall |" in text and "| ssrf |" in text
    assert f"- **egress**: the launcher --sandbox-exec '{launcher}'" in text
