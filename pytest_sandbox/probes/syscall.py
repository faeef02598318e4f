"""The syscall conformance category: requirements → probe cases → runs → judgements.

Data flow (one way): a policy and a requirement become :class:`Requirement` items; each item becomes
:class:`ProbeCase`\\ s (native, x32, i386, high-bit variants, argument controls) from the catalogue;
a :class:`ProbeTarget` runs a whole plan in one runner process; :func:`judge` compares the filtered
result with the unfiltered baseline taken on the same host, uid, namespace and ABI. For a third party's
launcher (:class:`ExecTarget`) the runner's own report says who it ran as, the baseline is taken as
that caller, and :func:`judge_exec` refuses to credit a refusal the kernel gives that caller anyway.
"""

from __future__ import annotations

import errno as errno_module
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from pytest_sandbox import guardian
from pytest_sandbox.catalogues.syscalls import PROBES_BY_NAME, SYSCALL_PROBES, SyscallProbe
from pytest_sandbox.errors import HostUnsupportedError, LaunchError
from pytest_sandbox.policy.model import SOCKET_FAMILIES, SOCKET_FAMILY_NAMES, ArgRule, Policy
from pytest_sandbox.probes.observed_identity import BaselineRequest, ObservedIdentity
from pytest_sandbox.probes.syscall_runner import whoami
from pytest_sandbox.seccomp.compiler import CompiledFilter, arg_key, deny_key, enosys_key
from pytest_sandbox.seccomp.filter_plan import Action, plan_policy
from pytest_sandbox.seccomp.launcher import FreshNamespaces, Identity, NetworkPlacement, Sandbox, SandboxSpec
from pytest_sandbox.verdicts.judgement import (
    Judgement,
    Outcome,
    Verdict,
    judge_denial,
    judge_reaches_kernel,
    judge_works,
)

ABIS = ("native", "x32", "i386")
HIGH_BIT_VARIANTS = (("hi32", 1 << 32), ("hi-ones", 0xFFFFFFFF << 32))
PREFLIGHT_TIMEOUT_SECONDS = 60
_RUNNER_SOURCE = (resources.files("pytest_sandbox.probes") / "syscall_runner.py").read_text()


@dataclass(frozen=True)
class Requirement:
    """One thing that must be proven refused: a syscall, an argument rule, or an ENOSYS rule."""

    kind: str  # "deny" | "arg" | "enosys"
    syscall: str
    rule: ArgRule | None = None

    @property
    def key(self) -> str:
        if self.kind == "arg":
            assert self.rule is not None
            return arg_key(self.rule)
        return enosys_key(self.syscall) if self.kind == "enosys" else deny_key(self.syscall)

    @property
    def label(self) -> str:
        """Short, test-id friendly: ``pidfd_getfd``, ``clone[arg0&0x10000000]``, ``socket[AF_INET]``."""
        if self.rule is None:
            return self.syscall
        if self.syscall == "socket" and self.rule.arg == 0 and self.rule.op == "eq":
            return f"socket[{SOCKET_FAMILY_NAMES.get(self.rule.value, self.rule.value)}]"
        mask = f"&{self.rule.mask:#x}" if self.rule.op == "masked_eq" else ""
        operator = "" if self.rule.op in ("eq", "masked_eq") else f" {self.rule.op} "
        return f"{self.syscall}[arg{self.rule.arg}{mask}{operator or '='}{self.rule.value:#x}]"

    @property
    def refusal(self) -> frozenset[Outcome]:
        """What counts as refused when nothing more precise is known (third-party sandboxes)."""
        if self.kind == "enosys":
            return frozenset({Outcome.errno(errno_module.ENOSYS)})
        return frozenset({Outcome.errno(errno_module.EPERM), Outcome.killed_by(signal.SIGSYS)})


def requirements_of(policy: Policy, mode: str) -> tuple[Requirement, ...]:
    items = [Requirement("deny", name) for name in policy.seccomp.deny]
    items += [Requirement("arg", rule.syscall, rule) for rule in policy.rules_for_mode(mode)]
    items += [Requirement("enosys", name) for name in policy.seccomp.enosys]
    if policy.seccomp.is_allowlist:
        items += _allowlist_refusals(policy)
    return merge_requirements(items)


