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
``PID`` in an argument list is replaced by the probe child's own pid.
"""

from __future__ import annotations

from dataclasses import dataclass

M = 0xFFFFFFFF  # syscalls.md convention: undefined flag bits
BAD_PTR = 1  # a non-NULL pointer that is invalid: EFAULT if the kernel dereferences it
AT_FDCWD = -100
PID = "pid"


@dataclass(frozen=True)
class SyscallProbe:
    name: str
    nr: int
    i386_nr: int | None
    x32_nr: int | None
    args: tuple[int | str, ...]
    control_args: tuple[int | str, ...] | None = None
    setup: tuple[str, ...] = ()
    note: str = ""


SYSCALL_PROBES: tuple[SyscallProbe, ...] = (
    SyscallProbe("memfd_create", 319, 356, 319, (BAD_PTR, 0), note="V8, wasmtime and runc need it"),
    SyscallProbe("ptrace", 101, 26, 521, (2, -1, 0, 0), note="PTRACE_PEEKDATA on pid -1; never request 0"),
    SyscallProbe("bpf", 321, 357, 321, (0xFFFF, 0, 0)),
    SyscallProbe("process_vm_readv", 310, 347, 539, (PID, 0, 0, 0, 0, 1), note="flags must be 0: EINVAL"),
    SyscallProbe("process_vm_writev", 311, 348, 540, (PID, 0, 0, 0, 0, 1)),
    SyscallProbe("pidfd_open", 434, 434, 434, (-1, 0)),
    SyscallProbe("pidfd_getfd", 438, 438, 438, (-1, -1, 0), note="fd theft"),
    SyscallProbe("pidfd_send_signal", 424, 424, 424, (-1, 0, 0, 0)),
    SyscallProbe("io_uring_setup", 425, 425, 425, (0, BAD_PTR)),
    SyscallProbe("io_uring_enter", 426, 426, 426, (-1, 0, 0, 0, 0, 0), note="usable on an inherited ring"),
    SyscallProbe("io_uring_register", 427, 427, 427, (-1, 0, 0, 0)),
    SyscallProbe("mount", 165, 21, 165, (0, 0, 0, 0, 0)),
    SyscallProbe("umount2", 166, 52, 166, (0, M)),
    SyscallProbe("pivot_root", 155, 217, 155, (BAD_PTR, BAD_PTR)),
    SyscallProbe("fsopen", 430, 430, 430, (BAD_PTR, M)),
    SyscallProbe("fsconfig", 431, 431, 431, (-1, 0, 0, 0, 0)),
    SyscallProbe("fsmount", 432, 432, 432, (-1, M, 0)),
    SyscallProbe("fspick", 433, 433, 433, (-1, BAD_PTR, M)),
    SyscallProbe("move_mount", 429, 429, 429, (-1, BAD_PTR, -1, BAD_PTR, M)),
    SyscallProbe("open_tree", 428, 428, 428, (-1, BAD_PTR, M)),
    SyscallProbe("mount_setattr", 442, 442, 442, (-1, BAD_PTR, M, 0, 0)),
    SyscallProbe("setns", 308, 346, 308, (-1, 0)),
    SyscallProbe("userfaultfd", 323, 374, 323, (M,), note="never userfaultfd(0): a real fd as root"),
    SyscallProbe("perf_event_open", 298, 336, 298, (0, 0, -1, -1, 0)),
    SyscallProbe("execveat", 322, 358, 545, (-1, BAD_PTR, 0, 0, M), control_args=(-1, BAD_PTR, 0, 0, 0),
                 note="M includes AT_EMPTY_PATH; flags 0 must reach the kernel (EFAULT)"),
    SyscallProbe("unshare", 272, 310, 272, (0x10002000,), control_args=(0x2000,),
                 note="CLONE_NEWUSER|CLONE_PTRACE: CLONE_PTRACE is invalid for unshare; never 0x80"),
    SyscallProbe("clone", 56, 120, 56, (0x10020211, 0, 0, 0, 0), control_args=(0x811, 0, 0, 0, 0),
                 note="NEWUSER|NEWNS|FS|SIGCHLD: copy_process rejects NEWNS+FS, so nothing is created; the "
                      "control SIGHAND|SIGCHLD without CLONE_VM is rejected too and sets no namespace flag"),
    SyscallProbe("clone3", 435, 435, 435, (BAD_PTR, 88), note="(NULL, 0) would give EINVAL"),
    SyscallProbe("seccomp", 317, 354, 317, (1, 0, 0), control_args=(0xFFFF, 0, 0),
                 note="SECCOMP_SET_MODE_FILTER with a NULL program: EFAULT; op 0xffff must give EINVAL"),
    SyscallProbe("prctl", 157, 172, 157, (22, 2, 0), control_args=(0xFFFF, 0, 0),
                 note="PR_SET_SECCOMP: the second route to installing a filter"),
    # Linux >= 4.3 has direct i386 socket calls (359/360) besides socketcall (102).
    SyscallProbe("socket", 41, 359, 41, (2, 0xFFFF, 0), control_args=(1, 0xFFFF, 0),
                 note="type 0xffff is checked before the family, so nothing is created"),
    SyscallProbe("socketpair", 53, 360, 53, (1, 0xFFFF, 0, 0)),
    SyscallProbe("keyctl", 250, 288, 250, (0xFFFF, 0, 0, 0, 0), note="keyrings are not namespaced"),
    SyscallProbe("add_key", 248, 286, 248, (0, 0, 0, 0, 0)),
    SyscallProbe("request_key", 249, 287, 249, (0, 0, 0, 0)),
    SyscallProbe("kexec_load", 246, 283, 528, (0, M, 0, M), note="invalid flags: never unload the crash kernel"),
    SyscallProbe("kexec_file_load", 320, None, 320, (-1, -1, 0, 0, M)),
    SyscallProbe("init_module", 175, 128, 175, (0, 0, 0)),
    SyscallProbe("finit_module", 313, 350, 313, (-1, 0, 0)),
    SyscallProbe("delete_module", 176, 129, 176, (BAD_PTR, 0)),
    SyscallProbe("open_by_handle_at", 304, 342, 304, (-1, BAD_PTR, 0), note="the 'shocker' breakout"),
    SyscallProbe("name_to_handle_at", 303, 341, 303, (AT_FDCWD, BAD_PTR, BAD_PTR, BAD_PTR, M)),
    SyscallProbe("ioctl", 16, 54, 514, (-1, 0x5412, BAD_PTR), control_args=(-1, 0x5422, 0),
                 note="TIOCSTI on a bad fd (CVE-2017-5226); control TIOCNOTTY must never be blocked"),
    SyscallProbe("personality", 135, 136, 135, (0x0040000,), control_args=(M,),
                 note="ADDR_NO_RANDOMIZE succeeds unfiltered: only ever in a throw-away child"),
    SyscallProbe("acct", 163, 51, 163, (BAD_PTR,), note="never acct(NULL): it stops host accounting"),
    SyscallProbe("swapon", 167, 87, 167, (BAD_PTR, M)),
    SyscallProbe("swapoff", 168, 115, 168, (BAD_PTR,)),
    SyscallProbe("reboot", 169, 88, 169, (0, 0, 0, 0), note="wrong magic numbers; never the real ones"),
    SyscallProbe("sethostname", 170, 74, 170, (BAD_PTR, M)),
    SyscallProbe("setdomainname", 171, 121, 171, (BAD_PTR, M)),
    SyscallProbe("syslog", 103, 103, 103, (0xFFFF, 0, 0)),
    SyscallProbe("chroot", 161, 61, 161, (BAD_PTR,)),
    SyscallProbe("fanotify_init", 300, 338, 300, (M, 0)),
    SyscallProbe("kcmp", 312, 349, 312, (-1, -1, 0xFFFF, 0, 0)),
    SyscallProbe("openat2", 437, 437, 437, (AT_FDCWD, BAD_PTR, BAD_PTR, 24), note="flags hidden in open_how"),
    SyscallProbe("settimeofday", 164, 79, 164, (BAD_PTR, 0)),
    SyscallProbe("quotactl", 179, 131, 179, (0, 0, 0, 0)),
    SyscallProbe("iopl", 172, 110, 172, (4,)),
    SyscallProbe("set_mempolicy", 238, 276, 238, (0xFFFF, 0, 0)),
    SyscallProbe("move_pages", 279, 317, 533, (0, 0, 0, 0, 0, 0xFFFF)),
    SyscallProbe("vhangup", 153, 111, 153, (), setup=("setsid",), note="only after setsid(): no tty to hang up"),
    SyscallProbe("getppid", 110, 64, 110, (), note="positive control: must succeed in every build"),
)

PROBES_BY_NAME: dict[str, SyscallProbe] = {probe.name: probe for probe in SYSCALL_PROBES}
