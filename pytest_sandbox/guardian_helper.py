"""The guardian and the janitor processes (:mod:`pytest_sandbox.guardian` describes what they do).

This module is the helpers' whole program. It is started as ``python -I -S -c BOOT DIR guard ...``,
where BOOT appends this file's directory to ``sys.path`` (after the standard library, so nothing here
can shadow a stdlib module) and imports it as a top-level module: the helper never imports the
``pytest_sandbox`` package (its ``__init__`` and the caller-side API need typing, subprocess,
pathlib...), and its compiled bytecode is cached like any module's. Every guardian start pays for
exactly what its own code paths use: os, signal, select, sys, time, and ctypes for
prctl(2) and unshare(2) (no stdlib wrapper on 3.10/3.11). It can also run as a script by path.

Stdlib only: the helpers run inside the lab namespaces with nothing but the standard library.
"""

import os
import select
import signal
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing costs every guardian start
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# <linux/sched.h>, <linux/prctl.h>
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

SWEEP_ROUNDS = 200  # rounds of "find descendants, SIGKILL them, reap" before giving up
SWEEP_PAUSE_SECONDS = 0.01
EXIT_PARENT_GONE = 125
EXIT_EXEC_FAILED = 127


class _Suppress:
    """``contextlib.suppress``, without importing contextlib (and collections): ~3 ms of every start."""

    def __init__(self, *kinds: type[BaseException]) -> None:
        self._kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, self._kinds)


def _prctl(option: int, value: int) -> None:
    import ctypes  # imported where used: the janitor never needs it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _unshare(flags: int) -> None:
    import ctypes

    if ctypes.CDLL(None, use_errno=True).unshare(ctypes.c_int(flags)) != 0:
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


def _default_signals() -> None:
    """In a freshly forked child: the guardian's signal handling undone (handlers, wake-up fd, mask)."""
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _exec(argv: list[str]) -> None:
    """In a freshly forked child: default signal handling back, then exec ``argv`` (never returns)."""
    try:
        _default_signals()
        os.execvp(argv[0], argv)
    except BaseException as exc:  # never return into the guardian's code in the child
        with _Suppress(OSError):
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
    """SIGKILL every descendant and reap them (as a subreaper, orphans come back to us) until none remain.

    A subreaper with no child left has no descendant left either: an orphan is re-parented to its
    nearest living subreaper ancestor (prctl(2), PR_SET_CHILD_SUBREAPER), and a zombie child is still
    a child until reaped. So the /proc scan runs only while children remain: a command that exited
    alone (every plain run) costs one waitpid, not a walk over every process on the machine.
    """
    for _ in range(SWEEP_ROUNDS):
        if not _reap_all():
            return
        for pid in _descendants(os.getpid()):
            with _Suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not _reap_all():
            return
        time.sleep(SWEEP_PAUSE_SECONDS)


def _run_init(launch: "Callable[[], None]", outer_alive: int, linger: bool) -> None:
    """PID 1 of the guardian's namespace: run the command (``launch``, which never returns), reap
    everything, exit when done (never returns)."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # The guardian may have died between fork and prctl: its end of the pipe closed means so.
        if select.select([outer_alive], [], [], 0)[0]:
            os._exit(EXIT_PARENT_GONE)
        command = os.fork()
        if command == 0:
            os.close(outer_alive)
            launch()
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
        with _Suppress(OSError):
            os.write(2, f"guardian init: {exc}\n".encode())
        os._exit(EXIT_EXEC_FAILED)


def _guard(parent: int, argv: list[str], pid_namespace: bool, linger: bool) -> int:
    pidfd = _watch_parent(parent)
    if pidfd is None:
        return EXIT_PARENT_GONE
    return _guard_watching(pidfd, lambda: _exec(argv), pid_namespace, linger)


def _guard_watching(pidfd: int, launch: "Callable[[], None]", pid_namespace: bool, linger: bool) -> int:
    """The guardian proper, watching the caller through ``pidfd`` (-1: PR_SET_PDEATHSIG instead); its
    command is what ``launch`` (run in a forked child, never returning) starts: an ``execvp``, or the
    fork server's preloaded code (:func:`_forkserver`)."""
    with _Suppress(PermissionError):
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
            _run_init(launch, alive_read, linger)
        os.close(alive_read)
        launch()
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
            with _Suppress(OSError):
                os.close(fd)
    code: int | None = None
    poller = select.poll()
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    while True:
        events = dict(poller.poll())
        if wake_read in events:
            with _Suppress(BlockingIOError):
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
        with _Suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    _sweep()


