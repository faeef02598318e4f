"""OCI / Docker seccomp profiles (the JSON runc, Docker, Podman and Kubernetes use) as policies.

A profile can be the reference sandbox's policy (``--sandbox-policy profile.json``) or a requirement
(``--sandbox-require profile.json``: everything it refuses must be proven refused). The shape is
syscalls.md §6: ``defaultAction``, ``defaultErrnoRet``, ``architectures`` or moby's ``archMap``, and
``syscalls`` rules with ``names``, ``action``, ``errnoRet``, ``args`` and moby's ``includes``/``excludes``.
The Security Profiles Operator's ``SeccompProfile`` resource (YAML, its ``spec`` is the same profile) is
accepted too. Files are told apart by content (a JSON object, or YAML with ``kind: SeccompProfile``), not
by their suffix.

A profile is enforced the way runc and crun enforce it (runc libcontainer/seccomp/seccomp_linux.go through
libseccomp), holes included, so that the suite shows what a runtime really runs:

- argument comparisons are 64-bit (libseccomp's EQ/MASKED_EQ on the whole register); our own TOML
  policies keep comparing the low 32 bits (model.py ``ArgRule``), which is safer, by design;
- several ``args`` on different indexes in one rule are ANDed (one libseccomp rule); several on the same
  index are ORed (runc then adds one rule per condition);
- names are resolved per architecture: a name libseccomp knows but an ABI lacks (getuid32, fstat64,
  _llseek, fcntl64 exist only on i386) is compiled where it exists and skipped elsewhere; a name libseccomp
  does not know at all is skipped as runc skips it, except in a rule that refuses something the default
  action would let through (there, skipping would silently open a hole: a PolicyError says so);
- actions: ALLOW, ERRNO (``errnoRet``, else EPERM: ``defaultErrnoRet`` is the default action's), KILL (= KILL_THREAD, as
  runc maps it), KILL_THREAD, KILL_PROCESS, TRAP, TRACE (no tracer attached: the kernel answers ENOSYS),
  LOG (the call goes through and is logged: compiled as ALLOW in rules, LOG as the default action).
  NOTIFY is refused: it hands the decision to a user-space agent (not a security boundary: TOCTOU), and
  this harness has no agent to hand it to;
- moby's ``includes``/``excludes`` are resolved as Docker and Podman resolve them before runc sees the
  profile: ``caps`` against a capability set (``--sandbox-caps``, default Docker's default set),
  ``arches`` for x86_64, ``minKernel`` against the running kernel.
"""

from __future__ import annotations

import errno as errno_module
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.policy.model import MAX_ERRNO, ArgRule, NetworkPolicy, Policy, SeccompPolicy

OPERATORS = {"SCMP_CMP_NE": "ne", "SCMP_CMP_LT": "lt", "SCMP_CMP_LE": "le", "SCMP_CMP_EQ": "eq",
             "SCMP_CMP_GE": "ge", "SCMP_CMP_GT": "gt", "SCMP_CMP_MASKED_EQ": "masked_eq"}
EXTRA_ARCHES = {"SCMP_ARCH_X86": "x86", "SCMP_ARCH_X32": "x32"}
NATIVE_ARCHES = ("SCMP_ARCH_X86_64", "amd64", "x86_64")
# runc's action table (libcontainer/seccomp/config.go): SCMP_ACT_KILL is libseccomp's ActKillThread.
ACTIONS = {"SCMP_ACT_ALLOW": "allow", "SCMP_ACT_ERRNO": "errno", "SCMP_ACT_KILL": "kill_thread",
           "SCMP_ACT_KILL_THREAD": "kill_thread", "SCMP_ACT_KILL_PROCESS": "kill_process", "SCMP_ACT_TRAP": "trap",
           "SCMP_ACT_TRACE": "trace", "SCMP_ACT_LOG": "log"}
# moby oci/caps/defaults.go: the capabilities a Docker container gets unless told otherwise.
DOCKER_DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                       "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                       "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
# include/uapi/linux/capability.h, CAP_CHOWN (0) .. CAP_CHECKPOINT_RESTORE (40)
ALL_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
            "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
            "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
            "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
            "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
            "CAP_CHECKPOINT_RESTORE")
CAPABILITY_SETS = {"docker-default": DOCKER_DEFAULT_CAPS, "none": (), "all": ALL_CAPS}
DEFAULT_CAPABILITY_SET = "docker-default"
SPO_KIND = "SeccompProfile"


