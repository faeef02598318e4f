"""The egress category: a process sandboxed in proxy mode reaches nothing directly, only its proxy.

Probing "can it connect to 169.254.169.254?" from where the process runs proves nothing by
itself: in the private namespace the launcher is meant to create there is no route, so a refusal is
guaranteed, and in a namespace the harness did not make (the host's, if the launcher isolates
nothing) the attempt would send a real packet off the machine. So the category checks what a
process *can* reach wherever it ends up, and knows where it ended up:

* **where it runs**: the probe reports its own network namespace (``/proc/self/ns/net``), which the
  harness compares with the host's, the lab's and the one it made for the process;
* **the host's loopback**: the harness listens on 127.0.0.1 and ::1 in its own (host) namespace; a
  process that shares the host's namespace reaches them. Loopback never leaves the machine, so
  these are attempted from anywhere;
* **the lab**: a process placed in the lab namespace reaches the lab's catch-all canary (which sees
  every address and port there), and so would its dials to the loopback port above;
* **special-use and public lab destinations** (169.254.169.254, 10.0.0.1, fd00:ec2::254, 11.0.0.10,
  2600:9000::10): attempted only when the probe itself finds that it runs in a namespace the harness
  made (its own or the lab); elsewhere they are not attempted and judged on where it runs;
* **UDP**: the same destinations and the host's loopback again with one datagram each (a connected UDP socket:
  connect, send, then a short wait in which an ICMP port unreachable comes back as ECONNREFUSED), seen by UDP
  sockets of the harness's (:class:`HostListeners`, :class:`LabDatagramListeners`): a launcher whose filter
  refuses TCP and forgets UDP earns no BLOCKED. A datagram that left without error and met nothing is
  INDETERMINATE, never BLOCKED;
* **the positive control**: the proxy's address in the process's namespace (127.0.0.1:3128 of
  :class:`~pytest_sandbox.network.harness.ProxiedSandbox`), through which a request must reach a
  lab origin, so a launcher that breaks all networking does not score 100 %.

A direct attempt is BLOCKED only if connect(2) failed with an errno, no listener (host or lab) saw
it, and the probe ran in the namespace the harness made for it. Reaching anything, or running in
the host's or the lab's namespace, is ALLOWED; a timeout, a probe that did not run, or a namespace
nobody can vouch for is INDETERMINATE (a timeout is neither a refusal nor proof of isolation).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.netns import NetnsId
from pytest_sandbox.verdicts.egress import (
    PROXY_EXPECTED,
    PUBLIC_ORIGIN,
    EgressTarget,
    Namespaces,
    ProbeReport,
    TargetOutcome,
    judge_direct,
    judge_namespace,
    judge_proxy_control,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

__all__ = [
    "CONNECT_TIMEOUT_SECONDS",
    "DIRECT_TARGETS",
    "EGRESS_PROBE",
    "EgressEvidence",
    "EgressPlan",
    "HostListeners",
    "LabDatagramListeners",
    "Launcher",
    "host_loopback_target_id",
    "parse_report",
    "run_egress_probe",
]

CONNECT_TIMEOUT_SECONDS = 2.0
RUN_TIMEOUT_SECONDS = 20.0
PROXY_ADDRESS = ("127.0.0.1", 3128)
HOST_NETNS_PATH = "/proc/self/ns/net"


# Special-use and public lab destinations. TCP to port 80 (the lab's catch-all sees any port anyway); UDP to port
# 53, where a filter that stops TCP but leaves DNS open to any resolver lets a process tunnel data out in
# queries (MITRE ATT&CK T1071.004, T1048): the lab listens for those datagrams itself (LabDatagramListeners).
DIRECT_DESTINATIONS = (
    ("169.254.169.254", "metadata address"),
    ("10.0.0.1", "private 10/8 address"),
    ("fd00:ec2::254", "IPv6 metadata address"),
    ("11.0.0.10", "public lab origin"),
    ("2600:9000::10", "public IPv6 lab origin"),
)
UDP_PORT = 53
DIRECT_TARGETS: tuple[EgressTarget, ...] = (
    *(EgressTarget(f"direct-{address}", address, 80, what) for address, what in DIRECT_DESTINATIONS),
    *(EgressTarget(f"direct-udp-{address}-{UDP_PORT}", address, UDP_PORT, what, transport="udp")
      for address, what in DIRECT_DESTINATIONS),
)
# ip(7): IP_FREEBIND (15) is not in Python's socket module; it applies to IPv6 sockets too.
IP_FREEBIND = 15

# Runs inside the sandbox (python3 -S, stdlib only). Argument: a JSON plan. Prints one JSON line.
# The safety gate is here, in the process itself: a non-loopback destination (and the proxy, which
# would dial on its behalf) is attempted only if this process's own network namespace is one of
# those the harness made.
EGRESS_PROBE = r"""
import errno, json, os, socket, sys
plan = json.loads(sys.argv[1])
info = os.stat("/proc/self/ns/net")
netns = [info.st_dev, info.st_ino]
inside = netns in plan["harness_namespaces"]
report = {"netns": netns, "results": {}, "proxy": None}
for target in plan["targets"]:
    if not (target["loopback"] or inside):
        report["results"][target["id"]] = {"kind": "skipped"}
        continue
    family = socket.AF_INET6 if ":" in target["address"] else socket.AF_INET
    udp = target["transport"] == "udp"
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    sock.settimeout(plan["timeout"])
    stage = "connect"
    try:
        sock.connect((target["address"], target["port"]))
        stage = "send"
        sock.sendall(("EGRESS %s %s\r\n\r\n" % (plan["nonce"], target["id"])).encode())
        if udp:  # a connected UDP socket reports an ICMP unreachable as an errno of its next call
            stage = "recv"
            sock.recv(512)
        report["results"][target["id"]] = {"kind": "connected"}
    except socket.timeout:
        report["results"][target["id"]] = {"kind": "sent" if stage == "recv" else "timeout"}
    except OSError as e:
        report["results"][target["id"]] = {"kind": "errno", "errno": e.errno, "stage": stage}
    finally:
        sock.close()
