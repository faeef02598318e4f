"""Reliability of the reference proxy and the inference interceptor under load, faults and bad input.

What an SRE would try before trusting the harness in CI (issue #10), kept as bounded checks so it stays
true: load, idle connections, slowloris, oversize heads and bodies, resets with no fd leak, a fixed-seed
Hypothesis fuzz, failed dials, the memory budget, the bounded decision log, client hang-ups, and the
no-egress check around a command. Counts are small and every wait is bounded; nothing asserts on time.
Everything runs on loopback (through the fake network of ``test_proxy``) or in a private netns.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from test_proxy import (
    ALLOWED_ADDRESS,
    ALLOWED_HOST,
    IO_TIMEOUT,
    Lab,
    RawClient,
    get,
    one_answer,
)
from test_proxy import lab as proxy_lab  # noqa: F401 - the fixture ``lab``: a fake network on loopback
from wire import HEAD_END, read_head

from pytest_sandbox.inference.ca import InterceptionCA
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.inference.interceptor import InferenceBackendConfig, InferenceInterceptor
from pytest_sandbox.network.proxy.config import ProxyConfig
from pytest_sandbox.network.proxy.server import EgressProxy

pytestmark = pytest.mark.reliability

NO_EGRESS = Path(__file__).resolve().parent.parent / ".ci" / "no_egress.py"


@pytest.fixture
def lab(proxy_lab: Lab) -> Lab:  # noqa: F811 - the imported fixture, by its own name
    """``test_proxy``'s fake network: origins on loopback behind a dial table, nothing else reachable."""
    return proxy_lab


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Poll ``condition`` up to ``seconds`` (a bound, not a timing claim)."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer closed (EOF or reset); False if it stayed open for IO_TIMEOUT."""
    sock.settimeout(IO_TIMEOUT)
    try:
        while data := sock.recv(65536):
            del data
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def connect(proxy: EgressProxy) -> socket.socket:
    (address,) = proxy.self_addresses()
    return socket.create_connection(address, timeout=IO_TIMEOUT)


# --- load, idle, slowloris ------------------------------------------------------------------------


def test_keep_alive_load_from_many_clients_is_all_answered(lab: Lab) -> None:
    proxy = lab.start_proxy()
    clients, per_client = 100, 20

    def run(index: int) -> int:
        client = RawClient(proxy)
        answered = 0
        try:
            for request in range(per_client):
                client.send(get(ALLOWED_HOST, f"/load/{index}/{request}"))
                answer = client.read_answer()
                answered += answer is not None and answer.status == 200
        finally:
            client.close()
        return answered

    with ThreadPoolExecutor(max_workers=25) as pool:
        answered = sum(pool.map(run, range(clients)))
    assert answered == clients * per_client
    routed = [d for d in proxy.decisions if d.reason == "routed"]
    assert len(routed) == clients * per_client


def test_idle_connections_are_closed_by_the_idle_deadline(lab: Lab) -> None:
    proxy = lab.start_proxy(ProxyConfig(idle_timeout=0.5))
    idle = [connect(proxy) for _ in range(50)]
    try:
        assert all(closed_by_peer(sock) for sock in idle)
    finally:
        for sock in idle:
            sock.close()


def test_slowloris_is_cut_off_while_other_clients_are_served(lab: Lab) -> None:
    proxy = lab.start_proxy(ProxyConfig(idle_timeout=1.0))
    slow = connect(proxy)
    head = get(ALLOWED_HOST, "/slow")
    cut_off = False
    try:
        for byte in head[:-2]:  # never complete: one byte every 0.1 s until the proxy hangs up
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
                break
            answer, _ = one_answer(proxy, get(ALLOWED_HOST, "/fast"))  # others are served meanwhile
            assert answer is not None and answer.status == 200
            time.sleep(0.1)
        assert cut_off or closed_by_peer(slow)
    finally:
        slow.close()
    assert "/slow" not in [request.target for request in lab.origin.requests]


