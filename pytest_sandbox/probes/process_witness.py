"""The witness: a process outside the sandbox that the witness rows try to reach (catalogues/syscalls.py WITNESS_PATHS).

The harness starts it unfiltered (it opens no socket), as the caller the rows run as (the same uid, groups
and capabilities: what the unfiltered baseline is), so the baseline can reach it and only the sandbox can be what
stops a sandboxed attempt. It holds a random nonce in its memory and in a memfd, and one zeroed 16-byte slot per run
that writes to it; it reports its addresses, then waits for the harness: a line ``slots`` on its stdin makes it answer
with what each slot now holds, end of input makes it exit. It is stopped by its PID (through its launcher) at the end.

Evidence (:meth:`Witness.classify`): a read is the witness's only when it returns the nonce, a write only when the
slot of that run holds that run's pattern afterwards, a permitted signal only when the process the pid names in the
sandbox started when the witness did. A pid that names some other process (the sandbox's own PID namespace) reaches
nothing of the witness's.
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from pytest_sandbox.errors import LaunchError, SandboxError
from pytest_sandbox.probes.syscall import runner_interpreter
from pytest_sandbox.probes.syscall_cases import ProbeCase
from pytest_sandbox.probes.syscall_runner import start_time
from pytest_sandbox.seccomp.launcher import PIPE, Identity, NetworkPlacement, Sandbox, SandboxedProcess, SandboxSpec
from pytest_sandbox.verdicts.judgement import Outcome

START_TIMEOUT_SECONDS = 10.0
NONCE_BYTES = 16
# The witness's program: stdlib only, started with -S. Slot addresses and the memfd's number go out on one line.
WITNESS_SOURCE = r"""
import ctypes, os, sys
nonce = sys.stdin.buffer.read(16)
slots = int(sys.stdin.buffer.readline())
held = ctypes.create_string_buffer(nonce, 16)
scratch = [ctypes.create_string_buffer(16) for _ in range(slots)]
fd = os.memfd_create("pytest-sandbox-witness", 0)
os.write(fd, nonce)
print(ctypes.addressof(held), fd, *(ctypes.addressof(s) for s in scratch), flush=True)
for line in sys.stdin.buffer:
    print(*(s.raw.hex() for s in scratch), flush=True)
"""


@dataclass(frozen=True)
class Witness:
    """Where the witness's nonce, memfd and write slots are (its pid as the harness sees it); what each run writes."""

    pid: int
    start_time: str  # /proc/<pid>/stat field 22 as the harness reads it (syscall_runner.start_time)
    nonce: bytes
    address: int
    fd: int
    slots: tuple[int, ...]
    patterns: tuple[bytes, ...]

    def runner_fields(self, run: int) -> dict[str, object]:
        """What run number ``run``'s runner is told (syscall_runner ``_attempt_witness_path``): never the nonce."""
        return {"witness_pid": self.pid, "witness_address": self.address, "witness_fd": self.fd,
                "witness_scratch": self.slots[run], "witness_pattern": self.patterns[run].hex()}

    def classify(self, outcome: Outcome, run: int, slots_now: Sequence[bytes]) -> Outcome:
        """A runner's ``read``/``wrote``/``signalled`` outcome as evidence: ``reached`` (the witness's nonce was read,
        this run's pattern is in its slot now, or the process signalled started when the witness did), ``other`` (bytes
        of some other process, a write that did not land in the witness, another process signalled) or
        ``unverified`` (a permitted signal to a pid no /proc shows). Every other outcome (an errno, a death by signal)
        is left as it is."""
        if outcome.kind == "read":
            if outcome.detail == self.nonce.hex():
                return Outcome("reached", NONCE_BYTES, "read the witness's nonce")
            return Outcome("other", None, f"read {outcome.detail or 'nothing'}, not the witness's nonce")
        if outcome.kind == "wrote":
            if outcome.value and run < len(slots_now) and slots_now[run] == self.patterns[run]:
                return Outcome("reached", outcome.value, "wrote into the witness's memory")
            return Outcome("other", None, f"wrote {outcome.value} bytes, none of them into the witness")
        if outcome.kind == "signalled":  # kill(pid, 0) was permitted: for the witness, or for whatever the pid names
            if outcome.detail == self.start_time:
                return Outcome("reached", 0, "was permitted to signal the witness (kill, signal 0)")
            if outcome.detail:
                return Outcome("other", None, f"signalled the process its pid names there, started at tick "
                               f"{outcome.detail}, not the witness (started at {self.start_time})")
            return Outcome("unverified", None, "signal 0 to the witness's pid was permitted, and no /proc/<pid>/stat "
                           "shows which process that is")
        return outcome


