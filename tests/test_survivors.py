"""Nothing the harness starts outlives the session, whatever ends it (issue #10, item 1).

A real ``pytest --sandbox`` session on a small conformance subset (an SSRF control through the proxy
under test, the egress control through a proxied sandbox and its CA directory, a syscall probe in every
network mode) runs with a ``--sandbox-proxy-cmd`` that daemonises (its server is a grandchild in its
own session; tinyproxy without ``-d`` too when installed). At the last test, with everything running,
the session records every process carrying a marker in its environment, the namespaces they hold that
pytest does not, and its temporary directory (tests/survivor_pause.py); then it is killed with SIGKILL,
SIGTERM or SIGINT, or left to finish. Afterwards no marked process may be alive, no process may be in or
hold (by an open descriptor) any of those namespaces, and the temporary directory may hold nothing of
the harness's. The check itself is shown to find an unguarded daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from survivor_pause import MARKER_VARIABLE, marked_processes, namespace_holders

from pytest_sandbox import guardian
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.third_party import start_proxy_command

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
DAEMONISING = f"{sys.executable} {TESTS / 'daemonising_proxy.py'}"
SUBSET = ["conformance/test_ssrf.py", "conformance/test_egress.py", "conformance/test_syscalls.py",
          "-k", "connect-ctl-v4-private-10-below or reaches_a_lab_origin "
                "or proxy-root-bpf-native or proxy-user-bpf-native"]
READY_TIMEOUT_SECONDS = 90.0  # a loaded shared CI host; the subset itself takes a few seconds
EXIT_TIMEOUT_SECONDS = 120.0  # SIGINT runs pytest's whole teardown: over a minute on a host at load 10+
GONE_TIMEOUT_SECONDS = 10.0
PAUSE_SECONDS = 120.0
DAEMON_SERVER = b"-m\0pytest_sandbox.network.third_party\0reference\0"  # what daemonising_proxy.py execs


def _proxy_command(kind: str, conf_dir: Path) -> str:
    """The fake daemon, or a Debian proxy started so that it daemonises (skipped when not installed)."""
    if kind in ("tinyproxy", "squid"):
        if shutil.which(kind) is None:
            pytest.skip(f"{kind} is not installed (.ci/run installs it: apt-get install {kind})")
        return f"{DAEMONISING} --{kind} {conf_dir} {{address}} {{port}}"
    return f"{DAEMONISING} {{address}} {{port}}"


def _kill_marked(marker: str) -> list[int]:
    """SIGKILL, by PID, whatever still carries ``marker`` (a failing case must not leave it running)."""
    left = marked_processes(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _serving_daemons(marker: str) -> list[int]:
    """Marked processes that are the daemon's server itself (``daemonising_proxy.py`` after its exec).

    Count these, not every marked process: while the command forks and exits, one snapshot of /proc
    can miss the whole chain (it lists the intermediate child, which forks the grandchild and exits
    before its files are read), so "fewer than two marked" does not mean the daemon is gone."""
    found = []
    for pid in marked_processes(marker):
        try:
            if DAEMON_SERVER in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue  # gone meanwhile
    return found


def _wait_for_daemon(marker: str) -> list[int]:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not (daemons := _serving_daemons(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return daemons


def _leftovers(marker: str, namespaces: set[str], since: float, temp: Path) -> dict[str, Any]:
    return {"processes": marked_processes(marker), "namespaces": namespace_holders(namespaces, since),
            "temp": sorted(name for name in os.listdir(temp) if not name.startswith("pytest-of-"))}


def _wait_for_nothing_left(marker: str, state: dict[str, Any], temp: Path) -> dict[str, Any]:
    """Bounded: guardians and the janitor act after pytest is gone, within milliseconds."""
    deadline = time.monotonic() + GONE_TIMEOUT_SECONDS
    while True:
        left = _leftovers(marker, set(state["namespaces"]), state["uptime"], temp)
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


class Session:
    """One ``pytest --sandbox`` subprocess on the subset, with a marker in its environment."""

    def __init__(self, tmp_path: Path, proxy_command: str, pause: float) -> None:
        self.marker = f"survivor-{uuid.uuid4().hex}"
        self.temp = tmp_path / "tmp"
        self.temp.mkdir()
        self.ready = tmp_path / "ready.json"
        self.log = tmp_path / "session.log"
        env = {**os.environ, MARKER_VARIABLE: self.marker, "TMPDIR": str(self.temp),
               "SANDBOX_SURVIVOR_READY": str(self.ready), "SANDBOX_SURVIVOR_PAUSE": str(pause),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "survivor_pause",
                 "--sandbox", "--sandbox-proxy-cmd", proxy_command, *SUBSET],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_until_running(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not self.ready.exists():
            if self.process.poll() is not None:
                pytest.fail(f"the session ended before its last test ({self.process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the session did not reach its last test in {READY_TIMEOUT_SECONDS:g} s:\n{self.output()}")
            time.sleep(0.1)
        state: dict[str, Any] = json.loads(self.ready.read_text())
        return state

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=EXIT_TIMEOUT_SECONDS)
        _kill_marked(self.marker)


@pytest.fixture
def session_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Session] = []

    def start(kind: str, pause: float) -> Session:
        session = Session(tmp_path, _proxy_command(kind, tmp_path / "proxy-conf"), pause)
        started.append(session)
        return session

    yield start
    for session in started:
        session.stop()


def _assert_running(state: dict[str, Any], kind: str) -> None:
    """The scenario is real: the daemonised proxy, a spawner and the CA directory are all there."""
    commands = " | ".join(state["processes"].values())
    server = "tinyproxy" if kind == "tinyproxy" else "third_party reference"
    assert server in commands, f"no {server} among the session's processes: {commands}"
    assert "spawner" in commands or "_ZYGOTE" in commands or "-S -c" in commands, commands
    assert any(name.startswith("pytest-sandbox-ca-") for name in state["temp"]), state["temp"]
    assert any(link.startswith("net:") for link in state["namespaces"]), state["namespaces"]
    assert any(link.startswith("pid:") for link in state["namespaces"]), state["namespaces"]


@pytest.mark.parametrize("kind", ["daemon", "tinyproxy"])
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_nothing_survives_a_killed_session(session_factory, kind: str, how: str) -> None:
    session = session_factory(kind, PAUSE_SECONDS)
    state = session.wait_until_running()
    _assert_running(state, kind)
    os.kill(state["pytest"], getattr(signal, how))
    session.process.wait(timeout=EXIT_TIMEOUT_SECONDS)
    left = _wait_for_nothing_left(session.marker, state, session.temp)
    assert not any(left.values()), f"left behind after {how}: {left}; the session's processes were " \
                                   f"{state['processes']}"


@pytest.mark.parametrize("kind", ["daemon", "tinyproxy"])
def test_nothing_survives_a_finished_session(session_factory, kind: str) -> None:
    session = session_factory(kind, 0)
    session.process.wait(timeout=READY_TIMEOUT_SECONDS)
    state = json.loads(session.ready.read_text())
    _assert_running(state, kind)
    left = _wait_for_nothing_left(session.marker, state, session.temp)
    assert not any(left.values()), f"left behind after a normal run: {left}"


def test_survivor_check_finds_an_unguarded_daemon(tmp_path: Path) -> None:
    """The check can fail: a daemonising command started without a guardian outlives its parent."""
    marker = f"survivor-{uuid.uuid4().hex}"
    env = {**os.environ, MARKER_VARIABLE: marker, "PYTHONPATH": str(ROOT)}
    parent = subprocess.run([sys.executable, str(TESTS / "daemonising_proxy.py"), "127.0.0.1", "0"], env=env,
                            timeout=EXIT_TIMEOUT_SECONDS)
    try:
        assert parent.returncode == 0
        assert _wait_for_daemon(marker), "the unguarded daemon was not found"
    finally:
        _kill_marked(marker)


@pytest.mark.parametrize("kind", ["daemon", "tinyproxy", "squid"])
def test_a_daemonising_proxy_command_is_stopped(_network_lab: NetworkLab, tmp_path: Path, kind: str) -> None:
    """The normal path: ``stop()`` ends what the command left in the background (the fake daemon,
    tinyproxy without ``-d``, squid's master and worker without ``-N``), and its PID namespace."""
    command = _proxy_command(kind, tmp_path)
    marker = f"survivor-{uuid.uuid4().hex}"
    os.environ[MARKER_VARIABLE] = marker
    try:
        running = start_proxy_command(_network_lab, command)
    finally:
        del os.environ[MARKER_VARIABLE]
    # This process's janitor (started for the command's resolver files) carries the marker too, and
    # rightly lives on until this process exits.
    janitor = f"janitor\0--parent\0{os.getpid()}\0".encode()

    def started() -> list[int]:
        found = []
        for pid in marked_processes(marker):
            try:
                if janitor not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue  # gone meanwhile
        return found

    try:
        with running.connect():
            pass
        namespaces = set()
        for pid in started():
            try:
                namespaces.add(os.readlink(f"/proc/{pid}/ns/pid"))
            except OSError:
                continue  # exited between the listing and the read (a daemon's short-lived helper)
        namespaces.discard(os.readlink("/proc/self/ns/pid"))
        assert namespaces, "the proxy command does not run in a PID namespace of its own"
        running.stop()
        assert started() == []
        assert namespace_holders(namespaces) == {}
    finally:
        for pid in started():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("pid_namespace", [True, False])
def test_guardian_kills_what_its_command_orphans(pid_namespace: bool) -> None:
    """SIGTERM to a guardian kills the daemon its command left; so does SIGKILL with a PID namespace."""
    marker = f"survivor-{uuid.uuid4().hex}"
    env = {**os.environ, MARKER_VARIABLE: marker, "PYTHONPATH": str(ROOT)}
    process = guardian.GuardedPopen([sys.executable, str(TESTS / "daemonising_proxy.py"), "127.0.0.1", "0"],
                                    pid_namespace=pid_namespace, linger=True, env=env)
    try:
        assert _wait_for_daemon(marker), "the daemon's server never started"
        assert process.poll() is None, "the guardian left while the daemon lives"
        os.kill(process.pid, signal.SIGKILL if pid_namespace else signal.SIGTERM)
        process.wait(timeout=EXIT_TIMEOUT_SECONDS)
        deadline = time.monotonic() + GONE_TIMEOUT_SECONDS
        while marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marked_processes(marker) == []
    finally:
        _kill_marked(marker)
