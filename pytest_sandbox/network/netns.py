"""Private network namespaces for network probes, and the guard that keeps probes inside them.

A :class:`NetnsHolder` is a tiny helper process that lives in a fresh network namespace whose only
interface is ``lo``. It hands out sockets created *inside* that namespace over a unix socket pair
(``SCM_RIGHTS``). A socket keeps the namespace it was created in for its whole life (see
socket(7) and network_namespaces(7)), so the pytest process can bind, listen and connect with it from
any thread and every packet stays in the lab. Nothing in a lab namespace can reach the host's
interfaces: a destination that is not on the lab's ``lo`` fails with ENETUNREACH before any packet is
built.

:func:`ensure_lab_socket` and :func:`assert_not_host_netns` are the guard: every lab helper that
connects somewhere calls one of them first and refuses to run a probe from the host namespace.

As root the helper only unshares the network namespace. As an ordinary user it first unshares a user
namespace that maps root to the caller's uid/gid ("map-root-user", as ``unshare -r`` does), which
gives it CAP_NET_ADMIN over the new network namespace and nothing on the host.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import functools
import ipaddress
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pytest_sandbox.errors import HostUnsupportedError
from pytest_sandbox.guardian import helper_interpreter

__all__ = [
    "HARNESS_MARK",
    "NetnsHolder",
    "assert_not_host_netns",
    "catch_all_ruleset",
    "ensure_lab_socket",
    "host_can_create_netns",
    "socket_netns_inode",
]

# <linux/sched.h>
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

# <linux/sockios.h>. SIOCGSKNS (Linux 4.9) returns an fd for the network namespace a socket
# belongs to; it requires CAP_NET_ADMIN over that namespace, which an unprivileged caller has for a
# lab it owns (through the user namespace) and lacks for the host namespace.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGSKNS = 0x894C
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFREQ_SIZE = 40  # sizeof(struct ifreq) on x86_64

HELPER_START_TIMEOUT_SECONDS = 10.0
HELPER_REQUEST_TIMEOUT_SECONDS = 10.0
HELPER_EXIT_TIMEOUT_SECONDS = 5.0
MAX_MESSAGE_BYTES = 65536
# Sockets one request to the helper brings back for the lab's own connections (NetworkLab.connect and
# dial): a campaign opens thousands, sixteen at a time, and one round trip per connection through the one
# helper serialised them (2,827 round trips of the SSRF campaign, ~0.1 ms each idle, far more contended).
# The rest wait in the holder's pool. SCM_RIGHTS carries at most 253 descriptors a message (SCM_MAX_FD,
# include/net/scm.h).
SOCKET_BATCH = 32

# <linux/in.h>, <linux/in6.h>: a transparent listener may accept connections to addresses that are
# not its own, which is how the catch-all sees the original destination (ip-sysctl.rst, TPROXY).
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
# skb->mark on the harness's own lab connections (NetworkLab.connect): the catch-all lets them reach
# the kernel's ordinary answer (a listener, or RST), so "is anything listening there" stays answerable.
HARNESS_MARK = 0x5A4E
# The catch-all's per-destination SYN counters (nft dynamic sets, one element per destination address and port).
SYN_COUNT_SETS = {4: "syn4", 6: "syn6"}
SYN_COUNT_SIZE = 65535
CATCH_ALL_TABLE = "pytest_sandbox_lab"
# Addresses a wildcard listener (0.0.0.0 / ::) really owns inside the lab, besides those added to lo.
_ALWAYS_LOCAL = {4: "127.0.0.0/8", 6: "::1"}

HOST_NETNS_PATH = "/proc/self/ns/net"
GUARD_REFUSAL = "refusing to run a network probe outside a lab namespace"

NetnsId = tuple[int, int]  # (st_dev, st_ino) of an nsfs inode: how the kernel names a namespace


# --------------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------------


def _netns_id_of_path(path: str) -> NetnsId:
    info = os.stat(path)
    return (info.st_dev, info.st_ino)


def socket_netns_inode(sock: socket.socket) -> NetnsId:
    """Return ``(st_dev, st_ino)`` of the network namespace ``sock`` lives in (via SIOCGSKNS).

    Raises OSError when the kernel will not say (no SIOCGSKNS before Linux 4.9; EPERM when the caller
    has no CAP_NET_ADMIN over the socket's namespace, which for an unprivileged caller means the
    socket is in the host namespace).
    """
    netns_fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS, 0)
    try:
        info = os.fstat(netns_fd)
        return (info.st_dev, info.st_ino)
    finally:
        os.close(netns_fd)


def assert_not_host_netns(netns_path: str) -> None:
    """Raise RuntimeError if ``netns_path`` names this process's own (host) network namespace."""
    try:
        candidate = _netns_id_of_path(netns_path)
    except OSError as exc:
        raise RuntimeError(
            f"{GUARD_REFUSAL}: cannot inspect namespace {netns_path!r} ({exc.strerror})"
        ) from exc
    if candidate == _netns_id_of_path(HOST_NETNS_PATH):
        raise RuntimeError(
            f"{GUARD_REFUSAL}: {netns_path} is this process's own network namespace "
            f"(inode {candidate[1]}); probes must use sockets from a NetnsHolder"
        )


