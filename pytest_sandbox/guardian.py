"""Nothing the harness starts outlives the session, whatever ends it (SIGKILL of pytest included).

Every long-lived process the harness starts (the sandbox spawners, third-party proxy commands, a
``--sandbox-exec`` launcher) runs under a small **guardian**: ``python -I -c BOOT PKG guard --parent
PYTEST_PID [--pid-namespace] [--linger] -- ARGV``. The guardian is the PID the caller holds. It

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

Stdlib only: the guardian runs inside the lab namespaces with nothing but the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
]

# <linux/sched.h>, <linux/prctl.h>
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

STOP_TIMEOUT_SECONDS = 5.0
SWEEP_ROUNDS = 200  # rounds of "find descendants, SIGKILL them, reap" before giving up
SWEEP_PAUSE_SECONDS = 0.01
EXIT_PARENT_GONE = 125
EXIT_EXEC_FAILED = 127

_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "from pytest_sandbox.guardian import main; sys.exit(main(sys.argv[2:]))")
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


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
    return [helper_interpreter(), "-I", "-S", "-c", _BOOTSTRAP, _PACKAGE_PARENT, *args]


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
    """

    def __init__(self, argv: Sequence[str], *, pid_namespace: bool = False, linger: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(guarded(argv, pid_namespace=pid_namespace, linger=linger), **kwargs)

    def kill(self) -> None:
        self.terminate()


def stop(process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """Stop a guardian (and so everything under it) by PID: SIGTERM, a bounded wait, then SIGKILL."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


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


# --------------------------------------------------------------------------------------------------
# The guardian and the janitor (run as helpers; stdlib only)
# --------------------------------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc().prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                     ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unshare(flags: int) -> None:
    if _libc().unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _watch_parent(parent: int) -> int | None:
    """A pidfd on ``parent`` (-1 where the kernel has none), or None if it is no longer our parent."""
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        return None
    except OSError:
        # Before Linux 5.3: SIGTERM when the parent dies, handled like a stop. It follows the thread
        # that forked us rather than the process (prctl(2)), hence only the fallback.
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        return -1 if os.getppid() == parent else None
    # Opened first, checked second: if the parent is still our parent now, the pidfd names it (a PID
    # is not reused while its process has children that have not been re-parented).
    if os.getppid() != parent:
        os.close(pidfd)
        return None
    return pidfd


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _exec(argv: list[str]) -> None:
    """In a freshly forked child: default signal handling back, then exec ``argv`` (never returns)."""
    try:
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.execvp(argv[0], argv)
    except BaseException as exc:  # never return into the guardian's code in the child
        with contextlib.suppress(OSError):
            os.write(2, f"guardian: cannot run {argv[0]!r}: {exc}\n".encode())
    os._exit(EXIT_EXEC_FAILED)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(root: int) -> list[int]:
    children = _children_map()
    found: list[int] = []
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _reap_all() -> bool:
    """Reap every exited child; True while children remain."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def _sweep() -> None:
    """SIGKILL every descendant and reap them (as a subreaper, orphans come back to us) until none remain."""
    for _ in range(SWEEP_ROUNDS):
        found = _descendants(os.getpid())
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not _reap_all() and not found:
            return
        time.sleep(SWEEP_PAUSE_SECONDS)


def _run_init(argv: list[str], outer_alive: int, linger: bool) -> None:
    """PID 1 of the guardian's namespace: run ``argv``, reap everything, exit when done (never returns)."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # The guardian may have died between fork and prctl: its end of the pipe closed means so.
        if select.select([outer_alive], [], [], 0)[0]:
            os._exit(EXIT_PARENT_GONE)
        command = os.fork()
        if command == 0:
            os.close(outer_alive)
            _exec(argv)
        code = EXIT_EXEC_FAILED
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == command:
                code = _exit_code(status)
                if not linger:
                    break  # exiting as init: the kernel SIGKILLs the rest of the namespace
        os._exit(code)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"guardian init: {exc}\n".encode())
        os._exit(EXIT_EXEC_FAILED)


def _guard(parent: int, argv: list[str], pid_namespace: bool, linger: bool) -> int:
    pidfd = _watch_parent(parent)
    if pidfd is None:
        return EXIT_PARENT_GONE
    with contextlib.suppress(PermissionError):
        os.setsid()
    received: list[int] = []
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda signum, _frame: received.append(signum))
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    in_namespace = False
    if pid_namespace:
        try:
            _unshare(CLONE_NEWPID)
            in_namespace = True
        except OSError:
            in_namespace = False  # no CAP_SYS_ADMIN here: the subreaper still catches daemons
    alive_read, alive_write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(alive_write)
        if in_namespace:
            _run_init(argv, alive_read, linger)
        os.close(alive_read)
        _exec(argv)
    os.close(alive_read)
    # The command holds the descriptors passed to it now: keep none of ours open (a copy held here
    # would hide the command's exit from a caller waiting for EOF), nor the caller's pipes.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    keep = {0, 1, 2, pidfd, wake_read, wake_write, alive_write}
    for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    code: int | None = None
    poller = select.poll()
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    while True:
        events = dict(poller.poll())
        if wake_read in events:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
                if code is not None or linger:
                    code = EXIT_EXEC_FAILED if code is None else code
                    return code
            if pid == 0:
                break
            if pid == child:
                code = _exit_code(status)
                if in_namespace or not linger:
                    _sweep()
                    return code
        if pidfd in events:  # pytest is gone, however it ended
            _stop_everything(child, in_namespace)
            return EXIT_PARENT_GONE
        if received:
            _stop_everything(child, in_namespace)
            signal.signal(received[0], signal.SIG_DFL)
            os.kill(os.getpid(), received[0])  # end as the signal the caller sent, like the command would
            return 128 + received[0]


def _stop_everything(child: int, in_namespace: bool) -> None:
    if in_namespace:
        # SIGKILL of the namespace's init: the kernel kills every process in the namespace, and the
        # init's exit (so our waitpid) completes only once they are gone (pid_namespaces(7)).
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    _sweep()


def _janitor(parent: int) -> int:
    """Read paths from stdin; when stdin closes or ``parent`` exits, remove those still present."""
    pidfd = _watch_parent(parent)
    paths: list[str] = []
    with contextlib.suppress(PermissionError):
        os.setsid()
    for number in (signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)  # only EOF or the parent's exit end the janitor
    pending = b""
    poller = select.poll()
    poller.register(0, select.POLLIN)
    if pidfd is not None and pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    while pidfd is not None:
        events = dict(poller.poll())
        if 0 in events:
            chunk = os.read(0, 65536)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            paths.extend(os.fsdecode(line) for line in lines if line)
            if not chunk:
                break
        if pidfd in events:
            with contextlib.suppress(BlockingIOError, OSError):
                os.set_blocking(0, False)
                pending += os.read(0, 65536)
            paths.extend(os.fsdecode(line) for line in pending.split(b"\n") if line)
            break
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return 0


def main(args: list[str]) -> int:
    """``guard --parent PID [--pid-namespace] [--linger] -- ARGV...`` or ``janitor --parent PID``."""
    usage = ("usage: guard --parent PID [--pid-namespace] [--linger] -- ARGV...\n"
             "       janitor --parent PID")
    if len(args) < 3 or args[0] not in ("guard", "janitor") or args[1] != "--parent" or not args[2].isdigit():
        print(usage, file=sys.stderr)
        return 2
    parent = int(args[2])
    if args[0] == "janitor":
        return _janitor(parent)
    rest = args[3:]
    if "--" not in rest or rest.index("--") == len(rest) - 1:
        print(usage, file=sys.stderr)
        return 2
    split = rest.index("--")
    flags, argv = set(rest[:split]), rest[split + 1:]
    if flags - {"--pid-namespace", "--linger"}:
        print(usage, file=sys.stderr)
        return 2
    return _guard(parent, argv, "--pid-namespace" in flags, "--linger" in flags)
