"""Benchmark: the reference egress proxy vs squid and tinyproxy vs direct, inside one lab namespace.

Everything runs on the loopback of a private network namespace (pytest_sandbox.network.lab.lab.NetworkLab), so
no packet leaves it (network.md §7). Every server is its own process started in the lab:

* an **origin** on the lab public address 11.0.0.10: port 80 answers every request with a fixed
  1 KiB body and keeps the connection alive; port 443 is a **sink** that reads ``N\\n`` and then N
  bytes and answers ``ok\\n``;
* the proxy under test on 127.0.0.1: the reference EgressProxy (this script, ``--role reference``),
  squid and tinyproxy (``pytest_sandbox.network.third_party`` commands), each skipped if absent.

The client is this process, with lab sockets, one connection at a time, no pipelining:

* ``get``: keep-alive absolute-form ``GET http://11.0.0.10/`` (origin-form for direct), a fixed
  number of requests; a proxy that closes after a response is reconnected to (and that is counted);
* ``connect``: ``CONNECT 11.0.0.10:443`` then a bulk upload through the tunnel until the sink says ok.

Rounds are interleaved across targets (each round starts at the next target, so no target always
runs first). The machine is shared, so a ratio is taken **per round**, between two measurements a few
seconds apart, and the median of those paired ratios is the verdict; the best round per target is
shown too. Targets (issue #3): reference >= squid's req/s; CONNECT >= 0.7x direct.

``--baseline REV`` adds the reference proxy as committed at ``REV`` (``git archive`` into a temporary
directory, run from there) as targets ``baseline`` / ``baseline+uvloop``, interleaved with the working
tree's: a before/after comparison under the same load.

    python benchmarks/bench_proxy.py [--requests 3000] [--bulk-mib 256] [--rounds 5] [--baseline main]
                                     [--load L] [--churn C]

``--load L`` / ``--churn C`` run background.py's fixed load (L busy loops, C launch loops) during the measured rounds.

Two measurements that need no lab and hold still on a busy machine (CPU time, not rates):

* ``--python-only N``: the Python CPU of N one-pass keep-alive GETs (``_ClientConnection`` and an idle
  ``UpstreamConnection`` driven with in-memory transports: framing, judging, the decision record, the
  upstream request and the answer; no socket, no event-loop pass), in µs per GET.
* ``--relay-cpu MIB``: client -> relay -> sink on 127.0.0.1 (three processes, one connection), CPU per GiB of
  each and the upload's MiB/s, for no relay (direct), the tunnel's own relay (``recv_into``/``send`` through a
  1 MiB buffer, a thread per direction) and, in the same thread model, the ``splice(2)`` relay through a 1 MiB
  pipe that the proxy used until issue #12's twelfth pass, alternating, ``--rounds`` times. The rates are
  rates on a shared machine; the CPU per GiB is what holds still.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from background import background_load, describe, loadavg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ORIGIN_ADDRESS = "11.0.0.10"  # lab public origin (global unicast, bound only on the lab's lo)
HTTP_PORT = 80
SINK_PORT = 443
PROXY_ADDRESS = "127.0.0.1"
BODY = b"x" * 1024
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1024\r\n\r\n" + BODY)
HEAD_END = b"\r\n\r\n"
CHUNK = 256 * 1024
IO_TIMEOUT_SECONDS = 20.0


# --------------------------------------------------------------------------------------------------
# Server roles (run inside the lab by lab.popen)
# --------------------------------------------------------------------------------------------------


class _OriginProtocol(asyncio.Protocol):
    """Answer each complete request head with the fixed 1 KiB response (GETs carry no body)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        count = self.buffer.count(HEAD_END)
        if count:
            self.buffer = self.buffer[self.buffer.rindex(HEAD_END) + len(HEAD_END):]
            self.transport.write(RESPONSE * count)


def _sink_connection(conn: socket.socket) -> None:
    with conn:
        buffer = bytearray()
        while b"\n" not in buffer:
            data = conn.recv(64)
            if not data:
                return
            buffer += data
        line, _, rest = bytes(buffer).partition(b"\n")
        remaining = int(line) - len(rest)
        scratch = bytearray(CHUNK)
        while remaining > 0:
            received = conn.recv_into(scratch)
            if not received:
                return
            remaining -= received
        conn.sendall(b"ok\n")