def _forkserver(parent: int, code_hex: str) -> int:
    """Start guarded commands by fork, from code loaded once: the sandbox spawners (issue #12).

    ``code_hex`` is a module (marshalled code, as hex) run once here; its ``main(argv)`` is the command.
    Requests arrive on fd 0, a SOCK_SEQPACKET socket: marshal ``{"argv", "umask", "env"}`` with three
    descriptors: a reply socket, the one descriptor the command gets (its number is appended to argv) and
    the caller's working directory.
    Per request this process forks a **guardian** (:func:`_guard_watching`, subreaper mode, watching
    ``parent`` through this process's pidfd on it), which forks the command: ``main`` in a child that
    kept only that descriptor and 0-2. The reply gets ``{"pid"}`` of the guardian and a pidfd on it
    (opened before this process can reap it, so it names that guardian), then ``{"status"}`` once it is
    reaped. The guarantees are a guardian's, per command: each command's guardian kills what it
    orphaned when it exits and everything when the caller is gone; this process only forks and reaps,
    and exits when the caller is gone or closes its end. What is saved per command is two interpreter
    start-ups (the guardian's and the command's) and the command's imports: two forks of this small
    process instead (benchmarks/README.md, "Issue #12, fourth pass").
    """
    import array
    import marshal
    import socket

    pidfd = _watch_parent(parent)
    if pidfd is None:
        return EXIT_PARENT_GONE
    with _Suppress(PermissionError):
        os.setsid()
    namespace: dict[str, Any] = {"__name__": "forked"}
    exec(marshal.loads(bytes.fromhex(code_hex)), namespace)
    requests = socket.socket(fileno=0)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    replies: dict[int, socket.socket] = {}  # guardian pid -> its reply socket, until it is reaped
    poller = select.poll()
    poller.register(requests.fileno(), select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)

    def send(reply: "socket.socket", message: "dict[str, Any]", fds: "list[int]") -> None:
        with _Suppress(OSError):  # the caller went away: the guardian still runs, and is still reaped
            reply.sendmsg([marshal.dumps(message)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                          if fds else [])

    def start(message: bytes, fds: "list[int]") -> None:
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            return
        reply = socket.socket(fileno=fds[0])
        handed, cwd = fds[1], fds[2]
        try:
            request = marshal.loads(message)
            guardian = os.fork()
        except (OSError, ValueError, EOFError, TypeError) as exc:
            send(reply, {"error": f"{type(exc).__name__}: {exc}"}, [])
            reply.close()
            os.close(handed)
            os.close(cwd)
            return
        if guardian == 0:
            try:
                _forked_guardian(request, handed, cwd, pidfd, namespace, [requests.fileno(), wake_read, wake_write])
            finally:
                os._exit(EXIT_EXEC_FAILED)
        os.close(handed)
        os.close(cwd)
        watch = os.pidfd_open(guardian)  # not reaped before this: the PID cannot have been reused
        send(reply, {"pid": guardian}, [watch])
        os.close(watch)
        replies[guardian] = reply

    while True:
        events = dict(poller.poll())
        if wake_read in events:
            with _Suppress(BlockingIOError):
                os.read(wake_read, 4096)
            while replies:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                reply = replies.pop(pid, None)
                if reply is not None:
                    send(reply, {"status": status}, [])
                    reply.close()
        if requests.fileno() in events:
            fds = array.array("i")
            message, ancillary, _, _ = requests.recvmsg(1 << 20, socket.CMSG_LEN(3 * fds.itemsize),
                                                         socket.MSG_CMSG_CLOEXEC)
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            if not message and not fds:
                return 0  # the caller closed its end: its guardians live on, each watching the caller
            start(message, list(fds))
        if pidfd in events:
            return EXIT_PARENT_GONE


def _forked_guardian(request: "dict[str, Any]", handed: int, cwd: int, pidfd: int, namespace: "dict[str, Any]",
                     server_fds: "list[int]") -> None:
    """In the fork server's child: become the command's guardian, the caller's cwd, umask and environment
    first (as a command started by the caller at this moment would have them); never returns."""
    _default_signals()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # not the fork server's request socket (its fd 0)
    os.fchdir(cwd)
    for fd in {devnull, cwd, *server_fds} - {0, 1, 2}:
        os.close(fd)
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = [*request["argv"], str(handed)]

    def launch() -> None:
        code = 0
        try:  # whatever happens, never return into the guardian's code in this child
            _default_signals()
            # Only the handed descriptor and 0-2: not the guardian's pipes, nor its pidfd on the caller.
            for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
                if fd > 2 and fd != handed:
                    with _Suppress(OSError):
                        os.close(fd)
            namespace["main"](argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # never return into the fork server's code
            with _Suppress(OSError):
                os.write(2, f"guardian: {argv[0]!r} failed: {type(exc).__name__}: {exc}\n".encode())
            code = EXIT_EXEC_FAILED
        with _Suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    os._exit(_guard_watching(pidfd, launch, False, False))


def _janitor(parent: int) -> int:
    """Read paths from stdin; when stdin closes or ``parent`` exits, remove those still present."""
    pidfd = _watch_parent(parent)
    paths: list[str] = []
    with _Suppress(PermissionError):
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
            with _Suppress(BlockingIOError, OSError):
                os.set_blocking(0, False)
                pending += os.read(0, 65536)
            paths.extend(os.fsdecode(line) for line in pending.split(b"\n") if line)
            break
    import shutil  # only the janitor's exit needs it

    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return 0


def main(args: list[str]) -> int:
    """``guard --parent PID [--pid-namespace] [--linger] -- ARGV...``, ``janitor --parent PID`` or
    ``forkserver --parent PID CODE``."""
    usage = ("usage: guard --parent PID [--pid-namespace] [--linger] -- ARGV...\n"
             "       janitor --parent PID\n"
             "       forkserver --parent PID CODE  (requests on fd 0, a SOCK_SEQPACKET socket)")
    if len(args) < 3 or args[0] not in ("guard", "janitor", "forkserver") or args[1] != "--parent" \
            or not args[2].isdigit():
        print(usage, file=sys.stderr)
        return 2
    parent = int(args[2])
    if args[0] == "janitor":
        return _janitor(parent)
    if args[0] == "forkserver":
        if len(args) != 4:
            print(usage, file=sys.stderr)
            return 2
        return _forkserver(parent, args[3])
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


def run(args: list[str]) -> None:
    """:func:`main`, then exit at once: nothing here needs the interpreter's finalisation, and a
    caller waiting for the guardian (``Sandbox.close``) would wait for it (a few ms per exit)."""
    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run(sys.argv[1:])
