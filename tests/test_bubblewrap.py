"""A real third-party sandbox: bubblewrap loading filters compiled from ``baseline`` passes the syscall
suite through ``--sandbox-exec``; the same with one syscall dropped, with the i386 arch added after the
rules, and with no filter at all each fail and name the hole (issue #5)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from broken_filters import hand_built
from exec_targets import failed_lines, id_prefix

from pytest_sandbox.catalogues.syscalls import DEVICE_PATHS
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.seccomp.compiler import CompiledFilter, compile_policy
from pytest_sandbox.seccomp.launcher import Identity
from pytest_sandbox.session import may_open_setup_device

ROOT = Path(__file__).resolve().parents[1]
BWRAP = shutil.which("bwrap")
DEVICE = DEVICE_PATHS["userfaultfd"].device
pytestmark = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not installed (Debian: bubblewrap)")


def bwrap_launcher(tmp_path: Path, compiled: CompiledFilter | None, *, own_dev: bool = False,
                   own_pids: bool = True) -> str:
    """A wrapper script: open each BPF program on an fd, then exec bwrap with --add-seccomp-fd per program.
    The host's / and /dev, or with ``own_dev`` bubblewrap's own minimal /dev (``--dev``); a PID namespace with its
    own /proc (``--unshare-pid --proc /proc``, as Flatpak runs it), or with ``own_pids=False`` the host's."""
    lines = ["#!/bin/sh", "set -e"]
    flags = []
    for index, program in enumerate(compiled.programs if compiled else ()):
        path = tmp_path / f"filter{index}.bpf"
        path.write_bytes(program)
        fd = 3 + index  # single digits: POSIX sh redirects only fds 0-9
        lines.append(f"exec {fd}<{path}")
        flags.append(f"--add-seccomp-fd {fd}")
    dev = " --dev /dev" if own_dev else ""
    pids = " --unshare-pid --proc /proc" if own_pids else ""
    lines.append(f'exec {BWRAP} --dev-bind / /{dev}{pids} --die-with-parent {" ".join(flags)} -- "$@"')
    script = tmp_path / "bwrap-launcher.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return str(script)


def run_suite(launcher: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", f"--sandbox-exec={launcher}",
         "--sandbox-require=baseline", "conformance/test_syscalls.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "1000"},
    )


def failed_ids(completed: subprocess.CompletedProcess[str]) -> set[str]:
    return set(re.findall(r"^FAILED [^[]+\[(\S+)\]", completed.stdout, re.MULTILINE))


def test_bwrap_with_the_baseline_filter_passes(tmp_path):
    completed = run_suite(bwrap_launcher(tmp_path, compile_policy(load_policy("baseline"), "proxy")))
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert re.search(r"\d+ passed", completed.stdout)


PROC_ROWS = ("process_vm_readv-proc-mem-read", "process_vm_writev-proc-mem-write", "pidfd_getfd-proc-fd",
             "pidfd_send_signal-kill")


def test_bwrap_with_the_baseline_filter_and_the_host_s_pids_fails_exactly_the_proc_rows(tmp_path):
    # A real finding: the filter refuses ptrace, process_vm_readv/writev and the pidfd calls, and root in bubblewrap
    # without a PID namespace still reads and writes a process outside (the witness), takes its files through
    # /proc/<pid>/mem and /proc/<pid>/fd, and signals it. With --unshare-pid and its own /proc the pid names nothing
    # (passes above).
    launcher = bwrap_launcher(tmp_path, compile_policy(load_policy("baseline"), "proxy"), own_pids=False)
    completed = run_suite(launcher)
    assert completed.returncode == 1
    assert failed_ids(completed) == {f"{id_prefix(launcher)}{row}" for row in PROC_ROWS}, completed.stdout[-3000:]
    assert "read the witness's nonce" in completed.stdout and "wrote into the witness" in completed.stdout


def test_bwrap_with_one_syscall_dropped_fails_naming_it(tmp_path):
    baseline = load_policy("baseline")
    launcher = bwrap_launcher(tmp_path, hand_built(baseline, "proxy", drop="setns"))
    completed = run_suite(launcher)
    assert completed.returncode == 1
    assert failed_ids(completed) == {f"{id_prefix(launcher)}setns-native"}
    assert "syscall setns via native ABI" in completed.stdout and "ALLOWED" in completed.stdout


@pytest.mark.skipif(not may_open_setup_device((f"open:{DEVICE}",), Identity.current()),
                    reason=f"{DEVICE} does not exist here or is not this caller's to open")
def test_bwrap_with_a_filter_that_leaves_the_userfaultfd_device_fails_exactly_its_rows_unless_dev_is_its_own(tmp_path):
    # The baseline's denies and rules by hand, without the ioctl(USERFAULTFD_IOC_NEW) refusal its userfaultfd deny
    # implies: with the host's /dev, root gets a userfaultfd through the device (natively and with high bits in the
    # request; the x32 and i386 calls meet the filter's bad-arch kill); with bubblewrap's own /dev there is no such
    # device, and the same filter passes.
    leaky = hand_built(load_policy("baseline"), "proxy", implied=False)
    launcher = bwrap_launcher(tmp_path, leaky)
    completed = run_suite(launcher)
    assert completed.returncode == 1
    assert failed_ids(completed) == {f"{id_prefix(launcher)}userfaultfd-dev-{row}"
                                     for row in ("native", "native-hi32", "native-hi-ones")}, completed.stdout[-3000:]
    own_dev = tmp_path / "own-dev"
    own_dev.mkdir()
    completed = run_suite(bwrap_launcher(own_dev, leaky, own_dev=True))
    assert completed.returncode == 0, completed.stdout[-3000:]


def test_bwrap_with_the_arch_added_after_the_rules_fails_on_i386(tmp_path):
    text = (ROOT / "fixtures/policies/baseline.toml").read_text().replace(
        'bad_arch_action = "kill_process"', 'bad_arch_action = "kill_process"\nextra_arches = ["x86"]')
    (tmp_path / "policy.toml").write_text(text)
    with_i386 = load_policy(tmp_path / "policy.toml")
    completed = run_suite(bwrap_launcher(tmp_path, hand_built(with_i386, "proxy", arch_after_rules=True)))
    assert completed.returncode == 1
    holes = failed_ids(completed)
    assert holes and all(hole.endswith(("-i386", "-i386-socketcall")) for hole in holes), holes
    assert any(hole.endswith("-ptrace-i386") for hole in holes)


def test_bwrap_without_a_filter_fails_everywhere(tmp_path):
    launcher = bwrap_launcher(tmp_path, None)
    completed = run_suite(launcher)
    assert completed.returncode == 1
    holes = failed_ids(completed)
    for name in ("ptrace", "pidfd_getfd", "mount", "clone3"):
        assert any(hole.endswith(f"-{name}-native") for hole in holes), name
    # /proc/self/status inside says Seccomp: 0, and the requirement installs a filter (issue #8, item 3)
    hole = failed_lines(completed)[f"{id_prefix(launcher)}filter-present"]
    assert "BROKEN" in hole and "Seccomp is '0', expected '2': NO seccomp filter is loaded" in hole
