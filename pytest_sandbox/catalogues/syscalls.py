"""The syscall probe catalogue: what is attempted, with which harmless arguments. Data only.

Each row is one syscall and the call that makes the kernel fail early and harmlessly if a filter
lets it through (syscalls.md §2): a bad fd (EBADF), a bad pointer (EFAULT, written ``BAD_PTR``) or
undefined flag bits (EINVAL). Never ``PTRACE_TRACEME``, ``acct(NULL)``, ``userfaultfd(0)``, kexec with
valid flags, or ``unshare`` with CLONE_NEWTIME (syscalls.md §2.1).

``args`` is the harmless call with the dangerous bit set where an argument rule looks (e.g. clone with
CLONE_NEWUSER); ``control_args``, when given, is the same call without it, which must reach the
kernel under every policy (a positive control that the rule is argument-specific, not a blanket deny).
``i386_nr`` and ``x32_nr`` are the numbers in those syscall tables (cross-checked against libseccomp in
tests/test_catalogue.py); ``None`` means the call does not exist on that ABI.
``PID`` in an argument list is replaced by the probe child's own pid. ``arg_types`` is the kernel
prototype's type of every argument (see ``ARG_TYPE_BITS``): the high-bit variants of a rule follow it.
``mux`` says how the call also enters through an i386 multiplexer (socketcall, ipc).
"""

from __future__ import annotations

from dataclasses import dataclass

M = 0xFFFFFFFF  # syscalls.md convention: undefined flag bits
BAD_PTR = 1  # a non-NULL pointer that is invalid: EFAULT if the kernel dereferences it
AT_FDCWD = -100
PID = "pid"


# The kernel prototype's type of each argument (``SYSCALL_DEFINEn`` in the kernel source). The x86_64
# syscall entry passes six 64-bit registers, and ``SYSCALL_DEFINEn`` casts each to the declared type
# (include/linux/syscalls.h ``__SC_CAST``): an ``int`` or ``unsigned int`` argument is read as its low 32
# bits, so ``seccomp((1 << 32) | 1, ...)`` is SECCOMP_SET_MODE_FILTER to the kernel, and a filter that
# compares all 64 bits lets it through. A ``long``, ``unsigned long`` or pointer is read whole: there a
# value with high bits is a different value (EINVAL, EFAULT), not the ruled call.
I = "int"  # noqa: E741 (short names keep the rows readable)
U = "unsigned int"
L = "long"
UL = "unsigned long"
P = "pointer"
# clone(2)'s flags are ``unsigned long`` in the prototype, but kernel/fork.c reads
# ``lower_32_bits(clone_flags)``: the high 32 bits are ignored as for an int.
UL32 = "unsigned long (low 32 bits read)"
ARG_TYPE_BITS = {I: 32, U: 32, UL32: 32, L: 64, UL: 64, P: 64}

# i386 multiplexers (arch/x86/entry/syscalls/syscall_32.tbl): socketcall(2) takes the call number and a
# pointer to the arguments as an array of 32-bit words; ipc(2) takes the call number and the arguments
# in registers (ipc/syscall.c ``compat_ksys_ipc``). Call numbers: include/uapi/linux/net.h SYS_*,
# include/uapi/linux/ipc.h (SEMCTL 3, MSGCTL 14, SHMCTL 24).
SOCKETCALL_NR = 102
IPC_NR = 117
# ipc(2) reads only the low 16 bits of its call number; the high 16 are a version (ipc/syscall.c
# compat_ksys_ipc and ksys_ipc: ``version = call >> 16; call &= 0xffff``). SEMCTL, MSGCTL and SHMCTL never
# look at the version, so ``(v << 16) | SHMCTL`` is SHMCTL for every v, and a filter comparing the whole
# argument 0 (libseccomp's own ``ipc(arg0 == 24)``) lets it through. Not every call ignores it: SHMAT with
# version 1 is the old iBCS2 entry (-EINVAL), and MSGRCV with version 0 reads its arguments through a
# struct ipc_kludge; a row for those must list only versions that reach the same call (SHMAT: 0 or >= 2).
IPC_ANY_VERSION = (1, 0xFFFF)  # the lowest and the highest version: both reach SEMCTL, MSGCTL and SHMCTL


