"""pytest's assertion rewriting stays off the package's own modules and on for test modules
(``fixtures/rewriting.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_sandbox.fixtures.rewriting import leave_unrewritten

ROOT = Path(__file__).resolve().parents[1]

LOADERS = """
import sys

import pytest_sandbox.fixtures.registry  # the fixtures and all they import


def loader_of(name):
    return type(sys.modules[name].__loader__).__name__


def test_loaders():
    ours = sorted(name for name in sys.modules if name.startswith("pytest_sandbox."))
    rewritten = [name for name in ours if loader_of(name) == "AssertionRewritingHook"]
    # Only what the plugin imports before it opts out.
    assert len(ours) > 50 and rewritten == ["pytest_sandbox.fixtures", "pytest_sandbox.fixtures.rewriting",
                                            "pytest_sandbox.plugin"], rewritten
    assert loader_of(__name__) == "AssertionRewritingHook"  # a test module is still rewritten
    assert 1 + 1 == 3  # and its asserts still explained
"""


def test_the_package_is_imported_unrewritten_and_test_modules_are_rewritten(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    pytester.makepyfile(test_loaders=LOADERS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert (1 + 1) == 3*"])  # failed only at the last line: rewritten there


def test_the_hook_is_the_one_the_opt_out_was_written_for():
    # Run under pytest: its rewriting hook is installed. A pytest release that renames what the opt-out reads
    # fails here (the package would silently be rewritten again, only slower).
    assert leave_unrewritten("a_package_that_is_not_marked")


def test_outside_pytest_there_is_nothing_to_opt_out_of(monkeypatch):
    monkeypatch.setattr("sys.meta_path", [finder for finder in __import__("sys").meta_path
                                          if type(finder).__name__ != "AssertionRewritingHook"])
    assert not leave_unrewritten("pytest_sandbox")


@pytest.mark.parametrize("name", ["pytest_sandbox", "pytest_sandbox.session"])
def test_the_hooks_decisions_about_the_package_are_forgotten(name):
    hook = next(f for f in __import__("sys").meta_path if type(f).__name__ == "AssertionRewritingHook")
    hook._marked_for_rewrite_cache[name] = True
    leave_unrewritten("pytest_sandbox")
    assert name not in hook._marked_for_rewrite_cache
