"""The ``pytest-sandbox`` console script: what is not a test run.

``run``      run a command under a policy (stdio passed through, exit status passed back);
``diff``     what became weaker or stronger between two policies, before anything runs;
``export``   the compiled seccomp filter as raw BPF or libseccomp pseudo filter code (PFC);
``explain``  a readable summary of what a policy enforces and why.

Every :class:`~pytest_sandbox.errors.SandboxError` becomes one line ``pytest-sandbox: <message>`` on
stderr and exit status 2 (argparse uses 2 for bad flags as well); never a traceback.
The policy comparison (:func:`diff_policies`) is pure, so it is tested without launching anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from pytest_sandbox.catalogues.syscalls import PROBES_BY_NAME
from pytest_sandbox.errors import SandboxError
from pytest_sandbox.policy.model import NETWORK_MODES, SOCKET_FAMILY_NAMES, ArgRule, Policy, is_domain_rule, load_policy

PROG = "pytest-sandbox"
EXIT_USAGE = 2  # argparse's own status for bad flags; used for every bad input
EXIT_TIMEOUT = 124  # timeout(1)'s convention for "the command ran out of time"
# Signals a user sends to the CLI that must reach the sandboxed command: the spawner puts the command
# in its own process group and session, so the terminal's Ctrl-C never reaches it directly.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

# How much a setting refuses, weakest first. Network modes: ``allow`` reaches everything, ``proxy``
# only the egress proxy, ``block`` nothing. Filter actions: every kill/trap ends in a signal death
# (kill_thread leaves the rest of the process running, trap can be caught by a SIGSYS handler).
NETWORK_MODE_STRENGTH = {"allow": 0, "proxy": 1, "block": 2}
ACTION_STRENGTH = {"allow": 0, "log": 1, "errno": 2, "trap": 3, "kill_thread": 4, "kill_process": 5}


class CliError(SandboxError):
    """Bad command-line input found after argument parsing (e.g. binary output to a terminal)."""


# --------------------------------------------------------------------------------------------
# diff: a pure comparison of two policies


@dataclass(frozen=True)
class PolicyDiff:
    """What changed from ``old`` to ``new``: each line names the rule and the direction."""

    old: str
    new: str
    weaker: tuple[str, ...]
    stronger: tuple[str, ...]

    @property
    def is_weaker(self) -> bool:
        return bool(self.weaker)


def _family(number: int) -> str:
    return SOCKET_FAMILY_NAMES.get(number, str(number))


def _rule_identity(rule: ArgRule) -> tuple[str, int, str, int, int]:
    # The mask only means something for masked_eq; eq always compares the low 32 bits (policy.py).
    return (rule.syscall, rule.arg, rule.op, rule.mask if rule.op == "masked_eq" else 0xFFFFFFFF, rule.value)


def _describe_rule(rule: ArgRule) -> str:
    return f"{rule.key}" + (f" ({rule.why})" if rule.why else "")


def _set_changes(old: Iterable[str], new: Iterable[str]) -> tuple[list[str], list[str]]:
    """(removed, added), each in the order the policies list them."""
    old_list, new_list = list(dict.fromkeys(old)), list(dict.fromkeys(new))
    return [x for x in old_list if x not in new_list], [x for x in new_list if x not in old_list]


def _compare_strength(what: str, old: str, new: str, ranking: dict[str, int],
                      weaker: list[str], stronger: list[str]) -> None:
    if old == new:
        return
    line = f"{what}: {old} -> {new}"
    (weaker if ranking[new] < ranking[old] else stronger).append(line)


def diff_policies(old: Policy, new: Policy, *, modes: Sequence[str] = NETWORK_MODES) -> PolicyDiff:
    """Compare two policies rule by rule; ``modes`` limits the per-network-mode comparisons."""
    weaker: list[str] = []
    stronger: list[str] = []
    o, n = old.seccomp, new.seccomp
    if (old.origin == "oci") != (new.origin == "oci"):
        # A profile has no network modes: compare it with the policy in that policy's own mode.
        modes = ((new if old.origin == "oci" else old).network.mode,)

    # Allowlists (OCI/Docker profiles) are compared by what they refuse, like denylists.
    removed, added = _set_changes(o.effective_denies(), n.effective_denies())
    weaker += [f"syscall {name} no longer denied" for name in removed]
    stronger += [f"syscall {name} now denied" for name in added]

    # An ENOSYS rule exists so that glibc falls back to a call the filter can inspect (clone3 ->
    # clone); losing it lets the uninspectable call reach the kernel.
    removed, added = _set_changes(o.enosys, n.enosys)
    weaker += [f"syscall {name} no longer returns ENOSYS (reaches the kernel)" for name in removed]
    stronger += [f"syscall {name} now returns ENOSYS" for name in added]

    old_rules = {_rule_identity(r): r for r in o.arg_rules if not is_domain_rule(r)}
    new_rules = {_rule_identity(r): r for r in n.arg_rules if not is_domain_rule(r)}
    weaker += [f"argument rule removed: {_describe_rule(r)}"
               for k, r in old_rules.items() if k not in new_rules]
    stronger += [f"argument rule added: {_describe_rule(r)}"
                 for k, r in new_rules.items() if k not in old_rules]
    # Conditional allows only mean something in an allowlist; between two allowlists more is weaker.
    both_allowlists = o.is_allowlist and n.is_allowlist
    old_allows = {_rule_identity(r): r for r in o.allow_rules if both_allowlists}
    new_allows = {_rule_identity(r): r for r in n.allow_rules if both_allowlists}
    weaker += [f"conditional allow added: {_describe_rule(r)}" for k, r in new_allows.items() if k not in old_allows]
    stronger += [f"conditional allow removed: {_describe_rule(r)}"
                 for k, r in old_allows.items() if k not in new_allows]

    for mode in modes:
        old_applies, new_applies = old.filter_applies(mode), new.filter_applies(mode)
        if old_applies and not new_applies:
            weaker.append(f"{mode} mode: seccomp filter skipped (no filter, no no_new_privs)")
        elif new_applies and not old_applies:
            stronger.append(f"{mode} mode: seccomp filter now applied")
        removed_domains, added_domains = _set_changes(
            map(_family, old.refused_domains(mode)), map(_family, new.refused_domains(mode)))
        weaker += [f"{mode} mode: socket domain {name} no longer refused" for name in removed_domains]
        stronger += [f"{mode} mode: socket domain {name} now refused" for name in added_domains]

    _compare_strength("default action", o.default_action, n.default_action, ACTION_STRENGTH, weaker, stronger)
    _compare_strength("bad-arch action", o.bad_arch_action, n.bad_arch_action, ACTION_STRENGTH,
                      weaker, stronger)

    # A foreign ABI (x32, i386 via int 0x80) not listed in the filter meets the bad-arch action;
    # listing it admits its calls and leaves only the rules between them and the kernel.
    removed, added = _set_changes(o.extra_arches, n.extra_arches)
    weaker += [f"{arch} ABI now admitted by the filter (was the bad-arch action)" for arch in added]
    stronger += [f"{arch} ABI no longer admitted (now the bad-arch action)" for arch in removed]

    outside_weaker, outside_stronger = diff_outside_the_filter(old, new)
    return PolicyDiff(old.name, new.name, tuple(weaker + outside_weaker), tuple(stronger + outside_stronger))


def diff_outside_the_filter(old: Policy, new: Policy) -> tuple[list[str], list[str]]:
    """(weaker, stronger) for what no seccomp filter expresses: no_new_privs and the network settings."""
    weaker: list[str] = []
    stronger: list[str] = []
    # An OCI profile says nothing about the network: compare network settings only between two policies.
    networked = old.origin != "oci" and new.origin != "oci"
    if networked:
        _compare_strength("network mode", old.network.mode, new.network.mode, NETWORK_MODE_STRENGTH,
                          weaker, stronger)
    if old.seccomp.no_new_privs and not new.seccomp.no_new_privs:
        weaker.append("no_new_privs disabled: setuid binaries regain privileges across execve")
    elif new.seccomp.no_new_privs and not old.seccomp.no_new_privs:
        stronger.append("no_new_privs enabled")

    if networked:
        removed, added = _set_changes(old.network.allowed_hosts, new.network.allowed_hosts)
        weaker += [f"egress host {host!r} now allowed" for host in added]
        stronger += [f"egress host {host!r} no longer allowed" for host in removed]
        removed_ports, added_ports = _set_changes(map(str, old.network.allowed_ports),
                                                  map(str, new.network.allowed_ports))
        weaker += [f"egress port {port} now allowed" for port in added_ports]
        stronger += [f"egress port {port} no longer allowed" for port in removed_ports]

        # More inference routes means more requests the proxy forwards to the model backend.
        removed, added = _set_changes((f"{r.method} {r.path}" for r in old.inference_routes),
                                      (f"{r.method} {r.path}" for r in new.inference_routes))
        weaker += [f"inference route {route} now routed" for route in added]
        stronger += [f"inference route {route} no longer routed" for route in removed]
    return weaker, stronger


def format_diff_text(diff: PolicyDiff) -> str:
    lines = [f"policy diff {diff.old} -> {diff.new}"]
    if not diff.weaker and not diff.stronger:
        lines.append("no enforcement differences")
    for title, entries in (("WEAKER", diff.weaker), ("STRONGER", diff.stronger)):
        if entries:
            lines.append(f"{title} ({len(entries)}):")
            lines += [f"  - {entry}" for entry in entries]
    return "\n".join(lines) + "\n"


def format_diff_json(diff: PolicyDiff) -> str:
    return json.dumps({"old": diff.old, "new": diff.new, "weaker": list(diff.weaker),
                       "stronger": list(diff.stronger)}, indent=2) + "\n"


# --------------------------------------------------------------------------------------------
# explain


def explain_policy(policy: Policy, mode: str, instruction_count: int) -> str:
    """A readable summary of what ``policy`` enforces in network mode ``mode``."""
    seccomp, network = policy.seccomp, policy.network
    out = [f"policy {policy.name} ({policy.source})"]
    if policy.description:
        out.append(f"  {policy.description}")
    out.append("")
    out.append(f"seccomp in {mode} mode:")
    if not policy.filter_applies(mode):
        out.append(f"  NO FILTER: this policy skips seccomp in {mode} mode (and sets no no_new_privs)")
    out.append(f"  default action: {seccomp.default_action}; a denied call fails with errno {seccomp.errno}")
    arches = ", ".join((f"{platform.machine()} (native)", *seccomp.extra_arches))
    out.append(f"  architectures admitted: {arches}; any other ABI (x32, i386 int 0x80): "
               f"{seccomp.bad_arch_action}")
    out.append(f"  no_new_privs: {'yes' if seccomp.no_new_privs and policy.filter_applies(mode) else 'no'}")
    out.append(f"  BPF: {instruction_count} instructions")
    unenforced = "" if policy.filter_applies(mode) else f", NOT ENFORCED in {mode} mode"
    out.append(f"denied syscalls ({len(seccomp.deny)}{unenforced}):")
    for name in seccomp.deny:
        probe = PROBES_BY_NAME.get(name)
        note = f"  -- {probe.note}" if probe and probe.note else ""
        out.append(f"  {name}{note}")
    out.append(f"ENOSYS rules ({len(seccomp.enosys)}{unenforced}):")
    for name in seccomp.enosys:
        out.append(f"  {name} -> ENOSYS (so glibc falls back to a call the filter can inspect)")
    out.append(f"argument rules ({len(seccomp.arg_rules)}{unenforced}):")
    for rule in seccomp.arg_rules:
        out.append(f"  {_describe_rule(rule)}")
    out.append("socket domains refused per network mode:")
    for each in NETWORK_MODES:
        families = ", ".join(_family(f) for f in policy.network.blocked_domains(each)) or "none"
        skipped = "" if policy.filter_applies(each) else "  (NOT ENFORCED: filter skipped in this mode)"
        out.append(f"  {each}: {families}{skipped}")
    out.append("")
    out.append(f"network: mode {network.mode} (explained for {mode})")
    out.append(f"  allowed hosts: {', '.join(network.allowed_hosts) or 'none'}")
    out.append(f"  allowed ports: {', '.join(map(str, network.allowed_ports)) or 'none'}")
    out.append(f"inference routes ({len(policy.inference_routes)}):")
    for route in policy.inference_routes:
        out.append(f"  {route.method} {route.path}")
    return "\n".join(out) + "\n"


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
    sys.stdout.write(explain_policy(policy, mode, compile_policy(policy, mode).instruction_count))
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
