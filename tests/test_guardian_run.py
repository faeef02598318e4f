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
from proc_scan import processes_carrying

from pytest_sandbox import guardian


def pids_with(token: str) -> list[int]:
    """Live processes whose environment carries ``token``."""
    return processes_carrying(token)


def sleeping(token: str) -> list[int]:
    """The command's ``sleep`` processes (their exec done: the command line is sleep's own)."""
    found = []
    for pid in pids_with(token):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == f"sleep\0{SURVIVOR_SECONDS}\0".encode():
                found.append(pid)
        except OSError:
            continue
    return found


COMMAND_START_TIMEOUT_SECONDS = 60.0  # a shell and two sleeps, on a host at load 15+
# The survivors sleep far longer than the caller is waited for: an unbounded drain must still be caught as a hang.
SURVIVOR_SECONDS = 600
GONE_TIMEOUT_SECONDS = 10.0


def test_a_timeout_returns_even_when_a_survivor_holds_the_pipes(monkeypatch: pytest.MonkeyPatch):
    token = f"pytest-sandbox-guardian-run-{uuid.uuid4().hex}"

    def stop_only_the_guardian(process: subprocess.Popen[Any], timeout: float = 0.0) -> None:
        # The 1 s timeout can fire before a loaded host has even started the command: kill the guardian only
        # once the survivor (the background sleep, beside the foreground one) runs, bounded.
        deadline = time.monotonic() + COMMAND_START_TIMEOUT_SECONDS
        while len(sleeping(token)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # what stop() ends in when the guardian ignores SIGTERM
        guardian.wait_exited(process, guardian.STOP_TIMEOUT_SECONDS)

    monkeypatch.setattr(guardian, "stop", stop_only_the_guardian)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            guardian.run(["sh", "-c", f"sleep {SURVIVOR_SECONDS} & echo started; sleep {SURVIVOR_SECONDS}"],
                         timeout=1.0, env={**os.environ, "GUARDIAN_RUN_TOKEN": token})
        except BaseException as error:  # handed to the test thread
            outcome.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        caller.join(timeout=COMMAND_START_TIMEOUT_SECONDS + guardian.STOP_TIMEOUT_SECONDS + 60)
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
    deadline = time.monotonic() + GONE_TIMEOUT_SECONDS  # SIGKILL is delivered, and acted on, asynchronously
    while pids_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_with(token) == []
