"""--sandbox-report: JSON and Markdown, every probe's evidence, the environment block, xdist-merged."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_sandbox.report.categories import CATEGORIES, LAUNCHER_CATEGORIES, judged_target
from pytest_sandbox.report.writers import render_markdown, verdict_map

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def pytester_imports_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester's subprocesses run elsewhere, where an editable install may point at another checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run_suite(pytester, *args):
    pytester.makepyfile(test_conf=(ROOT / "conformance/test_syscalls.py").read_text())
    return pytester.runpytest_subprocess("--sandbox", "--sandbox-modes=block", "-p", "no:cacheprovider", *args)


def test_json_report_has_scorecard_evidence_and_environment(pytester, tmp_path):
    path = tmp_path / "report.json"
    assert run_suite(pytester, f"--sandbox-report={path}").ret == 0
    report = json.loads(path.read_text())
    assert report["run"]["policy"] == "baseline"
    env = report["environment"]
    for key in ("kernel", "arch", "libseccomp", "python", "euid", "compat_abis", "sysctls"):
        assert key in env
    assert report["scorecard"]["syscall"]["BLOCKED"] > 100
    assert report["scorecard"]["syscall"]["ALLOWED"] == 0
    # every category is listed, run or not; this run selected none of the network ones
    assert list(report["scorecard"]) == list(CATEGORIES)
    assert report["scorecard"]["syscall"]["status"] == "ran"
    assert report["scorecard"]["syscall"]["target"] == "the reference sandbox (policy baseline)"
    assert {report["scorecard"][c]["summary"] for c in CATEGORIES[2:]} == {"not selected"}
    assert not any("target" in report["scorecard"][c] for c in CATEGORIES[2:])  # only a category that ran has one
    assert report["all_selected_ran"] is True
    probe = next(p for p in report["probes"] if p["test"].endswith("pidfd_getfd-x32"))
    for field in ("attempted", "baseline", "observed", "expected", "verdict", "reason"):
        assert probe[field]
    assert probe["verdict"] == "BLOCKED" and probe["baseline"] == "ENOSYS"


def test_report_under_xdist_matches_the_serial_verdicts(pytester, tmp_path):
    serial, parallel = tmp_path / "serial.json", tmp_path / "parallel.json"
    assert run_suite(pytester, f"--sandbox-report={serial}").ret == 0
    assert run_suite(pytester, f"--sandbox-report={parallel}", "-n", "2").ret == 0
    serial_map = verdict_map(json.loads(serial.read_text()))
    assert serial_map and serial_map == verdict_map(json.loads(parallel.read_text()))


def test_markdown_report_and_a_failing_run_name_the_hole(pytester, tmp_path):
    path = tmp_path / "report.md"
    result = run_suite(pytester, f"--sandbox-report={path}", "--sandbox-policy=openshell-pre-819",
                       "--sandbox-require=baseline")
    assert result.ret == 1
    text = path.read_text()
    assert "| syscall |" in text and "## Environment" in text
    assert "| ssrf | 0 | 0 | 0 | 0 | 0 | not selected |" in text
    assert ("block-root-pidfd_getfd-native | syscall pidfd_getfd via native ABI | EBADF | "
            "sentinel build: EBADF; real build: EBADF") in text
    assert "ALLOWED" in text


def test_junit_xml_carries_the_evidence_as_properties(pytester, tmp_path):
    xml = tmp_path / "junit.xml"
    assert run_suite(pytester, f"--junitxml={xml}").ret == 0
    properties = [p.get("value") for p in ET.parse(xml).iter("property") if p.get("name") == "sandbox_verdict"]
    assert properties and any("BLOCKED" in value and "baseline" in value for value in properties)


def test_report_path_needs_a_known_extension(pytester):
    result = pytester.runpytest_subprocess("--sandbox", "--sandbox-report=out.txt")
    assert result.ret == 4 and "use a .json or .md path" in result.stderr.str()


def test_refusals_without_a_live_probe_are_shown_in_the_report_and_in_explain(tmp_path, capsys):
    """Issue #13 item 6: an allowlist's refusals with no probe (lookup_dcookie, uselib, clock_settime) are
    listed with what covers them, in the JSON and Markdown report and in ``pytest-sandbox explain``."""
    from pytest_sandbox.cli import main
    from pytest_sandbox.report.coverage import unprobed_coverage
    from pytest_sandbox.report.scorecard import Scorecard
    from pytest_sandbox.report.writers import build_report, render_markdown

    docker_like = str(Path(__file__).resolve().parents[1] / "fixtures/oci/docker-like-default.json")
    coverage = unprobed_coverage(docker_like, None, None, third_party=False)
    covered = {entry["syscall"]: entry["covered_by"] for entry in coverage if entry["role"] == "policy"}
    for name in ("lookup_dcookie", "uselib", "clock_settime"):
        assert covered[name] == "the default action / the read-back evaluation (syscall-evaluation), no live probe"
    report = build_report(Scorecard(), environment={}, run={}, coverage=coverage)
    assert json.loads(json.dumps(report))["unprobed_refusals"] == coverage
    markdown = render_markdown(report)
    assert "## Refusals with no live probe" in markdown
    assert "- uselib (policy docker-like-default): covered by the default action" in markdown
    assert main(["explain", docker_like]) == 0
    shown = capsys.readouterr().out
    assert "refused with no live probe (" in shown and "  uselib: covered by the default action" in shown


LEAKING_AFTER_ITS_VERDICTS = '''
def test_a_dial_nobody_judges(_network_lab):
    _network_lab.dial("169.254.169.254", 80).close()  # reaches the lab's catch-all; no verdict counts it
'''


def test_late_evidence_is_named_under_the_scorecard_and_in_the_report(pytester, tmp_path):
    """The session-end audit's finding fails the run, and the scorecard and the report say their counts do not
    include it (a report read for its counts alone must not look green)."""
    (pytester.path / "conformance").mkdir()
    (pytester.path / "conformance" / "test_allowlist.py").write_text(
        (ROOT / "conformance/test_allowlist.py").read_text())
    pytester.makepyfile(test_leaking=LEAKING_AFTER_ITS_VERDICTS)
    path = tmp_path / "report.json"
    result = pytester.runpytest_subprocess("--sandbox", f"--sandbox-report={path}", "-p", "no:cacheprovider",
                                           "conformance/test_allowlist.py", "test_leaking.py")
    output = result.stdout.str()
    assert result.ret == 1, output
    assert "LATE EVIDENCE (not in the counts above; the run fails): pytest-sandbox: 1 connection(s) reached" in output
    report = json.loads(path.read_text())
    assert report["scorecard"]["allowlist"]["BLOCKED"] == 5  # the counts alone look green...
    assert len(report["late_evidence"]) == 1 and "169.254.169.254:80" in report["late_evidence"][0]  # ...this is not
    markdown = render_markdown(report)
    assert "## Late evidence" in markdown and "169.254.169.254:80" in markdown


@pytest.mark.parametrize(("options", "launcher", "proxy"), [
    ({}, "the reference sandbox (policy baseline)", "the reference egress proxy (policy baseline)"),
    ({"exec_prefix": "env"}, "the launcher --sandbox-exec 'env'",
     "the reference egress proxy (policy baseline; --sandbox-proxy or --sandbox-proxy-cmd judges another)"),
    ({"proxy_cmd": "tp {port}"}, "the reference sandbox (policy baseline)",
     "the proxy --sandbox-proxy-cmd 'tp {port}'"),
    ({"exec_prefix": "bwrap --", "proxy_url": "http://127.0.0.1:8080"}, "the launcher --sandbox-exec 'bwrap --'",
     "the proxy at http://127.0.0.1:8080"),
])
def test_each_category_names_the_target_its_verdicts_are_about(options, launcher, proxy):
    """A third party that names only its launcher must not read the reference proxy's rows as its own (nor, before
    the egress category judged the launcher, the reference launcher's egress rows)."""
    for category in CATEGORIES:
        expected = launcher if category in LAUNCHER_CATEGORIES else proxy
        assert judged_target(category, policy="baseline", **options) == expected, category
    assert "egress" in LAUNCHER_CATEGORIES and "ssrf" not in LAUNCHER_CATEGORIES