@dataclass(frozen=True)
class Multiplexed:
    """How the same call enters through an i386 multiplexer: ``name`` (socketcall or ipc), its i386
    number, the call number in its argument 0, and for ipc, where each of the call's arguments goes:
    ``layout[i]`` is the syscall argument index for ipc argument ``i + 1`` (first, second, third, ptr,
    fifth), ``None`` for 0, or ``"*n"`` for a pointer to a 32-bit word holding argument ``n``; ``versions``,
    for ipc, the versions (the high 16 bits of argument 0) that reach the same call, each probed too."""

    name: str
    nr: int
    call: int
    layout: tuple[int | str | None, ...] = ()
    versions: tuple[int, ...] = ()

    def call_with_version(self, version: int) -> int:
        """Argument 0 carrying ``version`` in its high 16 bits (ipc/syscall.c ``version = call >> 16``)."""
        return version << 16 | self.call


def socketcall(call: int) -> Multiplexed:
    return Multiplexed("socketcall", SOCKETCALL_NR, call)


def ipc(call: int, *layout: int | str | None, versions: tuple[int, ...] = ()) -> Multiplexed:
    return Multiplexed("ipc", IPC_NR, call, layout, versions)


@dataclass(frozen=True)
class SyscallProbe:
    name: str
    nr: int
    i386_nr: int | None
    x32_nr: int | None
    arg_types: tuple[str, ...]
    args: tuple[int | str, ...]
    control_args: tuple[int | str, ...] | None = None
    setup: tuple[str, ...] = ()
    note: str = ""
    mux: Multiplexed | None = None  # the i386 multiplexer that also reaches this call

    def arg_bits(self, index: int) -> int:
        """How many bits of argument ``index`` the kernel reads (64 when the call has no such argument)."""
        return ARG_TYPE_BITS[self.arg_types[index]] if index < len(self.arg_types) else 64


