"""Fail closed: a selected category that cannot run fails the session, and the scorecard says why.

The unsupported hosts are real: ``tests/restricted_host.py`` runs pytest under a seccomp filter that
refuses to create network namespaces (``no-netns``, as Docker's default profile does) or to load
another seccomp filter (``no-seccomp``, as a kernel without CONFIG_SECCOMP_FILTER). Each run is a
separate pytest process started from the checkout, so it imports this worktree's plugin.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pytest_sandbox.report.categories import CATEGORIES, CategoryNotRun, category_of, marker_name, suite_module
from pytest_sandbox.report.scorecard import NOT_RUN, NOT_SELECTED, PROPERTY, RAN, Scorecard

ROOT = Path(__file__).resolve().parents[1]
RESTRICTED_HOST = ROOT / "tests" / "restricted_host.py"
NETWORK_FILES = ("conformance/test_ssrf.py", "conformance/test_smuggling.py")
NO_NAMESPACE = "the network lab needs a private network namespace, and this host cannot create one"


def run_pytest(*args: str, restriction: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:benchmark", *args]
    if restriction is not None:
        command = [sys.executable, str(RESTRICTED_HOST), restriction, "--", *command]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def scorecard_rows(output: str) -> dict[str, str]:
    """category -> the rest of its scorecard line, from a run's terminal output."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "pytest-sandbox scorecard" in line) + 2
    rows: dict[str, str] = {}
    for line in lines[start:]:
        name, _, rest = line.partition(" ")
        if not name and rows:  # a category's second line: what part of it did not run
            last = list(rows)[-1]
            rows[last] += " | " + rest.strip()
            continue
        if name not in CATEGORIES:
            break
        rows[name] = rest.strip()
    return rows


# --- which test reports which category (pure) ------------------------------------------------


@pytest.mark.parametrize(("nodeid", "category"), [
    ("conformance/test_syscalls.py::test_forbidden_syscall_is_refused[block-root-ptrace-native]", "syscall"),
    ("conformance/test_syscalls.py::test_ordinary_work_still_functions[allow-nobody-thread]", "syscall-controls"),
    ("conformance/test_ssrf.py::test_special_use_destination_is_refused_and_public_one_is_reached"
     "[connect-ctl-v4-cgnat-below-100.63.255.255]", "ssrf-controls"),
    ("conformance/test_ssrf.py::test_special_use_destination_is_refused_and_public_one_is_reached"
     "[absolute-v4-private-10-first-10.0.0.0]", "ssrf"),
    # Ambiguous input refused as malformed has a row of its own, apart from the semantic refusals.
    ("conformance/test_ssrf.py::test_special_use_destination_is_refused_and_public_one_is_reached"
     "[origin-enc-loopback-decimal-2130706433]", "ssrf-malformed"),
    ("conformance/test_ssrf.py::test_special_use_destination_is_refused_and_public_one_is_reached"
     "[absolute-auth-backslash-at-public-metadata]", "ssrf-malformed"),
    ("conformance/test_ssrf.py::test_special_use_destination_is_refused_and_public_one_is_reached"
     "[absolute-enc-loopback-trailing-dot-127.0.0.1.]", "ssrf"),  # one trailing dot: a real destination
    ("conformance/test_ssrf.py::test_absolute_request_with_private_host_header_is_judged_by_its_public_target",
     "ssrf-controls"),
    ("conformance/test_ssrf.py::test_proxy_own_address_is_denied[connect]", "ssrf"),
    ("conformance/test_ssrf_self.py::test_proxy_never_connects_to_its_own_address"
     "[connect-proxy-self-wildcard-added-later-mapped]", "ssrf"),
    ("conformance/test_ssrf_self.py::test_instance_for_self_cases_is_a_working_proxy[wildcard]", "ssrf-controls"),
    ("conformance/test_egress.py::test_sandboxed_process_cannot_connect_directly[direct-10.0.0.1]", "egress"),
    ("pytest_sandbox/conformance/test_inference.py::test_backend_record_holds_only_inference_routes_with_the_route_key",
     "inference"),
    ("../site-packages/pytest_sandbox/conformance/test_smuggling.py::test_smuggling_case_is_refused_and_closed_"
     "and_reaches_nothing[absolute-cl-te-both]", "smuggling"),
    ("tests/test_ssrf.py::test_anything", None),  # a test file outside the suite belongs to no category
    ("conformance/test_mine.py::test_anything", None),
])
def test_category_of_a_test_comes_from_its_node_id(nodeid: str, category: str | None) -> None:
    assert category_of(nodeid) == category


