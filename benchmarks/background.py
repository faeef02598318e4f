"""A fixed background load for the benchmarks, so runs on different days and machines are comparable.

Issue #12: the targets have to hold on a busy CI runner, and "busy" has to be the same in every run, so
each benchmark can start its own load and report what the machine's load average was besides. Two kinds:

* ``spin``: processes that only burn CPU (a busy loop). Competition for the cores, nothing else.
* ``churn``: processes that each launch ``/bin/true`` back to back (``posix_spawn`` + ``waitpid``), the
  shape of a test suite running beside the benchmark (other jobs on a shared runner fork and exec all the
  time). Each launch wakes a sleeping process and exits one, so the scheduler's wake-up and migration
  paths, the page allocator and the process table are busy too, not only the CPU. On a 2-core runner a
  spinning load leaves short-lived wakers alone for most of a tick (EEVDF places a waking task ahead of a
  spinner that has used its slice, sched-eevdf.rst); churn competes with them on their own terms.

Every process is bounded on its own (``seconds``; it checks the clock each iteration) and stopped by its PID
when the measurement ends, even when the measurement raises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_UNTIL_DEADLINE = ("import os, time\nend = time.monotonic() + float(os.environ['LOAD_SECONDS'])\n"
                   "while time.monotonic() < end: ")
SPIN = _UNTIL_DEADLINE + "pass"
CHURN = _UNTIL_DEADLINE + "os.waitpid(os.posix_spawn('/bin/true', ['/bin/true'], {}), 0)"


@contextmanager
def background_load(spinners: int, churners: int = 0, seconds: float = 600.0) -> Iterator[None]:
    """``spinners`` busy loops and ``churners`` process launchers for the duration of the ``with`` block."""
    env = {**os.environ, "LOAD_SECONDS": str(seconds)}
    processes = [subprocess.Popen([sys.executable, "-S", "-c", program], env=env)
                 for program, count in ((SPIN, spinners), (CHURN, churners)) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()


def describe(spinners: int, churners: int) -> str:
    return f"background load {spinners} busy loops + {churners} launch loops"


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])