def _allowlist_refusals(policy: Policy) -> list[Requirement]:
    """What an allowlist refuses, in probe-able terms: every catalogue syscall it does not allow, and
    for conditionally allowed calls the argument values no allow rule accepts (each socket family;
    each flag bit of a ``(arg & mask) == 0`` rule, the Docker clone pattern)."""
    seccomp = policy.seccomp
    items: list[Requirement] = []
    for probe in SYSCALL_PROBES:
        name = probe.name
        if name in seccomp.allow or name in seccomp.enosys or name == "getppid":
            continue
        rules = [r for r in seccomp.allow_rules if r.syscall == name]
        if not rules:
            items.append(Requirement("deny", name))
        elif name == "socket":
            items += [Requirement("arg", "socket", ArgRule("socket", 0, "eq", family,
                                                           why=f"not allowed: {SOCKET_FAMILY_NAMES[family]}"))
                      for family in sorted(SOCKET_FAMILY_NAMES) if not seccomp.allows("socket", (family,))]
        elif all(r.op == "masked_eq" and r.value == 0 and r.arg == rules[0].arg for r in rules):
            mask = rules[0].mask
            items += [Requirement("arg", name, ArgRule(name, rules[0].arg, "masked_eq", bit, mask=bit,
                                                       why="flag outside the allowed mask"))
                      for bit in (1 << b for b in range(32)) if mask & bit]
        elif not seccomp.allows(name, tuple(a if isinstance(a, int) else 0 for a in probe.args)):
            items.append(Requirement("deny", name))  # the catalogue's harmless call is not an allowed form
    return items


def merge_requirements(*groups: Iterable[Requirement]) -> tuple[Requirement, ...]:
    """Union by meaning (the rule's key), keeping the first occurrence; ``why`` texts may differ."""
    merged: dict[str, Requirement] = {}
    for group in groups:
        for item in group:
            merged.setdefault(item.key, item)
    return tuple(merged.values())