@pytest.mark.parametrize(("nodeid", "module"), [
    ("conformance/test_ssrf.py::test_x[connect-a]", "test_ssrf.py"),
    ("/site/pytest_sandbox/conformance/test_syscalls.py", "test_syscalls.py"),
    ("conformance\\test_egress.py::test_y", "test_egress.py"),
    ("tests/test_ssrf.py::test_x", None),
    ("test_ssrf.py::test_x", None),
    ("conformance::test_x", None),
])
def test_the_suite_module_of_a_node_id_is_its_file_name_in_the_suite_directory(nodeid: str,
                                                                               module: str | None) -> None:
    assert suite_module(nodeid) == module


# --- the scorecard's states (pure) -----------------------------------------------------------

SSRF_CASE = "conformance/test_ssrf.py::test_special_use_destination_is_refused_and_public_one_is_reached"


def verdict(category: str, value: str = "BLOCKED") -> list[tuple[str, object]]:
    return [(PROPERTY, {"category": category, "test": "t", "verdict": value})]


def test_a_category_nobody_selected_is_listed_as_not_selected_and_does_not_fail() -> None:
    card = Scorecard()
    card.add_selected([f"{SSRF_CASE}[connect-v4-x]"])
    card.add_from_properties(verdict("ssrf"), f"{SSRF_CASE}[connect-v4-x]")
    states = {status.name: status.state for status in card.statuses()}
    assert states == {**dict.fromkeys(CATEGORIES, NOT_SELECTED), "ssrf": RAN}
    assert card.unproven() == []
    assert [line.split()[0] for line in card.lines()[1:-1]] == list(CATEGORIES)


def test_a_selected_category_whose_tests_could_not_run_is_not_run_with_the_reason_and_fails() -> None:
    card = Scorecard()
    nodeids = [f"{SSRF_CASE}[connect-v4-{n}]" for n in range(3)]
    card.add_selected(nodeids)
    for nodeid in nodeids:
        card.add_not_run(nodeid, "no namespace here")
    status = card.status("ssrf")
    assert (status.state, status.reason, status.selected, status.unrun) == (NOT_RUN, "no namespace here", 3, 3)
    assert status.describe() == "not run: no namespace here"
    assert [s.name for s in card.unproven()] == ["ssrf"]
    assert "ssrf                not run: no namespace here" in card.lines()


def test_a_category_that_partly_ran_still_fails_and_says_how_much_did_not_run() -> None:
    card = Scorecard()
    card.add_selected([f"{SSRF_CASE}[connect-v4-a]", f"{SSRF_CASE}[connect-v4-b]"])
    card.add_from_properties(verdict("ssrf"), f"{SSRF_CASE}[connect-v4-a]")
    card.add_not_run(f"{SSRF_CASE}[connect-v4-b]", "proxy mode: no namespace")
    status = card.status("ssrf")
    assert status.state == RAN and status.fails_session
    assert status.describe() == "1 of 2 selected tests not run: proxy mode: no namespace"


def test_a_selected_category_whose_every_test_was_skipped_is_not_run() -> None:
    """The backstop: whatever the skip path, a selected category with no verdict is never green."""
    card = Scorecard()
    card.add_selected([f"{SSRF_CASE}[connect-v4-a]"])
    card.add_skipped(f"{SSRF_CASE}[connect-v4-a]", "some fixture skipped")
    status = card.status("ssrf")
    assert status.state == NOT_RUN and status.fails_session
    assert status.reason == "1 of its 1 selected tests were skipped: some fixture skipped"


def test_category_not_run_is_a_failure_that_shows_only_its_reason() -> None:
    error = CategoryNotRun("no seccomp")
    assert isinstance(error, pytest.fail.Exception) and not error.pytrace
    assert str(error) == "pytest-sandbox: not run: no seccomp" and error.reason == "no seccomp"


# --- real runs on unsupported hosts ------------------------------------------------------------


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_network_categories_on_a_host_without_namespaces_fail_the_session_and_say_why(
        workers: list[str], tmp_path: Path) -> None:
    """Issue #8 item 5: this exact command used to skip all 737 tests and exit 0."""
    report = tmp_path / "report.json"
    result = run_pytest("--sandbox", *NETWORK_FILES, f"--sandbox-report={report}", "-q", *workers,
                        restriction="no-netns")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert " skipped" not in output.splitlines()[-1]
    assert f"pytest-sandbox: not run: {NO_NAMESPACE}" in output
    rows = scorecard_rows(result.stdout)
    assert list(rows) == list(CATEGORIES)
    for category in ("ssrf", "ssrf-malformed", "ssrf-controls", "smuggling"):
        assert rows[category].startswith(f"not run: {NO_NAMESPACE}"), rows
    for category in ("syscall", "syscall-controls", "egress", "inference"):
        assert rows[category] == "not selected", rows
    assert re.search(r"FAILED: selected tests could not run: ssrf \((\d+) of \1 tests\), ssrf-malformed \((\d+) of "
                     r"\2 tests\), ssrf-controls \((\d+) of \3 tests\), smuggling \((\d+) of \4 tests\)",
                     result.stdout)
    written = json.loads(report.read_text())
    assert written["all_selected_ran"] is False
    assert written["scorecard"]["ssrf"]["status"] == "not run"
    assert written["scorecard"]["ssrf"]["reason"].startswith(NO_NAMESPACE)
    assert written["scorecard"]["ssrf"]["selected"] == written["scorecard"]["ssrf"]["not_run"] > 400
    assert written["scorecard"]["egress"]["status"] == "not selected"
    assert written["probes"] == []