SYSCALL_PROBES: tuple[SyscallProbe, ...] = (
    SyscallProbe("memfd_create", 319, 356, 319, (P, U), (BAD_PTR, 0), note="V8, wasmtime and runc need it"),
    SyscallProbe("ptrace", 101, 26, 521, (L, L, UL, UL), (2, -1, 0, 0),
                 note="PTRACE_PEEKDATA on pid -1; never request 0"),
    SyscallProbe("bpf", 321, 357, 321, (I, P, U), (0xFFFF, 0, 0)),
    SyscallProbe("process_vm_readv", 310, 347, 539, (I, P, UL, P, UL, UL), (PID, 0, 0, 0, 0, 1),
                 note="flags must be 0: EINVAL"),
    SyscallProbe("process_vm_writev", 311, 348, 540, (I, P, UL, P, UL, UL), (PID, 0, 0, 0, 0, 1)),
    SyscallProbe("pidfd_open", 434, 434, 434, (I, U), (-1, 0)),
    SyscallProbe("pidfd_getfd", 438, 438, 438, (I, I, U), (-1, -1, 0), note="fd theft"),
    SyscallProbe("pidfd_send_signal", 424, 424, 424, (I, I, P, U), (-1, 0, 0, 0)),
    SyscallProbe("io_uring_setup", 425, 425, 425, (U, P), (0, BAD_PTR)),
    SyscallProbe("io_uring_enter", 426, 426, 426, (U, U, U, U, P, UL), (-1, 0, 0, 0, 0, 0),
                 note="usable on an inherited ring"),
    SyscallProbe("io_uring_register", 427, 427, 427, (U, U, P, U), (-1, 0, 0, 0)),
    SyscallProbe("mount", 165, 21, 165, (P, P, P, UL, P), (0, 0, 0, 0, 0)),
    SyscallProbe("umount2", 166, 52, 166, (P, I), (0, M)),
    SyscallProbe("pivot_root", 155, 217, 155, (P, P), (BAD_PTR, BAD_PTR)),
    SyscallProbe("fsopen", 430, 430, 430, (P, U), (BAD_PTR, M)),
    SyscallProbe("fsconfig", 431, 431, 431, (I, U, P, P, I), (-1, 0, 0, 0, 0)),
    SyscallProbe("fsmount", 432, 432, 432, (I, U, U), (-1, M, 0)),
    SyscallProbe("fspick", 433, 433, 433, (I, P, U), (-1, BAD_PTR, M)),
    SyscallProbe("move_mount", 429, 429, 429, (I, P, I, P, U), (-1, BAD_PTR, -1, BAD_PTR, M)),
    SyscallProbe("open_tree", 428, 428, 428, (I, P, U), (-1, BAD_PTR, M)),
    SyscallProbe("mount_setattr", 442, 442, 442, (I, P, U, P, UL), (-1, BAD_PTR, M, 0, 0)),
    SyscallProbe("setns", 308, 346, 308, (I, I), (-1, 0)),
    SyscallProbe("userfaultfd", 323, 374, 323, (I,), (M,), note="never userfaultfd(0): a real fd as root"),
    SyscallProbe("perf_event_open", 298, 336, 298, (P, I, I, I, UL), (0, 0, -1, -1, 0)),
    SyscallProbe("execveat", 322, 358, 545, (I, P, P, P, I), (-1, BAD_PTR, 0, 0, M),
                 control_args=(-1, BAD_PTR, 0, 0, 0),
                 note="M includes AT_EMPTY_PATH; flags 0 must reach the kernel (EFAULT)"),
    SyscallProbe("unshare", 272, 310, 272, (UL,), (0x10002000,), control_args=(0x2000,),
                 note="CLONE_NEWUSER|CLONE_PTRACE: CLONE_PTRACE is invalid for unshare; never 0x80"),
    SyscallProbe("clone", 56, 120, 56, (UL32, UL, P, P, UL), (0x10020211, 0, 0, 0, 0), control_args=(0x811, 0, 0, 0, 0),
                 note="NEWUSER|NEWNS|FS|SIGCHLD: copy_process rejects NEWNS+FS, so nothing is created; the "
                      "control SIGHAND|SIGCHLD without CLONE_VM is rejected too and sets no namespace flag"),
    SyscallProbe("clone3", 435, 435, 435, (P, UL), (BAD_PTR, 88), note="(NULL, 0) would give EINVAL"),
    SyscallProbe("seccomp", 317, 354, 317, (U, U, P), (1, 0, 0), control_args=(0xFFFF, 0, 0),
                 note="SECCOMP_SET_MODE_FILTER with a NULL program: EFAULT; op 0xffff must give EINVAL"),
    SyscallProbe("prctl", 157, 172, 157, (I, UL, UL, UL, UL), (22, 2, 0), control_args=(0xFFFF, 0, 0),
                 note="PR_SET_SECCOMP: the second route to installing a filter"),
    # Linux >= 4.3 has direct i386 socket calls (359/360) besides socketcall (102).
    SyscallProbe("socket", 41, 359, 41, (I, I, I), (2, 0xFFFF, 0), control_args=(1, 0xFFFF, 0),
                 note="type 0xffff is checked before the family, so nothing is created", mux=socketcall(1)),
    SyscallProbe("socketpair", 53, 360, 53, (I, I, I, P), (1, 0xFFFF, 0, 0), mux=socketcall(8)),
    SyscallProbe("bind", 49, 361, 49, (I, P, I), (-1, BAD_PTR, 0), note="a bad fd: EBADF", mux=socketcall(2)),
    SyscallProbe("connect", 42, 362, 42, (I, P, I), (-1, BAD_PTR, 0), note="a bad fd: EBADF", mux=socketcall(3)),
    # SysV IPC: a negative id is refused (EINVAL) before any object is looked up (ipc/shm.c ksys_shmctl,
    # ipc/msg.c ksys_msgctl, ipc/sem.c ksys_semctl); Linux >= 5.1 has direct i386 numbers besides ipc(2).
    SyscallProbe("semctl", 66, 394, 66, (I, I, I, UL), (-1, 0, 0, 0),
                 mux=ipc(3, 0, 1, 2, "*3", versions=IPC_ANY_VERSION)),
    SyscallProbe("shmctl", 31, 396, 31, (I, I, P), (-1, 0, 0),
                 mux=ipc(24, 0, 1, None, 2, versions=IPC_ANY_VERSION)),
    SyscallProbe("msgctl", 71, 402, 71, (I, I, P), (-1, 0, 0),
                 mux=ipc(14, 0, 1, None, 2, versions=IPC_ANY_VERSION)),
    SyscallProbe("keyctl", 250, 288, 250, (I, UL, UL, UL, UL), (0xFFFF, 0, 0, 0, 0),
                 note="keyrings are not namespaced"),
    SyscallProbe("add_key", 248, 286, 248, (P, P, P, UL, I), (0, 0, 0, 0, 0)),
    SyscallProbe("request_key", 249, 287, 249, (P, P, P, I), (0, 0, 0, 0)),
    SyscallProbe("kexec_load", 246, 283, 528, (UL, UL, P, UL), (0, M, 0, M),
                 note="invalid flags: never unload the crash kernel"),
    SyscallProbe("kexec_file_load", 320, None, 320, (I, I, UL, P, UL), (-1, -1, 0, 0, M)),
    SyscallProbe("init_module", 175, 128, 175, (P, UL, P), (0, 0, 0)),
    SyscallProbe("finit_module", 313, 350, 313, (I, P, I), (-1, 0, 0)),
    SyscallProbe("delete_module", 176, 129, 176, (P, U), (BAD_PTR, 0)),
    SyscallProbe("open_by_handle_at", 304, 342, 304, (I, P, I), (-1, BAD_PTR, 0), note="the 'shocker' breakout"),
    SyscallProbe("name_to_handle_at", 303, 341, 303, (I, P, P, P, I), (AT_FDCWD, BAD_PTR, BAD_PTR, BAD_PTR, M)),
    SyscallProbe("ioctl", 16, 54, 514, (U, U, UL), (-1, 0x5412, BAD_PTR), control_args=(-1, 0x5422, 0),
                 note="TIOCSTI on a bad fd (CVE-2017-5226); control TIOCNOTTY must never be blocked"),
    SyscallProbe("personality", 135, 136, 135, (U,), (0x0040000,), control_args=(M,),
                 note="ADDR_NO_RANDOMIZE succeeds unfiltered: only ever in a throw-away child"),
    SyscallProbe("acct", 163, 51, 163, (P,), (BAD_PTR,), note="never acct(NULL): it stops host accounting"),
    SyscallProbe("swapon", 167, 87, 167, (P, I), (BAD_PTR, M)),
    SyscallProbe("swapoff", 168, 115, 168, (P,), (BAD_PTR,)),
    SyscallProbe("reboot", 169, 88, 169, (I, I, U, P), (0, 0, 0, 0), note="wrong magic numbers; never the real ones"),
    SyscallProbe("sethostname", 170, 74, 170, (P, I), (BAD_PTR, M)),
    SyscallProbe("setdomainname", 171, 121, 171, (P, I), (BAD_PTR, M)),
    SyscallProbe("syslog", 103, 103, 103, (I, P, I), (0xFFFF, 0, 0)),
    SyscallProbe("chroot", 161, 61, 161, (P,), (BAD_PTR,)),
    SyscallProbe("fanotify_init", 300, 338, 300, (U, U), (M, 0)),
    SyscallProbe("kcmp", 312, 349, 312, (I, I, I, UL, UL), (-1, -1, 0xFFFF, 0, 0)),
    SyscallProbe("openat2", 437, 437, 437, (I, P, P, UL), (AT_FDCWD, BAD_PTR, BAD_PTR, 24),
                 note="flags hidden in open_how"),
    SyscallProbe("settimeofday", 164, 79, 164, (P, P), (BAD_PTR, 0)),
    SyscallProbe("quotactl", 179, 131, 179, (U, P, U, P), (0, 0, 0, 0)),
    SyscallProbe("iopl", 172, 110, 172, (U,), (4,)),
    SyscallProbe("set_mempolicy", 238, 276, 238, (I, P, UL), (0xFFFF, 0, 0)),
    SyscallProbe("move_pages", 279, 317, 533, (I, UL, P, P, P, I), (0, 0, 0, 0, 0, 0xFFFF)),
    SyscallProbe("vhangup", 153, 111, 153, (), (), setup=("setsid",), note="only after setsid(): no tty to hang up"),
    SyscallProbe("getppid", 110, 64, 110, (), (), note="positive control: must succeed in every build"),
)

