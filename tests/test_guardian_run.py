"""``guardian.run``'s timeout path is bounded even when the guardian could not clean up.

On a timeout ``run`` stops the guardian (SIGTERM; SIGKILL after ``STOP_TIMEOUT_SECONDS``) and then drains
the command's pipes. A SIGKILLed guardian cannot kill what its command forked, and a survivor that holds the
pipes' write ends keeps them open: draining them without a bound hung the caller for as long as the survivor
lived (found in review of session 6). Here ``stop`` is replaced by the worst case it can end in (only the
guardian killed) and the command leaves a grandchild holding stdout; ``run`` must still raise
``TimeoutExpired``. No wall-clock assertion: the thread's join has a generous bound, and a hang is what fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import guardian

START_TIMEOUT_SECONDS = 30.0  # a guardian and sh starting on a loaded shared host; reached only if they never do
GONE_TIMEOUT_SECONDS = 10.0  # SIGKILLed processes leaving /proc


def pids_with(token: str) -> list[int]:
    """Live processes whose environment carries ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def survivor_started(token: str) -> bool:
    """Whether the command's background ``sleep`` (the grandchild that keeps the pipes open) is running."""
    for pid in pids_with(token):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep\0"):
                return True
        except OSError:
            continue  # gone meanwhile
    return False


def test_a_timeout_returns_even_when_a_survivor_holds_the_pipes(monkeypatch: pytest.MonkeyPatch):
    token = f"pytest-sandbox-guardian-run-{uuid.uuid4().hex}"

    def stop_only_the_guardian(process: subprocess.Popen[Any], timeout: float = 0.0) -> None:
        # run()'s 1 s timeout can fire before the guardian has even started the command: measured 0.12-0.83 s
        # from GuardedPopen to the background sleep at load 21. Killing the guardian then leaves no survivor
        # (the positive control below fails, and nothing holds the pipes). Wait, bounded, for the grandchild.
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not survivor_started(token) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)  # what stop() ends in when the guardian ignores SIGTERM
        guardian.wait_exited(process, guardian.STOP_TIMEOUT_SECONDS)

    monkeypatch.setattr(guardian, "stop", stop_only_the_guardian)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            guardian.run(["sh", "-c", "sleep 120 & echo started; sleep 120"], timeout=1.0,
                         env={**os.environ, "GUARDIAN_RUN_TOKEN": token})
        except BaseException as error:  # handed to the test thread
            outcome.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        caller.join(timeout=START_TIMEOUT_SECONDS + guardian.STOP_TIMEOUT_SECONDS + 60)
        survivors = pids_with(token)
        assert survivors, "positive control: the command's processes outlived the killed guardian"
        assert not caller.is_alive(), "guardian.run hung draining pipes a survivor holds open"
        assert len(outcome) == 1 and isinstance(outcome[0], subprocess.TimeoutExpired), outcome
    finally:
        for pid in pids_with(token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        caller.join(timeout=30)
    # SIGKILLed processes leave /proc only once they have exited: a snapshot right after the kills can
    # still list them on a loaded host. Wait (bounded) for that, then judge.
    deadline = time.monotonic() + GONE_TIMEOUT_SECONDS
    while (left := pids_with(token)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert left == [], {pid: _command(pid) for pid in left}
