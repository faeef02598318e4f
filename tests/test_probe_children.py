"""The probe runner reuses one child across refused calls (issue #12): it must never let a forbidden call
that SUCCEEDS change what a later probe sees.

A child attempts probes in sequence, reporting each before the next, and is replaced after any probe
that did not fail with an errno (a success, a signal, a kill, a timeout) and after every control. The
proof: against a broken filter that ALLOWS unshare(CLONE_NEWUSER), setns and prctl(PR_SET_SECCOMP),
followed by probes whose result changes in a process that made those calls, the batched runner's
outcomes and verdicts equal a one-fork-per-probe run's; and a deliberately broken runner that keeps its
child after a success (built here from the real runner's source) is caught, naming the probe it spoiled.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from dataclasses import replace
from typing import Any

import pytest

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes import syscall
from pytest_sandbox.probes.syscall import SandboxTarget, parse_runner_report, runner_command, runner_script
from pytest_sandbox.probes.syscall_cases import control_cases, denial_cases, requirements_of
from pytest_sandbox.probes.syscall_runner import _frame, _frames, keeps_child, needs_fresh_child
from pytest_sandbox.seccomp.compiler import CompiledFilter, compile_policy
from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement, Sandbox, SandboxSpec, check_host_support
from pytest_sandbox.verdicts.judgement import Outcome, Verdict
from pytest_sandbox.verdicts.syscall import judge
from tests.broken_filters import hand_built

MODE = "proxy"
NR_SETUID, NR_SETRESUID, NR_PRCTL, NR_UNSHARE, NR_SETNS, NR_MOUNT = 105, 117, 157, 272, 308, 165  # unistd_64.h
NOBODY = 65534
CLONE_NEWUSER = 0x10000000
PR_SET_SECCOMP, SECCOMP_MODE_STRICT = 22, 1  # prctl(2): only read, write, _exit and sigreturn remain
UNUSED_FD = 999_999

# The broken runner: the real one with its reuse rule replaced by "always keep the child".
REUSE_RULE = 'return not needs_fresh_child(probe) and outcome.get("type") in ("errno", "unavailable")'


def _probe(probe_id: str, nr: int, *args: int) -> dict[str, Any]:
    return {"id": probe_id, "kind": "syscall", "abi": "native", "nr": nr, "args": list(args), "setup": []}


# Each forbidden call is followed by probes that see it if they share its process: after unshare(CLONE_NEWUSER)
# uid 0 is unmapped (setuid(0) -> EINVAL instead of 0); after dropping to uid 65534 setuid(0) -> EPERM; after
# strict mode (possible only without a filter: EINVAL under one) the child dies at its next call.
CONTAMINATING_PLAN = [
    _probe("unshare-newuser", NR_UNSHARE, CLONE_NEWUSER),
    _probe("setuid-0-after-newuser", NR_SETUID, 0),
    _probe("setns-after-newuser", NR_SETNS, UNUSED_FD, 0),
    _probe("setresuid-nobody", NR_SETRESUID, NOBODY, NOBODY, NOBODY),
    _probe("setuid-0-after-drop", NR_SETUID, 0),
    _probe("prctl-strict", NR_PRCTL, PR_SET_SECCOMP, SECCOMP_MODE_STRICT),
    _probe("setns-after-strict", NR_SETNS, UNUSED_FD, 0),
    _probe("mount-after-strict", NR_MOUNT, 0, 0, 0, 0, 0),
]
BUILDS = ("broken filter", "unfiltered baseline")


def allowing(policy: Policy) -> CompiledFilter:
    """The baseline filter with three holes: setns is allowed, and so are unshare(CLONE_NEWUSER) and
    seccomp() (whose rules are dropped); prctl(PR_SET_SECCOMP) is allowed by the baseline itself."""
    seccomp = replace(policy.seccomp, deny=tuple(name for name in policy.seccomp.deny if name != "setns"),
                      arg_rules=tuple(rule for rule in policy.seccomp.arg_rules
                                      if rule.syscall not in ("unshare", "seccomp")))
    return hand_built(replace(policy, seccomp=seccomp), MODE)


def contamination(batched: dict[str, Outcome], reference: dict[str, Outcome]) -> list[str]:
    """Each probe whose outcome in the batched run differs from its outcome in a child of its own (a
    control's return value is compared by kind: getppid's is the runner's pid, new in every run)."""
    def comparable(probe_id: str, outcome: Outcome | None) -> object:
        if outcome is not None and outcome.kind == "return" and probe_id.endswith("-reaches-kernel"):
            return outcome.kind
        return outcome

    return [f"{probe_id}: {batched.get(probe_id)} in the batched runner, {outcome} in a child of its own"
            for probe_id, outcome in reference.items()
            if comparable(probe_id, batched.get(probe_id)) != comparable(probe_id, outcome)]


@pytest.fixture(scope="module")
def broken_filter() -> CompiledFilter:
    if os.geteuid() != 0:
        pytest.skip("the contaminating probes (setuid(0) succeeding) need root")
    check_host_support(MODE, Identity.current())
    return allowing(load_policy("baseline"))


def _target(build: str | CompiledFilter | None, *, one_per_child: bool = False) -> SandboxTarget:
    compiled = build if isinstance(build, CompiledFilter) or build is None else \
        (allowing(load_policy("baseline")) if build == "broken filter" else None)
    return SandboxTarget("under test", compiled, NetworkPlacement(MODE), Identity.current(),
                         one_per_child=one_per_child)


# -- the reuse rule (pure) -------------------------------------------------------------------------


def test_only_a_refused_syscall_keeps_its_child():
    denial = _probe("d", NR_SETNS, UNUSED_FD, 0)
    assert keeps_child(denial, {"type": "errno", "value": errno.EPERM})
    assert keeps_child(denial, {"type": "unavailable", "reason": "no int 0x80"})
    for ended in ({"type": "return", "value": 0}, {"type": "signal", "value": signal.SIGSYS},
                  {"type": "timeout"}, {"type": "error", "detail": "x"}):
        assert not keeps_child(denial, ended), ended


def test_controls_setup_steps_and_other_kinds_run_alone_in_a_fresh_child():
    assert needs_fresh_child({**_probe("c", NR_SETNS, 0, 0), "control": True})
    assert needs_fresh_child({**_probe("s", NR_SETNS, 0, 0), "setup": ["setsid"]})
    assert needs_fresh_child({"id": "t", "kind": "thread_start"})
    assert not keeps_child({**_probe("c", NR_SETNS, 0, 0), "control": True}, {"type": "errno", "value": 1})
    requirements = requirements_of(load_policy("baseline"), MODE)
    for case in control_cases(requirements, MODE):
        assert needs_fresh_child(case.runner_probe()), case.case_id
    assert not any(needs_fresh_child(case.runner_probe()) for case in denial_cases(requirements)
                   if not case.setup and not case.witness_access)  # a witness row is no syscall probe


def test_a_torn_last_frame_is_dropped_never_misread():
    data = _frame(0, {"type": "errno", "value": 1}) + _frame(1, {"type": "errno", "value": 2})
    assert _frames(data) == [(0, {"type": "errno", "value": 1}), (1, {"type": "errno", "value": 2})]
    assert _frames(data[:-1]) == [(0, {"type": "errno", "value": 1})]


# -- the proof, in the reference sandbox -------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_a_forbidden_call_that_succeeds_never_changes_a_later_probe(broken_filter, build):
    batched = _target(build).run(CONTAMINATING_PLAN)
    reference = _target(build, one_per_child=True).run(CONTAMINATING_PLAN)
    assert contamination(batched, reference) == []
    # The plan does what it claims: the holes are open and the later probes are plain refusals.
    assert batched["unshare-newuser"] == Outcome("return", 0)
    assert batched["setuid-0-after-newuser"] == Outcome("return", 0)
    assert batched["setns-after-newuser"] == Outcome("errno", errno.EBADF)
    assert batched["setresuid-nobody"] == Outcome("return", 0)
    assert batched["setuid-0-after-drop"] == Outcome("return", 0)
    if build == "broken filter":  # seccomp(2): no switching from filter mode to strict mode
        assert batched["prctl-strict"] == Outcome("errno", errno.EINVAL)
    else:  # strict mode kills its child at exit_group, after the report
        assert batched["prctl-strict"] == Outcome("signal", signal.SIGKILL)
    assert batched["setns-after-strict"] == Outcome("errno", errno.EBADF)
    assert batched["mount-after-strict"] == Outcome("errno", errno.EPERM if build == "broken filter" else errno.EFAULT)


@pytest.mark.parametrize("build", BUILDS)
def test_a_runner_that_keeps_its_child_after_a_success_is_caught_naming_the_probe(broken_filter, build,
                                                                                  monkeypatch):
    assert REUSE_RULE in syscall._RUNNER_SOURCE
    reference = _target(build, one_per_child=True).run(CONTAMINATING_PLAN)
    monkeypatch.setattr(syscall, "_RUNNER_SOURCE", syscall._RUNNER_SOURCE.replace(REUSE_RULE, "return True"))
    named = "\n".join(contamination(_target(build).run(CONTAMINATING_PLAN), reference))
    assert "setuid-0-after-newuser: Outcome(kind='errno', value=22" in named  # EINVAL: uid 0 unmapped
    assert "setuid-0-after-drop: Outcome(kind='errno'" in named


@pytest.mark.parametrize("build", BUILDS)
def test_the_whole_plan_gets_the_same_outcomes_and_verdicts_batched_or_one_per_child(broken_filter, build):
    policy = load_policy("baseline")
    requirements = requirements_of(policy, MODE)
    cases = [c for c in denial_cases(requirements) + control_cases(requirements, MODE)
             if c.kind != "denial" or c.nr is not None]
    plan = [c.runner_probe() for c in cases] + CONTAMINATING_PLAN
    batched = _target(build).run(plan)
    reference = _target(build, one_per_child=True).run(plan)
    assert contamination(batched, reference) == []
    baseline = _target(None).run(plan)
    intended = compile_policy(policy, MODE)

    def verdicts(observed: dict[str, Outcome]) -> dict[str, Verdict]:
        return {c.case_id: judge(c, baseline[c.case_id], observed[c.case_id], compiled=intended,
                                 policy=policy).verdict for c in cases}

    assert verdicts(batched) == verdicts(reference)
    if build == "broken filter":  # the holes are seen, the same way by both runners
        assert verdicts(batched)["setns-native"] == Verdict.ALLOWED


# -- the precompiled runner (the reference sandbox's own interpreter) ----------------------------------


def test_the_precompiled_runner_reports_what_the_source_runner_reports(broken_filter):
    """The reference sandbox sends its own interpreter the runner as a marshalled code object; a
    --sandbox-exec target and any other python3 get the source. Both must give the same report."""
    policy = load_policy("baseline")
    plan = [c.runner_probe() for c in denial_cases(requirements_of(policy, MODE)) if c.nr is not None]
    plan += CONTAMINATING_PLAN
    argv, data = runner_command(sys.executable, plan)
    assert argv[:3] == [sys.executable, "-S", "-c"]
    assert runner_command("/usr/bin/python3.99", plan) == (["/usr/bin/python3.99", "-S", "-"], runner_script(plan))
    spec = SandboxSpec(broken_filter, NetworkPlacement(MODE), Identity.current())
    with Sandbox(spec) as sandbox:
        fast = parse_runner_report(sandbox.run(argv, input=data, timeout=120).stdout)
        slow = parse_runner_report(sandbox.run([sys.executable, "-S", "-"], input=runner_script(plan),
                                               timeout=120).stdout)
    assert len(fast.outcomes) == len(plan)
    assert contamination(fast.outcomes, slow.outcomes) == []
    assert fast.identity == slow.identity and fast.identity is not None


def test_a_precompiled_runner_that_cannot_load_reports_nothing_and_every_probe_is_not_run(broken_filter):
    target = _target(broken_filter)
    plan = CONTAMINATING_PLAN[:2]
    spec = SandboxSpec(broken_filter, NetworkPlacement(MODE), Identity.current())
    argv, data = runner_command(sys.executable, plan)
    with Sandbox(spec) as sandbox:
        result = sandbox.run(argv, input=data[:-7], timeout=60)  # a torn plan: marshal refuses it
    report = syscall._report_or_error(plan, result.returncode, result.stdout, result.stderr, target.name)
    assert report.identity is None
    assert {o.kind for o in report.outcomes.values()} == {"error"}
    assert "reported 0 of 2 probes" in report.outcomes["unshare-newuser"].detail


# -- the controls still see a filter that breaks ordinary work (_thread and _socket, not their wrappers) ----


def _breaking_threads_and_unix_sockets() -> CompiledFilter:
    """A filter that breaks ordinary work: clone3 answers ENOSYS (glibc falls back to clone, as under
    the reference), clone with CLONE_THREAD and socket(AF_UNIX) are refused with EACCES. posix_spawn's
    clone (CLONE_VM|CLONE_VFORK) still works, so the runner starts."""
    import pyseccomp

    from tests.broken_filters import export

    clone_thread, af_unix = 0x00010000, 1  # sched.h CLONE_THREAD, socket.h AF_UNIX
    main = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    main.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    main.add_rule(pyseccomp.ERRNO(errno.EACCES), "clone",
                  pyseccomp.Arg(0, pyseccomp.MASKED_EQ, clone_thread, clone_thread))
    main.add_rule(pyseccomp.ERRNO(errno.EACCES), "socket", pyseccomp.Arg(0, pyseccomp.EQ, af_unix))
    real = compile_policy(load_policy("baseline"), MODE)
    return replace(real, programs=(real.programs[0], export(main)))


def test_the_thread_and_socket_controls_fail_when_the_filter_refuses_them(broken_filter):
    controls = {c.case_id: c.runner_probe() for c in control_cases(requirements_of(load_policy("baseline"), MODE),
                                                                   MODE)}
    plan = [controls["thread-starts"], controls["af_unix-socket-opens"]]
    works = _target(None).run(plan)
    assert works["thread-starts"] == Outcome("ok") and works["af_unix-socket-opens"] == Outcome("ok")
    broken = _target(_breaking_threads_and_unix_sockets()).run(plan)
    assert broken["thread-starts"].kind == "error" and "can't start new thread" in broken["thread-starts"].detail
    assert broken["af_unix-socket-opens"] == Outcome("errno", errno.EACCES)


# -- lanes: a plan's segments run side by side (issue #12) ---------------------------------------------
#
# These drive the runner's own functions in this process (no filter: every call below is harmless or
# changes only the throw-away child that makes it), so each test can see pids, order and timing of reports.
# The broken runners are the real source with one line changed, loaded the same way.

NR_PAUSE, NR_GETPID, NR_KILL, NR_GETPPID = 34, 39, 62, 110  # unistd_64.h
REFUSED = _probe("setns-bad-fd", NR_SETNS, UNUSED_FD, 0)  # EBADF, unfiltered: keeps its child


def _runner(source: str | None = None, **overrides: object) -> dict[str, Any]:
    """The runner's module namespace, from its source (``source``: a broken variant of it)."""
    namespace: dict[str, Any] = {"__name__": "probe_runner_under_test"}
    exec(compile(source or syscall._RUNNER_SOURCE, "syscall_runner.py", "exec", dont_inherit=True), namespace)
    namespace.update(overrides)
    return namespace


def _run(runner: dict[str, Any], plan: list[dict[str, Any]], *, one_per_child: bool = False
         ) -> list[tuple[str, dict[str, Any]]]:
    reports: list[tuple[str, dict[str, Any]]] = []
    runner["run_plan"](runner["_Machine"](), plan, lambda probe, outcome: reports.append((probe["id"], outcome)),
                       one_per_child)
    return reports


def _padded(marked: dict[int, dict[str, Any]], size: int = 30) -> list[dict[str, Any]]:
    """``size`` refused probes with ``marked`` ones at their indices, each id naming its index."""
    return [{**marked.get(index, REFUSED), "id": f"{index}-{marked.get(index, REFUSED)['id']}"}
            for index in range(size)]


def test_a_plan_is_cut_into_contiguous_segments_and_a_small_one_is_not():
    runner = _runner()
    assert runner["segments"](30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert runner["segments"](102, 3) == [(0, 34), (34, 68), (68, 102)]
    assert runner["segments"](runner["LANE_MIN_PROBES"] - 1, 3) == [(0, runner["LANE_MIN_PROBES"] - 1)]
    assert runner["segments"](0, 3) == [(0, 0)]


def test_reports_come_in_plan_order_from_every_lane():
    plan = _padded({index: _probe("getpid", NR_GETPID) for index in (3, 12, 17, 25)})
    reports = _run(_runner(), plan)
    assert [probe_id for probe_id, _ in reports] == [probe["id"] for probe in plan]


def test_a_runner_that_reports_its_lanes_out_of_order_is_caught():
    broken = syscall._RUNNER_SOURCE.replace("for pid, read_end, start, end in parts:",
                                            "for pid, read_end, start, end in parts[:1] + parts[:0:-1]:")
    assert broken != syscall._RUNNER_SOURCE
    plan = _padded({})
    ids = [probe_id for probe_id, _ in _run(_runner(broken), plan)]
    assert sorted(ids) == sorted(p["id"] for p in plan) and ids != [p["id"] for p in plan]


def _lane_pids(reports: list[tuple[str, dict[str, Any]]]) -> tuple[set[int], set[int]]:
    """The probe children's pids (getpid) and their parents' (getppid) that a plan reported."""
    children = {o["value"] for i, o in reports if i.endswith("-getpid")}
    parents = {o["value"] for i, o in reports if i.endswith("-getppid")}
    return children, parents


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # a zombie answers too: a process nobody reaped is still there
    except ProcessLookupError:
        return False
    return True


def _pid_plan() -> list[dict[str, Any]]:
    return _padded({index: _probe("getppid", NR_GETPPID) if index % 2 else _probe("getpid", NR_GETPID)
                    for index in (0, 1, 8, 9, 10, 11, 18, 19, 20, 21, 28, 29)})


def test_no_probe_child_nor_lane_outlives_the_plan():
    reports = _run(_runner(), _pid_plan())
    children, parents = _lane_pids(reports)
    lanes = parents - {os.getpid()}
    assert len(lanes) == 2 and len(children) == 6  # three lanes (the runner is the first), six children
    assert not [pid for pid in children | lanes if _alive(pid)]


def test_a_runner_that_never_reaps_its_lanes_is_caught_by_pid():
    broken = syscall._RUNNER_SOURCE.replace("            _, status = os.waitpid(pid, 0)\n            reaped",
                                            "            status = 0\n            reaped") \
        .replace("                    os.waitpid(pid, 0)\n", "                    pass\n")
    assert broken.count("os.waitpid(pid, 0)") == syscall._RUNNER_SOURCE.count("os.waitpid(pid, 0)") - 2
    _, parents = _lane_pids(_run(_runner(broken), _pid_plan()))
    lanes = parents - {os.getpid()}
    try:
        assert len(lanes) == 2 and sorted(pid for pid in lanes if _alive(pid)) == sorted(lanes)
    finally:
        for pid in lanes:  # this test's process is their parent: reap what the broken runner left
            os.waitpid(pid, 0)


def test_a_child_killed_mid_segment_is_attributed_and_its_lane_goes_on_in_a_fresh_child():
    plan = _padded({14: _probe("kill-self", NR_KILL, 0, signal.SIGKILL)})  # the middle lane's fifth probe
    plan[14]["args"] = ["pid", signal.SIGKILL]
    outcomes = dict(_run(_runner(), plan))
    assert outcomes["14-kill-self"] == {"type": "signal", "value": signal.SIGKILL}
    assert [o for i, o in outcomes.items() if "setns" in i] == [{"type": "errno", "value": errno.EBADF}] * 29
    assert dict(_run(_runner(), plan, one_per_child=True)) == outcomes


def test_a_timeout_in_one_segment_while_the_others_run():
    plan = _padded({2: _probe("pause", NR_PAUSE), 25: _probe("pause", NR_PAUSE)})
    outcomes = dict(_run(_runner(PROBE_TIMEOUT_SECONDS=1), plan))
    assert outcomes["2-pause"] == {"type": "timeout"} and outcomes["25-pause"] == {"type": "timeout"}
    assert [o for i, o in outcomes.items() if "setns" in i] == [{"type": "errno", "value": errno.EBADF}] * 28


# The contaminating probes placed across the lanes' boundaries: the call that changes its process is the
# last of one lane, the probe that would see it the first of the next one, or both in the same lane.
STRADDLING = {9: CONTAMINATING_PLAN[3], 10: CONTAMINATING_PLAN[4], 18: CONTAMINATING_PLAN[0],
              19: CONTAMINATING_PLAN[1], 20: CONTAMINATING_PLAN[2], 27: CONTAMINATING_PLAN[5],
              28: CONTAMINATING_PLAN[6], 29: CONTAMINATING_PLAN[7]}


def test_a_probe_whose_success_changes_its_process_changes_no_probe_in_any_lane():
    if os.geteuid() != 0:
        pytest.skip("the contaminating probes (setuid(0) succeeding) need root")
    plan = _padded(STRADDLING)
    batched = dict(_run(_runner(), plan))
    assert batched == dict(_run(_runner(), plan, one_per_child=True))
    assert batched["10-setuid-0-after-drop"] == {"type": "return", "value": 0}
    assert batched["19-setuid-0-after-newuser"] == {"type": "return", "value": 0}
    assert batched["27-prctl-strict"] == {"type": "signal", "value": signal.SIGKILL}
    broken = dict(_run(_runner(syscall._RUNNER_SOURCE.replace(REUSE_RULE, "return True")), plan))
    assert broken["19-setuid-0-after-newuser"] == {"type": "errno", "value": errno.EINVAL}


def test_when_no_lane_can_be_forked_the_runner_runs_every_segment_itself_in_order():
    runner = _runner()
    runner["_fork_lane"] = lambda machine, plan, start, end, parts: (None, None, start, end)  # fork: EAGAIN
    plan = _pid_plan()
    reports = _run(runner, plan)
    assert [probe_id for probe_id, _ in reports] == [probe["id"] for probe in plan]
    assert _lane_pids(reports)[1] == {os.getpid()}
