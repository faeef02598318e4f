"""Read back the seccomp filters a running process actually has: ``PTRACE_SECCOMP_GET_FILTER``.

ptrace(2): with ``PTRACE_SECCOMP_GET_FILTER`` (0x420c) a tracer reads the classic-BPF program of filter
``addr`` of a stopped tracee. Index 0 is the filter installed *first* (kernel/seccomp.c
``get_nth_filter`` counts back from the newest; ptrace(2) words it the other way round, and
tests/test_readback.py pins the order against a two-filter stack), and an index past the newest fails
with ENOENT. ``seccomp_get_filter`` demands CAP_SYS_ADMIN of the tracer and that the tracer itself runs
without seccomp (else EACCES), and the kernel must be built with CONFIG_CHECKPOINT_RESTORE (else the
request is unknown: EIO). The tracee is seized (``PTRACE_SEIZE``), stopped with ``PTRACE_INTERRUPT``,
read, and detached; nothing in it runs while it is stopped.

Which process: the probe runner started the way the probes are started (the same launcher, the same
``python3 -S -`` command and identity), told by :func:`hold_script` to name itself with a random token
(``prctl(PR_SET_NAME)``), print its own pid and wait. The harness finds it by that token and by its pid
in its innermost pid namespace (``NSpid`` in /proc/PID/status), reads its filters, and kills it by PID.
"""

from __future__ import annotations

import ctypes
import errno as errno_module
import json
import os
import secrets
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol

from pytest_sandbox.errors import HostUnsupportedError, LaunchError

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
WALL = 0x40000000  # __WALL: wait for a tracee that is not our child
MAX_FILTERS = 512  # the kernel caps a process's filters at MAX_INSNS_PER_PATH (32768) instructions anyway
HOLD_SECONDS = 60  # the held runner ends itself (SIGALRM) if the harness never kills it
READY_TIMEOUT_SECONDS = 30.0
TOKEN_PREFIX = "psbx-"  # comm is at most 15 characters: the prefix and 10 hex digits


class ReadBackError(LaunchError):
    """The filters of the probe runner could not be read back (the reason says which step failed)."""


