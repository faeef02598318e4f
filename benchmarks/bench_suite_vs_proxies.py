"""Benchmark: the whole conformance suite's wall time against the reference and against third-party proxies.

Each target is one ``python -m pytest --sandbox conformance/`` run in a fresh process (the syscall
categories included: they do not depend on the proxy, and the issue's target is the whole suite):

* ``reference``: the in-process reference proxy (no option): the baseline every ratio is against;
* ``reference-n2`` (``--workers 2``): the same suite as README's main job runs it, on two xdist workers with
  ``--dist loadfile`` (one lab, proxy and set of probe runs per worker); SPEC's target is <= 20 s on 2 cores;
* ``reference-3p``: the reference run as a separate process with its own interception CA
  (``--sandbox-proxy-cmd`` + ``--sandbox-proxy-ca``): the third-party path, every category run;
* ``keepalive``: ``tests/keepalive_proxy.py``, the reference keeping every client connection open
  after a forwarded answer, also intercepting with its own CA;
* ``tinyproxy`` and ``squid`` (default configuration from ``pytest_sandbox.network.third_party``),
  skipped if not installed; they do not intercept, so their inference and tunnel tests are not run
  (fail closed) and their SSRF holes fail: only the time is of interest here.

Nothing is asserted: the script prints wall seconds, passed/failed counts, the ratio to the
reference and the 1-minute load average before and after each run (the machine may be shared: a
ratio means something only against the reference measured in the same run; ``--repeat-reference``
measures it again at the end). Issue #9's targets: reference <= 20 s; every responsive third party <= 60 s on 2 cores.

    python benchmarks/bench_suite_vs_proxies.py [--only NAME ...] [--files conformance/test_ssrf.py ...]
                                                [--workers N] [--repeat-reference]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from keepalive_proxy import keepalive_command  # noqa: E402  (tests/ on the path first)

from pytest_sandbox.network.third_party import (  # noqa: E402
    THIRD_PARTY_PROXIES,
    reference_command,
    third_party_command,
)

RUN_TIMEOUT_SECONDS = 1800
SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors)")


def targets(work: Path, workers: int = 0) -> dict[str, list[str]]:
    """Target name -> the extra pytest options that select its proxy (and, with ``workers``, spread it)."""
    found: dict[str, list[str]] = {"reference": []}
    if workers:
        found[f"reference-n{workers}"] = ["-n", str(workers), "--dist", "loadfile"]
    ca = work / "reference-ca.pem"
    found["reference-3p"] = ["--sandbox-proxy-cmd", reference_command(intercept_ca_out=ca),
                             "--sandbox-proxy-ca", str(ca)]
    keepalive_ca = work / "keepalive-ca.pem"
    found["keepalive"] = ["--sandbox-proxy-cmd", keepalive_command(intercept_ca_out=keepalive_ca),
                          "--sandbox-proxy-ca", str(keepalive_ca)]
    for name, spec in THIRD_PARTY_PROXIES.items():
        if shutil.which(name) or Path(spec.fallback_binary).exists():
            found[name] = ["--sandbox-proxy-cmd", third_party_command(name, work / name)]
    return found


def run(files: list[str], options: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    begin = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "--sandbox", *files, "-q", "-p", "no:cacheprovider",
                             "-p", "no:randomly", *options], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_SECONDS, check=False)
    elapsed = time.monotonic() - begin
    counts = {kind.rstrip("s"): int(number) for number, kind in SUMMARY.findall(result.stdout.splitlines()[-1]
                                                                                 if result.stdout else "")}
    return elapsed, ", ".join(f"{count} {kind}" for kind, count in counts.items()) or "no summary"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="run only these targets (repeatable)")
    parser.add_argument("--files", nargs="*", default=["conformance/"], help="what to run (default: conformance/)")
    parser.add_argument("--repeat-reference", action="store_true", help="measure the reference again at the end")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="also run the reference on N xdist workers with --dist loadfile (README's main job: 2)")
    options = parser.parse_args()
    if options.workers < 0:
        parser.error("--workers must be 0 (not spread) or more")
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as work:
        chosen = {name: extra for name, extra in targets(Path(work), options.workers).items()
                  if not options.only or name in options.only or name == "reference"}
        if options.repeat_reference:
            chosen["reference (again)"] = chosen["reference"]
        print(f"{'target':<18} {'wall s':>8} {'÷ reference':>12} {'load before/after':>18}  tests")
        baseline = None
        for name, extra in chosen.items():
            load_before = os.getloadavg()[0]
            elapsed, summary = run(options.files, extra)
            load_after = os.getloadavg()[0]
            baseline = baseline or elapsed
            print(f"{name:<18} {elapsed:8.1f} {elapsed / baseline:11.2f}x {load_before:8.2f} / {load_after:<7.2f}  "
                  f"{summary}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
