"""A ``--sandbox-proxy-cmd`` that daemonises, as tinyproxy without ``-d`` and squid without ``-N`` do.

``python daemonising_proxy.py ADDRESS PORT``: the command forks and exits at once; the child
``setsid()``\\ s and forks again, and the grandchild (re-parented away from the command, in its own
session) execs the reference proxy on ADDRESS:PORT. Nothing that stops "the command's PID" can stop
it: only something that follows what the command forked (the guardian) can.

``python daemonising_proxy.py --tinyproxy CONF_DIR ADDRESS PORT`` writes a tinyproxy configuration and
execs ``tinyproxy -c CONF`` without ``-d``: the real proxy daemonises itself. ``--squid CONF_DIR
ADDRESS PORT`` does the same with ``squid -f CONF`` without ``-N`` (a master and a worker in the
background).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

TREE = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, TREE)  # run as a command: the tree under test


def _daemonise() -> None:
    if os.fork() > 0:
        os._exit(0)  # the command "succeeds" at once
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--tinyproxy"]:
        from pytest_sandbox.network.third_party import tinyproxy_conf_text

        conf_dir, address, port = Path(argv[1]), argv[2], int(argv[3])
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf = conf_dir / f"tinyproxy-{port}.conf"
        conf.write_text(tinyproxy_conf_text(port, conf_dir / f"tinyproxy-{port}.pid", address=address))
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        os.execv(binary, [binary, "-c", str(conf)])
    if argv[:1] == ["--squid"]:
        from pytest_sandbox.network.third_party import squid_conf_text

        state_dir, address, port = Path(argv[1]) / f"squid-{argv[3]}", argv[2], int(argv[3])
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o777)  # squid started as root writes its pid and log as its own user
        conf = state_dir / "squid.conf"
        conf.write_text(squid_conf_text(port, state_dir, address=address))
        binary = shutil.which("squid") or "/usr/sbin/squid"
        os.execv(binary, [binary, "-f", str(conf)])
    address, port = argv[0], argv[1]
    _daemonise()
    tree_first = os.pathsep.join(filter(None, [TREE, os.environ.get("PYTHONPATH")]))
    os.execve(sys.executable, [sys.executable, "-m", "pytest_sandbox.network.third_party", "reference",
                               "--host", address, "--port", port, "--allow-port", "80", "--allow-port", "443",
                               "--allow-port", port], {**os.environ, "PYTHONPATH": tree_first})
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
