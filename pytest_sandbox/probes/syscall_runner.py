"""The syscall probe runner: a stdlib-only script that attempts each probe in a forked child.

This file is sent as source text to ``python3 -S -`` inside whatever sandbox is under test (the
reference launcher, or a third party's launcher via ``--sandbox-exec``), so it must not import
anything outside the standard library and must not need a writable file. The plan (a list of
probe dicts) is appended to the source as a Python literal (the reference sandbox sends its own
interpreter the compiled runner and the plan as marshal data instead: probes/syscall.py
``runner_command``); results come back as JSON lines on stdout. The first
line says who the runner is (:func:`whoami`): a verdict compares a run with a baseline only when
both ran as the same uid, with the same capabilities and the same kind of namespaces.

Why probes run in forked children (syscalls.md §4 "Isolation"): a filter's KILL_THREAD action
kills only the calling thread, a successful call may change process state (personality, setsid,
unshare, strict mode), and an i386 call under a native-only filter kills the whole process. A child
attempts probes in sequence and writes each result to the runner before the next attempt; it is
replaced by a fresh one after any probe that did not fail with an errno (a success, a signal, a kill,
a timeout, an error) and after every control or probe with setup steps, which also start in a fresh
child (:func:`keeps_child`, :func:`needs_fresh_child`). A refused call changed nothing (seccomp's
RET_ERRNO never runs it; a kernel error return leaves the caller as it was), so every probe still sees
exactly what a child of its own would see, and the runner itself stays alive. A plan of at least
``LANE_MIN_PROBES`` probes is cut into ``LANES`` contiguous segments run side by side (:func:`run_plan`): each
segment starts in a fresh child, results are reported in plan order, and the runner reaps every lane and
child before it returns. ``main(plan, True)`` forks a child per probe, strictly one after another: the
reference tests/test_probe_children.py holds the batched runs to.

Every call goes through raw ``syscall(2)`` with an explicit number (libc wrappers may issue another
syscall, and vDSO calls never enter the kernel), with every argument passed as ``c_long`` so that
ctypes never truncates a high-bit argument to 32 bits (syscalls.md §2.1).
"""

from __future__ import annotations

import _signal  # not signal: its enum import is a seventh of the runner's start-up
import ctypes
import marshal
import mmap
import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing would cost the runner's start-up a third again
if TYPE_CHECKING:
    from collections.abc import Callable

X32_SYSCALL_BIT = 0x40000000
MAP_32BIT = getattr(mmap, "MAP_32BIT", 0x40)  # x86_64 mman.h; Python's mmap module has it from 3.13
PROBE_TIMEOUT_SECONDS = 5

# x86_64 machine code: long int80(nr, a1, a2, a3, a4, a5, a6) — issue an i386 system call through
# `int 0x80` from 64-bit code (syscalls.md §3 "i386 via int 0x80"). Registers are moved from the
# SysV x86_64 calling convention to the i386 syscall convention (eax, ebx, ecx, edx, esi, edi,
# ebp) and the 32-bit result is sign-extended so that -errno comes back negative.
INT80_STUB = bytes.fromhex(
    "53"  # push rbx
    "55"  # push rbp
    "4889f8"  # mov rax, rdi      nr
    "4889f3"  # mov rbx, rsi      a1
    "4989ca"  # mov r10, rcx      save a3
    "4889d1"  # mov rcx, rdx      a2
    "4c89d2"  # mov rdx, r10      a3
    "4c89c6"  # mov rsi, r8       a4
    "4c89cf"  # mov rdi, r9       a5
    "488b6c2418"  # mov rbp, [rsp+0x18]  a6 (7th argument, on the stack)
    "cd80"  # int 0x80
    "4863c0"  # movsxd rax, eax
    "5d"  # pop rbp
    "5b"  # pop rbx
    "c3"  # ret
)


