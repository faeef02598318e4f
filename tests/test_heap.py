"""A ``--sandbox`` run keeps the cyclic collector off its long-lived objects, and pytest still sees what the
collector finds (``fixtures/heap.py``)."""

from __future__ import annotations

import gc
import pathlib
from types import SimpleNamespace

import pytest

from pytest_sandbox.fixtures.heap import process_ends_with_session

# Records, in a file the test reads back, how many objects were frozen when pytest's final collections ran
# (``_pytest/unraisableexception.py``: ``gc_collect_harder``) and when the process exited.
RECORDER = """
import atexit, gc, os
import _pytest.unraisableexception as unraisable

LOG = os.environ["HEAP_LOG"]
original = unraisable.gc_collect_harder

def recording(iterations):
    with open(LOG, "a") as log:
        print("final", gc.get_freeze_count(), file=log)
    original(iterations)

unraisable.gc_collect_harder = recording
original_freeze = gc.freeze

def recording_freeze():
    with open(LOG, "a") as log:
        print("freeze 1", file=log)
    original_freeze()

gc.freeze = recording_freeze
atexit.register(lambda: open(LOG, "a").write(f"exit {gc.get_freeze_count()}\\n"))
"""

TESTS = """
import gc


class RaisesWhenCollected:
    def __del__(self):
        raise RuntimeError("raised in __del__ of cyclic garbage made during a test")


def test_the_session_objects_are_frozen_while_tests_run():
    assert gc.get_freeze_count() > 0


def test_makes_cyclic_garbage():
    garbage = RaisesWhenCollected()
    garbage.itself = garbage
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
        *options: str) -> tuple[pytest.RunResult, dict[str, int]]:
    pytester.makeconftest(RECORDER)
    pytester.makepyfile(test_heap_session=TESTS)
    log = pytester.path / "heap.log"
    monkeypatch.setenv("HEAP_LOG", str(log))
    # hypothesis's plugin imports its package at the terminal summary, while the garbage above is collected
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *options,
                                           timeout=120)
    records: dict[str, int] = {"freeze": 0}
    for name, count in (line.split() for line in log.read_text().splitlines()):
        records[name] = records.get(name, 0) + int(count) if name == "freeze" else int(count)
    return result, records


def test_a_sandbox_run_freezes_its_objects_until_pytests_final_collections_are_done(pytester, monkeypatch):
    result, frozen = run(pytester, monkeypatch, "--sandbox", "--sandbox-modes=block")
    result.assert_outcomes(passed=2)
    assert frozen["final"] > 10_000, frozen  # the plugin's modules and the collected tests
    # Kept to the end: the process ends with the session, and the interpreter's collections at exit would
    # walk it all again.
    assert frozen["exit"] > 10_000
    # Garbage made after the freeze is still collected, and its unraisable exception still reported.
    result.stderr.fnmatch_lines(["*PytestUnraisableExceptionWarning*", "*raised in __del__ of cyclic garbage*"])
    # After collection, and at unconfigure (the session-start freeze is the xdist controller's).
    assert frozen["freeze"] == 2


def test_an_xdist_controller_freezes_at_session_start_and_each_worker_after_collection(pytester, monkeypatch):
    result, frozen = run(pytester, monkeypatch, "--sandbox", "--sandbox-modes=block", "-n", "1")
    result.assert_outcomes(passed=2)
    assert frozen["freeze"] == 4, frozen  # the controller's two, the worker's two, at unconfigure each
    assert frozen["exit"] > 10_000


def test_a_run_without_sandbox_freezes_nothing(pytester, monkeypatch):
    result, frozen = run(pytester, monkeypatch)
    result.assert_outcomes(passed=1, failed=1)
    assert frozen == {"freeze": 0, "final": 0, "exit": 0}


def test_a_session_inside_a_longer_lived_process_gives_the_frozen_objects_back(pytester):
    pytester.makepyfile(test_heap_session=TESTS)
    recorded = pytester.inline_run("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--sandbox",
                                   "--sandbox-modes=block", "-k", "frozen")
    recorded.assertoutcome(passed=1)
    assert gc.get_freeze_count() == 0  # this process goes on: its cyclic garbage must stay collectable


def test_only_pytests_command_line_and_xdist_workers_end_with_the_session(pytestconfig):
    # This test runs under pytest's command line or in an xdist worker: the process ends with its session.
    assert process_ends_with_session(pytestconfig)
    assert process_ends_with_session(SimpleNamespace(workerinput={}))  # type: ignore[arg-type]
    assert not _called_through_another_main()


def _called_through_another_main() -> bool:
    """process_ends_with_session as seen from a pytest.main whose caller is not console_main."""
    seen: list[bool] = []

    class Recorder:
        def pytest_configure(self, config: pytest.Config) -> None:
            seen.append(process_ends_with_session(config))

    pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--co", "-k", "nothing-at-all",
                 str(pathlib.Path(__file__))], plugins=[Recorder()])
    return seen[0]
