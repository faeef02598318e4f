"""Find live processes by a token in their environment or command line, without missing one mid-exec.

Between ``execve`` replacing a process's memory and the ELF loader laying out the new stack,
``/proc/<pid>/environ`` and ``/proc/<pid>/cmdline`` read as empty: the kernel wakes a ``vfork`` parent
and runs close-on-exec in ``begin_new_exec`` (fs/exec.c), but sets ``mm->env_start``/``arg_start`` only
later, in ``create_elf_tables`` (fs/binfmt_elf.c). ``subprocess.Popen`` returns inside that window, and
on a loaded 2-core machine a scan right after it read nothing for 2696 of 3000 fresh ``sleep``
processes. A scan that says "nothing left behind" must not pass because a survivor was between those
two points, so such a process is read again until its new image is laid out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

PF_KTHREAD = 0x00200000  # include/linux/sched.h: kernel threads have no environment or command line
MID_EXEC_SETTLE_SECONDS = 2.0


def _read(proc: str, pid: str, name: str) -> bytes | None:
    try:
        with open(f"{proc}/{pid}/{name}", "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _may_be_mid_exec(proc: str, pid: str) -> bool:
    """Empty environment and command line in a live user process: the exec window above."""
    stat = _read(proc, pid, "stat")
    if stat is None:
        return False
    fields = stat.rsplit(b") ", 1)[-1].split()
    state, flags = fields[0], int(fields[6])
    return state not in (b"Z", b"X") and not flags & PF_KTHREAD


def _carries(proc: str, pid: str, needle: bytes, sources: Iterable[str]) -> bool | None:
    """True or False; None while the process's memory has no environment or command line yet."""
    contents = {name: _read(proc, pid, name) or b"" for name in ("environ", "cmdline")}
    if not any(contents.values()) and _may_be_mid_exec(proc, pid):
        return None
    return any(needle in contents[name] for name in sources)


def processes_carrying(token: str, sources: Iterable[str] = ("environ",), *, proc: str = "/proc") -> list[int]:
    """Live processes (not this one) whose ``sources`` (``environ``, ``cmdline``) contain ``token``.

    ``proc`` is the procfs to read (a test lays out a fake one to hold a process in the exec window).
    """
    needle, sources = token.encode(), tuple(sources)
    found: list[int] = []
    pending: list[str] = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        verdict = _carries(proc, entry, needle, sources)
        if verdict is None:
            pending.append(entry)
        elif verdict:
            found.append(int(entry))
    deadline = time.monotonic() + MID_EXEC_SETTLE_SECONDS
    while pending and time.monotonic() < deadline:
        time.sleep(0.005)
        still = []
        for entry in pending:
            verdict = _carries(proc, entry, needle, sources)
            if verdict is None:
                still.append(entry)
            elif verdict:
                found.append(int(entry))
        pending = still
    return sorted(found)