# Quick kills (issue #12). Most of a plan's forks are children that one i386 or x32 call kills at once (a
# native-only filter kills every `int 0x80` call at its arch check and every x32 call by its nr): a fork of the
# runner's address space, its exit and a wait, ~1 ms of CPU each. A call the harness expects the filter to KILL
# (its own evaluation of the very filter loaded, probes/syscall.py ``expect_kills``) is attempted first by a child
# that shares the runner's memory (clone with CLONE_VM | CLONE_VFORK, as posix_spawn does; tens of microseconds):
# machine code that sets the same alarm a probe child sets, loads the same registers the probe child would and
# enters the kernel through the very instruction a probe child uses (INT80_STUB's `int 0x80` for i386, the
# `syscall` in the C library's syscall(2) for x32, entered with the same arguments as a call from ctypes), so the
# filter sees the same seccomp_data (nr, arch, instruction pointer, the six argument registers). Only its death
# by SIGSYS is taken as the outcome: a seccomp kill ends the call before the kernel runs any of it, so nothing
# the shared memory could change. Anything else (the call returned, another signal, the alarm) means the
# expectation was wrong; that attempt is discarded and the probe is attempted in a child of its own, as every
# other probe is. The expectation only chooses the vehicle: no outcome is assumed. Not used where a kill could
# take the runner with it or a wrong expectation could touch its memory: kernels before 5.16 killed every
# process sharing the dying one's mm on a core-dumping signal (fs/coredump.c zap_threads; commit 0258b5fd7c71
# "coredump: Limit coredumps to a single thread group"), and calls that act on the caller's address space or
# create processes are never attempted this way (QUICK_KILL_EXCLUDED). Only the reference sandbox's runs carry
# expectations: a third party's filter is not the harness's to evaluate.
CLONE_VM, CLONE_VFORK, SIGCHLD = 0x100, 0x4000, 17  # include/uapi/linux/sched.h, signal.h
QUICK_KILL_MIN_KERNEL = (5, 16)
# i386 numbers (arch/x86/entry/syscalls/syscall_32.tbl) of calls that act on the caller's memory or memory map,
# its futexes and rseq/robust-list areas, create processes or end them: exit 1, fork 2, brk 45, ipc 117 (shmat),
# clone 120, modify_ldt 123, mprotect 125, msync 144, mlock* 150-153, munmap 91, old mmap 90, mremap 163,
# prctl 172, vfork 190, mmap2 192, mincore 218, madvise 219, futex 240, exit_group 252, remap_file_pages 257,
# set_tid_address 258, mbind 274, set_mempolicy 276, migrate_pages 294, set_robust_list 311, move_pages 317,
# userfaultfd 374, mlock2 376, pkey_mprotect 380, arch_prctl 384, rseq 386, futex_time64 422, clone3 435,
# process_madvise 440, futex_waitv 449, set_mempolicy_home_node 450.
QUICK_KILL_EXCLUDED_I386 = frozenset({
    1, 2, 45, 90, 91, 117, 120, 123, 125, 144, 150, 151, 152, 153, 163, 172, 190, 192, 218, 219, 240, 252, 257,
    258, 274, 276, 294, 311, 317, 374, 376, 380, 384, 386, 422, 435, 440, 449, 450,
})
# The same for x32 (arch/x86/entry/syscalls/syscall_64.tbl, common and x32 rows): mmap 9, mprotect 10, munmap 11,
# brk 12, rt_sigreturn 513 (x32), mremap 25, msync 26, mincore 27, madvise 28, shmat 30, clone 56, fork 57,
# vfork 58, exit 60, shmdt 67, mlock* 149-152, prctl 157, arch_prctl 158, modify_ldt 154, futex 202,
# remap_file_pages 216, set_tid_address 218, exit_group 231, mbind 237, set_mempolicy 238, migrate_pages 256,
# userfaultfd 323, mlock2 325, pkey_mprotect 329, rseq 334, clone3 435, process_madvise 440, futex_waitv 449,
# set_mempolicy_home_node 450, map_shadow_stack 453, execve 520, set_robust_list 530, move_pages 533, execveat 545.
QUICK_KILL_EXCLUDED_X32 = frozenset({
    9, 10, 11, 12, 25, 26, 27, 28, 30, 56, 57, 58, 60, 67, 149, 150, 151, 152, 154, 157, 158, 202, 216, 218, 231,
    237, 238, 256, 323, 325, 329, 334, 435, 440, 449, 450, 453, 513, 520, 530, 533, 545,
})
QUICK_KILL_EXCLUDED = {"i386": QUICK_KILL_EXCLUDED_I386, "x32": QUICK_KILL_EXCLUDED_X32}
INT80_INSTRUCTION_OFFSET = INT80_STUB.index(bytes.fromhex("cd80"))
QUICK_CHILD_OFFSETS = {"i386": 64, "x32": 192}  # in the same executable page as INT80_STUB
QUICK_STACK_SIZE = 64 * 1024
# The parameter block the quick child reads (8-byte words): nr, a1..a6, where it enters the kernel (INT80_STUB's
# `int 0x80`, or the C library's syscall function), the alarm's seconds.
QUICK_BLOCK_WORDS = 9
_QUICK_HEAD = bytes.fromhex(
    "4989fc"  # mov r12, rdi           the parameter block
    "b825000000"  # mov eax, 37 (alarm)
    "498b7c2440"  # mov rdi, [r12+64]  seconds
    "0f05"  # syscall                  alarm(seconds), as a probe child's _signal.alarm
)
_QUICK_EXIT = bytes.fromhex(
    "b83c000000"  # mov eax, 60 (exit: this task only)
    "31ff"  # xor edi, edi
    "0f05"  # syscall
    "0f0b"  # ud2
)


def _quick_child(body: bytes) -> bytes:
    """x86_64 machine code: int child(long *block), run by glibc's clone() on a stack of its own: the alarm,
    ``lea r11, [rip + to the exit]``, ``body`` (which enters the kernel and returns into the exit through r11),
    the exit."""
    return _QUICK_HEAD + bytes.fromhex("4c8d1d") + len(body).to_bytes(4, "little") + body + _QUICK_EXIT


def _quick_x32_code() -> bytes:
    """The quick child that calls the C library's syscall(nr, a1, ..., a6) as ctypes does (six register
    arguments, the seventh on the stack)."""
    return _quick_child(bytes.fromhex(
        "41ff742430"  # push qword [r12+48] a6: the seventh argument, at [rsp+8] on entry
        "4153"  # push r11                 the return address
        "498b3c24"  # mov rdi, [r12]       nr (with the x32 bit)
        "498b742408"  # mov rsi, [r12+8]   a1
        "498b542410"  # mov rdx, [r12+16]  a2
        "498b4c2418"  # mov rcx, [r12+24]  a3
        "4d8b442420"  # mov r8, [r12+32]   a4
        "4d8b4c2428"  # mov r9, [r12+40]   a5
        "41ff642438"  # jmp [r12+56]       syscall(2)
    ))