if plan["proxy"] and inside:
    address, port = plan["proxy"]
    try:
        with socket.create_connection((address, port), timeout=plan["timeout"]) as sock:
            sock.sendall(plan["proxy_request"].encode())
            data = b""
            while len(data) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        fields = dict((k.strip().lower(), v.strip()) for k, _, v in (l.partition(":") for l in head[1:]))
        report["proxy"] = {"status_line": head[0], "origin": fields.get("x-lab-origin")}
    except OSError as e:
        report["proxy"] = {"error": "%s: %s" % (type(e).__name__, e)}
print(json.dumps(report))
"""


class Launcher(Protocol):
    """What runs the probe: the reference sandbox (or a deliberately broken stand-in in tests)."""

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> Any:
        """Run ``argv``; the result has ``returncode``, ``stdout`` and ``stderr`` (bytes)."""
        ...


def parse_report(returncode: int, stdout: bytes, stderr: bytes) -> ProbeReport:
    """The probe's JSON line, or a report saying why there is none."""
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        raw = json.loads(lines[-1]) if returncode == 0 and lines else None
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        tail = stderr.decode(errors="replace").strip()[-300:]
        return ProbeReport(None, {}, None, f"the probe exited {returncode} without a report: {tail}")
    netns = raw.get("netns")
    outcomes = {str(key): TargetOutcome(str(value.get("kind")), value.get("errno"), str(value.get("stage", "connect")))
                for key, value in dict(raw.get("results") or {}).items()}
    return ProbeReport((int(netns[0]), int(netns[1])) if netns else None, outcomes, raw.get("proxy"))


# --------------------------------------------------------------------------------------------------
# Running (sockets: loopback listeners in the harness's own namespace, and the lab)
# --------------------------------------------------------------------------------------------------


# Where the host's loopback listeners sit, one of each transport per address: a TCP listener sees a connection, a
# UDP socket a datagram.
HOST_LOOPBACK_ADDRESSES = (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))
TRANSPORTS = ("tcp", "udp")


