"""The syscall category's judges: a probe case's expected refusal and its verdict. Pure.

:func:`judge` compares a filtered result with the unfiltered baseline taken on the same host, uid,
namespace and ABI (verdicts.judgement); for the reference sandbox the expected refusal comes from the
same plan that built the filter (exact, with this build's errnos), for a third party's sandbox from the
requirement: the refusal the rule names, or any other refusal of the call by a filter (EPERM, ENOSYS,
SIGSYS). Why ENOSYS counts where the requirement names EPERM: a filter answering ENOSYS refuses the call
just as surely (the caller sees it fail, nothing reaches the kernel), Podman's profiles answer every
refused call with ENOSYS (``defaultErrnoRet: 38``) and bubblewrap-built filters do too; the verdict
still needs the unfiltered kernel to answer something else, and the reason says the errno differs.
:func:`judge_exec` refuses to credit a refusal the kernel gives a third party's caller anyway.
"""

from __future__ import annotations

import errno as errno_module
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes.syscall_cases import BY_EVALUATION, GENERIC_REFUSALS, ProbeCase, requirements_of
from pytest_sandbox.seccomp.compiler import CompiledFilter
from pytest_sandbox.seccomp.filter_plan import Action, plan_policy
from pytest_sandbox.verdicts.judgement import (
    Judgement,
    Outcome,
    Verdict,
    describe_set,
    judge_denial,
    judge_reaches_kernel,
    judge_works,
)

_PLAN_ARCH = {"native": "native", "x32": "x32", "i386": "x86"}
_ENOSYS = Outcome.errno(errno_module.ENOSYS)


def outcome_of(action: Action, compiled: CompiledFilter, arch: str = "native") -> Outcome | None:
    """What a probe observes when the filter returns ``action`` (None: the call goes through)."""
    if action.kind == "errno":
        number = compiled.errno_for(action.slot or "", arch)
        return Outcome.errno(number) if number is not None else None
    if action.kind in ("kill_process", "kill_thread", "trap"):
        return Outcome.killed_by(signal.SIGSYS)  # kill_process, kill_thread and trap all end in SIGSYS
    if action.kind == "trace":
        # seccomp(2) SECCOMP_RET_TRACE: "If there is no tracer present, the system call is not executed
        # and returns a failure status with errno set to ENOSYS." No probe runner is ever traced.
        return _ENOSYS
    return None  # allow, log


def _plan_outcomes(case: ProbeCase, compiled: CompiledFilter, policy: Policy) -> set[Outcome | None]:
    """What the plan that built ``compiled`` says this attempt meets (None in the set: it goes through)."""
    numeric = tuple(a if isinstance(a, int) else 0 for a in case.args)
    arch = _PLAN_ARCH[case.abi]
    actions = plan_policy(policy, compiled.network_mode).results(case.attempted, numeric, arch,
                                                                 multiplexed=bool(case.via),
                                                                 version=case.mux_call >> 16)
    return {outcome_of(action, compiled, arch) for action in actions}


def expected_refusal(case: ProbeCase, compiled: CompiledFilter | None, policy: Policy | None) -> frozenset[Outcome]:
    """E for one denial case: exact when we compiled the filter ourselves (from the same plan that built
    it, with this build's errnos), from the requirement otherwise: its own refusal or any refusal of
    the call by a filter (syscall_cases.GENERIC_REFUSALS)."""
    item = case.requirement
    assert item is not None
    if compiled is None or policy is None or not compiled.programs:  # (no programs: nothing can refuse)
        if case.abi == "x32" and item.own_refusal != _ENOSYS:
            # A kernel built without the x32 ABI answers every x32 call with ENOSYS itself: there a
            # filter's ENOSYS cannot be told from the kernel's (judge_denial reports that case).
            return item.refusal - {_ENOSYS}
        return item.refusal
    outcomes = _plan_outcomes(case, compiled, policy)
    if None in outcomes:  # the filter lets this form through: any refusal would have to come from elsewhere
        return item.refusal
    return frozenset(o for o in outcomes if o is not None)


def _path_refused_outright(case: ProbeCase, policy: Policy) -> str:
    """Why the policy refuses a foreign-ABI path whatever the arguments (for a control's reason)."""
    seccomp = policy.seccomp
    if "x86" not in seccomp.extra_arches:
        return f"the policy refuses the whole i386 ABI (bad_arch_action {seccomp.bad_arch_action})"
    return (f"with extra_arches x86, libseccomp turns every rule on {case.syscall} into {case.via}(call == "
            f"{case.mux_call}), which cannot read the arguments behind the pointer, so the policy refuses every "
            f"{case.syscall} through {case.via}")