def _quick_i386_code() -> bytes:
    """The quick child that enters INT80_STUB at its `int 0x80` with the registers INT80_STUB would have loaded."""
    return _quick_child(bytes.fromhex(
        "4153"  # push r11               INT80_STUB returns here: its ret pops it
        "6a00"  # push 0                 popped into rbx by INT80_STUB
        "6a00"  # push 0                 popped into rbp by INT80_STUB
        "498b0424"  # mov rax, [r12]      nr
        "498b5c2408"  # mov rbx, [r12+8]  a1
        "498b4c2410"  # mov rcx, [r12+16] a2
        "498b542418"  # mov rdx, [r12+24] a3
        "498b742420"  # mov rsi, [r12+32] a4
        "498b7c2428"  # mov rdi, [r12+40] a5
        "498b6c2430"  # mov rbp, [r12+48] a6
        "41ff642438"  # jmp [r12+56]      INT80_STUB's `int 0x80`
    ))


def _kernel_at_least(release: str, wanted: tuple) -> bool:
    numbers = []
    for part in release.split("-", 1)[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers) >= wanted


class _Machine:
    """The ways a probe can enter the kernel on this host, built once before any fork."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.int80 = None
        self.int80_error = ""
        try:
            self._code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            self._code.write(INT80_STUB)
            address = ctypes.addressof(ctypes.c_char.from_buffer(self._code))
            prototype = ctypes.CFUNCTYPE(ctypes.c_long, *([ctypes.c_long] * 7))
            self.int80 = prototype(address)
        except (OSError, ValueError, TypeError) as exc:  # W^X policies refuse executable mappings
            self.int80_error = f"cannot map the int 0x80 stub: {exc}"
        self.quick_kill = self.int80 is not None and self._prepare_quick_kill()
        # The argument block of an i386 multiplexer: `int 0x80` passes 32-bit registers, so the pointer
        # to socketcall's argument array (and ipc's "*n" words) must be below 4 GiB (MAP_32BIT).
        self.block = None
        self.block_address = 0
        self.block_error = ""
        try:
            self.block = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_32BIT,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.block_address = ctypes.addressof(ctypes.c_char.from_buffer(self.block))
            if self.block_address + mmap.PAGESIZE > 1 << 32:
                self.block_error = f"MAP_32BIT gave {self.block_address:#x}, above 4 GiB"
        except (OSError, ValueError, TypeError) as exc:
            self.block_error = f"cannot map a 32-bit addressable argument block: {exc}"

    def _prepare_quick_kill(self) -> bool:
        """Map the quick child's code, stack and parameter block; False (every probe forks) where a quick
        kill could not be observed faithfully or could take the runner with it."""
        if os.uname().machine != "x86_64" or not _kernel_at_least(os.uname().release, QUICK_KILL_MIN_KERNEL):
            return False  # the quick children are x86_64 machine code
        # The quick child keeps the runner's signal dispositions and mask: a SIGALRM handler would run in the
        # shared memory, a blocked SIGALRM would never end a call that blocks (SIGSYS from seccomp is forced).
        if _signal.getsignal(_signal.SIGALRM) != _signal.SIG_DFL or \
                _signal.getsignal(_signal.SIGSYS) not in (_signal.SIG_DFL, _signal.SIG_IGN) or \
                _signal.SIGALRM in _signal.pthread_sigmask(_signal.SIG_BLOCK, ()):
            return False
        try:
            base = ctypes.addressof(ctypes.c_char.from_buffer(self._code))
            codes = {"i386": _quick_i386_code(), "x32": _quick_x32_code()}
            for abi, code in codes.items():
                self._code.seek(QUICK_CHILD_OFFSETS[abi])
                self._code.write(code)
            self.quick_entries = {abi: base + offset for abi, offset in QUICK_CHILD_OFFSETS.items()}
            # Where each ABI enters the kernel: INT80_STUB's `int 0x80`, and the very syscall(2) ctypes calls.
            syscall_function = ctypes.cast(self.libc.syscall, ctypes.c_void_p).value
            if not syscall_function:
                return False
            self.quick_targets = {"i386": base + INT80_INSTRUCTION_OFFSET, "x32": syscall_function}
            self._quick_stack = mmap.mmap(-1, QUICK_STACK_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self.quick_stack_top = ctypes.addressof(ctypes.c_char.from_buffer(self._quick_stack)) + \
                QUICK_STACK_SIZE - 64
            self.quick_block = (ctypes.c_int64 * QUICK_BLOCK_WORDS)()
            self.clone = self.libc.clone
            self.clone.restype = ctypes.c_int
            self.clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        except (AttributeError, OSError, ValueError, TypeError):
            return False
        return True

    def clear_block(self) -> None:
        assert self.block is not None
        self.block[:] = bytes(mmap.PAGESIZE)

    def call(self, abi: str, nr: int, args: list[int]) -> tuple[int, int]:
        """Return (raw return value, errno) for one system call."""
        padded = [ctypes.c_long(_as_signed(a)) for a in ([*args, 0, 0, 0, 0, 0, 0])[:6]]
        if abi == "i386":
            assert self.int80 is not None
            result = self.int80(ctypes.c_long(nr), *padded)
            if -4095 <= result < 0:
                return -1, -result
            return result, 0
        number = nr | X32_SYSCALL_BIT if abi == "x32" else nr
        ctypes.set_errno(0)
        result = self.libc.syscall(ctypes.c_long(number), *padded)
        return result, (ctypes.get_errno() if result == -1 else 0)


def _as_signed(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


def _multiplexed_args(machine: _Machine, probe: dict, args: list) -> list:
    """The multiplexer's own arguments: socketcall(call, &args[0]) with the arguments as 32-bit words
    (net/compat.c COMPAT_SYSCALL_DEFINE2(socketcall)); ipc(call, first, second, third, ptr, fifth) with
    the call's arguments placed by ``layout`` (ipc/syscall.c compat_ksys_ipc)."""
    words = [a & 0xFFFFFFFF for a in args]
    block = machine.block
    assert block is not None
    if probe["mux"] == "socketcall":
        block[:4 * len(words)] = b"".join(w.to_bytes(4, "little") for w in words)
        return [probe["call"], machine.block_address]
    out = [probe["call"]]
    slot = 0
    for place in probe["layout"]:
        if place is None:
            out.append(0)
        elif isinstance(place, str):  # "*n": a pointer to a 32-bit word holding argument n
            block[4 * slot:4 * slot + 4] = words[int(place[1:])].to_bytes(4, "little")
            out.append(machine.block_address + 4 * slot)
            slot += 1
        else:
            out.append(words[place])
    return out


