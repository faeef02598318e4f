"""Run commands under a compiled policy: ``Sandbox.run`` and ``Sandbox.popen``.

A :class:`Sandbox` owns one pre-filtered spawner process (:mod:`pytest_sandbox.seccomp.spawner`) that
entered the network namespace, dropped privileges and loaded the filters once; every command is
spawned from it, so it inherits exactly that state. If any step fails the spawner reports why and
exits, and :class:`~pytest_sandbox.errors.LaunchError` is raised: nothing is ever run unsandboxed.
"""

from __future__ import annotations

import functools
import marshal
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import IO, Any

from pytest_sandbox import guardian
from pytest_sandbox.errors import HostUnsupportedError, LaunchError
from pytest_sandbox.probes.syscall_runner import proc_stat_field
from pytest_sandbox.seccomp.compiler import CompiledFilter

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
NOBODY = 65534
_ZYGOTE_SOURCE = (resources.files("pytest_sandbox.seccomp") / "spawner.py").read_text()


@functools.lru_cache(maxsize=2)
def _spawner_server(source: str) -> guardian.ForkServer:
    """The fork server every sandbox's spawner is forked from, with ``source`` compiled and loaded: one
    per process, started at the first sandbox (not at import), from whatever ``_ZYGOTE_SOURCE`` is then
    (benchmarks/bench_launch.py ``--before`` swaps it). A sandbox's start is then two forks of that small
    process (its guardian, then the spawner), not two interpreter start-ups and the spawner's imports:
    the largest part of a sandbox's start-up on a busy 2-core machine (benchmarks/README.md, "Issue #12,
    fourth pass")."""
    return guardian.ForkServer(marshal.dumps(compile(source, "spawner.py", "exec", dont_inherit=True)).hex())


@dataclass(frozen=True)
class Identity:
    """Who the sandboxed process runs as: the caller (``None`` ids) or a dropped uid/gid.

    By default a dropped uid keeps the kernel's default capabilities for it (uid 0 all, any other uid
    none) and no supplementary groups. ``capabilities`` asks for exactly that effective (and permitted)
    set in the launched command, whatever its uid, ``bounding`` for that bounding set, ``groups`` for
    those supplementary groups, and ``no_new_privs`` sets the flag even without a filter: together they
    let an unfiltered baseline run as the same caller a third-party sandbox showed.
    """

    name: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    capabilities: int | None = None
    bounding: int | None = None
    no_new_privs: bool = False

    @classmethod
    def current(cls) -> Identity:
        return cls("root" if os.geteuid() == 0 else "user")

    @classmethod
    def nobody(cls) -> Identity:
        return cls("nobody", NOBODY, NOBODY)


@dataclass(frozen=True)
class NetworkPlacement:
    """Where the sandboxed process's sockets live.

    ``block`` and ``allow`` stay in the caller's namespace (``block`` relies on the filter's
    AF_INET/AF_INET6 rules). ``proxy`` joins ``netns_path`` (a namespace the harness created, where
    only the proxy listens) or, without one, unshares a fresh empty network namespace.
    """

    mode: str
    netns_path: str | None = None
    userns_path: str | None = None


# unshare(2) flags per namespace type (include/uapi/linux/sched.h).
NAMESPACE_FLAGS = {
    "cgroup": 0x02000000, "ipc": 0x08000000, "mnt": 0x00020000, "net": 0x40000000,
    "pid": 0x20000000, "time": 0x00000080, "user": 0x10000000, "uts": 0x04000000,
}  # fmt: skip


@dataclass(frozen=True)
class FreshNamespaces:
    """Namespaces the spawner unshares before dropping privileges (pid and time ones hold its children).

    With ``user`` among them the others are owned by the new user namespace (unshare(2) creates it
    first), and a helper left in the parent namespace writes ``setgroups``, ``uid_map`` and ``gid_map``
    for it (a process cannot map arbitrary ids into its own new namespace; user_namespaces(7)).
    """

    kinds: tuple[str, ...] = ()
    uid_map: str | None = None
    gid_map: str | None = None
    setgroups: str | None = None

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.kinds if kind not in NAMESPACE_FLAGS]
        if unknown:
            raise LaunchError(f"unknown namespace type(s) {unknown}; use {', '.join(NAMESPACE_FLAGS)}")
        if "user" in self.kinds and (self.uid_map is None or self.gid_map is None):
            raise LaunchError("a fresh user namespace needs a uid_map and a gid_map")