def ensure_lab_socket(sock: socket.socket, lab_netns: NetnsId | None = None) -> None:
    """Raise RuntimeError unless ``sock`` lives outside the host network namespace.

    With ``lab_netns`` (a holder's :attr:`NetnsHolder.netns_id`), the socket must live in exactly
    that lab. Call this *before* connect/sendto: the check sends nothing. Fails closed: if the kernel
    cannot tell which namespace the socket is in, the probe is refused.
    """
    try:
        actual = socket_netns_inode(sock)
    except OSError as exc:
        raise RuntimeError(
            f"{GUARD_REFUSAL}: cannot determine the socket's network namespace "
            f"(SIOCGSKNS: {exc.strerror}); a host-namespace socket looks like this to an "
            "unprivileged caller"
        ) from exc
    host = _netns_id_of_path(HOST_NETNS_PATH)
    if actual == host:
        raise RuntimeError(
            f"{GUARD_REFUSAL}: the socket lives in the host network namespace (inode {host[1]}); "
            "create probe sockets with NetnsHolder.socket() or NetworkLab.socket()"
        )
    if lab_netns is not None and actual != lab_netns:
        raise RuntimeError(
            f"{GUARD_REFUSAL}: the socket lives in namespace inode {actual[1]}, not in the expected "
            f"lab (inode {lab_netns[1]})"
        )


# --------------------------------------------------------------------------------------------------
# The helper process (runs in the child; stdlib only)
# --------------------------------------------------------------------------------------------------