def _attempt_syscall(machine: _Machine, probe: dict) -> dict:
    opened = -1
    for step in probe.get("setup", ()):
        if step == "setsid":
            os.setsid()
        elif step.startswith("open:"):  # a device path (catalogues/syscalls.py DEVICE_PATHS): its fd is "fd"
            try:
                opened = os.open(step[len("open:"):], os.O_RDWR | os.O_CLOEXEC)
            except OSError as error:
                return {"type": "no_path", "value": error.errno, "detail": step[len("open:"):]}
    args = [os.getpid() if a == "pid" else opened if a == "fd" else a for a in probe["args"]]
    if probe.get("mux"):
        args = _multiplexed_args(machine, probe, args)
    result, err = machine.call(probe["abi"], probe["nr"], args)
    if result == -1 and err:
        return {"type": "errno", "value": err}
    return {"type": "return", "value": result}


def _attempt_thread_start() -> dict:
    # _thread, not threading: the same pthread_create (clone with CLONE_THREAD), without importing
    # threading in a fresh child (tens of ms on a busy machine, paid by every control run).
    import _thread

    started = []
    done = _thread.allocate_lock()
    done.acquire()

    def body() -> None:
        started.append(os.getpid())
        done.release()

    _thread.start_new_thread(body, ())  # RuntimeError "can't start new thread" when clone is refused
    done.acquire(True, PROBE_TIMEOUT_SECONDS)
    return {"type": "ok"} if started else {"type": "failed", "detail": "thread never ran"}


