"""Launch cost: ``/bin/true`` under the reference sandbox vs a plain ``subprocess.run``.

SPEC.md "Performance targets": a sandboxed launch must cost <= 1.5x a plain ``subprocess.run`` of the
same command, measured in the same run. Anchors (2-core Linux 6.x): static C seccomp launcher ~1.8x,
``bwrap --unshare-all`` ~6x, firejail ~28x.

Variants are measured in interleaved rounds (each round launches every variant in turn, a few times,
the order rotating from round to round), so CPU frequency drift and background noise hit all of them
alike. Iteration counts are fixed; the whole script stays well under 60 s. Usage::

    python benchmarks/bench_launch.py [--rounds N] [--per-round K] [--load L]

``--load L`` (default 2, one per core here) starts L busy-looping processes for the duration of the
measurement (stopped by PID at the end), so every run sees at least a CI runner's worth of
competition for the CPUs and runs on different days stay comparable; ``--load 0`` measures without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


def build_variants(sandbox: Sandbox) -> list[Variant]:
    def plain_captured() -> int:
        return subprocess.run([TRUE], capture_output=True).returncode

    def sandbox_captured() -> int:
        return sandbox.run([TRUE]).returncode

    def plain_uncaptured() -> int:
        return subprocess.run([TRUE], stdin=subprocess.DEVNULL).returncode

    def sandbox_uncaptured() -> int:
        process = sandbox.popen([TRUE], stdin=DEVNULL, stdout=None, stderr=None)
        return process.wait()

    variants = [
        Variant("subprocess.run capture_output", plain_captured, "subprocess.run capture_output"),
        Variant("Sandbox.run (captures)", sandbox_captured, "subprocess.run capture_output", TARGET_RATIO),
        Variant("subprocess.run inherit stdio", plain_uncaptured, "subprocess.run inherit stdio"),
        Variant("Sandbox.popen inherit stdio", sandbox_uncaptured, "subprocess.run inherit stdio", TARGET_RATIO),
    ]
    bwrap = shutil.which("bwrap")
    if bwrap:
        argv = [bwrap, "--unshare-all", "--dev-bind", "/", "/", TRUE]

        def bwrap_captured() -> int:
            return subprocess.run(argv, capture_output=True).returncode

        if bwrap_captured() == 0:
            variants.append(Variant("bwrap --unshare-all", bwrap_captured, "subprocess.run capture_output"))
        else:
            print("note: bwrap is installed but cannot run here (no user namespaces?); skipped")
    else:
        print("note: bwrap not installed; its anchor is not measured in this run")
    return variants


def measure(variants: list[Variant], rounds: int, per_round: int, warmup: int) -> dict[str, list[float]]:
    for variant in variants:
        for _ in range(warmup):
            _checked(variant.launch(), variant.name)
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    clock = time.perf_counter
    for round_index in range(rounds):
        shift = round_index % len(variants)
        order = variants[shift:] + variants[:shift]
        for _ in range(per_round):  # one launch per variant in turn: bursts of load hit all alike
            for variant in order:
                start = clock()
                returncode = variant.launch()
                samples[variant.name].append(clock() - start)
                _checked(returncode, variant.name)
    return samples


def report(variants: list[Variant], samples: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in samples.items()}
    header = f"{'variant':32} {'n':>5} {'median ms':>10} {'mean ms':>9} {'p90 ms':>8} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for variant in variants:
        values = sorted(samples[variant.name])
        ratio = medians[variant.name] / medians[variant.baseline]
        target = f"<= {variant.target}x {'ok' if ratio <= variant.target else 'MISSED'}" if variant.target else ""
        if variant.name == variant.baseline:
            target = "(baseline)"
        print(f"{variant.name:32} {len(values):5d} {medians[variant.name] * 1e3:10.3f} "
              f"{statistics.fmean(values) * 1e3:9.3f} {values[int(len(values) * 0.9)] * 1e3:8.3f} "
              f"{ratio:6.2f}x  {target}")
    print(f"ratios are medians over the median of the baseline named per row; {ANCHORS}")


SPIN = "import os, time\nend = time.monotonic() + float(os.environ['SPIN_SECONDS'])\nwhile time.monotonic() < end: pass"


@contextmanager
def background_load(processes: int, seconds: float = 600.0) -> Iterator[None]:
    """``processes`` busy loops (each bounded to ``seconds`` on its own, stopped by PID when done)."""
    env = {**os.environ, "SPIN_SECONDS": str(seconds)}
    spinners = [subprocess.Popen([sys.executable, "-S", "-c", SPIN], env=env) for _ in range(processes)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--load", type=int, default=2, help="busy-looping background processes (default 2)")
    args = parser.parse_args()
    policy = load_policy("baseline")
    spec = SandboxSpec(compile_policy(policy, "block"), NetworkPlacement("block"), Identity.current())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, policy baseline, network block, "
          f"{args.rounds} rounds x {args.per_round} launches per variant, background load {args.load} "
          f"busy processes; loadavg before: {loadavg()}")
    started = time.perf_counter()
    with background_load(args.load), Sandbox(spec) as sandbox:
        variants = build_variants(sandbox)
        samples = measure(variants, args.rounds, args.per_round, args.warmup)
        during = loadavg()
    report(variants, samples)
    print(f"loadavg at the end of the measurement: {during}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
