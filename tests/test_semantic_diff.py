"""``pytest-sandbox diff`` by behaviour (issue #13 item 7): the compiled filters evaluated on the same space.

Each case is one the rule-text diff got wrong: deny-everything reported weaker than baseline, an argument
rule "removed" from a call the new profile refuses anyway, a false "clone3 reaches the kernel", Docker's
added AF_ALG refusal exiting 1, every socket change repeated for three network modes an OCI profile lacks.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_sandbox.cli import main
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.seccomp.behaviour import ABIS, Stack, classes, compare, number_of
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.semantic_diff import semantic_diff

ROOT = Path(__file__).resolve().parents[1]
DOCKER_LIKE = ROOT / "fixtures/oci/docker-like-default.json"
DENY_EVERYTHING = """
name = "deny-everything"
[seccomp]
default_action = "errno"
errno = "EPERM"
bad_arch_action = "kill_process"
[network]
mode = "proxy"
"""


def with_seccomp(policy: Policy, name: str, **changes: object) -> Policy:
    return replace(policy, name=name, seccomp=replace(policy.seccomp, **changes))


def test_deny_everything_is_stronger_than_baseline_not_weaker(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "deny.toml"
    path.write_text(DENY_EVERYTHING)
    assert main(["diff", "baseline", str(path)]) == 0
    out = capsys.readouterr().out
    assert "WEAKER" not in out
    assert "syscalls (x86_64): ALLOW -> ERRNO(1): read, write," in out
    # clone3 is still refused (EPERM instead of ENOSYS): a change of form, not a call reaching the kernel
    assert "clone3 (x86_64): ERRNO(38) -> ERRNO(1)" in out.split("CHANGED", 1)[1]
    # and the other way round every one of those is weaker, exit 1
    assert main(["diff", str(path), "baseline"]) == 1


def test_dropping_an_argument_rule_of_a_call_now_refused_outright_is_not_weaker():
    baseline = load_policy("baseline")
    refused_outright = with_seccomp(
        baseline, "no-unshare-clone-rules", deny=(*baseline.seccomp.deny, "unshare"),
        arg_rules=tuple(r for r in baseline.seccomp.arg_rules if r.syscall != "unshare"))
    diff = semantic_diff(baseline, refused_outright)
    assert not diff.weaker, diff.weaker
    assert any(line.startswith("unshare (x86_64) when arg0 & 0x10000000 != 0x10000000") for line in diff.stronger)


def test_a_denied_call_now_allowed_is_weaker_and_named_per_abi(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]):
    baseline = load_policy("baseline")
    weakened = with_seccomp(baseline, "no-ptrace", deny=tuple(n for n in baseline.seccomp.deny if n != "ptrace"),
                            extra_arches=("x86",))
    diff = semantic_diff(baseline, weakened, modes=("proxy",))
    assert "ptrace (x86_64): ERRNO(1) -> ALLOW" in diff.weaker
    # i386 now admitted, and ptrace not refused there; what the new rules refuse on i386 is a change of form
    assert any(re.match(r"\d+ syscalls \(i386\): KILL_PROCESS -> ALLOW: .*\bptrace\b", line) for line in diff.weaker)
    assert any(re.match(r"\d+ syscalls \(i386\): KILL_PROCESS -> ERRNO\(1\): .*\bsetns\b", line)
               for line in diff.changed)
    # the same hole through the CLI: exit 1
    path = tmp_path / "no-ptrace.toml"
    text = (ROOT / "pytest_sandbox/policy/bundled/baseline.toml").read_text().replace('"memfd_create", "ptrace",',
                                                                                      '"memfd_create",')
    path.write_text(text)
    assert main(["diff", "baseline", str(path), "--mode", "proxy"]) == 1
    assert "ptrace (x86_64): ERRNO(1) -> ALLOW" in capsys.readouterr().out


def _docker_like_allowing_every_socket(directory: Path) -> Path:
    """The Docker-like profile before an AF_ALG refusal: socket allowed whatever the family."""
    profile = json.loads(DOCKER_LIKE.read_text())
    profile["syscalls"] = [r for r in profile["syscalls"] if r["names"] != ["socket"]]
    profile["syscalls"].append({"names": ["socket"], "action": "SCMP_ACT_ALLOW"})
    path = directory / "docker-like-every-socket.json"
    path.write_text(json.dumps(profile))
    return path


def test_docker_like_adding_af_alg_refusal_is_stronger_exit_0_once_not_per_network_mode(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    older = _docker_like_allowing_every_socket(tmp_path)
    assert main(["diff", str(older), str(DOCKER_LIKE)]) == 0
    out = capsys.readouterr().out
    assert "WEAKER" not in out
    stronger = out.split("STRONGER", 1)[1]
    # AF_ALG (38) and AF_VSOCK (40): the profile allows < 38, == 39 and > 40 (all 64 bits compared: arg0.hi)
    lines = [line.strip("- ").split(" when ", 1) for line in stronger.splitlines() if " when " in line]
    conditions = {(head, frozenset(rest.split(" (e.g. ")[0].split(" and ")), rest.split(": ", 1)[1])
                  for head, rest in lines}
    assert ("socket (x86_64)", frozenset({"arg0 != 0x27", "arg0.hi == 0x0", "arg0 >= 0x26", "arg0 <= 0x28"}),
            "ALLOW -> ERRNO(1)") in conditions, stronger
    assert "mode]" not in out and "block" not in out  # an OCI profile has no network modes: no repetition
    assert main(["diff", str(DOCKER_LIKE), str(older), "--format", "json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert len(document["modes"]) == 1 and any("(e.g. arg0=0x26)" in line for line in document["weaker"])


def test_a_toml_policy_against_a_profile_is_compared_in_the_policys_own_mode_only():
    diff = semantic_diff(load_policy("baseline"), load_policy(str(DOCKER_LIKE)))
    assert diff.modes == ("proxy",)
    assert not any(line.startswith("[") for line in (*diff.weaker, *diff.stronger, *diff.changed))


def test_argument_classes_come_from_the_comparisons_the_program_makes():
    programs = compile_policy(load_policy("baseline"), "proxy").programs
    socket = number_of(ABIS[0], "socket")
    assert socket is not None
    found = {c.args[0] & 0xFFFFFFFF: c.results[0].describe() for c in classes((programs,), ABIS[0], socket)}
    assert found[17] == found[31] == found[40] == "ERRNO(1)"  # AF_PACKET, AF_BLUETOOTH, AF_VSOCK
    assert found[0] == "ALLOW" and len(found) == 4
    # high bits do not split a 32-bit masked compare: libseccomp's high word is compared under mask 0
    assert all(not c.args[0] >> 32 for c in classes((programs,), ABIS[0], socket))


def test_a_requirement_that_fences_off_an_abi_is_judged_there_by_its_own_rules():
    programs = compile_policy(load_policy("baseline"), "proxy").programs
    fenced = Stack(programs, frozenset({"x32", "i386"}))
    as_is = compare(programs, ())
    by_rules = compare(fenced, ())
    assert any(c.abi == "i386" and c.syscall == "getpid" for c in as_is.weaker)  # the bad-arch kill
    assert not any(c.syscall == "getpid" for c in by_rules.weaker)  # baseline's rules do not refuse getpid
    assert any(c.abi == "i386" and c.syscall == "ptrace" for c in by_rules.weaker)


def test_a_call_with_more_argument_classes_than_the_bound_is_reported_not_silently_cut():
    import struct

    from pytest_sandbox.seccomp.behaviour import MAX_PATHS_PER_CALL, explore
    from pytest_sandbox.verdicts.judgement import Verdict
    from pytest_sandbox.verdicts.loaded_filter import judge_coverage

    values = range(MAX_PATHS_PER_CALL + 10)
    body = [(0x20, 0, 0, 0), (0x15, 1, 0, 0), (0x06, 0, 0, 0x7FFF0000),  # only nr 0 (read) is ruled
            (0x20, 0, 0, 16)]  # ld arg0 (low word)
    for index, value in enumerate(values):  # jeq #value -> ret ERRNO(index + 1); else the next comparison
        body += [(0x15, 0, 1, value), (0x06, 0, 0, 0x00050000 | (index + 1))]
    body.append((0x06, 0, 0, 0x7FFF0000))
    program = b"".join(struct.pack("<HBBI", *i) for i in body)
    found, complete = explore(((program,),), ABIS[0], 0)
    assert not complete and len(found) == MAX_PATHS_PER_CALL
    diff = compare((program,), (program,))
    assert "read (x86_64)" in diff.incomplete
    judgement = judge_coverage([("the requirement", diff)], "loaded")
    assert judgement.verdict is Verdict.INDETERMINATE and "read (x86_64)" in judgement.reason
