"""Third-party baselines are taken as the caller the target shows (issue #8, item 3).

The probe runner reports from inside a ``--sandbox-exec`` target who it runs as; the unfiltered baseline
is taken as that caller (uid, gid, groups, effective and bounding capabilities, no_new_privs, the same
kind of namespaces) and checked against the baseline runner's own report. What cannot be matched makes
errno refusals INDETERMINATE, never BLOCKED. Test ids name the caller. A requirement that installs a
filter fails ``filter-present`` on a target showing ``Seccomp: 0``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from exec_targets import ROOT, failed_lines, id_prefix, run_syscall_suite, run_with_report, scorecard_row

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.probes.observed_identity import (
    NAMESPACE_TYPES,
    ObservedIdentity,
    baseline_request,
    identity_mismatches,
    map_to_outside,
)
from pytest_sandbox.probes.syscall import parse_runner_report, runner_script
from pytest_sandbox.probes.syscall_cases import control_cases, denial_cases, requirements_of
from pytest_sandbox.probes.syscall_runner import whoami
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.launcher import Identity
from pytest_sandbox.verdicts.judgement import Outcome, Verdict
from pytest_sandbox.verdicts.syscall import FilterRequirement, filter_requirement, judge_exec

NOBODY_WITHOUT_FILTER = ROOT / "tests/broken_targets/nobody_without_filter.sh"
BWRAP = shutil.which("bwrap")
SYSTEM_PYTHON = "/usr/bin/python3"
ALL_CAPS = (1 << 41) - 1
ROOT_CAPS = 0x1FFFEFFFFFF  # root in a container without CAP_SYS_RESOURCE
# The rows the kernel itself refuses an unprivileged caller with EPERM (syscalls.md §4, the `*` rows):
# a baseline taken as root credited a no-filter nobody "sandbox" with BLOCKED on exactly these.
KERNEL_REFUSES_NOBODY = {f"{name}-{abi}" for name in ("fsopen", "fsmount", "fspick", "move_mount", "pivot_root")
                         for abi in ("native", "i386")}
needs_root_and_setpriv = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                            reason="needs root and setpriv (util-linux) to run as uid 65534")


def report(uid: int = 0, gid: int | None = None, *, groups: tuple[int, ...] = (), eff: int = ROOT_CAPS,
           bnd: int | None = None, nnp: int = 0, seccomp: int = 0, filters: int = 0,
           private: tuple[str, ...] = (), uid_map: str = "0 0 4294967295", gid_map: str = "0 0 4294967295",
           setgroups: str = "allow") -> dict[str, Any]:
    """A runner identity record, as :func:`whoami` writes it."""
    gid = uid if gid is None else gid
    return {
        "resuid": [uid] * 3, "resgid": [gid] * 3, "groups": list(groups),
        "status": {"Uid": f"{uid} {uid} {uid} {uid}", "Gid": f"{gid} {gid} {gid} {gid}",
                   "Groups": " ".join(map(str, groups)), "CapInh": "0000000000000000", "CapPrm": f"{eff:016x}",
                   "CapEff": f"{eff:016x}", "CapBnd": f"{eff if bnd is None else bnd:016x}",
                   "CapAmb": "0000000000000000", "NoNewPrivs": str(nnp), "Seccomp": str(seccomp),
                   "Seccomp_filters": str(filters)},
        "namespaces": {kind: f"{kind}:[{2 if kind in private else 1}]" for kind in NAMESPACE_TYPES},
        "files": {"uid_map": uid_map, "gid_map": gid_map, "setgroups": setgroups},
        "unreadable": [],
    }


def observed(**fields: Any) -> ObservedIdentity:
    return ObservedIdentity.from_report(report(**fields))


HARNESS = observed()

# -- the runner's report ------------------------------------------------------------------------------


@needs_root_and_setpriv
def test_runner_reports_who_it_is_from_inside_under_python_dash_s_as_nobody():
    completed = subprocess.run([str(NOBODY_WITHOUT_FILTER), SYSTEM_PYTHON, "-S", "-"], input=runner_script([]),
                               capture_output=True, timeout=60, cwd="/")
    assert completed.returncode == 0, completed.stderr
    identity = parse_runner_report(completed.stdout).identity
    assert identity is not None and identity.unreadable == ()
    assert (identity.uids, identity.gids, identity.groups) == ((65534,) * 4, (65534,) * 4, ())
    assert (identity.cap_effective, identity.cap_permitted, identity.cap_bounding) == (0, 0, 0)
    assert (identity.no_new_privs, identity.seccomp, identity.seccomp_filters) == (0, 0, 0)
    assert {kind for kind, _ in identity.namespaces} >= set(NAMESPACE_TYPES)


def test_the_harness_reads_itself_with_the_same_code():
    me = ObservedIdentity.from_report(whoami())
    assert me.euid == os.geteuid() and me.unreadable == ()
    assert me.namespace("net") == os.readlink("/proc/self/ns/net")


def test_garbage_from_a_launcher_is_ignored_and_bad_fields_are_named_not_raised():
    bad = report()
    bad["status"]["CapEff"] = "zz"
    del bad["namespaces"]["user"]
    stdout = (b"launcher chatter\n{not json\n[1, 2]\n" + json.dumps({"identity": bad}).encode() + b"\n"
              + b'{"id": "x", "outcome": {"type": "errno", "value": 1}}\n')
    parsed = parse_runner_report(stdout)
    assert parsed.outcomes == {"x": Outcome.errno(1)}
    assert parsed.identity is not None and parsed.identity.cap_effective is None
    assert any("CapEff" in p for p in parsed.identity.unreadable)
    assert any("user" in p for p in parsed.identity.unreadable)
    assert parse_runner_report(b"nothing\n").identity is None


# -- test ids name the caller -------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "name"), [
    ({"uid": 65534, "eff": 0}, "uid65534-nocaps"),
    ({"uid": 0, "eff": ALL_CAPS}, "uid0-allcaps"),
    ({"uid": 0}, "uid0-caps1fffeffffff"),
    ({"uid": 1000, "gid": 100, "eff": 1 << 13}, "uid1000-gid100-caps2000"),
    ({"uid": 0, "eff": 0, "private": ("user", "mnt")}, "uid0-nocaps-userns"),
])
def test_ids_name_uid_capabilities_and_a_private_user_namespace(fields, name):
    assert observed(**fields).test_name(HARNESS, ALL_CAPS) == name


# -- what the baseline must be ------------------------------------------------------------------------


def test_a_nobody_target_gets_a_nobody_baseline_without_capabilities():
    request = baseline_request(observed(uid=65534, eff=0, bnd=0), HARNESS, ALL_CAPS)
    assert (request.uid, request.gid, request.groups) == (65534, 65534, ())
    assert (request.capabilities, request.bounding, request.no_new_privs) == (0, 0, False)
    assert request.fresh_namespaces == () and request.problems == ()


def test_the_harness_own_caller_in_a_private_mount_namespace_keeps_its_ids():
    request = baseline_request(observed(nnp=1, private=("mnt",)), HARNESS, ALL_CAPS)
    assert (request.uid, request.capabilities, request.groups) == (None, None, None)
    assert request.fresh_namespaces == ("mnt",) and request.no_new_privs


def test_a_private_user_namespace_is_rebuilt_with_its_maps_and_groups_mapped_out():
    target = observed(uid=0, eff=ROOT_CAPS, groups=(0, 5), private=("user", "mnt", "pid"),
                      uid_map="0 1000 1", gid_map="0 1000 1 5 2000 1", setgroups="deny")
    request = baseline_request(target, HARNESS, ALL_CAPS)
    assert request.fresh_namespaces == ("mnt", "pid", "user")
    assert (request.uid_map, request.gid_map, request.setgroups) == ("0 1000 1", "0 1000 1 5 2000 1", "deny")
    assert (request.uid, request.groups) == (0, (1000, 2000))
    assert map_to_outside((7,), "0 1000 1") == ((), (7,))


def test_every_difference_that_changes_answers_is_named():
    target = observed(uid=65534, eff=0, bnd=0, nnp=1, private=("pid",))
    assert identity_mismatches(target, target, HARNESS) == ()
    problems = identity_mismatches(target, HARNESS, HARNESS)
    for field in ("uid", "gid", "effective capabilities", "bounding capabilities", "NoNewPrivs", "pid namespace"):
        assert any(p.startswith(field) for p in problems), (field, problems)


# -- judging ------------------------------------------------------------------------------------------

PROXY = requirements_of(load_policy("baseline"), "proxy")
CASES = {case.case_id: case for case in denial_cases(PROXY) + control_cases(PROXY, "proxy")}
REQUIRED = FilterRequirement("the requirement baseline (proxy mode)", 1, True)
UNMATCHED = ("uid: target 1000, baseline 65534",)
EPERM, SIGSYS = Outcome.errno(1), Outcome.killed_by(signal.SIGSYS)


def test_an_errno_refusal_against_an_unmatched_baseline_is_indeterminate_with_the_reason():
    judgement = judge_exec(CASES["ptrace-native"], Outcome.errno(3), EPERM, identity_problems=UNMATCHED,
                           required=REQUIRED)
    assert judgement.verdict is Verdict.INDETERMINATE
    assert "could not be taken as the sandbox's caller" in judgement.reason and UNMATCHED[0] in judgement.reason


def test_the_same_refusal_against_a_matched_baseline_is_blocked():
    judgement = judge_exec(CASES["ptrace-native"], Outcome.errno(3), EPERM, identity_problems=(), required=REQUIRED)
    assert judgement.verdict is Verdict.BLOCKED


def test_death_by_sigsys_is_a_filter_whoever_the_baseline_was():
    judgement = judge_exec(CASES["ptrace-i386"], Outcome.errno(3), SIGSYS, identity_problems=UNMATCHED,
                           required=REQUIRED)
    assert judgement.verdict is Verdict.BLOCKED


def test_an_unmatched_baseline_cannot_prove_over_blocking_either():
    case = CASES["execveat-without-ruled-flag-reaches-kernel"]
    judgement = judge_exec(case, Outcome.errno(14), EPERM, identity_problems=UNMATCHED, required=REQUIRED)
    assert judgement.verdict is Verdict.INDETERMINATE


def status(**fields: str) -> Outcome:
    return Outcome("status", None, ", ".join(f"{k}: {v}" for k, v in sorted(fields.items())))


def test_filter_present_fails_a_third_party_showing_seccomp_0_naming_the_field():
    judgement = judge_exec(CASES["filter-present"], Outcome("error"), status(Seccomp="0", Seccomp_filters="0",
                           NoNewPrivs="1"), identity_problems=(), required=REQUIRED)
    assert judgement.verdict is Verdict.BROKEN
    assert "Seccomp is '0', expected '2'" in judgement.reason and "Seccomp_filters is 0" in judgement.reason


def test_filter_present_names_a_missing_no_new_privs():
    judgement = judge_exec(CASES["filter-present"], Outcome("error"), status(Seccomp="2", Seccomp_filters="1",
                           NoNewPrivs="0"), identity_problems=(), required=REQUIRED)
    assert judgement.verdict is Verdict.BROKEN and "NoNewPrivs is '0'" in judgement.reason


def test_filter_present_accepts_one_merged_filter_from_a_third_party():
    judgement = judge_exec(CASES["filter-present"], Outcome("error"), status(Seccomp="2", Seccomp_filters="1",
                           NoNewPrivs="1"), identity_problems=(), required=REQUIRED)
    assert judgement.verdict is Verdict.WORKS


def test_the_requirement_decides_whether_a_filter_is_needed():
    assert filter_requirement(load_policy("baseline"), "proxy") == REQUIRED
    weakened = filter_requirement(load_policy("openshell-pre-819"), "allow")
    assert weakened.filters == 0
    judgement = judge_exec(CASES["filter-present"], Outcome("error"), status(Seccomp="0", Seccomp_filters="0",
                           NoNewPrivs="0"), identity_problems=(), required=weakened)
    assert judgement.verdict is Verdict.WORKS


# -- broken targets, end to end -------------------------------------------------------------------------


@needs_root_and_setpriv
def test_nobody_without_a_filter_earns_no_blocked_and_fails_filter_present(tmp_path):
    completed, records = run_with_report(str(NOBODY_WITHOUT_FILTER), tmp_path / "r.json", "--sandbox-require=baseline")
    assert completed.returncode == 1
    assert scorecard_row(completed, "syscall")["BLOCKED"] == 0, completed.stdout[-3000:]
    prefix = id_prefix(str(NOBODY_WITHOUT_FILTER))
    assert prefix == "exec-uid65534-nocaps-"
    assert records and all(test.startswith(prefix) for test in records)
    for case in KERNEL_REFUSES_NOBODY:  # the kernel's EPERM to nobody, not a filter's
        record = records[prefix + case]
        assert (record["verdict"], record["baseline"], record["observed"]) == ("INDETERMINATE", "EPERM", "EPERM")
    failed = failed_lines(completed)
    assert {prefix + case for case in KERNEL_REFUSES_NOBODY} <= set(failed)
    hole = failed[prefix + "filter-present"]
    assert "BROKEN" in hole and "Seccomp is '0', expected '2': NO seccomp filter is loaded" in hole
    assert "the runner in the sandbox reports uid 65534" in hole


@pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not installed (Debian: bubblewrap)")
def test_a_target_that_hides_proc_earns_blocked_only_from_sigsys(tmp_path):
    launcher = bwrap_with_filter(tmp_path, "--tmpfs /proc")
    completed, records = run_with_report(launcher, tmp_path / "r.json", "--sandbox-require=baseline")
    assert completed.returncode == 1
    blocked = [r for r in records.values() if r["verdict"] == "BLOCKED"]
    assert blocked and all(r["observed"] == "killed by SIGSYS" for r in blocked)
    ptrace = next(r for test, r in records.items() if test.endswith("-ptrace-native"))
    assert ptrace["verdict"] == "INDETERMINATE" and ptrace["observed"] == "EPERM"
    assert "could not report /proc/self/status" in ptrace["reason"]


def bwrap_with_filter(tmp_path: Path, *bwrap_args: str, prefix: str = "") -> str:
    """bubblewrap loading the baseline policy's filters, with extra bwrap flags and an optional command
    in front (e.g. a setuid helper that changes the uid first)."""
    compiled = compile_policy(load_policy("baseline"), "proxy")
    lines = ["#!/bin/sh"]
    flags = []
    for index, program in enumerate(compiled.programs):
        path = tmp_path / f"filter{index}.bpf"
        path.write_bytes(program)
        path.chmod(0o644)
        lines.append(f"exec {3 + index}<{path}")
        flags.append(f"--add-seccomp-fd {3 + index}")
    lines.append(f'exec {prefix} {BWRAP} --dev-bind / / --die-with-parent {" ".join(bwrap_args)} '
                 f'{" ".join(flags)} -- "$@"')
    script = tmp_path / "launcher.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return str(script)


# Runs as uid 65534 (the harness is not root): the session's own pre-flight, baseline and judges.
UNPRIVILEGED_SESSION = r"""
import json, sys
from pytest_sandbox.session import SandboxOptions, SandboxSession
session = SandboxSession(SandboxOptions(exec_prefix=sys.argv[1], require="baseline"))
out = {}
for kind in ("denial", "control"):
    for param in session.syscall_params(kind):
        j = session.judge(param)
        out[param.test_id] = [j.verdict.value, j.observed, j.reason]
