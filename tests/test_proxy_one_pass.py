"""The reference proxy's one-pass path (``server._ClientConnection``) against its classic coroutine path.

A keep-alive request to an IP literal whose upstream connection is already open is framed, judged,
forwarded and answered from two protocol callbacks. Every scenario here runs both ways (``one_pass``
True and False) and must give the same answers, the same decisions and the same dials; each also asserts
which path served the requests, so a one-pass path that quietly stopped being taken would fail here.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from test_proxy import ALLOWED_ADDRESS, IO_TIMEOUT, METADATA_ADDRESS, Lab, OriginRequest, RawClient
from test_proxy import lab as proxy_lab  # noqa: F401 - the fixture ``lab``: a fake network on loopback
from wire import HEAD_END, read_head

from pytest_sandbox.http.incremental import ResponseFramer
from pytest_sandbox.network.proxy.config import ProxyConfig
from pytest_sandbox.network.proxy.server import EgressProxy, _Client, _ClientConnection
from pytest_sandbox.network.route_lookup import local_route_socket


@pytest.fixture
def lab(proxy_lab: Lab) -> Lab:  # noqa: F811 - the imported fixture, by its own name
    return proxy_lab


LITERAL = ALLOWED_ADDRESS  # an IP literal: judged without a resolver, so the one-pass path can take it


class CountingProxy(EgressProxy):
    """The reference, counting the requests that left the one-pass path for a task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_task = 0

    async def _forward_in_task(self, client: _ClientConnection, conn: _Client, request: Any) -> None:
        self.in_task += 1
        await super()._forward_in_task(client, conn, request)


def start(lab: Lab, one_pass: bool, **settings: Any) -> CountingProxy:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    proxy = CountingProxy(ProxyConfig(**settings), resolver=lab.resolver, socket_factory=lab.network.socket_factory,
                          route_socket_factory=local_route_socket, one_pass=one_pass)
    proxy.start_in_thread(listener)
    lab.proxies.append(proxy)
    assert proxy._one_pass is one_pass
    return proxy


def get(host: str = LITERAL, path: str = "/", *extra: str) -> bytes:
    return ("\r\n".join([f"GET http://{host}{path} HTTP/1.1", f"Host: {host}", *extra]) + "\r\n\r\n").encode()


def released(proxy: EgressProxy) -> bool:
    """Whether every byte charged to the memory budget was given back (bounded wait: the proxy's thread
    finishes the connection after the client saw its close)."""
    deadline = time.monotonic() + IO_TIMEOUT
    while proxy.buffered_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    return proxy.buffered_bytes == 0


def outcome(proxy: EgressProxy) -> list[tuple[str, str, int, str]]:
    return [(d.action, d.reason, d.status, d.target) for d in proxy.decisions]