def resolve_capabilities(caps: str | None) -> tuple[str, tuple[str, ...]]:
    """``--sandbox-caps``: a set name (docker-default, none, all) or a comma list of CAP_* names."""
    text = (caps or DEFAULT_CAPABILITY_SET).strip()
    if text in CAPABILITY_SETS:
        return text, CAPABILITY_SETS[text]
    names = tuple(dict.fromkeys(n.strip().upper() for n in text.split(",") if n.strip()))
    names = tuple(n if n.startswith("CAP_") else f"CAP_{n}" for n in names)
    unknown = [n for n in names if n not in ALL_CAPS]
    if unknown or not names:
        raise PolicyError(f"--sandbox-caps {text!r}: unknown capability {unknown or [text]}; give one of "
                          f"{', '.join(CAPABILITY_SETS)} or a comma list such as CAP_SYS_ADMIN,CAP_NET_RAW")
    return ",".join(names), names


def looks_like_oci_profile(path: Path) -> bool:
    """Content sniffing: a JSON object, or a YAML document of kind SeccompProfile (not a TOML policy)."""
    try:
        head = path.read_bytes()[:65536].decode("utf-8", errors="replace")
    except OSError:
        return False
    stripped = head.lstrip("\ufeff \t\r\n")
    if stripped.startswith("{"):
        return True
    return re.search(rf"^kind:\s*[\"']?{SPO_KIND}[\"']?\s*$", head, re.MULTILINE) is not None


def load_oci_profile(path: Path, caps: str | None = None) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the profile ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text; an OCI seccomp profile is JSON (or an SPO YAML resource)") from None
    if text.lstrip("\ufeff \t\r\n").startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); an OCI seccomp profile "
                              "is a JSON object") from None
    else:
        document = _spo_profile(path, text)
    set_name, capabilities = resolve_capabilities(caps)
    return _ProfileConverter(path, set_name, capabilities).convert(document)


def _spo_profile(path: Path, text: str) -> Any:
    """The ``spec`` of the one Security Profiles Operator SeccompProfile in ``text``."""
    try:
        import yaml
    except ImportError:
        raise PolicyError(f"{path}: a SeccompProfile YAML resource needs PyYAML (pip install pyyaml)") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    profiles = [d for d in documents if isinstance(d, dict) and d.get("kind") == SPO_KIND]
    if len(profiles) != 1:
        names = [str((d.get("metadata") or {}).get("name")) for d in profiles]
        raise PolicyError(f"{path}: holds {len(profiles)} SeccompProfile resources {names}; give a file with exactly "
                          "one (split the multi-document YAML)")
    spec = profiles[0].get("spec")
    if not isinstance(spec, dict):
        raise PolicyError(f"{path}: spec: the SeccompProfile has no spec object with defaultAction and syscalls")
    return spec


def _kernel_at_least(wanted: str) -> bool:
    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", text)[:3])

    return numbers(os.uname().release) >= numbers(wanted)


def _libseccomp_knows(name: str, arches: Iterable[str]) -> bool:
    """libseccomp resolves ``name`` on x86_64 or on one of the profile's extra ABIs (a pseudo-number,
    <= -100, means it knows the name but x86_64 lacks the call, e.g. getuid32: it is then compiled on
    i386 only, as seccomp_rule_add does)."""
    import pyseccomp

    if not name or not name.replace("_", "").isalnum():
        return False
    if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) != -1:
        return True
    mapping = {"x86": pyseccomp.Arch.X86, "x32": pyseccomp.Arch.X32}
    return any(pyseccomp.resolve_syscall(mapping[a], name) >= 0 for a in arches)


