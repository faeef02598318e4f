"""The syscall conformance category's I/O: running probe plans in the reference sandbox or a third party's.

Data flow (one way): a policy and a requirement become :class:`Requirement` items and
:class:`ProbeCase`\\ s (probes/syscall_cases.py, pure); a :class:`ProbeTarget` runs a whole plan in one
runner process; the judges (verdicts/syscall.py, pure) compare the filtered result with the unfiltered
baseline taken on the same host, uid, namespace and ABI. For a third party's
launcher (:class:`ExecTarget`) the runner's own report says who it ran as, the baseline is taken as
that caller, and :func:`judge_exec` refuses to credit a refusal the kernel gives that caller anyway.
"""

from __future__ import annotations

import functools
import json
import marshal
import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from pytest_sandbox import guardian
from pytest_sandbox.errors import HostUnsupportedError, LaunchError
from pytest_sandbox.probes.observed_identity import BaselineRequest, ObservedIdentity
from pytest_sandbox.probes.syscall_runner import whoami
from pytest_sandbox.seccomp.bpf_eval import AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, run_stack
from pytest_sandbox.seccomp.compiler import CompiledFilter
from pytest_sandbox.seccomp.launcher import FreshNamespaces, Identity, NetworkPlacement, Sandbox, SandboxSpec
from pytest_sandbox.verdicts.judgement import Outcome

# A third party's launcher is waited for with a bound, once per target: the pre-flight (an empty plan) and
# one probe run (the whole plan in one runner process, ~1 s on the reference). A launcher that hangs costs
# at most their sum for the whole category, never a wait per test (issue #10 item 3).
PREFLIGHT_TIMEOUT_SECONDS = 15.0
EXEC_RUN_TIMEOUT_SECONDS = 30.0
REFERENCE_RUN_TIMEOUT_SECONDS = 120.0  # the reference's own spawner: ~1 s idle, far more on a loaded CI box
_RUNNER_SOURCE = (resources.files("pytest_sandbox.probes") / "syscall_runner.py").read_text()


# --------------------------------------------------------------------------------------------
# Running plans


def runner_script(probes: Sequence[Mapping[str, Any]], *, one_per_child: bool = False) -> bytes:
    """The probe runner's source with the plan appended: everything a bare ``python3 -`` needs.
    ``one_per_child`` forks a child for every probe instead of reusing one across refused calls."""
    # A Python literal (plan values are str/int/bool/None/list/dict), so the runner needs no json import.
    plan = [dict(probe) for probe in probes]
    mode = ", True" if one_per_child else ""  # the default script is byte for byte what a third party always got
    return (_RUNNER_SOURCE + f"\nmain({plan!r}{mode})\n").encode()


# The reference sandbox's runner start: the runner compiled once per session and sent with the plan as
# marshal data on stdin, so a runner process neither parses 300 lines of source nor a plan literal (a
# third of its start-up). Code objects are marshalled per interpreter version: only for the harness's own
# interpreter; any other python3 (and every --sandbox-exec target) gets the source (runner_script).
_BOOTSTRAP = ("import marshal,sys;c,p,o=marshal.loads(sys.stdin.buffer.read());g={'__name__':'__runner__'};"
              "exec(marshal.loads(c),g);g['main'](p,o)")


@functools.lru_cache(maxsize=4)
def _compiled_runner(source: str) -> bytes:
    return marshal.dumps(compile(source, "syscall_runner.py", "exec", dont_inherit=True))


def runner_command(interpreter: str, probes: Sequence[Mapping[str, Any]], *, one_per_child: bool = False
                   ) -> tuple[list[str], bytes]:
    """argv and stdin that run the probe runner on ``probes`` with ``interpreter``."""
    if interpreter != sys.executable:
        return [interpreter, "-S", "-"], runner_script(probes, one_per_child=one_per_child)
    plan = [dict(probe) for probe in probes]
    return [interpreter, "-S", "-c", _BOOTSTRAP], marshal.dumps((_compiled_runner(_RUNNER_SOURCE), plan,
                                                                 one_per_child))


@dataclass(frozen=True)
class RunnerReport:
    """What one runner process said: an outcome per probe id, and who it ran as."""

    outcomes: dict[str, Outcome]
    identity: ObservedIdentity | None
    identity_error: str = ""


KILL_ACTIONS = frozenset({"kill_process", "kill_thread"})


def _call_registers(probe: Mapping[str, Any]) -> list[int] | None:
    """The argument registers the runner loads for a plain i386 or x32 probe (a socketcall's block address, which
    only the runner knows, as 0); None for anything else."""
    if probe.get("kind", "syscall") != "syscall" or probe.get("abi") not in ("i386", "x32") or probe.get("setup") \
            or probe.get("control") or not all(type(a) is int for a in probe.get("args", ())):
        return None
    args = [int(a) for a in probe["args"]]
    if probe.get("mux") == "socketcall":
        args = [int(probe.get("call", 0)), 0]
    elif probe.get("mux"):
        return None
    return [a & 0xFFFF_FFFF_FFFF_FFFF for a in args]


