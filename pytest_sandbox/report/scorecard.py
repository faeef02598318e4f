"""The scorecard: verdict counts per category, merged from every test report (xdist-safe).

Each conformance test attaches its verdict to its report as a ``sandbox_verdict`` user property;
reports travel from xdist workers to the controller, so counting them in ``pytest_runtest_logreport``
gives one scorecard for the whole run.

Every category of :data:`~pytest_sandbox.report.categories.CATEGORIES` is listed, whether or not it ran
(SPEC "Fail closed"). The node ids the run selected (after ``-k``/``-m`` deselection) say which
categories were asked for; a test that could not run reports a ``sandbox_not_run`` property with the
reason. A category that was selected but recorded no verdict is ``not run`` and fails the session;
one with no selected test is ``not selected``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pytest_sandbox.report.categories import CATEGORIES, LAB_CATEGORIES, category_of

PROPERTY = "sandbox_verdict"
NOT_RUN_PROPERTY = "sandbox_not_run"
LATE_EVIDENCE_PROPERTY = "sandbox_late_evidence"
COLUMNS = ("BLOCKED", "ALLOWED", "INDETERMINATE", "WORKS", "BROKEN")
RAN, NOT_RUN, NOT_SELECTED = "ran", "not run", "not selected"
NAME_WIDTH, COLUMN_WIDTH = 20, 15


@dataclass(frozen=True)
class CategoryStatus:
    """One scorecard row. ``state`` is ``ran``, ``not run`` or ``not selected``; ``reason`` says why a
    category (or, for one that ran, part of it) did not run; ``unrun`` counts such tests."""

    name: str
    state: str
    counts: dict[str, int]
    selected: int
    unrun: int = 0
    reason: str = ""

    @property
    def fails_session(self) -> bool:
        """Selected, yet (wholly or partly) not run: nothing may turn that into a green run."""
        return self.state == NOT_RUN or self.unrun > 0

    def describe(self) -> str:
        if self.state == NOT_SELECTED:
            return NOT_SELECTED
        if self.state == NOT_RUN:
            return f"{NOT_RUN}: {self.reason}"
        if self.unrun:
            return f"{self.unrun} of {self.selected} selected tests {NOT_RUN}: {self.reason}"
        return RAN


@dataclass
class Scorecard:
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    records: list[dict[str, Any]] = field(default_factory=list)
    selected: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # category -> node ids
    not_run: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))  # -> node id -> why
    skipped: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))  # -> node id -> why
    with_verdict: set[str] = field(default_factory=set)  # node ids that recorded a verdict
    # What a session-end audit found that no verdict saw (one message per lab, i.e. per xdist worker).
    late_evidence: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.counts[record["category"]][record["verdict"]] += 1

    def add_from_properties(self, properties: Iterable[tuple[str, Any]], nodeid: str | None = None) -> None:
        for name, value in properties:
            if name == PROPERTY and isinstance(value, dict):
                self.add(value if nodeid is None else {**value, "nodeid": nodeid})
                if nodeid is not None:
                    self.with_verdict.add(nodeid)

    def add_late_evidence(self, message: str) -> None:
        self.late_evidence.append(message)

    def add_selected(self, nodeids: Iterable[str]) -> None:
        """The node ids the run selected (a set: every xdist worker sends the same collection)."""
        for nodeid in nodeids:
            category = category_of(nodeid)
            if category is not None:
                self.selected[category].add(nodeid)

    def add_not_run(self, nodeid: str, reason: str) -> None:
        category = category_of(nodeid)
        if category is not None:
            self.selected[category].add(nodeid)
            self.not_run[category].setdefault(nodeid, reason)

    def add_skipped(self, nodeid: str, reason: str) -> None:
        category = category_of(nodeid)
        if category is not None:
            self.skipped[category].setdefault(nodeid, reason)

    # -- what the run amounts to ----------------------------------------------------------------

    def categories(self) -> tuple[str, ...]:
        """The suite's categories in order, then any other category a test reported."""
        return CATEGORIES + tuple(sorted(set(self.counts) - set(CATEGORIES)))

    def status(self, category: str) -> CategoryStatus:
        counter = self.counts.get(category, Counter())
        counts = {column: counter.get(column, 0) for column in COLUMNS}
        verdicts = sum(counter.values())
        selected = self.selected.get(category, set())
        unrun = self.not_run.get(category, {})
        if not selected and not verdicts:
            return CategoryStatus(category, NOT_SELECTED, counts, 0)
        if not verdicts:
            reason = _summary(unrun.values()) if unrun else self._no_verdict_reason(category, len(selected))
            return CategoryStatus(category, NOT_RUN, counts, len(selected), len(unrun) or len(selected), reason)
        return CategoryStatus(category, RAN, counts, len(selected), len(unrun), _summary(unrun.values()))

    def _no_verdict_reason(self, category: str, selected: int) -> str:
        skips = {nodeid: why for nodeid, why in self.skipped.get(category, {}).items()
                 if nodeid not in self.with_verdict}
        if skips:
            return f"{len(skips)} of its {selected} selected tests were skipped: {_summary(skips.values())}"
        return f"none of its {selected} selected tests recorded a verdict (interrupted, or failed before judging)"

    def statuses(self) -> list[CategoryStatus]:
        return [self.status(category) for category in self.categories()]

    def lab_ran(self) -> bool:
        """Whether a category whose evidence is the network lab's recorded a verdict."""
        return any(status.state == RAN and status.name in LAB_CATEGORIES for status in self.statuses())

    def unproven(self) -> list[CategoryStatus]:
        """Categories that were selected and did not (wholly) run: each fails the session."""
        return [status for status in self.statuses() if status.fails_session]

    def lines(self) -> list[str]:
        header = f"{'category':<{NAME_WIDTH}}" + "".join(f"{c:>{COLUMN_WIDTH}}" for c in COLUMNS)
        rows = [header]
        for status in self.statuses():
            name = f"{status.name:<{NAME_WIDTH}}"
            if status.state == RAN:
                rows.append(name + "".join(f"{status.counts[c]:>{COLUMN_WIDTH}}" for c in COLUMNS))
                if status.unrun:
                    rows.append(" " * NAME_WIDTH + status.describe())
            else:
                rows.append(name + status.describe())
        rows.append("BLOCKED/WORKS pass; ALLOWED/BROKEN fail; INDETERMINATE is never counted as a pass.")
        rows += [f"LATE EVIDENCE (not in the counts above; the run fails): {message}" for message in self.late_evidence]
        return rows


def _summary(reasons: Iterable[str]) -> str:
    """Distinct reasons, most frequent first, each with its count when more than one test gave it."""
    counted = Counter(reasons).most_common()
    if len(counted) == 1:
        return counted[0][0]
    return "; ".join(f"{reason} ({count} tests)" for reason, count in counted)
