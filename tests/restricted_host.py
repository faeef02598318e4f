"""Run a command as if on a host that lacks a kernel feature the harness needs: a real restriction.

``python3 tests/restricted_host.py no-netns -- CMD...`` loads a seccomp filter into itself and then
execs CMD, so CMD and everything it starts inherit the restriction (filters survive fork and execve,
seccomp(2)):

* ``no-netns``: ``unshare``/``clone`` with CLONE_NEWNET or CLONE_NEWUSER, and ``setns``, fail with
  EPERM (what Docker's default profile does without CAP_SYS_ADMIN); ``clone3`` gets ENOSYS, since BPF
  cannot read its flags (glibc then falls back to ``clone``). No network namespace can be created.
* ``no-seccomp``: further ``seccomp(SECCOMP_SET_MODE_FILTER)`` and ``prctl(PR_SET_SECCOMP)`` fail with
  EINVAL, as on a kernel built without CONFIG_SECCOMP_FILTER. No filter can be loaded.

Everything else, every ABI included, is allowed.
"""

from __future__ import annotations

import errno
import os
import sys

import pyseccomp

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
SECCOMP_SET_MODE_FILTER = 1
PR_SET_SECCOMP = 22


def restriction(name: str) -> pyseccomp.SyscallFilter:
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    flt.add_arch(pyseccomp.Arch.X86)  # i386 and x32 probes must meet the host, not this filter's bad-arch kill
    flt.add_arch(pyseccomp.Arch.X32)
    if name == "no-netns":
        for flag in (CLONE_NEWNET, CLONE_NEWUSER):
            for call in ("unshare", "clone"):
                flt.add_rule(pyseccomp.ERRNO(errno.EPERM), call, pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
        flt.add_rule(pyseccomp.ERRNO(errno.EPERM), "setns")
        flt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    elif name == "no-seccomp":
        flt.add_rule(pyseccomp.ERRNO(errno.EINVAL), "seccomp",
                     pyseccomp.Arg(0, pyseccomp.EQ, SECCOMP_SET_MODE_FILTER))
        flt.add_rule(pyseccomp.ERRNO(errno.EINVAL), "prctl", pyseccomp.Arg(0, pyseccomp.EQ, PR_SET_SECCOMP))
    else:
        raise SystemExit(f"restricted_host.py: unknown restriction {name!r}; use no-netns or no-seccomp")
    return flt


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: restricted_host.py no-netns|no-seccomp -- CMD [ARGS...]")
    restriction(argv[0]).load()
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
