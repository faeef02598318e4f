"""Syscall probe throughput: the baseline policy's denial plan, run through ``SandboxTarget``.

SPEC.md "Performance targets": >= 500 syscall probes/s sustained. The plan is what the conformance
suite runs for the baseline policy in proxy mode (every denied syscall on every ABI, high-bit
variants of argument rules), on the sentinel build, as one runner process per plan. The unfiltered
baseline target runs the same plan for comparison. Each plan run includes starting the spawner (and
its private network namespace), the runner interpreter and every probe's child.

Runs are interleaved (sentinel, unfiltered, sentinel, ...) with a fixed count. ``--one-per-child`` adds
both targets again with the runner forking a fresh child for every probe (its reference mode, the design
before issue #12), interleaved in the same run, so the runner's child reuse is measured under the same load.
``--phases`` splits the reference target's fixed cost (issue #12): a guardian around ``/bin/true``
(every sandbox's spawner runs under one), an interpreter doing nothing (the floor of any helper start),
then ``Sandbox`` enter (guardian and spawner start, namespace, filters), the empty runner, and close.
Usage::

    python benchmarks/bench_probes.py [--runs N] [--one-per-child] [--suite] [--phases] [--load L] [--churn C]

``--load L`` adds L busy-looping processes for the whole run (background.py's, stopped by PID), so runs on
a quiet and a busy machine are comparable (issue #12); the default 0 measures without it. ``--churn C`` adds C
processes launching ``/bin/true`` back to back (background.py). ``--core-pipe PROGRAM`` (root) sets
``/proc/sys/kernel/core_pattern`` to ``|PROGRAM`` for the run and puts the old pattern back afterwards: a host
whose crash handler (apport, systemd-coredump) the kernel would start for every probe child a filter kills,
were it not for the runner's RLIMIT_CORE of 1 (syscall_runner.refuse_core_dumps).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

# This checkout's package, not whichever one an editable install points at (another clone's .ci/run reinstalls
# it in editable mode from there).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from background import background_load, describe

from pytest_sandbox import guardian
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.probes.syscall import SandboxTarget, runner_command, runner_interpreter
from pytest_sandbox.probes.syscall_cases import denial_cases, requirements_of
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement, Sandbox, SandboxSpec, check_host_support
from pytest_sandbox.session import SandboxOptions, SandboxSession

MODE = "proxy"
TARGET_PROBES_PER_SECOND = 500
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")


def build_plan() -> list[dict[str, Any]]:
    policy = load_policy("baseline")
    cases = denial_cases(requirements_of(policy, MODE))
    return [case.runner_probe() for case in cases if case.nr is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--suite", action="store_true",
                        help="also time the three builds of one (mode, identity) side by side, as the suite runs them")
    parser.add_argument("--phases", action="store_true",
                        help="also split the reference target's start-up into guardian, enter, runner and close")
    parser.add_argument("--one-per-child", action="store_true",
                        help="also run each target with a fresh runner child per probe, interleaved")
    parser.add_argument("--load", type=int, default=0, help="busy-looping background processes (default 0)")
    parser.add_argument("--churn", type=int, default=0,
                        help="background processes launching /bin/true back to back (default 0; background.py)")
    parser.add_argument("--core-pipe", metavar="PROGRAM",
                        help="pipe core dumps to PROGRAM for the run (root; the old core_pattern is restored)")
    args = parser.parse_args()
    with core_pipe(args.core_pipe), background_load(args.load, args.churn):
        return measure(args)


@contextlib.contextmanager
def core_pipe(program: str | None) -> Any:
    """core_pattern = ``|program`` while the block runs (a crash handler per core dump), restored after."""
    if program is None:
        yield
        return
    if not os.access(program, os.X_OK):
        raise SystemExit(f"--core-pipe: {program} is not an executable file")
    before = CORE_PATTERN.read_text()
    CORE_PATTERN.write_text(f"|{program}\n")
    try:
        yield
    finally:
        CORE_PATTERN.write_text(before)


def measure(args: argparse.Namespace) -> int:
    identity = Identity.current()
    check_host_support(MODE, identity)
    policy = load_policy("baseline")
    plan = build_plan()
    targets = {
        "reference sandbox (sentinel)": SandboxTarget("sentinel", compile_policy(policy, MODE, sentinel=True),
                                                      NetworkPlacement(MODE), identity),
        "unfiltered baseline": SandboxTarget("unfiltered", None, NetworkPlacement(MODE), identity),
    }
    if args.one_per_child:
        targets.update({f"{name}, 1 child/probe": replace(target, name=f"{target.name}, 1 child/probe",
                                                          one_per_child=True)
                        for name, target in list(targets.items())})
    print(f"load average {os.getloadavg()[0]:.2f}; python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"policy baseline, network {MODE}, "
          f"{len(plan)} probes per plan, {args.runs} runs per target (after one warm-up run each), "
          f"{describe(args.load, args.churn)}; core_pattern {CORE_PATTERN.read_text().strip()!r}")
    for target in targets.values():
        outcomes = target.run(plan)
        errors = [pid for pid, outcome in outcomes.items() if outcome.kind == "error"]
        if errors:
            raise SystemExit(f"{target.name}: {len(errors)} probes errored, e.g. {outcomes[errors[0]]}")
        if target.compiled is not None:
            # Proof the filtered plan measured real refusals: a sentinel errno (>= 1000), the
            # bad-arch SIGSYS, or ENOSYS (kept unchanged in sentinel builds for glibc's clone3 fallback).
            others = sorted(pid for pid, o in outcomes.items()
                            if not ((o.kind == "errno" and ((o.value or 0) >= 1000 or o.value == errno.ENOSYS))
                                    or o.kind == "signal"))
            print(f"{target.name}: {len(plan) - len(others)} of {len(plan)} probes refused by the filter"
                  + (f"; not refused: {', '.join(others)}" if others else ""))
    walls: dict[str, list[float]] = {name: [] for name in targets}
    fixed: dict[str, list[float]] = {name: [] for name in targets}
    started = time.perf_counter()
    for _ in range(args.runs):
        for name, target in targets.items():
            start = time.perf_counter()
            target.run(plan)
            walls[name].append(time.perf_counter() - start)
            # The same target with an empty plan: spawner, namespace and interpreter start-up only.
            start = time.perf_counter()
            target.run([])
            fixed[name].append(time.perf_counter() - start)
    header = (f"{'target':42} {'plan wall ms':>12} {'min ms':>7} {'start-up ms':>11} {'probes/s':>9} "
              f"{'sustained/s':>11} {'ratio':>6}  target")
    print(header)
    print("-" * len(header))
    reference = statistics.median(walls["unfiltered baseline"])
    for name, values in walls.items():
        median = statistics.median(values)
        startup = statistics.median(fixed[name])
        rate = len(plan) / median
        # An empty plan's median can exceed a full one's on a busy machine: no sustained rate then.
        sustained = f"{len(plan) / (median - startup):11.0f}" if median > startup else f"{'n/a':>11}"
        verdict = f">= {TARGET_PROBES_PER_SECOND}/s {'ok' if rate >= TARGET_PROBES_PER_SECOND else 'MISSED'}"
        print(f"{name:42} {median * 1e3:12.1f} {min(values) * 1e3:7.1f} {startup * 1e3:11.1f} {rate:9.0f} "
              f"{sustained} {median / reference:5.2f}x  {verdict}")
    print("plan wall and start-up are medians; probes/s = probes / plan wall (start-up included); "
          "sustained/s excludes start-up (an empty plan's wall time);")
    print(f"ratio = plan wall over the unfiltered baseline's; total {time.perf_counter() - started:.1f} s; "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.suite:
        suite_shaped(args.runs, identity)
    if args.phases:
        startup_phases(args.runs, identity)
    return 0


def startup_phases(runs: int, identity: Identity) -> None:
    """The fixed cost of one reference plan, phase by phase, interleaved (medians of ``runs`` rounds)."""
    compiled = compile_policy(load_policy("baseline"), MODE, sentinel=True)
    argv, script = runner_command(runner_interpreter(identity), [])
    times: dict[str, list[float]] = {name: [] for name in
                                     ("python -I -S -c pass", "guardian.run(['/bin/true'])",
                                      "Sandbox enter", "empty runner", "Sandbox close")}
    for index in range(runs + 1):  # the first is a warm-up
        marks = [time.perf_counter()]
        subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
        marks.append(time.perf_counter())
        guardian.run(["/bin/true"])
        marks.append(time.perf_counter())
        sandbox = Sandbox(SandboxSpec(compiled, NetworkPlacement(MODE), identity))
        marks.append(time.perf_counter())
        sandbox.run(argv, input=script, timeout=30, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
        marks.append(time.perf_counter())
        sandbox.close()
        marks.append(time.perf_counter())
        if index:
            for name, start, end in zip(times, marks, marks[1:], strict=False):
                times[name].append(end - start)
    print("start-up phases (reference sandbox, sentinel build), medians: " + "; ".join(
        f"{name} {statistics.median(values) * 1e3:.1f} ms" for name, values in times.items())
        + f"; load average {os.getloadavg()[0]:.2f}")


def suite_shaped(runs: int, identity: Identity) -> None:
    """The plans as the conformance suite runs them for one (mode, identity): the unfiltered baseline
    (denials and controls), the sentinel build (denials) and the real build (denials and controls), each in
    its own sandbox and runner, side by side (SandboxSession.outcomes runs all three at the first test)."""
    options = SandboxOptions(modes=(MODE,), identities=("current",))
    walls: list[float] = []
    per_run = 0
    for index in range(runs + 1):  # the first is a warm-up
        session = SandboxSession(options)  # policy loading and compiling: not part of the probing
        start = time.perf_counter()
        outcomes = [session.outcomes(MODE, identity, build) for build in session.builds()]
        wall = time.perf_counter() - start
        errors = [o for each in outcomes for o in each.values() if o.kind == "error"]
        if errors:
            raise SystemExit(f"the suite-shaped run: {len(errors)} probes errored, e.g. {errors[0]}")
        per_run = sum(len(each) for each in outcomes)
        if index:
            walls.append(wall)
    median = statistics.median(walls)
    rate = per_run / median
    verdict = f">= {TARGET_PROBES_PER_SECOND}/s {'ok' if rate >= TARGET_PROBES_PER_SECOND else 'MISSED'}"
    print(f"as the suite runs them ({MODE} mode, as {identity.name}: {', '.join(session.builds())} side by side, "
          f"{per_run} probes): wall median {median * 1e3:.1f} ms, min {min(walls) * 1e3:.1f} ms, "
          f"{rate:.0f} probes/s including start-up  {verdict}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
