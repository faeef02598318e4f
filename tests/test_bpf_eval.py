"""The classic-BPF evaluator (pytest_sandbox/seccomp/bpf_eval.py), checked against two independent judges.

1. libseccomp's own simulator, ``tools/scmp_bpf_sim.c`` (vendored unmodified in tests/third_party/libseccomp,
   built here with the system C compiler): every program the bundled policies and the Docker-like profile
   compile to, in both builds and every network mode, on bounded random calls whose arguments are drawn
   from the constants the program compares (and their neighbours, with and without high bits).
2. The kernel, for what the kernel alone can say: which instructions a seccomp filter may hold. Each
   opcode is loaded in a forked child (``prctl(PR_SET_SECCOMP)``, the child exits at once) and the kernel's
   acceptance must match :func:`decode`'s.
Hand-built programs cover what libseccomp never emits (scratch memory, X, ALU, jset, ret A).
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pytest_sandbox.policy.load import load_policy
from pytest_sandbox.policy.model import NETWORK_MODES
from pytest_sandbox.seccomp.behaviour import ABIS, classes, syscall_numbers
from pytest_sandbox.seccomp.bpf_eval import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    BpfError,
    FilterResult,
    decode,
    run_program,
    run_stack,
    seccomp_data,
)
from pytest_sandbox.seccomp.compiler import compile_policy

SIM_SOURCE = Path(__file__).parent / "third_party" / "libseccomp"
DOCKER_LIKE = Path(__file__).resolve().parents[1] / "fixtures/oci/docker-like-default.json"
OTHER_NUMBERS_PER_ABI = 6  # numbers without argument rules, per ABI and program (each point is one process)
MAX_CLASSES_PER_NUMBER = 8
RANDOM_PER_NUMBER = 2
ERRNO, ALLOW, KILL_PROCESS, TRAP, LOG = 0x00050000, 0x7FFF0000, 0x80000000, 0x00030000, 0x7FFC0000


def ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def data(nr: int = 0, args: tuple[int, ...] = ()) -> bytes:
    return seccomp_data(nr, AUDIT_ARCH_X86_64, args)


# -- hand-built programs: the instructions libseccomp does not emit ---------------------------------


def test_scratch_memory_x_register_and_ret_a():
    program = (ins(0x20, 16) + ins(0x02, 3) + ins(0x00, 7) + ins(0x61, 3) + ins(0x0C) + ins(0x07) + ins(0x87)
               + ins(0x44, ERRNO) + ins(0x16))  # A=arg0; M[3]=A; A=7; X=M[3]; A+=X; X=A; A=X; A|=ERRNO; ret A
    assert run_program(program, data(args=(5,))) == ERRNO | 12


@pytest.mark.parametrize(("code", "k", "a", "x", "expected"), [
    (0x04, 3, 5, 0, 8), (0x14, 3, 5, 0, 2), (0x14, 6, 5, 0, 0xFFFFFFFF), (0x24, 3, 5, 0, 15),
    (0x34, 2, 5, 0, 2), (0x44, 2, 5, 0, 7), (0x54, 4, 5, 0, 4), (0x64, 31, 1, 0, 0x80000000),
    (0x74, 2, 20, 0, 5), (0x84, 0, 1, 0, 0xFFFFFFFF), (0xA4, 1, 5, 0, 4),
    (0x0C, 0, 5, 3, 8), (0x3C, 0, 5, 0, None), (0x6C, 0, 1, 33, 2), (0xAC, 0, 5, 5, 0),
])  # fmt: skip
def test_alu(code: int, k: int, a: int, x: int, expected: int | None):
    # A = a; X = x; A op= (k or X); ret A  (div by X == 0: the kernel's converted filter returns 0)
    program = ins(0x00, a) + ins(0x01, x) + ins(code, k) + ins(0x16)
    assert run_program(program, data()) == (0 if expected is None else expected)


@pytest.mark.parametrize(("code", "k", "x", "a", "taken"), [
    (0x15, 7, 0, 7, True), (0x15, 7, 0, 8, False), (0x25, 7, 0, 8, True), (0x25, 7, 0, 7, False),
    (0x35, 7, 0, 7, True), (0x35, 7, 0, 6, False), (0x45, 6, 0, 2, True), (0x45, 6, 0, 1, False),
    (0x1D, 0, 9, 9, True), (0x2D, 0, 9, 9, False), (0x3D, 0, 9, 9, True), (0x4D, 0, 8, 9, True),
])  # fmt: skip
def test_conditional_jumps(code: int, k: int, x: int, a: int, taken: bool):
    program = ins(0x00, a) + ins(0x01, x) + ins(code, k, 0, 1) + ins(0x06, ALLOW) + ins(0x06, ERRNO | 1)
    assert run_program(program, data()) == (ALLOW if taken else ERRNO | 1)


def test_len_loads_and_ja():
    program = ins(0x80) + ins(0x05, 1) + ins(0x06, 0) + ins(0x81) + ins(0x1D, 0, 0, 1) + ins(0x06, ALLOW) + ins(0x06, 0)
    assert run_program(program, data()) == ALLOW  # A = X = sizeof(seccomp_data) = 64; the ja skips ret 0


def test_the_kernel_combines_filters_by_precedence_newest_first_on_a_tie():
    errno_1, errno_2 = ins(0x06, ERRNO | 1), ins(0x06, ERRNO | 2)
    kill, allow, trap = ins(0x06, KILL_PROCESS), ins(0x06, ALLOW), ins(0x06, TRAP)
    assert run_stack((errno_1, errno_2), 0, AUDIT_ARCH_X86_64, ()) == FilterResult(ERRNO | 2)  # newest wins a tie
    assert run_stack((kill, errno_1), 0, AUDIT_ARCH_X86_64, ()).action == "kill_process"
    assert run_stack((errno_1, trap, allow), 0, AUDIT_ARCH_X86_64, ()).action == "trap"
    assert run_stack((), 0, AUDIT_ARCH_X86_64, ()).action == "allow"
    assert run_stack((ins(0x06, LOG), allow), 0, AUDIT_ARCH_X86_64, ()).action == "log"


@pytest.mark.parametrize(("program", "why"), [
    (b"", "non-empty"), (ins(0x06)[:5], "multiple of 8"), (ins(0x28, 0) + ins(0x06), "not allowed"),
    (ins(0x20, 64) + ins(0x06), "outside"), (ins(0x20, 2) + ins(0x06), "unaligned"), (ins(0x00), "not a return"),
    (ins(0x15, 0, 5, 0) + ins(0x06), "jump out"), (ins(0x05, 3) + ins(0x06), "jump out"),
    (ins(0x02, 16) + ins(0x06), "scratch"), (ins(0x34, 0) + ins(0x06), "division"),
    (ins(0x64, 32) + ins(0x06), "shift"),
    (ins(0x94, 3) + ins(0x06), "not allowed"), (ins(0x21, 0) + ins(0x06), "not allowed"),
    (ins(0x15, 0, 0, 1) + ins(0x02, 1) + ins(0x60, 1) + ins(0x06), "before any store"),
])  # fmt: skip
def test_programs_the_kernel_would_refuse_are_refused(program: bytes, why: str):
    with pytest.raises(BpfError, match=why):
        decode(program)


# -- the kernel: which opcodes a seccomp filter may hold ------------------------------------------


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _kernel_accepts(program: bytes) -> bool:
    """Load ``program`` as a seccomp filter in a forked child that exits at once; did the kernel accept it?"""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            buffer = ctypes.create_string_buffer(program, len(program))
            prog = _Fprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_char_p))
            os._exit(0 if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0 else 1)  # PR_SET_SECCOMP, FILTER
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 31:  # SIGSYS: loaded, and it refused the child's exit
        return True
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 1), status
    return os.WEXITSTATUS(status) == 0


def test_decode_accepts_exactly_the_opcodes_the_kernel_accepts():
    disagreements = []
    for code in range(0x100):
        k = 4 if code & 0x07 in (0x00, 0x01, 0x02, 0x03) else 1  # a valid offset / memory slot / shift
        program = ins(code, k) + ins(0x06, ALLOW) + ins(0x06, ALLOW)
        try:
            decode(program)
            ours = True
        except BpfError:
            ours = False
        if ours != _kernel_accepts(program):
            disagreements.append(f"{code:#04x}: decode {'accepts' if ours else 'refuses'}, the kernel does not agree")
    assert not disagreements


# -- libseccomp's simulator on every compiled program ------------------------------------------------


@pytest.fixture(scope="module")
def scmp_bpf_sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build libseccomp's scmp_bpf_sim (Debian: apt-get install gcc linux-libc-dev)")
    binary = tmp_path_factory.mktemp("sim") / "scmp_bpf_sim"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(SIM_SOURCE / "scmp_bpf_sim.c"),
                    str(SIM_SOURCE / "util.c")], check=True, capture_output=True, timeout=120)
    return binary


def _simulate(sim: Path, program_file: Path, arch: str, nr: int, args: tuple[int, ...]) -> int:
    argv = [str(sim), "-f", str(program_file), "-a", arch, "-s", str(nr)]
    for index, value in enumerate(args):
        argv += [f"-{index}", str(value)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, f"scmp_bpf_sim {' '.join(argv[1:])}: {out.stderr.strip()}"
    word = out.stdout.strip()
    names = {"KILL_PROCESS": KILL_PROCESS, "KILL": 0, "TRAP": TRAP, "LOG": LOG, "ALLOW": ALLOW}
    if word in names:
        return names[word]
    action, _, rest = word.partition("(")
    return {"ERRNO": ERRNO, "TRACE": 0x7FF00000}[action] | int(rest.rstrip(")"))


def _compiled_programs() -> list[tuple[str, bytes]]:
    found = {}
    for name in ("baseline", "strict", "openshell-pre-819"):
        policy = load_policy(name)
        for mode in NETWORK_MODES:
            for sentinel in (False, True):
                for index, program in enumerate(compile_policy(policy, mode, sentinel=sentinel).programs):
                    found.setdefault(program, f"{name}-{mode}-{'sentinel' if sentinel else 'real'}-{index}")
    for index, program in enumerate(compile_policy(load_policy(str(DOCKER_LIKE))).programs):
        found.setdefault(program, f"docker-like-{index}")
    return [(label, program) for program, label in found.items()]


def _points(program: bytes, rng: random.Random) -> list[tuple[str, int, tuple[int, ...]]]:
    """Bounded: per ABI, every syscall number whose arguments the program compares (found by
    behaviour.classes, which tries each constant, its neighbours and high bits) and some of the others;
    for each, one vector per argument class and random vectors drawn from the program's constants."""
    constants = sorted({k for code, _, _, k in struct.iter_unpack("<HBBI", program) if code & 0x07 in (0x04, 0x05)})

    def value() -> int:
        base = rng.choice([*constants, 0, rng.getrandbits(32)]) + rng.choice((0, 0, 1, -1))
        return (base & 0xFFFFFFFF) | rng.choice((0, 0, 1 << 32, 0xFFFFFFFF << 32))

    points = []
    for abi, arch in ((ABIS[0], "x86_64"), (ABIS[1], "x32"), (ABIS[2], "x86")):
        found = {nr: classes(((program,),), abi, nr) for nr in syscall_numbers(abi)}
        ruled = [nr for nr, each in found.items() if len(each) > 1]
        others = [nr for nr, each in found.items() if len(each) == 1]
        for nr in ruled + rng.sample(others, min(OTHER_NUMBERS_PER_ABI, len(others))):
            vectors = [c.args for c in found[nr]][:MAX_CLASSES_PER_NUMBER]
            vectors += [tuple(value() for _ in range(6)) for _ in range(RANDOM_PER_NUMBER)]
            for args in vectors:
                if arch != "x86_64":
                    args = tuple(a & 0xFFFFFFFF for a in args)  # 32-bit ABIs: arguments are 32-bit registers
                points.append((arch, nr, args))
    return points


@pytest.mark.parametrize(("label", "program"), _compiled_programs(), ids=lambda v: v if isinstance(v, str) else "")
def test_evaluator_agrees_with_libseccomps_simulator(label: str, program: bytes, scmp_bpf_sim: Path,
                                                     tmp_path: Path):
    program_file = tmp_path / f"{label}.bpf"
    program_file.write_bytes(program)
    rng = random.Random(f"issue13-{label}")
    tokens = {"x86_64": AUDIT_ARCH_X86_64, "x32": AUDIT_ARCH_X86_64, "x86": AUDIT_ARCH_I386}
    disagreements = []
    for arch, nr, args in _points(program, rng):
        ours = run_program(program, seccomp_data(nr, tokens[arch], args))
        theirs = _simulate(scmp_bpf_sim, program_file, arch, nr, args)
        if ours != theirs:
            shown = [hex(a) for a in args]
            disagreements.append(f"{arch} nr {nr} args {shown}: ours {ours:#x}, libseccomp {theirs:#x}")
    assert not disagreements, disagreements[:5]
