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
* **a way back out**: setns(2) into its own namespace and into every other network namespace it can name
  (/proc/<pid>/ns/net, /run/netns, its open fds), natively three ways and through ``int 0x80``, each in a child
  a filter may kill (``verdicts.egress.judge_escape``): a namespace of its own is no boundary if setns(2) takes
  the process into the host's. Nothing is sent from a namespace it enters. And the TCP and UDP sockets it holds
  without making them (a launcher's leak): one of another namespace (SIOCGSKNS, else it cannot reach a socket of
  ours on the process's own loopback) sends from there;
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
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_sandbox import guardian
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.netns import IFF_LOOPBACK, NetnsHolder, NetnsId, interface_flags
from pytest_sandbox.probes.syscall import ExecTarget
from pytest_sandbox.probes.syscall_runner import INT80_STUB
from pytest_sandbox.verdicts.egress import (
    PROXY_EXPECTED,
    PUBLIC_ORIGIN,
    EgressTarget,
    EscapeAttempt,
    EscapeAttempts,
    HeldSocket,
    Namespaces,
    ProbeReport,
    SetnsResult,
    TargetOutcome,
    judge_direct,
    judge_escape,
    judge_loopback_control,
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
    "StandInLauncher",
    "host_loopback_target_id",
    "parse_report",
    "run_egress_probe",
]

CONNECT_TIMEOUT_SECONDS = 2.0
# How long a datagram's sender waits for an answer or an ICMP error: both come from this machine (a namespace of
# the harness's), within milliseconds, so a datagram that left unanswered costs a fraction of a connect timeout.
UDP_REPLY_WAIT_SECONDS = 0.5
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
# would dial on its behalf) is attempted only where no packet can leave the machine: in a network
# namespace the harness made (its identity is in the plan), or in one whose every interface is a
# loopback (SIOCGIFFLAGS IFF_LOOPBACK, netdevice(7)), where a non-local destination has no route.
# The namespace's identity comes from /proc/self/ns/net, else from SIOCGSKNS on a socket (Linux 4.9+;
# it needs CAP_NET_ADMIN there), else it is unknown.
EGRESS_PROBE = r"""
import errno, fcntl, json, os, socket, stat, struct, sys
plan = json.loads(sys.argv[1])
SIOCGIFFLAGS, SIOCGSKNS, IFF_LOOPBACK = 0x8913, 0x894C, 0x8
def own_namespace_fd():
    try:
        return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        with socket.socket() as probe:
            return fcntl.ioctl(probe.fileno(), SIOCGSKNS, 0)
def namespace_of(fd):
    # [st_dev, st_ino] of a namespace file descriptor, which it closes
    try:
        info = os.fstat(fd)
        return [info.st_dev, info.st_ino]
    finally:
        os.close(fd)
def namespace():
    try:
        return namespace_of(own_namespace_fd())
    except OSError:
        return None
def interfaces():
    try:
        names = [name for _index, name in socket.if_nameindex()]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as query:
            return [[name, bool(struct.unpack_from("16sH", fcntl.ioctl(
                query.fileno(), SIOCGIFFLAGS, struct.pack("16sH", name.encode()[:15], 0)))[1] & IFF_LOOPBACK)]
                for name in names]
    except OSError:
        return None
CLONE_NEWNET, MAX_OTHERS = 0x40000000, 64
# setns(2) the ways a filter could miss: the native call (x86_64 308) with nstype CLONE_NEWNET, with 0 ("any type")
# and with high bits the kernel drops (nstype is an int; a filter comparing 64 bits sees another value), and the i386
# call through `int 0x80` (346) with CLONE_NEWNET and 0. Each way runs in a forked child of its own, since a filter
# may kill the caller of one way and let another through.
NATIVE_WAYS = (("native", CLONE_NEWNET), ("native_nstype_0", 0), ("native_high_bits", CLONE_NEWNET | 1 << 32))
I386_WAYS = (("i386", CLONE_NEWNET), ("i386_nstype_0", 0))  # 32-bit registers: no high bits
def open_namespace(path):
    return own_namespace_fd() if path is None else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
def moved_into(fd):
    # Did a setns(2) that returned 0 move this thread? A filter's ERRNO(0) returns 0 and moves nothing.
    try:
        target, now = os.fstat(fd), os.stat("/proc/thread-self/ns/net")
    except OSError:
        return True  # nothing to check against: the call's word
    return (target.st_dev, target.st_ino) == (now.st_dev, now.st_ino)
def native_setns():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    def call(fd, nstype):
        ctypes.set_errno(0)
        return 0 if libc.syscall(ctypes.c_long(308), ctypes.c_long(fd), ctypes.c_long(nstype)) == 0 \
            else ctypes.get_errno()
    return call
def i386_setns():
    import ctypes, mmap
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(bytes.fromhex(plan["int80_stub"]))
    int80 = ctypes.CFUNCTYPE(ctypes.c_long, *([ctypes.c_long] * 7))(ctypes.addressof(ctypes.c_char.from_buffer(code)))
    def call(fd, nstype):
        return -int80(346, fd, nstype, 0, 0, 0, 0)
    call.code = code  # the mapping lives as long as the function
    return call
def in_child(handles, call, nstype):
    # One way on every handle, in a child: [stage, errno or signal] per handle; a child killed midway leaves the rest
    # "killed" with its signal.
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(reader)
            for path in handles:
                stage = "setns"
                try:
                    fd = open_namespace(path)
                except OSError as e:
                    if path is not None:
                        os.write(writer, b"open %d\n" % e.errno)
                        continue
                    # No handle on its own namespace (no /proc, no CAP_NET_ADMIN): setns(-1). The kernel checks the fd
                    # before anything else (EBADF), so any other answer is the filter's (kernel/nsproxy.c).
                    fd, stage = -1, "nofd"
                number = call(fd, nstype)
                if number == 0 and fd != -1 and moved_into(fd):
                    stage = "entered"
                os.write(writer, b"%s %d\n" % (stage.encode(), number))
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as lines:
        done = [[stage, int(number) or None] for stage, number in (line.split() for line in lines)]
    _pid, status = os.waitpid(pid, 0)
    ended = ["killed", os.WTERMSIG(status)] if os.WIFSIGNALED(status) else ["lost", None]
    return done + [ended for _path in handles[len(done):]]
def merged(per_way):
    # One ABI's ways on one handle -> [stage, number, way]: an entry wins; then a way with no result (nothing can be
    # said); then (no handle) an EBADF, which shows that way reaches the kernel; then a refusal (an errno: the first;
    # else the child killed).
    for (stage, number), way in per_way:
        if stage == "entered":
            return ["entered", None, way.replace("_", " ")]
    for stage, wanted in (("lost", None), ("nofd", errno.EBADF)):
        if any(found == stage and number == wanted for (found, number), _way in per_way):
            return [stage, wanted, None]
    for stage in ("open", "setns", "nofd", "killed"):
        for (found, number), _way in per_way:
            if found == stage:
                return [stage, number, None]
    return ["lost", None, None]
def attempts_by_abi(handles, call, ways):
    results = [in_child(handles, call, nstype) for _way, nstype in ways]
    return [merged([(result[index], way) for result, (way, _nstype) in zip(results, ways)])
            for index in range(len(handles))]
def reaches_own_loopback(sock):
    # Whether the held socket is of this namespace: it connects (TCP) or sends (UDP) to a socket of ours on this
    # namespace's loopback. ECONNREFUSED or nothing arriving: it is another namespace's (its loopback has no such
    # port); a loopback packet never leaves the machine. None: could not tell.
    tcp = sock.type == socket.SOCK_STREAM
    address = "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(sock.family, sock.type) as mine:
        try:
            mine.bind((address, 0))
            if tcp:
                mine.listen(1)
            mine.settimeout(0.5)
            sock.settimeout(0.5)
        except OSError:
            return None
        try:
            if tcp:
                sock.connect(mine.getsockname()[:2])
                mine.accept()[0].close()
            else:
                sock.sendto(b"held", mine.getsockname()[:2])
                mine.recv(16)
            return True
        except ConnectionRefusedError:
            return False
        except socket.timeout:
            return False if not tcp else None
        except OSError as e:
            # EISCONN: a TCP socket whose connection was reset or closed (getpeername says unconnected) cannot connect
            # again (inet_stream_connect): it leads nowhere.
            return "spent" if e.errno == errno.EISCONN else None
def held_sockets():
    # The TCP/UDP sockets it holds but did not make (a launcher's leak): one made in another namespace connects or
    # sends from there. Its namespace: SIOCGSKNS (CAP_NET_ADMIN), else reaches_own_loopback.
    found = []
    try:
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    except OSError:
        fds = range(1024)
    for fd in fds:
        try:
            info = os.fstat(fd)
            if not stat.S_ISSOCK(info.st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type not in (socket.SOCK_STREAM,
                                                                                          socket.SOCK_DGRAM):
                continue
            held = {"fd": fd, "transport": "tcp" if sock.type == socket.SOCK_STREAM else "udp", "netns": None,
                    "here": None, "state": "unconnected"}
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                held["state"] = "listening"
            else:
                try:
                    sock.getpeername()
                    held["state"] = "connected"
                except OSError:
                    pass
            try:
                held["netns"] = namespace_of(fcntl.ioctl(sock.fileno(), SIOCGSKNS, 0))
            except OSError:
                pass
            if held["state"] == "unconnected" or held["transport"] == "udp":
                here = reaches_own_loopback(sock)
                if here == "spent":
                    held["state"] = "spent"
                else:
                    held["here"] = here
            found.append(held)
    return found
def capabilities(raise_effective):
    # capget(2), _LINUX_CAPABILITY_VERSION_3: the sets as {effective, permitted, inheritable} low words, then high
    # words. raise_effective: first make the effective set the permitted one (capset(2)), as any process may; a
    # launcher that clears only the effective set has dropped nothing. None: could not tell.
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
        if libc.syscall(ctypes.c_long(125), header, data) != 0:
            return None
        if raise_effective and (data[0], data[3]) != (data[1], data[4]):
            data[0], data[3] = data[1], data[4]
            libc.syscall(ctypes.c_long(126), header, data)
            libc.syscall(ctypes.c_long(125), header, data)
        return data
    except (OSError, AttributeError):
        return None
def escape_attempts():
    # setns(2) into its own namespace (the call itself: refused by a filter or for want of CAP_SYS_ADMIN, it is refused
    # whatever the handle), then into every other network namespace the process can name: each process's in /proc,
    # the ones `ip netns` pins in /run/netns, any it holds open. Nothing is sent from a namespace it enters.
    if os.uname().machine != "x86_64":
        return {"error": "the setns attempts use x86_64 system call numbers; this is %s" % os.uname().machine}
    caps = capabilities(raise_effective=True)  # every attempt below with all the power the process can take
    sockets = held_sockets()
    proc = os.path.isdir("/proc/self")
    paths, unreadable, others = [], {}, {}
    if proc:
        paths += ["/proc/%s/ns/net" % pid for pid in os.listdir("/proc") if pid.isdigit()]
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink("/proc/self/fd/" + fd).startswith("net:["):
                    paths.append("/proc/self/fd/" + fd)
            except OSError:
                pass
    for pinned in ("/run/netns", "/var/run/netns"):
        try:
            paths += [os.path.join(pinned, name) for name in sorted(os.listdir(pinned))]
        except OSError:
            pass
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESRCH):  # a process that ended; EACCES: ptrace access mode
                name = errno.errorcode.get(e.errno, str(e.errno))
                unreadable[name] = unreadable.get(name, 0) + 1
            continue
        key = (info.st_dev, info.st_ino)
        if list(key) != netns and key not in others and len(others) < MAX_OTHERS:
            others[key] = path
    handles = [None, *others.values()]  # None: its own namespace
    try:
        native = attempts_by_abi(handles, native_setns(), NATIVE_WAYS)
    except OSError as e:  # fork refused (a filter, a pids limit)
        return {"error": "cannot fork a child to call setns(2) in: %s" % e}
    try:
        i386_call = i386_setns()
    except (OSError, ValueError, TypeError) as e:  # W^X: no executable mapping
        i386, i386_error = None, "cannot map the int 0x80 stub: %s" % e
    else:
        i386, i386_error = attempts_by_abi(handles, i386_call, I386_WAYS), None
    keys = [None, *[list(key) for key in others]]
    attempts = [{"path": path, "netns": key, "native": native[index], "i386": i386[index] if i386 else None}
                for index, (path, key) in enumerate(zip(handles, keys))]
    return {"attempts": attempts, "unreadable": unreadable, "proc": proc, "i386_error": i386_error,
            "sockets": sockets, "cap_sys_admin": None if caps is None else bool(caps[0] & (1 << 21))}  # effective
netns, links = namespace(), interfaces()
inside = netns in plan["harness_namespaces"] or bool(links and all(loop for _name, loop in links))
report = {"netns": netns, "interfaces": links, "results": {}, "proxy": None, "loopback_control": None,
          "escape": None}
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
            sock.settimeout(plan["reply_wait"])
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
if plan["loopback_control"]:
    # Ordinary networking inside the process's own namespace: a TCP round trip over its loopback.
    try:
        with socket.socket() as server:
            server.settimeout(plan["timeout"])
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=plan["timeout"]) as client:
                peer, _ = server.accept()
                with peer:
                    client.sendall(plan["nonce"].encode())
                    echoed = peer.recv(256)
        report["loopback_control"] = {"echoed": echoed.decode("latin-1")}
    except OSError as e:
        report["loopback_control"] = {"error": "%s: %s" % (type(e).__name__, e)}
try:
    report["escape"] = escape_attempts()
except Exception as e:  # whatever went wrong here, the rest of the report stands
    report["escape"] = {"error": "the setns(2) attempts failed: %s: %s" % (type(e).__name__, e)}
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
    links = raw.get("interfaces")
    interfaces = None if links is None else tuple((str(name), bool(loopback)) for name, loopback in links)
    return ProbeReport(_netns_id(netns), outcomes, raw.get("proxy"),
                       interfaces=interfaces, loopback_control=raw.get("loopback_control"),
                       escape=parse_escape(raw.get("escape")))


def _netns_id(value: Any) -> NetnsId | None:
    """A namespace's [st_dev, st_ino] as the probe reports it, or None."""
    return (int(value[0]), int(value[1])) if value else None


def parse_escape(raw: Any) -> EscapeAttempts | None:
    """The probe's setns(2) attempts (``escape_attempts`` in :data:`EGRESS_PROBE`), or None if it made none."""
    if not isinstance(raw, dict):
        return None
    if raw.get("error"):
        return EscapeAttempts(None, (), {}, False, error=str(raw["error"]))

    def way(result: Any) -> SetnsResult | None:
        return None if not result else SetnsResult(str(result[0]), result[1], result[2] if len(result) > 2 else None)

    attempts = [EscapeAttempt(item.get("path"), _netns_id(item.get("netns")), way(item.get("native"))
                              or SetnsResult("lost"), way(item.get("i386")))
                for item in raw.get("attempts") or ()]
    unreadable = {str(name): int(count) for name, count in dict(raw.get("unreadable") or {}).items()}
    sockets = tuple(HeldSocket(int(item["fd"]), str(item["transport"]), str(item["state"]),
                               _netns_id(item.get("netns")), item.get("here")) for item in raw.get("sockets") or ())
    return EscapeAttempts(attempts[0] if attempts else None, tuple(attempts[1:]), unreadable, bool(raw.get("proc")),
                          i386_error=raw.get("i386_error"), sockets=sockets, cap_sys_admin=raw.get("cap_sys_admin"))


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
    def open(cls, new_socket: Callable[[int, int], socket.socket] = socket.socket) -> Iterator[HostListeners]:
        """Listen through ``new_socket(family, type)``: the harness's own namespace by default, or (a
        :meth:`NetnsHolder.socket`) the namespace standing in for the host."""
        listeners = cls()
        try:
            for transport in TRANSPORTS:
                for address, family in HOST_LOOPBACK_ADDRESSES:
                    sock = new_socket(family, socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM)
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
    loopback_control: bool = False
    reply_wait: float = UDP_REPLY_WAIT_SECONDS

    def argv(self) -> list[str]:
        plan = {
            "targets": [{"id": t.target_id, "address": t.address, "port": t.port, "loopback": t.loopback,
                         "transport": t.transport} for t in self.targets],
            "harness_namespaces": [list(netns) for netns in self.namespaces.harness_made],
            "timeout": self.timeout, "nonce": self.nonce, "proxy": list(self.proxy) if self.proxy else None,
            "proxy_request": (f"GET http://{PUBLIC_ORIGIN}/egress-probe/{self.nonce} HTTP/1.1\r\n"
                              f"Host: {PUBLIC_ORIGIN}\r\nConnection: close\r\n\r\n"),
            "loopback_control": self.loopback_control, "reply_wait": self.reply_wait,
            "int80_stub": INT80_STUB.hex(),
        }
        return ["python3", "-S", "-c", EGRESS_PROBE, json.dumps(plan)]


@dataclass(frozen=True)
class EgressEvidence:
    """One probe run and what the harness's listeners saw: every verdict of the category. ``control`` is the
    positive control: the proxy's (``proxy-control``, the reference launcher) or the process's own loopback
    (``loopback-control``, a third party's launcher, whose proxy the harness does not know)."""

    report: ProbeReport
    namespace: Judgement
    escape: Judgement
    direct: dict[str, tuple[EgressTarget, Judgement]]
    control: Judgement
    control_id: str = "proxy-control"

    def verdicts(self) -> dict[str, Verdict]:
        """Every verdict of the run by its id: ``netns-own``, ``netns-escape``, the control's and each direct
        target's."""
        found = {"netns-own": self.namespace.verdict, "netns-escape": self.escape.verdict,
                 self.control_id: self.control.verdict}
        found.update({target_id: judgement.verdict for target_id, (_target, judgement) in self.direct.items()})
        return found

    @property
    def control_attempt(self) -> str:
        if self.control_id == "loopback-control":
            return "a TCP round trip over 127.0.0.1 inside the sandbox"
        return f"GET http://{PUBLIC_ORIGIN}/ through the proxy at {PROXY_ADDRESS[0]}:{PROXY_ADDRESS[1]} in the " \
               "sandbox's namespace"


def host_loopback_only() -> bool | None:
    """Whether every interface of the harness's own (the host's) namespace is a loopback (SIOCGIFFLAGS IFF_LOOPBACK,
    netdevice(7)), as the probe reads its own; None if it could not be read (an interface gone meanwhile)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as query:
            return all(interface_flags(query, name) & IFF_LOOPBACK for _index, name in socket.if_nameindex())
    except OSError:
        return None


def host_netns() -> NetnsId:
    info = os.stat(HOST_NETNS_PATH)
    return (info.st_dev, info.st_ino)


@dataclass
class StandInLauncher:
    """A third party's launcher (``--sandbox-exec PREFIX``), started in a namespace of the harness's wired into the
    lab (``stand_in``), which takes the host's place: a launcher that isolates nothing leaves its process there,
    where every lab address is reachable and watched, and nothing it sends can leave the machine.

    The launcher's contract is the syscall category's: ``PREFIX python3 -S -`` with the program on stdin.
    """

    target: ExecTarget
    stand_in: NetnsHolder

    def run(self, argv: Sequence[str], *, timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
        interpreter, *flags, program = argv[:4]
        if (interpreter, *flags) != ("python3", "-S", "-c"):
            raise ValueError(f"expected python3 -S -c PROGRAM ARGS..., got {list(argv)[:3]}")
        source = f"import sys\nsys.argv[1:] = {list(argv[4:])!r}\n{program}"
        command = [*self.stand_in.nsenter_prefix(), *self.target.argv]
        try:
            return guardian.run(command, input=source.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, -signal.SIGKILL, b"",
                                               f"the launcher ran past {timeout:g} s and was killed".encode())


def run_egress_probe(launcher: Launcher, lab: NetworkLab, own_netns: NetnsId | None, *,
                     direct: Sequence[EgressTarget] = DIRECT_TARGETS,
                     proxy: tuple[str, int] | None = PROXY_ADDRESS,
                     stand_in: NetnsHolder | None = None) -> EgressEvidence:
    """Run the probe once under ``launcher`` and judge every target, the namespace and the positive control.

    ``own_netns`` is the namespace the harness made for the process (the reference launcher); with ``stand_in``
    instead (a third party's :class:`StandInLauncher`) the host's loopback listeners sit in that namespace, the
    process's namespace is judged by what it holds, and the control is a round trip over its own loopback."""
    if (own_netns is None) == (stand_in is None):
        raise ValueError("give exactly one of: the namespace made for the process, the one its launcher starts in")
    namespaces = Namespaces(host_netns(), lab.netns_id, own_netns, None if stand_in is None else stand_in.netns_id,
                            host_loopback_only=None if stand_in is None else host_loopback_only())
    listener_socket = socket.socket if stand_in is None else stand_in.socket
    with HostListeners.open(listener_socket) as listeners, LabDatagramListeners.open(lab, direct) as lab_datagrams:
        plan = EgressPlan((*listeners.targets(), *direct), namespaces, proxy, loopback_control=stand_in is not None)
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
    namespace, escape = judge_namespace(report, namespaces), judge_escape(report, namespaces)
    if stand_in is not None:
        return EgressEvidence(report, namespace, escape, judged, judge_loopback_control(report, plan.nonce),
                              "loopback-control")
    reached = [request for request in lab.origin_requests(PUBLIC_ORIGIN) if plan.nonce in request.target]
    control = judge_proxy_control(report, len(reached)) if proxy is not None else Judgement(
        Verdict.INDETERMINATE, "no proxy in the process's namespace", PROXY_EXPECTED, "")
    return EgressEvidence(report, namespace, escape, judged, control)
