"""OCI / Docker seccomp profiles (the JSON runc, Docker, Podman and Kubernetes use) as policies.

A profile can be the reference sandbox's policy (``--sandbox-policy profile.json``) or a requirement
(``--sandbox-require profile.json``: everything it refuses must be proven refused). The shape is
syscalls.md §6: ``defaultAction``, ``defaultErrnoRet``, ``architectures`` or moby's ``archMap``, and
``syscalls`` rules with ``names``, ``action``, ``errnoRet``, ``args`` and moby's ``includes``/``excludes``.

What is supported, and why the rest is refused with a clear error rather than approximated:
- actions SCMP_ACT_ALLOW and SCMP_ACT_ERRNO (the errno of unconditional denies must be one value;
  errno 38 (ENOSYS) becomes an ENOSYS rule, Docker's clone3 trick);
- at most one argument condition per rule (our rules test one argument; a rule with several is ANDed
  and cannot be expressed as one);
- moby's ``includes.caps`` rules apply only to containers holding those capabilities, so they are left
  out (the stricter reading); ``excludes.caps`` rules are kept; ``includes``/``excludes`` ``arches`` are
  honoured for x86_64; ``minKernel`` is assumed satisfied;
- names libseccomp does not know are skipped in ALLOW rules (nothing to allow) and refused in deny rules.
SCMP_ACT_KILL*/TRAP/TRACE/LOG/NOTIFY are refused: NOTIFY is not a security boundary (TOCTOU), and the
others have no equivalent in this policy model yet.
"""

from __future__ import annotations

import errno as errno_module
import json
from collections import Counter
from pathlib import Path
from typing import Any

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.policy.model import MAX_ERRNO, ArgRule, NetworkPolicy, Policy, SeccompPolicy, resolve_native_syscall

OPERATORS = {"SCMP_CMP_NE": "ne", "SCMP_CMP_LT": "lt", "SCMP_CMP_LE": "le", "SCMP_CMP_EQ": "eq",
             "SCMP_CMP_GE": "ge", "SCMP_CMP_GT": "gt", "SCMP_CMP_MASKED_EQ": "masked_eq"}
EXTRA_ARCHES = {"SCMP_ARCH_X86": "x86", "SCMP_ARCH_X32": "x32"}
NATIVE_ARCHES = ("SCMP_ARCH_X86_64", "amd64", "x86_64")


def load_oci_profile(path: Path) -> Policy:
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); an OCI seccomp profile "
                          "is a JSON object") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the profile ({exc.strerror})") from None
    return _ProfileConverter(path).convert(document)


