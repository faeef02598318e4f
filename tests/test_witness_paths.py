"""A denied cross-process syscall's other ways in: another process's /proc/<pid>/mem and /proc/<pid>/fd/<n>, kill(2).

Before: the baseline policy denied ptrace, process_vm_readv/writev, pidfd_getfd and pidfd_send_signal, and the
syscall suite passed the reference sandbox, while a process in it (root, and nobody too) read and wrote the memory of
processes outside it, took their open files through /proc and signalled them: pid 1, the harness. Measured with the
suite's own rows (``syscall_cases.witness_path_case``, a witness outside the sandbox run as the same caller): all 18
/proc rows ALLOWED (3 rows x 3 modes x 2 callers), and the 6 kill rows. Now the reference's spawner enters a Landlock
domain of its own (``spawner._enter_landlock_domain``, signals scoped from Linux 6.12) and the rows are BLOCKED
(EACCES at the open: mm_access refuses the ptrace check; EPERM for the signal); the same launcher without the domain,
and a launcher that only drops privileges, fail every row.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_sandbox.catalogues.syscalls import WITNESS_PATHS
from pytest_sandbox.errors import LaunchError
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes import process_witness
from pytest_sandbox.probes.process_witness import NONCE_BYTES, Witness, with_witness, witness_plan
from pytest_sandbox.probes.syscall import SandboxTarget
from pytest_sandbox.probes.syscall_cases import ProbeCase, control_cases, denial_cases, requirements_of
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement, Sandbox, SandboxedProcess, SandboxSpec
from pytest_sandbox.session import WITNESS_RUNS, SandboxOptions, SandboxSession, SyscallParam
from pytest_sandbox.verdicts.judgement import Outcome, Verdict
from pytest_sandbox.verdicts.syscall import NOT_ON_THIS_HOST, judge

ROOT = Path(__file__).resolve().parents[1]
MODE = "proxy"
PROC_ROWS = {"process_vm_readv-proc-mem-read", "process_vm_writev-proc-mem-write", "pidfd_getfd-proc-fd",
             "pidfd_send_signal-kill"}
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="runs the sandbox as root and as nobody: needs root")


def _proc_rows(policy: Policy) -> dict[str, ProbeCase]:
    return {case.case_id: case for case in denial_cases(requirements_of(policy, MODE)) if case.witness_access}


def test_every_policy_that_denies_a_cross_process_call_gets_its_proc_row_and_the_own_memory_control():
    rows = _proc_rows(load_policy("baseline"))
    assert set(rows) == PROC_ROWS
    assert {case.witness_access for case in rows.values()} == {path.access for path in WITNESS_PATHS.values()}
    assert all(case.live and case.nr is None and not case.call for case in rows.values())
    assert rows["pidfd_getfd-proc-fd"].runner_probe() == {"id": "pidfd_getfd-proc-fd", "kind": "witness_path",
                                                          "access": "fd"}
    controls = {case.case_id for case in control_cases(requirements_of(load_policy("baseline"), MODE), MODE)}
    assert "own-memory-reads" in controls
    # pre-#819 OpenShell denied process_vm_readv (and ptrace) but not process_vm_writev or the pidfd calls
    assert set(_proc_rows(load_policy("openshell-pre-819"))) == {"process_vm_readv-proc-mem-read"}


def _witness(pattern_slot: bytes = bytes(NONCE_BYTES)) -> Witness:
    return Witness(pid=4242, start_time="777", nonce=b"N" * NONCE_BYTES, address=0x1000, fd=3, slots=(0x2000, 0x3000),
                   patterns=(b"A" * NONCE_BYTES, b"B" * NONCE_BYTES))


def test_only_the_witness_s_own_bytes_count_as_reaching_it():
    witness = _witness()
    nonce_read = Outcome("read", None, witness.nonce.hex())
    assert witness.classify(nonce_read, 0, []).kind == "reached"
    assert witness.classify(Outcome("read", None, (b"x" * NONCE_BYTES).hex()), 0, []).kind == "other"
    wrote = Outcome("wrote", NONCE_BYTES)
    assert witness.classify(wrote, 1, [bytes(NONCE_BYTES), b"B" * NONCE_BYTES]).kind == "reached"
    # a write that landed elsewhere (the pid is another process in the sandbox's PID namespace), or another run's
    assert witness.classify(wrote, 1, [bytes(NONCE_BYTES), bytes(NONCE_BYTES)]).kind == "other"
    assert witness.classify(wrote, 0, [b"B" * NONCE_BYTES, b"B" * NONCE_BYTES]).kind == "other"
    # a permitted signal 0 is the witness's only when the pid names the process that started when the witness did
    assert witness.classify(Outcome("signalled", None, "777"), 0, []).kind == "reached"
    assert witness.classify(Outcome("signalled", None, "12"), 0, []).kind == "other"
    assert witness.classify(Outcome("signalled", None, ""), 0, []).kind == "unverified"
    refused = Outcome("errno", errno.EPERM, "open /proc/4242/mem")
    assert witness.classify(refused, 0, []) == refused
    assert "N" * NONCE_BYTES not in str(witness.runner_fields(0))  # the runner is never told the nonce


def test_judge_reached_is_allowed_refused_is_blocked_and_an_unreachable_witness_is_no_evidence():
    case = _proc_rows(load_policy("baseline"))["process_vm_readv-proc-mem-read"]
    reached = Outcome("reached", NONCE_BYTES, "read the witness's nonce")

    def verdict(baseline: Outcome, observed: Outcome) -> Verdict:
        return judge(case, baseline, observed, compiled=None, policy=None).verdict

    assert verdict(reached, reached) is Verdict.ALLOWED
    for refused in (errno.EPERM, errno.EACCES, errno.ENOENT, errno.ESRCH, errno.EIO):
        assert verdict(reached, Outcome.errno(refused)) is Verdict.BLOCKED
    assert verdict(reached, Outcome.killed_by(signal.SIGSYS)) is Verdict.BLOCKED
    assert verdict(reached, Outcome("other", None, "read other bytes")) is Verdict.BLOCKED
    for unproven in (Outcome("timeout"), Outcome("error", None, "runner died"), Outcome.errno(errno.EMFILE),
                     Outcome("unverified", None, "no /proc/<pid>/stat")):
        assert verdict(reached, unproven) is Verdict.INDETERMINATE
    skipped = judge(case, Outcome.errno(errno.EPERM), Outcome.errno(errno.EPERM), compiled=None, policy=None)
    assert skipped.verdict is Verdict.INDETERMINATE and skipped.reason.startswith(NOT_ON_THIS_HOST)
    failed = judge(case, Outcome("unavailable", None, "no witness"), reached, compiled=None, policy=None)
    assert failed.verdict is Verdict.INDETERMINATE and not failed.reason.startswith(NOT_ON_THIS_HOST)


def _judged(target: SandboxTarget, identity: Identity) -> dict[str, Verdict]:
    """The witness rows and their control, run the way the session runs them: one witness for the baseline run and
    the target's run, each run writing its own slot, every outcome classified against the witness."""
    cases = [*_proc_rows(load_policy("baseline")).values()]
    control = ProbeCase("own-memory-reads", "works", "own memory", extra=(("kind", "own_memory"),))
    baseline_target = SandboxTarget("baseline", None, NetworkPlacement(MODE), identity)

    def both_runs(witness):
        return [who.run([*witness_plan(cases, witness, run), control.runner_probe()])
                for run, who in enumerate((baseline_target, target))]

    reports, evidence = with_witness(identity, len(WITNESS_RUNS), both_runs)
    baseline, observed = (evidence.classified(reports[run], run, [case.case_id for case in cases]) for run in (0, 1))
    verdicts = {case.case_id: judge(case, baseline[case.case_id], observed[case.case_id], compiled=None,
                                    policy=None).verdict for case in cases}
    verdicts[control.case_id] = judge(control, reports[0][control.case_id], reports[1][control.case_id],
                                      compiled=None, policy=None).verdict
    return verdicts