PROBES_BY_NAME: dict[str, SyscallProbe] = {probe.name: probe for probe in SYSCALL_PROBES}


@dataclass(frozen=True)
class DevicePath:
    """Another way to the kernel object a denied syscall makes: open ``device``, then ``ioctl(fd, request, arg)``.

    ``arg`` is the harmless form, as everywhere in this catalogue: a value the object's constructor refuses
    (EINVAL) once the ioctl reaches it, so the attempt makes nothing even where nothing refuses it. The open
    itself is where a sandbox with its own /dev (bubblewrap's ``--dev``, firejail's ``--private-dev``, every
    OCI runtime) refuses the path (ENOENT), and a process without the device's permission gets EACCES."""

    device: str
    request: int
    arg: int
    note: str


# Linux 6.1 (commit 2d5de004e009, "userfaultfd: add /dev/userfaultfd for fine grained access control"):
# USERFAULTFD_IOC_NEW (_IO(0xAA, 0x00), include/uapi/linux/userfaultfd.h) on /dev/userfaultfd returns the same
# userfaultfd the userfaultfd(2) syscall creates, without that syscall (fs/userfaultfd.c userfaultfd_dev_ioctl ->
# new_userfaultfd). A filter that denies userfaultfd(2) alone leaves it to whoever may open the device (root, by
# its 0600 mode). new_userfaultfd refuses flags outside O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY with EINVAL
# before it allocates anything, so arg 2 (O_RDWR's bit, no uffd flag) is the harmless form.
USERFAULTFD_IOC_NEW = 0xAA00
DEVICE_PATHS: dict[str, DevicePath] = {
    "userfaultfd": DevicePath("/dev/userfaultfd", USERFAULTFD_IOC_NEW, 2,
                              "USERFAULTFD_IOC_NEW on /dev/userfaultfd (Linux >= 6.1)"),
}


