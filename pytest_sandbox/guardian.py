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

The sandbox spawners' guardians are not started as commands but forked (:class:`ForkServer`): one fork
server per pytest process (``... forkserver --parent PID CODE``, the spawner's module loaded once) forks,
per sandbox, a guardian exactly as above (subreaper mode, watching pytest), which forks the spawner. Each
sandbox still has a guardian of its own that kills what its commands orphaned when its spawner exits;
the fork server itself only forks and reaps, and exits when pytest is gone (issue #12: a sandbox's start
is two forks instead of two interpreter start-ups).

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
import marshal
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ForkServer",
    "ForkedGuardian",
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
            # Drain what the pipes still hold, for a bounded time: a guardian that had to be SIGKILLed
            # (it ignored SIGTERM for STOP_TIMEOUT_SECONDS) could not kill what its command forked, and a
            # survivor holding the pipes' write ends would keep them open, so an unbounded read never ends.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=STOP_TIMEOUT_SECONDS)
            raise
    return subprocess.CompletedProcess(list(argv), int(process.returncode), out, err)


class ForkedGuardian:
    """A guardian the :class:`ForkServer` forked (its child, not ours): what a :class:`GuardedPopen` gives.

    ``wait`` returns once the fork server has reaped it (so its PID is gone) and sets ``returncode`` as
    :class:`subprocess.Popen` would; if the fork server itself is gone, it waits on the pidfd instead
    (the guardian was re-parented; ``returncode`` is then ``UNKNOWN_STATUS``)."""

    UNKNOWN_STATUS = -255

    def __init__(self, pid: int, pidfd: int, reply: socket.socket) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._reply = reply
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        self.wait_exited(0)
        return self.returncode

    def wait_exited(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the guardian to exit and be reaped; True once it has."""
        with self._lock:
            if self.returncode is not None:
                return True
            deadline = time.monotonic() + max(0.0, timeout)
            self._reply.settimeout(max(0.0, timeout))
            try:
                message = self._reply.recv(1024)
            except (TimeoutError, BlockingIOError):
                return False
            if message:
                status = marshal.loads(message)["status"]
                self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            else:  # the fork server is gone: the pidfd still says when the guardian exits
                poller = select.poll()
                poller.register(self._pidfd, select.POLLIN)
                if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    return False
                self.returncode = self.UNKNOWN_STATUS
            self._reply.close()
            os.close(self._pidfd)
            return True

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """:func:`stop` for this guardian: SIGTERM through the pidfd (never a reused PID), a bounded
        wait, then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with self._lock:
                if self.returncode is not None:
                    return
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, sig)
            if self.wait_exited(timeout):
                return


def _umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread, for a moment):
    the ``Umask`` line of /proc/self/status (proc(5), Linux 4.7)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise OSError("no Umask line in /proc/self/status")


class ForkServer:
    """One per pytest process and module: a fork server (:func:`guardian_helper._forkserver`) with
    ``code`` (a marshalled module, hex) loaded, started at the first :meth:`start`.

    Each :meth:`start` gets a new guardian, forked from the server, running the module's ``main(argv +
    [fd])`` where ``fd`` is the server's copy of ``handed``. Started from this process's interpreter
    (``sys.executable``): marshal data is only read by the interpreter that wrote it."""

    def __init__(self, code: str) -> None:
        self._code = code
        self._lock = threading.Lock()
        self._channel: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._owner = 0

    def _ready_channel(self) -> socket.socket:
        with self._lock:
            alive = self._process is not None and self._owner == os.getpid() and self._process.poll() is None
            if not alive or self._channel is None:
                if self._channel is not None and self._owner == os.getpid():
                    self._channel.close()
                channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    argv = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, _HELPER_DIRECTORY,
                            "forkserver", "--parent", str(os.getpid()), self._code]
                    self._process = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=subprocess.DEVNULL)
                finally:
                    theirs.close()
                self._channel, self._owner = channel, os.getpid()
            assert self._channel is not None
            return self._channel

    def start(self, argv: Sequence[str], handed: int) -> ForkedGuardian:
        """A guardian running ``main([*argv, <fd>])``, with this process's working directory (passed as a
        descriptor), umask and environment now.
        Raises OSError if the fork server cannot start one (nothing was started then)."""
        request = marshal.dumps({"argv": list(argv), "umask": _umask(), "env": dict(os.environ)})
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the very directory, even if removed
        try:
            return self._start(request, handed, cwd)
        finally:
            os.close(cwd)

    def _start(self, request: bytes, handed: int, cwd: int) -> ForkedGuardian:
        for attempt in range(2):
            channel = self._ready_channel()
            reply, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                socket.send_fds(channel, [request], [theirs.fileno(), handed, cwd])
            except OSError:
                reply.close()
                if attempt:
                    raise
                with self._lock:
                    if self._process is not None and self._owner == os.getpid():
                        stop(self._process)  # gone or wedged: the next attempt starts a new one
                continue
            finally:
                theirs.close()
            message, fds, _, _ = socket.recv_fds(reply, 1024, 1)
            answer = marshal.loads(message) if message else {"error": "the fork server exited"}
            if "pid" not in answer or not fds:
                for fd in fds:
                    os.close(fd)
                reply.close()
                raise OSError(f"the fork server did not start a guardian: {answer.get('error')}")
            return ForkedGuardian(int(answer["pid"]), fds[0], reply)
        raise AssertionError("unreachable")


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
