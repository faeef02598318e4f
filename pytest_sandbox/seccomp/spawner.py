"""The pre-filtered spawner: a small stdlib-only process that enters the sandbox once, then spawns.

It is started by :mod:`pytest_sandbox.seccomp.launcher` through the session's fork server
(:func:`pytest_sandbox.guardian_helper._forkserver`): that process loaded this module once (compiled and
marshalled), and for each sandbox forks a guardian which forks ``main(["spawner", <config>, <fd>])``,
so a spawner costs two forks, not an interpreter start-up and these imports.
Start-up, in this order (the order is the security argument, mirrored from OpenShell #819):

1. join or create the network namespace (``setns`` into a holder's namespaces, or ``unshare``), then
   unshare any further fresh namespaces asked for (a baseline taken as a third-party target's caller);
2. drop privileges (supplementary groups, gid, uid; or, as mapped root in a user namespace, lock
   the securebits and clear every capability so an ``execve`` cannot regain them; or set exactly the
   capability set asked for, carried across ``execve`` as ambient capabilities);
3. ask the scheduler for a short slice for itself and the default one for its commands (a latency
   hint for its wake-ups on a busy machine, ``_ask_short_slice``; not a security step);
   then ``prctl(PR_SET_NO_NEW_PRIVS, 1)`` — a failure is fatal;
   then (for a sandbox, not the unfiltered baseline) enter a Landlock domain of its own, which keeps every
   process of the sandbox from ptrace-checked access to any process outside it (``_enter_landlock_domain``);
4. load each precompiled BPF program (the clone3 → ENOSYS filter first, the main filter last,
   because the main filter blocks ``seccomp(SECCOMP_SET_MODE_FILTER)``);
5. confirm ``/proc/self/status`` shows the filters and NoNewPrivs, then report ready.

Any failure is reported on the control socket and the process exits: it never serves unfiltered.
Afterwards it only receives spawn requests (argv, env, cwd and three stdio fds over SCM_RIGHTS),
``posix_spawn``\\ s them (children inherit the filters across fork and exec), and reports each
child's pid and wait status on a per-request reply socket. Forking this small process instead of
the pytest process keeps a sandboxed launch close to a plain ``subprocess.run``.

The config (hex on argv) and every message are ``marshal``-encoded: both ends are the same interpreter
(``sys.executable``), no sandboxed process holds either socket (the control socket is made
non-inheritable first thing, every received descriptor arrives close-on-exec), and ``marshal`` is
built in, where ``json`` would import ``re`` and ``base64`` at every start (about a fifth of this
interpreter's start-up on a busy 2-core machine, benchmarks/README.md).
"""

from __future__ import annotations

import array
import ctypes
import marshal
import os
import selectors
import signal
import socket
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
# SECBIT_NOROOT | NOROOT_LOCKED | NO_SETUID_FIXUP | NO_SETUID_FIXUP_LOCKED | KEEP_CAPS_LOCKED |
# NO_CAP_AMBIENT_RAISE | NO_CAP_AMBIENT_RAISE_LOCKED (include/uapi/linux/securebits.h)
LOCKED_SECUREBITS = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
# SECBIT_NOROOT: uid 0 gains no capabilities at execve; SECBIT_KEEP_CAPS: setresuid keeps the permitted
# set (capabilities(7), "The securebits flags").
SECBIT_NOROOT = 0x01
SECBIT_KEEP_CAPS = 0x10
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
LINUX_CAPABILITY_VERSION_3 = 0x20080522
MAX_MESSAGE = 1 << 20


SYS_SCHED_SETATTR_X86_64 = 314
SCHED_FLAG_RESET_ON_FORK = 0x01
# The spawner's EEVDF request size: it does tens of microseconds of work per wake-up (a recvmsg, a
# posix_spawn, a waitpid, a send), so 0.1 ms (the kernel's lower clamp) fits it (sched-eevdf.rst).
SPAWNER_SLICE_NS = 100_000


class _SchedAttr(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("policy", ctypes.c_uint32), ("flags", ctypes.c_uint64),
                ("nice", ctypes.c_int32), ("priority", ctypes.c_uint32), ("runtime", ctypes.c_uint64),
                ("deadline", ctypes.c_uint64), ("period", ctypes.c_uint64)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long  # a file descriptor or -1 (landlock_create_ruleset returns one)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} failed: {os.strerror(err)}")


def _setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, nstype), f"setns({path})")
    finally:
        os.close(fd)


