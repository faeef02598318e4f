"""Who a probe runner ran as (its own report from inside the target), and whether a baseline matched. Pure.

The kernel answers the same call differently for different callers, before any filter matters:
fsopen, fsmount, fspick, move_mount, pivot_root and the other ``*`` rows of syscalls.md §2 give EPERM
to a caller without CAP_SYS_ADMIN; capabilities count only in the caller's user namespace
(user_namespaces(7)); a process in a namespace of its own sees other objects. So an unfiltered
baseline proves that a refusal came from a filter only when it ran as the same caller as the target
(syscalls.md §4: "the same arguments, uid and ABI"): the same uids, gids and groups, the same
effective and bounding capability sets, the same no_new_privs, and per namespace type the same
kind of namespace (the harness's own, or a private one; in a private user namespace, the same id
maps). The runner reports all of this once per run (:func:`pytest_sandbox.probes.syscall_runner.whoami`);
this module parses it, says what a matching baseline must look like, and lists what still differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The namespace types a process's own /proc/self/ns shows (namespaces(7)); the *_for_children links
# describe children, not the process. Each can change what a call answers: user (whose capabilities),
# mnt (which mounts), pid (which processes), net (which sockets), ipc, uts, cgroup, time.
NAMESPACE_TYPES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")


def _int_list(text: object) -> tuple[int, ...]:
    return tuple(int(word) for word in str(text).split())


def _hex(text: object) -> int | None:
    try:
        return int(str(text), 16)
    except ValueError:
        return None


def _number(text: object) -> int | None:
    try:
        return int(str(text))
    except ValueError:
        return None


@dataclass(frozen=True)
class ObservedIdentity:
    """One runner's report about itself. ``None`` means the field could not be read (see ``unreadable``)."""

    uids: tuple[int, ...]  # real, effective, saved, filesystem (proc(5) "Uid:")
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    cap_effective: int | None
    cap_permitted: int | None
    cap_bounding: int | None
    cap_inheritable: int | None
    cap_ambient: int | None
    no_new_privs: int | None
    seccomp: int | None  # 0 none, 1 strict, 2 filter (proc(5) "Seccomp:")
    seccomp_filters: int | None
    namespaces: tuple[tuple[str, str], ...]  # ("mnt", "mnt:[4026532177]")
    uid_map: str | None
    gid_map: str | None
    setgroups: str | None
    unreadable: tuple[str, ...] = ()

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> ObservedIdentity:
        """Parse the runner's ``identity`` record; a malformed field becomes ``unreadable``, never an exception."""
        problems: list[str] = [str(p) for p in report.get("unreadable", ()) if isinstance(p, str)]
        status = report.get("status") if isinstance(report.get("status"), Mapping) else {}
        assert isinstance(status, Mapping)

        def ids(field: str, fallback: Any) -> tuple[int, ...]:
            try:
                return _int_list(status[field]) if field in status else _int_list(" ".join(map(str, fallback)))
            except (TypeError, ValueError):
                problems.append(f"/proc/self/status: {field} is not a list of ids")
                return ()

        if not status and not any(p.startswith("/proc/self/status") for p in problems):
            problems.append("/proc/self/status: no fields reported")

        def field(name: str, parse: Any) -> int | None:
            if name not in status:
                if status:  # when the file was unreadable, that one reason says it all
                    problems.append(f"/proc/self/status: no {name} field")
                return None
            value = parse(status[name])
            if value is None:
                problems.append(f"/proc/self/status: unreadable {name} value {status[name]!r}")
            return value  # type: ignore[no-any-return]

        uids = ids("Uid", report.get("resuid") or ())
        gids = ids("Gid", report.get("resgid") or ())
        groups = ids("Groups", report.get("groups") or ())
        namespaces = report.get("namespaces") if isinstance(report.get("namespaces"), Mapping) else {}
        files = report.get("files") if isinstance(report.get("files"), Mapping) else {}
        assert isinstance(namespaces, Mapping) and isinstance(files, Mapping)
        missing = [kind for kind in NAMESPACE_TYPES if kind not in namespaces]
        if missing and not any(p.startswith("/proc/self/ns") for p in problems):
            problems.append(f"/proc/self/ns: no {', '.join(missing)}")
        return cls(
            uids=uids, gids=gids, groups=tuple(sorted(groups)),
            cap_effective=field("CapEff", _hex), cap_permitted=field("CapPrm", _hex),
            cap_bounding=field("CapBnd", _hex), cap_inheritable=field("CapInh", _hex),
            cap_ambient=field("CapAmb", _hex), no_new_privs=field("NoNewPrivs", _number),
            seccomp=field("Seccomp", _number), seccomp_filters=field("Seccomp_filters", _number),
            namespaces=tuple(sorted((str(k), str(v)) for k, v in namespaces.items())),
            uid_map=str(files["uid_map"]) if "uid_map" in files else None,
            gid_map=str(files["gid_map"]) if "gid_map" in files else None,
            setgroups=str(files["setgroups"]) if "setgroups" in files else None,
            unreadable=tuple(problems),
        )

    @property
    def euid(self) -> int | None:
        return self.uids[1] if len(self.uids) > 1 else None

    @property
    def egid(self) -> int | None:
        return self.gids[1] if len(self.gids) > 1 else None

    def namespace(self, kind: str) -> str | None:
        return dict(self.namespaces).get(kind)

    def private_namespaces(self, harness: ObservedIdentity) -> tuple[str, ...]:
        """The namespace types in which this process is not where the harness is."""
        return tuple(kind for kind in NAMESPACE_TYPES
                     if self.namespace(kind) is not None and self.namespace(kind) != harness.namespace(kind))

    def test_name(self, harness: ObservedIdentity, all_caps: int) -> str:
        """A test-id word for who ran the probes: ``uid65534-nocaps``, ``uid0-allcaps-userns``,
        ``uid0-caps1fffeffffff`` (the exact effective set when it is neither empty nor complete)."""
        parts = [f"uid{self.euid}"]
        if self.egid != self.euid:
            parts.append(f"gid{self.egid}")
        if self.cap_effective is None:
            parts.append("capsunknown")
        elif self.cap_effective == 0:
            parts.append("nocaps")
        elif self.cap_effective & all_caps == all_caps:
            parts.append("allcaps")
        else:
            parts.append(f"caps{self.cap_effective:x}")
        if "user" in self.private_namespaces(harness):
            parts.append("userns")
        return "-".join(parts)

    def describe(self, harness: ObservedIdentity | None = None) -> str:
        """One line for a failure message or the report."""
        def caps(value: int | None) -> str:
            return "unknown" if value is None else f"{value:#x}"

        text = (f"uid {_ids(self.uids)}, gid {_ids(self.gids)}, groups [{', '.join(map(str, self.groups))}], "
                f"effective caps {caps(self.cap_effective)}, bounding {caps(self.cap_bounding)}, "
                f"NoNewPrivs {self.no_new_privs}, Seccomp {self.seccomp} ({self.seccomp_filters} filters)")
        if harness is not None:
            private = self.private_namespaces(harness)
            text += f", private namespaces: {', '.join(private) if private else 'none'}"
        return text


