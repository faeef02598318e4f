"""The reference sandbox as an unprivileged caller: the harness itself runs as uid 65534 (not root
dropping privileges for it), so proxy mode must build its private network namespace inside a user
namespace, drop the mapped-root capabilities, and still prove every deny."""

from __future__ import annotations

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


def test_unprivileged_caller_proves_every_baseline_deny_in_proxy_mode(world_readable_package):
    policy = load_policy("baseline")
    compiled = compile_policy(policy, "proxy", sentinel=True)
    import base64

    payload = json.dumps({
        "policy": str(world_readable_package / "pytest_sandbox/policy/bundled/baseline.toml"),
        "name": compiled.policy_name,
        "programs": [base64.b64encode(p).decode() for p in compiled.programs],
        "actions": [[a.rule, a.errno] for a in compiled.actions],
    })
    completed = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c", UNPRIVILEGED_RUN],
        input=payload, capture_output=True, text=True, timeout=300, cwd="/",
        env={"PYTHONPATH": str(world_readable_package), "PATH": "/usr/bin:/bin"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    verdicts = json.loads(completed.stdout)
    not_proven = {case: v for case, v in verdicts.items() if v not in ("BLOCKED", "WORKS")}
    assert not_proven == {}
    assert sum(v == "BLOCKED" for v in verdicts.values()) >= 90
