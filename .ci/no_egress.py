#!/usr/bin/env python3
"""Run a command and prove none of its packets left loopback: ``no_egress.py -- CMD ARGS...``.

The command runs in a cgroup (v2) of its own, created for this run. Before it starts, an nftables table
of its own in the current network namespace counts every packet whose socket belongs to that cgroup
(``socket cgroupv2``: a socket is tagged with its creator's cgroup, inherited by every process the
command forks) and whose output interface is not ``lo``. Afterwards the counter must read 0; otherwise
this exits 3 naming the count, even when the command itself passed.

Scope, honestly: the hook sees packets sent from sockets in *this* network namespace (the host's, in CI).
Sockets the harness opens inside the lab or a sandbox's namespace live in namespaces with no link to the
host (no veth, no route out), so their packets cannot reach a host interface at all. Other processes'
traffic on a shared machine is not counted, which is why the count can be required to be exactly 0.

Needs root, nftables and a cgroup v2 hierarchy (pure or hybrid: ``/sys/fs/cgroup`` or
``/sys/fs/cgroup/unified``); a host without them exits 2 with one line saying which is missing, never
runs the command unchecked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

NFT_ROOT = Path("/sys/fs/cgroup")  # nftables resolves a cgroupv2 path relative to this directory


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, if it is under /sys/fs/cgroup (nft needs that)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            mount = Path(fields[1])
            if mount == NFT_ROOT or NFT_ROOT in mount.parents:
                return mount
    return None


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)


def packets_counted(table: str) -> int:
    listing = subprocess.run(["nft", "list", "table", "inet", table], text=True, check=True,
                             capture_output=True).stdout
    return sum(int(count) for count in re.findall(r"counter packets (\d+)", listing))


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("usage: no_egress.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    root = cgroup2_root()
    missing = [what for what, ok in (("root", os.geteuid() == 0), ("nft", shutil.which("nft") is not None),
                                     ("a cgroup v2 mount under /sys/fs/cgroup", root is not None)) if not ok]
    if missing:
        print(f"no_egress: cannot check egress here (missing: {', '.join(missing)}); the command was not run",
              file=sys.stderr)
        return 2
    assert root is not None
    name = f"pytest-sandbox-noegress-{os.getpid()}"
    group = root / name
    table = name.replace("-", "_")
    group.mkdir()
    try:
        nft(f"""table inet {table} {{
    chain out {{
        type filter hook output priority -300; policy accept;
        socket cgroupv2 level 1 "{group.relative_to(NFT_ROOT)}" oifname != "lo" counter
    }}
}}
""")
        try:
            def enter_group() -> None:
                (group / "cgroup.procs").write_text("0")

            returncode = subprocess.run(command, preexec_fn=enter_group).returncode
            leaked = packets_counted(table)
        finally:
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
    finally:
        # Stragglers the command left behind are moved out so the group can go.
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        try:
            group.rmdir()
        except OSError as error:
            print(f"no_egress: could not remove {group}: {error}", file=sys.stderr)
    if leaked:
        print(f"no_egress: FAILED: {leaked} packet(s) from the command left through a non-loopback interface",
              file=sys.stderr)
        return 3
    print("no_egress: 0 packets from the command left through a non-loopback interface", file=sys.stderr)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv))
