"""The launcher: commands run under the filter, report exit codes and killing signals, never unsandboxed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_sandbox import guardian
from pytest_sandbox.errors import LaunchError
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.launcher import FreshNamespaces, Identity, NetworkPlacement, Sandbox, SandboxSpec

ROOT = Path(__file__).resolve().parents[1]
PTRACE_PEEK = (
    "import ctypes; c = ctypes.CDLL(None, use_errno=True); c.syscall(101, 2, -1, 0, 0); print(ctypes.get_errno())"
)
INET_SOCKET = (
    "import socket\ntry:\n socket.socket(socket.AF_INET)\n print('opened')\nexcept OSError as e:\n print(e.errno)"
)


@pytest.fixture(scope="module")
def baseline_block():
    with Sandbox(SandboxSpec(compile_policy(load_policy("baseline"), "block"), NetworkPlacement("block"))) as sb:
        yield sb


def test_exit_code_stdout_and_stderr_are_reported(baseline_block):
    result = baseline_block.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert result.signal is None


def test_denied_syscall_gets_eperm_inside_the_sandbox(baseline_block):
    assert baseline_block.run([sys.executable, "-c", PTRACE_PEEK]).stdout.strip() == b"1"


def test_block_mode_refuses_inet_sockets(baseline_block):
    assert baseline_block.run([sys.executable, "-c", INET_SOCKET]).stdout.strip() == b"1"


def test_the_killing_signal_is_reported(baseline_block):
    result = baseline_block.run(["/bin/sh", "-c", "kill -SEGV $$"])
    assert result.signal == signal.SIGSEGV and result.signal_name == "SIGSEGV"


def test_timeout_kills_the_process_group(baseline_block):
    result = baseline_block.run(["/bin/sleep", "30"], timeout=0.3)
    assert result.timed_out and result.signal == signal.SIGKILL


def test_input_is_delivered_and_large_output_collected(baseline_block):
    payload = os.urandom(300_000)
    assert baseline_block.run(["/bin/cat"], input=payload).stdout == payload


def test_children_show_the_filters_and_no_new_privs(baseline_block):
    status = baseline_block.run(["/bin/cat", "/proc/self/status"]).stdout.decode()
    assert "Seccomp:\t2" in status and "Seccomp_filters:\t2" in status and "NoNewPrivs:\t1" in status


def test_popen_can_be_killed_by_pid(baseline_block):
    process = baseline_block.popen(["/bin/sleep", "30"])
    process.kill()
    assert process.wait(5) == -signal.SIGKILL


def test_missing_program_is_a_launch_error_not_a_silent_pass(baseline_block):
    with pytest.raises(LaunchError, match="cannot launch"):
        baseline_block.run(["/nonexistent/program"])


def test_proxy_mode_gets_a_private_network_namespace():
    with Sandbox(SandboxSpec(compile_policy(load_policy("baseline"), "proxy"), NetworkPlacement("proxy"))) as sb:
        inside = sb.run(["/bin/readlink", "/proc/self/ns/net"]).stdout.strip()
    assert inside and inside != os.readlink("/proc/self/ns/net").encode()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to uid 65534 needs root")
def test_nobody_identity_drops_privileges():
    spec = SandboxSpec(compile_policy(load_policy("baseline"), "block"), NetworkPlacement("block"), Identity.nobody())
    with Sandbox(spec) as sb:
        assert sb.run(["/usr/bin/id", "-u"]).stdout.strip() == b"65534"


def test_unloadable_filter_fails_closed_and_runs_nothing():
    compiled = compile_policy(load_policy("baseline"), "block")
    broken = type(compiled)(**{**compiled.__dict__, "programs": (b"\x00" * 7,)})
    with pytest.raises(LaunchError, match="nothing was run"):
        Sandbox(SandboxSpec(broken, NetworkPlacement("block")))


def test_spawner_stops_with_the_sandbox():
    sandbox = Sandbox(SandboxSpec(compile_policy(load_policy("baseline"), "allow"), NetworkPlacement("allow")))
    pid = sandbox.pid
    sandbox.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def status_of(spec: SandboxSpec) -> dict[str, str]:
    with Sandbox(spec) as sb:
        text = sb.run(["/bin/cat", "/proc/self/status"]).stdout.decode()
    return {key: " ".join(value.split()) for key, _, value in (line.partition(":") for line in text.splitlines())}


@pytest.mark.skipif(os.geteuid() != 0, reason="taking another uid needs root")
@pytest.mark.parametrize(("uid", "caps"), [(65534, 1 << 13), (0, 0), (1000, (1 << 13) | (1 << 21))])
def test_an_identity_gets_exactly_its_capabilities_after_execve(uid, caps):
    """uid 65534 keeping CAP_NET_RAW, uid 0 with none (it must not regain them at execve), and two caps:
    what a baseline needs to run as the caller a third-party sandbox showed."""
    identity = Identity("asked", uid, uid, (uid,), caps, caps)
    fields = status_of(SandboxSpec(None, NetworkPlacement("allow"), identity))
    assert fields["Uid"] == f"{uid} {uid} {uid} {uid}" and fields["Groups"] == str(uid)
    assert int(fields["CapEff"], 16) == caps and int(fields["CapPrm"], 16) == caps
    assert int(fields["CapBnd"], 16) == caps and fields["NoNewPrivs"] == "0"


@pytest.mark.skipif(os.geteuid() != 0, reason="taking another uid needs root")
def test_an_identity_that_cannot_be_taken_fails_closed():
    impossible = Identity("impossible", 65534, 65534, (), 1 << 13, 0)  # a capability outside the bounding set
    with pytest.raises(LaunchError, match="nothing was run"):
        Sandbox(SandboxSpec(None, NetworkPlacement("allow"), impossible))


@pytest.mark.skipif(os.geteuid() != 0, reason="writing arbitrary id maps needs root")
def test_fresh_namespaces_rebuild_a_user_namespace_with_its_maps():
    fresh = FreshNamespaces(("mnt", "pid", "user"), "0 0 1", "0 0 1", "deny")
    spec = SandboxSpec(None, NetworkPlacement("allow"), Identity("mapped-root", 0, 0, (), 0, 0, True), fresh)
    with Sandbox(spec) as sb:
        out = sb.run(["/bin/sh", "-c", "readlink /proc/self/ns/user /proc/self/ns/mnt /proc/self/ns/net; "
                                       "cat /proc/self/uid_map /proc/self/setgroups"]).stdout.decode().split()
    user, mnt, net, *maps = out
    assert user != os.readlink("/proc/self/ns/user") and mnt != os.readlink("/proc/self/ns/mnt")
    assert net == os.readlink("/proc/self/ns/net")
    assert maps == ["0", "0", "1", "deny"]


def test_an_unknown_namespace_type_is_a_clear_error():
    with pytest.raises(LaunchError, match="unknown namespace type"):
        FreshNamespaces(("nett",))


def test_a_sandboxed_command_holds_no_descriptor_but_its_stdio(baseline_block):
    """Not the spawner's control socket (it could take the next launch's request and its stdio)."""
    result = baseline_block.run(["python3", "-S", "-c", "import os; print(sorted(os.listdir('/proc/self/fd')))"])
    assert result.returncode == 0, result.stderr
    fds = sorted(int(fd) for fd in result.stdout.decode().strip().strip("[]").replace("'", "").split(", "))
    assert fds[:3] == [0, 1, 2] and len(fds) == 4, f"descriptors beyond stdio (+ the listing's own): {fds}"


def slices(text: str) -> list[int]:
    """The ``se.slice`` values (ns) of /proc/<pid>/sched texts, in order."""
    return [int(line.split(":")[1]) for line in text.splitlines() if line.startswith("se.slice")]


@pytest.mark.skipif(not os.path.exists("/proc/self/sched") or "se.slice" not in open("/proc/self/sched").read(),
                    reason="no /proc/<pid>/sched with se.slice (CONFIG_SCHED_DEBUG, EEVDF)")
@pytest.mark.parametrize("short", [True, False])
def test_only_the_spawner_asks_a_short_slice_its_commands_keep_the_default(short):
    """The spawner's 0.1 ms EEVDF slice (its wake-ups on a busy machine) must not leak into what runs in
    the sandbox: SCHED_FLAG_RESET_ON_FORK gives the command the default slice, the host's."""
    spec = SandboxSpec(compile_policy(load_policy("baseline"), "block"), NetworkPlacement("block"))
    with Sandbox(spec, short_slice=short) as sb:
        result = sb.run(["/bin/sh", "-c", "grep -h se.slice /proc/$PPID/sched /proc/$$/sched"])
    assert result.returncode == 0, result.stderr
    spawner, command = slices(result.stdout.decode())
    host = slices(open("/proc/self/sched").read())[0]
    assert command == host, f"the sandboxed command runs with slice {command} ns, not the default {host} ns"
    if short:
        # Linux >= 6.12 honours sched_runtime for SCHED_OTHER; an older kernel keeps the default.
        assert spawner in (100_000, host)
    else:
        assert spawner == host