@pytest.fixture(params=[True, False], ids=["one-pass", "classic"])
def one_pass(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_keep_alive_gets_share_one_upstream_and_only_the_first_dials_in_a_task(lab: Lab, one_pass: bool) -> None:
    proxy = start(lab, one_pass)
    client = RawClient(proxy)
    bodies = []
    for index in range(4):
        client.send(get(path=f"/{index}"))
        answer = client.read_answer()
        assert answer is not None and answer.status == 200
        bodies.append(answer.body)
    client.close()
    assert bodies == [f"origin saw GET /{index}".encode() for index in range(4)]
    assert lab.network.dials == [(LITERAL, 80)]
    assert {request.connection_id for request in lab.origin.requests} == {1}
    assert outcome(proxy) == [("allow", "routed", 200, f"http://{LITERAL}/{index}") for index in range(4)]
    # One-pass: the first request dials in a task, the other three are answered from callbacks.
    assert proxy.in_task == (1 if one_pass else 0)


def test_pipelined_requests_are_answered_in_order(lab: Lab, one_pass: bool) -> None:
    proxy = start(lab, one_pass)
    client = RawClient(proxy)
    client.send(get(path="/warm"))
    assert client.read_answer() is not None
    client.send(get(path="/a") + get(path="/b") + get(LITERAL, "/c", "Connection: close"))
    answers, closed = client.read_until_closed()
    client.close()
    assert [answer.body for answer in answers] == [b"origin saw GET /a", b"origin saw GET /b", b"origin saw GET /c"]
    assert answers[-1].headers["connection"] == "close" and closed
    assert [request.target for request in lab.origin.requests] == ["/warm", "/a", "/b", "/c"]


@pytest.mark.parametrize(("second", "status", "reason"), [
    (b"POST http://%s/ HTTP/1.1\r\nHost: %s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400, "framing:cl-te-both"),
    (b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\nHost: %s\r\n\r\n", 400, "framing:host-missing-or-duplicate"),
    (b"GET http://%s/ HTTP/1.1\nHost: %s\r\n\r\n", 400, "framing:bare-lf"),
    (b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\nX-Forwarded-Host: %s\r\n\r\n", 400, "framing:routing-override"),
], ids=["cl-te", "two-hosts", "bare-lf", "routing-override"])
def test_a_framing_refusal_after_a_one_pass_request_closes_the_connection(
    lab: Lab, one_pass: bool, second: bytes, status: int, reason: str,
) -> None:
    proxy = start(lab, one_pass)
    client = RawClient(proxy)
    client.send(get())
    assert (first := client.read_answer()) is not None and first.status == 200
    literal = LITERAL.encode()
    client.send(second.replace(b"%s", literal) + get(path="/never"))
    answers, closed = client.read_until_closed()
    client.close()
    assert [(answer.status, answer.json()["error"]) for answer in answers] == [(status, reason)]
    assert answers[0].headers["connection"] == "close" and closed
    assert [request.target for request in lab.origin.requests] == ["/"]  # nothing after the refusal
    assert outcome(proxy)[-1][:3] == ("deny", reason, status)
    assert released(proxy)


@pytest.mark.parametrize("target", [f"http://{METADATA_ADDRESS}/", "http://127.0.0.1/", f"http://{LITERAL}:25/"],
                         ids=["special-use", "loopback", "port"])
def test_a_denied_destination_after_a_one_pass_request_is_refused_and_never_dialled(
    lab: Lab, one_pass: bool, target: str,
) -> None:
    proxy = start(lab, one_pass)
    client = RawClient(proxy)
    client.send(get())
    assert (first := client.read_answer()) is not None and first.status == 200
    host = target.split("/")[2]
    client.send(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    answers, closed = client.read_until_closed()
    client.close()
    assert [answer.status for answer in answers] == [403] and closed
    assert answers[0].json()["error"] in ("ssrf_denied", "policy_denied")
    assert lab.network.dials == [(LITERAL, 80)]
    assert outcome(proxy)[-1][0] == "deny"
    assert released(proxy)


def test_a_stalled_upstream_on_a_reused_connection_is_answered_504_at_the_deadline(lab: Lab, one_pass: bool) -> None:
    stall = threading.Event()
    original = lab.origin._respond

    def respond(request: OriginRequest) -> bytes:
        if request.target == "/stall":
            stall.wait(IO_TIMEOUT)
        return original(request)

    lab.origin._respond = respond
    proxy = start(lab, one_pass, upstream_timeout=0.3)
    client = RawClient(proxy)
    try:
        client.send(get())
        assert (first := client.read_answer()) is not None and first.status == 200
        client.send(get(path="/stall"))
        answers, closed = client.read_until_closed()
    finally:
        stall.set()
        client.close()
    assert [(answer.status, answer.json()["error"]) for answer in answers] == [(504, "upstream_timeout")] and closed
    assert outcome(proxy)[-1][:3] == ("error", "upstream_timeout", 504)


def test_an_idle_client_is_closed_at_the_idle_deadline(lab: Lab, one_pass: bool) -> None:
    proxy = start(lab, one_pass, idle_timeout=0.3)
    client = RawClient(proxy)
    client.send(get())
    assert client.read_answer() is not None
    client.send(b"GET http://" + LITERAL.encode() + b"/ HTTP/1.1\r\n")  # half a head, then nothing
    started = time.monotonic()
    assert client.read_answer() is None  # closed, not answered
    assert time.monotonic() - started < IO_TIMEOUT
    client.close()


def test_an_upstream_body_over_the_cap_on_a_reused_connection_is_a_502(lab: Lab, one_pass: bool) -> None:
    original = lab.origin._respond

    def respond(request: OriginRequest) -> bytes:
        if request.target == "/big":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n" + b"x" * 5000
        return original(request)

    lab.origin._respond = respond
    proxy = start(lab, one_pass, max_response_body=4096)
    client = RawClient(proxy)
    client.send(get())
    assert client.read_answer() is not None
    client.send(get(path="/big"))
    answers, closed = client.read_until_closed()
    client.close()
    assert [(answer.status, answer.json()["error"]) for answer in answers] == [(502, "upstream_protocol_error")]
    assert closed


class OneShotOrigin:
    """Answers one request per connection (keep-alive framing, no ``Connection: close``), then, while no
    request is outstanding, either closes or sends a response nobody asked for."""

    def __init__(self, after: bytes | None) -> None:
        self.after = after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.targets: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.listener:
            while True:
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    return
                threading.Thread(target=self._answer, args=(sock,), daemon=True).start()

    def _answer(self, sock: socket.socket) -> None:
        with sock:
            head = read_head(sock, seconds=IO_TIMEOUT)
            if HEAD_END not in head:
                return
            target = head.split(b" ")[1].decode()
            self.targets.append(target)
            body = f"answer to {target}".encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(0.1)
            if self.after is not None:
                sock.sendall(self.after)
                time.sleep(IO_TIMEOUT)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("after", [None, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\njunk"],
                         ids=["closed", "unsolicited-response"])
def test_an_upstream_that_closed_or_spoke_while_idle_is_never_reused(
    lab: Lab, one_pass: bool, after: bytes | None,
) -> None:
    origin = OneShotOrigin(after)
    lab.network.table[(LITERAL, 80)] = origin.port
    proxy = start(lab, one_pass)
    client = RawClient(proxy)
    try:
        client.send(get(path="/first"))
        assert (first := client.read_answer()) is not None and first.body == b"answer to /first"
        time.sleep(0.4)  # the upstream's EOF or stray response arrives while no request is outstanding
        client.send(get(path="/second"))
        answer = client.read_answer()
    finally:
        client.close()
        origin.close()
    assert answer is not None and (answer.status, answer.body) == (200, b"answer to /second")
    assert lab.network.dials == [(LITERAL, 80), (LITERAL, 80)]
    assert origin.targets == ["/first", "/second"]


def test_subclasses_that_replace_a_classic_step_get_the_classic_path(lab: Lab) -> None:
    class ReplacesAnswer(EgressProxy):
        async def _answer(self, conn: Any, request: Any, response: Any) -> bool:
            return await super()._answer(conn, request, response)

    kwargs: dict[str, Any] = {"resolver": lab.resolver, "socket_factory": lab.network.socket_factory,
                              "route_socket_factory": None}
    assert EgressProxy(ProxyConfig(), **kwargs)._one_pass
    assert not ReplacesAnswer(ProxyConfig(), **kwargs)._one_pass
    assert not EgressProxy(ProxyConfig(strict_framing=False), **kwargs)._one_pass
    assert not EgressProxy(ProxyConfig(judge_every_request=False), **kwargs)._one_pass
    assert not EgressProxy(ProxyConfig(lax_framing=frozenset({"header-name"})), **kwargs)._one_pass


# --- the response framer (pure) ----------------------------------------------------------------------


def feed_all(framer: ResponseFramer, pieces: list[bytes]) -> Any:
    results = [framer.feed(piece) for piece in pieces]
    assert all(result is None for result in results[:-1])
    return results[-1]


def test_the_framer_completes_a_response_fed_byte_by_byte_and_keeps_what_follows() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1"
    pieces = [data[i:i + 1] for i in range(len(data) - 9)]  # the last piece: "c" and the bytes after it
    response = feed_all(ResponseFramer("GET"), [*pieces, data[-9:]])
    assert (response.status, response.body, response.keep_alive) == (200, b"abc", False)  # bytes followed it


def test_the_framer_reads_chunked_and_close_delimited_bodies() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    response = feed_all(ResponseFramer("GET"), [chunked[:50], chunked[50:]])
    assert (response.body, response.keep_alive) == (b"abc", True)
    framer = ResponseFramer("GET")
    assert framer.feed(b"HTTP/1.1 200 OK\r\n\r\nto the end") is None
    response = framer.eof()
    assert (response.body, response.keep_alive) == (b"to the end", False)


@pytest.mark.parametrize(("data", "case"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", "cl-duplicate"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "unexpected-101"),
    (b"HTTP/1.1 200 OK\nContent-Length: 1\n\n", "bare-lf"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", "body-too-large"),
])
def test_the_framer_refuses_bad_framing(data: bytes, case: str) -> None:
    from pytest_sandbox.http.framing import FramingViolation

    with pytest.raises(FramingViolation) as refused:
        ResponseFramer("GET", max_body=10).feed(data)
    assert refused.value.case == case


def test_a_head_response_has_no_body_and_an_unfinished_one_is_incomplete_at_eof() -> None:
    import asyncio

    response = ResponseFramer("HEAD").feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert response is not None and response.body == b"" and response.keep_alive
    framer = ResponseFramer("GET")
    assert framer.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc") is None
    with pytest.raises(asyncio.IncompleteReadError):
        framer.eof()



# --- the scheduling hint ----------------------------------------------------------------------------


def slice_of(native_id: int) -> int | None:
    try:
        with open(f"/proc/self/task/{native_id}/sched") as sched:
            lines = [line for line in sched if line.startswith("se.slice")]
    except OSError:
        return None
    return int(lines[0].split(":")[1]) if lines else None


@pytest.mark.skipif(slice_of(threading.get_native_id()) is None,
                    reason="no /proc/<pid>/task/<tid>/sched with se.slice (CONFIG_SCHED_DEBUG, EEVDF)")
def test_the_event_loop_thread_asks_for_a_short_slice_and_tunnel_threads_keep_the_default(lab: Lab) -> None:
    from pytest_sandbox.scheduling import SHORT_SLICE_NS

    default = slice_of(threading.get_native_id())
    assert default != SHORT_SLICE_NS
    proxy = start(lab, True)
    assert proxy._thread is not None and proxy._thread.native_id is not None
    assert slice_of(proxy._thread.native_id) == SHORT_SLICE_NS
    client = RawClient(proxy)
    try:
        client.send(b"CONNECT 93.184.215.20:443 HTTP/1.1\r\nHost: 93.184.215.20:443\r\n\r\n")
        assert client.read_raw(39).startswith(b"HTTP/1.1 200")
        client.send(b"ping")
        assert client.read_raw(4) == b"ping"
        tunnels = [thread for thread in threading.enumerate() if thread.name.startswith("tunnel-")]
        assert tunnels, "the tunnel is relayed by threads"
        assert all(slice_of(thread.native_id or 0) == default for thread in tunnels)
    finally:
        client.close()


@pytest.mark.parametrize("body_framing", ["split-length", "chunked"])
def test_a_body_the_one_pass_framer_does_not_take_is_read_by_the_classic_path_with_its_bytes(
    lab: Lab, one_pass: bool, body_framing: str,
) -> None:
    proxy = start(lab, one_pass)
    client = RawClient(proxy)
    client.send(get(path="/warm"))
    assert client.read_answer() is not None
    head = f"POST http://{LITERAL}/post HTTP/1.1\r\nHost: {LITERAL}\r\n".encode()
    if body_framing == "chunked":
        client.send(head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.05)
        client.send(b"5\r\nworld\r\n0\r\n\r\n")
    else:
        client.send(head + b"Content-Length: 10\r\n\r\nhello")
        time.sleep(0.05)  # the rest of the body arrives in another segment
        client.send(b"world")
    answer = client.read_answer()
    client.send(get(path="/after"))
    after = client.read_answer()
    client.close()
    assert answer is not None and answer.status == 200 and after is not None and after.status == 200
    assert [(request.target, request.body) for request in lab.origin.requests] == [
        ("/warm", b""), ("/post", b"helloworld"), ("/after", b"")]
    paths = ("/warm", "/post", "/after")
    assert outcome(proxy) == [("allow", "routed", 200, f"http://{LITERAL}{path}") for path in paths]