def _libc_unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _write_proc_file(path: str, content: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(content)


def _enter_new_netns() -> str:
    """Move this process into a fresh network namespace; return how (for diagnostics)."""
    uid, gid = os.getuid(), os.getgid()
    if os.geteuid() == 0:
        try:
            _libc_unshare(CLONE_NEWNET)
            return "root"
        except OSError as exc:
            # Root without CAP_SYS_ADMIN (e.g. a locked-down container): fall back to a user namespace.
            if exc.errno != errno.EPERM:
                raise
    _libc_unshare(CLONE_NEWUSER | CLONE_NEWNET)
    # user_namespaces(7): an unprivileged process may map exactly its own ids, and must deny
    # setgroups(2) before writing gid_map.
    _write_proc_file("/proc/self/setgroups", "deny")
    _write_proc_file("/proc/self/uid_map", f"0 {uid} 1")
    _write_proc_file("/proc/self/gid_map", f"0 {gid} 1")
    return "user"


def interface_flags(control: socket.socket, name: str) -> int:
    """The flags of interface ``name`` in ``control``'s namespace (SIOCGIFFLAGS, netdevice(7))."""
    request = struct.pack("16sH", name.encode()[:15], 0).ljust(IFREQ_SIZE, b"\0")
    return int(struct.unpack_from("16sH", fcntl.ioctl(control.fileno(), SIOCGIFFLAGS, request))[1])


def _bring_loopback_up() -> None:
    # A new network namespace starts with lo DOWN (network_namespaces(7)); until it is up even
    # 127.0.0.1 is unreachable. SIOCSIFFLAGS avoids depending on iproute2 for this step.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
        flags = interface_flags(control, "lo")
        fcntl.ioctl(
            control.fileno(),
            SIOCSIFFLAGS,
            struct.pack("16sH", b"lo", flags | IFF_UP).ljust(IFREQ_SIZE, b"\0"),
        )


def _address_is_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True when ``address`` can already be bound here (e.g. all of 127.0.0.0/8 and ::1)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


def _always_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address in ipaddress.ip_network(_ALWAYS_LOCAL[address.version])


def _add_addresses_to_loopback(addresses: Sequence[str]) -> None:
    """Give ``addresses`` to the lab: on ``lo``, in the catch-all's sets, and in :data:`_owned`.

    What a wildcard listener (0.0.0.0 / ::) really receives in the lab is decided here, once: every
    address in :data:`_owned` (and 127.0.0.0/8, ::1). Once the catch-all's AnyIP routes exist a
    bind(2) probe cannot tell (every IPv4 address binds), so neither this function nor anyone
    else asks one: the record is the answer, and lo and the nft sets are kept equal to it.
    """
    parsed = [ipaddress.ip_address(text) for text in addresses]
    new = [address for address in dict.fromkeys(parsed) if address not in _owned and not _always_local(address)]
    if not new:
        return
    if _catch_all_installed:
        _mark_local_for_wildcard_listeners(new)
    # One `ip -batch` for all addresses: one exec instead of one per canary. Each line is built from
    # a parsed address, so nothing from the request reaches iproute2 verbatim. `replace`, not `add`:
    # an address something else already put on lo is no error. `nodad`: a /128 on lo must be
    # usable at once, never "tentative" (RFC 4862 §5.4 duplicate address detection). IPv4 ones go
    # on lo too, although AnyIP already makes them bindable: `ip addr` in the lab lists what it owns.
    lines = [
        f"address replace {address}/32 dev lo"
        if address.version == 4
        else f"address replace {address}/128 dev lo nodad"
        for address in new
    ]
    try:
        result = subprocess.run(
            ["ip", "-batch", "-"],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            check=False,
            timeout=HELPER_REQUEST_TIMEOUT_SECONDS,
        )
    except FileNotFoundError as exc:
        raise OSError(errno.ENOENT, "the `ip` command (iproute2) is not installed") from exc
    if result.returncode != 0:
        raise OSError(errno.EINVAL, f"ip address add failed: {result.stderr.strip()}")
    still_missing = [str(address) for address in new if not _address_is_local(address)]
    if still_missing:
        raise OSError(errno.EADDRNOTAVAIL, f"addresses not usable after adding: {still_missing}")
    _owned.update(new)


def catch_all_ruleset(port4: int, port6: int, harness_mark: int = HARNESS_MARK,
                      owned: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address] = ()) -> str:
    """The nftables ruleset that sends every TCP connection no lab socket owns to the catch-all.

    Only the first segment of a connection (SYN without ACK) is looked at. It passes unchanged when
    it is the harness's own (``harness_mark``), when a socket is bound to exactly its destination
    (``socket wildcard 0``: a listener such as an origin or the proxy, or an existing connection),
    when a wildcard listener (0.0.0.0 / ::) owns it on an address that really is local to the lab,
    or when it reuses the 4-tuple of an ordinary TIME_WAIT socket (the kernel gives it back to that
    socket's listener). Everything else is diverted by TPROXY (nft ``tproxy``, which needs no NAT and no conntrack) to
    the transparent catch-all listeners on 127.0.0.1:``port4`` and [::1]:``port6``; the accepted
    socket's own address is the original destination.

    The sets ``local4`` / ``local6`` start with 127.0.0.0/8, ::1 and ``owned`` (addresses the lab
    already gave itself); :func:`_add_addresses_to_loopback` adds the later ones.

    Every SYN that is not the harness's own is also counted per destination (``syn4`` / ``syn6``, read by
    :meth:`NetnsHolder.syn_counts`): a connection whose 4-tuple is still in TIME_WAIT at the accepting end
    (the server closed first) is given a new connection with the very same 4-tuple
    (``tcp_timewait_state_process`` accepts a newer SYN), so the socket table shows no new peer for it;
    the counter does.
    """
    for port in (port4, port6):
        if not 0 < port < 65536:
            raise ValueError(f"catch-all port {port!r} is not in 1..65535")
    elements = {version: ", ".join([_ALWAYS_LOCAL[version], *sorted(
        {str(address) for address in owned if address.version == version and not _always_local(address)})])
        for version in (4, 6)}
    return "\n".join([
        f"table inet {CATCH_ALL_TABLE} {{",
        f"    set local4 {{ type ipv4_addr; flags interval; elements = {{ {elements[4]} }} }}",
        f"    set local6 {{ type ipv6_addr; flags interval; elements = {{ {elements[6]} }} }}",
        f"    set {SYN_COUNT_SETS[4]} {{ type ipv4_addr . inet_service; size {SYN_COUNT_SIZE}; flags dynamic; }}",
        f"    set {SYN_COUNT_SETS[6]} {{ type ipv6_addr . inet_service; size {SYN_COUNT_SIZE}; flags dynamic; }}",
        "    chain divert {",
        f"        meta nfproto ipv4 meta l4proto tcp tproxy ip to 127.0.0.1:{port4} accept",
        f"        meta nfproto ipv6 meta l4proto tcp tproxy ip6 to [::1]:{port6} accept",
        "    }",
        "    chain catch_all {",
        "        type filter hook prerouting priority mangle; policy accept;",
        "        meta l4proto != tcp accept",
        "        tcp flags & (fin | syn | rst | ack) != syn accept",
        f"        meta mark {harness_mark:#x} accept",
        f"        meta nfproto ipv4 update @{SYN_COUNT_SETS[4]} {{ ip daddr . tcp dport counter }}",
        f"        meta nfproto ipv6 update @{SYN_COUNT_SETS[6]} {{ ip6 daddr . tcp dport counter }}",
        "        socket wildcard 0 accept",
        "        meta nfproto ipv4 ip daddr @local4 socket wildcard 1 accept",
        "        meta nfproto ipv6 ip6 daddr @local6 socket wildcard 1 accept",
        "        socket wildcard 1 goto divert",
        # What is left is either no socket at all or one that is not a full socket: a TIME_WAIT
        # or pending-request socket whose 4-tuple the SYN reuses (the server closed first). An
        # ordinary one belongs to a real listener (tcp_timewait_state_process() hands the SYN
        # back to it), so it passes; the catch-all's own are transparent and are diverted again.
        "        socket transparent 0 accept",
        "        goto divert",
        "    }",
        "}",
        "",
    ])