FORWARD_FROM_A_HANDLER = """
import signal, sys
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.launcher import NetworkPlacement, Sandbox, SandboxSpec
with Sandbox(SandboxSpec(compile_policy(load_policy("baseline"), "block"), NetworkPlacement("block"))) as sb:
    process = sb.popen(["/bin/sleep", "30"])
    signal.signal(signal.SIGALRM, lambda *_: process.terminate())
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    print(process.wait())
"""


def test_a_signal_handler_can_signal_the_command_while_wait_blocks():
    """What ``pytest-sandbox run`` does with SIGINT/SIGTERM: the handler runs on the thread blocked in
    wait(), which holds the process's lock. It used to block on that lock forever."""
    try:
        done = subprocess.run([sys.executable, "-c", FORWARD_FROM_A_HANDLER], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("send_signal from a signal handler deadlocked against wait()")
    assert done.stdout.strip() == str(-signal.SIGTERM), done.stderr


# Modules a guardian must not import: the package (its __init__ pulls typing) and the caller-side API's
# stdlib (issue #12: every sandbox start runs one guardian, and these were ~40 ms of it).
NOT_IN_A_GUARDIAN = {"pytest_sandbox", "typing", "subprocess", "pathlib", "tempfile", "shutil", "threading",
                     "contextlib"}


def test_a_guardian_imports_only_what_its_own_code_uses():
    argv = guardian.guarded(["/bin/true"])
    traced = [argv[0], "-X", "importtime", *argv[1:]]
    done = subprocess.run(traced, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert {"guardian_helper", "select", "signal", "ctypes"} <= imported  # the trace is read (control)
    heavy = {name for name in imported if name.split(".")[0] in NOT_IN_A_GUARDIAN}
    assert not heavy, f"a guardian's start imports {sorted(heavy)}"


def test_a_guarded_wait_is_bounded_and_reaps_when_the_guardian_exits():
    process = guardian.GuardedPopen(["/bin/sleep", "30"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.2)
        assert process.poll() is None
        assert not guardian.wait_exited(process, 0.1)
    finally:
        guardian.stop(process)
    assert process.returncode == -signal.SIGTERM  # the guardian ends as the signal it was sent
    quick = guardian.GuardedPopen(["/bin/sh", "-c", "exit 7"])
    assert quick.wait(timeout=30) == 7 and guardian.wait_exited(quick, 0)


def test_close_returns_once_the_spawner_and_its_guardian_are_reaped():
    sandbox = Sandbox(SandboxSpec(compile_policy(load_policy("baseline"), "block"), NetworkPlacement("block")))
    sandbox.run(["/bin/true"])
    sandbox.close()
    assert sandbox._process.returncode == 0  # exited by itself (its control socket closed), not stopped