class _Running:
    def __init__(self, process: SandboxedProcess) -> None:
        self.process = process

    def line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([fd], [], [], timeout)
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                raise LaunchError(f"the witness said nothing within {timeout:.0f} s")
            data += chunk
        return data.decode()

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)


@contextmanager
def running_witness(identity: Identity, runs: int) -> Iterator[tuple[Witness, Callable[[], list[bytes]]]]:
    """Start the witness as ``identity`` with ``runs`` write slots; yield it and a function that returns what each
    slot holds now. Stopped (by PID, through its launcher) on exit."""
    spec = SandboxSpec(None, NetworkPlacement("allow"), identity)
    nonce = os.urandom(NONCE_BYTES)
    patterns = tuple(os.urandom(NONCE_BYTES) for _ in range(runs))
    with Sandbox(spec) as launcher:
        process = launcher.popen([runner_interpreter(identity), "-S", "-c", WITNESS_SOURCE], stdin=PIPE)
        running = _Running(process)
        try:
            running.send(nonce + f"{runs}\n".encode())
            address, fd, *slots = (int(word) for word in running.line(START_TIMEOUT_SECONDS).split())
            witness = Witness(process.pid, start_time(process.pid), nonce, address, fd, tuple(slots), patterns)

            def slots_now() -> list[bytes]:
                running.send(b"slots\n")
                return [bytes.fromhex(word) for word in running.line(START_TIMEOUT_SECONDS).split()]

            yield witness, slots_now
        finally:
            process.kill()
            process.wait(START_TIMEOUT_SECONDS)


def witness_plan(cases: Iterable[ProbeCase], witness: Witness | None, run: int | None) -> list[dict[str, Any]]:
    """The runner's plan for ``cases`` in run number ``run``: a witness row carries the witness's fields for that run,
    and is left out when there is no witness, or no run of the witness's (``run`` None: the sentinel build)."""
    plan = []
    for case in cases:
        probe = case.runner_probe()
        if case.witness_access:
            if witness is None or run is None:
                continue
            probe.update(witness.runner_fields(run))
        plan.append(probe)
    return plan


@dataclass(frozen=True)
class WitnessEvidence:
    """What the witness showed after the runs: what each write slot held, or why there is no evidence (never started,
    or gone before the runs ended: a dead witness's pid would read as "no such process")."""

    witness: Witness | None
    slots: tuple[bytes, ...] | None
    missing: str = ""

    def classified(self, outcomes: Mapping[str, Outcome], run: int, rows: Iterable[str]) -> dict[str, Outcome]:
        """Run number ``run``'s ``outcomes`` with each witness row of ``rows`` (case ids) classified against the
        witness (:meth:`Witness.classify`), or "unavailable" with the reason when there is no evidence."""
        classified = dict(outcomes)
        for row in rows:
            if self.witness is None or self.slots is None:
                classified[row] = Outcome("unavailable", None, self.missing)
            elif row in classified:
                classified[row] = self.witness.classify(classified[row], run, self.slots)
        return classified


Runs = TypeVar("Runs")


def with_witness(identity: Identity, runs: int, attempt: Callable[[Witness | None], Runs]
                 ) -> tuple[Runs, WitnessEvidence]:
    """Start the witness as ``identity`` with ``runs`` write slots, make the runs (``attempt``, given the witness, or
    None when it could not be started: the runs go on without their witness rows), then ask the witness what its slots
    hold, which is also the proof it lived through every run; it is stopped before this returns."""
    with ExitStack() as stack:
        not_started: str | None = None
        try:
            witness, slots_now = stack.enter_context(running_witness(identity, runs))
        except SandboxError as exc:
            not_started = f"the witness could not be started as {identity.name}: {exc}"
        # The runs without a witness are made outside the except clause: an error of theirs is theirs alone, not
        # chained to the witness's launch error.
        if not_started is not None:
            return attempt(None), WitnessEvidence(None, None, not_started)
        made = attempt(witness)
        try:
            return made, WitnessEvidence(witness, tuple(slots_now()))
        except (OSError, SandboxError) as exc:
            return made, WitnessEvidence(witness, None, f"the witness did not answer after the runs: {exc}")