def _attempt_process_start() -> dict:
    # posix_spawn goes through glibc's __clone_internal, which tries clone3 first and must fall back
    # to clone(2) when the filter answers ENOSYS (syscalls.md §1.4).
    program = "/bin/true" if os.path.exists("/bin/true") else sys.executable
    argv = [program] if program == "/bin/true" else [program, "-S", "-c", ""]
    pid = os.posix_spawn(program, argv, {})
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        forked = os.fork()
        if forked == 0:
            os._exit(0)
        _, status = os.waitpid(forked, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return {"type": "ok"}
        return {"type": "failed", "detail": f"fork child status {status}"}
    return {"type": "failed", "detail": f"posix_spawn child status {status}"}


def _attempt_proc_status() -> dict:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("Seccomp", "Seccomp_filters", "NoNewPrivs"):
                fields[key] = value.strip()
    return {"type": "status", "value": fields}


def _attempt_socket_open(probe: dict) -> dict:
    import _socket  # not socket: its enum import costs a fresh child more than the probe itself

    try:
        sock = _socket.socket(probe["family"], _socket.SOCK_STREAM)
    except OSError as exc:
        return {"type": "errno", "value": exc.errno or 0}
    sock.close()
    return {"type": "ok"}


def proc_stat_field(pid: int, field: int) -> str:
    """Field ``field`` (numbered from 1, as in proc(5)) of /proc/<pid>/stat, "" where there is none to read. Split
    after the last ")": field 2, the command name, may hold spaces and parentheses of its own."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[field - 3].decode()
    except (OSError, IndexError):
        return ""


def start_time(pid: int) -> str:
    """The start time of the process ``pid`` names here (/proc/<pid>/stat field 22, clock ticks after boot: shown
    without any ptrace check), "" where there is none to read. Which process a pid is, across PID namespaces."""
    return proc_stat_field(pid, 22)


def _attempt_witness_path(probe: dict) -> dict:
    """Reach the witness (a process outside the sandbox, catalogues/syscalls.py WITNESS_PATHS): read its nonce from
    /proc/<pid>/mem, write this run's pattern into this run's slot of the witness there, open its memfd through
    /proc/<pid>/fd/<n> and read the nonce, or send it signal 0. The bytes read go back as hex (the harness knows the
    nonce), a permitted signal with the start time of the process the pid names here."""
    if "witness_pid" not in probe:
        return {"type": "unavailable", "reason": "no witness to reach (the session starts one)"}
    access, pid = probe["access"], probe["witness_pid"]
    if access == "signal":
        started = start_time(pid)
        try:
            os.kill(pid, 0)
        except OSError as error:
            return {"type": "errno", "value": error.errno, "detail": f"kill({pid}, 0)"}
        return {"type": "signalled", "detail": started}
    path = f"/proc/{pid}/fd/{probe['witness_fd']}" if access == "fd" else f"/proc/{pid}/mem"
    step = "open"
    try:
        fd = os.open(path, (os.O_RDWR if access == "mem-write" else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            if access == "mem-write":
                step = "pwrite"
                return {"type": "wrote", "value": os.pwrite(fd, bytes.fromhex(probe["witness_pattern"]),
                                                            probe["witness_scratch"]), "detail": path}
            step = "pread"
            data = os.pread(fd, 16, 0 if access == "fd" else probe["witness_address"])
        finally:
            os.close(fd)
    except OSError as error:
        return {"type": "errno", "value": error.errno, "detail": f"{step} {path}"}
    return {"type": "read", "detail": data.hex()}


def _attempt_own_memory() -> dict:
    """The positive control of the witness rows: a process still reads its own memory through /proc/self/mem."""
    data = os.urandom(16)
    held = ctypes.create_string_buffer(data, 16)
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            read = os.pread(fd, 16, ctypes.addressof(held))
        finally:
            os.close(fd)
    except OSError as error:
        return {"type": "failed", "detail": f"/proc/self/mem: {os.strerror(error.errno or 0)}"}
    return {"type": "ok"} if read == data else {"type": "failed", "detail": "/proc/self/mem gave other bytes"}


def _attempt(machine: _Machine, probe: dict) -> dict:
    kind = probe.get("kind", "syscall")
    if kind == "witness_path":
        return _attempt_witness_path(probe)
    if kind == "own_memory":
        return _attempt_own_memory()
    if kind == "syscall":
        return _attempt_syscall(machine, probe)
    if kind == "thread_start":
        return _attempt_thread_start()
    if kind == "process_start":
        return _attempt_process_start()
    if kind == "proc_status":
        return _attempt_proc_status()
    if kind == "socket_open":
        return _attempt_socket_open(probe)
    return {"type": "unavailable", "reason": f"unknown probe kind {kind!r}"}


def _json_line(value: object) -> str:
    """``value`` (str/int/bool/None/list/dict) as one JSON line of text, without importing ``json``:
    it would import ``re`` at every runner start, a fifth of a busy machine's interpreter start-up.
    Strings are escaped by CPython's own C encoder (``_json``); elsewhere ``json`` is used."""
    try:
        from _json import encode_basestring_ascii as quote
    except ImportError:  # not CPython
        import json

        return json.dumps(value)

    def encode(item: object) -> str:
        if isinstance(item, str):
            return quote(item)
        if item is None:
            return "null"
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int):
            return str(item)
        if isinstance(item, dict):
            return "{" + ",".join(quote(str(key)) + ":" + encode(val) for key, val in item.items()) + "}"
        if isinstance(item, (list, tuple)):
            return "[" + ",".join(encode(val) for val in item) + "]"
        raise TypeError(f"cannot report a {type(item).__name__} as JSON")

    return encode(value)


def _unavailable(machine: _Machine, probe: dict) -> dict | None:
    """Why ``probe`` cannot be attempted on this host (nothing is called), or None."""
    if probe.get("abi") == "i386" and machine.int80 is None:
        return {"type": "unavailable", "reason": machine.int80_error}
    if probe.get("mux") and machine.block_error:
        return {"type": "unavailable", "reason": machine.block_error}
    return None


def quick_kill_candidate(machine: _Machine, probe: dict) -> bool:
    """Is ``probe`` attempted first by a quick child (see QUICK_KILL_MIN_KERNEL)? Only a plain i386 or x32 call the
    harness expects the filter to kill, with every argument a number, no setup step, not a control, and not a call
    that acts on the caller's memory or creates a process."""
    return (machine.quick_kill and probe.get("expect_kill") is True and probe.get("kind", "syscall") == "syscall"
            and probe.get("abi") in QUICK_KILL_EXCLUDED and not probe.get("setup") and not probe.get("control")
            and all(type(a) is int for a in probe.get("args", ())) and type(probe.get("nr")) is int
            and probe["nr"] not in QUICK_KILL_EXCLUDED[probe["abi"]] and not (probe.get("mux") and machine.block_error))