@dataclass(frozen=True)
class SandboxSpec:
    filter: CompiledFilter | None  # None only for the unfiltered baseline
    network: NetworkPlacement
    identity: Identity = field(default_factory=Identity.current)
    namespaces: FreshNamespaces = field(default_factory=FreshNamespaces)
    # A Landlock domain of the sandbox's own (spawner.py ``_enter_landlock_domain``): no process in it reaches the
    # memory or files of one outside it through /proc. Off only for the weakened launcher the tests measure.
    process_isolation: bool = True

    @property
    def describe(self) -> str:
        what = f"policy {self.filter.policy_name}" if self.filter else "NO FILTER (baseline)"
        return f"{what}, network {self.network.mode}, as {self.identity.name}"


@dataclass(frozen=True)
class SandboxResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    @property
    def signal(self) -> int | None:
        """The signal that killed the process (e.g. ``signal.SIGSYS``), or None if it exited."""
        return -self.returncode if self.returncode < 0 else None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal else None


class SandboxedProcess:
    """A process started by the spawner; the subset of :class:`subprocess.Popen` tests need."""

    def __init__(self, argv: Sequence[str], pid: int, reply: socket.socket,
                 stdin: IO[bytes] | None, stdout: IO[bytes] | None, stderr: IO[bytes] | None,
                 *, spawner_pid: int | None = None) -> None:
        self.args = tuple(argv)
        self.pid = pid
        self.spawner_pid = spawner_pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self._reply = reply
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._collect(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._collect(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(list(self.args), timeout or 0)
        return self.returncode

    def _collect(self, timeout: float | None) -> None:
        with self._lock:
            self._collect_locked(timeout)

    def _collect_locked(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        self._reply.settimeout(timeout)
        try:
            message = self._reply.recv(65536)
        except (TimeoutError, BlockingIOError):
            return
        self._reply.close()
        if not message:  # the spawner died: its children were killed with it
            self.returncode = -signal.SIGKILL
            return
        status = marshal.loads(message)["status"]
        self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def send_signal(self, sig: int) -> None:
        """Signal the process group the spawner put the command in, by its PID, while that process is still the
        spawner's child: the pid came from the spawner, which shares its commands' Landlock domain, and root in there
        could make it answer another pid; the harness must never be its deputy for signalling a process outside.

        Safe from a signal handler that interrupted :meth:`wait` on the same thread (``pytest-sandbox
        run`` forwards SIGINT/SIGTERM that way): the lock is not reentrant, so when someone holds it
        the status check is skipped (that holder is waiting, so no status has been taken yet)."""
        if self._lock.acquire(blocking=False):
            try:
                self._collect_locked(0)
            finally:
                self._lock.release()
        if self.returncode is None and (self.spawner_pid is None or parent_pid(self.pid) == self.spawner_pid):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input: bytes | None = None, timeout: float | None = None) -> tuple[bytes, bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        output: dict[int, list[bytes]] = {}
        out_fd = self.stdout.fileno() if self.stdout and not self.stdout.closed else -1
        err_fd = self.stderr.fileno() if self.stderr and not self.stderr.closed else -2
        with selectors.DefaultSelector() as selector:
            pending_input = memoryview(input or b"")
            stdin_fd = self.stdin.fileno() if self.stdin is not None and not self.stdin.closed else -3
            if self.stdin is not None and not self.stdin.closed:
                if pending_input:
                    os.set_blocking(self.stdin.fileno(), False)
                    selector.register(self.stdin, selectors.EVENT_WRITE)
                else:
                    self.stdin.close()
            readers = {s.fileno(): s for s in (self.stdout, self.stderr) if s is not None and not s.closed}
            for fd in readers:
                output[fd] = []
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise subprocess.TimeoutExpired(list(self.args), timeout or 0)
                for key, _ in selector.select(remaining):
                    if self.stdin is not None and key.fd == stdin_fd:
                        try:
                            written = os.write(key.fd, pending_input[:65536])
                        except BrokenPipeError:
                            written = len(pending_input)
                        pending_input = pending_input[written:]
                        if not pending_input:
                            selector.unregister(key.fd)
                            self.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        output[key.fd].append(chunk)
                    else:
                        selector.unregister(key.fd)
                        readers[key.fd].close()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(remaining)
        out = b"".join(output.get(out_fd, []))
        err = b"".join(output.get(err_fd, []))
        return out, err

    def __enter__(self) -> SandboxedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.poll() is None:
            self.kill()
            self.wait()


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (/proc/<pid>/stat field 4), None when there is no such process."""
    parent = proc_stat_field(pid, 4)
    return int(parent) if parent.isdigit() else None


def _close_streams(streams: list[IO[bytes] | None]) -> None:
    for stream in streams:
        if stream is not None and not stream.closed:
            stream.close()


class Sandbox:
    """One sandbox configuration with its spawner. Use as a context manager or call :meth:`close`."""

    def __init__(self, spec: SandboxSpec, *, start_timeout: float = 10.0, short_slice: bool = True) -> None:
        """``short_slice`` (default on): the spawner asks the scheduler for a 0.1 ms slice, so on a
        busy machine it gets a CPU as soon as a launch wakes it (spawner.py, ``_ask_short_slice``); its
        commands keep the default slice. Off only to measure what it buys (benchmarks/bench_launch.py)."""
        if spec.filter is not None and spec.filter.start_problem:
            # One clear line naming the call, instead of posix_spawn's sentinel errno from the spawner.
            raise LaunchError(f"cannot start a sandbox ({spec.describe}): {spec.filter.start_problem}; nothing was run")
        self.spec = spec
        self._lock = threading.Lock()
        self._control, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {**self._spawner_config(spec), "short_slice": short_slice}
        try:
            # Under a guardian of its own (subreaper mode: a PID namespace would change what the probes
            # observe): the spawner, and whatever its commands fork and orphan, die with the sandbox, and
            # everything with the session.
            self._process: guardian.ForkedGuardian = _spawner_server(_ZYGOTE_SOURCE).start(
                ["spawner", marshal.dumps(config).hex()], child_end.fileno())
        except OSError as exc:
            self._control.close()
            raise LaunchError(f"cannot start a sandbox ({spec.describe}): {exc}; nothing was run") from None
        finally:
            child_end.close()
        self._control.settimeout(start_timeout)
        try:
            message = self._control.recv(65536)
        except TimeoutError:
            message = b""
        reply: dict[str, Any] = marshal.loads(message) if message else {"error": "the spawner exited without reporting"}
        if not reply.get("ready"):
            self.close()
            raise LaunchError(f"cannot start a sandbox ({spec.describe}): {reply.get('error')}; nothing was run")
        self.status: Mapping[str, str] = {str(k): str(v) for k, v in dict(reply["status"]).items()}
        # Said before any command ran, so by the spawner itself (SandboxedProcess.send_signal checks against it).
        self.spawner_pid = int(reply["pid"])
        self._control.settimeout(None)

    @staticmethod
    def _spawner_config(spec: SandboxSpec) -> dict[str, object]:
        net = spec.network
        flt = spec.filter
        drop_caps = net.userns_path is not None or (net.mode == "proxy" and net.netns_path is None
                                                    and os.geteuid() != 0)
        who = spec.identity
        fresh = spec.namespaces
        return {
            "netns": net.netns_path if net.mode == "proxy" else None,
            "userns": net.userns_path if net.mode == "proxy" else None,
            "unshare_net": net.mode == "proxy" and net.netns_path is None,
            "unshare": [NAMESPACE_FLAGS[kind] for kind in fresh.kinds],
            "unshare_user": "user" in fresh.kinds,
            "id_maps": {"setgroups": fresh.setgroups, "uid_map": fresh.uid_map, "gid_map": fresh.gid_map},
            "uid": who.uid,
            "gid": who.gid,
            "groups": list(who.groups) if who.groups is not None else None,
            "caps": who.capabilities,
            "bounding": who.bounding,
            "drop_caps": drop_caps,
            "no_new_privs": bool(flt and flt.no_new_privs) or who.no_new_privs,
            "filters": [bytes(p) for p in (flt.programs if flt else ())],
            "landlock": flt is not None and spec.process_isolation,
        }

    @property
    def pid(self) -> int:
        """The PID of the spawner's guardian (:mod:`pytest_sandbox.guardian`); it exits with the spawner."""
        return self._process.pid

    def popen(self, argv: Sequence[str], *, stdin: int | None = DEVNULL, stdout: int | None = PIPE,
              stderr: int | None = PIPE, env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> SandboxedProcess:
        """Start ``argv`` in the sandbox. ``PIPE``/``DEVNULL``/``None`` (inherit) per stream."""
        if not argv:
            raise LaunchError("cannot launch an empty command")
        ours: list[IO[bytes] | None] = []
        theirs: list[int] = []
        to_close: list[int] = []
        for index, choice in enumerate((stdin, stdout, stderr)):
            if choice == PIPE:
                read_fd, write_fd = os.pipe()
                mine, child = (write_fd, read_fd) if index == 0 else (read_fd, write_fd)
                ours.append(os.fdopen(mine, "wb" if index == 0 else "rb", buffering=0))
                theirs.append(child)
                to_close.append(child)
            elif choice == DEVNULL:
                devnull = os.open(os.devnull, os.O_RDWR)
                ours.append(None)
                theirs.append(devnull)
                to_close.append(devnull)
            elif choice is None:
                ours.append(None)
                theirs.append(index)
            else:
                raise LaunchError(f"stdio option {choice!r} is not PIPE, DEVNULL or None")
        reply, reply_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = {"argv": list(argv), "env": dict(os.environ if env is None else env), "cwd": cwd}
        try:
            with self._lock:
                if self._control.fileno() < 0:
                    raise LaunchError("this sandbox is closed")
                socket.send_fds(self._control, [marshal.dumps(request)], [reply_child.fileno(), *theirs])
        except OSError as exc:
            _close_streams(ours)
            reply.close()
            raise LaunchError(f"the sandbox spawner is gone ({exc}); nothing was run") from None
        finally:
            reply_child.close()
            for fd in to_close:
                os.close(fd)
        message = reply.recv(65536)
        answer = marshal.loads(message) if message else {"error": "the spawner exited"}
        if "pid" not in answer:
            _close_streams(ours)
            reply.close()
            raise LaunchError(f"cannot launch {argv[0]!r} in the sandbox: {answer.get('error')}")
        return SandboxedProcess(argv, int(answer["pid"]), reply, *ours, spawner_pid=self.spawner_pid)

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None) -> SandboxResult:
        """Run ``argv`` to completion; on timeout the process group is killed and ``timed_out`` set."""
        process = self.popen(argv, stdin=PIPE if input is not None else DEVNULL, env=env, cwd=cwd)
        try:
            out, err = process.communicate(input, timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            timed_out = True
        assert process.returncode is not None
        return SandboxResult(tuple(argv), process.returncode, out, err, timed_out)

    def close(self) -> None:
        """Stop the spawner (closing its control socket); it kills any command still running in the
        sandbox, and its guardian whatever those commands forked and orphaned."""
        try:
            self._control.close()
        finally:
            # Returns once the spawner's guardian (so its sweep) is done and reaped.
            process = getattr(self, "_process", None)
            if process is not None and not process.wait_exited(guardian.STOP_TIMEOUT_SECONDS):
                process.stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_host_support(mode: str, identity: Identity) -> None:
    """Raise :class:`HostUnsupportedError` with the reason when this host cannot enforce a sandbox."""
    try:
        with open("/proc/self/status") as status:
            if not any(line.startswith("Seccomp:") for line in status):
                raise HostUnsupportedError("this kernel has no seccomp (CONFIG_SECCOMP_FILTER); cannot sandbox")
    except OSError as exc:
        raise HostUnsupportedError(f"cannot read /proc/self/status ({exc.strerror}); is /proc mounted?") from None
    if mode == "proxy" and os.geteuid() != 0:
        try:
            with open("/proc/sys/user/max_user_namespaces") as limit:
                if int(limit.read()) == 0:
                    raise HostUnsupportedError(
                        "proxy mode needs a private network namespace, and an unprivileged user needs a "
                        "user namespace for it, but user.max_user_namespaces is 0; run as root or raise it"
                    )
        except OSError:
            pass
    if identity.uid is not None and os.geteuid() != 0:
        raise HostUnsupportedError(f"running probes as {identity.name} needs root; run pytest as root")