# --- oversize ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [
    b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n",
    b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n" + b"X-H: v\r\n" * 10_000 + b"\r\n",
], ids=["1MiB-head", "10000-headers"])
def test_oversized_heads_get_431(lab: Lab, head: bytes) -> None:
    proxy = lab.start_proxy()
    sock = connect(proxy)
    try:
        sender = threading.Thread(target=_send_quietly, args=(sock, head), daemon=True)
        sender.start()
        reply = _read_reply(sock)
        sender.join(IO_TIMEOUT)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
    assert lab.origin.requests == []


def test_ten_gigabyte_content_length_gets_413_and_the_413_survives_a_body_in_flight(lab: Lab) -> None:
    """The body keeps coming after the refusal: the proxy must drain it (RFC 9112 §9.6) rather than close
    with unread bytes, whose RST would destroy the 413 before the client reads it."""
    proxy = lab.start_proxy()
    sock = connect(proxy)
    head = (b"POST http://allowed.test/upload HTTP/1.1\r\nHost: allowed.test\r\n"
            b"Content-Length: 10737418240\r\n\r\n")
    try:
        sock.sendall(head)
        _send_quietly(sock, b"x" * (8 * 2**20))  # 8 MiB of the body, sent before reading anything
        reply = _read_reply(sock)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:100]
    assert [d.reason for d in proxy.decisions] == ["framing:body-too-large"]
    assert lab.origin.requests == []


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the proxy may refuse and close before everything was sent


