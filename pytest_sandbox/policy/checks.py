"""Up-front checks on a policy: what would otherwise fail late, slowly, or as a traceback.

Run by the loader (``load.py``) and the compiler before any test: each problem is one
:class:`~pytest_sandbox.errors.PolicyError` naming the file and the fix.

- **The file itself**: a regular file (``/dev/zero`` or a FIFO would be read forever), at most
  :data:`MAX_POLICY_BYTES`, UTF-8 text without NUL bytes (a binary ``.json`` is not a profile).
- **``extends``**: no cycle, at most :data:`MAX_EXTENDS_DEPTH` levels (each level is a nested load).
- **Program size**: the kernel refuses a classic-BPF seccomp program longer than ``BPF_MAXINSNS``
  (4096 instructions, ``include/uapi/linux/bpf_common.h``; ``seccomp_prepare_filter`` answers
  EINVAL), and a stack of filters whose instructions plus 4 per filter exceed ``MAX_INSNS_PER_PATH``
  (32768, ``kernel/seccomp.c``; ENOMEM). :func:`rule_floor_problem` catches the hopeless case before
  anything is planned or compiled (every distinct rule costs at least one conditional jump in the
  program libseccomp emits, so more distinct rules than the limit can never fit): a 10,000-rule policy
  is one line at once, not minutes of planning. :func:`program_size_problem` checks the compiled
  programs exactly.

- **pyseccomp**: every policy's syscall names are resolved through libseccomp, so a pyseccomp that
  cannot be imported (no libseccomp2) is one line before any policy is read (:func:`require_pyseccomp`).

Pure except :func:`read_policy_text` (which reads the file, bounded) and :func:`require_pyseccomp`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from pytest_sandbox.errors import HostUnsupportedError, PolicyError
from pytest_sandbox.policy.model import Policy

MAX_POLICY_BYTES = 4 * 1024 * 1024  # Docker's default profile is ~20 KB; a 10,000-rule TOML policy ~0.6 MB
MAX_EXTENDS_DEPTH = 16
BPF_MAXINSNS = 4096  # include/uapi/linux/bpf_common.h
MAX_INSNS_PER_PATH = 32768  # kernel/seccomp.c: (1 << 18) / sizeof(struct sock_filter)
FILTER_OVERHEAD_INSNS = 4  # kernel/seccomp.c counts each attached filter's length + 4 against the path limit
_FEWER_RULES = ("refuse whole syscalls in seccomp.deny instead of many argument values, merge values into "
                "one masked_eq or lt/ge range, or split the policy")


@lru_cache(maxsize=1)
def require_pyseccomp() -> None:
    """Raise HostUnsupportedError (one line, with the fix) when pyseccomp / libseccomp cannot be loaded."""
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: pyseccomp's "Unable to find libseccomp"
        raise HostUnsupportedError(f"pyseccomp cannot be loaded ({exc}); policies name syscalls through libseccomp: "
                                   "install libseccomp2 (Debian: apt-get install libseccomp2) and pyseccomp "
                                   "(pip install pyseccomp)") from None


def read_policy_text(path: Path, what: str = "policy") -> str:
    """The text of the policy file at ``path``, read with a bound; PolicyError for anything else."""
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise PolicyError(f"{path}: not a regular file; give the path of a {what} file")
            data = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the {what} file ({exc.strerror}); check the path and its "
                          "permissions") from None
    return decode_policy_bytes(path, data, what)


def decode_policy_bytes(path: Path, data: bytes, what: str = "policy") -> str:
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}: larger than {MAX_POLICY_BYTES // (1024 * 1024)} MiB; a {what} is a short text "
                          "file: give the right file, or split it")
    if b"\x00" in data:
        raise PolicyError(f"{path}: binary data (a NUL byte at offset {data.index(0)}), not a {what}; give a TOML "
                          "policy or an OCI seccomp profile (JSON text)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None


def extends_problem(chain: Sequence[Path], target: Path) -> str | None:
    """Why loading ``target`` while ``chain`` (outermost first) is being loaded cannot end, or None."""
    if target in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(target):], target))
        return f"{chain[-1]}: extends: a cycle ({loop}); remove the extends that points back"
    if len(chain) >= MAX_EXTENDS_DEPTH:
        return (f"{chain[-1]}: extends: more than {MAX_EXTENDS_DEPTH} levels of extends; extend a policy nearer "
                "the baseline")
    return None


def rule_floor_problem(policy: Policy) -> str | None:
    """A policy with more distinct rules in one filter than a program can hold, or None (pure, cheap).

    The refusals (``deny``, ``arg_rules``) all go into one filter (the main filter, or an allowlist's
    deny filter), and an allowlist's own filter holds every allowed call as well; libseccomp emits at
    least one conditional jump per distinct syscall and per distinct argument comparison."""
    seccomp = policy.seccomp
    denied = set(seccomp.deny)
    refusals = len(denied) + len({(r.syscall, r.arg, r.op, r.value, r.mask) for r in seccomp.arg_rules
                                  if r.syscall not in denied})
    allowed = set(seccomp.allow) | set(seccomp.enosys)
    allows = len(allowed) + len({(r.syscall, r.arg, r.op, r.value, r.mask) for r in seccomp.allow_rules
                                 if r.syscall not in allowed})
    floor, table = (refusals, "seccomp.deny and seccomp.arg_rules")
    if seccomp.is_allowlist and allows + refusals > floor:
        floor, table = (allows + refusals, "seccomp.allow, allow_rules and the refusals")
    if floor <= BPF_MAXINSNS:
        return None
    return (f"{policy.source}: {table}: {floor} distinct rules need at least {floor} BPF instructions in one "
            f"filter, over the kernel's limit of {BPF_MAXINSNS} per seccomp program (BPF_MAXINSNS); "
            f"{_FEWER_RULES}")


def program_size_problem(source: str, mode: str, programs: Sequence[bytes]) -> str | None:
    """Compiled programs (load order) the kernel would refuse to load, or None."""
    lengths = [len(program) // 8 for program in programs]  # struct sock_filter is 8 bytes
    for index, length in enumerate(lengths):
        if length > BPF_MAXINSNS:
            return (f"{source}: filter {index + 1} of {len(lengths)} compiles to {length} BPF instructions in "
                    f"{mode} mode, over the kernel's limit of {BPF_MAXINSNS} per seccomp program (BPF_MAXINSNS; "
                    f"the kernel answers EINVAL); {_FEWER_RULES}")
    total = sum(length + FILTER_OVERHEAD_INSNS for length in lengths)
    if total > MAX_INSNS_PER_PATH:
        return (f"{source}: its {len(lengths)} filters total {total} instructions in {mode} mode (4 more per "
                f"filter), over the kernel's limit of {MAX_INSNS_PER_PATH} (MAX_INSNS_PER_PATH; the kernel "
                f"answers ENOMEM); {_FEWER_RULES}")
    return None