IDENTITIES = [pytest.param(Identity.current(), id="caller"), pytest.param(Identity.nobody(), id="nobody")]


@ROOT_ONLY
@pytest.mark.parametrize("identity", IDENTITIES)
def test_the_reference_sandbox_refuses_every_proc_path_and_still_reads_its_own_memory(identity):
    reference = SandboxTarget("reference", compile_policy(load_policy("baseline"), MODE), NetworkPlacement(MODE),
                              identity)
    assert _judged(reference, identity) == {**dict.fromkeys(PROC_ROWS, Verdict.BLOCKED),
                                            "own-memory-reads": Verdict.WORKS}


@ROOT_ONLY
@pytest.mark.parametrize("identity", IDENTITIES)
def test_the_same_filter_without_the_landlock_domain_fails_every_proc_row(identity):
    weakened = replace(SandboxTarget("no domain", compile_policy(load_policy("baseline"), MODE),
                                     NetworkPlacement(MODE), identity), process_isolation=False)
    assert _judged(weakened, identity) == {**dict.fromkeys(PROC_ROWS, Verdict.ALLOWED),
                                           "own-memory-reads": Verdict.WORKS}


@ROOT_ONLY
def test_a_launcher_that_only_drops_privileges_fails_every_proc_row_through_the_suite():
    """``--sandbox-exec`` with setpriv (no filter, no domain; nobody): the session's own witness path, end to end."""
    launcher = "setpriv --reuid 65534 --regid 65534 --clear-groups"
    if subprocess.run(["setpriv", "--version"], capture_output=True).returncode != 0:
        pytest.skip("setpriv (util-linux) is not installed")
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sandbox", f"--sandbox-exec={launcher}",
         "-k", "proc- or signal-kill or own-memory", "-rA", "conformance/test_syscalls.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "1000"})
    failed = {line.split("[", 1)[1].split("]", 1)[0] for line in completed.stdout.splitlines()
              if line.startswith("FAILED ")}
    passed = {line.split("[", 1)[1].split("]", 1)[0] for line in completed.stdout.splitlines()
              if line.startswith("PASSED ")}
    assert {row.split("-", 3)[-1] for row in failed} == PROC_ROWS, completed.stdout[-3000:]
    assert all("read the witness's nonce" in line or "wrote into the witness" in line or "signal the witness" in line
               for line in completed.stdout.splitlines() if line.startswith("FAILED "))
    assert {row.split("-", 3)[-1] for row in passed} == {"own-memory-reads"}, completed.stdout[-3000:]