def _write_id_maps(uid: int, gid: int) -> None:
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _enter_network(config: dict) -> None:
    if config.get("userns"):
        _setns(config["userns"], CLONE_NEWUSER)
    if config.get("netns"):
        _setns(config["netns"], CLONE_NEWNET)
    elif config.get("unshare_net"):
        if os.geteuid() == 0:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        else:
            uid, gid = os.getuid(), os.getgid()
            _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
            _write_id_maps(uid, gid)


def _write_maps_for(pid: int, maps: dict) -> None:
    """Write a child user namespace's id maps from the parent namespace (setgroups first: gid_map
    cannot be written while setgroups is allowed for an unprivileged writer, and "deny" cannot be
    written after gid_map; user_namespaces(7))."""
    for name in ("setgroups", "uid_map", "gid_map"):
        text = maps.get(name)
        if text is None:
            continue
        if name != "setgroups":
            numbers = text.split()
            text = "\n".join(" ".join(numbers[i:i + 3]) for i in range(0, len(numbers), 3))
        with open(f"/proc/{pid}/{name}", "w") as handle:
            handle.write(text + "\n")


def _unshare_fresh(config: dict) -> None:
    flags = 0
    for flag in config.get("unshare", ()):
        flags |= flag
    if not flags:
        return
    if not config.get("unshare_user"):
        _check(_libc.unshare(flags), f"unshare({flags:#x})")
        return
    if config.get("groups") is not None:  # ids outside: once inside, setgroups may be denied
        os.setgroups(config["groups"])
    go_read, go_write = os.pipe()
    err_read, err_write = os.pipe()
    helper = os.fork()
    if helper == 0:  # stays in the parent user namespace, where mapping the ids is allowed
        try:
            os.close(go_write)
            os.close(err_read)
            if os.read(go_read, 1) == b"1":
                _write_maps_for(os.getppid(), config.get("id_maps") or {})
            os._exit(0)
        except BaseException as exc:  # reported through the pipe, never raised past the fork
            os.write(err_write, f"{type(exc).__name__}: {exc}".encode()[:1000])
            os._exit(1)
    os.close(go_read)
    os.close(err_write)
    try:
        _check(_libc.unshare(flags), f"unshare({flags:#x})")
        os.write(go_write, b"1")
    finally:
        os.close(go_write)
        _, status = os.waitpid(helper, 0)
        detail = os.read(err_read, 1000).decode(errors="replace")
        os.close(err_read)
    if status != 0:
        raise OSError(f"writing the user namespace's id maps failed: {detail or status}")


def _assume_capabilities(config: dict) -> None:
    """Become uid/gid with exactly ``caps`` as effective and permitted set, also after execve.

    Order matters: the bounding set and securebits need CAP_SETPCAP, so they come before the uid
    change; KEEP_CAPS keeps the permitted set across setresuid; ambient capabilities are what a
    non-root (or NOROOT) process keeps across an execve of a file without file capabilities
    (capabilities(7), "Transformation of capabilities during execve()")."""
    caps, bounding = int(config["caps"]), config.get("bounding")
    if bounding is not None:
        for cap in range(64):
            if not bounding >> cap & 1 and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 \
                    and ctypes.get_errno() != 22:  # EINVAL: past the last capability
                _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    _check(_libc.prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_KEEP_CAPS, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")
    if config.get("groups") is not None and not config.get("unshare_user"):
        os.setgroups(config["groups"])
    if config.get("gid") is not None:
        os.setresgid(config["gid"], config["gid"], config["gid"])
    if config.get("uid") is not None:
        os.setresuid(config["uid"], config["uid"], config["uid"])
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for index in range(2):
        word = caps >> (32 * index) & 0xFFFFFFFF
        data[index].effective = data[index].permitted = data[index].inheritable = word
    _check(_libc.capset(ctypes.byref(header), data), f"capset({caps:#x})")
    for cap in range(64):
        if caps >> cap & 1:
            _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"raising ambient capability {cap}")


