"""The conformance report (``--sandbox-report PATH``): JSON or Markdown by extension.

Built from the same ``sandbox_verdict`` records the terminal scorecard counts, so a run under
pytest-xdist (records travel with each worker's reports to the controller) gives the same report as a
serial run. Records are sorted by test id so two runs can be compared line by line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytest_sandbox.report.scorecard import COLUMNS, Scorecard

EVIDENCE_FIELDS = ("attempted", "baseline", "observed", "expected", "verdict", "reason")


def build_report(scorecard: Scorecard, *, environment: Mapping[str, Any], run: Mapping[str, Any],
                 coverage: Sequence[Mapping[str, Any]] = (), targets: Mapping[str, str] | None = None
                 ) -> dict[str, Any]:
    """Every category is in ``scorecard``, run or not: its counts, ``status`` (``ran``, ``not run``,
    ``not selected``), ``selected`` (tests), ``not_run`` (tests that could not run), ``reason`` and
    ``summary`` (the line the terminal scorecard shows, e.g. ``not run: <reason>``); a category that ran has its
    ``target`` from ``targets``, who its verdicts are about (report.categories.judged_target). ``coverage``: each
    refused syscall with no live probe and what covers it (report.coverage). ``late_evidence``: what the lab's
    session-end audit found that no verdict saw (then the run failed, whatever the counts say)."""
    records = sorted(scorecard.records, key=lambda r: (r.get("category", ""), r.get("test", "")))
    return {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": dict(run),
        "environment": dict(environment),
        "scorecard": {status.name: {**status.counts, "status": status.state, "selected": status.selected,
                                    "not_run": status.unrun, "reason": status.reason,
                                    "summary": status.describe(),
                                    **({"target": targets[status.name]} if targets and status.name in targets else {})}
                      for status in scorecard.statuses()},
        "all_selected_ran": not scorecard.unproven(),  # False when a selected category (or part of one) did not run
        # What the lab's session-end audit found that no verdict saw (not in the counts; the run failed).
        "late_evidence": list(scorecard.late_evidence),
        "probes": records,
        "unprobed_refusals": [dict(entry) for entry in coverage],
    }


def render_markdown(report: Mapping[str, Any]) -> str:
    lines = ["# pytest-sandbox conformance report", "", f"Generated {report['generated']}.", "", "## Run", ""]
    lines += [f"- **{key}**: `{value}`" for key, value in report["run"].items()]
    lines += ["", "## Environment", ""]
    lines += [f"- **{key}**: `{json.dumps(value) if isinstance(value, dict) else value}`"
              for key, value in report["environment"].items()]
    lines += ["", "## Scorecard", "", "| category | " + " | ".join(COLUMNS) + " | status |",
              "|---|" + "---:|" * len(COLUMNS) + "---|"]
    for category, counts in report["scorecard"].items():
        lines.append(f"| {category} | " + " | ".join(str(counts[c]) for c in COLUMNS)
                     + f" | {_escape(counts['summary'])} |")
    judged = {category: counts["target"] for category, counts in report["scorecard"].items() if "target" in counts}
    if judged:
        lines += ["", "Judged:", ""] + [f"- **{category}**: {_escape(target)}" for category, target in judged.items()]
    lines += ["", "BLOCKED and WORKS pass; ALLOWED and BROKEN fail; INDETERMINATE is never counted as a pass.",
              "A selected category that did not run fails the run; `not selected` means it was left out.",
              ""]
    if report.get("late_evidence"):
        lines += ["## Late evidence", "", "Found by the session-end audit after the verdicts were given: not in the "
                  "counts above, and the run failed.", ""]
        lines += [f"- {_escape(message)}" for message in report["late_evidence"]] + [""]
    lines += ["## Refusals with no live probe", "",
              "Syscalls a policy refuses that the catalogue has no harmless probe for, and what covers each "
              "(never silent).", ""]
    lines += [f"- {entry['syscall']} ({entry['role']} {entry['source']}): covered by {entry['covered_by']}"
              for entry in report.get("unprobed_refusals", [])] or ["- none"]
    lines += ["", "## Evidence", "", "| category | test | " + " | ".join(EVIDENCE_FIELDS) + " |",
              "|---|---|" + "---|" * len(EVIDENCE_FIELDS)]
    for record in report["probes"]:
        cells = [record.get("category", ""), record.get("test", "")]
        cells += [str(record.get(field, "")) for field in EVIDENCE_FIELDS]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    elif path.suffix in (".md", ".markdown"):
        path.write_text(render_markdown(report))
    else:  # validated at configure time; kept as a guard
        raise ValueError(f"--sandbox-report: unsupported extension {path.suffix!r}")


def verdict_map(report: Mapping[str, Any]) -> dict[str, str]:
    """test id -> verdict, for comparing two reports (e.g. serial vs ``-n 2``)."""
    probes: Sequence[Mapping[str, Any]] = report["probes"]
    return {f"{p['category']}::{p['test']}": p["verdict"] for p in probes}
