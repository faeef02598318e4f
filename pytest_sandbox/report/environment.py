"""The host facts every report records (syscalls.md §4 "Sources of ambiguity"): a verdict is only
meaningful next to the kernel, libseccomp, privilege, compat ABIs and sysctls it was taken on."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
import sys
from functools import lru_cache
from typing import Any

from pytest_sandbox.probes.syscall import parse_runner_output, runner_script

SYSCTLS = (
    "kernel/io_uring_disabled", "kernel/unprivileged_bpf_disabled", "vm/unprivileged_userfaultfd",
    "kernel/yama/ptrace_scope", "dev/tty/legacy_tiocsti", "user/max_user_namespaces",
    "kernel/unprivileged_userns_clone", "abi/vsyscall32",
)  # fmt: skip


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def libseccomp_version() -> str | None:
    name = ctypes.util.find_library("seccomp")
    if name is None:
        return None

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    library = ctypes.CDLL(name)
    library.seccomp_version.restype = ctypes.POINTER(Version)
    version = library.seccomp_version().contents
    return f"{version.major}.{version.minor}.{version.micro}"


def _status_field(field: str) -> str | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    return None


@lru_cache(maxsize=1)
def compat_abis() -> dict[str, bool]:
    """Whether i386 (int 0x80) and x32 calls reach the kernel here, probed in throw-away children."""


    probes = [{"id": "i386", "kind": "syscall", "abi": "i386", "nr": 20, "args": []},
              {"id": "x32", "kind": "syscall", "abi": "x32", "nr": 39, "args": []}]
    completed = subprocess.run([sys.executable, "-S", "-"], input=runner_script(probes), capture_output=True,
                               timeout=60)
    results = parse_runner_output(completed.stdout)
    return {abi: bool(results.get(abi) and results[abi].succeeded) for abi in ("i386", "x32")}


def host_facts() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "libseccomp": libseccomp_version(),
        "python": platform.python_version(),
        "euid": os.geteuid(),
        "capabilities_effective": _status_field("CapEff"),
        "compat_abis": compat_abis(),
        "sysctls": {name.replace("/", "."): _read(f"/proc/sys/{name}") for name in SYSCTLS},
    }