def _ids(values: tuple[int, ...]) -> str:
    return "/".join(map(str, values)) if len(set(values)) > 1 else (str(values[0]) if values else "unknown")


@dataclass(frozen=True)
class BaselineRequest:
    """What the launcher must do so that an unfiltered baseline runs as the target's caller.

    ``None`` fields mean "as the harness already is". ``fresh_namespaces`` are entered (unshared) before
    privileges are dropped; when a user namespace is among them, ``uid_map``/``gid_map``/``setgroups``
    are written for it and ``uid``/``gid`` are ids inside it, while ``groups`` are ids outside it (they
    are set before the namespace exists).
    """

    name: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    capabilities: int | None = None
    bounding: int | None = None
    no_new_privs: bool = False
    fresh_namespaces: tuple[str, ...] = ()
    uid_map: str | None = None
    gid_map: str | None = None
    setgroups: str | None = None
    problems: tuple[str, ...] = ()


def map_to_outside(ids: tuple[int, ...], id_map: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Translate ids seen inside a user namespace to the parent's, through a ``uid_map``/``gid_map`` text
    ("inside outside count" triples). Returns (translated, unmapped)."""
    numbers = _int_list(id_map)
    ranges = [numbers[i:i + 3] for i in range(0, len(numbers) - len(numbers) % 3, 3)]
    translated, unmapped = [], []
    for value in ids:
        for inside, outside, count in ranges:
            if inside <= value < inside + count:
                translated.append(outside + value - inside)
                break
        else:
            unmapped.append(value)
    return tuple(translated), tuple(unmapped)


def baseline_request(target: ObservedIdentity, harness: ObservedIdentity, all_caps: int) -> BaselineRequest:
    """The baseline that runs as ``target`` (pure: the launcher carries it out, the runner reports the result)."""
    name = target.test_name(harness, all_caps)
    problems = [f"the target could not report {what}" for what in target.unreadable]
    fresh = target.private_namespaces(harness)
    in_userns = "user" in fresh
    same_caller = (target.uids == harness.uids and target.gids == harness.gids and target.groups == harness.groups
                   and target.cap_effective == harness.cap_effective
                   and target.cap_bounding == harness.cap_bounding)
    if same_caller and not in_userns:
        return BaselineRequest(name, no_new_privs=target.no_new_privs == 1, fresh_namespaces=fresh,
                               problems=tuple(problems))
    if len(set(target.uids)) > 1 or len(set(target.gids)) > 1:
        problems.append(f"the target's real, effective and saved ids differ (uid {_ids(target.uids)}, "
                        f"gid {_ids(target.gids)}); the baseline sets them all to the effective id")
    groups = target.groups
    if in_userns:
        if target.uid_map is None or target.gid_map is None:
            problems.append("the target is in a private user namespace whose id maps could not be read")
        else:
            groups, unmapped = map_to_outside(target.groups, target.gid_map)
            if unmapped:
                problems.append(f"groups {list(unmapped)} are not mapped out of the target's user namespace")
    return BaselineRequest(
        name, uid=target.euid, gid=target.egid, groups=groups,
        capabilities=target.cap_effective, bounding=target.cap_bounding,
        no_new_privs=target.no_new_privs == 1, fresh_namespaces=fresh,
        uid_map=target.uid_map if in_userns else None, gid_map=target.gid_map if in_userns else None,
        setgroups=target.setgroups if in_userns else None, problems=tuple(problems),
    )


def identity_mismatches(target: ObservedIdentity, baseline: ObservedIdentity, harness: ObservedIdentity,
                        names: tuple[str, str] = ("target", "baseline")) -> tuple[str, ...]:
    """Everything that can change a call's answer and differs between the target's run and the baseline's.

    Compared: all uids and gids, groups, the effective and bounding capability sets (the kernel's
    checks read the effective set; the bounding set limits what an execve may gain), no_new_privs, and
    per namespace type whether it is the harness's or private (with the id maps of a private user
    namespace). Not compared: permitted, inheritable and ambient sets (no check reads them) and the
    contents of private namespaces (a fresh mount namespace is a copy of the harness's, not the target's).
    """
    first, second = names
    problems = [f"the {first} could not report {what}" for what in target.unreadable]
    problems += [f"the {second} could not report {what}" for what in baseline.unreadable]

    def differ(what: str, mine: object, theirs: object) -> None:
        if mine != theirs:
            problems.append(f"{what}: {first} {mine}, {second} {theirs}")

    differ("uid", _ids(target.uids), _ids(baseline.uids))
    differ("gid", _ids(target.gids), _ids(baseline.gids))
    differ("groups", list(target.groups), list(baseline.groups))
    for what, mine, theirs in (("effective capabilities", target.cap_effective, baseline.cap_effective),
                               ("bounding capabilities", target.cap_bounding, baseline.cap_bounding)):
        differ(what, "unknown" if mine is None else f"{mine:#x}", "unknown" if theirs is None else f"{theirs:#x}")
    differ("NoNewPrivs", target.no_new_privs, baseline.no_new_privs)
    target_private, baseline_private = target.private_namespaces(harness), baseline.private_namespaces(harness)
    for kind in NAMESPACE_TYPES:
        if (kind in target_private) != (kind in baseline_private):
            where = {True: "private", False: "the harness's"}
            problems.append(f"{kind} namespace: {first} in {where[kind in target_private]}, "
                            f"{second} in {where[kind in baseline_private]}")
    if "user" in target_private and "user" in baseline_private:
        differ("uid_map", target.uid_map, baseline.uid_map)
        differ("gid_map", target.gid_map, baseline.gid_map)
        differ("setgroups", target.setgroups, baseline.setgroups)
    return tuple(problems)
