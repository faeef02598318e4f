"""What the syscall category covers without a live probe, for the report (issue #13 item 6). Never silent.

An allowlist refuses every syscall it does not allow by its default action; the catalogue has harmless
probes for some of them only. Each of the others is listed with what covers it (the default action,
proven live on every probed call it refuses, and the read-back evaluation of the loaded filter, category
``syscall-evaluation``); a denylist naming a call with no probe has its own row judged from that
evaluation (verdicts.syscall.judge_unprobed), and is listed here too.
"""

from __future__ import annotations

from typing import Any

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.probes.syscall_cases import unprobed_refusals


def unprobed_coverage(policy: str, require: str | None, caps: str | None, *, third_party: bool) -> list[dict[str, Any]]:
    """One entry per refused syscall with no live probe, for the policy and the requirement the run checks."""
    sources = [("requirement", require or "baseline")]
    if not third_party and require is None:
        sources.insert(0, ("policy", policy))
    found: list[dict[str, Any]] = []
    for role, source in dict.fromkeys(sources):
        try:
            loaded = load_policy(source, caps)
        except PolicyError as exc:
            found.append({"role": role, "source": source, "syscall": "-", "covered_by": f"not computed: {exc}"})
            continue
        found += [{"role": role, "source": loaded.name, "syscall": u.syscall, "covered_by": u.covered_by}
                  for u in unprobed_refusals(loaded)]
    return found
