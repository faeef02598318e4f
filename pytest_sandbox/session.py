"""One pytest run's sandbox state: the policy, the requirement, the targets and cached probe results.

Created in ``pytest_configure`` (once per process, so each xdist worker owns its own) and consulted by
the conformance tests. Probe plans run lazily, once per (network mode, identity, build), and every
test then looks up its own case: hundreds of test ids for the cost of a few runner processes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_sandbox.errors import PolicyError, SandboxError
from pytest_sandbox.policy.from_oci import resolve_capabilities
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import NETWORK_MODES, Policy
from pytest_sandbox.probes.observed_identity import (
    BaselineRequest,
    ObservedIdentity,
    baseline_request,
    identity_mismatches,
)
from pytest_sandbox.probes.process_witness import Witness, with_witness, witness_plan
from pytest_sandbox.probes.syscall import (
    ExecTarget,
    ProbeTarget,
    RunnerReport,
    SandboxTarget,
    all_capabilities,
    harness_identity,
    matched_baseline_target,
    requested_identity,
)
from pytest_sandbox.probes.syscall_cases import (
    ProbeCase,
    Requirement,
    control_cases,
    denial_cases,
    merge_requirements,
    requirements_of,
)
from pytest_sandbox.seccomp.compiler import CompiledFilter, compile_policy
from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement, check_host_support
from pytest_sandbox.verdicts.judgement import Judgement, Outcome, Verdict
from pytest_sandbox.verdicts.syscall import filter_requirement, judge, judge_both_builds, judge_exec


@dataclass(frozen=True)
class SyscallParam:
    """One parametrized conformance test: a probe case under one network mode and identity."""

    mode: str
    identity: Identity
    case: ProbeCase
    required: bool
    third_party: bool = False  # run through --sandbox-exec; the identity is what the target showed

    @property
    def test_id(self) -> str:
        """``proxy-nobody-setns-x32`` for the reference; ``exec-uid65534-nocaps-setns-x32`` for a third party,
        named after the caller its own runner reported (the target picks its network placement)."""
        return f"{'exec' if self.third_party else self.mode}-{self.identity.name}-{self.case.case_id}"


# --sandbox-watch-after: how long the proxy under test stays up after the session's last test, its lab's catch-all,
# origins and backend watched, before the session-end audit. A proxy that answers a refusal and dials or forwards
# later than that is stopped first and is seen by nothing: the window bounds every network verdict, so it is an
# option (a certification run can watch minutes) and the scorecard states it.
WATCH_AFTER_LIMIT_SECONDS = 3600.0
# One grace period (probes/campaign.py GRACE_SECONDS, which tests/test_ssrf_detection.py checks it equals): not
# imported, because this module is also imported where only the standard library is (tests/test_unprivileged.py).
WATCH_AFTER_DEFAULT_SECONDS = 0.5


@dataclass
class SandboxOptions:
    policy: str = "baseline"
    require: str | None = None
    exec_prefix: str | None = None
    proxy_cmd: str | None = None  # a third-party proxy started inside the lab: "CMD {port}"
    proxy_url: str | None = None  # a third-party proxy already reachable from inside the lab
    proxy_ca: str | None = None  # PEM of the CA that third party intercepts inference.local with
    backend_ca: str | None = None  # PEM CA (cert + key) that signs the fake backend's certificate
    modes: tuple[str, ...] = NETWORK_MODES
    identities: tuple[str, ...] = ("current", "nobody")
    caps: str | None = None  # --sandbox-caps: resolves an OCI profile's includes/excludes.caps
    watch_after: float = WATCH_AFTER_DEFAULT_SECONDS  # --sandbox-watch-after: the proxy kept up, its lab watched


@dataclass
class SandboxSession:
    options: SandboxOptions
    policy: Policy = field(init=False)
    requirement: Policy = field(init=False)
    _results: dict[tuple[str, str, str], dict[str, Outcome]] = field(default_factory=dict, init=False)
    _reports: dict[tuple[str, str, str], RunnerReport] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _failures: dict[tuple[str, str], SandboxError] = field(default_factory=dict, init=False)
    # third party (--sandbox-exec) only: who the runner is in there, and the baseline taken as that caller
    harness: ObservedIdentity | None = field(default=None, init=False)
    exec_identity: ObservedIdentity | None = field(default=None, init=False)
    _baseline_request: BaselineRequest | None = field(default=None, init=False)
    _baseline_problems: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict, init=False)
    _prefetch: threading.Thread | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_options(self.options)  # the cheap checks first: one line before any policy is read
        self.policy = load_policy(self.options.policy, self.options.caps)
        self.requirement = load_policy(self.options.require or "baseline", self.options.caps)
        for mode in () if self.third_party else self.modes():
            for sentinel in (False, True):  # a policy that cannot compile is a usage error, before any test
                compiled = self.compiled(mode, sentinel=sentinel)
                if compiled is not None and compiled.start_problem:  # one clear line, not a LaunchError per test
                    raise PolicyError(compiled.start_problem)
        if self.third_party:
            self._exec_preflight()

    # -- what is probed ----------------------------------------------------------------------

    @property
    def third_party(self) -> bool:
        return self.options.exec_prefix is not None

    def modes(self) -> tuple[str, ...]:
        # A third party's launcher decides its own network placement; the requirement's mode names
        # which socket-domain rules it must honour.
        return (self.requirement.network.mode,) if self.third_party else self.options.modes

    def identities(self) -> tuple[Identity, ...]:
        if self._baseline_request is not None:  # third party: the caller the target showed
            return (requested_identity(self._baseline_request),)
        found = [Identity.current()]
        if "nobody" in self.options.identities and os.geteuid() == 0 and not self.third_party:
            found.append(Identity.nobody())
        return tuple(found)

    def required(self, mode: str) -> tuple[Requirement, ...]:
        if self.options.require is None and not self.third_party:
            return merge_requirements(requirements_of(self.policy, mode), requirements_of(self.requirement, mode))
        return requirements_of(self.requirement, mode)

    def probed(self, mode: str) -> tuple[Requirement, ...]:
        if self.third_party:
            return self.required(mode)
        return merge_requirements(self.required(mode), requirements_of(self.policy, mode))

    def syscall_params(self, kind: str) -> list[SyscallParam]:
        params = []
        for mode in self.modes():
            required = {item.key for item in self.required(mode)}
            probed = self.probed(mode)
            cases = denial_cases(probed) if kind == "denial" else control_cases(probed, mode)
            for identity in self.identities():
                for case in cases:
                    if not may_open_setup_device(case.setup, identity):
                        continue  # a device path this caller cannot open even unfiltered: nothing to refuse
                    is_required = case.requirement is not None and case.requirement.key in required
                    params.append(SyscallParam(mode, identity, case, is_required, self.third_party))
        return params

    # -- running ------------------------------------------------------------------------------

    def compiled(self, mode: str, *, sentinel: bool) -> CompiledFilter | None:
        if self.third_party:
            return None
        return compile_policy(self.policy, mode, sentinel=sentinel)

    def _target(self, mode: str, identity: Identity, build: str) -> ProbeTarget:
        if build == "baseline" and self._baseline_request is not None:  # third party: as the caller it showed
            return matched_baseline_target(self._baseline_request)
        if build == "baseline":
            return SandboxTarget("the unfiltered baseline", None, NetworkPlacement(mode), identity)
        if self.third_party:
            assert self.options.exec_prefix is not None
            return ExecTarget(self.options.exec_prefix)
        compiled = self.compiled(mode, sentinel=build == "sentinel")
        return SandboxTarget(f"the reference sandbox ({build} build)", compiled, NetworkPlacement(mode), identity)

    def _cases(self, mode: str, build: str) -> list[ProbeCase]:
        probed = self.probed(mode)
        denials, controls = denial_cases(probed), control_cases(probed, mode)
        # Denials run on both builds: the sentinel build (unambiguous errnos) shows which rule refused,
        # the real build is the filter a sandboxed program meets. Controls run on the real build only
        # (glibc needs the real ENOSYS, the real EPERM is reported). A witness row is no rule's: its
        # evidence is whether the witness was reached, so the sentinel build does not run it.
        chosen: Sequence[ProbeCase] = {
            "baseline": (*denials, *controls),
            "sentinel": [case for case in denials if not case.witness_access],
            "real": (*denials, *controls),
        }[build]
        return [case for case in chosen if case.live]

    def _plan(self, mode: str, identity: Identity, build: str, witness: Witness | None) -> list[dict[str, Any]]:
        """The runner's plan; a witness row is in it only with a witness to reach (its fields for this run)."""
        run = WITNESS_RUNS.index(build) if build in WITNESS_RUNS else None
        return witness_plan(self._cases(mode, build), witness, run)

    def builds(self) -> tuple[str, ...]:
        """The targets every (mode, identity) runs: the unfiltered baseline, then the filter(s) judged."""
        return ("baseline", "real") if self.third_party else ("baseline", "sentinel", "real")

    def outcomes(self, mode: str, identity: Identity, build: str) -> dict[str, Outcome]:
        """The outcomes of one build's run, made once. A run that cannot be made (no host support, a
        launcher that fails, hangs or runs nothing) raises a SandboxError that is cached too: every
        later test of that (mode, identity) gets the same error at once, never a second launch or wait."""
        key = (mode, identity.name, build)
        with self._lock:
            failed = self._failures.get((mode, identity.name))
            if failed is not None:
                raise failed
            if key not in self._results:
                try:
                    self._run_builds(mode, identity)
                except SandboxError as exc:
                    self._failures[(mode, identity.name)] = exc
                    raise
            return self._results[key]

    def prefetch(self) -> None:
        """Start the reference's probe runs of every (mode, identity) in a background thread.

        The runs are other processes (runner children of the spawner), so on a second core they overlap
        the tests that come first, the network categories, whose work is in this process. Nothing is
        judged differently: :meth:`outcomes` makes each run once under its lock, whichever thread asks
        first, and a run that fails is cached as it would be for the first test. Not for a third party
        (its baseline needs the caller its runner first shows)."""
        if self.third_party or self._prefetch is not None:
            return

        def run_all() -> None:
            for mode in self.modes():
                for identity in self.identities():
                    try:
                        self.outcomes(mode, identity, "real")
                    except Exception:  # cached, or raised again for the tests, which report it
                        pass
        self._prefetch = threading.Thread(target=run_all, name="sandbox-probe-prefetch", daemon=True)
        self._prefetch.start()

    @property
    def prefetching(self) -> bool:
        """Whether :meth:`prefetch` started the background runs."""
        return self._prefetch is not None

    def finish_prefetch(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the background runs: none is left launching at exit."""
        if self._prefetch is not None:
            self._prefetch.join(timeout)

    def _run_builds(self, mode: str, identity: Identity) -> None:
        if not self.third_party:
            check_host_support(mode, identity)
        # Every judgement needs all builds of its (mode, identity): run them side by side, each is its own
        # runner process; each run's wait is bounded (ExecTarget, SandboxTarget).
        wanted = [b for b in self.builds() if (mode, identity.name, b) not in self._results]

        def side_by_side(witness: Witness | None) -> dict[str, RunnerReport]:
            with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
                runs = {b: pool.submit(self._run, mode, identity, b, witness) for b in wanted}
            return {b: run.result() for b, run in runs.items()}

        witness_rows = [case.case_id for case in self._cases(mode, "real") if case.witness_access]
        if not witness_rows:
            reports, evidence = side_by_side(None), None
        else:  # the process outside the sandbox those rows try to reach, alive for every run
            reports, evidence = with_witness(identity, len(WITNESS_RUNS), side_by_side)
        for each, report in reports.items():
            outcomes = dict(report.outcomes)
            if evidence is not None and each in WITNESS_RUNS:
                outcomes = evidence.classified(outcomes, WITNESS_RUNS.index(each), witness_rows)
            self._reports[(mode, identity.name, each)] = replace(report, outcomes=outcomes)
            self._results[(mode, identity.name, each)] = outcomes

    def _run(self, mode: str, identity: Identity, build: str, witness: Witness | None) -> RunnerReport:
        plan = self._plan(mode, identity, build, witness)
        if self.third_party and build == "baseline":
            return self._exec_baseline(mode, identity, plan)
        return self._target(mode, identity, build).run_report(plan)

    def judge(self, param: SyscallParam) -> Judgement:
        if self.third_party:
            return self._judge_exec(param)
        case = param.case
        missing = Outcome("error", None, "not run")

        def observed(build: str) -> Outcome:
            return self.outcomes(param.mode, param.identity, build).get(case.case_id, missing)

        baseline = observed("baseline")
        real = self.compiled(param.mode, sentinel=False)
        if case.kind != "denial" or case.nr is None:  # a control, or a witness row (no rule's, no sentinel run)
            return judge(case, baseline, observed("real"), compiled=real, policy=self.policy)
        sentinel = self.compiled(param.mode, sentinel=True)
        assert real is not None and sentinel is not None
        return judge_both_builds(case, baseline, observed("sentinel"), observed("real"), sentinel=sentinel,
                                 real=real, policy=self.policy)

    # -- a third party's sandbox (--sandbox-exec): the baseline is taken as the caller it showed ----------

    def _exec_preflight(self) -> None:
        """Ask the target who the runner is in there, once per session (each xdist worker asks once):
        the test ids are made from the answer, and the baseline is taken as that caller."""
        assert self.options.exec_prefix is not None
        self.harness = harness_identity()
        self.exec_identity = ExecTarget(self.options.exec_prefix).preflight()
        self._baseline_request = baseline_request(self.exec_identity, self.harness, all_capabilities())

    def _exec_baseline(self, mode: str, identity: Identity, plan: list[dict[str, Any]]) -> RunnerReport:
        request = self._baseline_request
        assert request is not None
        problems = list(request.problems)
        try:
            report = self._target(mode, identity, "baseline").run_report(plan)
        except SandboxError as exc:  # e.g. the harness is not root and the target's caller is someone else
            problems.append(f"the launcher cannot run as {request.name} here: {exc}")
            report = SandboxTarget("the unfiltered baseline as the harness", None, NetworkPlacement("allow"),
                                   Identity.current()).run_report(plan)
        self._baseline_problems[(mode, identity.name)] = tuple(problems)
        return report

    def identity_problems(self, mode: str, identity: Identity) -> tuple[str, ...]:
        """Why the baseline is not the same caller as the target's probe run (empty: it is)."""
        self.outcomes(mode, identity, "baseline")
        self.outcomes(mode, identity, "real")
        assert self.harness is not None and self.exec_identity is not None
        baseline = self._reports[(mode, identity.name, "baseline")]
        target = self._reports[(mode, identity.name, "real")]
        problems = list(self._baseline_problems.get((mode, identity.name), ()))
        if target.identity is None:
            return (*problems, f"the sandbox's runner did not say who it ran as ({target.identity_error})")
        if baseline.identity is None:
            return (*problems, f"the baseline's runner did not say who it ran as ({baseline.identity_error})")
        changed = identity_mismatches(self.exec_identity, target.identity, self.harness, ("pre-flight", "probe run"))
        if changed and not self.exec_identity.unreadable and not target.identity.unreadable:
            problems.append(f"the sandbox ran the probes as another caller than in the pre-flight "
                            f"({'; '.join(changed)})")
        problems += identity_mismatches(target.identity, baseline.identity, self.harness)
        return tuple(dict.fromkeys(problems))

    def _judge_exec(self, param: SyscallParam) -> Judgement:
        missing = Outcome("error", None, "not run")
        baseline = self.outcomes(param.mode, param.identity, "baseline").get(param.case.case_id, missing)
        observed = self.outcomes(param.mode, param.identity, "real").get(param.case.case_id, missing)
        judgement = judge_exec(param.case, baseline, observed,
                               identity_problems=self.identity_problems(param.mode, param.identity),
                               required=filter_requirement(self.requirement, param.mode))
        target = self._reports[(param.mode, param.identity.name, "real")].identity
        if param.case.kind == "status" and target is not None and self.harness is not None:
            return replace(judgement, reason=f"{judgement.reason}; the runner in the sandbox reports "
                                             f"{target.describe(self.harness)}")
        return judgement


IDENTITIES = ("current", "nobody")
# The runs that attempt the witness rows, each with its own write slot in the witness.
WITNESS_RUNS = ("baseline", "real")


def check_options(options: SandboxOptions) -> None:
    """Every option that names something, checked at startup: PolicyError (one line naming the option
    and the fix), never a surprise after the run or an option silently ignored."""
    if options.proxy_cmd is not None and "{port}" not in options.proxy_cmd:
        raise PolicyError("--sandbox-proxy-cmd must contain {port}: the lab chooses the port the proxy listens on")
    if options.proxy_ca is not None and options.proxy_cmd is None and options.proxy_url is None:
        raise PolicyError("--sandbox-proxy-ca is the CA of a third-party proxy: give --sandbox-proxy-cmd or "
                          "--sandbox-proxy too (the reference proxy intercepts with the session's own CA)")
    if options.backend_ca is not None:
        if options.proxy_cmd is None and options.proxy_url is None:
            raise PolicyError("--sandbox-backend-ca is for a third-party proxy's interception: give --sandbox-proxy "
                              "or --sandbox-proxy-cmd too (the reference proxy trusts the session's backend CA)")
        from pytest_sandbox.network.third_party import BackendCaError, load_backend_ca
        try:
            load_backend_ca(options.backend_ca)
        except BackendCaError as exc:
            raise PolicyError(f"--sandbox-backend-ca {exc}") from None
    if options.proxy_url is not None and options.proxy_ca is not None and options.backend_ca is None:
        raise PolicyError("--sandbox-proxy URL with --sandbox-proxy-ca needs --sandbox-backend-ca FILE too: a proxy "
                          "started before the session cannot otherwise know the CA of the fake backend it forwards "
                          "to (make one with 'python -m pytest_sandbox.network.third_party backend-ca DIR')")
    if options.proxy_cmd is not None and options.proxy_url is not None:
        raise PolicyError("give either --sandbox-proxy or --sandbox-proxy-cmd, not both")
    if not options.modes:
        raise PolicyError(f"--sandbox-modes is empty; give one or more of {', '.join(NETWORK_MODES)}")
    for mode in options.modes:
        if mode not in NETWORK_MODES:
            raise PolicyError(f"--sandbox-modes: unknown network mode {mode!r}; use {', '.join(NETWORK_MODES)}")
    if not options.identities:
        raise PolicyError(f"--sandbox-identities is empty; give one or more of {', '.join(IDENTITIES)}")
    for identity in options.identities:
        if identity not in IDENTITIES:
            raise PolicyError(f"--sandbox-identities: unknown identity {identity!r}; use current and/or nobody "
                              "(uid 65534), comma-separated")
    if not 0 <= options.watch_after <= WATCH_AFTER_LIMIT_SECONDS:  # NaN fails both comparisons
        raise PolicyError(f"--sandbox-watch-after {options.watch_after}: give the seconds to keep watching the lab "
                          f"after the last test, from 0 to {WATCH_AFTER_LIMIT_SECONDS:.0f}")
    resolve_capabilities(options.caps)  # --sandbox-caps: a set name or CAP_* names, even for a TOML policy
    if options.exec_prefix is not None:
        ExecTarget(options.exec_prefix).argv  # noqa: B018  (a missing launcher or bad quoting: one line now)


def may_open_setup_device(setup: Sequence[str], identity: Identity) -> bool:
    """Whether ``identity`` may open the device a probe's ``open:<device>`` setup step opens (True without one):
    the device exists here and its mode lets this caller read and write it (uid 0 always, as the kernel's
    CAP_DAC_OVERRIDE does). A row this caller could not open unfiltered would prove nothing, so it is not planned;
    one that still meets no device in its baseline run is skipped (verdicts.syscall.NOT_ON_THIS_HOST)."""
    devices = [step.partition(":")[2] for step in setup if step.startswith("open:")]
    if not devices:
        return True
    uid = os.geteuid() if identity.uid is None else identity.uid
    gids = {os.getegid(), *os.getgroups()} if identity.uid is None else {identity.gid, *(identity.groups or ())}
    for device in devices:
        try:
            info = os.stat(device)
        except OSError:
            return False
        if uid == 0:
            continue
        shift = 6 if info.st_uid == uid else 3 if info.st_gid in gids else 0
        if (info.st_mode >> shift) & 0o6 != 0o6:
            return False
    return True


def failure_message(param: SyscallParam, judgement: Judgement) -> str:
    """The one line a red test shows: ``syscall pidfd_getfd via x32 ABI: ALLOWED, expected ...``."""
    where = f"--sandbox-exec target, {param.mode}-mode rules" if param.third_party else f"{param.mode} mode"
    return (f"{param.case.title} [{where}, as {param.identity.name}]: {judgement.verdict.value}, "
            f"expected {judgement.expected} (baseline {judgement.baseline}, observed {judgement.observed}) "
            f"- {judgement.reason}")


def outcome_for_test(param: SyscallParam, judgement: Judgement) -> tuple[str, str]:
    """("pass" | "fail" | "skip", message). INDETERMINATE never passes; required ones fail."""
    if judgement.verdict in (Verdict.BLOCKED, Verdict.WORKS):
        return "pass", judgement.reason
    if judgement.verdict is Verdict.INDETERMINATE:
        if param.required or param.case.kind != "denial":
            return "fail", "not proven: " + failure_message(param, judgement)
        return "skip", "INDETERMINATE (not required): " + failure_message(param, judgement)
    return "fail", failure_message(param, judgement)