def _serve_sink(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_sink_connection, args=(conn,), daemon=True).start()


def run_origin(http_fd: int, sink_fd: int) -> None:
    sink = socket.socket(fileno=sink_fd)
    threading.Thread(target=_serve_sink, args=(sink,), daemon=True).start()

    async def main() -> None:
        http = socket.socket(fileno=http_fd)
        server = await asyncio.get_running_loop().create_server(_OriginProtocol, sock=http)
        await server.serve_forever()

    asyncio.run(main())


def run_reference(port: int, loop_name: str, profile_path: str | None) -> None:
    from pytest_sandbox.network.proxy.config import ProxyConfig
    from pytest_sandbox.network.proxy.server import EgressProxy
    from pytest_sandbox.network.proxy.server import run_on_loop as run_loop
    from pytest_sandbox.network.route_lookup import local_route_socket

    async def resolve(name: str) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((PROXY_ADDRESS, port))
    listener.listen(128)
    # This process lives in the lab namespace (lab.popen), so plain sockets are lab sockets.
    proxy = EgressProxy(ProxyConfig(), resolver=resolve, socket_factory=socket.socket,
                        route_socket_factory=local_route_socket)
    if profile_path is None:
        run_loop(proxy.serve(listener), loop_name)
        return
    import cProfile

    profiler = cProfile.Profile()

    async def profiled() -> None:
        # The process is killed by PID at the end, so the profile is written every second.
        loop = asyncio.get_running_loop()

        def dump() -> None:
            profiler.dump_stats(f"{profile_path}.partial")  # then renamed: a kill never leaves half a file
            os.replace(f"{profile_path}.partial", profile_path)
            profiler.enable()
            loop.call_later(1.0, dump)

        loop.call_later(1.0, dump)
        profiler.enable()
        await proxy.serve(listener)

    run_loop(profiled(), loop_name)


# --------------------------------------------------------------------------------------------------
# --python-only: the proxy's Python work per one-pass GET, without sockets
# --------------------------------------------------------------------------------------------------


class _MemoryTransport(asyncio.Transport):
    """A transport that keeps nothing: ``written`` counts writes, ``on_write`` sees each one."""

    def __init__(self, on_write: Callable[[bytes], None] | None = None) -> None:
        super().__init__()
        self.on_write = on_write
        self.written = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += 1
        if self.on_write is not None:
            self.on_write(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("10.0.0.1", 40000) if name == "peername" else default

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def measure_python_path(count: int) -> float:
    """µs of CPU (process time) per one-pass keep-alive GET of the reference proxy, sockets left out."""
    from pytest_sandbox.network.proxy import server
    from pytest_sandbox.network.proxy.config import ProxyConfig
    from pytest_sandbox.network.proxy.upstream import UpstreamConnection

    request = f"GET http://{ORIGIN_ADDRESS}/ HTTP/1.1\r\nHost: {ORIGIN_ADDRESS}\r\n\r\n".encode()

    async def resolve(name: str) -> list[str]:
        raise AssertionError(f"a literal target was resolved: {name}")

    async def run() -> float:
        proxy = server.EgressProxy(ProxyConfig(), resolver=resolve, socket_factory=socket.socket,
                                   route_socket_factory=None)
        client = server._ClientConnection(proxy)
        client_transport = _MemoryTransport()
        client.connection_made(client_transport)
        conn = client._conn
        assert conn is not None and conn.budget is not None, "the proxy did not take the one-pass path"
        sent: list[bytes] = []
        upstream = UpstreamConnection((ORIGIN_ADDRESS, HTTP_PORT), max_body=proxy.config.max_body,
                                      reserve=conn.budget)
        upstream.connection_made(_MemoryTransport(sent.append))
        conn.upstreams[upstream.key] = upstream
        elapsed = 0.0
        for _ in range(2):  # the first pass warms the caches
            started = time.process_time()
            for _ in range(count):
                client.data_received(request)
                if not sent:
                    raise AssertionError("the request was not forwarded in one pass")
                sent.clear()
                upstream.data_received(RESPONSE)
            elapsed = time.process_time() - started
        if client_transport.written < count or client._busy or len(proxy.decisions) < count:
            raise AssertionError("not every request was answered and recorded")
        return elapsed / count * 1e6

    return asyncio.run(run())


# --------------------------------------------------------------------------------------------------
# --relay-cpu: CPU per GiB of client, relay and sink, the tunnel's copy relay against splice(2)
# --------------------------------------------------------------------------------------------------

_SPLICE_PIPE_SIZE = 1 << 20  # fcntl(2) F_SETPIPE_SZ, as the proxy's splice relay had it


def _splice_direction(source: socket.socket, sink: socket.socket) -> None:
    """socket -> pipe -> socket with splice(2), blocking, until EOF; then half-close the sink."""
    import fcntl

    pipe_out, pipe_in = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, _SPLICE_PIPE_SIZE)
        while moved := os.splice(source.fileno(), pipe_in, _SPLICE_PIPE_SIZE, flags=os.SPLICE_F_MOVE):
            while moved:
                moved -= os.splice(pipe_out, sink.fileno(), moved, flags=os.SPLICE_F_MOVE)
        sink.shutdown(socket.SHUT_WR)
    finally:
        os.close(pipe_out)
        os.close(pipe_in)