print(json.dumps(out))
"""


@pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not installed (Debian: bubblewrap)")
@needs_root_and_setpriv
def test_when_the_harness_cannot_become_the_target_caller_errno_refusals_are_indeterminate(tmp_path_factory):
    """The harness runs as uid 65534; the target (a setuid helper, then unprivileged bubblewrap with the
    baseline filter) runs as uid 1000 in its own user namespace. uid 65534 can neither become uid 1000
    nor map it, so the baseline is not the target's caller: no EPERM may count as BLOCKED."""
    root = tmp_path_factory.mktemp("unmatched")
    shutil.copytree(ROOT / "pytest_sandbox", root / "pytest_sandbox", ignore=shutil.ignore_patterns("__pycache__"))
    import pyseccomp

    shutil.copy(pyseccomp.__file__, root / "pyseccomp.py")
    helper = root / "setuid-setpriv"
    shutil.copy(shutil.which("setpriv") or "", helper)
    helper.chmod(0o755 | stat.S_ISUID)
    launcher = bwrap_with_filter(root, prefix=f"{helper} --reuid 1000 --regid 1000 --clear-groups --inh-caps=-all --")
    for path in [root, *root.parents]:
        if path != Path("/"):
            path.chmod(path.stat().st_mode | 0o005)
    for path in root.rglob("*"):
        if path != helper:
            path.chmod(0o755 if path.is_dir() or path.suffix == ".sh" else 0o644)
    completed = subprocess.run(
        # the bounding set stays full, or the setuid helper could not change the uid either
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c", UNPRIVILEGED_SESSION,
         launcher],
        capture_output=True, text=True, timeout=300, cwd="/",
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    verdicts = json.loads(completed.stdout)
    assert verdicts and all(test.startswith("exec-uid1000-nocaps-userns-") for test in verdicts)
    blocked = {test: v for test, v in verdicts.items() if v[0] == "BLOCKED"}
    assert all(observed == "killed by SIGSYS" for _, observed, _ in blocked.values()), blocked
    verdict, observed_eperm, reason = verdicts["exec-uid1000-nocaps-userns-ptrace-native"]
    assert (verdict, observed_eperm) == ("INDETERMINATE", "EPERM")
    assert "the launcher cannot run as uid1000-nocaps-userns here" in reason