def _read_reply(sock: socket.socket) -> bytes:
    sock.settimeout(IO_TIMEOUT)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# --- resets and descriptors ------------------------------------------------------------------------


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def test_resets_mid_head_mid_body_and_mid_tunnel_leak_no_descriptor(lab: Lab) -> None:
    proxy = lab.start_proxy()
    warm = RawClient(proxy)
    warm.send(get(ALLOWED_HOST, "/warm"))
    assert (warm.read_answer() or pytest.fail("no answer")).status == 200
    warm.close()
    time.sleep(0.2)
    before = open_fds()
    for round_ in range(60):
        sock = connect(proxy)
        kind = round_ % 3
        if kind == 0:
            sock.sendall(b"GET http://allowed.test/ HTTP/1.1\r\nHo")
        elif kind == 1:
            sock.sendall(b"POST http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 100\r\n\r\nab")
        else:
            sock.sendall(b"CONNECT echo.test:443 HTTP/1.1\r\nHost: echo.test:443\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"ping")
            assert sock.recv(4096) == b"ping"
        _reset(sock)
    assert settle(lambda: open_fds() <= before), f"descriptors: {before} before, {open_fds()} after 60 resets"
    answer, _ = one_answer(proxy, get(ALLOWED_HOST, "/after"))
    assert answer is not None and answer.status == 200


# --- fuzz -------------------------------------------------------------------------------------------

_FUZZ_PIECES = [
    b"GET ", b"POST ", b"CONNECT ", b"http://allowed.test/", b"http://metadata.test/", b"169.254.169.254:80",
    b"echo.test:443", b" HTTP/1.1", b" HTTP/1.0", b"\r\n", b"\n", b"Host: allowed.test", b"Host: metadata.test",
    b"Content-Length: 5", b"Content-Length: -1", b"Transfer-Encoding: chunked", b"0\r\n\r\n", b"5\r\nhello",
    b": ", b"\x00", b" ", b"\t", b"\r\n\r\n",
]


@pytest.fixture(scope="module")
def fuzz_proxy() -> object:
    from test_proxy import EchoServer, FakeNetwork, FakeResolver, Origin

    origin, echo = Origin(), EchoServer()
    network = FakeNetwork({(ALLOWED_ADDRESS, 80): origin.port, ("93.184.215.20", 443): echo.port})
    resolver = FakeResolver({ALLOWED_HOST: [ALLOWED_ADDRESS], "echo.test": ["93.184.215.20"],
                             "metadata.test": ["169.254.169.254"]})
    state = Lab(origin, echo, network, resolver)
    proxy = state.start_proxy(ProxyConfig(idle_timeout=0.5))
    yield state, proxy
    proxy.stop()
    origin.close()
    echo.close()
    assert network.unexpected == [], f"the proxy dialled unchecked addresses: {network.unexpected}"


@seed(1010)
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(st.lists(st.sampled_from(_FUZZ_PIECES), max_size=14).map(b"".join), st.binary(max_size=300)))
def test_fuzzed_request_bytes_never_crash_hang_or_forward_without_an_allow(fuzz_proxy: object, payload: bytes) -> None:
    state, proxy = fuzz_proxy  # type: ignore[misc]
    dials_before, requests_before = len(state.network.dials), len(state.origin.requests)
    mark = proxy.last_seq
    sock = connect(proxy)
    try:
        _send_quietly(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(IO_TIMEOUT)
        closed = closed_by_peer(sock)  # no hang: the proxy ends every connection within the bound
    finally:
        sock.close()
    assert closed, f"the proxy held the connection open for {IO_TIMEOUT} s after {payload!r}"
    assert settle(lambda: proxy.last_seq >= mark, 2)
    decisions = proxy.decisions_since(mark)
    allowed = [d for d in decisions if d.action == "allow"]
    dials = len(state.network.dials) - dials_before
    assert dials <= len(allowed), f"{dials} dial(s) but {len(allowed)} allow decision(s) for {payload!r}: {decisions}"
    assert len(state.origin.requests) - requests_before <= len(allowed)
    assert proxy.buffered_bytes == 0 or settle(lambda: proxy.buffered_bytes == 0, 2)


# --- failed dials, memory budget, bounded decision log -------------------------------------------


def test_a_socket_factory_that_raises_is_answered_502_and_recorded(lab: Lab) -> None:
    def exhausted(family: int) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    lab.network.socket_factory = exhausted  # type: ignore[method-assign]
    proxy = lab.start_proxy()
    answer, closed = one_answer(proxy, get(ALLOWED_HOST, "/emfile"))
    assert answer is not None and answer.status == 502 and closed
    assert answer.json()["error"] == "upstream_unreachable" and "Too many open files" in answer.json()["detail"]
    (decision,) = proxy.decisions
    assert (decision.action, decision.status, decision.reason) == ("error", 502, "upstream_unreachable")
    assert "no socket to dial from" in decision.detail


def test_concurrent_uploads_stay_within_the_memory_budget_and_the_excess_is_refused_503(lab: Lab) -> None:
    budget, uploads, half = 1 << 20, 16, 128 * 1024
    proxy = lab.start_proxy(ProxyConfig(memory_budget=budget))
    release = threading.Event()
    answers: list[int] = []

    def upload(index: int) -> None:
        sock = connect(proxy)
        try:
            sock.sendall(b"POST http://allowed.test/up/%d HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (index, 2 * half) + b"a" * half)
            release.wait(IO_TIMEOUT)
            _send_quietly(sock, b"b" * half)
            reply = _read_reply(sock)
            answers.append(int(reply.split(b" ", 2)[1]) if reply else 0)
        finally:
            sock.close()

    threads = [threading.Thread(target=upload, args=(i,), daemon=True) for i in range(uploads)]
    for thread in threads:
        thread.start()
    # 16 half-bodies (2 MiB) cannot all be held under a 1 MiB budget: wait (bounded) until it refuses.
    refused = settle(lambda: any(d.reason == "memory_budget" for d in proxy.decisions))
    release.set()
    for thread in threads:
        thread.join(IO_TIMEOUT * 2)
    assert refused, f"no memory_budget refusal; peak {proxy.peak_buffered_bytes} bytes"
    assert proxy.peak_buffered_bytes <= budget
    assert len(answers) == uploads and set(answers) <= {200, 503} and 503 in answers, answers
    budget_refusals = [d for d in proxy.decisions if d.reason == "memory_budget"]
    assert len(budget_refusals) == answers.count(503) and all(d.status == 503 for d in budget_refusals)
    assert len(lab.origin.requests) == answers.count(200)  # nothing refused reached the origin
    assert settle(lambda: proxy.buffered_bytes == 0), f"{proxy.buffered_bytes} bytes still charged"
    # Positive control: with the budget given back, the same upload is forwarded.
    answer, _ = one_answer(proxy, b"POST http://allowed.test/after HTTP/1.1\r\nHost: allowed.test\r\n"
                           b"Content-Length: %d\r\n\r\n" % (2 * half) + b"c" * (2 * half))
    assert answer is not None and answer.status == 200


def test_decision_log_is_bounded_and_summarises_what_it_dropped(lab: Lab) -> None:
    proxy = lab.start_proxy(ProxyConfig(max_decisions=5))
    mark = proxy.last_seq
    for index in range(8):
        target = ALLOWED_HOST if index % 2 else "metadata.test"
        one_answer(proxy, get(target, f"/{index}"))
    decisions = proxy.decisions
    assert [d.seq for d in decisions] == [4, 5, 6, 7, 8]
    assert proxy.decision_summary == {"ssrf_denied": 2, "routed": 1}
    with pytest.raises(LookupError, match="dropped"):
        proxy.decisions_since(mark)
    assert [d.seq for d in proxy.decisions_since(3)] == [4, 5, 6, 7, 8]


# --- the interceptor's deadlines and failures -----------------------------------------------------

BACKEND_NAME = "api.inference.test"
ROUTE_KEY = "route-key-only-the-proxy-knows"
SANDBOX_KEY = "sk-sandbox-placeholder"


def chat_request(*, stream: bool = False) -> bytes:
    body = json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (SANDBOX_KEY.encode(), len(body), body))


@dataclass
class Interception:
    """The reference proxy on loopback with the inference interceptor behind CONNECT inference.local:443."""

    proxy: EgressProxy
    backend: FakeInferenceBackend
    ca: InterceptionCA
    decisions: list[dict[str, Any]]
    tunnels: list[ssl.SSLSocket] = field(default_factory=list)

    def tunnel(self) -> ssl.SSLSocket:
        raw = connect(self.proxy)
        raw.sendall(b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
        reply = read_head(raw)
        assert HEAD_END in reply, f"the proxy closed before answering CONNECT: {reply!r}"
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        tunnel = ssl.create_default_context(cadata=self.ca.cert_pem.decode()).wrap_socket(
            raw, server_hostname="inference.local")
        self.tunnels.append(tunnel)
        return tunnel

    def reasons(self) -> list[str]:
        return [decision["reason"] for decision in self.decisions]


def tls_reply(tunnel: ssl.SSLSocket) -> bytes:
    """Everything until the interceptor closes (bounded by the socket timeout)."""
    data = b""
    try:
        while chunk := tunnel.recv(65536):
            data += chunk
    except (OSError, ssl.SSLError):
        pass
    return data


def tls_closed(tunnel: ssl.SSLSocket) -> bool:
    tunnel.settimeout(IO_TIMEOUT)
    try:
        return tunnel.recv(65536) == b""
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


@pytest.fixture(scope="module")
def session_ca() -> InterceptionCA:
    return InterceptionCA.create()


@pytest.fixture
def intercept(lab: Lab, session_ca: InterceptionCA) -> Iterator[Callable[..., Interception]]:
    backends: list[FakeInferenceBackend] = []
    made: list[Interception] = []

    def make(backend: FakeInferenceBackend | None = None, *,
             socket_factory: Callable[[int], socket.socket] | None = None, **options: Any) -> Interception:
        backend = backend or FakeInferenceBackend(BACKEND_NAME, ROUTE_KEY)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        backend.start_in_thread(listener)
        backends.append(backend)

        async def resolve(host: str) -> list[str]:
            assert host == BACKEND_NAME, host
            return ["127.0.0.1"]

        decisions: list[dict[str, Any]] = []
        interceptor = InferenceInterceptor(
            session_ca,
            InferenceBackendConfig(host=BACKEND_NAME, port=port, api_key=ROUTE_KEY, server_hostname=BACKEND_NAME,
                                   ca_pem=backend.ca_pem),
            resolver=resolve, socket_factory=socket_factory or (lambda family: socket.socket(family)),
            record=decisions.append, **options,
        )
        proxy = lab.start_proxy(connect_interceptor=lambda host, port_: interceptor
                                if (host, port_) == ("inference.local", 443) else None)
        state = Interception(proxy, backend, session_ca, decisions)
        made.append(state)
        return state

    yield make
    for state in made:
        for tunnel in state.tunnels:
            tunnel.close()
    for backend in backends:
        backend.stop()


def test_idle_intercepted_tunnels_are_closed_by_the_interceptor_deadline(
    intercept: Callable[..., Interception],
) -> None:
    lab = intercept(idle_timeout=0.5)
    tunnels = [lab.tunnel() for _ in range(20)]
    assert all(tls_closed(tunnel) for tunnel in tunnels)
    assert lab.decisions == [], "an idle keep-alive connection ends without a decision"


# The interceptor's close after a client_timeout must not leave its TLS writer to StreamWriter.__del__
# (a close_notify written after write_eof: an unraisable RuntimeError, inference/tls.py close_tls).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_slowloris_inside_the_tunnel_is_cut_off_while_another_tunnel_is_served(
    intercept: Callable[..., Interception],
) -> None:
    lab = intercept(idle_timeout=1.0)
    slow = lab.tunnel()
    cut_off, served = False, 0
    for byte in chat_request()[:40]:
        try:
            slow.sendall(bytes([byte]))
        except (OSError, ValueError):
            cut_off = True
            break
        other = lab.tunnel()  # meanwhile, other clients are served
        other.sendall(chat_request())
        served += other.recv(65536).startswith(b"HTTP/1.1 200 ")
        other.close()
        time.sleep(0.1)
    assert cut_off or tls_closed(slow)
    assert served >= 1
    assert settle(lambda: "client_timeout" in lab.reasons()), lab.reasons()
    assert len(lab.backend.requests) == served


def test_interceptor_socket_factory_failure_is_answered_502_and_recorded(
    intercept: Callable[..., Interception],
) -> None:
    def exhausted(family: int) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    lab = intercept(socket_factory=exhausted)
    tunnel = lab.tunnel()
    tunnel.sendall(chat_request())
    reply = tls_reply(tunnel)
    assert reply.startswith(b"HTTP/1.1 502 ") and b'"upstream_unreachable"' in reply, reply
    assert lab.reasons() == ["upstream_unreachable"]
    assert "no socket to dial from" in lab.decisions[0]["detail"]


def test_client_hang_up_mid_response_is_the_clients_event_not_an_upstream_error(
    intercept: Callable[..., Interception],
) -> None:
    gate = threading.Event()
    backend = FakeInferenceBackend(BACKEND_NAME, ROUTE_KEY, stream_gate=gate,
                                   stream_pieces=tuple(f"piece {i} " * 200 for i in range(200)))
    lab = intercept(backend)
    tunnel = lab.tunnel()
    tunnel.sendall(chat_request(stream=True))
    assert tunnel.recv(1024).startswith(b"HTTP/1.1 200 ")  # the head is out; the stream is held
    _reset(tunnel)
    gate.set()
    assert settle(lambda: len(lab.decisions) >= 2), lab.reasons()
    assert lab.reasons() == ["routed", "client_closed_mid_response"]


# --- no egress ---------------------------------------------------------------------------------------

_SEND_TO = "import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9))"


def _no_egress_in_private_netns(destination: str) -> subprocess.CompletedProcess[str]:
    """Run the no-egress check in a private netns whose only non-loopback link is a veth pair with
    192.0.2.2/24 (TEST-NET-1): a packet to 192.0.2.1 leaves through it, one to 127.0.0.1 does not."""
    setup = ("ip link set lo up && ip link add nx0 type veth peer name nx1 && ip link set nx0 up && "
             "ip link set nx1 up && ip addr add 192.0.2.2/24 dev nx0 && exec \"$@\"")
    return subprocess.run(
        ["unshare", "--net", "sh", "-c", setup, "sh", sys.executable, str(NO_EGRESS), "--",
         sys.executable, "-c", _SEND_TO, destination],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"),
                    reason="the no-egress check needs root, nft and unshare")
def test_no_egress_check_fails_when_one_packet_leaves_and_passes_when_none_does() -> None:
    leaked = _no_egress_in_private_netns("192.0.2.1")
    assert leaked.returncode == 3, leaked.stderr
    assert "1 packet(s) from the command left" in leaked.stderr
    stayed = _no_egress_in_private_netns("127.0.0.1")
    assert stayed.returncode == 0, stayed.stderr
    assert "0 packets" in stayed.stderr