# Routes that make every address local to the lab (so a dial anywhere completes on lo instead of
# failing with ENETUNREACH), and the one broadcast route lo gets for 127.0.0.0/8 removed, so
# 127.255.255.255 is an ordinary local address a careless proxy can really reach. TCP to multicast
# and 255.255.255.255 stays impossible: tcp_v4_connect() refuses RTCF_MULTICAST|RTCF_BROADCAST
# routes and tcp_v6_connect() multicast destinations, before any packet exists.
_CATCH_ALL_ROUTES = (
    "route add local 0.0.0.0/0 dev lo",
    "route add local ::/0 dev lo",
    "route del broadcast 127.255.255.255 dev lo table local",
)
_NFT_MISSING = ("the `nft` command (package nftables) is not installed; the lab's catch-all canary needs "
                "it (apt-get install nftables)")
_catch_all_installed = False  # helper-process state: set once the ruleset is loaded
# Helper-process state: every address the lab gave itself (besides 127.0.0.0/8 and ::1). The one
# record of what a wildcard listener in the lab really owns (see owned_addresses()).
_owned: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()


def _run_tool(argv: list[str], stdin: str, missing: str) -> None:
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False,
                                timeout=HELPER_REQUEST_TIMEOUT_SECONDS)
    except FileNotFoundError as exc:
        raise OSError(errno.ENOENT, missing) from exc
    if result.returncode != 0:
        raise OSError(errno.EINVAL, f"{argv[0]} failed: {result.stderr.strip()}")


def parse_syn_counts(listing: str) -> dict[tuple[str, int], int]:
    """``(address, port) -> SYNs`` from ``nft -j list set`` output of a SYN-count set. Pure."""
    counts: dict[tuple[str, int], int] = {}
    for item in json.loads(listing).get("nftables", []):
        for element in (item.get("set") or {}).get("elem", []):
            entry = element.get("elem", element)
            address, port = entry["val"]["concat"]
            counts[(str(ipaddress.ip_address(address)), int(port))] = int(entry["counter"]["packets"])
    return counts