@dataclass(frozen=True)
class LoadedFilters:
    """The filters one process had, in load order (oldest first, as ``compile_policy`` lists them)."""

    programs: tuple[bytes, ...]
    pid: int  # in the harness's pid namespace
    inner_pid: int  # as the process saw itself
    seconds: float  # from launch to detach
    identity_line: str  # the runner's own identity record (who it ran as), JSON

    @property
    def instruction_count(self) -> int:
        return sum(len(p) // 8 for p in self.programs)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    return libc


def _explain(number: int, step: str) -> str:
    reasons = {
        errno_module.EACCES: "the harness needs CAP_SYS_ADMIN and must not itself run under seccomp",
        errno_module.EPERM: "ptrace was refused (root with CAP_SYS_PTRACE is needed; Yama ptrace_scope may forbid it)",
        errno_module.EIO: "this kernel lacks PTRACE_SECCOMP_GET_FILTER (CONFIG_CHECKPOINT_RESTORE)",
        errno_module.EINVAL: "the process is in strict seccomp mode or the request is unknown here",
        errno_module.ESRCH: "the process is gone or not stopped",
        errno_module.EMEDIUMTYPE: "a filter is not a classic BPF program",
    }
    return f"{step}: {os.strerror(number)} ({reasons.get(number, 'see ptrace(2)')})"


def read_filters(pid: int) -> tuple[bytes, ...]:
    """Every seccomp filter of ``pid``, oldest first. Raises :class:`ReadBackError` naming the failed step."""
    libc = _libc()

    def ptrace(request: int, addr: int, data: ctypes.Array[ctypes.c_char] | None, step: str) -> int:
        ctypes.set_errno(0)
        result = int(libc.ptrace(request, pid, ctypes.c_void_p(addr), data))
        if result < 0:
            raise ReadBackError(_explain(ctypes.get_errno(), step))
        return result

    ptrace(PTRACE_SEIZE, 0, None, f"PTRACE_SEIZE of pid {pid}")
    try:
        ptrace(PTRACE_INTERRUPT, 0, None, f"PTRACE_INTERRUPT of pid {pid}")
        os.waitpid(pid, WALL)
        programs = []
        for index in range(MAX_FILTERS):
            ctypes.set_errno(0)
            count = int(libc.ptrace(PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(index), None))
            if count < 0 and ctypes.get_errno() == errno_module.ENOENT:
                break  # past the newest filter
            if count < 0 and index == 0 and ctypes.get_errno() == errno_module.EINVAL and \
                    _status_field(pid, "Seccomp") == [0]:
                break  # seccomp_get_filter: EINVAL when the process is not in filter mode; it has no filter
            if count < 0:
                raise ReadBackError(_explain(ctypes.get_errno(), f"PTRACE_SECCOMP_GET_FILTER {index} of pid {pid}"))
            buffer = ctypes.create_string_buffer(count * 8)
            ptrace(PTRACE_SECCOMP_GET_FILTER, index, buffer, f"PTRACE_SECCOMP_GET_FILTER {index} of pid {pid}")
            programs.append(buffer.raw)
        return tuple(programs)
    finally:
        libc.ptrace(PTRACE_DETACH, pid, None, None)


def hold_script(token: str) -> str:
    """Python (stdlib only) to append to the probe runner: name this process ``token``, say who it is, wait.

    ``prctl(PR_SET_NAME)`` may be refused by the filter under test; the pid record then still lets the
    harness find the process among its launcher's descendants."""
    return f"""
import ctypes as _c, json as _j, os as _o, signal as _s, sys as _y
try:
    _c.CDLL(None).prctl(15, _c.c_char_p({token.encode()!r}), 0, 0, 0)
except Exception:
    pass
_y.stdout.write(_j.dumps({{"readback": {{"pid": _o.getpid(), "token": {token!r}}}}}) + "\\n")
_y.stdout.flush()
_s.alarm({HOLD_SECONDS})
while True:
    _s.pause()
"""


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_hex(5)


def _status_field(pid: int, name: str) -> list[int]:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key == name:
                return [int(v) for v in value.split()]
    return []


def _ancestors(pid: int) -> set[int]:
    seen: set[int] = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            pid = (_status_field(pid, "PPid") or [0])[0]
        except OSError:
            break
    return seen


def find_process(token: str, inner_pid: int, launcher_pid: int) -> int:
    """The harness-side pid of the held runner: its comm is ``token``, or it descends from the process
    we launched; and its innermost pid (``NSpid``) is the one it printed."""
    matches = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/comm") as handle:
                named = handle.read().strip() == token
            nspid = _status_field(pid, "NSpid")
            if not nspid or nspid[-1] != inner_pid:
                continue
            if named or launcher_pid in _ancestors(pid):
                matches.append(pid)
        except OSError:  # the process ended meanwhile
            continue
    if len(matches) != 1:
        raise ReadBackError(f"cannot tell which process is the held probe runner (pid {inner_pid} inside, "
                            f"token {token}): {len(matches)} candidates")
    return matches[0]


class _Process(Protocol):
    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def read_back(launch: Callable[[], _Process], script: bytes, token: str, *,
              timeout: float = READY_TIMEOUT_SECONDS) -> LoadedFilters:
    """Start the probe runner with ``launch``, feed it ``script`` (the runner ending in :func:`hold_script`
    with ``token``), read its filters while it waits, then kill it by PID. Needs root (see module doc)."""
    if os.geteuid() != 0:
        raise HostUnsupportedError("reading back the loaded filter needs root (ptrace and CAP_SYS_ADMIN)")
    started = time.monotonic()
    process = launch()
    held: int | None = None
    try:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(script)
        process.stdin.close()
        record, identity = _await_ready(process.stdout, token, started + timeout)
        held = find_process(token, int(record["pid"]), process.pid)
        programs = read_filters(held)
        return LoadedFilters(programs, held, int(record["pid"]), time.monotonic() - started, identity)
    finally:
        if held is not None:
            try:
                os.kill(held, signal.SIGKILL)  # the runner we started, by its PID
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=10)
        except Exception:  # whatever the launcher does, it is stopped by its PID
            process.kill()
            process.wait(timeout=10)


def _await_ready(stdout: IO[bytes], token: str, deadline: float) -> tuple[dict[str, Any], str]:
    buffered = b""
    identity = ""
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise ReadBackError("the probe runner did not report it was ready to be read back in time")
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                raise ReadBackError(f"the probe runner exited before it could be read back: {buffered[-300:]!r}")
            buffered += chunk
            for line in buffered.decode(errors="replace").split("\n")[:-1]:  # complete lines only
                if line.startswith('{"identity"'):
                    identity = line
                if line.startswith('{"readback"'):
                    record = json.loads(line)["readback"]
                    if record.get("token") == token:
                        return record, identity