# -- the pre-flight -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("launcher", "says"), [
    ("false", "the identity pre-flight exited with 1"),
    ("/bin/true", "the identity pre-flight exited with 0 and the probe runner did not report who it runs as"),
    ("/nonexistent/launcher", "launcher '/nonexistent/launcher' not found"),
])
def test_a_launcher_that_reports_nothing_is_one_clear_error_not_a_pass(launcher, says):
    completed = run_syscall_suite(launcher)
    assert completed.returncode not in (0, 1)
    output = completed.stdout + completed.stderr
    assert "ERROR: pytest-sandbox: --sandbox-exec" in output and says in output
    assert "Traceback" not in output and "passed" not in completed.stdout


def test_the_reference_keeps_its_ids():
    from pytest_sandbox.session import SandboxOptions, SandboxSession

    session = SandboxSession(SandboxOptions(modes=("block",), identities=("current",)))
    ids = {param.test_id for param in session.syscall_params("denial")}
    assert f"block-{Identity.current().name}-pidfd_getfd-native" in ids
    assert session.exec_identity is None


def test_the_pre_flight_is_the_runner_with_an_empty_plan():
    completed = subprocess.run([sys.executable, "-S", "-"], input=runner_script([]), capture_output=True, timeout=60)
    assert completed.returncode == 0
    identity = parse_runner_report(completed.stdout).identity
    assert identity is not None and identity.euid == os.geteuid()