def _syn_counts() -> list[tuple[str, int, int]]:
    # (address, port, count) triples: the helper channel is JSON, whose object keys are strings only.
    counts: list[tuple[str, int, int]] = []
    for name in SYN_COUNT_SETS.values():
        result = subprocess.run(["nft", "-j", "list", "set", "inet", CATCH_ALL_TABLE, name], capture_output=True,
                                text=True, check=False, timeout=HELPER_REQUEST_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise OSError(errno.EIO, f"nft list set {name} failed: {result.stderr.strip()}")
        counts += [(address, port, count) for (address, port), count in parse_syn_counts(result.stdout).items()]
    return counts


def _install_catch_all(port4: int, port6: int, harness_mark: int) -> None:
    global _catch_all_installed
    ruleset = catch_all_ruleset(port4, port6, harness_mark, sorted(_owned, key=str))
    if shutil.which("nft") is None:
        raise OSError(errno.ENOENT, _NFT_MISSING)
    _run_tool(["ip", "-batch", "-"], "\n".join(_CATCH_ALL_ROUTES) + "\n",
              "the `ip` command (iproute2) is not installed")
    _run_tool(["nft", "-f", "-"], ruleset, _NFT_MISSING)
    _catch_all_installed = True


def _mark_local_for_wildcard_listeners(addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
    lines = [f"add element inet {CATCH_ALL_TABLE} local{address.version} {{ {address} }}"
             for address in addresses if not _always_local(address)]
    if lines:
        _run_tool(["nft", "-f", "-"], "\n".join(lines) + "\n", _NFT_MISSING)


def _send_message(channel: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    payload = json.dumps(message).encode()
    if fds:
        socket.send_fds(channel, [payload], list(fds))
    else:
        channel.send(payload)


def _new_socket(request: dict[str, Any]) -> socket.socket:
    created = socket.socket(int(request["family"]), int(request["type"]), int(request["proto"]))
    try:
        # Set here, where the helper holds CAP_NET_ADMIN over the namespace (also through a
        # user namespace): IP_TRANSPARENT and SO_MARK both need it (ip(7), socket(7)).
        if request.get("transparent"):
            if created.family == socket.AF_INET6:
                created.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            else:
                created.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        if request.get("mark") is not None:
            created.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(request["mark"]))
    except BaseException:
        created.close()
        raise
    return created


def _handle_request(channel: socket.socket, request: dict[str, Any]) -> None:
    operation = request.get("op")
    if operation == "socket":
        created: list[socket.socket] = []
        try:
            for _ in range(min(max(int(request.get("count", 1)), 1), SOCKET_BATCH)):
                created.append(_new_socket(request))
            _send_message(channel, {"ok": True}, [sock.fileno() for sock in created])
        finally:
            for sock in created:
                sock.close()
    elif operation == "add_addresses":
        _add_addresses_to_loopback([str(text) for text in request["addresses"]])
        _send_message(channel, {"ok": True})
    elif operation == "owned":
        _send_message(channel, {"ok": True, "addresses": sorted(str(address) for address in _owned)})
    elif operation == "catch_all":
        _install_catch_all(int(request["port4"]), int(request["port6"]), int(request["mark"]))
        _send_message(channel, {"ok": True})
    elif operation == "syn_counts":
        if not _catch_all_installed:
            raise OSError(errno.ENOENT, "no catch-all ruleset, so no SYN counter, in this namespace")
        _send_message(channel, {"ok": True, "counts": _syn_counts()})
    elif operation == "ping":
        _send_message(channel, {"ok": True})
    else:
        _send_message(channel, {"ok": False, "error": f"unknown operation {operation!r}"})


def _serve(channel_fd: int) -> int:
    """Entry point of the helper process: enter a new netns, then serve requests until EOF."""
    channel = socket.socket(fileno=channel_fd)
    try:
        mode = _enter_new_netns()
        _bring_loopback_up()
    except OSError as exc:
        _send_message(channel, {"ok": False, "error": f"{exc.strerror or exc}", "errno": exc.errno})
        return 1
    _send_message(channel, {"ok": True, "mode": mode})
    while True:
        # The parent's end closes when the parent exits or calls close(): EOF ends the helper, so a
        # crashed pytest never leaves a helper behind.
        raw = channel.recv(MAX_MESSAGE_BYTES)
        if not raw:
            return 0
        try:
            _handle_request(channel, json.loads(raw))
        except OSError as exc:
            _send_message(channel, {"ok": False, "error": exc.strerror or str(exc), "errno": exc.errno})
        except (ValueError, KeyError, TypeError) as exc:
            _send_message(channel, {"ok": False, "error": f"bad request: {type(exc).__name__}: {exc}"})


# --------------------------------------------------------------------------------------------------
# The holder (runs in the pytest process)
# --------------------------------------------------------------------------------------------------

# `python -I` (isolated: no user site, no PYTHON* variables, no cwd on sys.path), then import this
# module from the directory that holds the package, so the helper runs the exact code under test.
_HELPER_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from pytest_sandbox.network.netns import _serve; sys.exit(_serve(int(sys.argv[2])))"
)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])