def quick_kill(machine: _Machine, probe: dict) -> dict | None:
    """Attempt a :func:`quick_kill_candidate` in a child sharing the runner's memory: the outcome if the filter
    killed it (death by SIGSYS), else None (the attempt is discarded: the probe is then attempted in a child of its
    own). A clone that fails turns quick kills off for the rest of the run."""
    args = list(probe["args"])
    if probe.get("mux"):  # the argument block is shared memory: the child sees it as a probe child would
        machine.clear_block()
        args = _multiplexed_args(machine, probe, args)
    abi = probe["abi"]
    block = machine.quick_block
    block[0] = probe["nr"] | X32_SYSCALL_BIT if abi == "x32" else probe["nr"]  # as _Machine.call numbers it
    for slot, value in enumerate(([*args, 0, 0, 0, 0, 0, 0])[:6]):
        block[1 + slot] = _as_signed(value)
    block[7] = machine.quick_targets[abi]
    block[8] = PROBE_TIMEOUT_SECONDS
    pid = machine.clone(machine.quick_entries[abi], machine.quick_stack_top, CLONE_VM | CLONE_VFORK | SIGCHLD,
                        ctypes.addressof(block))
    if pid <= 0:  # refused (a sandbox may not allow a CLONE_VM child that is no thread): fork from now on
        machine.quick_kill = False
        return None
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == _signal.SIGSYS:
        return {"type": "signal", "value": _signal.SIGSYS}
    return None


def needs_fresh_child(probe: dict) -> bool:
    """A control, any non-syscall probe, and a probe with setup steps (setsid changes the session) run
    only as the first probe of a fresh child, and that child ends after it."""
    return probe.get("kind", "syscall") != "syscall" or bool(probe.get("setup")) or bool(probe.get("control"))


def keeps_child(probe: dict, outcome: dict) -> bool:
    """May the child that attempted ``probe`` attempt the next one? Only when the call failed with an
    errno (a seccomp RET_ERRNO never runs the call; a kernel error return leaves the caller as it was) or
    was not attempted at all. A call that succeeded, a signal, a kill or a timeout ends the child, so a
    forbidden call that succeeds can never change what a later probe sees."""
    return not needs_fresh_child(probe) and outcome.get("type") in ("errno", "unavailable")


def _frame(index: int, outcome: dict) -> bytes:
    body = marshal.dumps((index, outcome))
    return len(body).to_bytes(4, "little") + body


def _frames(data: bytes) -> list:
    """The (index, outcome) records a child wrote; a torn last frame (the child died mid-write) is dropped."""
    records = []
    offset = 0
    while offset + 4 <= len(data):
        size = int.from_bytes(data[offset:offset + 4], "little")
        if offset + 4 + size > len(data):
            break
        records.append(marshal.loads(data[offset + 4:offset + 4 + size]))
        offset += 4 + size
    return records


