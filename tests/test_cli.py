"""The ``pytest-sandbox`` console script, driven through ``main([...])``.

``run`` passes the command's stdio through at the file-descriptor level, so those tests use ``capfd``;
the other subcommands write through ``sys.stdout`` and use ``capsys``.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_sandbox.cli import bpf_output_paths, main
from pytest_sandbox.policy.diff import diff_outside_the_filter
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import NETWORK_MODES, ArgRule, InferenceRoute, Policy
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.semantic_diff import SemanticDiff, semantic_diff

ADDED_BY_PR_819 = (
    "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "setns", "umount2", "pivot_root", "userfaultfd", "perf_event_open",
)  # fmt: skip

# ptrace(PTRACE_PEEKDATA, -1, 0, 0): the catalogue's harmless ptrace call (never request 0, TRACEME).
PTRACE_ERRNO_SCRIPT = (
    "import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
    "result = libc.syscall(101, 2, -1, 0, 0); print('ptrace', result, ctypes.get_errno())"
)


def single_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -- run ----------------------------------------------------------------------------------------


def test_run_exits_with_the_commands_exit_status(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "block", "--", "/bin/sh", "-c", "exit 3"]) == 3


def test_run_passes_the_commands_stdout_through(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "block", "--", "/bin/sh", "-c", "echo through"]) == 0
    assert capfd.readouterr().out == "through\n"


def test_run_under_baseline_refuses_ptrace_with_eperm(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--policy", "baseline", "--mode", "block", "--", sys.executable, "-S", "-c",
                 PTRACE_ERRNO_SCRIPT]) == 0
    assert capfd.readouterr().out.strip() == "ptrace -1 1"


def test_run_in_proxy_mode_puts_the_command_in_a_fresh_network_namespace(
        capfd: pytest.CaptureFixture[str]) -> None:
    # A fresh network namespace's loopback is down, so even 127.0.0.1 is unreachable (ENETUNREACH);
    # in the host's namespace the same connect would be refused by the port instead (ECONNREFUSED).
    script = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9), timeout=2)\n"
              "except OSError as e:\n    print('failed', e.errno)\nelse:\n    print('connected')")
    assert main(["run", "--mode", "proxy", "--", sys.executable, "-S", "-c", script]) == 0
    assert capfd.readouterr().out.strip() == f"failed {errno.ENETUNREACH}"


def test_run_reports_a_killing_signal_as_128_plus_its_number(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "block", "--", "/bin/sh", "-c", "kill -SYS $$"]) == 128 + 31
    assert "killed by SIGSYS" in capfd.readouterr().err


def test_run_kills_a_command_that_outlives_its_timeout(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "block", "--timeout", "0.2", "--", "/bin/sh", "-c", "exec sleep 30"]) == 124
    assert "timed out" in capfd.readouterr().err


def test_run_with_an_unknown_policy_exits_2_with_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--policy", "no-such-policy", "--", "/bin/true"]) == 2
    captured = capfd.readouterr()
    assert single_line(captured.err).startswith("pytest-sandbox: policy 'no-such-policy' not found")
    assert "Traceback" not in captured.err


def test_run_of_a_missing_program_exits_2_with_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "block", "--", "/nonexistent/program"]) == 2
    assert "cannot launch '/nonexistent/program'" in single_line(capfd.readouterr().err)


def test_run_without_a_command_exits_2(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "block"]) == 2
    assert single_line(capfd.readouterr().err).startswith("pytest-sandbox: run needs a command")


def test_a_malformed_policy_file_exits_2_naming_the_field(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "bad.toml"
    policy.write_text('[seccomp]\ndeny = ["ptrace", "not_a_syscall"]\n')
    assert main(["explain", str(policy)]) == 2
    line = single_line(capsys.readouterr().err)
    assert "seccomp.deny[1]" in line and "not_a_syscall" in line


@pytest.mark.parametrize("argv", [
    ["run", "--mode", "sideways", "--", "/bin/true"],
    ["run", "--timeout", "-1", "--", "/bin/true"],
    ["export", "baseline", "--format", "elf"],
    ["frobnicate"],
    [],
])  # fmt: skip
def test_bad_flags_exit_2_without_a_traceback(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# -- diff ---------------------------------------------------------------------------------------


def test_diff_baseline_to_pre_819_names_every_weakening_and_exits_1(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "baseline", "openshell-pre-819"]) == 1
    out = capsys.readouterr().out
    weaker_section = out.split("WEAKER", 1)[1].split("STRONGER", 1)[0]
    # by behaviour (issue #13): each call pre-819 lets run that baseline refused, per ABI
    for name in ADDED_BY_PR_819:
        assert re.search(rf"\(x86_64\): ERRNO\(1\) -> ALLOW: .*\b{name}\b", weaker_section), name
    assert "clone (x86_64) when arg0 & 0x10000000 == 0x10000000 (e.g. arg0=0x10000000): ERRNO(1) -> ALLOW" in \
        weaker_section
    assert "clone3 (x86_64): ERRNO(38) -> ALLOW" in weaker_section
    # pre-819 skips the filter in allow mode: every x32 and i386 call the bad-arch action killed now runs
    assert "[allow mode] 548 syscalls (x32): KILL_PROCESS -> ALLOW" in weaker_section


def behaviour_diff(old: Policy, new: Policy, *, modes: tuple[str, ...] = NETWORK_MODES) -> SemanticDiff:
    """What ``pytest-sandbox diff`` computes: the filters by behaviour, the rest as settings."""
    return semantic_diff(old, new, modes=modes, outside_filter=diff_outside_the_filter(old, new))


def test_diff_pre_819_to_baseline_reports_the_same_changes_as_stronger() -> None:
    forward = behaviour_diff(load_policy("baseline"), load_policy("openshell-pre-819"))
    backward = behaviour_diff(load_policy("openshell-pre-819"), load_policy("baseline"))
    assert forward.weaker and len(backward.stronger) == len(forward.weaker)
    assert len(backward.weaker) == len(forward.stronger)
    # each line read backwards: "OLD -> NEW" becomes "NEW -> OLD"
    swapped = [re.sub(r"(\S+) -> (\S+?)(:|$)", r"\2 -> \1\3", line, count=1) for line in forward.weaker]
    assert sorted(swapped) == sorted(backward.stronger)


def test_diff_baseline_to_strict_exits_0_and_lists_what_got_stronger(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "baseline", "strict"]) == 0
    out = capsys.readouterr().out
    assert "WEAKER" not in out
    assert re.search(r"syscalls \(x86_64\): ALLOW -> ERRNO\(1\): .*open_by_handle_at", out)
    assert "ioctl (x86_64) when arg1 == 0x5412 (e.g. arg1=0x5412): ALLOW -> ERRNO(1)" in out
    assert "socket (x86_64) when arg0 == 0x26 (e.g. arg0=0x26): ALLOW -> ERRNO(1)" in out  # AF_ALG, every mode


def test_diff_as_json_lists_weaker_and_stronger(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "strict", "baseline", "--format", "json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["old"] == "strict" and document["new"] == "baseline"
    assert re.search(r"\(x86_64\): ERRNO\(1\) -> ALLOW: .*\bkcmp\b", "\n".join(document["weaker"]))
    assert document["stronger"] == []


def test_diff_of_a_policy_with_itself_finds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "baseline", "baseline"]) == 0
    assert "no enforcement differences" in capsys.readouterr().out


def test_diff_limited_to_one_mode_ignores_other_modes_filter_skips() -> None:
    old, new = load_policy("baseline"), load_policy("openshell-pre-819")
    assert any(line.startswith("[allow mode] ") for line in behaviour_diff(old, new).weaker)
    assert not any("allow mode" in line for line in behaviour_diff(old, new, modes=("proxy",)).weaker)


def test_diff_with_an_unknown_policy_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "baseline", "/nonexistent.toml"]) == 2
    assert single_line(capsys.readouterr().err).startswith("pytest-sandbox: policy '/nonexistent.toml'")


def test_changing_an_argument_rules_mask_counts_as_a_removed_and_an_added_rule() -> None:
    old = load_policy("baseline")
    narrowed = tuple(replace(r, mask=0x10000000 | 0x1, value=0x10000000) if r.syscall == "clone" else r
                     for r in old.seccomp.arg_rules)
    new = replace(old, seccomp=replace(old.seccomp, arg_rules=narrowed))
    diff = behaviour_diff(old, new)
    # the narrowed rule refuses a subset: exactly the calls with bit 0 set got through
    assert diff.weaker == ("clone (x86_64) when arg0 & 0x10000000 == 0x10000000 and arg0 & 0x10000001 != "
                           "0x10000000 (e.g. arg0=0x10000001): ERRNO(1) -> ALLOW",)
    assert diff.stronger == () and diff.changed == ()


def test_a_changed_why_text_is_not_a_change_in_enforcement() -> None:
    old = load_policy("baseline")
    reworded = tuple(replace(r, why="reworded") for r in old.seccomp.arg_rules)
    diff = behaviour_diff(old, replace(old, seccomp=replace(old.seccomp, arg_rules=reworded)))
    assert diff.weaker == diff.stronger == diff.changed == ()


@pytest.mark.parametrize(("change", "expected_weaker"), [
    (lambda p: replace(p, network=replace(p.network, mode="allow")), "network mode: proxy -> allow"),
    (lambda p: replace(p, seccomp=replace(p.seccomp, no_new_privs=False)), "no_new_privs disabled"),
    (lambda p: replace(p, seccomp=replace(p.seccomp, extra_arches=("x32",))),
     "clone (x32) when arg0 & 0x10000000 != 0x10000000 (e.g. all zero): KILL_PROCESS -> ALLOW"),
    (lambda p: replace(p, network=replace(p.network, allowed_ports=(80, 443, 22))),
     "egress port 22 now allowed"),
    (lambda p: replace(p, network=replace(p.network, allowed_hosts=("*", "10.0.0.1"))),
     "egress host '10.0.0.1' now allowed"),
    (lambda p: replace(p, inference_routes=(*p.inference_routes, InferenceRoute("POST", "/v1/files"))),
     "inference route POST /v1/files now routed"),
    (lambda p: replace(p, network=replace(p.network, socket_domains=())),
     "[block mode] socket (x86_64) when arg0 == 0x2 (e.g. arg0=0x2): ERRNO(1) -> ALLOW"),
    (lambda p: replace(p, seccomp=replace(p.seccomp, arg_rules=p.seccomp.arg_rules[1:])),
     "execveat (x86_64) when arg4 & 0x1000 == 0x1000 (e.g. arg4=0x1000): ERRNO(1) -> ALLOW"),
])  # fmt: skip
def test_each_kind_of_weakening_is_reported_as_weaker(change: Callable[[Policy], Policy],
                                                      expected_weaker: str) -> None:
    old = load_policy("baseline")
    diff = behaviour_diff(old, change(old))
    assert any(line.startswith(expected_weaker) for line in diff.weaker), diff.weaker
    assert diff.stronger == ()


@pytest.mark.parametrize("action", ["errno", "trap"])
def test_a_milder_bad_arch_action_is_a_change_of_refusal_not_a_weakening(action: str) -> None:
    """x32 and i386 calls are still refused (an errno, or SIGSYS that a handler may catch), just not killed:
    the diff lists it under CHANGED, with the refusal before and after."""
    old = load_policy("baseline")
    diff = behaviour_diff(old, replace(old, seccomp=replace(old.seccomp, bad_arch_action=action)))
    assert diff.weaker == diff.stronger == ()
    after = "ERRNO(1)" if action == "errno" else "TRAP"
    assert {line.split(":")[0] for line in diff.changed} == {"548 syscalls (x32)", "512 syscalls (i386)"}, diff.changed
    assert all(f": KILL_PROCESS -> {after}: " in line for line in diff.changed)


def test_a_stricter_network_mode_and_a_new_rule_are_stronger() -> None:
    old = load_policy("baseline")
    rule = ArgRule("personality", 0, "eq", 0xFFFFFFFF, why="query only")
    new = replace(old, network=replace(old.network, mode="block"),
                  seccomp=replace(old.seccomp, arg_rules=(*old.seccomp.arg_rules, rule),
                                  default_action="errno"))
    diff = behaviour_diff(old, new)
    assert diff.weaker == ()
    assert "network mode: proxy -> block" in diff.stronger
    # the default action errno refuses every call the baseline let through, personality's included
    assert any(re.search(r"syscalls \(x86_64\): ALLOW -> ERRNO\(1\): .*\bgetppid\b", line) for line in diff.stronger)
    assert "personality (x86_64) when arg0 == 0xffffffff (e.g. arg0=0xffffffff): ALLOW -> ERRNO(1)" in diff.stronger


# -- export -------------------------------------------------------------------------------------


def test_export_pfc_shows_the_kill_process_bad_arch_action(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "baseline", "--format", "pfc"]) == 0
    out = capsys.readouterr().out
    assert "KILL_PROCESS" in out
    assert 'syscall "ptrace"' in out


def test_export_bpf_writes_each_program_as_whole_instructions_in_load_order(tmp_path: Path) -> None:
    target = tmp_path / "baseline.bpf"
    assert main(["export", "baseline", "--mode", "proxy", "--format", "bpf", "-o", str(target)]) == 0
    enosys_program, main_program = bpf_output_paths(str(target), 2)
    assert enosys_program.name == "baseline.0.bpf" and main_program.name == "baseline.1.bpf"
    for path in (enosys_program, main_program):
        size = len(path.read_bytes())
        assert size > 0 and size % 8 == 0  # struct sock_filter is 8 bytes
    # The clone3 ENOSYS filter is loaded first and is the smaller one.
    assert len(enosys_program.read_bytes()) < len(main_program.read_bytes())


def test_export_of_a_single_program_goes_to_the_named_file(tmp_path: Path) -> None:
    target = tmp_path / "pre819.bpf"
    assert main(["export", "openshell-pre-819", "--mode", "proxy", "--format", "bpf", "-o", str(target)]) == 0
    assert len(target.read_bytes()) % 8 == 0 and len(target.read_bytes()) > 0


def test_export_bpf_of_two_programs_without_output_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "baseline", "--format", "bpf"]) == 2
    assert "give -o FILE" in single_line(capsys.readouterr().err)


def test_export_of_a_mode_without_a_filter_exits_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "openshell-pre-819", "--mode", "allow", "--format", "bpf",
                 "-o", str(tmp_path / "f.bpf")]) == 2
    assert "installs no seccomp filter in allow mode" in single_line(capsys.readouterr().err)


def test_export_into_a_missing_directory_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "baseline", "-o", "/nonexistent-dir/x.pfc"]) == 2
    assert single_line(capsys.readouterr().err).startswith("pytest-sandbox: No such file or directory")


# -- explain ------------------------------------------------------------------------------------


def test_explain_baseline_covers_rules_domains_routes_and_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "baseline"]) == 0
    out = capsys.readouterr().out
    assert "clone3 -> ENOSYS" in out
    assert "CLONE_NEWUSER through clone(2), PR #819" in out
    assert "block: AF_PACKET, AF_BLUETOOTH, AF_VSOCK, AF_INET, AF_INET6, AF_NETLINK" in out
    assert "POST /v1/chat/completions" in out
    assert "kill_process" in out
    count = compile_policy(load_policy("baseline"), "proxy").instruction_count
    assert count > 0 and f"BPF: {count} instructions" in out


def test_explain_says_when_a_mode_runs_without_any_filter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "openshell-pre-819", "--mode", "allow"]) == 0
    out = capsys.readouterr().out
    assert "NO FILTER" in out and "BPF: 0 instructions" in out


def test_explain_names_as_other_abis_only_those_the_policy_does_not_admit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "baseline", "--mode", "proxy"]) == 0
    assert "architectures admitted: x86_64 (native); any other ABI (x32, i386 int 0x80): kill_process" in (
        capsys.readouterr().out)
    # Podman's profile admits x86 and x32 beside x86_64: nothing of those is "other".
    podman = Path(__file__).resolve().parents[1] / "fixtures" / "profiles" / "podman-default.json"
    assert main(["explain", str(podman)]) == 0
    assert "architectures admitted: x86_64 (native), x86, x32; any other ABI: kill_process" in capsys.readouterr().out
