"""A pytest plugin for the survivor tests (``-p survivor_pause``, tests/ on PYTHONPATH).

Before the last selected test is torn down (the lab, the proxy under test, the spawners and the CA
directory are all up), it writes to ``$SANDBOX_SURVIVOR_READY`` what the session is running: every
process carrying ``$SANDBOX_SURVIVOR_MARKER`` in its environment, the namespaces they are in that the
pytest process is not, and the entries of the temporary directory. With ``$SANDBOX_SURVIVOR_PAUSE``
it then sleeps that many seconds, so the session can be killed right there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from proc_scan import processes_carrying

MARKER_VARIABLE = "SANDBOX_SURVIVOR_MARKER"
NAMESPACE_KINDS = ("net", "mnt", "pid", "user", "uts", "ipc")


def marked_processes(marker: str) -> list[int]:
    """Every process whose environment or command line holds ``marker``."""
    return processes_carrying(marker, sources=("environ", "cmdline"))


def namespaces_of(pid: int | str) -> set[str]:
    links = set()
    for kind in NAMESPACE_KINDS:
        try:
            links.add(os.readlink(f"/proc/{pid}/ns/{kind}"))
        except OSError:
            continue
    return links


def uptime() -> float:
    with open("/proc/uptime") as handle:
        return float(handle.read().split()[0])


def _started_after(pid: str, moment: float) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return True
    start_ticks = int(stat[stat.rfind(b")") + 2:].split()[19])  # field 22, starttime (proc(5))
    return start_ticks / os.sysconf("SC_CLK_TCK") > moment


def namespace_holders(links: set[str], since: float = 0.0) -> dict[str, list[str]]:
    """Which processes still hold any of ``links`` (``net:[4026...]``), as a member or by an open fd.

    The kernel reuses a freed namespace's inode number for a new namespace, and other sessions on the
    host create namespaces all the time: a process started after ``since`` (seconds of uptime, when
    ``links`` were recorded) cannot have been in those namespaces unless one that was still holds it,
    so it is left out.
    """
    holders: dict[str, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (since and _started_after(entry, since)):
            continue
        held = namespaces_of(entry) & links
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with_link = os.readlink(f"/proc/{entry}/fd/{fd}")
                if with_link in links:
                    held.add(with_link)
        except OSError:
            pass
        for link in held:
            holders.setdefault(link, []).append(entry)
    return holders


def snapshot(marker: str) -> dict[str, Any]:
    ours = namespaces_of("self")
    pids = marked_processes(marker)
    foreign = set()
    for pid in pids:
        foreign |= namespaces_of(pid) - ours
    commands = {}
    for pid in pids:
        try:
            commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return {"pytest": os.getpid(), "processes": commands, "namespaces": sorted(foreign), "uptime": uptime()}


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    ready = os.environ.get("SANDBOX_SURVIVOR_READY")
    if not ready or nextitem is not None:
        return
    state = snapshot(os.environ[MARKER_VARIABLE])
    state["temp"] = sorted(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    Path(ready + ".tmp").write_text(json.dumps(state))
    os.rename(ready + ".tmp", ready)
    time.sleep(float(os.environ.get("SANDBOX_SURVIVOR_PAUSE", "0")))
