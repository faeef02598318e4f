"""Nothing the harness starts outlives the session, whatever ends it (SIGKILL of pytest included).

Every long-lived process the harness starts (the sandbox spawners, third-party proxy commands, a
``--sandbox-exec`` launcher) runs under a small **guardian**: ``python -I -S -c BOOT DIR guard --parent
PYTEST_PID [--pid-namespace] [--linger] -- ARGV`` (:mod:`pytest_sandbox.guardian_helper`). The guardian
is the PID the caller holds. It

- opens a pidfd on the pytest process (pidfd_open(2), Linux 5.3) and checks ``getppid()`` afterwards,
  so the pidfd is known to name its parent and not a recycled PID; a pidfd polls readable when that
  process has exited, however it ended (pidfd_open(2) "poll");
- leaves pytest's session (setsid(2)): a Ctrl-C or a ``kill -PGID`` meant for pytest is handled by
  pytest's teardown or by the guardian noticing pytest is gone, never by the guardian dying first;
- with ``--pid-namespace``, unshares a PID namespace and forks its **init**, which runs ARGV and reaps
  everything in it. When a namespace's init dies the kernel SIGKILLs every other process in it
  (pid_namespaces(7)), and the init has ``PR_SET_PDEATHSIG(SIGKILL)`` towards the guardian (whose only
  thread forked it): even a SIGKILL of the guardian itself leaves nothing behind. A proxy that
  daemonises (tinyproxy without ``-d``, squid without ``-N``) cannot leave the namespace;
- without it (or where the kernel refuses a PID namespace), it is a child subreaper
  (``PR_SET_CHILD_SUBREAPER``, prctl(2)): whatever its descendants orphan, a daemon included, is
  re-parented to it instead of PID 1, so it can find and kill it. Used where a new PID namespace would
  change what is being measured (the spawners and a third-party launcher report their namespaces).

When pytest exits, or the guardian gets SIGTERM/SIGINT/SIGHUP, it SIGKILLs everything under it, reaps
it, and exits. When ARGV itself exits the rest is killed too, unless ``--linger`` (a proxy command
that forks its server and exits: the guardian then lives, and is stopped, with the server).

Temporary directories: :func:`session_temp_dir` registers each one with a per-session **janitor**
(``... janitor --parent PID``) that removes every registered path still present when pytest exits or
closes its end of the pipe, so a killed session leaves no ``pytest-sandbox-ca-*`` behind.

This module is the caller's side (imported by pytest). The guardian and the janitor themselves are
:mod:`pytest_sandbox.guardian_helper`, started without importing this package, so a guardian costs
only the interpreter and the few stdlib modules its own code uses (issue #12: every sandbox start
pays for one). Stdlib only: the helpers run inside the lab namespaces with nothing but the standard
library.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "GuardedPopen",
    "guarded",
    "helper_interpreter",
    "run",
    "session_temp_dir",
    "stop",
    "wait_exited",
]

STOP_TIMEOUT_SECONDS = 5.0

# Appended, not prepended: the standard library comes first, so no file next to the helper can shadow
# a module it imports (this directory holds an ``http`` package).
_BOOTSTRAP = ("import sys; sys.path.append(sys.argv[1]); "
              "from guardian_helper import run; run(sys.argv[2:])")
_HELPER_DIRECTORY = str(Path(__file__).resolve().parent)


def helper_interpreter() -> str:
    """The Python that runs a helper: ours, or the first ``python3`` on PATH we may execute.

    A helper needs only the standard library, and the running interpreter may not be executable by an
    unprivileged uid (e.g. a pyenv build under a 0700 /root, run through setpriv).
    """
    from pytest_sandbox.errors import HostUnsupportedError

    if sys.executable and os.access(sys.executable, os.X_OK):
        return sys.executable
    fallback = shutil.which("python3")
    if fallback is None:
        raise HostUnsupportedError(
            f"cannot start a helper process: {sys.executable!r} is not executable by uid {os.getuid()} "
            "and no python3 is on PATH")
    return fallback


def _helper_argv(*args: str) -> list[str]:
    # -I -S: no site-packages, no PYTHON* variables, no cwd on sys.path; the guardian is stdlib only.
    return [helper_interpreter(), "-I", "-S", "-c", _BOOTSTRAP, _HELPER_DIRECTORY, *args]


# --------------------------------------------------------------------------------------------------
# The caller's side (the pytest process)
# --------------------------------------------------------------------------------------------------


def guarded(argv: Sequence[str], *, pid_namespace: bool = False, linger: bool = False) -> list[str]:
    """``argv`` run under a guardian bound to this process (see the module docstring).

    Stop the returned process with :func:`stop` (SIGTERM: the guardian kills its whole tree and
    exits); a plain SIGKILL of the guardian still kills everything in ``pid_namespace`` mode.
    """
    if not argv:
        raise ValueError("cannot guard an empty command")
    options = ["--pid-namespace"] * pid_namespace + ["--linger"] * linger
    return _helper_argv("guard", "--parent", str(os.getpid()), *options, "--", *argv)


class GuardedPopen(subprocess.Popen[Any]):
    """A :class:`subprocess.Popen` of :func:`guarded` argv whose ``kill`` stops the whole tree.

    ``kill()`` (what :meth:`communicate` timeouts and context exits use) sends SIGTERM to the
    guardian, which SIGKILLs everything under it and exits; a SIGKILL would only end the guardian.
    ``wait(timeout)`` returns as the guardian exits (see :func:`wait_exited`).
    """

    def __init__(self, argv: Sequence[str], *, pid_namespace: bool = False, linger: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(guarded(argv, pid_namespace=pid_namespace, linger=linger), **kwargs)

    def kill(self) -> None:
        self.terminate()

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None or self.returncode is not None:
            return super().wait()
        if not wait_exited(self, timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        assert self.returncode is not None
        return self.returncode


def wait_exited(process: subprocess.Popen[Any], timeout: float) -> bool:
    """Wait at most ``timeout`` seconds for ``process`` (a child of ours) to exit, and reap it.

    True once it has exited. A pidfd on it polls readable as soon as it exits (pidfd_open(2), Linux
    5.3), so this returns then; ``Popen.wait(timeout=...)`` sleep-polls instead, its sleeps doubling up
    to 50 ms (CPython's ``subprocess._wait``), a cost every sandbox close and guarded run would pay. The
    PID of a child that is not yet reaped cannot be reused, so the pidfd names this process.
    """
    if process.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(process.pid)
    except OSError:  # before Linux 5.3, or reaped meanwhile by another thread's poll()
        try:
            subprocess.Popen.wait(process, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        exited = bool(poller.poll(max(0.0, timeout) * 1000))  # milliseconds; retried on EINTR (PEP 475)
    finally:
        os.close(pidfd)
    if exited:
        subprocess.Popen.wait(process)  # it has exited: the waitpid returns at once
    return exited


def stop(process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """Stop a guardian (and so everything under it) by PID: SIGTERM, a bounded wait, then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        if wait_exited(process, timeout):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    wait_exited(process, timeout)


def run(argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None,
        **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """:func:`subprocess.run` (capture_output) of ``argv`` under a guardian (subreaper mode).

    On timeout the guardian kills the command and everything it forked, then TimeoutExpired is raised.
    """
    with GuardedPopen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      **kwargs) as process:
        try:
            out, err = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            process.communicate()
            raise
    return subprocess.CompletedProcess(list(argv), int(process.returncode), out, err)


class _Janitor:
    """One per pytest process: a helper that removes registered paths when this process is gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._owner = 0

    def register(self, path: Path) -> None:
        with self._lock:
            if self._process is None or self._owner != os.getpid() or self._process.poll() is not None:
                self._process = subprocess.Popen(
                    _helper_argv("janitor", "--parent", str(os.getpid())), stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                self._owner = os.getpid()
            stdin: IO[bytes] | None = self._process.stdin
            assert stdin is not None
            stdin.write(os.fsencode(path) + b"\n")
            stdin.flush()


_JANITOR = _Janitor()


def session_temp_dir(prefix: str) -> Path:
    """A new private temporary directory (``tempfile.mkdtemp``) that is removed when this process exits.

    The caller still removes it when done; the janitor removes whatever is left, however this
    process ended (SIGKILL included).
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        _JANITOR.register(directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory
