"""The reference sandbox as an unprivileged caller: the harness itself runs as uid 65534 (not root
dropping privileges for it), so proxy mode must build its private network namespace inside a user
namespace, drop the mapped-root capabilities, and still prove every deny."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.seccomp.compiler import compile_policy

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_sandbox"
SYSTEM_PYTHON = "/usr/bin/python3"

# Runs as uid 65534 with only the stdlib and the package: the filter was compiled by the caller.
UNPRIVILEGED_RUN = r"""
import base64, json, sys
from pytest_sandbox.seccomp.compiler import CompiledFilter, RuleAction
from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.probes.syscall import SandboxTarget
from pytest_sandbox.probes.syscall_cases import control_cases, denial_cases, requirements_of
from pytest_sandbox.session import may_open_setup_device
from pytest_sandbox.verdicts.syscall import judge
data = json.loads(sys.stdin.read())
policy = load_policy(data["policy"])
compiled = CompiledFilter(data["name"], "proxy", True, tuple(base64.b64decode(p) for p in data["programs"]),
                          tuple(RuleAction(*a) for a in data["actions"]), "kill_process", (), True)
reqs = requirements_of(policy, "proxy")
who = Identity.current()
# as the session plans them: no device path this caller cannot open even unfiltered (/dev/userfaultfd is root's)
cases = [c for c in denial_cases(reqs) + control_cases(reqs, "proxy")
         if may_open_setup_device(c.setup, who) and not c.witness_access]  # witness rows need the session's witness
probes = [c.runner_probe() for c in cases]
base = SandboxTarget("baseline", None, NetworkPlacement("proxy"), who).run(probes)
seen = SandboxTarget("sandbox", compiled, NetworkPlacement("proxy"), who).run(probes)
print(json.dumps({c.case_id: judge(c, base[c.case_id], seen[c.case_id], compiled=compiled, policy=policy).verdict
                  for c in cases}))
"""


@pytest.fixture(scope="module")
def world_readable_package(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("this test switches to uid 65534 and so must start as root")
    if not os.path.exists(SYSTEM_PYTHON) or shutil.which("setpriv") is None:
        pytest.skip("needs /usr/bin/python3 and setpriv (util-linux) to run as uid 65534")
    root = tmp_path_factory.mktemp("unpriv")
    shutil.copytree(PACKAGE, root / "pytest_sandbox", ignore=shutil.ignore_patterns("__pycache__"))
    import pyseccomp

    shutil.copy(pyseccomp.__file__, root / "pyseccomp.py")
    for path in [root, *root.parents]:
        os.chmod(path, os.stat(path).st_mode | 0o005) if path != Path("/") else None
    for path in root.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    return root


def _as_nobody(package: Path, script: str, payload: str) -> dict:
    """Run ``script`` as uid 65534 with only the stdlib and the world-readable ``package``; its JSON answer."""
    completed = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c", script],
        input=payload, capture_output=True, text=True, timeout=300, cwd="/",
        env={"PYTHONPATH": str(package), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout)


def test_unprivileged_caller_proves_every_baseline_deny_in_proxy_mode(world_readable_package):
    policy = load_policy("baseline")
    compiled = compile_policy(policy, "proxy", sentinel=True)
    payload = json.dumps({
        "policy": str(world_readable_package / "pytest_sandbox/policy/bundled/baseline.toml"),
        "name": compiled.policy_name,
        "programs": [base64.b64encode(p).decode() for p in compiled.programs],
        "actions": [[a.rule, a.errno] for a in compiled.actions],
    })
    verdicts = _as_nobody(world_readable_package, UNPRIVILEGED_RUN, payload)
    not_proven = {case: v for case, v in verdicts.items() if v not in ("BLOCKED", "WORKS")}
    assert not_proven == {}
    assert sum(v == "BLOCKED" for v in verdicts.values()) >= 90


# The witness rows as the unprivileged harness runs them (session._run_builds): a witness as this caller, the
# unfiltered baseline and the sandbox each reach for it, every outcome classified against the witness.
UNPRIVILEGED_WITNESS_RUN = r"""
import base64, json, sys
from pytest_sandbox.seccomp.compiler import CompiledFilter
from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement, Sandbox, SandboxSpec
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.probes.process_witness import with_witness, witness_plan
from pytest_sandbox.probes.syscall import SandboxTarget
from pytest_sandbox.probes.syscall_cases import denial_cases, requirements_of
from pytest_sandbox.verdicts.syscall import NOT_ON_THIS_HOST, judge
data = json.loads(sys.stdin.read())
policy = load_policy(data["policy"])
who = Identity.current()
found = {}
for mode, programs in data["programs"].items():
    compiled = CompiledFilter(data["name"], mode, False, tuple(base64.b64decode(p) for p in programs), (),
                              "kill_process", (), True)
    with Sandbox(SandboxSpec(compiled, NetworkPlacement(mode), who)) as sandbox:
        found[f"{mode}-landlock"] = sandbox.status["Landlock"]
    cases = [c for c in denial_cases(requirements_of(policy, mode)) if c.witness_access]
    runs, evidence = with_witness(who, 2, lambda witness: [
        SandboxTarget(name, flt, NetworkPlacement(mode), who).run(witness_plan(cases, witness, run))
        for run, (name, flt) in enumerate((("baseline", None), ("sandbox", compiled)))])
    baseline, observed = (evidence.classified(runs[run], run, [c.case_id for c in cases]) for run in (0, 1))
    for c in cases:
        j = judge(c, baseline[c.case_id], observed[c.case_id], compiled=None, policy=None)
        found[f"{mode}-{c.case_id}"] = "SKIP" if j.reason.startswith(NOT_ON_THIS_HOST) else j.verdict.value
print(json.dumps(found))
"""


def test_unprivileged_caller_keeps_the_sandbox_from_processes_outside_it(world_readable_package):
    """As uid 65534 (the harness itself, not root dropping privileges): in block mode the sandbox shares the caller's
    namespaces, and only its Landlock domain keeps it from a process of the same uid outside (the witness); in proxy
    mode the sandbox is in a user namespace of its own, which already keeps /proc/<pid>/mem and /proc/<pid>/fd from
    the unfiltered baseline too (those rows are then no evidence and skipped), while a signal to the same uid still
    passes there and the domain refuses it."""
    policy = load_policy("baseline")
    payload = json.dumps({
        "policy": str(world_readable_package / "pytest_sandbox/policy/bundled/baseline.toml"),
        "name": policy.name,
        "programs": {mode: [base64.b64encode(p).decode() for p in compile_policy(policy, mode).programs]
                     for mode in ("block", "proxy")},
    })
    found = _as_nobody(world_readable_package, UNPRIVILEGED_WITNESS_RUN, payload)
    rows = ("process_vm_readv-proc-mem-read", "process_vm_writev-proc-mem-write", "pidfd_getfd-proc-fd")
    assert found["block-landlock"].startswith("domain (ABI ") and found["proxy-landlock"].startswith("domain (ABI ")
    assert {row: found[f"block-{row}"] for row in (*rows, "pidfd_send_signal-kill")} == dict.fromkeys(
        (*rows, "pidfd_send_signal-kill"), "BLOCKED")
    assert {row: found[f"proxy-{row}"] for row in rows} == dict.fromkeys(rows, "SKIP")
    assert found["proxy-pidfd_send_signal-kill"] == "BLOCKED"