@dataclass(frozen=True)
class ProbeCase:
    """One attempt. ``kind``: ``denial`` (must be refused), ``reaches_kernel`` (must behave as unfiltered),
    ``works`` (ordinary work must succeed) or ``status`` (the filter and no_new_privs are present)."""

    case_id: str
    kind: str
    title: str
    requirement: Requirement | None = None
    abi: str = "native"
    nr: int | None = None
    args: tuple[int | str, ...] = ()
    setup: tuple[str, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()

    def runner_probe(self) -> dict[str, Any]:
        if self.kind in ("denial", "reaches_kernel"):
            return {"id": self.case_id, "kind": "syscall", "abi": self.abi, "nr": self.nr,
                    "args": list(self.args), "setup": list(self.setup)}
        return {"id": self.case_id, **dict(self.extra)}

    @property
    def category(self) -> str:
        return "syscall" if self.kind == "denial" else "syscall-controls"


def _abi_number(probe: SyscallProbe, abi: str) -> int | None:
    return {"native": probe.nr, "x32": probe.x32_nr, "i386": probe.i386_nr}[abi]


def _matching_args(probe: SyscallProbe, rule: ArgRule) -> tuple[int | str, ...]:
    """The catalogue's harmless call with the ruled argument set so the rule fires."""
    args = list(probe.args) + [0] * (rule.arg + 1 - len(probe.args))
    current = args[rule.arg]
    base = 0 if isinstance(current, str) else current & 0xFFFFFFFF
    if rule.op == "masked_eq":
        args[rule.arg] = (base & ~rule.mask) | rule.value
    elif rule.op in ("eq", "ge", "le"):
        args[rule.arg] = rule.value
    elif rule.op == "gt":
        args[rule.arg] = rule.value + 1
    elif rule.op == "lt":
        args[rule.arg] = max(rule.value - 1, 0)
    elif rule.op == "ne":
        args[rule.arg] = base if base != rule.value else rule.value ^ 1
    return tuple(args)


def _with_high_bits(args: tuple[int | str, ...], index: int, bits: int) -> tuple[int | str, ...]:
    value = args[index]
    assert isinstance(value, int)
    return tuple((a & 0xFFFFFFFF) | bits if i == index and isinstance(a, int) else a for i, a in enumerate(args))


def denial_cases(requirements: Sequence[Requirement]) -> tuple[ProbeCase, ...]:
    """Every path for every requirement: each ABI, and high bits in every argument a rule looks at."""
    cases: list[ProbeCase] = []
    for item in requirements:
        probe = PROBES_BY_NAME.get(item.syscall)
        if probe is None:
            cases.append(ProbeCase(f"{item.label}-native", "denial",
                                   f"{item.label}: no harmless probe in the catalogue", item, nr=None))
            continue
        args = _matching_args(probe, item.rule) if item.rule else probe.args
        for abi in ABIS:
            number = _abi_number(probe, abi)
            if number is None:
                continue
            cases.append(ProbeCase(f"{item.label}-{abi}", "denial", f"syscall {item.label} via {abi} ABI",
                                   item, abi, number, args, probe.setup))
        if item.rule is not None and item.rule.op in ("eq", "masked_eq"):
            for variant, bits in HIGH_BIT_VARIANTS:
                cases.append(ProbeCase(
                    f"{item.label}-native-{variant}", "denial",
                    f"syscall {item.label} with high bits ({variant}) in arg{item.rule.arg}",
                    item, "native", probe.nr, _with_high_bits(args, item.rule.arg, bits), probe.setup))
    return tuple(cases)


def control_cases(requirements: Sequence[Requirement], mode: str) -> tuple[ProbeCase, ...]:
    """Positive controls: proof that ordinary work still functions under the same filter."""
    cases = [
        ProbeCase("thread-starts", "works", "a thread starts (clone3 -> ENOSYS -> clone fallback)",
                  extra=(("kind", "thread_start"),)),
        ProbeCase("process-starts", "works", "posix_spawn and fork start processes",
                  extra=(("kind", "process_start"),)),
        ProbeCase("af_unix-socket-opens", "works", "an AF_UNIX socket opens",
                  extra=(("kind", "socket_open"), ("family", SOCKET_FAMILIES["AF_UNIX"]))),
        ProbeCase("filter-present", "status", "/proc/self/status shows the filters and NoNewPrivs",
                  extra=(("kind", "proc_status"),)),
    ]
    if mode in ("proxy", "allow"):
        for family in ("AF_INET", "AF_INET6"):
            cases.append(ProbeCase(f"{family.lower()}-socket-opens", "works",
                                   f"an {family} socket opens in {mode} mode",
                                   extra=(("kind", "socket_open"), ("family", SOCKET_FAMILIES[family]))))
    getppid = PROBES_BY_NAME["getppid"]
    cases.append(ProbeCase("getppid-reaches-kernel", "reaches_kernel", "getppid() still works",
                           nr=getppid.nr, args=()))
    seen: set[str] = set()
    for item in requirements:
        probe = PROBES_BY_NAME.get(item.syscall)
        if item.rule is None or probe is None or probe.control_args is None or probe.name in seen:
            continue
        seen.add(probe.name)
        cases.append(ProbeCase(f"{probe.name}-without-ruled-flag-reaches-kernel", "reaches_kernel",
                               f"{probe.name} without the ruled argument reaches the kernel",
                               item, "native", probe.nr, probe.control_args, probe.setup))
    return tuple(cases)


# --------------------------------------------------------------------------------------------
# Expectations


_PLAN_ARCH = {"native": "native", "x32": "x32", "i386": "x86"}


def outcome_of(action: Action, compiled: CompiledFilter, arch: str = "native") -> Outcome | None:
    """What a probe observes when the filter returns ``action`` (None: the call goes through)."""
    if action.kind == "errno":
        number = compiled.errno_for(action.slot or "", arch)
        return Outcome.errno(number) if number is not None else None
    if action.kind in ("kill_process", "kill_thread", "trap"):
        return Outcome.killed_by(signal.SIGSYS)  # kill_process, kill_thread and trap all end in SIGSYS
    return None  # allow, log


def expected_refusal(case: ProbeCase, compiled: CompiledFilter | None, policy: Policy | None) -> frozenset[Outcome]:
    """E for one denial case: exact when we compiled the filter ourselves (from the same plan that built
    it, with this build's errnos), generic otherwise."""
    item = case.requirement
    assert item is not None
    if compiled is None or policy is None:
        if case.abi != "native":  # a foreign ABI may be refused by a bad-arch action as well
            return item.refusal | {Outcome.errno(errno_module.EPERM), Outcome.killed_by(signal.SIGSYS)}
        return item.refusal
    if not compiled.programs:  # the policy skips seccomp in this mode: nothing can refuse
        return item.refusal
    numeric = tuple(a if isinstance(a, int) else 0 for a in case.args)
    arch = _PLAN_ARCH[case.abi]
    actions = plan_policy(policy, compiled.network_mode).results(item.syscall, numeric, arch)
    outcomes = {outcome_of(action, compiled, arch) for action in actions}
    if None in outcomes:  # the filter lets this form through: any refusal would have to come from elsewhere
        return item.refusal
    return frozenset(o for o in outcomes if o is not None)


def judge(case: ProbeCase, baseline: Outcome, observed: Outcome, *, compiled: CompiledFilter | None,
          policy: Policy | None) -> Judgement:
    if case.kind == "denial":
        if case.nr is None:
            return Judgement(Verdict.INDETERMINATE, "no harmless probe for this syscall in the catalogue; "
                             "add a row to pytest_sandbox/catalogues/syscalls.py", "refusal", "-", "-")
        return judge_denial(expected_refusal(case, compiled, policy), baseline, observed, abi=case.abi)
    if case.kind == "reaches_kernel":
        return judge_reaches_kernel(baseline, observed)
    if case.kind == "status":
        return judge_filter_present(observed, compiled)
    return judge_works(observed, what=case.title)


def judge_both_builds(case: ProbeCase, baseline: Outcome, sentinel_observed: Outcome, real_observed: Outcome, *,
                      sentinel: CompiledFilter, real: CompiledFilter, policy: Policy) -> Judgement:
    """A denial of the reference sandbox, proven on both builds of one plan.

    The sentinel build says *which rule* refused (its errnos exist nowhere else); the real build is the
    filter users get. BLOCKED needs both: the sentinel run shows the rule fired, and the real run is
    refused exactly as the policy says. Where the real refusal equals the unfiltered kernel's answer
    (EPERM for an unprivileged pivot_root) the real run cannot tell filter from kernel, so the sentinel
    evidence stands alone, and the reason says so."""
    on_sentinel = judge(case, baseline, sentinel_observed, compiled=sentinel, policy=policy)
    on_real = judge(case, baseline, real_observed, compiled=real, policy=policy)
    s, r, b = sentinel_observed.describe(), real_observed.describe(), baseline.describe()

    def verdict(v: Verdict, reason: str) -> Judgement:
        return Judgement(v, reason, f"sentinel build: {on_sentinel.expected}; real build: {on_real.expected}", b,
                         f"sentinel build: {s}; real build: {r}")

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
    fields = dict(part.split(": ", 1) for part in observed.detail.split(", ") if ": " in part)
    shown = observed.detail or observed.describe()
    if compiled is None and required is not None:
        return _judge_third_party_filter(fields, shown, required)
    if compiled is None:  # nothing is required: informational only
        return Judgement(Verdict.WORKS, f"third-party sandbox reports {shown}", "-", "-", shown)
    wanted = {"Seccomp": "2"} if compiled.programs else {}
    problems = [f"{k} is {fields.get(k)!r}, expected {v!r}" for k, v in wanted.items() if fields.get(k) != v]
    if compiled.programs and int(fields.get("Seccomp_filters", "0") or 0) < len(compiled.programs):
        problems.append(f"Seccomp_filters is {fields.get('Seccomp_filters')}, expected >= {len(compiled.programs)}")
    if compiled.no_new_privs and fields.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {fields.get('NoNewPrivs')!r}, expected '1'")
    if not compiled.programs:
        problems.append(f"the policy installs NO seccomp filter in {compiled.network_mode} mode")
    if problems:
        return Judgement(Verdict.BROKEN, "; ".join(problems), "filters present", "-", shown)
    return Judgement(Verdict.WORKS, f"filters present: {shown}", "filters present", "-", shown)


def _judge_third_party_filter(fields: Mapping[str, str], shown: str, required: FilterRequirement) -> Judgement:
    if not required.filters:
        return Judgement(Verdict.WORKS, f"{required.source} installs no filter; the sandbox reports {shown}",
                         "-", "-", shown)
    expected = f"Seccomp 2, Seccomp_filters >= {required.filters}" + (", NoNewPrivs 1" if required.no_new_privs
                                                                       else "")
    if not fields:
        return Judgement(Verdict.BROKEN, f"no /proc/self/status fields read inside the sandbox: {shown}",
                         expected, "-", shown)
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
        return Judgement(Verdict.BROKEN, "; ".join(problems), expected, "-", shown)
    return Judgement(Verdict.WORKS, f"filter present: {shown}", expected, "-", shown)


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
                         "this caller, not a filter", judgement.expected, judgement.baseline, judgement.observed)
    if case.kind == "reaches_kernel" and judgement.verdict is Verdict.BROKEN:
        return Judgement(Verdict.INDETERMINATE, f"{unmatched}: cannot tell over-blocking from the kernel's "
                         "answer to this caller", judgement.expected, judgement.baseline, judgement.observed)
    return judgement