def test_syscall_category_on_a_host_that_cannot_load_a_filter_fails_with_the_reason(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    result = run_pytest("--sandbox", "conformance/test_syscalls.py", "--sandbox-modes=block",
                        "--sandbox-identities=current", f"--sandbox-report={report}", "-q",
                        restriction="no-seccomp")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    rows = scorecard_rows(result.stdout)
    for category in ("syscall", "syscall-controls"):
        assert rows[category].startswith("not run: block mode, as root: cannot start a sandbox"), rows
        assert "PR_SET_SECCOMP" in rows[category]
    text = report.read_text()
    assert "| syscall | 0 | 0 | 0 | 0 | 0 | not run: block mode, as root: cannot start a sandbox" in text
    assert "| ssrf | 0 | 0 | 0 | 0 | 0 | not selected |" in text


def test_a_network_mode_the_host_cannot_create_fails_its_syscall_tests_while_the_others_run() -> None:
    result = run_pytest("--sandbox", "conformance/test_syscalls.py", "--sandbox-modes=block,proxy",
                        "--sandbox-identities=current", "-q", restriction="no-netns")
    assert result.returncode == 1
    rows = scorecard_rows(result.stdout)
    for category in ("syscall", "syscall-controls"):
        counts, _, unrun = rows[category].partition(" | ")
        assert int(counts.split()[0 if category == "syscall" else 3]) > 0, rows  # block mode ran
        assert unrun.split(" of ")[1].endswith("selected tests not run: proxy mode, as root: cannot start a sandbox "
                                               "(NO FILTER (baseline), network proxy, as root): PermissionError: "
                                               "[Errno 1] unshare(CLONE_NEWNET) failed: Operation not permitted; "
                                               "nothing was run"), rows
    assert re.search(r"FAILED: selected tests could not run: syscall \(\d+ of \d+ tests\), syscall-controls "
                     r"\(\d+ of \d+ tests\)", result.stdout)


def test_a_category_left_with_nothing_to_prove_fails_instead_of_skipping(tmp_path: Path) -> None:
    """A requirement with no denies leaves the syscall denial test an empty parameter set, which pytest
    skips: before, a green run that proved nothing about the launcher."""
    nothing = tmp_path / "nothing.toml"
    nothing.write_text('name = "nothing"\n[seccomp]\ndeny = []\n')
    result = run_pytest("--sandbox", "conformance/test_syscalls.py", "--sandbox-exec=env",
                        f"--sandbox-require={nothing}", "-q", "-rs")
    assert result.returncode == 1, result.stdout[-3000:]
    rows = scorecard_rows(result.stdout)
    assert rows["syscall"].startswith("not run: 1 of its 1 selected tests were skipped: got empty parameter set")
    assert "FAILED: selected tests could not run: syscall (1 of 1 tests)" in result.stdout


def test_a_category_deselected_with_its_marker_is_not_selected_and_the_run_passes(tmp_path: Path) -> None:
    result = run_pytest("--sandbox", "conformance/test_syscalls.py", "--sandbox-modes=block",
                        "--sandbox-identities=current", "-m", f"not {marker_name('syscall')}", "-q")
    assert result.returncode == 0, result.stdout[-3000:]
    rows = scorecard_rows(result.stdout)
    assert rows["syscall"] == "not selected"
    assert rows["syscall-controls"].split()[3] != "0"  # WORKS
    assert "FAILED" not in result.stdout


def test_every_verdict_is_reported_under_the_category_its_node_id_names(tmp_path: Path) -> None:
    """The node-id table and the tests agree: the whole suite under xdist as README's main job runs it (two
    workers, ``--dist loadfile``), every category ran."""
    report = tmp_path / "report.json"
    result = run_pytest("--sandbox", "conformance/", "-n", "2", "--dist", "loadfile", f"--sandbox-report={report}",
                        "-q", "--sandbox-modes=block", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    written = json.loads(report.read_text())
    assert written["all_selected_ran"] is True
    assert {name: row["status"] for name, row in written["scorecard"].items()} == dict.fromkeys(CATEGORIES, RAN)
    mismatched = Counter((category_of(p["nodeid"]), p["category"]) for p in written["probes"]
                         if category_of(p["nodeid"]) != p["category"])
    assert not mismatched
    for name, row in written["scorecard"].items():
        assert row["selected"] == sum(row[c] for c in ("BLOCKED", "ALLOWED", "INDETERMINATE", "WORKS", "BROKEN")), name