def judge_multiplexed_control(case: ProbeCase, baseline: Outcome, observed: Outcome, *,
                              compiled: CompiledFilter | None, policy: Policy | None) -> Judgement:
    """A positive control through an i386 multiplexer (``socketcall(SYS_SOCKET, [AF_UNIX, bad type])``).

    It must reach the kernel, unless the filter refuses the whole path whatever the arguments: that is
    a refusal of a legacy path, not an argument rule aimed wrong (the denial rows on the path then show
    that blanket refusal). For our own build the plan says which, exactly; for a third party's a refusal
    of the path (EPERM, ENOSYS, SIGSYS, where unfiltered the kernel answers something else) is reported
    as such, anything else that differs from the baseline is BROKEN."""
    r, b = observed.describe(), baseline.describe()
    if compiled is not None and policy is not None and compiled.programs:
        outcomes = _plan_outcomes(case, compiled, policy)
        if None not in outcomes:
            expected = frozenset(o for o in outcomes if o is not None)
            why = _path_refused_outright(case, policy)
            if any(observed.same_as(x) for x in expected):
                return Judgement(Verdict.WORKS, f"refused outright as the policy says ({r}): {why}",
                                 describe_set(expected), r, baseline=b)
            return Judgement(Verdict.BROKEN, f"expected the refusal the policy gives this path ({why}), observed "
                             f"{r}", describe_set(expected), r, baseline=b)
        return judge_reaches_kernel(baseline, observed)
    judgement = judge_reaches_kernel(baseline, observed)
    if judgement.verdict is Verdict.BROKEN and any(observed.same_as(x) for x in GENERIC_REFUSALS):
        return Judgement(Verdict.WORKS, f"the sandbox refuses i386 {case.via}({case.mux_call}) outright ({r}, "
                         f"unfiltered {b}): its denial rows on this path show that blanket refusal, not an "
                         "argument rule", "same as baseline, or the path refused outright", r, baseline=b)
    return judgement


# The start of the reason of a device-path row the caller cannot use even unfiltered (no such device on this host,
# or not this caller's to open): nothing there to refuse, so the row is skipped, not judged (fixtures/conformance).
NOT_ON_THIS_HOST = "no such path for this caller here"


def judge_device_path(case: ProbeCase, baseline: Outcome, observed: Outcome) -> Judgement | None:
    """A device-path row (syscall_cases.device_path_cases) whose device did not open in one of the runs, else None.

    Unfiltered it did not open: :data:`NOT_ON_THIS_HOST` (the kernel predates the device, or the caller may not open
    it: /dev/userfaultfd is root's, mode 0600). Only in the sandbox: BLOCKED, the sandbox's own /dev has no such
    device for this caller (bubblewrap's ``--dev``, firejail's ``--private-dev``, an OCI runtime's /dev)."""
    b, r = baseline.describe(), observed.describe()
    expected = "refused: the device cannot be opened, or its ioctl is refused"
    if baseline.kind == "no_path":
        return Judgement(Verdict.INDETERMINATE, f"{NOT_ON_THIS_HOST}: unfiltered this caller {b}, so there is no "
                         f"{case.title} to refuse", expected, r, baseline=b)
    if observed.kind == "no_path":
        return Judgement(Verdict.BLOCKED, f"the sandbox offers no such device ({r}); unfiltered this caller opens it "
                         f"and its ioctl answers {b}", expected, r, baseline=b)
    return None


# How the kernel answers a path the sandbox keeps from the witness: the open, the access or the signal is refused
# (EACCES from mm_access, EPERM from ptrace_may_access or a signal's permission check under a Landlock domain or a
# missing capability), the pid names no process in the sandbox's /proc or PID namespace (ENOENT, ESRCH), or another
# process without the witness's mapping there (EIO).
_WITNESS_REFUSALS = frozenset(Outcome.errno(number) for number in (errno_module.EPERM, errno_module.EACCES,
                                                                   errno_module.ENOENT, errno_module.ESRCH,
                                                                   errno_module.EIO))


