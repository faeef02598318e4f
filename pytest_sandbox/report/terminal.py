"""The scorecard at the end of a run: counted from every test report, printed, and written on request.

A pytest plugin object the main plugin registers under ``--sandbox``: it counts verdicts from each
report (xdist workers' included), fails a run in which a selected category proved nothing, and
writes ``--sandbox-report``. Kept out of ``plugin.py``, which only wires options, fixtures and hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.report.categories import judged_target
from pytest_sandbox.report.environment import host_facts
from pytest_sandbox.report.scorecard import LATE_EVIDENCE_PROPERTY, NOT_RUN_PROPERTY, RAN, Scorecard
from pytest_sandbox.report.writers import build_report, write_report
from pytest_sandbox.session import SandboxOptions


class ScorecardReporter:
    """Counts verdicts from every report (worker reports included) and prints the scorecard."""

    def __init__(self, scorecard: Scorecard, options: SandboxOptions, report_path: Path | None) -> None:
        self.scorecard = scorecard
        self.options = options
        self.report_path = report_path

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.scorecard.add_selected(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """The controller collects nothing itself: each worker reports what it selected."""
        self.scorecard.add_selected(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and report.skipped):
            self.scorecard.add_from_properties(report.user_properties, report.nodeid)
        for name, value in report.user_properties:
            if name == NOT_RUN_PROPERTY:
                self.scorecard.add_not_run(report.nodeid, str(value))
            elif name == LATE_EVIDENCE_PROPERTY:
                self.scorecard.add_late_evidence(str(value))
        if report.skipped and isinstance(report.longrepr, tuple):
            self.scorecard.add_skipped(report.nodeid, str(report.longrepr[2]).removeprefix("Skipped: "))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput"):
            return  # xdist workers send their records to the controller, which judges and reports once
        if runs_no_test(session.config):
            return
        if self.scorecard.unproven() and session.exitstatus == pytest.ExitCode.OK:
            # Every test that ran passed, yet a selected category proved nothing: not a green run.
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.report_path is not None:
            run = {key: value for key, value in vars(self.options).items() if value is not None}
            from pytest_sandbox.report.coverage import unprobed_coverage

            coverage = unprobed_coverage(self.options.policy, self.options.require, self.options.caps,
                                         third_party=self.options.exec_prefix is not None)
            write_report(self.report_path, build_report(self.scorecard, environment=host_facts(), run=run,
                                                        coverage=coverage, targets=self.targets()))

    def targets(self) -> dict[str, str]:
        """Each category that ran, and who its verdicts are about."""
        return {status.name: judged_target(status.name, policy=self.options.policy,
                                           exec_prefix=self.options.exec_prefix, proxy_cmd=self.options.proxy_cmd,
                                           proxy_url=self.options.proxy_url)
                for status in self.scorecard.statuses() if status.state == RAN}

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if runs_no_test(terminalreporter.config):
            return
        if not self.scorecard.selected and not self.scorecard.counts:
            return  # no conformance test in this run (an application's own tests using the fixtures)
        terminalreporter.write_sep("=", "pytest-sandbox scorecard")
        for line in self.scorecard.lines():
            terminalreporter.write_line(line)
        grouped: dict[str, list[str]] = {}
        for category, target in self.targets().items():
            grouped.setdefault(target, []).append(category)
        for target, categories in grouped.items():
            terminalreporter.write_line(f"Judged: {', '.join(categories)}: {target}.")
        if self.scorecard.lab_ran():
            terminalreporter.write_line(
                f"The lab was watched {self.options.watch_after:g} s after the last test (--sandbox-watch-after): a "
                "dial or forward the proxy under test makes later than that is in no verdict and no audit.")
        unproven = self.scorecard.unproven()
        if unproven:
            names = ", ".join(f"{status.name} ({status.unrun} of {status.selected} tests)" for status in unproven)
            terminalreporter.write_line(
                f"pytest-sandbox: FAILED: selected tests could not run: {names}. A category that cannot run "
                "fails the session; to leave one out, deselect it (by file, or -m \"not sandbox_<category>\").",
                red=True)


def runs_no_test(config: pytest.Config) -> bool:
    """``--collect-only``, ``--setup-plan`` and ``--setup-only`` run no test: no verdict is owed, none is
    judged and no scorecard is shown."""
    return bool(config.option.collectonly or config.option.setupplan or config.option.setuponly)