def _relay_child(kind: str, listener: socket.socket, sink_port: int, report: int) -> None:
    from pytest_sandbox.network.proxy import relay

    client, _ = listener.accept()
    upstream = socket.create_connection((PROXY_ADDRESS, sink_port))
    started = time.process_time()
    if kind == "copy":
        tunnel = relay._ThreadedTunnel(client, upstream, lambda error: None)
        tunnel.start()
        for thread in tunnel._threads:
            thread.join()
    else:
        pairs = ((client, upstream), (upstream, client))
        threads = [threading.Thread(target=_splice_direction, args=pair) for pair in pairs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    os.write(report, f"{time.process_time() - started}\n".encode())


def _sink_child(listener: socket.socket, total: int, report: int) -> None:
    conn, _ = listener.accept()
    started = time.process_time()
    scratch = bytearray(CHUNK)
    received = 0
    while received < total and (piece := conn.recv_into(scratch)):
        received += piece
    os.write(report, f"{time.process_time() - started}\n".encode())
    conn.sendall(b"ok")
    conn.close()


def _forked(target: Callable[..., None], *args: object) -> tuple[int, int]:
    """Run ``target(*args, report_fd)`` in a child; returns (pid, read end of its report pipe)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            target(*args, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


def _child_seconds(pid: int, report: int) -> float:
    with os.fdopen(report) as stream:
        line = stream.readline()
    os.waitpid(pid, 0)
    return float(line)


def measure_relay_cpu(kind: str, total: int) -> tuple[float, float, float, float]:
    """CPU seconds of (client, sink, relay) for ``total`` bytes uploaded through ``kind`` (direct, copy, splice),
    and the wall seconds from the first byte sent to the sink's answer."""
    sink_listener, relay_listener = socket.socket(), socket.socket()
    for listener in (sink_listener, relay_listener):
        listener.bind((PROXY_ADDRESS, 0))
        listener.listen(1)
    sink_port, relay_port = sink_listener.getsockname()[1], relay_listener.getsockname()[1]
    children = [_forked(_sink_child, sink_listener, total)]
    if kind != "direct":
        children.append(_forked(_relay_child, kind, relay_listener, sink_port))
    sink_listener.close()
    relay_listener.close()
    payload = memoryview(bytes(CHUNK))
    with socket.create_connection((PROXY_ADDRESS, sink_port if kind == "direct" else relay_port),
                                  timeout=IO_TIMEOUT_SECONDS) as sock:
        started, wall_started = time.process_time(), time.perf_counter()
        sent = 0
        while sent < total:
            sock.sendall(payload)
            sent += CHUNK
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(8) != b"ok":
            raise ConnectionError(f"{kind}: the sink did not acknowledge")
        client, wall = time.process_time() - started, time.perf_counter() - wall_started
    seconds = [_child_seconds(pid, report) for pid, report in children]
    return client, seconds[0], seconds[1] if len(seconds) > 1 else 0.0, wall


# --------------------------------------------------------------------------------------------------
# Client (this process, lab sockets)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    port: int
    via_proxy: bool
    markers: tuple[str, ...] = ()  # substrings of the proxy's command line, to find its processes


def _cpu_seconds(markers: tuple[str, ...]) -> float:
    """User+system CPU seconds of every process whose command line holds all ``markers`` (proc(5):
    /proc/PID/stat fields 14-15, all threads): CPU per request holds still when the machine is busy."""
    if not markers:
        return 0.0
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not all(marker in command for marker in markers):
                continue
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of every CPU since boot (proc(5): the ``cpu`` line of /proc/stat; idle and
    iowait are not busy; steal is, as time the machine's CPUs did not give to it)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


@dataclass(frozen=True)
class GetResult:
    requests_per_second: float
    connections: int


def _read_response(sock: socket.socket, buffer: bytearray) -> bool:
    """Read one response into/through ``buffer``; return whether the server will close the connection."""
    while HEAD_END not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a response head")
        buffer += data
    head_length = buffer.index(HEAD_END) + len(HEAD_END)
    head = bytes(buffer[:head_length]).lower()
    if not head.startswith(b"http/1.1 200") and not head.startswith(b"http/1.0 200"):
        raise ConnectionError(f"unexpected response: {head[:80]!r}")
    start = head.index(b"content-length:") + len(b"content-length:")
    length = int(head[start:head.index(b"\r\n", start)])
    while len(buffer) < head_length + length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed inside a response body")
        buffer += data
    del buffer[:head_length + length]
    return b"connection: close" in head or head.startswith(b"http/1.0")


def measure_gets(connect: Callable[[], socket.socket], target: Target, count: int) -> GetResult:
    if target.via_proxy:
        request = f"GET http://{ORIGIN_ADDRESS}/ HTTP/1.1\r\nHost: {ORIGIN_ADDRESS}\r\n\r\n".encode()
    else:
        request = f"GET / HTTP/1.1\r\nHost: {ORIGIN_ADDRESS}\r\n\r\n".encode()
    connections = 0
    served_on_connection = 0
    sock: socket.socket | None = None
    buffer = bytearray()
    started = time.perf_counter()
    try:
        for _ in range(count):
            if sock is None:
                sock = connect()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                connections += 1
                served_on_connection = 0
                buffer.clear()
            try:
                sock.sendall(request)
                closing = _read_response(sock, buffer)
            except (ConnectionError, BrokenPipeError) as exc:
                if served_on_connection == 0:
                    raise ConnectionError(f"{target.name}: {exc}") from exc
                # tinyproxy 1.11 closes after each response without saying so (network.md §6):
                # reconnect and send the request again, as a client library would.
                sock.close()
                sock = connect()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                connections += 1
                served_on_connection = 0
                buffer.clear()
                sock.sendall(request)
                closing = _read_response(sock, buffer)
            served_on_connection += 1
            if closing:
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
    elapsed = time.perf_counter() - started
    return GetResult(count / elapsed, connections)


def measure_bulk(connect: Callable[[], socket.socket], target: Target, total: int) -> float:
    """MiB/s of ``total`` bytes uploaded to the sink (through a CONNECT tunnel unless direct)."""
    payload = memoryview(b"\0" * CHUNK)
    started = time.perf_counter()
    with connect() as sock:
        if target.via_proxy:
            sock.sendall(f"CONNECT {ORIGIN_ADDRESS}:{SINK_PORT} HTTP/1.1\r\nHost: {ORIGIN_ADDRESS}:{SINK_PORT}"
                         "\r\n\r\n".encode())
            head = bytearray()
            while HEAD_END not in head:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("proxy closed the CONNECT")
                head += data
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                raise ConnectionError(f"CONNECT refused: {bytes(head[:80])!r}")
        sock.sendall(f"{total}\n".encode())
        sent = 0
        while sent < total:
            piece = payload[:min(CHUNK, total - sent)]
            sock.sendall(piece)
            sent += len(piece)
        reply = b""
        while b"\n" not in reply:
            data = sock.recv(64)
            if not data:
                raise ConnectionError("sink closed before acknowledging")
            reply += data
    elapsed = time.perf_counter() - started
    return total / elapsed / 2**20


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="1 KiB GETs per target per round")
    parser.add_argument("--bulk-mib", type=int, default=256,
                        help="MiB uploaded through CONNECT per round (64 MiB is ~30 ms direct: too short to time)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", metavar="REV",
                        help="also run the reference proxy as committed at REV (git archive), interleaved")
    parser.add_argument("--loops", default="asyncio,uvloop",
                        help="event loops to run the reference proxy on, comma-separated (asyncio, uvloop); "
                             "uvloop is skipped with a note when it is not installed")
    parser.add_argument("--profile", metavar="PATH",
                        help="cProfile the reference proxy (first loop only) and write the stats to PATH")
    parser.add_argument("--only", default="",
                        help="comma-separated targets to run besides direct (default: all)")
    parser.add_argument("--python-only", type=int, metavar="N",
                        help="only the Python CPU per one-pass GET, N GETs, no sockets (see above)")
    parser.add_argument("--relay-cpu", type=int, metavar="MIB",
                        help="only client/relay/sink CPU per GiB on loopback: direct, splice and copy relays")
    parser.add_argument("--load", type=int, default=0,
                        help="busy-looping background processes during the measured rounds (default 0; background.py)")
    parser.add_argument("--churn", type=int, default=0,
                        help="background processes launching /bin/true back to back (default 0; background.py)")
    parser.add_argument("--role", choices=["origin", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    parser.add_argument("--fds", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "origin":
        run_origin(*args.fds)
        return 0
    if args.role == "reference":
        run_reference(args.port, args.loop, args.profile)
        return 0
    if args.python_only:
        for _ in range(args.rounds):
            print(f"python per one-pass GET: {measure_python_path(args.python_only):.1f} µs "
                  f"({args.python_only} GETs, process time)")
        return 0
    if args.relay_cpu:
        total = args.relay_cpu * 2**20
        sums: dict[str, list[float]] = {}
        rates: dict[str, list[float]] = {}
        print(f"relay CPU per GiB (ms) and MiB/s, {args.relay_cpu} MiB per run, 127.0.0.1; "
              f"{describe(args.load, args.churn)}; load average {loadavg()}")
        with background_load(args.load, args.churn):
            for _ in range(args.rounds):
                for kind in ("direct", "copy", "splice"):
                    *cpu, wall = measure_relay_cpu(kind, total)
                    client, sink, relay = (seconds / (total / 2**30) * 1e3 for seconds in cpu)
                    sums.setdefault(kind, []).append(client + sink + relay)
                    rates.setdefault(kind, []).append(total / 2**20 / wall)
                    print(f"  {kind:6s} client {client:5.0f}  sink {sink:5.0f}  relay {relay:5.0f}  "
                          f"sum {client + sink + relay:5.0f}  {rates[kind][-1]:6.0f} MiB/s")
        print("median sum: " + ", ".join(f"{kind} {statistics.median(values):.0f}" for kind, values in sums.items()))
        ratios = {kind: statistics.median(rate / direct for rate, direct in zip(values, rates["direct"], strict=True))
                  for kind, values in rates.items() if kind != "direct"}
        print("median of the per-round rate ratios to direct: "
              + ", ".join(f"{kind} {ratio:.2f}x" for kind, ratio in ratios.items()))
        print(f"load average at the end: {loadavg()}")
        return 0

    from pytest_sandbox.network.lab.lab import NetworkLab
    from pytest_sandbox.network.third_party import (
        ProxyStartError,
        squid_command,
        start_proxy_command,
        tinyproxy_command,
    )

    lab = NetworkLab.start((), ports=(), public_origins=(), name="bench-proxy")
    processes: list[subprocess.Popen[bytes]] = []
    stoppers: list[Callable[[], None]] = []
    state = tempfile.mkdtemp(prefix="bench-proxy-")
    load = contextlib.ExitStack()
    try:
        http = lab.listen(ORIGIN_ADDRESS, HTTP_PORT)
        sink = lab.listen(ORIGIN_ADDRESS, SINK_PORT)
        origin = lab.popen([sys.executable, __file__, "--role", "origin", "--fds", str(http.fileno()),
                            str(sink.fileno())], pass_fds=(http.fileno(), sink.fileno()))
        processes.append(origin)
        http.close()
        sink.close()

        targets = [Target("direct", ORIGIN_ADDRESS, HTTP_PORT, via_proxy=False)]
        notes: list[str] = []
        commands: dict[str, str] = {}
        scripts = {"reference": __file__}
        if args.baseline:
            baseline = Path(state) / "baseline"
            baseline.mkdir()
            repository = Path(__file__).resolve().parent.parent
            archive = subprocess.run(["git", "-C", str(repository), "archive", args.baseline],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
            scripts["baseline"] = str(baseline / "benchmarks" / "bench_proxy.py")
        for index, loop_name in enumerate(name for name in args.loops.split(",") if name):
            if loop_name == "uvloop" and importlib.util.find_spec("uvloop") is None:
                notes.append("reference on uvloop: uvloop not installed (pip install 'pytest-sandbox[fast]'), skipped")
                continue
            profile = f" --profile {args.profile}" if args.profile and index == 0 else ""
            for kind, script in scripts.items():
                label = kind if loop_name == "asyncio" else f"{kind}+{loop_name}"
                commands[label] = (f"{sys.executable} {script} --role reference --loop {loop_name}"
                                   f"{profile if kind == 'reference' else ''} --port {{port}}")
        for name, build in (("squid", squid_command), ("tinyproxy", tinyproxy_command)):
            if shutil.which(name) or os.path.exists(f"/usr/sbin/{name}") or os.path.exists(f"/usr/bin/{name}"):
                commands[name] = build(Path(state) / name)
            else:
                notes.append(f"{name}: not installed, skipped")
        only = {name for name in args.only.split(",") if name}
        for name, command in commands.items():
            if only and name not in only:
                continue
            try:
                running = start_proxy_command(lab, command, lab_dns=False)
            except ProxyStartError as exc:
                notes.append(f"{name}: did not start, skipped ({exc})")
                continue
            stoppers.append(running.stop)
            markers = (command.split(" --port")[0], f"--port {running.port}") if " --role reference" in command \
                else (str(Path(state, name).resolve()), f"{name}-{running.port}")
            targets.append(Target(name, running.address, running.port, via_proxy=True, markers=markers))

        def connector(target: Target, port: int | None = None) -> Callable[[], socket.socket]:
            return lambda: lab.connect(target.address, port or target.port, timeout=IO_TIMEOUT_SECONDS)

        load.enter_context(background_load(args.load, args.churn))
        load_start = loadavg()
        gets: dict[str, list[GetResult]] = {t.name: [] for t in targets}
        bulk: dict[str, list[float]] = {t.name: [] for t in targets}
        cpu_get = dict.fromkeys(gets, 0.0)  # the proxy's CPU seconds over every measured round
        cpu_bulk = dict.fromkeys(gets, 0.0)
        # The two ends' CPU during the uploads (this client process, the origin's sink): on loopback the kernel
        # does a receiver's TCP work in the sender's context, so a relay moves CPU between the ends as well.
        origin_markers = (__file__, "--role origin")
        cpu_ends = {name: [0.0, 0.0] for name in gets}
        # Wall seconds of the uploads and the machine's busy and total ticks meanwhile: how many cores the
        # three measured parties got, and whether the machine had any to spare.
        upload_wall = dict.fromkeys(gets, 0.0)
        upload_ticks = {name: [0, 0] for name in gets}
        total = args.bulk_mib * 2**20
        if origin.poll() is not None:
            raise RuntimeError(f"the origin exited with status {origin.returncode}")
        for target in targets:  # warm-up: connections, proxy caches of parsed targets, page cache
            measure_gets(connector(target), target, 200)
            sink_connect = connector(target, None if target.via_proxy else SINK_PORT)
            measure_bulk(sink_connect, target, 4 * 2**20)
        for round_index in range(args.rounds):
            order = targets[round_index % len(targets):] + targets[:round_index % len(targets)]
            for target in order:
                cpu = _cpu_seconds(target.markers)
                gets[target.name].append(measure_gets(connector(target), target, args.requests))
                cpu_get[target.name] += _cpu_seconds(target.markers) - cpu
                sink_connect = connector(target, None if target.via_proxy else SINK_PORT)
                cpu = _cpu_seconds(target.markers)
                ends = (time.process_time(), _cpu_seconds(origin_markers))
                ticks, wall = _machine_jiffies(), time.perf_counter()
                bulk[target.name].append(measure_bulk(sink_connect, target, total))
                upload_wall[target.name] += time.perf_counter() - wall
                upload_ticks[target.name] = [mine + now - before for mine, now, before
                                             in zip(upload_ticks[target.name], _machine_jiffies(), ticks, strict=True)]
                cpu_bulk[target.name] += _cpu_seconds(target.markers) - cpu
                cpu_ends[target.name][0] += time.process_time() - ends[0]
                cpu_ends[target.name][1] += _cpu_seconds(origin_markers) - ends[1]

        best_get = {name: max(r.requests_per_second for r in results) for name, results in gets.items()}
        median_get = {name: statistics.median(r.requests_per_second for r in results)
                      for name, results in gets.items()}
        best_bulk = {name: max(results) for name, results in bulk.items()}
        median_bulk = {name: statistics.median(results) for name, results in bulk.items()}

        def paired(values: dict[str, list[float]], name: str, against: str) -> float | None:
            """The median over rounds of name/against, each ratio from the same round."""
            if against not in values:
                return None
            return statistics.median(mine / theirs for mine, theirs in zip(values[name], values[against], strict=True))

        get_rates = {name: [r.requests_per_second for r in results] for name, results in gets.items()}

        def ratio(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}x"

        print(f"bench_proxy: {args.rounds} rounds, {args.requests} keep-alive 1 KiB GETs and "
              f"{args.bulk_mib} MiB CONNECT upload per target per round; {describe(args.load, args.churn)}; "
              f"load average at the start: {load_start}")
        print("req/s and MiB/s: best round (median); ratios: median of the per-round ratios")
        print()
        print("proxy CPU: the proxy's own processes (all threads), user+system, over every round")
        print()
        print("| target | GET req/s | vs direct | vs squid | conns | proxy CPU µs/GET | CONNECT MiB/s | vs direct "
              "| vs squid | proxy CPU ms/GiB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for target in targets:
            name = target.name
            connections = gets[name][-1].connections
            per_get = f"{cpu_get[name] / (args.requests * args.rounds) * 1e6:,.0f}" if target.markers else "-"
            per_gib = f"{cpu_bulk[name] / (total * args.rounds / 2**30) * 1e3:,.0f}" if target.markers else "-"
            print(f"| {name} | {best_get[name]:,.0f} ({median_get[name]:,.0f}) | "
                  f"{ratio(paired(get_rates, name, 'direct'))} | {ratio(paired(get_rates, name, 'squid'))} | "
                  f"{connections} | {per_get} | {best_bulk[name]:,.0f} ({median_bulk[name]:,.0f}) | "
                  f"{ratio(paired(bulk, name, 'direct'))} | {ratio(paired(bulk, name, 'squid'))} | {per_gib} |")
        print()
        for label in (name for name in best_get if name.startswith(("reference", "baseline"))):
            vs_squid = paired(get_rates, label, "squid")
            if vs_squid is not None:
                verdict = "met" if vs_squid >= 1.0 else "NOT met"
                print(f"target GET: {label} >= squid req/s: {verdict} ({vs_squid:.2f}x squid, per-round median; "
                      f"best/best {best_get[label] / best_get['squid']:.2f}x)")
            vs_direct = paired(bulk, label, "direct") or 0.0
            verdict = "met" if vs_direct >= 0.7 else "NOT met"
            print(f"target CONNECT: {label} >= 0.7x direct: {verdict} ({vs_direct:.2f}x direct, per-round median; "
                  f"best/best {best_bulk[label] / best_bulk['direct']:.2f}x)")
        print()
        print("CONNECT CPU per GiB uploaded (ms): client (this process), origin (the sink), proxy; and their sum")
        for target in targets:
            name = target.name
            gib = total * args.rounds / 2**30
            client_ms, origin_ms = (seconds / gib * 1e3 for seconds in cpu_ends[name])
            proxy_ms = cpu_bulk[name] / gib * 1e3
            print(f"  {name}: client {client_ms:,.0f}, origin {origin_ms:,.0f}, proxy {proxy_ms:,.0f}, "
                  f"sum {client_ms + origin_ms + proxy_ms:,.0f}")
        print("CONNECT uploads: cores the client, origin and proxy used together, and the machine's busy share "
              "meanwhile (a busy machine and the same cores in every row: the rate ratio is the CPU-per-GiB ratio)")
        for target in targets:
            name = target.name
            used = (sum(cpu_ends[name]) + cpu_bulk[name]) / upload_wall[name]
            busy, ticks = upload_ticks[name]
            print(f"  {name}: {used:.2f} of {os.cpu_count()} cores; machine {busy / max(ticks, 1):.0%} busy")
        print(f"load average at the end: {loadavg()}")
        for note in notes:
            print(f"note: {note}")
        return 0
    finally:
        load.close()
        for stop in stoppers:
            with contextlib.suppress(Exception):
                stop()
        for process in processes:
            _stop(process)
        lab.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