def judge_witness_path(case: ProbeCase, baseline: Outcome, observed: Outcome) -> Judgement:
    """A witness row (syscall_cases.witness_path_case) against the witness, a process outside the sandbox run as
    the same caller (probes/process_witness.py). The baseline must reach it (unfiltered, this caller reads its nonce,
    writes its slot or may signal it), else there is nothing to refuse here (:data:`NOT_ON_THIS_HOST`). Then: reached
    from the sandbox -> ALLOWED; refused, no such process, or some other process -> BLOCKED; anything else (the probe
    did not run, a timeout, a permitted signal to a pid no /proc shows) -> INDETERMINATE, never a pass."""
    b, r = baseline.describe(), observed.describe()
    expected = "the witness not reached: refused, or no such process in the sandbox"
    if baseline.kind in ("unavailable", "error"):
        return Judgement(Verdict.INDETERMINATE, f"not attempted: {b}", expected, r, baseline=b)
    if baseline.kind != "reached":
        return Judgement(Verdict.INDETERMINATE, f"{NOT_ON_THIS_HOST}: unfiltered this caller does not reach the "
                         f"witness either ({b}), so there is no {case.title} to refuse", expected, r, baseline=b)
    if observed.kind == "reached":
        return Judgement(Verdict.ALLOWED, f"from the sandbox, this caller {observed.detail}: the cross-process "
                         f"access the policy denies {case.syscall} for, by another path", expected, r, baseline=b)
    if any(observed.same_as(x) for x in _WITNESS_REFUSALS) or observed.same_as(Outcome.killed_by(signal.SIGSYS)):
        return Judgement(Verdict.BLOCKED, f"refused: {r} ({observed.detail}); unfiltered this caller {baseline.detail}",
                         expected, r, baseline=b)
    if observed.kind == "other":
        return Judgement(Verdict.BLOCKED, f"the pid names another process in the sandbox: {observed.detail}; "
                         f"unfiltered this caller {baseline.detail}", expected, r, baseline=b)
    return Judgement(Verdict.INDETERMINATE, f"observed {r}: neither the witness reached nor a refusal", expected, r,
                     baseline=b)


def judge(case: ProbeCase, baseline: Outcome, observed: Outcome, *, compiled: CompiledFilter | None,
          policy: Policy | None) -> Judgement:
    if case.kind == "denial":
        if case.witness_access:
            return judge_witness_path(case, baseline, observed)
        if case.nr is None:
            return Judgement(Verdict.INDETERMINATE, "no harmless probe for this syscall in the catalogue; "
                             "add a row to pytest_sandbox/catalogues/syscalls.py", "refusal", "-")
        if case.call and (device := judge_device_path(case, baseline, observed)) is not None:
            return device
        judgement = judge_denial(expected_refusal(case, compiled, policy), baseline, observed, abi=case.abi)
        item = case.requirement
        assert item is not None
        if compiled is None and judgement.verdict is Verdict.BLOCKED and not observed.same_as(item.own_refusal):
            return replace(judgement, reason=f"{judgement.reason}; the requirement names "
                           f"{item.own_refusal.describe()}, and {observed.describe()} from a filter refuses the "
                           "call as well (the caller sees it fail)")
        return judgement
    if case.kind == "reaches_kernel":
        if case.via:
            return judge_multiplexed_control(case, baseline, observed, compiled=compiled, policy=policy)
        return judge_reaches_kernel(baseline, observed)
    if case.kind == "status":
        return judge_filter_present(observed, compiled)
    return judge_works(observed, what=case.title)


@dataclass(frozen=True)
class UnprobedEvaluation:
    """The read-back evaluation for one syscall with no live probe: every point (ABI, argument class) where
    a requirement refuses it and the loaded filter does not (``holes``), how many points the requirement
    refuses it at (``refused_points``), and whether the exploration of its argument classes finished."""

    holes: tuple[str, ...]
    refused_points: int
    complete: bool
    loaded: str  # what was read back


