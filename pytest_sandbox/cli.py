"""The ``pytest-sandbox`` console script: what is not a test run.

``run``      run a command under a policy (stdio passed through, exit status passed back);
``diff``     what became weaker or stronger between two policies, before anything runs;
``export``   the compiled seccomp filter as raw BPF or libseccomp pseudo filter code (PFC);
``explain``  a readable summary of what a policy enforces and why.

Every :class:`~pytest_sandbox.errors.SandboxError` becomes one line ``pytest-sandbox: <message>`` on
stderr and exit status 2 (argparse uses 2 for bad flags as well); never a traceback.
This module parses arguments and runs commands; the policy comparison (``policy/diff.py``) and the
summary (``policy/explain.py``) are pure and live with the policy.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TextIO

from pytest_sandbox.errors import SandboxError
from pytest_sandbox.policy.diff import diff_outside_the_filter
from pytest_sandbox.policy.explain import explain_policy
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import NETWORK_MODES, Policy

PROG = "pytest-sandbox"
EXIT_USAGE = 2  # argparse's own status for bad flags; used for every bad input
EXIT_TIMEOUT = 124  # timeout(1)'s convention for "the command ran out of time"
# Signals a user sends to the CLI that must reach the sandboxed command: the spawner puts the command
# in its own process group and session, so the terminal's Ctrl-C never reaches it directly.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class CliError(SandboxError):
    """Bad command-line input found after argument parsing (e.g. binary output to a terminal)."""


# --------------------------------------------------------------------------------------------
# export


def bpf_output_paths(output: str, count: int) -> list[Path]:
    """Where ``export --format bpf -o OUTPUT`` writes ``count`` programs.

    One program goes to OUTPUT itself. Several go to OUTPUT.0.bpf, OUTPUT.1.bpf, ... in load order
    (a trailing ``.bpf`` on OUTPUT is not doubled: ``f.bpf`` -> ``f.0.bpf``); a loader must install
    them in that order because the last one blocks further ``seccomp(SECCOMP_SET_MODE_FILTER)``.
    """
    if count == 1:
        return [Path(output)]
    stem = output[: -len(".bpf")] if output.endswith(".bpf") else output
    return [Path(f"{stem}.{index}.bpf") for index in range(count)]


# --------------------------------------------------------------------------------------------
# Commands


def _mode_of(policy: Policy, requested: str | None) -> str:
    return requested or policy.network.mode


def _write_text(text: str, output: str | None, stdout: TextIO) -> None:
    if output is None:
        stdout.write(text)
    else:
        Path(output).write_text(text)


def _command_diff(args: argparse.Namespace) -> int:
    from pytest_sandbox.seccomp.semantic_diff import format_semantic_json, format_semantic_text, semantic_diff

    old, new = load_policy(args.old), load_policy(args.new)
    diff = semantic_diff(old, new, modes=(args.mode,) if args.mode else NETWORK_MODES,
                         outside_filter=diff_outside_the_filter(old, new))
    sys.stdout.write(format_semantic_json(diff) if args.format == "json" else format_semantic_text(diff))
    return 1 if diff.is_weaker else 0


def _command_explain(args: argparse.Namespace) -> int:
    from pytest_sandbox.seccomp.compiler import compile_policy

    policy = load_policy(args.policy)
    mode = _mode_of(policy, args.mode)
    from pytest_sandbox.probes.syscall_cases import unprobed_refusals

    unprobed = [u.describe() for u in unprobed_refusals(policy)]
    sys.stdout.write(explain_policy(policy, mode, compile_policy(policy, mode).instruction_count, unprobed))
    return 0


def _command_export(args: argparse.Namespace) -> int:
    from pytest_sandbox.seccomp.compiler import compile_policy, export_pfc

    policy = load_policy(args.policy)
    mode = _mode_of(policy, args.mode)
    if args.format == "pfc":
        _write_text(export_pfc(policy, mode), args.output, sys.stdout)
        return 0
    programs = compile_policy(policy, mode).programs
    if not programs:
        raise CliError(f"policy {policy.name} installs no seccomp filter in {mode} mode; nothing to export")
    if args.output is None:
        if len(programs) > 1:
            raise CliError(f"policy {policy.name} compiles to {len(programs)} BPF programs in {mode} mode; "
                           "give -o FILE (they are written as FILE.0.bpf, FILE.1.bpf in load order)")
        if sys.stdout.isatty():
            raise CliError("refusing to write binary BPF to a terminal; give -o FILE or redirect stdout")
        sys.stdout.flush()
        sys.stdout.buffer.write(programs[0])
        sys.stdout.buffer.flush()
        return 0
    for path, program in zip(bpf_output_paths(args.output, len(programs)), programs, strict=True):
        path.write_bytes(program)
        print(f"{path}: {len(program) // 8} instructions", file=sys.stderr)
    return 0


def _exit_status(returncode: int, argv0: str) -> int:
    """The shell's convention: a command killed by signal N exits 128 + N."""
    if returncode >= 0:
        return returncode
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    print(f"{PROG}: {argv0} killed by {name}", file=sys.stderr)
    return 128 + number