class _ProfileConverter:
    def __init__(self, path: Path, set_name: str, capabilities: tuple[str, ...]) -> None:
        self.path = path
        self.set_name = set_name
        self.capabilities = capabilities

    def fail(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.path}: {where}: {message}")

    def convert(self, document: Any) -> Policy:
        if not isinstance(document, dict):
            raise self.fail("(top level)", "an OCI seccomp profile is a JSON object with defaultAction and syscalls")
        if "defaultAction" not in document:
            raise self.fail("defaultAction", "missing; use SCMP_ACT_ALLOW (denylist) or SCMP_ACT_ERRNO (allowlist)")
        default = self.action(document["defaultAction"], "defaultAction")
        default_errno = self.errno(document.get("defaultErrnoRet", errno_module.EPERM), "defaultErrnoRet")
        arches = self.arches(document)
        allow: list[str] = []
        allow_rules: list[ArgRule] = []
        deny: Counter[tuple[str, str, int]] = Counter()
        enosys: list[str] = []
        arg_rules: list[ArgRule] = []
        for index, rule in enumerate(self.as_list(document.get("syscalls") or [], "syscalls")):
            where = f"syscalls[{index}]"
            if not isinstance(rule, dict):
                raise self.fail(where, "each rule is an object with names and action")
            if not self.applies_here(rule, where):
                continue
            action = self.action(rule.get("action"), f"{where}.action")
            if action == "log":
                action = "allow"  # SECCOMP_RET_LOG: the call goes through (and is logged)
            # runc getAction: a rule without errnoRet returns EPERM (defaultErrnoRet is the default's only)
            number = 0
            if action == "errno":
                number = self.errno(rule.get("errnoRet", errno_module.EPERM), f"{where}.errnoRet")
            groups = self.conditions(rule, where, action, number)
            opens_hole = action != "allow" and default in ("allow", "log")
            for name in self.names(rule, where, arches, refusing_over_allow=opens_hole):
                if action == default and (action != "errno" or number == default_errno):
                    continue  # the same as the default: libseccomp would refuse it (EACCES); runc skips it
                for parsed in (tuple(ArgRule(**{**r.__dict__, "syscall": name}) for r in groups) or (None,)):
                    if parsed is not None:
                        (allow_rules if action == "allow" else arg_rules).append(parsed)
                    elif action == "allow":
                        allow.append(name)
                    elif action == "errno" and number == errno_module.ENOSYS:
                        enosys.append(name)
                    else:
                        deny[(name, action, number)] += 1
        unconditional_errnos = Counter(n for (_, a, n) in deny if a == "errno")
        errno = unconditional_errnos.most_common(1)[0][0] if unconditional_errnos else default_errno
        denied = tuple(dict.fromkeys(name for name, _, _ in deny))
        seen: dict[str, tuple[str, int]] = {}
        for name, action, number in deny:
            if name in seen and seen[name] != (action, number):
                raise self.fail("syscalls", f"{name} is refused by two rules with different actions {seen[name]} "
                                            f"and {(action, number)}; libseccomp refuses that (EEXIST)")
            seen[name] = (action, number)
        seccomp = SeccompPolicy(
            default_action=default, default_errno=default_errno, errno=errno,
            extra_arches=arches, deny=denied,
            deny_actions=tuple((name, action, number) for name, (action, number) in seen.items()
                               if (action, number) != ("errno", errno)),
            enosys=tuple(dict.fromkeys(n for n in enosys if n not in denied)),
            arg_rules=tuple(dict.fromkeys(arg_rules)),
            allow=tuple(dict.fromkeys(n for n in allow if n not in enosys and n not in denied)),
            allow_rules=tuple(dict.fromkeys(allow_rules)),
        )
        if not seccomp.is_allowlist and (seccomp.allow or seccomp.allow_rules):
            # ALLOW rules under an ALLOW or LOG default change nothing a process can do (LOG only writes
            # an audit line for the call); they are left out.
            seccomp = SeccompPolicy(**{**seccomp.__dict__, "allow": (), "allow_rules": ()})
        description = f"OCI seccomp profile (includes/excludes.caps resolved for the {self.set_name} capability set)"
        # A profile says nothing about the network: the socket() rules come from its own syscalls.
        return Policy(self.path.stem, str(self.path), description, seccomp, NetworkPolicy(mode="allow"),
                      origin="oci", capabilities=self.capabilities, capability_set=self.set_name)

    # -- pieces ----------------------------------------------------------------------------------

    def as_list(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, got {type(value).__name__}")
        return value

    def action(self, value: Any, where: str) -> str:
        if value in ACTIONS:
            return ACTIONS[value]
        if value == "SCMP_ACT_NOTIFY":
            raise self.fail(where, "SCMP_ACT_NOTIFY is not supported: it hands each call to a user-space agent "
                                   "(not a security boundary: the agent reads arguments the caller can still "
                                   "change), and the reference sandbox has no agent; use SCMP_ACT_ERRNO")
        raise self.fail(where, f"unknown action {value!r}; use one of {', '.join(ACTIONS)}")

    def errno(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ERRNO:
            raise self.fail(where, f"{value!r} is not an errno in 1..{MAX_ERRNO} (0 makes a refusal look like success; "
                                   "libseccomp refuses 4095)")
        return value

    def applies_here(self, rule: dict[str, Any], where: str) -> bool:
        """moby's includes/excludes (profiles/seccomp/seccomp_linux.go): every included cap must be held,
        any excluded cap held drops the rule; arches for x86_64; minKernel against the running kernel."""
        includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
        if not isinstance(includes, dict) or not isinstance(excludes, dict):
            raise self.fail(where, "includes/excludes must be objects")
        if any(cap not in self.capabilities for cap in includes.get("caps") or []):
            return False
        if any(cap in self.capabilities for cap in excludes.get("caps") or []):
            return False
        arches = includes.get("arches")
        if arches and not any(a in NATIVE_ARCHES for a in arches):
            return False
        minimum = includes.get("minKernel")
        if minimum and not _kernel_at_least(str(minimum)):
            return False
        return not any(a in NATIVE_ARCHES for a in excludes.get("arches") or [])

    def names(self, rule: dict[str, Any], where: str, arches: tuple[str, ...], *,
              refusing_over_allow: bool) -> list[str]:
        names = rule.get("names", [rule["name"]] if "name" in rule else None)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self.fail(f"{where}.names", "must be a list of syscall names")
        known = [n for n in names if _libseccomp_knows(n, arches)]
        unknown = [n for n in names if n not in known]
        if unknown and refusing_over_allow:
            raise self.fail(f"{where}.names", f"unknown syscall(s) {unknown} in a deny rule; runc skips a name "
                                              "libseccomp does not know, so this refusal would silently not exist")
        return known

    def conditions(self, rule: dict[str, Any], where: str, action: str, number: int) -> tuple[ArgRule, ...]:
        """The rule's ``args`` as runc adds them: one ANDed rule, or one rule per condition when an index
        repeats (runc: "revert to old behavior"). Names are filled in by the caller."""
        raw = self.as_list(rule.get("args") or [], f"{where}.args")
        parsed = [self.condition(c, f"{where}.args[{i}]", action, number) for i, c in enumerate(raw)]
        if not parsed:
            return ()
        indexes = [c.arg for c in parsed]
        if len(set(indexes)) != len(indexes):
            return tuple(parsed)  # ORed: one rule each
        first, *rest = parsed
        return (ArgRule(**{**first.__dict__, "also": tuple(rest)}),)

    def condition(self, condition: Any, where: str, action: str, number: int) -> ArgRule:
        if not isinstance(condition, dict):
            raise self.fail(where, "must be an object with index, value, valueTwo and op")
        op = OPERATORS.get(str(condition.get("op")))
        if op is None:
            raise self.fail(f"{where}.op", f"unknown operator {condition.get('op')!r}; use one of {sorted(OPERATORS)}")
        index, value = condition.get("index"), condition.get("value")
        if not isinstance(index, int) or not 0 <= index <= 5 or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise self.fail(where, "index must be 0..5 and value an integer in 0..2**64-1")
        kind = "errno" if action == "allow" else action
        rule_errno = number if action == "errno" else None
        if op == "masked_eq":
            # OCI: value is the mask, valueTwo the required (arg & mask); 64 bits, as libseccomp compares
            datum = condition.get("valueTwo", 0)
            if not isinstance(datum, int) or not 0 <= datum < 1 << 64:
                raise self.fail(f"{where}.valueTwo", "must be an integer in 0..2**64-1")
            return ArgRule("", index, op, datum, mask=value, errno=rule_errno, why="from OCI profile", bits=64,
                           action=kind)
        return ArgRule("", index, op, value, errno=rule_errno, why="from OCI profile", bits=64, action=kind)

    def arch_names(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            raise self.fail(where, f"must be a list of architecture names such as [\"SCMP_ARCH_X86\"], not {value!r}")
        return value

    def arches(self, document: dict[str, Any]) -> tuple[str, ...]:
        found = list(self.arch_names(document.get("architectures") or [], "architectures"))
        arch_map = document.get("archMap") or []
        if not isinstance(arch_map, list) or not all(isinstance(entry, dict) for entry in arch_map):
            raise self.fail("archMap", "must be a list of objects such as {\"architecture\": \"SCMP_ARCH_X86_64\", "
                                       "\"subArchitectures\": [\"SCMP_ARCH_X86\"]}, not " + type(arch_map).__name__)
        for index, entry in enumerate(arch_map):
            subarches = self.arch_names(entry.get("subArchitectures") or [], f"archMap[{index}].subArchitectures")
            if entry.get("architecture") in NATIVE_ARCHES:
                found += subarches
        return tuple(dict.fromkeys(EXTRA_ARCHES[a] for a in found if a in EXTRA_ARCHES))


def runtime_profile(path: Path, caps: str | None = None) -> dict[str, Any]:
    """The profile as Docker hands it to runc (an OCI runtime-spec ``linux.seccomp`` object): includes and
    excludes resolved for the capability set, archMap turned into ``architectures`` for x86_64."""
    document = json.loads(path.read_text())
    _, capabilities = resolve_capabilities(caps)
    converter = _ProfileConverter(path, "", capabilities)
    arches = ["SCMP_ARCH_X86_64"]
    for entry in document.get("archMap") or []:
        if entry.get("architecture") in NATIVE_ARCHES:
            arches += entry.get("subArchitectures") or []
    arches += [a for a in document.get("architectures") or [] if a not in arches]
    resolved: dict[str, Any] = {"defaultAction": document["defaultAction"], "architectures": arches, "syscalls": []}
    if "defaultErrnoRet" in document:
        resolved["defaultErrnoRet"] = document["defaultErrnoRet"]
    for index, rule in enumerate(document.get("syscalls") or []):
        if converter.applies_here(rule, f"syscalls[{index}]"):
            resolved["syscalls"].append({k: v for k, v in rule.items() if k in ("names", "action", "errnoRet", "args")})
    return resolved
