"""The scorecard: verdict counts per category, merged from every test report (xdist-safe).

Each conformance test attaches its verdict to its report as a ``sandbox_verdict`` user property;
reports travel from xdist workers to the controller, so counting them in ``pytest_runtest_logreport``
gives one scorecard for the whole run.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PROPERTY = "sandbox_verdict"
COLUMNS = ("BLOCKED", "ALLOWED", "INDETERMINATE", "WORKS", "BROKEN")


@dataclass
class Scorecard:
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.counts[record["category"]][record["verdict"]] += 1

    def add_from_properties(self, properties: Iterable[tuple[str, Any]]) -> None:
        for name, value in properties:
            if name == PROPERTY and isinstance(value, dict):
                self.add(value)

    def lines(self) -> list[str]:
        if not self.counts:
            return []
        header = f"{'category':<20}" + "".join(f"{c:>15}" for c in COLUMNS)
        rows = [header]
        for category in sorted(self.counts):
            counter = self.counts[category]
            rows.append(f"{category:<20}" + "".join(f"{counter.get(c, 0):>15}" for c in COLUMNS))
        rows.append("BLOCKED/WORKS pass; ALLOWED/BROKEN fail; INDETERMINATE is never counted as a pass.")
        return rows
