"""A denied syscall's other way to the same kernel object: USERFAULTFD_IOC_NEW on /dev/userfaultfd (Linux 6.1).

Before: the baseline and strict policies denied userfaultfd(2), and the syscall suite passed the reference sandbox,
while root inside it opened /dev/userfaultfd and got a userfaultfd from its ioctl (measured: ``pytest-sandbox run
-- python3 uffd.py`` printed ``anon_inode:[userfaultfd]``; so did firejail ``--seccomp.drop=userfaultfd`` and
bubblewrap with the host's /dev). Now a policy's refusal of userfaultfd implies ``ioctl(fd, USERFAULTFD_IOC_NEW)``
refused with the same action (``seccomp/filter_plan.implied_rules``; an OCI profile too: runc's own /dev has no
such device), and the suite probes the path on every ABI and with high bits in the request
(``syscall_cases.device_path_cases``): open the device, then the ioctl in a form the constructor refuses (EINVAL).
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_sandbox.catalogues.syscalls import DEVICE_PATHS, USERFAULTFD_IOC_NEW
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes.syscall_cases import denial_cases, requirements_of
from pytest_sandbox.seccomp.bpf_eval import run_stack
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.filter_plan import Action, implied_rules, plan_policy
from pytest_sandbox.verdicts.judgement import Outcome, Verdict
from pytest_sandbox.verdicts.syscall import NOT_ON_THIS_HOST, judge

ROOT = Path(__file__).resolve().parents[1]
MODE = "proxy"
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
IOCTL = 16
TIOCNOTTY = 0x5422
DEVICE = DEVICE_PATHS["userfaultfd"].device
DEVICE_ROWS = {"userfaultfd-dev-native", "userfaultfd-dev-x32", "userfaultfd-dev-i386", "userfaultfd-dev-native-hi32",
               "userfaultfd-dev-native-hi-ones"}


def _usable_unfiltered() -> str:
    """Why this host cannot show the path (empty when root can open the device here)."""
    try:
        os.close(os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as error:
        return f"{DEVICE} does not open here unfiltered: {errno.errorcode.get(error.errno, error.errno)}"
    return ""


def test_every_toml_policy_that_refuses_userfaultfd_refuses_its_ioctl_with_the_same_errno():
    for name in ("baseline", "strict"):
        plan = plan_policy(load_policy(name), MODE)
        for request in (USERFAULTFD_IOC_NEW, 1 << 32 | USERFAULTFD_IOC_NEW, 0xFFFFFFFF << 32 | USERFAULTFD_IOC_NEW):
            actions = plan.results("ioctl", (3, request, 2))
            assert {action.kind for action in actions} == {"errno"}, (name, hex(request), actions)
        # every other ioctl is untouched: TIOCNOTTY, and the neighbouring request numbers
        for request in (TIOCNOTTY, USERFAULTFD_IOC_NEW + 1, USERFAULTFD_IOC_NEW - 1):
            assert plan.results("ioctl", (3, request, 0)) == {Action("allow")}, (name, hex(request))
    assert implied_rules(load_policy("openshell-pre-819")) == ()  # it does not deny userfaultfd at all


def test_the_compiled_filter_answers_the_ioctl_with_eperm_and_lets_every_other_ioctl_through():
    compiled = compile_policy(load_policy("baseline"), MODE)
    for request in (USERFAULTFD_IOC_NEW, 1 << 32 | USERFAULTFD_IOC_NEW):
        result = run_stack(compiled.programs, IOCTL, AUDIT_ARCH_X86_64, [3, request, 2, 0, 0, 0])
        assert result.ret == SECCOMP_RET_ERRNO | errno.EPERM, hex(result.ret)
    result = run_stack(compiled.programs, IOCTL, AUDIT_ARCH_X86_64, [3, TIOCNOTTY, 0, 0, 0, 0])
    assert result.ret == SECCOMP_RET_ALLOW, hex(result.ret)


def test_an_allowlist_that_does_not_allow_userfaultfd_refuses_the_ioctl_by_its_default_action(tmp_path):
    path = tmp_path / "allowlist.toml"
    path.write_text('[seccomp]\ndefault_action = "errno"\ndefault_errno = 38\n'
                    'allow = ["ioctl", "read", "write", "exit_group", "getppid"]\n')
    [(refused, rule)] = implied_rules(load_policy(path))
    assert (refused, rule.syscall, rule.arg, rule.value, rule.errno) == ("userfaultfd", "ioctl", 1,
                                                                         USERFAULTFD_IOC_NEW, 38)


def test_an_oci_profile_gets_the_rule_too_as_runcs_own_dev_would_have_no_device():
    policy = load_policy(ROOT / "fixtures" / "oci" / "docker-like-default.json")
    assert policy.origin == "oci" and "userfaultfd" not in policy.seccomp.allow
    [(refused, rule)] = implied_rules(policy)
    assert (refused, rule.syscall, rule.value, rule.errno) == ("userfaultfd", "ioctl", USERFAULTFD_IOC_NEW,
                                                               policy.seccomp.default_errno)
    assert {case.case_id for case in denial_cases(requirements_of(policy, MODE)) if case.call} == DEVICE_ROWS


def _device_rows(policy: Policy) -> dict[str, object]:
    return {case.case_id: case for case in denial_cases(requirements_of(policy, MODE)) if case.call}


def test_the_suite_probes_the_device_on_every_abi_and_with_high_bits_wherever_userfaultfd_is_refused():
    rows = _device_rows(load_policy("baseline"))
    assert set(rows) == DEVICE_ROWS
    native = rows["userfaultfd-dev-native"]
    assert (native.attempted, native.nr, native.args, native.setup) == (
        "ioctl", IOCTL, ("fd", USERFAULTFD_IOC_NEW, 2), (f"open:{DEVICE}",))
    assert rows["userfaultfd-dev-native-hi32"].args[1] == 1 << 32 | USERFAULTFD_IOC_NEW
    assert rows["userfaultfd-dev-i386"].nr == 54 and rows["userfaultfd-dev-x32"].nr == 514
    assert _device_rows(load_policy("openshell-pre-819")) == {}


def test_judge_a_device_the_sandbox_hides_is_blocked_and_one_the_caller_cannot_open_unfiltered_is_no_evidence():
    case = _device_rows(load_policy("baseline"))["userfaultfd-dev-native"]
    reached = Outcome.errno(errno.EINVAL)  # the constructor refused the harmless flags: the ioctl got through
    hidden = Outcome("no_path", errno.ENOENT, DEVICE)
    not_root = Outcome("no_path", errno.EACCES, DEVICE)
    assert judge(case, reached, hidden, compiled=None, policy=None).verdict is Verdict.BLOCKED
    assert judge(case, reached, reached, compiled=None, policy=None).verdict is Verdict.ALLOWED
    assert judge(case, reached, Outcome.errno(errno.EPERM), compiled=None, policy=None).verdict is Verdict.BLOCKED
    skipped = judge(case, not_root, not_root, compiled=None, policy=None)
    assert skipped.verdict is Verdict.INDETERMINATE and skipped.reason.startswith(NOT_ON_THIS_HOST)


USERFAULTFD_VIA_DEVICE = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
fd = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
made = libc.syscall(ctypes.c_long(16), ctypes.c_long(fd), ctypes.c_ulong(0xAA00), ctypes.c_ulong(os.O_CLOEXEC))
print(errno.errorcode[ctypes.get_errno()] if made < 0 else os.readlink(f"/proc/self/fd/{made}"))
"""


@pytest.mark.skipif(bool(_usable_unfiltered()), reason=_usable_unfiltered() or "-")
def test_root_in_the_reference_sandbox_gets_no_userfaultfd_through_the_device():
    unfiltered = subprocess.run([sys.executable, "-c", USERFAULTFD_VIA_DEVICE], capture_output=True, text=True,
                                timeout=60, check=True)
    assert unfiltered.stdout.strip() == "anon_inode:[userfaultfd]"  # a real one, with valid flags (then closed)
    sandboxed = subprocess.run([sys.executable, "-m", "pytest_sandbox.cli", "run", "--", sys.executable, "-c",
                                USERFAULTFD_VIA_DEVICE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sandboxed.stdout.strip() == "EPERM", (sandboxed.stdout, sandboxed.stderr[-2000:])
    assert ctypes.sizeof(ctypes.c_long) == 8
