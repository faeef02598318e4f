"""The one evidence record every conformance test attaches (``sandbox_verdict``). Pure.

The scorecard counts these records and the JSON/Markdown writers print them, so every category
(syscall, ssrf, egress, allowlist, inference, smuggling) produces exactly this shape.
"""

from __future__ import annotations

from typing import Any

from pytest_sandbox.verdicts.judgement import Judgement


def evidence_record(category: str, test_id: str, judgement: Judgement, attempted: str, *,
                    required: bool = True, **extra: Any) -> dict[str, Any]:
    """The ``sandbox_verdict`` user property for one test (``extra``: e.g. syscall's mode and identity)."""
    return {
        "category": category, "test": test_id, "verdict": judgement.verdict.value,
        "reason": judgement.reason, "expected": judgement.expected, "baseline": judgement.baseline,
        "observed": judgement.observed, "required": required, "attempted": attempted, **extra,
    }