def _command_run(args: argparse.Namespace) -> int:
    from pytest_sandbox.seccomp.compiler import compile_policy
    from pytest_sandbox.seccomp.launcher import Identity, NetworkPlacement, Sandbox, SandboxSpec, check_host_support

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("run needs a command after '--', e.g. pytest-sandbox run -- /bin/true")
    policy = load_policy(args.policy)
    mode = _mode_of(policy, args.mode)
    identity = Identity.current()
    check_host_support(mode, identity)
    spec = SandboxSpec(compile_policy(policy, mode), NetworkPlacement(mode), identity)
    # stdio None = inherit: the command reads and writes this process's stdin/stdout/stderr directly.
    sys.stdout.flush()
    sys.stderr.flush()
    with Sandbox(spec) as sandbox:
        process = sandbox.popen(command, stdin=None, stdout=None, stderr=None, cwd=os.getcwd())
        with _SignalForwarding(process.send_signal):
            try:
                returncode = process.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                print(f"{PROG}: {command[0]} timed out after {args.timeout} s and was killed",
                      file=sys.stderr)
                return EXIT_TIMEOUT
    return _exit_status(returncode, command[0])


class _SignalForwarding:
    """Forward FORWARDED_SIGNALS to the sandboxed command's process group while it runs."""

    def __init__(self, forward: Callable[[int], None]) -> None:
        self.forward = forward
        self.previous: dict[int, object] = {}

    def _handler(self, number: int, _frame: FrameType | None) -> None:
        self.forward(number)

    def __enter__(self) -> None:
        for number in FORWARDED_SIGNALS:
            self.previous[number] = signal.signal(number, self._handler)

    def __exit__(self, *exc: object) -> None:
        for number, previous in self.previous.items():
            signal.signal(number, previous)  # type: ignore[arg-type]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run, compare, export and explain pytest-sandbox policies.",
        epilog="POLICY is a bundled name (baseline, strict, openshell-pre-819) or a path to a TOML policy.")
    commands = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)
    modes = {"choices": NETWORK_MODES, "default": None,
             "help": "network mode (default: the policy's own network.mode)"}

    run = commands.add_parser("run", help="run a command under a policy",
                              description="Run CMD under the policy's seccomp filter and network placement; "
                                          "stdio is passed through and CMD's exit status is returned "
                                          "(128+N if killed by signal N, 124 on --timeout). In proxy mode "
                                          "CMD gets a fresh private network namespace with only loopback.")
    run.add_argument("--policy", default="baseline", help="policy name or path (default: baseline)")
    run.add_argument("--mode", **modes)  # type: ignore[arg-type]
    run.add_argument("--timeout", type=_positive_seconds, default=None, help="kill CMD after S seconds")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    run.set_defaults(handler=_command_run)

    diff = commands.add_parser("diff", help="what became weaker or stronger between two policies",
                               description="Compare two policies by behaviour: both compiled filters are "
                                           "evaluated on every syscall number (x86_64, x32, i386) and argument "
                                           "class; network settings and no_new_privs are compared as settings. "
                                           "Exit 1 if anything became weaker, else 0.")
    diff.add_argument("old", metavar="OLD")
    diff.add_argument("new", metavar="NEW")
    diff.add_argument("--mode", choices=NETWORK_MODES, default=None,
                      help="compare only this network mode's socket domains and filter skips (default: all)")
    diff.add_argument("--format", choices=("text", "json"), default="text")
    diff.set_defaults(handler=_command_diff)

    export = commands.add_parser("export", help="the compiled seccomp filter as BPF or PFC",
                                 description="bpf: raw sock_filter bytes. One program goes to -o FILE or "
                                             "stdout; several (an ENOSYS filter then the main filter) need "
                                             "-o FILE and are written as FILE.0.bpf, FILE.1.bpf in load "
                                             "order. pfc: libseccomp pseudo filter code (text).")
    export.add_argument("policy", metavar="POLICY")
    export.add_argument("--mode", **modes)  # type: ignore[arg-type]
    export.add_argument("--format", choices=("bpf", "pfc"), default="pfc")
    export.add_argument("-o", "--output", metavar="FILE", default=None)
    export.set_defaults(handler=_command_export)

    explain = commands.add_parser("explain", help="a readable summary of a policy")
    explain.add_argument("policy", metavar="POLICY")
    explain.add_argument("--mode", **modes)  # type: ignore[arg-type]
    explain.set_defaults(handler=_command_explain)

    conformance = commands.add_parser(
        "conformance", help="run the installed conformance suite (pytest options and --sandbox-* pass through)",
        description="Runs `pytest --sandbox --pyargs pytest_sandbox.conformance ARGS`: the whole suite from the "
                    "installed package, no source checkout needed. Example: pytest-sandbox conformance "
                    "--sandbox-exec 'bwrap --dev-bind / / --' --sandbox-report report.md")
    conformance.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest")
    conformance.set_defaults(handler=_command_conformance)
    return parser


def _command_conformance(args: argparse.Namespace) -> int:
    return run_conformance(args.pytest_args)


def run_conformance(pytest_args: list[str]) -> int:
    """``pytest --sandbox --pyargs pytest_sandbox.conformance ARGS``; pytest reports its own bad flags."""
    import pytest

    return int(pytest.main(["--sandbox", "--pyargs", "pytest_sandbox.conformance", *pytest_args]))


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (``sys.exit(main())``)."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["conformance"] and arguments[1:2] not in (["-h"], ["--help"]):
        return run_conformance(arguments[1:])  # everything after the word belongs to pytest
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # argparse reports bad flags itself and exits 2; --help exits 0
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        status: int = args.handler(args)
        return status
    except SandboxError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message contained
        print(f"{PROG}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `pytest-sandbox explain baseline | head`
        return 0
    except OSError as exc:  # e.g. -o into a missing directory
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