def expect_kills(probes: Sequence[Mapping[str, Any]], compiled: CompiledFilter) -> list[dict[str, Any]]:
    """``probes`` with ``expect_kill`` on each plain i386 or x32 call that ``compiled``'s programs KILL (the
    harness's own BPF evaluation of the filter it loads). The runner may then attempt it first in a child that
    shares its memory and takes only a real death by SIGSYS as the outcome (probes/syscall_runner.py
    ``quick_kill``): the expectation chooses how the call is made, never what it returns. Pure."""
    marked = []
    for probe in probes:
        registers = _call_registers(probe)
        x32 = probe.get("abi") == "x32"
        expected = registers is not None and run_stack(
            compiled.programs, int(probe["nr"]) | X32_SYSCALL_BIT if x32 else int(probe["nr"]),
            AUDIT_ARCH_X86_64 if x32 else AUDIT_ARCH_I386, registers).action in KILL_ACTIONS
        marked.append({**probe, "expect_kill": True} if expected else dict(probe))
    return marked


def _runner_records(stdout: bytes) -> list[dict[str, Any]]:
    """The runner's JSON lines; anything else a launcher printed on stdout is ignored, never raised."""
    records = []
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def parse_runner_output(stdout: bytes) -> dict[str, Outcome]:
    return parse_runner_report(stdout).outcomes


def parse_runner_report(stdout: bytes) -> RunnerReport:
    results: dict[str, Outcome] = {}
    identity: ObservedIdentity | None = None
    error = "the runner printed no identity record"
    for record in _runner_records(stdout):
        if isinstance(record.get("identity"), dict) and identity is None:
            identity = ObservedIdentity.from_report(record["identity"])
            error = ""
        elif "identity_error" in record:
            error = f"the runner could not say who it is: {record['identity_error']}"
        elif isinstance(record.get("id"), str) and isinstance(record.get("outcome"), dict):
            results[record["id"]] = Outcome.from_report(record["outcome"])
    return RunnerReport(results, identity, error)


def _world_executable(path: str) -> bool:
    current = Path(path).resolve()
    for part in [current, *current.parents]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH:
            return False
    return True


