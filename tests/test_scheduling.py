"""The scheduler hint: the package's copy (scheduling.py) and the spawner's own stdlib copy ask for the same thing.

The spawner cannot import the package (it runs as compiled source in a ``python -S`` interpreter), so the
request exists twice; these tests keep the two from drifting apart.
"""

from __future__ import annotations

import threading

import pytest
from test_proxy_one_pass import slice_of  # /proc/self/task/<tid>/sched se.slice

from pytest_sandbox import scheduling
from pytest_sandbox.seccomp import spawner


def test_the_spawner_and_the_package_ask_for_the_same_slice_the_same_way() -> None:
    assert scheduling.SHORT_SLICE_NS == spawner.SPAWNER_SLICE_NS
    assert scheduling.SYS_SCHED_SETATTR_X86_64 == spawner.SYS_SCHED_SETATTR_X86_64
    assert scheduling.SCHED_FLAG_RESET_ON_FORK == spawner.SCHED_FLAG_RESET_ON_FORK
    assert scheduling.SchedAttr._fields_ == spawner._SchedAttr._fields_


@pytest.mark.skipif(slice_of(threading.get_native_id()) is None,
                    reason="no /proc/<pid>/task/<tid>/sched with se.slice (CONFIG_SCHED_DEBUG, EEVDF)")
def test_a_thread_that_asks_gets_the_short_slice_and_the_threads_it_starts_the_default() -> None:
    default = slice_of(threading.get_native_id())
    assert default != scheduling.SHORT_SLICE_NS
    seen: dict[str, int | None] = {}

    def child() -> None:
        seen["child"] = slice_of(threading.get_native_id())

    def asker() -> None:
        scheduling.ask_short_slice()
        seen["asker"] = slice_of(threading.get_native_id())
        started = threading.Thread(target=child)
        started.start()
        started.join(timeout=10)

    thread = threading.Thread(target=asker)
    thread.start()
    thread.join(timeout=10)
    assert seen == {"asker": scheduling.SHORT_SLICE_NS, "child": default}
    assert slice_of(threading.get_native_id()) == default  # the calling thread only