@ROOT_ONLY
def test_the_spawner_reports_its_landlock_domain_and_the_baseline_has_none():
    compiled = compile_policy(load_policy("baseline"), MODE)
    with Sandbox(SandboxSpec(compiled, NetworkPlacement(MODE))) as sandbox:
        assert sandbox.status["Landlock"].startswith("domain (ABI "), sandbox.status
    with Sandbox(SandboxSpec(None, NetworkPlacement(MODE))) as unfiltered:
        assert unfiltered.status["Landlock"] == "not asked for"


HARNESS_MEMORY = r"""
import sys
try:
    with open(f"/proc/{sys.argv[1]}/mem", "rb", buffering=0) as mem:
        print("opened")
except OSError as error:
    print(error.strerror)
"""


@ROOT_ONLY
def test_root_in_pytest_sandbox_run_cannot_open_the_memory_of_a_process_outside_it():
    """The measurement of the note that found this: root inside ``pytest-sandbox run`` opened the memory of processes
    outside the sandbox (its grandparents, pid 1). An unsandboxed process started here is outside it; the command's
    parent, the spawner, is inside the sandbox's domain."""
    outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        pid = str(outside.pid)
        unfiltered = subprocess.run([sys.executable, "-c", HARNESS_MEMORY, pid], capture_output=True, text=True,
                                    timeout=60)
        assert unfiltered.stdout.strip() == "opened", unfiltered.stdout
        sandboxed = subprocess.run([sys.executable, "-m", "pytest_sandbox.cli", "run", "--", sys.executable, "-c",
                                    HARNESS_MEMORY, pid], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert sandboxed.stdout.strip() == "Permission denied", (sandboxed.stdout, sandboxed.stderr[-2000:])
    finally:
        outside.kill()
        outside.wait()


@ROOT_ONLY
def test_a_witness_that_dies_during_the_runs_is_no_evidence(monkeypatch: pytest.MonkeyPatch):
    """Its pid then names no process, in the sandbox or out of it: ENOENT would read as BLOCKED. The session asks the
    witness for its slots after every run; without an answer the rows are INDETERMINATE, never a pass."""
    session = SandboxSession(SandboxOptions(modes=("block",), identities=("current",)))
    run = session._run

    def witness_killed_first(mode: str, identity: Identity, build: str, witness: Witness | None):  # type: ignore[no-untyped-def]
        assert witness is not None
        try:
            os.kill(witness.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return run(mode, identity, build, witness)
    monkeypatch.setattr(session, "_run", witness_killed_first)
    identity = Identity.current()
    for case in _proc_rows(load_policy("baseline")).values():
        judgement = session.judge(SyscallParam("block", identity, case, required=True))
        assert judgement.verdict is Verdict.INDETERMINATE, judgement
        assert "the witness did not answer" in judgement.reason
    assert session.judge(SyscallParam("block", identity, next(
        c for c in denial_cases(requirements_of(load_policy("baseline"), "block")) if c.case_id == "setns-native"),
        required=True)).verdict is Verdict.BLOCKED  # the rest of the run stands


@ROOT_ONLY
def test_a_witness_that_cannot_start_is_no_evidence_and_the_runs_go_on_without_it(monkeypatch: pytest.MonkeyPatch):
    """No witness (its launch failed): the runs leave the witness rows out of their plans, the rows are INDETERMINATE
    with the reason, never a pass, and every other row of the run is judged as before."""
    def cannot_start(identity: Identity, runs: int):  # type: ignore[no-untyped-def]
        raise LaunchError("no witness today")
    monkeypatch.setattr(process_witness, "running_witness", cannot_start)
    session = SandboxSession(SandboxOptions(modes=("block",), identities=("current",)))
    identity = Identity.current()
    for case in _proc_rows(load_policy("baseline")).values():
        judgement = session.judge(SyscallParam("block", identity, case, required=True))
        assert judgement.verdict is Verdict.INDETERMINATE, judgement
        assert "the witness could not be started as" in judgement.reason and "no witness today" in judgement.reason
    rows = set(_proc_rows(load_policy("baseline")))
    for build in WITNESS_RUNS:  # not attempted (nothing in a plan without a witness points at one), and no evidence
        assert not {probe["id"] for probe in session._plan("block", identity, build, None)} & rows
        assert {session.outcomes("block", identity, build)[row].kind for row in rows} == {"unavailable"}
    assert session.judge(SyscallParam("block", identity, next(
        c for c in denial_cases(requirements_of(load_policy("baseline"), "block")) if c.case_id == "setns-native"),
        required=True)).verdict is Verdict.BLOCKED


def test_the_harness_signals_only_a_child_of_the_spawner_whatever_pid_the_spawner_answered():
    """Root in the sandbox shares its spawner's domain and could make it answer another pid: killing that launch
    must then kill nothing outside (the harness would be its deputy, with the harness's privileges)."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        forged = SandboxedProcess(["forged"], victim.pid, ours, None, None, None, spawner_pid=os.getpid() + 1)
        forged.kill()
        assert victim.poll() is None  # not the spawner's child: left alone
        mine, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        genuine = SandboxedProcess(["genuine"], victim.pid, mine, None, None, None, spawner_pid=os.getpid())
        genuine.kill()  # the same pid as this process's own child: signalled
        assert victim.wait(10) == -signal.SIGKILL
        mine.close()
        other.close()
    finally:
        theirs.close()
        ours.close()
        if victim.poll() is None:
            victim.kill()
            victim.wait()
