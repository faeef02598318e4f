"""Syscall conformance: every forbidden syscall is attempted and must be refused.

Parametrized (by the plugin) over the probe catalogue × the policy's and the requirement's denies ×
every ABI path × every network mode × every identity. Each test id names the mode, the identity,
the syscall (or rule), the ABI and the variant, e.g. ``proxy-nobody-pidfd_getfd-x32``.
"""


def test_forbidden_syscall_is_refused(syscall_denial, check_syscall_param):
    check_syscall_param(syscall_denial)


def test_ordinary_work_still_functions(syscall_control, check_syscall_param):
    check_syscall_param(syscall_control)
