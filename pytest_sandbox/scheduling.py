"""A scheduler hint for threads that relay wake-ups: ask EEVDF for a short slice. Not a security step.

On a busy machine a woken task with the default slice waits for the running task's slice to end before it
gets a CPU; since Linux 6.12 EEVDF lets a task that asked for a shorter slice (``sched_attr.sched_runtime``
for SCHED_OTHER, no privilege needed) preempt on wake-up ("sched/eevdf: Allow shorter slices to
wakeup-preempt", Documentation/scheduler/sched-eevdf.rst). The proxy's event-loop thread asks for it.

There are two copies of this request, on purpose: ``seccomp/spawner.py`` keeps its own ``_ask_short_slice``
because it is stdlib-only source compiled and run in a separate ``python -S`` interpreter that cannot import
this package (``seccomp/launcher.py``: ``_ZYGOTE_SOURCE``, ``_compiled_spawner``). This one is for code inside
the package; ``tests/test_scheduling.py`` checks that the two ask for the same thing.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["SHORT_SLICE_NS", "ask_short_slice"]

SYS_SCHED_SETATTR_X86_64 = 314
SCHED_FLAG_RESET_ON_FORK = 0x01
# Tens of microseconds of work per wake-up fit 0.1 ms, the kernel's lower clamp (sched-eevdf.rst).
SHORT_SLICE_NS = 100_000


class SchedAttr(ctypes.Structure):
    """``struct sched_attr`` (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER0 fields."""

    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
                ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64)]


def ask_short_slice() -> None:
    """Ask for a ``SHORT_SLICE_NS`` slice for the calling thread; threads and processes it starts get the default.

    Same policy, same nice: only the request size changes. SCHED_FLAG_RESET_ON_FORK gives every task this
    thread creates the default slice again (sched_fork() resets it). An older kernel ignores the request
    or refuses it, and nothing else changes; the return value of the syscall is deliberately not checked.
    """
    if os.uname().machine != "x86_64" or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return
    attr = SchedAttr(ctypes.sizeof(SchedAttr), os.SCHED_OTHER, SCHED_FLAG_RESET_ON_FORK,
                     os.getpriority(os.PRIO_PROCESS, 0), 0, SHORT_SLICE_NS, 0, 0)
    ctypes.CDLL(None, use_errno=True).syscall(SYS_SCHED_SETATTR_X86_64, 0, ctypes.byref(attr), 0)