def host_loopback_target_id(transport: str, address: str) -> str:
    """``direct-host-loopback-v4`` (TCP, as before UDP was probed) or ``direct-udp-host-loopback-v6``."""
    return f"direct-{'udp-' if transport == 'udp' else ''}host-loopback-{'v6' if ':' in address else 'v4'}"


@dataclass
class HostListeners:
    """Listeners on the host's loopback (127.0.0.1 and, if it exists, ::1), TCP and UDP, in the harness's
    namespace.

    Loopback never leaves the machine, so listening and being dialled here is safe; only a process
    that shares the host's network namespace can reach them.
    """

    sockets: dict[tuple[str, str], socket.socket] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def open(cls) -> Iterator[HostListeners]:
        listeners = cls()
        try:
            for transport in TRANSPORTS:
                for address, family in HOST_LOOPBACK_ADDRESSES:
                    sock = socket.socket(family, socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
                    try:
                        sock.bind((address, 0))
                    except OSError:  # no ::1 on this host: that target is left out
                        sock.close()
                        continue
                    if transport == "tcp":
                        sock.listen(16)
                    sock.setblocking(False)
                    listeners.sockets[(transport, address)] = sock
            yield listeners
        finally:
            for sock in listeners.sockets.values():
                sock.close()

    def targets(self) -> tuple[EgressTarget, ...]:
        return tuple(EgressTarget(host_loopback_target_id(transport, address), address,
                                  int(sock.getsockname()[1]), f"host's loopback {transport.upper()} listener {address}",
                                  loopback=True, transport=transport)
                     for (transport, address), sock in self.sockets.items())

    def seen(self, transport: str, address: str) -> int:
        """Connections (TCP) or datagrams (UDP) that reached the listener on ``address``, taken now."""
        return _drain(self.sockets[(transport, address)], accept=transport == "tcp")


def _drain(sock: socket.socket, *, accept: bool) -> int:
    """Accept (a listener) or read (a datagram socket) everything waiting on non-blocking ``sock``; how many."""
    count = 0
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while True:
            if accept:
                peer, _ = sock.accept()
                peer.close()
            else:
                sock.recv(65536)
            count += 1
    return count


@dataclass
class LabDatagramListeners:
    """UDP sockets in the lab on each UDP target's address and port, for the length of one probe run.

    The lab's catch-all sees TCP only (``netns.catch_all_ruleset``); a datagram that reaches the lab arrives here.
    The lab routes every address to itself (``local 0.0.0.0/0``, ``local ::/0``), and ``IP_FREEBIND`` lets a
    socket bind an IPv6 address no interface carries (ip(7), ipv6(7)).
    """

    sockets: dict[str, socket.socket] = field(default_factory=dict)

    @classmethod
    @contextlib.contextmanager
    def open(cls, lab: NetworkLab, targets: Sequence[EgressTarget]) -> Iterator[LabDatagramListeners]:
        listeners = cls()
        try:
            for target in targets:
                if target.transport != "udp" or target.loopback:
                    continue
                sock = lab.socket(socket.AF_INET6 if ":" in target.address else socket.AF_INET, socket.SOCK_DGRAM)
                listeners.sockets[target.target_id] = sock
                sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
                sock.bind((target.address, target.port))
                sock.setblocking(False)
            yield listeners
        finally:
            for sock in listeners.sockets.values():
                sock.close()

    def seen(self, target_id: str) -> int:
        """Datagrams that reached the lab's socket of ``target_id``, taken now (0 for a target it has none of)."""
        sock = self.sockets.get(target_id)
        return 0 if sock is None else _drain(sock, accept=False)


@dataclass(frozen=True)
class EgressPlan:
    targets: tuple[EgressTarget, ...]
    namespaces: Namespaces
    proxy: tuple[str, int] | None = PROXY_ADDRESS
    timeout: float = CONNECT_TIMEOUT_SECONDS
    nonce: str = field(default_factory=lambda: f"egress-{secrets.token_hex(8)}")

    def argv(self) -> list[str]:
        plan = {
            "targets": [{"id": t.target_id, "address": t.address, "port": t.port, "loopback": t.loopback,
                         "transport": t.transport} for t in self.targets],
            "harness_namespaces": [list(self.namespaces.own), list(self.namespaces.lab)],
            "timeout": self.timeout, "nonce": self.nonce, "proxy": list(self.proxy) if self.proxy else None,
            "proxy_request": (f"GET http://{PUBLIC_ORIGIN}/egress-probe/{self.nonce} HTTP/1.1\r\n"
                              f"Host: {PUBLIC_ORIGIN}\r\nConnection: close\r\n\r\n"),
        }
        return ["python3", "-S", "-c", EGRESS_PROBE, json.dumps(plan)]


@dataclass(frozen=True)
class EgressEvidence:
    """One probe run and what the harness's listeners saw: every verdict of the category."""

    report: ProbeReport
    namespace: Judgement
    direct: dict[str, tuple[EgressTarget, Judgement]]
    proxy_control: Judgement


def host_netns() -> NetnsId:
    info = os.stat(HOST_NETNS_PATH)
    return (info.st_dev, info.st_ino)


def run_egress_probe(launcher: Launcher, lab: NetworkLab, own_netns: NetnsId, *,
                     direct: Sequence[EgressTarget] = DIRECT_TARGETS,
                     proxy: tuple[str, int] | None = PROXY_ADDRESS) -> EgressEvidence:
    """Run the probe once under ``launcher`` and judge every target, the namespace and the proxy control."""
    namespaces = Namespaces(host_netns(), lab.netns_id, own_netns)
    with HostListeners.open() as listeners, LabDatagramListeners.open(lab, direct) as lab_datagrams:
        plan = EgressPlan((*listeners.targets(), *direct), namespaces, proxy)
        mark = lab.hit_mark()
        result = launcher.run(plan.argv(), timeout=RUN_TIMEOUT_SECONDS)
        report = parse_report(result.returncode, result.stdout, result.stderr)
        host_seen = {target.target_id: listeners.seen(target.transport, target.address)
                     for target in plan.targets if target.loopback}
        lab_seen = {target.target_id: lab_datagrams.seen(target.target_id) for target in plan.targets}
    hits = lab.hits(since=mark)
    judged: dict[str, tuple[EgressTarget, Judgement]] = {}
    used: list[int] = []
    for target in plan.targets:
        tagged = f"{plan.nonce} {target.target_id}\r\n".encode()
        mine = [hit for hit in hits if tagged in hit.received
                or (target.transport == "tcp" and (hit.address, hit.port) == (target.address, target.port))]
        used += [hit.index for hit in mine]
        seen = []
        if host_seen.get(target.target_id):
            seen.append(f"the host's loopback listener ({host_seen[target.target_id]} "
                        f"{'datagram' if target.transport == 'udp' else 'connection'}(s))")
        if lab_seen.get(target.target_id):
            seen.append(f"the lab's UDP socket on {target.address}:{target.port} ({lab_seen[target.target_id]} "
                        "datagram(s))")
        if mine:
            seen.append(f"the lab's catch-all ({', '.join(hit.endpoint for hit in mine)})")
        judged[target.target_id] = (target, judge_direct(target, report, namespaces, " and ".join(seen)))
    # Its request to the proxy's address lands on the catch-all too when no proxy listens there.
    used += [hit.index for hit in hits if plan.nonce.encode() in hit.received]
    lab.account(used, by=f"egress probe {plan.nonce}")
    reached = [request for request in lab.origin_requests(PUBLIC_ORIGIN) if plan.nonce in request.target]
    control = judge_proxy_control(report, len(reached)) if proxy is not None else Judgement(
        Verdict.INDETERMINATE, "no proxy in the process's namespace", PROXY_EXPECTED, "")
    return EgressEvidence(report, judge_namespace(report, namespaces), judged, control)
