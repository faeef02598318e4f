"""Every bad input is ONE line naming the file (or option) and the fix, at startup, never a traceback.

Issue #10 items 3, 7 and 8: each input below once produced a traceback (RecursionError, MemoryError,
AttributeError, ImportError, ValueError), a bare ``OSError: [Errno 22]`` per test after minutes of
compiling, or an error after the whole run. Each goes through the real entry points: ``pytest --sandbox``
(pytester, in a subprocess) and the ``pytest-sandbox`` console script (``export``, which must refuse
to write a program the kernel would refuse). The pure checks are table-tested at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.policy.checks import (
    BPF_MAXINSNS,
    MAX_EXTENDS_DEPTH,
    MAX_INSNS_PER_PATH,
    MAX_POLICY_BYTES,
    decode_policy_bytes,
    extends_problem,
    program_size_problem,
)
from pytest_sandbox.policy.load import load_policy

ROOT = Path(__file__).resolve().parents[1]
USAGE = 4  # pytest's exit status for a UsageError
CLI_USAGE = 2  # the console script's status for bad input


@pytest.fixture(autouse=True)
def pytester_imports_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester's subprocesses run elsewhere, where an editable install may point at another checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def arg_rules(count: int) -> str:
    """A policy with ``count`` argument rules on ioctl: each a distinct comparison (issue #10 item 3)."""
    rules = "".join(f'[[seccomp.arg_rules]]\nsyscall = "ioctl"\narg = 1\nop = "eq"\nvalue = {i}\n\n'
                    for i in range(count))
    return 'extends = "baseline"\n\n' + rules


# Each bad policy: (file name, how to write it into a directory, what the one line must say).
BAD_POLICIES: dict[str, tuple[str, Callable[[Path], Path], tuple[str, ...]]] = {
    "binary-json": ("policy.json", lambda d: _write(d / "policy.json", b"\x00\x01\x02\xff{\"syscalls\": []}"),
                    ("binary data", "give a TOML policy or an OCI seccomp profile")),
    "not-utf8": ("policy.toml", lambda d: _write(d / "policy.toml", b'name = "caf\xe9"\n'),
                 ("not UTF-8 text", "save the policy as UTF-8")),
    "dev-zero": ("/dev/zero", lambda d: Path("/dev/zero"), ("not a regular file", "give the path of a policy file")),
    "too-large": ("huge.toml", lambda d: _write(d / "huge.toml", b"#" * (MAX_POLICY_BYTES + 1)),
                  ("larger than 4 MiB", "split it")),
    "arch-map-string": ("archmap.json", lambda d: _write(d / "archmap.json", json.dumps(
        {"defaultAction": "SCMP_ACT_ALLOW", "archMap": "SCMP_ARCH_X86_64", "syscalls": []}).encode()),
        ("archMap: must be a list of objects", '"architecture": "SCMP_ARCH_X86_64"')),
    "architectures-string": ("arches.json", lambda d: _write(d / "arches.json", json.dumps(
        {"defaultAction": "SCMP_ACT_ALLOW", "architectures": "SCMP_ARCH_X86", "syscalls": []}).encode()),
        ("architectures: must be a list of architecture names",)),
    "extends-cycle": ("a.toml", lambda d: (_write(d / "b.toml", b'extends = "a.toml"\n'),
                                           _write(d / "a.toml", b'extends = "b.toml"\n'))[1],
                      ("extends: a cycle", "a.toml -> ", "b.toml -> ", "remove the extends that points back")),
    "extends-itself-via-path": ("self.toml", lambda d: _write(d / "self.toml", b'extends = "./self.toml"\n'),
                                ("extends", "self.toml")),
    "errno-out-of-range": ("errno.toml", lambda d: _write(d / "errno.toml", b"[seccomp]\nerrno = 5000\n"),
                           ("seccomp.errno: 5000 is out of range", "0..4094")),
    "oci-errno-out-of-range": ("errret.json", lambda d: _write(d / "errret.json", json.dumps(
        {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000, "syscalls": []}).encode()),
        ("defaultErrnoRet: 70000 is not an errno in 1..4094",)),
    "ten-thousand-arg-rules": ("big.toml", lambda d: _write(d / "big.toml", arg_rules(10_000).encode()),
                               ("BPF instructions", f"limit of {BPF_MAXINSNS} per seccomp program",
                                "BPF_MAXINSNS", "masked_eq")),
}  # fmt: skip


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def one_error_line(output: str, prefix: str) -> str:
    """The single line starting with ``prefix``; no traceback anywhere in ``output``."""
    assert "Traceback" not in output and "INTERNALERROR" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@pytest.mark.parametrize("name", BAD_POLICIES)
def test_a_bad_policy_is_one_line_before_any_test_runs(pytester: pytest.Pytester, tmp_path: Path, name: str):
    _, write, says = BAD_POLICIES[name]
    policy = write(tmp_path)
    pytester.makepyfile("def test_never_runs():\n    raise AssertionError('a test ran')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox", f"--sandbox-policy={policy}",
                                           timeout=120)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == USAGE, output[-3000:]
    line = one_error_line(output, "ERROR: pytest-sandbox: ")
    assert str(policy) in line or policy.name in line, line
    for part in says:
        assert part in line, line
    assert "a test ran" not in output and "passed" not in output and "failed" not in output


@pytest.mark.parametrize("name", BAD_POLICIES)
def test_export_refuses_the_same_policies_with_the_same_line(tmp_path: Path, name: str):
    _, write, says = BAD_POLICIES[name]
    policy = write(tmp_path)
    output = tmp_path / "out" / "filter.bpf"
    output.parent.mkdir()
    completed = subprocess.run([sys.executable, "-m", "pytest_sandbox.cli", "export", str(policy), "--format", "bpf",
                                "-o", str(output)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert completed.returncode == CLI_USAGE, completed.stderr[-3000:]
    line = one_error_line(completed.stdout + completed.stderr, "pytest-sandbox: ")
    for part in says:
        assert part in line, line
    assert not any(output.parent.iterdir()), "a program was written"


BAD_OPTIONS = {
    "identities": (["--sandbox-identities=bogus"], "--sandbox-identities: unknown identity 'bogus'"),
    "identities-empty": (["--sandbox-identities=,"], "--sandbox-identities is empty"),
    "modes-empty": (["--sandbox-modes=,"], "--sandbox-modes is empty"),
    "caps": (["--sandbox-caps=CAP_BOGUS"], "--sandbox-caps 'CAP_BOGUS': unknown capability"),
    "report-missing-dir": (["--sandbox-report={tmp}/missing/report.json"],
                           "does not exist or is not writable; create it first"),
    "exec-missing": (["--sandbox-exec=/nonexistent/launcher --flag"], "launcher '/nonexistent/launcher' not found"),
    "exec-quoting": (["--sandbox-exec='bwrap --"], "cannot split it into words (No closing quotation)"),
}


@pytest.mark.parametrize("name", BAD_OPTIONS)
def test_a_bad_option_is_one_line_at_startup(pytester: pytest.Pytester, tmp_path: Path, name: str):
    options, says = BAD_OPTIONS[name]
    pytester.makepyfile("def test_never_runs():\n    raise AssertionError('a test ran')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox",
                                           *(o.format(tmp=tmp_path) for o in options), timeout=120)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == USAGE, output[-3000:]
    assert says in one_error_line(output, "ERROR: pytest-sandbox: ")
    assert "a test ran" not in output
    assert not (tmp_path / "missing").exists()


def test_a_missing_launcher_under_xdist_is_still_one_line(pytester: pytest.Pytester):
    """Each xdist worker configures the plugin too: the error must not become one traceback per worker."""
    pytester.makepyfile("def test_never_runs():\n    raise AssertionError('a test ran')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox", "--sandbox-exec=/nonexistent/x",
                                           "-n", "2", timeout=120)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == USAGE, output[-3000:]
    assert "launcher '/nonexistent/x' not found" in one_error_line(output, "ERROR: pytest-sandbox: ")


def test_pyseccomp_that_cannot_load_is_one_line_with_the_fix(pytester: pytest.Pytester, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """A host without libseccomp: pyseccomp's import fails (shadowed here by a module that raises as
    ctypes does when libseccomp.so.2 is missing)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "pyseccomp.py").write_text('raise ImportError("libseccomp.so.2: cannot open shared object file")\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shadow), os.environ["PYTHONPATH"]]))
    pytester.makepyfile("def test_never_runs():\n    raise AssertionError('a test ran')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox", timeout=120)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == USAGE, output[-3000:]
    line = one_error_line(output, "ERROR: pytest-sandbox: ")
    assert "pyseccomp cannot be loaded (libseccomp.so.2" in line and "apt-get install libseccomp2" in line
    completed = subprocess.run([sys.executable, "-m", "pytest_sandbox.cli", "explain", "baseline"],
                               capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert completed.returncode == CLI_USAGE
    assert "pyseccomp cannot be loaded" in one_error_line(completed.stderr, "pytest-sandbox: ")


def test_libseccomp_einval_names_what_was_being_added():
    """libseccomp's bare EINVAL becomes a line naming the rule being added and the filter it was going into."""
    from pytest_sandbox.policy.model import Policy
    from pytest_sandbox.seccomp.compiler import compile_plan
    from pytest_sandbox.seccomp.filter_plan import plan_policy

    policy: Policy = load_policy("baseline")
    plan = plan_policy(policy, "proxy")
    main = plan.filters[-1]
    # A rule on syscall number -1: libseccomp refuses it with EINVAL (seccomp_rule_add(3)).
    bogus = replace(main.rules[0], syscall=-1)
    broken = replace(plan, filters=(*plan.filters[:-1], replace(main, rules=(bogus, *main.rules[1:]))))
    with pytest.raises(PolicyError) as raised:
        compile_plan(broken)
    message = str(raised.value)
    assert "\n" not in message
    assert message == (f"{policy.source}: {', '.join(bogus.sources)}: rule {bogus.describe()} in the {main.role} "
                       "filter: libseccomp refused it (EINVAL: invalid for this syscall or architecture)")


# -- the pure checks ------------------------------------------------------------------------------------


def test_program_size_is_checked_per_program_and_per_path():
    ok = b"\x00" * 8 * BPF_MAXINSNS
    assert program_size_problem("p.toml", "proxy", [ok]) is None
    problem = program_size_problem("p.toml", "proxy", [b"\x00" * 8 * 9, b"\x00" * 8 * (BPF_MAXINSNS + 1)])
    assert problem is not None and problem.startswith("p.toml: filter 2 of 2 compiles to 4097 BPF instructions")
    stacked = [ok] * (MAX_INSNS_PER_PATH // BPF_MAXINSNS)  # each counts 4 more: just over the path limit
    problem = program_size_problem("p.toml", "block", stacked)
    assert problem is not None and "MAX_INSNS_PER_PATH" in problem


def test_a_policy_just_under_the_rule_floor_is_still_checked_after_compiling(tmp_path: Path):
    """4,060 distinct rules pass the cheap floor; the compiled program (4,141 instructions) does not."""
    from pytest_sandbox.seccomp.compiler import compile_policy

    path = _write(tmp_path / "edge.toml", arg_rules(4_060).encode())
    policy = load_policy(path)
    with pytest.raises(PolicyError, match=r"compiles to \d+ BPF instructions in proxy mode, over the kernel's limit "
                                          r"of 4096 per seccomp program"):
        compile_policy(policy, "proxy")


def test_extends_chains_are_bounded_and_cycles_named(tmp_path: Path):
    chain = [tmp_path / f"{i}.toml" for i in range(3)]
    problem = extends_problem(chain, chain[1])
    assert problem == (f"{chain[2]}: extends: a cycle ({chain[1]} -> {chain[2]} -> {chain[1]}); remove the extends "
                       "that points back")
    deep = [tmp_path / f"{i}.toml" for i in range(MAX_EXTENDS_DEPTH)]
    assert "more than 16 levels" in (extends_problem(deep, tmp_path / "next.toml") or "")
    assert extends_problem(chain, tmp_path / "other.toml") is None


def test_a_long_extends_chain_is_one_line_not_a_recursion_error(tmp_path: Path):
    for i in range(40):
        (tmp_path / f"p{i}.toml").write_text(f'extends = "p{i + 1}.toml"\n' if i < 39 else 'extends = "baseline"\n')
    with pytest.raises(PolicyError, match="more than 16 levels of extends"):
        load_policy(tmp_path / "p0.toml")
    (tmp_path / "p20.toml").write_text('extends = "baseline"\n')
    assert load_policy(tmp_path / "p8.toml").name == "p8"  # 13 files and the baseline


@pytest.mark.parametrize(("data", "says"), [
    (b"\x00abc", "binary data (a NUL byte at offset 0)"),
    (b"name = '\xff'", "not UTF-8 text (byte 8)"),
])
def test_undecodable_policy_bytes(data: bytes, says: str):
    with pytest.raises(PolicyError, match=says.replace("(", r"\(").replace(")", r"\)")):
        decode_policy_bytes(Path("x.toml"), data)