def _drop_privileges(config: dict) -> None:
    if config.get("caps") is not None:
        _assume_capabilities(config)
        return
    uid, gid = config.get("uid"), config.get("gid")
    if config.get("groups") is not None and not config.get("unshare_user"):
        os.setgroups(config["groups"])
    elif gid is not None:
        os.setgroups([])
    if gid is not None:
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)
    if config.get("drop_caps"):
        # Mapped root inside a user namespace would regain every capability at execve; lock that
        # off (capabilities(7), "Safety checking for capability-dumb binaries" and securebits).
        _check(_libc.prctl(PR_SET_SECUREBITS, LOCKED_SECUREBITS, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")
        for cap in range(64):
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
                _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
        header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _check(_libc.capset(ctypes.byref(header), data), "capset(empty)")


def _ask_short_slice() -> None:
    """Ask the scheduler for a short slice for this process, and the default one for its commands.

    Every launch waits for the spawner twice (to spawn, then to reap and report). On a busy machine a
    woken task with the default slice waits for the running one's slice to end before it gets a CPU;
    since Linux 6.12 EEVDF lets a task with a shorter requested slice (``sched_attr.sched_runtime`` for
    SCHED_OTHER, no privilege needed) preempt on wake-up ("sched/eevdf: Allow shorter slices to
    wakeup-preempt"). Same policy, same nice: only the request size changes. SCHED_FLAG_RESET_ON_FORK
    gives every command the default slice again (sched_fork() resets it; it also resets a negative
    nice to 0), so what runs in the sandbox is scheduled as it would be without us. A hint, not a
    security step: an older kernel ignores the request or refuses it, and nothing else changes.
    The package's own copy is pytest_sandbox/scheduling.py (this script cannot import the package)."""
    if os.uname().machine != "x86_64" or os.sched_getscheduler(0) != os.SCHED_OTHER:
        return
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    attr = _SchedAttr(ctypes.sizeof(_SchedAttr), os.SCHED_OTHER, SCHED_FLAG_RESET_ON_FORK, nice, 0,
                      SPAWNER_SLICE_NS, 0, 0)
    _libc.syscall(SYS_SCHED_SETATTR_X86_64, 0, ctypes.byref(attr), 0)


# Landlock (include/uapi/linux/landlock.h; x86_64 numbers): a ruleset handling only LANDLOCK_ACCESS_FS_MAKE_BLOCK
# with that right granted beneath "/" restricts no file access, and still makes a domain: the kernel then refuses
# every process in it ptrace access to any process outside it (security/landlock/task.c hook_ptrace_access_check:
# the tracee must be in the tracer's domain or one nested in it), which is what /proc/<pid>/mem and
# /proc/<pid>/fd/<n> are checked with (fs/proc/base.c). From ABI 6 (Linux 6.12) the ruleset also scopes signals:
# no process in the domain signals one outside it (security/landlock/fs.c hook_file_send_sigiotask, task.c
# hook_task_kill), as pidfd_send_signal's denial means. Only the ruleset's file descriptor and "/" are used.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_ACCESS_FS_MAKE_BLOCK = 1 << 11
LANDLOCK_SCOPE_SIGNAL = 1 << 1
LANDLOCK_ABI_SCOPES = 6
# ENOSYS: built without Landlock; EOPNOTSUPP: built with it, not enabled at boot (lsm=).
_NO_LANDLOCK = (38, 95)


class _RulesetAttr(ctypes.Structure):  # struct landlock_ruleset_attr, as of ABI 6 (older kernels take the first 8)
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _enter_landlock_domain(config: dict) -> str:
    """Put this process, and so every command it spawns, in a Landlock domain of its own: no process of the
    sandbox can then read, write or take files from a process outside it through /proc, nor (from ABI 6) signal it
    (catalogues/syscalls.py WITNESS_PATHS), whatever its uid and capabilities. Returns what the status reports.
    A kernel without Landlock is reported ("unavailable"), not fatal: the witness rows then show what that leaves
    open; any other failure is (nothing is served outside the domain asked for)."""
    if not config.get("landlock"):
        return "not asked for"
    abi = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 0:
        err = ctypes.get_errno()
        if err in _NO_LANDLOCK:
            return f"unavailable ({os.strerror(err)})"
        _check(-1, "landlock_create_ruleset(VERSION)")
    scoped = abi >= LANDLOCK_ABI_SCOPES
    attr = _RulesetAttr(LANDLOCK_ACCESS_FS_MAKE_BLOCK, 0, LANDLOCK_SCOPE_SIGNAL if scoped else 0)
    size = ctypes.sizeof(attr) if scoped else 8  # an older kernel refuses a larger struct with non-zero tail (E2BIG)
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        _check(-1, "landlock_create_ruleset")
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(LANDLOCK_ACCESS_FS_MAKE_BLOCK, root)
        _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
               "landlock_add_rule(/)")
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(root)
        os.close(ruleset)
    return f"domain (ABI {abi}{', signals scoped' if scoped else '; signals not scoped before Linux 6.12'})"


def _set_no_new_privs(config: dict) -> None:
    if config.get("no_new_privs", True):
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _load_filters(config: dict) -> None:
    for encoded in config.get("filters", ()):
        program = bytes(encoded)
        if not program or len(program) % 8:
            raise ValueError("malformed BPF program")
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
        _check(
            _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
            "prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)",
        )


def _confirm(config: dict) -> dict:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("Seccomp", "Seccomp_filters", "NoNewPrivs"):
                fields[key] = value.strip()
    expected = len(config.get("filters", ()))
    if expected:
        if fields.get("Seccomp") != "2" or int(fields.get("Seccomp_filters", "0")) < expected:
            raise RuntimeError(f"filter not present after loading: {fields}")
    if config.get("no_new_privs", True) and fields.get("NoNewPrivs") != "1":
        raise RuntimeError(f"no_new_privs not set: {fields}")
    return fields


def _send(sock: socket.socket, message: dict) -> None:
    try:
        sock.send(marshal.dumps(message))
    except OSError:
        pass  # the client went away; the child is still reaped and its status dropped


class _Spawner:
    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: dict[int, socket.socket] = {}

    def spawn(self, request: dict, fds: list[int]) -> None:
        # The fds arrived close-on-exec (_receive): only the dup2'd copies on 0-2 reach the command
        # (a dup2 target never inherits FD_CLOEXEC, dup2(2)).
        reply = socket.socket(fileno=fds[0])
        stdio = fds[1:4]
        try:
            actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]
            if request.get("cwd"):
                os.chdir(request["cwd"])
            pid = os.posix_spawnp(
                request["argv"][0], request["argv"], request["env"], file_actions=actions, setpgroup=0
            )
        except OSError as exc:
            _send(reply, {"error": f"{type(exc).__name__}: {exc}", "errno": exc.errno})
            reply.close()
            return
        finally:
            for fd in stdio:
                os.close(fd)
            if request.get("cwd"):
                os.chdir("/")
        self.children[pid] = reply
        _send(reply, {"pid": pid})

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            reply = self.children.pop(pid, None)
            if reply is not None:
                _send(reply, {"pid": pid, "status": status})
                reply.close()

    def shutdown(self) -> None:
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in list(self.children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _receive(control: socket.socket) -> tuple[bytes, list[int]]:
    """One request and its descriptors, received close-on-exec (MSG_CMSG_CLOEXEC, recvmsg(2)): no
    command inherits another launch's descriptors, and no fcntl per descriptor is needed to make sure
    of it. Not ``socket.recv_fds``: Python 3.11's ignores its ``flags`` argument."""
    fds = array.array("i")
    message, ancillary, _, _ = control.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(4 * fds.itemsize),
                                               socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return message, list(fds)


def serve(control: socket.socket) -> None:
    spawner = _Spawner(control)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, "control")
    selector.register(wake_read, selectors.EVENT_READ, "child")
    try:
        while True:
            for key, _ in selector.select():
                if key.data == "child":
                    os.read(wake_read, 4096)
                    spawner.reap()
                    continue
                message, fds = _receive(control)
                if not message:
                    return
                spawner.spawn(marshal.loads(message), fds)
            spawner.reap()
    finally:
        spawner.shutdown()


def main(argv: list[str]) -> None:
    """``argv``: [name, config (marshal, hex), control socket fd]."""
    control = socket.socket(fileno=int(argv[2]))
    # Passed with pass_fds, so inheritable: no sandboxed child may hold it (it could read the next
    # request and take that launch's stdio, or answer in the spawner's place).
    control.set_inheritable(False)
    config = marshal.loads(bytes.fromhex(argv[1]))
    try:
        os.setsid()
        _enter_network(config)
        _unshare_fresh(config)
        _drop_privileges(config)
        if config.get("short_slice", True):
            _ask_short_slice()  # before the filter, which may refuse sched_setattr
        _set_no_new_privs(config)
        landlock = _enter_landlock_domain(config)  # after no_new_privs (or CAP_SYS_ADMIN is needed), before the filter
        _load_filters(config)
        status = {**_confirm(config), "Landlock": landlock}
    except Exception as exc:  # reported to the launcher, then exit: fail closed
        control.send(marshal.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        os._exit(70)
    control.send(marshal.dumps({"ready": True, "pid": os.getpid(), "status": status}))
    serve(control)


if __name__ == "__main__":
    main(sys.argv)
