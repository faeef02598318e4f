"""The order ``--dist loadfile`` hands the conformance modules out in (``fixtures/distribution.py``).

pytest-xdist's file scheduler hands out the file with the most tests first; the suite's own order (the
proxy-free modules after the SSRF campaign, the after-quiet exchanges last: ``probes/after_quiet.py``) was
lost, and the after-quiet module often went to a worker that had just carried allowlist or egress traffic.
The two modules that read the session's probe runs (``report/categories.py:PROBE_RUN_MODULES``) are one work
unit, so one worker makes those runs, not both. Driven here through xdist's real scheduler class with
stand-in workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from pytest_sandbox.fixtures.distribution import SuiteFileScheduling
from pytest_sandbox.fixtures.run_order import SESSION_TAIL, work_unit_of, work_unit_order
from pytest_sandbox.plugin import pytest_xdist_make_scheduler
from pytest_sandbox.report.categories import PROBE_RUN_MODULES

# Test counts of the conformance modules as README's main job selects them (``pytest --collect-only``).
SUITE = {"test_allowlist.py": 10, "test_egress.py": 16, "test_inference.py": 129, "test_smuggling.py": 861,
         "test_ssrf_self.py": 62, "test_ssrf.py": 1469, "test_loaded_filter.py": 12, "test_syscalls.py": 767,
         "test_after_quiet.py": 1}


def test_modules_are_handed_out_biggest_first_and_the_tail_last_in_its_order():
    units = [(f"conformance/{name}", count) for name, count in SUITE.items()]
    assert work_unit_order(units, "conformance") == [
        "conformance/test_smuggling.py", "conformance/test_inference.py", "conformance/test_ssrf_self.py",
        "conformance/test_egress.py", "conformance/test_allowlist.py",
        *(f"conformance/{name}" for name in SESSION_TAIL)]


def test_the_modules_that_read_the_probe_runs_are_one_unit_named_by_the_first():
    assert set(PROBE_RUN_MODULES) == {"test_syscalls.py", "test_loaded_filter.py"}
    assert work_unit_of("conformance/test_loaded_filter.py", "conformance") == "conformance/test_syscalls.py"
    assert work_unit_of("conformance/test_syscalls.py", "conformance") == "conformance/test_syscalls.py"
    assert (work_unit_of("/site/pytest_sandbox/conformance/test_loaded_filter.py", "conformance")
            == "/site/pytest_sandbox/conformance/test_syscalls.py")
    assert work_unit_of("conformance\\test_loaded_filter.py", "conformance") == "conformance\\test_syscalls.py"
    for elsewhere in ("tests/test_loaded_filter.py", "test_loaded_filter.py", "conformance/test_ssrf.py"):
        assert work_unit_of(elsewhere, "conformance") == elsewhere


def test_files_outside_the_suite_directory_are_ordered_by_size_alone():
    units = [("tests/test_a.py", 3), ("elsewhere/test_after_quiet.py", 1), ("tests/test_b.py", 7),
             ("conformance/test_ssrf.py", 2), ("tests/test_c.py", 7)]
    assert work_unit_order(units, "conformance") == [
        "tests/test_b.py", "tests/test_c.py", "tests/test_a.py", "elsewhere/test_after_quiet.py",
        "conformance/test_ssrf.py"]


@dataclass(eq=False)
class Worker:
    """What xdist's scheduler calls on a worker controller."""

    name: str
    given: list[int] = field(default_factory=list)
    shutting_down: bool = False

    @property
    def gateway(self) -> SimpleNamespace:
        return SimpleNamespace(id=self.name)

    def send_runtest_some(self, indices: list[int]) -> None:
        self.given += indices

    def shutdown(self) -> None:
        self.shutting_down = True


def run_schedule(pytester: pytest.Pytester, collection: list[str]) -> dict[str, list[str]]:
    """Drive SuiteFileScheduling over two stand-in workers that finish whatever they are given, one test at a
    time, in turn; return each worker's files in the order it got them."""
    scheduler = SuiteFileScheduling(pytester.parseconfig("--tx", "2*popen", "--dist", "loadfile"))
    workers = [Worker("gw0"), Worker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)  # type: ignore[arg-type]
        scheduler.add_node_collection(worker, collection)  # type: ignore[arg-type]
    scheduler.schedule()
    done = {worker.name: 0 for worker in workers}
    while not scheduler.tests_finished:
        for worker in workers:
            if done[worker.name] < len(worker.given):
                scheduler.mark_test_complete(worker, worker.given[done[worker.name]])  # type: ignore[arg-type]
                done[worker.name] += 1
    files: dict[str, list[str]] = {}
    for worker in workers:
        for index in worker.given:
            module = collection[index].partition("::")[0]
            if module not in files.setdefault(worker.name, []):
                files[worker.name].append(module)
    return files


def test_the_worker_that_gets_the_after_quiet_module_ran_proxy_free_modules_just_before_it(pytester):
    collection = [f"conformance/{name}::test_{index}" for name, count in SUITE.items() for index in range(count)]
    files = run_schedule(pytester, collection)
    assert sorted(module for modules in files.values() for module in modules) == sorted(
        f"conformance/{name}" for name in SUITE)
    assert [modules[0] for modules in files.values()] == ["conformance/test_smuggling.py",
                                                          "conformance/test_inference.py"]
    last = next(modules for modules in files.values() if modules[-1] == "conformance/test_after_quiet.py")
    assert last[-2] in {f"conformance/{name}" for name in SESSION_TAIL[1:-1]}, last
    # One worker makes the probe runs: the loaded-filter module and the syscall module go to it together.
    probe_runs = next(modules for modules in files.values() if "conformance/test_syscalls.py" in modules)
    index = probe_runs.index("conformance/test_loaded_filter.py")
    assert probe_runs[index + 1] == "conformance/test_syscalls.py", probe_runs


def test_the_scheduler_is_ours_only_for_a_sandbox_run_with_loadfile(pytester):
    def made(*args: str) -> object:
        config = pytester.parseconfigure("-p", "no:benchmark", "--tx", "2*popen", *args)
        return pytest_xdist_make_scheduler(config, None)

    assert isinstance(made("--sandbox", "--dist", "loadfile"), SuiteFileScheduling)
    assert made("--sandbox", "--dist", "load") is None
    assert made("--dist", "loadfile") is None
