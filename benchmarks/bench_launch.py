"""Launch cost: ``/bin/true`` under the reference sandbox vs a plain ``subprocess.run``.

SPEC.md "Performance targets": a sandboxed launch must cost <= 1.5x a plain ``subprocess.run`` of the
same command, measured in the same run. Anchors (2-core Linux 6.x): static C seccomp launcher ~1.8x,
``bwrap --unshare-all`` ~6x, firejail ~28x.

Variants are measured in interleaved rounds (each round launches every variant in turn, a few times,
the order rotating from round to round), so CPU frequency drift and background noise hit all of them
alike. Iteration counts are fixed; the whole script stays well under 60 s. Usage::

    python benchmarks/bench_launch.py [--rounds N] [--per-round K] [--load L] [--churn C] [--before REF] [--slices]

``--load L`` (default 2, one per core here) starts L busy-looping processes for the duration of the
measurement (stopped by PID at the end), so every run sees at least a CI runner's worth of
competition for the CPUs and runs on different days stay comparable; ``--load 0`` measures without it.
``--churn C`` adds C processes launching ``/bin/true`` back to back (a test suite's kind of load, see
``background.py``).

A busy machine is noisy, so besides the pooled medians the report gives, per sandboxed variant, the
min / median / max over the rounds of (that round's median ÷ the baseline's median in the same round), and
the ratio of the means (total time over the baseline's total). Under load a plain ``subprocess.run`` is
bimodal (its vfork child either runs at once on the CPU its parent left or waits behind the load), so its
median can sit in either mode from one run to the next; the verdict stays the pooled median.

``--before REF`` adds the two sandboxed variants as they were at git revision REF (its launcher.py and
spawner.py, imported against the current package), interleaved with today's: a before/after
measured under the same load. ``--slices`` adds them with the spawner at the default scheduler slice
(``Sandbox(short_slice=False)``), to show what the spawner's short slice buys.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

# This checkout's package, not whichever one an editable install points at (another clone's .ci/run reinstalls
# it in editable mode from there).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from background import background_load, describe, loadavg

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.launcher import DEVNULL, Identity, NetworkPlacement, Sandbox, SandboxSpec

TRUE = "/bin/true"
TARGET_RATIO = 1.5
ANCHORS = "anchors: static C seccomp launcher ~1.8x, bwrap --unshare-all ~6x, firejail ~28x"


@dataclass(frozen=True)
class Variant:
    name: str
    launch: Callable[[], int]
    baseline: str  # the name of the variant it is compared with
    target: float | None = None


def _checked(returncode: int, name: str) -> None:
    if returncode != 0:
        raise SystemExit(f"{name}: /bin/true exited {returncode}; the benchmark is meaningless")


CAPTURED = "subprocess.run capture_output"
INHERITED = "subprocess.run inherit stdio"


def sandbox_variants(sandbox: Any, label: str = "", target: float | None = TARGET_RATIO) -> list[Variant]:
    """``Sandbox.run`` (captures) and ``Sandbox.popen`` with inherited stdio, on ``sandbox``."""
    def captured() -> int:
        return int(sandbox.run([TRUE]).returncode)

    def inherited() -> int:
        return int(sandbox.popen([TRUE], stdin=DEVNULL, stdout=None, stderr=None).wait())

    return [Variant(f"Sandbox.run (captures){label}", captured, CAPTURED, target),
            Variant(f"Sandbox.popen inherit stdio{label}", inherited, INHERITED, target)]


def build_variants(sandbox: Sandbox, extra: list[Variant]) -> list[Variant]:
    def plain_captured() -> int:
        return subprocess.run([TRUE], capture_output=True).returncode

    def plain_uncaptured() -> int:
        return subprocess.run([TRUE], stdin=subprocess.DEVNULL).returncode

    captured, inherited = sandbox_variants(sandbox)
    variants = [Variant(CAPTURED, plain_captured, CAPTURED), captured,
                Variant(INHERITED, plain_uncaptured, INHERITED), inherited, *extra]
    bwrap = shutil.which("bwrap")
    if bwrap:
        argv = [bwrap, "--unshare-all", "--dev-bind", "/", "/", TRUE]

        def bwrap_captured() -> int:
            return subprocess.run(argv, capture_output=True).returncode

        if bwrap_captured() == 0:
            variants.append(Variant("bwrap --unshare-all", bwrap_captured, CAPTURED))
        else:
            print("note: bwrap is installed but cannot run here (no user namespaces?); skipped")
    else:
        print("note: bwrap not installed; its anchor is not measured in this run")
    return variants


Samples = dict[str, list[list[float]]]  # variant name -> one list of launch times per round


def measure(variants: list[Variant], rounds: int, per_round: int, warmup: int) -> Samples:
    for variant in variants:
        for _ in range(warmup):
            _checked(variant.launch(), variant.name)
    samples: Samples = {v.name: [] for v in variants}
    clock = time.perf_counter
    for round_index in range(rounds):
        shift = round_index % len(variants)
        order = variants[shift:] + variants[:shift]
        for variant in variants:
            samples[variant.name].append([])
        for _ in range(per_round):  # one launch per variant in turn: bursts of load hit all alike
            for variant in order:
                start = clock()
                returncode = variant.launch()
                samples[variant.name][-1].append(clock() - start)
                _checked(returncode, variant.name)
    return samples


def round_ratios(samples: Samples, name: str, baseline: str) -> list[float]:
    """Per round: this variant's median launch time over the baseline's in the same round."""
    return [statistics.median(mine) / statistics.median(theirs)
            for mine, theirs in zip(samples[name], samples[baseline], strict=True)]


def report(variants: list[Variant], samples: Samples) -> None:
    pooled = {name: sorted(t for one_round in rounds for t in one_round) for name, rounds in samples.items()}
    medians = {name: statistics.median(values) for name, values in pooled.items()}
    width = max(32, *(len(v.name) for v in variants))
    header = (f"{'variant':{width}} {'n':>5} {'median ms':>10} {'mean ms':>9} {'p90 ms':>8} {'ratio':>7} {'mean':>6}  "
              f"{'per-round ratio min/med/max':>27}  target")
    print(header)
    print("-" * len(header))
    for variant in variants:
        values = pooled[variant.name]
        ratio = medians[variant.name] / medians[variant.baseline]
        mean_ratio = statistics.fmean(values) / statistics.fmean(pooled[variant.baseline])
        target = f"<= {variant.target}x {'ok' if ratio <= variant.target else 'MISSED'}" if variant.target else ""
        spread = ""
        if variant.name == variant.baseline:
            target = "(baseline)"
        else:
            per_round = round_ratios(samples, variant.name, variant.baseline)
            spread = f"{min(per_round):.2f} / {statistics.median(per_round):.2f} / {max(per_round):.2f}"
        print(f"{variant.name:{width}} {len(values):5d} {medians[variant.name] * 1e3:10.3f} "
              f"{statistics.fmean(values) * 1e3:9.3f} {values[int(len(values) * 0.9)] * 1e3:8.3f} "
              f"{ratio:6.2f}x {mean_ratio:5.2f}x  {spread:>27}  {target}")
    print(f"ratio (the verdict) is the pooled median over the pooled median of the baseline named per row; mean is "
          f"total launch time over the baseline's (what a job launching many commands pays); the per-round column is "
          f"the spread of the median ratio taken round by round; {ANCHORS}")


def launcher_at(revision: str) -> ModuleType:
    """launcher.py as it was at git ``revision``, with that revision's spawner, importable next to today's."""
    root = Path(__file__).resolve().parents[1]

    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(root), "show", f"{revision}:{path}"], check=True,
                              capture_output=True, text=True).stdout

    name = "bench_launch_before_launcher"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(show("pytest_sandbox/seccomp/launcher.py"), f"{revision}:launcher.py", "exec"), module.__dict__)
    module.__dict__["_ZYGOTE_SOURCE"] = show("pytest_sandbox/seccomp/spawner.py")
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--load", type=int, default=2, help="busy-looping background processes (default 2)")
    parser.add_argument("--churn", type=int, default=0,
                        help="background processes launching /bin/true back to back (default 0; background.py)")
    parser.add_argument("--before", metavar="REF", help="also measure the launcher as it was at git revision REF")
    parser.add_argument("--slices", action="store_true", help="also measure the spawner at the default slice")
    args = parser.parse_args()
    policy = load_policy("baseline")
    spec = SandboxSpec(compile_policy(policy, "block"), NetworkPlacement("block"), Identity.current())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, policy baseline, network block, "
          f"{args.rounds} rounds x {args.per_round} launches per variant, {describe(args.load, args.churn)}; "
          f"loadavg before: {loadavg()}")
    started = time.perf_counter()
    with background_load(args.load, args.churn), Sandbox(spec) as sandbox, ExitStack() as others:
        extra: list[Variant] = []
        if args.slices:
            default_slice = others.enter_context(Sandbox(spec, short_slice=False))
            extra += sandbox_variants(default_slice, ", default slice", None)
        if args.before:
            before = launcher_at(args.before)
            old_spec = before.SandboxSpec(spec.filter, before.NetworkPlacement("block"), before.Identity.current())
            extra += sandbox_variants(others.enter_context(before.Sandbox(old_spec)), f" @ {args.before}", None)
        variants = build_variants(sandbox, extra)
        samples = measure(variants, args.rounds, args.per_round, args.warmup)
        during = loadavg()
    report(variants, samples)
    print(f"loadavg at the end of the measurement: {during}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
