"""The spawners' fork server (issue #12, fourth pass): each sandbox still has a guardian of its own, gets
the caller's state at its start, fails closed, and survives the fork server's death."""

from __future__ import annotations

import os
import signal
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pytest_sandbox import guardian
from pytest_sandbox.errors import LaunchError
from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.seccomp import launcher
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.launcher import NetworkPlacement, Sandbox, SandboxSpec

GONE_TIMEOUT_SECONDS = 10.0


def _spec(mode: str = "block") -> SandboxSpec:
    return SandboxSpec(compile_policy(load_policy("baseline"), mode), NetworkPlacement(mode))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != b"Z"


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + GONE_TIMEOUT_SECONDS
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_sandbox_takes_the_callers_cwd_umask_and_path_at_its_start(tmp_path: Path, monkeypatch) -> None:
    with Sandbox(_spec()):
        pass  # the fork server is running now, started with the state of that moment
    tools = tmp_path / "bin"
    tools.mkdir()
    tool = tools / "only-here"
    tool.write_text("#!/bin/sh\necho found\n")
    tool.chmod(stat.S_IRWXU)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    old = os.umask(0o077)
    try:
        with Sandbox(_spec()) as sandbox:
            where = sandbox.run(["/bin/pwd"]).stdout.strip()
            mask = sandbox.run(["/bin/sh", "-c", "umask"]).stdout.strip()
            found = sandbox.run(["only-here"])  # posix_spawnp searches the spawner's own PATH
    finally:
        os.umask(old)
    assert where == str(tmp_path).encode()
    assert mask == b"0077"
    assert (found.returncode, found.stdout) == (0, b"found\n"), found


def test_each_sandbox_has_its_own_guardian_that_kills_what_its_commands_orphaned() -> None:
    """A daemon a command leaves behind (own session, parent exited) dies with its sandbox, not with the
    session, while another sandbox's command runs on."""
    with Sandbox(_spec()) as other:
        other_command = other.popen(["/bin/sleep", "30"])
        first = Sandbox(_spec())
        try:
            assert first.pid != other.pid
            out = first.run(["/bin/sh", "-c", "setsid /bin/sleep 30 >/dev/null 2>&1 & echo $!"]).stdout
            daemon = int(out)
            assert _alive(daemon)
        finally:
            first.close()
        assert first._process.returncode == 0
        assert _wait_gone(daemon), f"the orphaned daemon {daemon} outlived its sandbox"
        assert other_command.poll() is None and other.run(["/bin/true"]).returncode == 0
        other_command.kill()
        assert other_command.wait(10) == -signal.SIGKILL


def test_a_spawner_that_fails_in_the_fork_server_fails_closed(monkeypatch) -> None:
    """Code that never reports ready (here: it raises) is a LaunchError naming no readiness, and its guardian
    is reaped: nothing is run, nothing is left."""
    monkeypatch.setattr(launcher, "_ZYGOTE_SOURCE", "def main(argv):\n    raise RuntimeError('broken spawner')\n")
    with pytest.raises(LaunchError, match="exited without reporting; nothing was run"):
        Sandbox(_spec())


def test_the_fork_server_killed_leaves_open_sandboxes_working_and_is_started_again() -> None:
    server = launcher._spawner_server(launcher._ZYGOTE_SOURCE)
    with Sandbox(_spec()) as before:
        process = server._process
        assert process is not None and process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        assert guardian.wait_exited(process, GONE_TIMEOUT_SECONDS)
        assert before.run(["/bin/true"]).returncode == 0  # its guardian and spawner are not the server's
        with Sandbox(_spec()) as after:
            assert after.run(["/bin/true"]).returncode == 0
        assert server._process is not process and server._process.poll() is None
    # Closed with the server gone: the guardian's exit is seen on its pidfd (no status to read).
    assert before._process.returncode == guardian.ForkedGuardian.UNKNOWN_STATUS
    assert not _alive(before.pid)


def test_sandboxes_started_side_by_side_are_separate(tmp_path: Path) -> None:
    """The suite starts its builds' sandboxes from threads at once: each gets its own namespace and guardian."""
    def one(_: int) -> tuple[int, bytes]:
        with Sandbox(_spec("proxy")) as sandbox:
            return sandbox.pid, sandbox.run(["/bin/readlink", "/proc/self/ns/net"]).stdout.strip()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, range(8)))
    assert len({pid for pid, _ in results}) == 8
    assert all(link.startswith(b"net:[") for _, link in results)
    assert os.readlink("/proc/self/ns/net").encode() not in {link for _, link in results}


def test_a_removed_working_directory_is_still_the_commands(tmp_path: Path, monkeypatch) -> None:
    """The caller's working directory goes to the guardian as a descriptor: a command runs in the very
    directory the caller is in, as a child of the caller would, even once it has been removed."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with Sandbox(_spec()) as sandbox:
        where = sandbox.run(["/bin/readlink", "/proc/self/cwd"]).stdout.strip()
    assert where == f"{gone} (deleted)".encode()