def runner_interpreter(identity: Identity) -> str:
    """A python3 the probe runner's identity can execute (a root-only pyenv is not one)."""
    if identity.uid is None or _world_executable(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(candidate) and _world_executable(candidate):
            return candidate
    raise HostUnsupportedError(f"no python3 executable by {identity.name}; install python3 system-wide")


def harness_identity() -> ObservedIdentity:
    """Who the harness itself is (the same report the runner gives from inside a target)."""
    return ObservedIdentity.from_report(whoami())


def all_capabilities() -> int:
    """Every capability this kernel knows (capabilities(7): /proc/sys/kernel/cap_last_cap)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            return (1 << (int(handle.read()) + 1)) - 1
    except (OSError, ValueError):
        return (1 << 41) - 1  # CAP_CHECKPOINT_RESTORE (40) is the last one as of Linux 6.x


def requested_identity(request: BaselineRequest) -> Identity:
    return Identity(request.name, request.uid, request.gid, request.groups, request.capabilities,
                    request.bounding, request.no_new_privs)


def matched_baseline_target(request: BaselineRequest) -> SandboxTarget:
    """The unfiltered baseline run as the caller a third party's runner reported (:mod:`observed_identity`)."""
    identity = requested_identity(request)
    fresh = FreshNamespaces(request.fresh_namespaces, request.uid_map, request.gid_map, request.setgroups)
    return SandboxTarget(f"the unfiltered baseline as {request.name}", None, NetworkPlacement("allow"), identity,
                         fresh)


class ProbeTarget(Protocol):
    name: str

    def run(self, probes: Sequence[Mapping[str, Any]]) -> dict[str, Outcome]: ...

    def run_report(self, probes: Sequence[Mapping[str, Any]]) -> RunnerReport: ...


def _report_or_error(probes: Sequence[Mapping[str, Any]], returncode: int, stdout: bytes, stderr: bytes,
                     where: str) -> RunnerReport:
    report = parse_runner_report(stdout)
    results = report.outcomes
    missing = [p["id"] for p in probes if p["id"] not in results]
    if missing:
        detail = f"the probe runner in {where} exited with {returncode} and reported {len(results)} of " \
                 f"{len(probes)} probes: {stderr.decode(errors='replace').strip()[-400:]}"
        for probe_id in missing:
            results[probe_id] = Outcome("error", None, detail)
    return report


@dataclass
class SandboxTarget:
    """The reference sandbox (or the unfiltered baseline when ``compiled`` is None) via the launcher."""

    name: str
    compiled: CompiledFilter | None
    placement: NetworkPlacement
    identity: Identity
    namespaces: FreshNamespaces = field(default_factory=FreshNamespaces)
    one_per_child: bool = False  # the runner's reference mode: a fresh child for every probe
    process_isolation: bool = True  # off only for the weakened launcher tests/test_witness_paths.py measures

    def run(self, probes: Sequence[Mapping[str, Any]]) -> dict[str, Outcome]:
        return self.run_report(probes).outcomes

    def run_report(self, probes: Sequence[Mapping[str, Any]]) -> RunnerReport:
        spec = SandboxSpec(self.compiled, self.placement, self.identity, self.namespaces, self.process_isolation)
        if self.compiled is not None and not self.one_per_child:
            probes = expect_kills(probes, self.compiled)
        argv, script = runner_command(runner_interpreter(self.identity), probes, one_per_child=self.one_per_child)
        with Sandbox(spec) as sandbox:
            result = sandbox.run(argv, input=script,
                                 timeout=REFERENCE_RUN_TIMEOUT_SECONDS, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
        if result.timed_out:  # its process group was killed; a partial report would judge half a run
            raise LaunchError(f"{self.name}: the probe run ({len(probes)} probes in one runner) did not finish in "
                              f"{REFERENCE_RUN_TIMEOUT_SECONDS:g} s and was killed; nothing was judged")
        return _report_or_error(probes, result.returncode, result.stdout, result.stderr, self.name)


@dataclass
class ExecTarget:
    """A third party's launcher: ``PREFIX python3 -S -`` with the runner on stdin (``--sandbox-exec``)."""

    prefix: str
    name: str = "exec"
    interpreter: str = "python3"

    @cached_property
    def argv(self) -> list[str]:
        try:
            words = shlex.split(self.prefix)
        except ValueError as exc:  # e.g. "No closing quotation"
            raise LaunchError(f"--sandbox-exec {self.prefix!r}: cannot split it into words ({exc}); quote it "
                              "as a shell would") from None
        if not words:
            raise LaunchError("--sandbox-exec is empty: give the launcher prefix, e.g. 'bwrap --dev-bind / / --'")
        if shutil.which(words[0]) is None:
            raise LaunchError(f"--sandbox-exec: launcher {words[0]!r} not found on PATH")
        return [*words, self.interpreter, "-S", "-"]

    def run(self, probes: Sequence[Mapping[str, Any]]) -> dict[str, Outcome]:
        return self.run_report(probes).outcomes

    def run_report(self, probes: Sequence[Mapping[str, Any]], timeout: float = EXEC_RUN_TIMEOUT_SECONDS
                   ) -> RunnerReport:
        """Run the whole plan in one runner process inside the launcher. Raises LaunchError (nothing was
        probed) when the launcher cannot start, hangs past ``timeout`` (the guardian kills it and everything
        it forked) or exits without the runner saying anything at all."""
        where = f"--sandbox-exec '{self.prefix}'"
        try:
            # A third party's filter may answer a call with an errno after a supervisor acted on it
            # (SECCOMP_RET_USER_NOTIF, syscalls.md §3 "Others"), so "a refused call changed nothing", which
            # lets the reference's runner reuse a child across refusals, is not ours to assume here: one fresh
            # child per probe, as syscalls.md §4 "Isolation" says.
            completed = guardian.run(self.argv, input=runner_script(probes, one_per_child=True), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{where}: the probe run ({len(probes)} probes in one runner) did not finish in "
                              f"{timeout:g} s; the launcher and everything it started were killed and nothing "
                              "was judged") from None
        except OSError as exc:
            raise LaunchError(f"{where}: cannot start the launcher: {exc.strerror}") from None
        if probes and not parse_runner_report(completed.stdout).outcomes \
                and parse_runner_report(completed.stdout).identity is None:
            # The runner never started in there (it reports who it is before any probe): an exit at once
            # is a target that ran nothing, never a row of results (issue #10 item 4).
            said = completed.stderr.decode(errors="replace").strip()[-400:] or "nothing on stderr"
            raise LaunchError(f"{where}: the launcher exited with {completed.returncode} and reported 0 of "
                              f"{len(probes)} probes; nothing was probed; the launcher said: {said}")
        report = _report_or_error(probes, completed.returncode, completed.stdout, completed.stderr,
                                  f"'{self.prefix}'")
        return report

    def preflight(self, timeout: float = PREFLIGHT_TIMEOUT_SECONDS) -> ObservedIdentity:
        """Start the runner once with no probes: who does it run as in there? Raises LaunchError with the
        reason when the launcher is missing, fails, hangs or the runner says nothing."""
        where = f"--sandbox-exec '{self.prefix}'"
        try:
            completed = guardian.run(self.argv, input=runner_script([]), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"{where}: the identity pre-flight (the probe runner with no probes) did not "
                              f"finish in {timeout:g} s; nothing was probed") from None
        except OSError as exc:
            raise LaunchError(f"{where}: cannot start the launcher: {exc.strerror}") from None
        report = parse_runner_report(completed.stdout)
        if report.identity is None:
            said = completed.stderr.decode(errors="replace").strip()[-400:] or "nothing on stderr"
            raise LaunchError(f"{where}: the identity pre-flight exited with {completed.returncode} and the probe "
                              f"runner did not report who it runs as ({report.identity_error}); the launcher "
                              f"said: {said}")
        return report.identity