@dataclass(frozen=True)
class WitnessPath:
    """Another way to do what a denied cross-process syscall does, to a process outside the sandbox: the witness,
    which the harness starts outside it as the same caller, holding a random nonce in its memory and in a memfd.

    ``access`` is what the attempt does: ``mem-read`` reads the nonce through ``/proc/<pid>/mem``, ``mem-write``
    writes 16 random bytes into a slot the witness keeps for that (nothing else of it changes), ``fd`` opens the
    witness's memfd through ``/proc/<pid>/fd/<n>`` and reads the nonce, ``signal`` sends it signal 0 with kill(2)
    (the permission check of any signal, nothing delivered). The kernel checks the /proc ones with ptrace_may_access
    (fs/proc/base.c: ``mem_open`` -> ``proc_mem_open`` with PTRACE_MODE_ATTACH, ``proc_fd_link`` with
    PTRACE_MODE_READ), the signal with check_kill_permission (kernel/signal.c), not through the denied syscall: a
    sandbox that denies process_vm_readv and leaves /proc/<pid>/mem open hands out the same access. ``row`` ends
    the row's id."""

    access: str
    row: str
    note: str


# The paths a cross-process denial implies (syscalls.md, #819: "block cross-process manipulation syscalls
# (process_vm_writev, pidfd_open, pidfd_getfd, pidfd_send_signal) symmetric with existing ptrace and process_vm_readv
# blocks"). Refused by what keeps the sandbox's processes from those outside it: a Landlock domain
# (Documentation/userspace-api/landlock.rst, "Ptrace restrictions": a tracee must be in a sub-domain of the tracer;
# LANDLOCK_SCOPE_SIGNAL, Linux 6.12: no signal to a process outside the domain), a PID namespace with its own /proc,
# a user namespace (security/commoncap.c cap_ptrace_access_check: CAP_SYS_PTRACE in the target's namespace; a signal
# needs the same uid or CAP_KILL there), or no CAP_SYS_PTRACE against a more privileged process. As root with every
# capability, or as a uid the witness shares, nothing else stops it.
WITNESS_PATHS: dict[str, WitnessPath] = {
    "process_vm_readv": WitnessPath("mem-read", "proc-mem-read",
                                    "reading another process's memory through /proc/<pid>/mem"),
    "process_vm_writev": WitnessPath("mem-write", "proc-mem-write",
                                     "writing another process's memory through /proc/<pid>/mem"),
    "pidfd_getfd": WitnessPath("fd", "proc-fd", "taking another process's open file through /proc/<pid>/fd/<n>"),
    "pidfd_send_signal": WitnessPath("signal", "kill", "signalling another process with kill(2) (signal 0)"),
}