def judge_unprobed(case: ProbeCase, evaluation: UnprobedEvaluation | None, why_not: str = "") -> Judgement:
    """A denial row with no harmless live probe (a denylist naming chmod). Formed from the read-back
    evaluation of the filter loaded in the same target (category syscall-evaluation), never from nothing:
    BLOCKED when the evaluation ran, the requirement refuses the call at one point at least, and the loaded
    filter refuses it at every such point; ALLOWED naming each point it lets run; INDETERMINATE (a
    failure) when no evaluation could be made (``why_not``) or its exploration hit its bound."""
    expected = f"refused by the loaded filter wherever the requirement refuses {case.syscall} (evaluation)"
    if evaluation is None:
        return Judgement(Verdict.INDETERMINATE, f"no harmless live probe for {case.syscall} in the catalogue, and no "
                         f"read-back evaluation: {why_not or 'not available'}; add a row to "
                         "pytest_sandbox/catalogues/syscalls.py or make the read-back possible", expected, "-")
    note = f"covered by {BY_EVALUATION}"
    if evaluation.holes:
        return Judgement(Verdict.ALLOWED, f"{note}: the loaded filter lets {case.syscall} run where the requirement "
                         "refuses it: " + "; ".join(evaluation.holes), expected, evaluation.loaded)
    if not evaluation.refused_points:
        return Judgement(Verdict.INDETERMINATE, f"{note}: the evaluation finds no point where the requirement "
                         f"refuses {case.syscall}, so it proves nothing about it", expected, evaluation.loaded)
    if not evaluation.complete:
        return Judgement(Verdict.INDETERMINATE, f"{note}: no hole found, but the argument classes of "
                         f"{case.syscall} exceeded the exploration bound", expected, evaluation.loaded)
    return Judgement(Verdict.BLOCKED, f"{note}: the loaded filter refuses {case.syscall} at all "
                     f"{evaluation.refused_points} point(s) (ABI, argument class) where the requirement refuses "
                     "it", expected, evaluation.loaded)


def judge_both_builds(case: ProbeCase, baseline: Outcome, sentinel_observed: Outcome, real_observed: Outcome, *,
                      sentinel: CompiledFilter, real: CompiledFilter, policy: Policy) -> Judgement:
    """A denial of the reference sandbox, proven on both builds of one plan.

    The sentinel build says *which rule* refused (its errnos exist nowhere else); the real build is the
    filter users get. BLOCKED needs both: the sentinel run shows the rule fired, and the real run is
    refused exactly as the policy says. Where the real refusal equals the unfiltered kernel's answer
    (EPERM for an unprivileged pivot_root) the real run cannot tell filter from kernel, so the sentinel
    evidence stands alone, and the reason says so."""
    if case.call and baseline.kind == "no_path":  # no such path for this caller: nothing for either build to refuse
        return judge(case, baseline, real_observed, compiled=real, policy=policy)
    on_sentinel = judge(case, baseline, sentinel_observed, compiled=sentinel, policy=policy)
    on_real = judge(case, baseline, real_observed, compiled=real, policy=policy)
    s, r, b = sentinel_observed.describe(), real_observed.describe(), baseline.describe()

    def verdict(v: Verdict, reason: str) -> Judgement:
        return Judgement(v, reason, f"sentinel build: {on_sentinel.expected}; real build: {on_real.expected}",
                         f"sentinel build: {s}; real build: {r}", baseline=b)

    if on_sentinel.verdict is not Verdict.BLOCKED:
        return verdict(on_sentinel.verdict, f"sentinel build: {on_sentinel.reason}")
    if real_observed.succeeded:  # whatever the baseline: the filter users get let the call through
        return verdict(Verdict.ALLOWED, f"real build: the call succeeded ({r}) where the policy requires a refusal "
                                        f"(the sentinel build refused with {s})")
    if on_real.verdict is Verdict.BLOCKED:
        return verdict(Verdict.BLOCKED, f"refused by both builds: {s} by the sentinel build, {r} by the real "
                                        f"build; unfiltered the kernel answers {b}")
    real_refusals = expected_refusal(case, real, policy)
    if any(real_observed.same_as(x) for x in real_refusals) and any(baseline.same_as(x) for x in real_refusals):
        return verdict(Verdict.BLOCKED, f"the sentinel build refused with {s} (the rule fired); the real build "
                                        f"refused with {r} as the policy says, but unfiltered the kernel answers {b} "
                                        "too, so the real build alone is ambiguous here")
    return verdict(on_real.verdict, f"real build: {on_real.reason} (the sentinel build refused with {s})")


@dataclass(frozen=True)
class FilterRequirement:
    """What ``/proc/self/status`` must show inside a third party's sandbox for a requirement.

    A third party may merge the requirement's programs into one, so one loaded filter is enough;
    ``filters`` is 0 when the requirement installs none in this mode (nothing to check)."""

    source: str  # "the requirement baseline (proxy mode)"
    filters: int
    no_new_privs: bool


def filter_requirement(requirement: Policy, mode: str) -> FilterRequirement:
    installs = requirement.filter_applies(mode) and bool(requirements_of(requirement, mode))
    return FilterRequirement(f"the requirement {requirement.name} ({mode} mode)", int(installs),
                             installs and requirement.seccomp.no_new_privs)