class _ProfileConverter:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.path}: {where}: {message}")

    def convert(self, document: Any) -> Policy:
        if not isinstance(document, dict):
            raise self.fail("(top level)", "an OCI seccomp profile is a JSON object with defaultAction and syscalls")
        if "defaultAction" not in document:
            raise self.fail("defaultAction", "missing; use SCMP_ACT_ALLOW (denylist) or SCMP_ACT_ERRNO (allowlist)")
        default = self.action(document["defaultAction"], "defaultAction")
        default_errno = self.errno(document.get("defaultErrnoRet", errno_module.EPERM), "defaultErrnoRet")
        allow: list[str] = []
        allow_rules: list[ArgRule] = []
        deny: Counter[tuple[str, int]] = Counter()
        enosys: list[str] = []
        arg_rules: list[ArgRule] = []
        for index, rule in enumerate(self.as_list(document.get("syscalls", []), "syscalls")):
            where = f"syscalls[{index}]"
            if not isinstance(rule, dict):
                raise self.fail(where, "each rule is an object with names and action")
            if not self.applies_here(rule, where):
                continue
            action = self.action(rule.get("action"), f"{where}.action")
            number = self.errno(rule.get("errnoRet", default_errno), f"{where}.errnoRet")
            conditions = self.as_list(rule.get("args") or [], f"{where}.args")
            if len(conditions) > 1:
                raise self.fail(f"{where}.args", "more than one argument condition in a rule (ANDed) is not "
                                                 "supported; split the profile or use a TOML policy")
            for name in self.names(rule, where, skip_unknown=action == "allow"):
                if conditions:
                    parsed = self.condition(name, conditions[0], f"{where}.args[0]", number if action == "errno"
                                            else None)
                    (allow_rules if action == "allow" else arg_rules).append(parsed)
                elif action == "allow":
                    allow.append(name)
                elif number == errno_module.ENOSYS:
                    enosys.append(name)
                else:
                    deny[(name, number)] += 1
        deny_errnos = {number for _, number in deny}
        if len(deny_errnos) > 1:
            raise self.fail("syscalls", f"unconditional denies use several errnos {sorted(deny_errnos)}; this "
                                        "policy model gives them one errno")
        seccomp = SeccompPolicy(
            default_action=default, default_errno=default_errno,
            errno=deny_errnos.pop() if deny_errnos else default_errno,
            extra_arches=self.arches(document), deny=tuple(dict.fromkeys(n for n, _ in deny)),
            enosys=tuple(dict.fromkeys(enosys)), arg_rules=tuple(dict.fromkeys(arg_rules)),
            allow=tuple(dict.fromkeys(n for n in allow if n not in enosys)),
            allow_rules=tuple(dict.fromkeys(allow_rules)),
        )
        if default == "allow" and (seccomp.allow or seccomp.allow_rules):
            seccomp = SeccompPolicy(**{**seccomp.__dict__, "allow": (), "allow_rules": ()})
        # A profile says nothing about the network: the socket() rules come from its own syscalls.
        return Policy(self.path.stem, str(self.path), "OCI seccomp profile", seccomp, NetworkPolicy(mode="allow"),
                      origin="oci")

    # -- pieces ----------------------------------------------------------------------------------

    def as_list(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be a list, got {type(value).__name__}")
        return value

    def action(self, value: Any, where: str) -> str:
        mapping = {"SCMP_ACT_ALLOW": "allow", "SCMP_ACT_ERRNO": "errno"}
        if value in mapping:
            return mapping[value]
        if value in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
                     "SCMP_ACT_TRACE", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY"):
            raise self.fail(where, f"{value} is not supported (only SCMP_ACT_ALLOW and SCMP_ACT_ERRNO); "
                                   "a NOTIFY rule is not a security boundary")
        raise self.fail(where, f"unknown action {value!r}")

    def errno(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ERRNO:
            raise self.fail(where, f"{value!r} is not an errno in 1..{MAX_ERRNO} (0 makes a refusal look like success; "
                                   "libseccomp refuses 4095)")
        return value

    def applies_here(self, rule: dict[str, Any], where: str) -> bool:
        includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
        if not isinstance(includes, dict) or not isinstance(excludes, dict):
            raise self.fail(where, "includes/excludes must be objects")
        if includes.get("caps"):
            return False  # granted only to containers holding those capabilities
        arches = includes.get("arches")
        if arches and not any(a in NATIVE_ARCHES for a in arches):
            return False
        return not any(a in NATIVE_ARCHES for a in excludes.get("arches") or [])

    def names(self, rule: dict[str, Any], where: str, *, skip_unknown: bool) -> list[str]:
        names = rule.get("names", [rule["name"]] if "name" in rule else None)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self.fail(f"{where}.names", "must be a list of syscall names")
        known = [n for n in names if resolve_native_syscall(n) is not None]
        unknown = [n for n in names if n not in known]
        if unknown and not skip_unknown:
            raise self.fail(f"{where}.names", f"unknown syscall(s) {unknown} in a deny rule; a refusal that "
                                              "cannot be compiled would silently not exist")
        return known

    def condition(self, name: str, condition: Any, where: str, number: int | None) -> ArgRule:
        if not isinstance(condition, dict):
            raise self.fail(where, "must be an object with index, value, valueTwo and op")
        op = OPERATORS.get(str(condition.get("op")))
        if op is None:
            raise self.fail(f"{where}.op", f"unknown operator {condition.get('op')!r}; use one of {sorted(OPERATORS)}")
        index, value = condition.get("index"), condition.get("value")
        if not isinstance(index, int) or not 0 <= index <= 5 or not isinstance(value, int) or value < 0:
            raise self.fail(where, "index must be 0..5 and value a non-negative integer")
        if op == "masked_eq":
            # OCI: value is the mask, valueTwo the required (arg & mask)
            return ArgRule(name, index, op, int(condition.get("valueTwo", 0)), mask=value & 0xFFFFFFFF,
                           errno=number, why="from OCI profile")
        return ArgRule(name, index, op, value, errno=number, why="from OCI profile")

    def arches(self, document: dict[str, Any]) -> tuple[str, ...]:
        found: list[str] = list(document.get("architectures") or [])
        for entry in document.get("archMap") or []:
            if entry.get("architecture") in NATIVE_ARCHES:
                found += entry.get("subArchitectures") or []
        return tuple(dict.fromkeys(EXTRA_ARCHES[a] for a in found if a in EXTRA_ARCHES))