def _read_to_end(descriptor: int) -> bytes:
    """Everything written to a pipe until its last writer (a child or a lane) has closed it."""
    chunks: list[bytes] = []
    while True:
        chunk = os.read(descriptor, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _next_index(index: int, done: frozenset) -> int:
    """The probe after ``index`` that is still to be attempted (``done``: those a quick kill settled)."""
    index += 1
    while index in done:
        index += 1
    return index


def _child(machine: _Machine, plan: list, start: int, write_end: int, one_per_child: bool,
           done: frozenset = frozenset()) -> None:
    """The probe child: attempt probes from ``start`` in sequence (past those in ``done``), writing each result
    before the next attempt, until one does not keep the child (:func:`keeps_child`) or the next needs a fresh
    one."""
    _signal.signal(_signal.SIGSYS, _signal.SIG_DFL)  # a TRAP must end as death by SIGSYS
    index = start
    while index < len(plan):
        probe = plan[index]
        if index > start and (one_per_child or needs_fresh_child(probe)):
            break
        try:
            outcome = _unavailable(machine, probe)
            if outcome is None:
                if probe.get("mux"):  # a fresh child saw a zeroed block: so does every later probe
                    machine.clear_block()
                _signal.alarm(PROBE_TIMEOUT_SECONDS)
                outcome = _attempt(machine, probe)
                _signal.alarm(0)
        except BaseException as exc:  # any failure is reported, never raised into the runner
            outcome = {"type": "error", "detail": repr(exc)[:2000]}
        os.write(write_end, _frame(index, outcome))  # < PIPE_BUF: written whole or not at all
        if not keeps_child(probe, outcome):
            break
        index = _next_index(index, done)


def _forked(read_end: int, foreign: tuple, body: Callable[[], None]) -> None:
    """In a freshly forked child (a probe child or a lane): close the parent's end of its pipe and the
    descriptors it must not hold, run ``body``, and exit without ever returning into the runner."""
    try:
        os.close(read_end)
        for descriptor in foreign:
            os.close(descriptor)
        body()
    finally:
        os._exit(0)


def run_batch(machine: _Machine, plan: list, start: int, one_per_child: bool = False, foreign: tuple = (),
              done: frozenset = frozenset()) -> list:
    """Run probes from ``start`` in one fresh single-threaded child; return [(index, outcome), ...] for
    every probe it attempted, in order, ending with the one it died on (a signal or a silent exit).
    ``foreign``: the runner's lane pipes, closed in the child (a probe sees the descriptors it always saw);
    ``done``: probes a quick kill settled, which the child passes over."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # never return into the runner
        _forked(read_end, foreign, lambda: _child(machine, plan, start, write_end, one_per_child, done))
    os.close(write_end)
    data = _read_to_end(read_end)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    records = [(index, outcome) for index, outcome in _frames(data)]
    # Which probe was the child attempting when it ended? The one after its last report, when that report
    # let it go on (keeps_child) and the next needs no fresh child; none when it stopped by the rules.
    if not records:
        in_flight: int | None = start
    else:
        last, outcome = records[-1]
        following = _next_index(last, done)
        going_on = keeps_child(plan[last], outcome) and not one_per_child and following < len(plan) \
            and not needs_fresh_child(plan[following])
        in_flight = following if going_on else None
    if os.WIFSIGNALED(status):
        ended = {"type": "timeout"} if os.WTERMSIG(status) == _signal.SIGALRM else \
            {"type": "signal", "value": os.WTERMSIG(status)}
        if in_flight is None:  # killed after its last report (e.g. exit_group under strict mode): as before
            records[-1] = (records[-1][0], ended)
        else:
            records.append((in_flight, ended))
    elif in_flight is not None:
        records.append((in_flight, {"type": "error",
                                    "detail": f"child exited with status {status} and no report"}))
    return records


# Lanes (issue #12): a plan of at least LANE_MIN_PROBES probes is cut into LANES contiguous segments run
# side by side, each by a lane of its own (the runner itself runs the first; a fork of the runner made before
# any probe ran runs each other one) with children forked one after another as before. Most of a child's wall
# is waiting (fork -> attempt -> death -> EOF -> waitpid: ~0.9 ms wall against ~0.5 ms of CPU in a plan whose
# i386 probes die by SIGSYS), so two cores overlap those waits. A segment starts in a fresh child, which is
# what every probe may see, and a lane never attempts a probe itself: no probe shares a process with a probe
# of another lane. What lanes share is the kernel's global state, and only a probe that SUCCEEDS with a global
# effect could be seen by a probe in another lane out of plan order; the catalogue's calls have none by
# construction (catalogues/syscalls.py: bad fds, bad pointers, invalid flags; every success there, e.g.
# personality, unshare(CLONE_FS), setresuid, strict mode, changes only its own process). one_per_child, the
# reference the batched runs are tested against, stays strictly sequential.
LANES = 3
LANE_MIN_PROBES = 24


def segments(count: int, lanes: int = LANES) -> list:
    """Contiguous [start, end) segments of a plan of ``count`` probes, one per lane, in plan order."""
    lanes = max(1, lanes) if count >= LANE_MIN_PROBES else 1
    bounds = [count * lane // lanes for lane in range(lanes + 1)]
    return [(bounds[lane], bounds[lane + 1]) for lane in range(lanes)]


def run_segment(machine: _Machine, plan: list, start: int, end: int, report: Callable[[int, dict], None],
                one_per_child: bool = False, foreign: tuple = ()) -> None:
    """Attempt the probes ``start``..``end - 1`` of ``plan``, children one after another, and ``report(index,
    outcome)`` each in order. A child that would go on past ``end`` is given the segment as its plan."""
    segment = plan[:end]
    # Quick kills first (see QUICK_KILL_MIN_KERNEL): a killed call changed nothing, so the probes between two of
    # them can then share a batch child, as refused calls do; each outcome is still reported at its place.
    settled = {} if one_per_child else {index: outcome for index in range(start, end)
                                        if quick_kill_candidate(machine, segment[index])
                                        and (outcome := quick_kill(machine, segment[index])) is not None}
    done = frozenset(settled)
    index = start
    while index < end:
        if index in settled:
            report(index, settled[index])
            index += 1
            continue
        for attempted, outcome in run_batch(machine, segment, index, one_per_child, foreign, done):
            for passed in range(index, attempted):  # the quick kills this child passed over
                report(passed, settled[passed])
            report(attempted, outcome)
            index = attempted + 1


def _write_all(descriptor: int, data: bytes) -> None:
    while data:
        data = data[os.write(descriptor, data):]


def _lane(machine: _Machine, plan: list, start: int, end: int, write_end: int) -> None:
    """A lane's process: run its segment, framing each result onto the runner's pipe."""
    run_segment(machine, plan, start, end, lambda index, outcome: _write_all(write_end, _frame(index, outcome)),
                foreign=(write_end,))


def _lane_pipes(parts: list) -> tuple:
    """The read ends of the lanes forked so far: no probe child or later lane may hold one."""
    return tuple(read_end for _, read_end, _, _ in parts if read_end is not None)


def run_plan(machine: _Machine, plan: list, report: Callable[[dict, dict], None], one_per_child: bool = False,
             lanes: int = LANES) -> None:
    """Attempt every probe of ``plan`` and ``report(probe, outcome)`` each, in plan order."""
    parts: list = []  # in plan order: (None, None, start, end) run by the runner, (pid, read end, start, end) a lane
    reaped: list = []
    try:
        for number, (start, end) in enumerate([(0, len(plan))] if one_per_child else segments(len(plan), lanes)):
            parts.append((None, None, start, end) if number == 0 else _fork_lane(machine, plan, start, end, parts))
        for pid, read_end, start, end in parts:
            if pid is None:  # the runner's own segment, while the lanes run theirs
                run_segment(machine, plan, start, end, lambda index, outcome: report(plan[index], outcome),
                            one_per_child, _lane_pipes(parts))
                continue
            data = _read_to_end(read_end)
            _, status = os.waitpid(pid, 0)
            reaped.append(pid)
            following = start
            for index, outcome in _frames(data):
                report(plan[index], outcome)
                following = index + 1
            for index in range(following, end):  # a lane that died (it never should) loses no probe silently
                report(plan[index], {"type": "error", "detail": f"probe lane exited with status {status} "
                                                                f"before reporting this probe"})
    finally:  # the runner never leaves a lane behind, even when reporting failed
        for pid, read_end, _, _ in parts:
            if pid is not None:
                os.close(read_end)  # a lane blocked on a full pipe gets EPIPE and ends after reaping its child
                if pid not in reaped:
                    os.waitpid(pid, 0)


def _fork_lane(machine: _Machine, plan: list, start: int, end: int, parts: list) -> tuple:
    """A lane for ``start``..``end - 1``, as (pid, read end, start, end); when no process can be forked,
    (None, None, start, end): the runner runs that segment itself, after the lanes before it."""
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return (None, None, start, end)
    foreign = _lane_pipes(parts)
    try:
        pid = os.fork()
    except OSError:  # EAGAIN/ENOMEM: a busy or limited target still gets every probe, one lane fewer
        os.close(read_end)
        os.close(write_end)
        return (None, None, start, end)
    if pid == 0:  # a lane never returns into the runner
        _forked(read_end, foreign, lambda: _lane(machine, plan, start, end, write_end))
    os.close(write_end)
    return (pid, read_end, start, end)


# The /proc/self/status lines that say who a process is (proc(5)): ids, capability sets, no_new_privs
# and the seccomp state. Read once per run, from inside the target, before any probe.
IDENTITY_STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                          "NoNewPrivs", "Seccomp", "Seccomp_filters")
# Files that describe a user namespace's id mappings (user_namespaces(7)); they matter only when the
# process is in a user namespace of its own.
IDENTITY_FILES = ("uid_map", "gid_map", "setgroups")


def whoami() -> dict:
    """Who this process is, as the kernel sees it: every probe child inherits exactly this."""
    status: dict = {}
    namespaces: dict = {}
    files: dict = {}
    unreadable: list = []
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in IDENTITY_STATUS_FIELDS:
                    status[key] = " ".join(value.split())
    except OSError as exc:
        unreadable.append(f"/proc/self/status: {exc.strerror}")
    try:
        names = sorted(os.listdir("/proc/self/ns"))
    except OSError as exc:
        names = []
        unreadable.append(f"/proc/self/ns: {exc.strerror}")
    for name in names:
        try:
            namespaces[name] = os.readlink(f"/proc/self/ns/{name}")
        except OSError as exc:
            unreadable.append(f"/proc/self/ns/{name}: {exc.strerror}")
    for name in IDENTITY_FILES:
        try:
            with open(f"/proc/self/{name}") as handle:
                files[name] = " ".join(handle.read().split())
        except OSError as exc:
            unreadable.append(f"/proc/self/{name}: {exc.strerror}")
    return {"resuid": list(os.getresuid()), "resgid": list(os.getresgid()), "groups": sorted(os.getgroups()),
            "status": status, "namespaces": namespaces, "files": files, "unreadable": unreadable}


# Core dumps (issue #12). Every probe child a filter kills (KILL_PROCESS, KILL_THREAD, an i386 call under a
# native-only filter, a TRAP left unhandled) dies by SIGSYS, a core-dumping signal (signal(7)). Where
# /proc/sys/kernel/core_pattern pipes to a crash handler (Ubuntu's apport, systemd-coredump), the kernel
# starts that handler for every such death whatever RLIMIT_CORE says (fs/coredump.c do_coredump: the limit
# is not checked for pipes), and the dying child waits while its core is written into the pipe: a plan's
# 61 SIGSYS deaths took the sentinel plan from 2228 probes/s to 506 with a shell `cat` as the handler and to
# 78 with a Python one that only reads the core (benchmarks/README.md, bench_probes.py --core-pipe). The one
# value the kernel honours for a pipe is 1, which it reserves to stop a crash handler's own crash from
# recursing ("RLIMIT_CORE is set to 1, aborting core"; umh_coredump_setup sets it), and for a file
# pattern any limit below the ELF min_coredump (a page) writes nothing. So the
# runner sets its soft limit to 1 byte before any probe: no probe calls getrlimit/prlimit, and a probe
# child's death is observed by waitpid exactly as before (WCOREDUMP aside, which no verdict reads).
RLIMIT_CORE = 4  # asm-generic/resource.h


def refuse_core_dumps(libc: ctypes.CDLL) -> None:
    """Set this process's soft RLIMIT_CORE to 1 (inherited by every lane and probe child), when its hard
    limit allows; otherwise, or if the target refuses the call, leave it: nothing a verdict reads changes."""
    limits = (ctypes.c_uint64 * 2)()
    if libc.getrlimit(RLIMIT_CORE, limits) != 0 or limits[1] == 0:
        return
    limits[0] = 1
    libc.setrlimit(RLIMIT_CORE, limits)


def main(plan: list, one_per_child: bool = False) -> None:
    """Say who this runner is, then run ``plan``; ``one_per_child`` forks a child for every probe (the
    reference the batched children are tested against)."""
    out = sys.stdout
    try:
        out.write(_json_line({"identity": whoami()}) + "\n")
    except Exception as exc:  # reported, never raised: the probes still run
        out.write(_json_line({"identity_error": repr(exc)}) + "\n")
    out.flush()
    machine = _Machine()
    refuse_core_dumps(machine.libc)

    def report(probe: dict, outcome: dict) -> None:
        out.write(_json_line({"id": probe["id"], "outcome": outcome}) + "\n")

    run_plan(machine, plan, report, one_per_child)
    out.flush()