_UNSUPPORTED_HINT = (
    "run as root, or allow unprivileged user namespaces "
    "(sysctl user.max_user_namespaces > 0 and kernel.unprivileged_userns_clone=1 where it exists; "
    "container runtimes may also need seccomp/AppArmor to permit unshare)"
)


def _receive_with_fds(channel: socket.socket, max_fds: int) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carries (at most ``max_fds``), each close-on-exec as it arrives
    (MSG_CMSG_CLOEXEC, recvmsg(2)): a lab socket waiting in the pool is never inherited by a process the
    harness starts meanwhile. Not socket.recv_fds, which drops its ``flags`` argument (CPython 3.11-3.13)."""
    raw, ancillary, _flags, _address = channel.recvmsg(
        MAX_MESSAGE_BYTES, socket.CMSG_LEN(max_fds * array.array("i").itemsize), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return raw, list(fds)


class NetnsHolder:
    """A helper process holding a private network namespace (only ``lo``, up) for the lab.

    Use :meth:`start`; the constructor is internal. Safe to share between threads.
    """

    def __init__(self, *, name: str, process: subprocess.Popen[bytes], channel: socket.socket,
                 mode: str) -> None:
        self.name = name
        self._process = process
        self._channel = channel
        self._lock = threading.Lock()
        self._closed = False
        # Sockets made in a batch and not handed out yet, by kind (family, type, proto, transparent, mark).
        self._pool: dict[tuple[int, int, int, bool, int | None], list[socket.socket]] = {}
        self.mode = mode  # "root" (netns only) or "user" (user namespace + netns)
        self.netns_id: NetnsId = _netns_id_of_path(self.netns_path)
        self._userns_path = f"/proc/{process.pid}/ns/user" if mode == "user" else None

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def start(cls, *, name: str) -> NetnsHolder:
        """Start a helper in a new network namespace and wait until ``lo`` is up.

        Raises HostUnsupportedError when this host cannot create a network namespace.
        """
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [helper_interpreter(), "-I", "-c", _HELPER_BOOTSTRAP, _PACKAGE_PARENT,
                 str(child_end.fileno())],
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                # Its own session: a terminal Ctrl-C interrupts pytest, which then tears the lab down
                # in order, instead of killing the helper under it. EOF on the channel still ends it.
                start_new_session=True,
            )
        except OSError as exc:
            parent_end.close()
            raise HostUnsupportedError(f"cannot start the namespace helper for {name!r}: {exc}") from exc
        finally:
            child_end.close()
        try:
            ready = cls._await_ready(parent_end, process, name)
        except BaseException:
            parent_end.close()
            _stop_process(process)
            raise
        return cls(name=name, process=process, channel=parent_end, mode=str(ready.get("mode")))

    @staticmethod
    def _await_ready(channel: socket.socket, process: subprocess.Popen[bytes], name: str
                     ) -> dict[str, Any]:
        # poll, not select: select() cannot watch a descriptor numbered 1024 or above.
        poller = select.poll()
        poller.register(channel, select.POLLIN)
        readable = poller.poll(HELPER_START_TIMEOUT_SECONDS * 1000)
        raw = channel.recv(MAX_MESSAGE_BYTES) if readable else b""
        if not raw:
            what = "exited before it was ready" if readable else (
                f"was not ready within {HELPER_START_TIMEOUT_SECONDS:g} s")
            stderr = _stop_process(process)
            raise HostUnsupportedError(
                f"the network namespace helper for {name!r} {what}"
                + (f": {stderr.splitlines()[-1]}" if stderr else "")
            )
        message: dict[str, Any] = json.loads(raw)
        if not message.get("ok"):
            raise HostUnsupportedError(
                f"cannot create a private network namespace for {name!r}: {message.get('error')}; "
                f"{_UNSUPPORTED_HINT}"
            )
        return message

    def close(self) -> None:
        """Stop the helper (kill by PID, then wait). Idempotent.

        Sockets already handed out stay valid: each keeps the namespace alive by itself.
        """
        with self._lock:
            spares = [sock for waiting in self._pool.values() for sock in waiting]
            self._pool.clear()
            stopped, self._closed = self._closed, True
            if not stopped:
                self._channel.close()
        for sock in spares:
            sock.close()
        if not stopped:
            _stop_process(self._process)

    def __enter__(self) -> NetnsHolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pid={self.pid}"
        return f"<NetnsHolder {self.name!r} {state} mode={self.mode} netns={self.netns_id[1]}>"

    # -- identity --------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def netns_path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def userns_path(self) -> str | None:
        """The helper's user namespace, or None when root created only a network namespace."""
        return self._userns_path

    # -- requests --------------------------------------------------------------------------------

    def _request(self, message: dict[str, Any]) -> None:
        _reply, fds = self._exchange(message)
        for fd in fds:
            os.close(fd)

    def _exchange(self, message: dict[str, Any], max_fds: int = 1) -> tuple[dict[str, Any], list[int]]:
        """Send one request; return the helper's reply and the descriptors it passed (at most ``max_fds``,
        close-on-exec). Raises OSError (closing any descriptor) when the helper refused."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"namespace holder {self.name!r} is closed")
            try:
                self._channel.settimeout(HELPER_REQUEST_TIMEOUT_SECONDS)
                self._channel.send(json.dumps(message).encode())
                raw, fds = _receive_with_fds(self._channel, max_fds)
            except OSError as exc:
                # A lost or late reply would desynchronise every later request: give up on the helper.
                self._closed = True
                self._channel.close()
                _stop_process(self._process)
                raise RuntimeError(f"namespace holder {self.name!r} stopped answering: {exc}") from exc
            if not raw:  # EOF: the helper is gone, and nothing will answer again
                self._closed = True
                self._channel.close()
                _stop_process(self._process)
                raise RuntimeError(f"namespace holder {self.name!r} (pid {self.pid}) exited unexpectedly")
        reply: dict[str, Any] = json.loads(raw)
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise OSError(reply.get("errno") or errno.EIO, str(reply.get("error")))
        return reply, list(fds)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
               proto: int = 0, *, transparent: bool = False, mark: int | None = None,
               batch: int = 1) -> socket.socket:
        """Return a new socket created inside this namespace (blocking, close-on-exec, never used before).

        ``transparent`` sets IP_TRANSPARENT / IPV6_TRANSPARENT, ``mark`` SO_MARK, both by the helper. With
        ``batch`` above 1 (at most :data:`SOCKET_BATCH`) the helper makes that many of the kind at once and
        the rest wait in this holder's pool for the next calls asking for the same kind.
        """
        kind = (int(family), int(type), int(proto), bool(transparent), mark)
        with self._lock:
            if self._closed:  # closed, or the helper stopped answering: nothing more is handed out, pooled or not
                raise RuntimeError(f"namespace holder {self.name!r} is closed")
            waiting = self._pool.get(kind)
            if waiting:
                return waiting.pop()
        _reply, fds = self._exchange({"op": "socket", "family": kind[0], "type": kind[1], "proto": kind[2],
                                      "transparent": kind[3], "mark": mark, "count": batch},
                                     max_fds=min(max(batch, 1), SOCKET_BATCH))
        made = [socket.socket(fileno=fd) for fd in fds]
        if not made:
            raise RuntimeError(f"namespace holder {self.name!r} sent no descriptor")
        with self._lock:
            if self._closed:
                for spare in made[1:]:
                    spare.close()
            else:
                self._pool.setdefault(kind, []).extend(made[1:])
        return made[0]

    def add_address(self, addr: str) -> None:
        """Add ``addr`` to this namespace's ``lo`` (IPv4 /32 or IPv6 /128) and to what the lab owns
        (:meth:`owned_addresses`); a no-op for an address it already owns and for 127.0.0.0/8, ::1."""
        self.add_addresses([addr])

    def add_addresses(self, addresses: Sequence[str]) -> None:
        """Add several addresses to ``lo`` with one iproute2 invocation."""
        normalized = [str(ipaddress.ip_address(text)) for text in addresses]
        try:
            self._request({"op": "add_addresses", "addresses": normalized})
        except OSError as exc:
            raise HostUnsupportedError(
                f"cannot add {', '.join(normalized)} to the lab's lo: {exc.strerror or exc}"
            ) from exc

    def owned_addresses(self) -> frozenset[str]:
        """Every address this lab gave itself with :meth:`add_address` (canonical text).

        Together with 127.0.0.0/8 and ::1 (:meth:`owns`) these are the addresses a wildcard
        listener (0.0.0.0 / ::) in the lab really receives connections on: the catch-all's AnyIP
        routes make *every* address local to a bind(2) probe, but its nft sets let a connection
        reach a wildcard listener only on these, and divert the rest to the catch-all. Read from
        the helper, which keeps lo and the sets equal to this record.
        """
        reply, fds = self._exchange({"op": "owned"})
        for fd in fds:
            os.close(fd)
        return frozenset(str(text) for text in reply["addresses"])

    def owns(self, addr: str) -> bool:
        """Whether a wildcard listener in this lab receives connections to ``addr`` (see
        :meth:`owned_addresses`); an IPv4-mapped address is its IPv4 address."""
        address = ipaddress.ip_address(addr.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return _always_local(address) or str(address) in self.owned_addresses()

    def install_catch_all(self, port4: int, port6: int, harness_mark: int = HARNESS_MARK) -> None:
        """Make every address local and divert every unowned TCP connection to the catch-all ports.

        See :func:`catch_all_ruleset`. Raises HostUnsupportedError naming the missing tool (nft,
        ip) or the kernel's refusal.
        """
        try:
            self._request({"op": "catch_all", "port4": int(port4), "port6": int(port6),
                           "mark": int(harness_mark)})
        except OSError as exc:
            raise HostUnsupportedError(
                f"cannot install the catch-all canary in lab {self.name!r}: {exc.strerror or exc}") from exc

    def syn_counts(self) -> dict[tuple[str, int], int]:
        """SYNs that were not the harness's own, per destination ``(address, port)``, since the catch-all
        was installed (see :func:`catch_all_ruleset`). Raises OSError if they cannot be read."""
        reply, fds = self._exchange({"op": "syn_counts"})
        for fd in fds:
            os.close(fd)
        return {(str(address), int(port)): int(count) for address, port, count in reply["counts"]}

    # -- running commands inside the namespace ---------------------------------------------------

    def nsenter_prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this namespace.

        nsenter rather than a setns() preexec_fn: preexec_fn is unsafe once the pytest process has
        threads (the lab runs an event-loop thread), and setns(2) into a user namespace is refused
        for multithreaded callers (EINVAL), so the join has to happen in a fresh single-threaded
        process anyway. nsenter execs the target, so the Popen PID is the command's own PID.
        """
        if self._closed:
            raise RuntimeError(f"namespace holder {self.name!r} is closed")
        prefix = ["nsenter"]
        if self._userns_path is not None:
            # Join the user namespace first: it owns the netns, so joining it grants the
            # CAP_SYS_ADMIN that setns(CLONE_NEWNET) needs. Keep our uid (mapped to 0 inside).
            prefix += [f"--user={self._userns_path}", "--preserve-credentials"]
        prefix += [f"--net={self.netns_path}", "--"]
        return prefix

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this namespace; the caller stops it by PID (kill + wait)."""
        return subprocess.Popen([*self.nsenter_prefix(), *argv], **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside this namespace to completion (keyword arguments as subprocess.run)."""
        return subprocess.run([*self.nsenter_prefix(), *argv], **kwargs)


def _stop_process(process: subprocess.Popen[bytes]) -> str:
    """Kill by PID (if still running), reap, and return the tail of its stderr."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    try:
        process.wait(timeout=HELPER_EXIT_TIMEOUT_SECONDS)
    finally:
        stderr = b""
        if process.stderr is not None and not process.stderr.closed:
            with contextlib.suppress(OSError):
                stderr = process.stderr.read(MAX_MESSAGE_BYTES)
            process.stderr.close()
    return stderr.decode(errors="replace").strip()


@functools.lru_cache(maxsize=1)
def host_can_create_netns() -> tuple[bool, str]:
    """Return ``(True, how)`` if this process can create a lab namespace, else ``(False, reason)``.

    Starts and stops a real holder: the only honest test on hosts with seccomp/AppArmor/sysctl
    restrictions on unshare(2). Cached per process.
    """
    try:
        with NetnsHolder.start(name="capability-check") as holder:
            mode = holder.mode
    except HostUnsupportedError as exc:
        return (False, str(exc))
    how = "as root" if mode == "root" else "through an unprivileged user namespace"
    return (True, f"network namespaces available {how}")