def judge_filter_present(observed: Outcome, compiled: CompiledFilter | None,
                         required: FilterRequirement | None = None) -> Judgement:
    shown = observed.detail or observed.describe()
    if observed.kind != "status":  # the runner never read /proc/self/status: nothing was shown, nothing passes
        return Judgement(Verdict.INDETERMINATE, f"not run: {shown}", "filters present", shown)
    fields = dict(part.split(": ", 1) for part in observed.detail.split(", ") if ": " in part)
    if compiled is None and required is not None:
        return _judge_third_party_filter(fields, shown, required)
    if compiled is None:  # nothing is required: informational only
        return Judgement(Verdict.WORKS, f"third-party sandbox reports {shown}", "-", shown)
    wanted = {"Seccomp": "2"} if compiled.programs else {}
    problems = [f"{k} is {fields.get(k)!r}, expected {v!r}" for k, v in wanted.items() if fields.get(k) != v]
    if compiled.programs and int(fields.get("Seccomp_filters", "0") or 0) < len(compiled.programs):
        problems.append(f"Seccomp_filters is {fields.get('Seccomp_filters')}, expected >= {len(compiled.programs)}")
    if compiled.no_new_privs and fields.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {fields.get('NoNewPrivs')!r}, expected '1'")
    if not compiled.programs:
        problems.append(f"the policy installs NO seccomp filter in {compiled.network_mode} mode")
    if problems:
        return Judgement(Verdict.BROKEN, "; ".join(problems), "filters present", shown)
    return Judgement(Verdict.WORKS, f"filters present: {shown}", "filters present", shown)


def _judge_third_party_filter(fields: Mapping[str, str], shown: str, required: FilterRequirement) -> Judgement:
    if not required.filters:
        return Judgement(Verdict.WORKS, f"{required.source} installs no filter; the sandbox reports {shown}",
                         "-", shown)
    expected = f"Seccomp 2, Seccomp_filters >= {required.filters}" + (", NoNewPrivs 1" if required.no_new_privs
                                                                       else "")
    if not fields:
        return Judgement(Verdict.BROKEN, f"no /proc/self/status fields read inside the sandbox: {shown}",
                         expected, shown)
    problems = []
    if fields.get("Seccomp") != "2":
        # gVisor also shows Seccomp: 0 whatever it enforces (syscalls.md §4); it then fails this row, and
        # its denial rows still show what it refuses.
        problems.append(f"Seccomp is {fields.get('Seccomp')!r}, expected '2': NO seccomp filter is loaded, "
                        f"but {required.source} needs one")
    count = fields.get("Seccomp_filters", "")
    if not count.isdigit() or int(count) < required.filters:
        problems.append(f"Seccomp_filters is {count or 'missing'}, expected >= {required.filters}")
    if required.no_new_privs and fields.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {fields.get('NoNewPrivs')!r}, expected '1' ({required.source} "
                        "sets no_new_privs)")
    if problems:
        return Judgement(Verdict.BROKEN, "; ".join(problems), expected, shown)
    return Judgement(Verdict.WORKS, f"filter present: {shown}", expected, shown)


def judge_exec(case: ProbeCase, baseline: Outcome, observed: Outcome, *, identity_problems: Sequence[str],
               required: FilterRequirement) -> Judgement:
    """Judge one case run inside a third party's sandbox against a baseline taken as the same caller.

    When the baseline could not be taken as the target's caller (``identity_problems``), a refusal by
    errno proves nothing: the kernel refuses an unprivileged caller with EPERM before any filter
    matters, so such a row is INDETERMINATE with the reason, never BLOCKED. Death by SIGSYS is still a
    filter's doing (only seccomp kills with it), and ALLOWED does not depend on who the baseline was:
    the call was not refused.
    """
    if case.kind == "status":
        return judge_filter_present(observed, None, required)
    judgement = judge(case, baseline, observed, compiled=None, policy=None)
    if not identity_problems:
        return judgement
    unmatched = ("the baseline could not be taken as the sandbox's caller (" + "; ".join(identity_problems) +
                 ")")
    if judgement.verdict is Verdict.BLOCKED and not observed.same_as(Outcome.killed_by(signal.SIGSYS)):
        return Judgement(Verdict.INDETERMINATE, f"{unmatched}: {judgement.observed} may be the kernel refusing "
                         "this caller, not a filter", judgement.expected, judgement.observed,
                         baseline=judgement.baseline)
    if case.kind == "reaches_kernel" and judgement.verdict is Verdict.BROKEN:
        return Judgement(Verdict.INDETERMINATE, f"{unmatched}: cannot tell over-blocking from the kernel's "
                         "answer to this caller", judgement.expected, judgement.observed,
                         baseline=judgement.baseline)
    return judgement