# --------------------------------------------------------------------------------------------
# Running plans


def runner_script(probes: Sequence[Mapping[str, Any]]) -> bytes:
    """The probe runner's source with the plan appended: everything a bare ``python3 -`` needs."""
    plan = json.dumps(list(probes))
    return (_RUNNER_SOURCE + f"\nmain(json.loads({plan!r}))\n").encode()


@dataclass(frozen=True)
class RunnerReport:
    """What one runner process said: an outcome per probe id, and who it ran as."""

    outcomes: dict[str, Outcome]
    identity: ObservedIdentity | None
    identity_error: str = ""


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

    def run(self, probes: Sequence[Mapping[str, Any]]) -> dict[str, Outcome]:
        return self.run_report(probes).outcomes

    def run_report(self, probes: Sequence[Mapping[str, Any]]) -> RunnerReport:
        spec = SandboxSpec(self.compiled, self.placement, self.identity, self.namespaces)
        with Sandbox(spec) as sandbox:
            result = sandbox.run([runner_interpreter(self.identity), "-S", "-"], input=runner_script(probes),
                                 timeout=300, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
        return _report_or_error(probes, result.returncode, result.stdout, result.stderr, self.name)


@dataclass
class ExecTarget:
    """A third party's launcher: ``PREFIX python3 -S -`` with the runner on stdin (``--sandbox-exec``)."""

    prefix: str
    name: str = "exec"
    interpreter: str = "python3"

    @cached_property
    def argv(self) -> list[str]:
        words = shlex.split(self.prefix)
        if not words:
            raise LaunchError("--sandbox-exec is empty: give the launcher prefix, e.g. 'bwrap --dev-bind / / --'")
        if shutil.which(words[0]) is None:
            raise LaunchError(f"--sandbox-exec: launcher {words[0]!r} not found on PATH")
        return [*words, self.interpreter, "-S", "-"]

    def run(self, probes: Sequence[Mapping[str, Any]]) -> dict[str, Outcome]:
        return self.run_report(probes).outcomes

    def run_report(self, probes: Sequence[Mapping[str, Any]]) -> RunnerReport:
        completed = guardian.run(self.argv, input=runner_script(probes), timeout=300)
        return _report_or_error(probes, completed.returncode, completed.stdout, completed.stderr,
                                f"'{self.prefix}'")

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

