"""inference.local interception: route matching, the fake backend, and the TLS-terminating interceptor.

Every socket here is on 127.0.0.1; the "upstream" is a fake backend with its own trustme CA.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from wire import HEAD_END, read_head

from pytest_sandbox.inference.ca import InterceptionCA
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.inference.interceptor import InferenceBackendConfig, InferenceInterceptor
from pytest_sandbox.inference.routes import (
    InferenceRoute,
    match_route,
    parse_request_target,
)
from pytest_sandbox.inference.routing import (
    forwardable_request_headers,
    forwardable_response_headers,
    is_inference_authority,
)
from pytest_sandbox.policy.load import baseline_routes

# --------------------------------------------------------------------------------------------------
# Route matching (pure)
# --------------------------------------------------------------------------------------------------

ALLOWED_REQUESTS = [
    ("POST", "/v1/chat/completions", "POST /v1/chat/completions"),
    ("POST", "/v1/completions", "POST /v1/completions"),
    ("POST", "/v1/responses", "POST /v1/responses"),
    ("POST", "/v1/messages", "POST /v1/messages"),
    ("POST", "/v1/embeddings", "POST /v1/embeddings"),
    ("GET", "/v1/models", "GET /v1/models"),
    ("GET", "/v1/models/gpt-4o-mini", "GET /v1/models/*"),
    ("GET", "/v1/models/llama3:8b", "GET /v1/models/*"),
    ("GET", "/v1/models/Qwen2.5-7B_instruct~x", "GET /v1/models/*"),
    ("POST", "/v1/chat/completions?api-version=2024-10-21", "POST /v1/chat/completions"),
    ("POST", "/v1/chat/completions?", "POST /v1/chat/completions"),
    ("GET", "/v1/models?a=%2F..%2F", "GET /v1/models"),
    ("POST", "https://inference.local/v1/chat/completions", "POST /v1/chat/completions"),
    ("POST", "HTTPS://inference.local:443/v1/messages?x=1", "POST /v1/messages"),
    ("GET", "http://inference.local/v1/models", "GET /v1/models"),
    (b"POST", b"/v1/chat/completions", "POST /v1/chat/completions"),
]


@pytest.mark.parametrize(
    ("method", "target", "route"), ALLOWED_REQUESTS, ids=[str(r[1]) for r in ALLOWED_REQUESTS]
)
def test_inference_request_matches_its_route(method: str | bytes, target: str | bytes, route: str) -> None:
    matched = match_route(baseline_routes(), method, target)
    assert matched is not None
    assert str(matched) == route


DENIED_REQUESTS = [
    # wrong method for the path, or a method spelled in another case (RFC 9110 §9.1)
    ("GET", "/v1/chat/completions"),
    ("POST", "/v1/models"),
    ("DELETE", "/v1/models/gpt-4o"),
    ("post", "/v1/chat/completions"),
    ("Post", "/v1/chat/completions"),
    ("CONNECT", "/v1/chat/completions"),
    # other paths
    ("GET", "/"),
    ("GET", "/admin"),
    ("POST", "/v1/chat"),
    ("POST", "/v1/chat/completions/extra"),
    ("POST", "/v2/chat/completions"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/models/a/b"),
    ("GET", "/v1/models/"),
    # percent-encoding, in the fixed part and in the wildcard
    ("POST", "/v1/chat%2Fcompletions"),
    ("POST", "/v1/%63hat/completions"),
    ("POST", "/v1/chat/completions%00"),
    ("POST", "/v1/chat/completions%3Fx"),
    ("GET", "/v1/models/%2e%2e"),
    ("GET", "/v1/models/a%2Fb"),
    # dot segments
    ("POST", "/v1/../v1/chat/completions"),
    ("POST", "/v1/./chat/completions"),
    ("GET", "/v1/models/.."),
    ("GET", "/v1/models/."),
    ("GET", "/v1/models/..."),
    ("POST", "/admin/../v1/chat/completions"),
    # empty segments and trailing slash
    ("POST", "//v1/chat/completions"),
    ("POST", "/v1//chat/completions"),
    ("POST", "/v1/chat/completions/"),
    ("GET", "/v1/models//"),
    # case tricks (RFC 3986 §6.2.2.1: paths are case-sensitive)
    ("POST", "/V1/chat/completions"),
    ("POST", "/v1/Chat/Completions"),
    ("GET", "/V1/MODELS"),
    # characters that parsers disagree on
    ("POST", "/v1\\chat\\completions"),
    ("POST", "/v1/chat/completions#frag"),
    ("POST", "/v1/chat/completions;jsessionid=1"),
    ("GET", "/v1/models/..;"),
    ("GET", "/v1/models/a;b"),
    ("POST", "/v1/chat/completions\t"),
    ("POST", "/v1/chat/completions "),
    ("POST", "/v1/chat/completions\x00"),
    ("POST", "/v1/chat/complétions"),
    ("POST", "/v1/chat/completions?q=é"),
    (b"POST", b"/v1/chat/compl\xe9tions"),
    (b"P\xd3ST", b"/v1/chat/completions"),
    # not origin-form / absolute-form
    ("OPTIONS", "*"),
    ("POST", "inference.local:443"),
    ("POST", "v1/chat/completions"),
    ("POST", ""),
    ("POST", "ftp://inference.local/v1/chat/completions"),
    ("POST", "https://inference.local"),
    ("POST", "https://inference.local?/v1/chat/completions"),
    ("POST", "https:///v1/chat/completions"),
    ("POST", "https://user@inference.local/v1/chat/completions"),
    ("POST", "https://inference.local@evil.example/v1/chat/completions"),
]


@pytest.mark.parametrize(("method", "target"), DENIED_REQUESTS, ids=[repr(r) for r in DENIED_REQUESTS])
def test_non_canonical_or_unrouted_request_matches_no_route(method: str | bytes, target: str | bytes) -> None:
    assert match_route(baseline_routes(), method, target) is None


def test_absolute_form_target_keeps_its_authority_for_the_host_check() -> None:
    parsed = parse_request_target("https://10.0.0.1:443/v1/models?x=1")
    assert parsed is not None
    assert (parsed.authority, parsed.path, parsed.query) == ("10.0.0.1:443", "/v1/models", "x=1")
    assert parsed.origin_form == "/v1/models?x=1"


def test_origin_form_target_has_no_authority_and_keeps_an_empty_query() -> None:
    parsed = parse_request_target("/v1/models?")
    assert parsed is not None
    assert (parsed.authority, parsed.query, parsed.origin_form) == (None, "", "/v1/models?")


def test_empty_route_table_matches_nothing() -> None:
    assert match_route((), "POST", "/v1/chat/completions") is None


def test_custom_route_with_wildcard_in_the_middle() -> None:
    bedrock = InferenceRoute("POST", "/model/*/invoke")
    assert match_route((bedrock,), "POST", "/model/anthropic.claude-v2/invoke") == bedrock
    assert match_route((bedrock,), "POST", "/model//invoke") is None
    assert match_route((bedrock,), "POST", "/model/a/b/invoke") is None


@pytest.mark.parametrize(
    ("method", "pattern"),
    [("post", "/v1/x"), ("", "/v1/x"), ("POST", "v1/x"), ("POST", "/v1//x"), ("POST", "/v1/../x"),
     ("POST", "/v1/%2e"), ("POST", "/v1/a b")],
)
def test_route_that_could_never_match_canonically_is_rejected(method: str, pattern: str) -> None:
    with pytest.raises(ValueError):
        InferenceRoute(method, pattern)


# --------------------------------------------------------------------------------------------------
# The interceptor, end to end on 127.0.0.1
# --------------------------------------------------------------------------------------------------

ROUTE_KEY = "route-key-only-the-proxy-knows"
SANDBOX_KEY = "sk-sandbox-placeholder"
BACKEND_NAME = "api.inference.test"
IO_TIMEOUT = 10.0


class ConnectFront:
    """The part of the egress proxy in front of the interceptor, reduced to what it needs.

    Accepts on 127.0.0.1, reads one ``CONNECT inference.local:443`` head, answers 200 and hands the
    connection to the interceptor; afterwards it closes its own writer and waits for it, as a real
    proxy would (proving the interceptor's TLS layer does not leave that wait hanging).
    """

    def __init__(self, interceptor: InferenceInterceptor) -> None:
        self.interceptor = interceptor
        self.outcomes: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def start(self) -> int:
        self._thread.start()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, sock=listener), self._loop
        )
        self._server = future.result(IO_TIMEOUT)
        port: int = listener.getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"CONNECT inference.local:443 HTTP/1.1\r\n"), head
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            await self.interceptor(reader, writer)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), IO_TIMEOUT)
            self.outcomes.append("closed")
        except BaseException as error:
            self.outcomes.append(f"{type(error).__name__}: {error}")
            writer.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(IO_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(IO_TIMEOUT)
        self._loop.close()

    def wait_for_outcomes(self, count: int) -> list[str]:
        """The outcomes of the first ``count`` handled connections (bounded wait)."""
        for _ in range(int(IO_TIMEOUT / 0.01)):
            if len(self.outcomes) >= count:
                break
            threading.Event().wait(0.01)
        return list(self.outcomes)


@dataclass
class Lab:
    front: ConnectFront
    front_port: int
    backend: FakeInferenceBackend
    backend_port: int
    ca: InterceptionCA
    decisions: list[dict[str, Any]]
    clients: list[TunnelClient] = field(default_factory=list)

    def tunnel(self) -> TunnelClient:
        """A new client connection through CONNECT + TLS; closed at teardown if a test did not."""
        client = TunnelClient.open(self.front_port, self.ca)
        self.clients.append(client)
        return client

    def reasons(self) -> list[str]:
        return [decision["reason"] for decision in self.decisions]


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)


class TunnelClient:
    """A raw HTTP/1.1 client inside ``CONNECT inference.local:443`` + TLS (client libraries would
    normalise away the very requests these tests need to send)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    def open(cls, port: int, ca: InterceptionCA) -> TunnelClient:
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        raw.sendall(b"CONNECT inference.local:443 HTTP/1.1\r\nHost: inference.local:443\r\n\r\n")
        reply = read_head(raw)
        assert HEAD_END in reply, f"proxy closed before answering CONNECT: {reply!r}"
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        return cls(context.wrap_socket(raw, server_hostname="inference.local"))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buffer += data

    def _take_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_response(self) -> RawResponse:
        status_line = self._take_line()
        version, status, _ = status_line.split(b" ", 2)
        assert version == b"HTTP/1.1", status_line
        headers: list[tuple[str, str]] = []
        while line := self._take_line():
            name, _, value = line.partition(b":")
            headers.append((name.decode().lower(), value.decode().strip()))
        response = RawResponse(int(status), tuple(headers), b"")
        if response.header("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._take_line(), 16):
                body += self._take(size)
                assert self._take(2) == b"\r\n"
            assert self._take_line() == b""
        else:
            body = self._take(int(response.header("content-length") or 0))
        return RawResponse(response.status, response.headers, body)

    def read_until_closed(self) -> bytes:
        """Everything the peer sends until it closes (bounded by the socket timeout)."""
        data = self.buffer
        self.buffer = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def peer_closed(self) -> bool:
        """True once the peer has closed (EOF or reset) before sending anything more."""
        try:
            data = self.buffer or self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        return data == b""

    def gets_no_response_to(self, request: bytes) -> bool:
        """Send ``request`` on this connection; True if no response byte ever comes back."""
        try:
            self.sock.sendall(request)
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        return data == b""


def http_request(
    method: str, target: str, *, body: bytes = b"", host: str = "inference.local", extra: str = ""
) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\ncontent-type: application/json\r\n"
    return head.encode() + b"\r\n" + body


CHAT_BODY = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
CHAT_REQUEST = http_request(
    "POST", "/v1/chat/completions", body=CHAT_BODY, extra=f"Authorization: Bearer {SANDBOX_KEY}\r\n"
)
ADMIN_REQUEST = http_request("GET", "/admin")
DENIED_JSON = b'{"error":"connection not allowed by policy"}'


def listening_socket() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


async def loopback_resolver(host: str) -> list[str]:
    """The lab's stub resolver, reduced: only the backend name exists, and it is loopback."""
    if host != BACKEND_NAME:
        raise LookupError(f"{host} does not resolve in this lab")
    return ["127.0.0.1"]


def loopback_socket(family: int) -> socket.socket:
    assert family == socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM)


@pytest.fixture(scope="module")
def interception_ca() -> InterceptionCA:
    return InterceptionCA.create()


@pytest.fixture
def make_lab(interception_ca: InterceptionCA) -> Iterator[Callable[..., Lab]]:
    started: list[tuple[ConnectFront, FakeInferenceBackend]] = []
    labs: list[Lab] = []

    def make(
        backend: FakeInferenceBackend | None = None,
        *,
        ca_pem: bytes | None = None,
        backend_host: str = BACKEND_NAME,
        backend_port: int | None = None,
        **interceptor_options: Any,
    ) -> Lab:
        backend = backend or FakeInferenceBackend(BACKEND_NAME, ROUTE_KEY)
        listener = listening_socket()
        port = listener.getsockname()[1]
        backend.start_in_thread(listener)
        decisions: list[dict[str, Any]] = []
        config = InferenceBackendConfig(
            host=backend_host,
            port=backend_port or port,
            api_key=ROUTE_KEY,
            server_hostname=BACKEND_NAME,
            ca_pem=ca_pem or backend.ca_pem,
        )
        interceptor = InferenceInterceptor(
            interception_ca,
            config,
            resolver=loopback_resolver,
            socket_factory=loopback_socket,
            record=decisions.append,
            **interceptor_options,
        )
        front = ConnectFront(interceptor)
        started.append((front, backend))
        front_port = front.start()
        lab = Lab(front, front_port, backend, port, interception_ca, decisions)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        for client in lab.clients:
            client.close()
    for front, backend in started:
        front.stop()
        backend.stop()


def test_routed_chat_completion_reaches_backend_with_route_key_and_without_client_key(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(
        http_request(
            "POST",
            "/v1/chat/completions?api-version=1",
            body=CHAT_BODY,
            extra=(
                f"Authorization: Bearer {SANDBOX_KEY}\r\nX-Api-Key: {SANDBOX_KEY}\r\n"
                "Proxy-Authorization: Basic eDp5\r\nConnection: keep-alive, X-Secret-Hop\r\n"
                "X-Secret-Hop: 1\r\nX-Client-Trace: kept\r\n"
            ),
        )
    )
    response = client.read_response()
    client.close()

    assert response.status == 200
    assert json.loads(response.body)["object"] == "chat.completion"
    assert response.header("transfer-encoding") == "chunked"  # re-framed: the backend sent a length
    assert response.header("content-length") is None
    [seen] = lab.backend.requests
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/chat/completions?api-version=1", CHAT_BODY)
    assert seen.header_values("authorization") == [f"Bearer {ROUTE_KEY}"]
    assert seen.header("host") == f"{BACKEND_NAME}:{lab.backend_port}"
    for stripped in ("x-api-key", "proxy-authorization", "x-secret-hop", "keep-alive", "transfer-encoding"):
        assert seen.header(stripped) is None, stripped
    assert seen.header("x-client-trace") == "kept"
    assert seen.header("content-length") == str(len(CHAT_BODY))
    assert SANDBOX_KEY not in repr(seen.headers)
    assert lab.reasons() == ["routed"]
    assert lab.decisions[0]["detail"] == "route POST /v1/chat/completions"
    assert lab.decisions[0]["addresses"] == ("127.0.0.1",)


def test_route_key_never_appears_in_what_the_sandbox_receives(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    response = client.read_response()
    client.close()
    assert response.status == 200
    assert ROUTE_KEY not in repr(response)
    assert ROUTE_KEY not in repr(lab.decisions)


def test_two_routed_requests_share_one_keep_alive_connection(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    first = client.read_response()
    client.send(http_request("GET", "/v1/models"))
    second = client.read_response()
    client.close()
    assert (first.status, second.status) == (200, 200)
    assert json.loads(second.body)["data"][0]["id"] == "fake-model"
    assert [r.path for r in lab.backend.requests] == ["/v1/chat/completions", "/v1/models"]
    assert lab.reasons() == ["routed", "routed"]


def test_non_inference_request_after_a_routed_one_is_denied_and_the_connection_closed(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    assert client.read_response().status == 200
    client.send(ADMIN_REQUEST)
    denied = client.read_response()

    assert denied.status == 403
    assert denied.header("content-type") == "application/json"
    assert denied.body == DENIED_JSON
    assert client.peer_closed()
    assert client.gets_no_response_to(CHAT_REQUEST)
    client.close()
    assert len(lab.backend.requests) == 1
    assert lab.reasons() == ["routed", "inference_denied"]
    assert lab.front.wait_for_outcomes(1) == ["closed"]


def test_pipelined_non_inference_request_behind_a_routed_one_is_still_denied(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(CHAT_REQUEST + ADMIN_REQUEST + CHAT_REQUEST)
    assert client.read_response().status == 200
    assert client.read_response().body == DENIED_JSON
    assert client.peer_closed()
    client.close()
    assert [r.path for r in lab.backend.requests] == ["/v1/chat/completions"]


def test_weakened_interceptor_keeps_reading_after_a_denial_so_the_819_bug_is_detectable(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab(close_on_denied=False)
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    assert client.read_response().status == 200
    client.send(ADMIN_REQUEST)
    assert client.read_response().body == DENIED_JSON
    client.send(CHAT_REQUEST)
    after_denial = client.read_response()
    client.close()
    assert after_denial.status == 200
    assert len(lab.backend.requests) == 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        http_request("GET", "/"),
        http_request("POST", "/v1/fine_tuning/jobs", body=b"{}"),
        http_request("GET", "/v1/chat/completions"),
        http_request("POST", "/v1/chat%2Fcompletions", body=CHAT_BODY),
        http_request("POST", "/v1/../v1/chat/completions", body=CHAT_BODY),
        http_request("post", "/v1/chat/completions", body=CHAT_BODY),
    ],
    ids=["root", "fine-tuning", "chat-with-get", "encoded-slash", "dot-segment", "lower-case-method"],
)
def test_non_inference_first_request_is_denied_and_never_forwarded(
    make_lab: Callable[..., Lab], request_bytes: bytes
) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(request_bytes)
    denied = client.read_response()
    assert (denied.status, denied.body) == (403, DENIED_JSON)
    assert client.peer_closed()
    client.close()
    assert lab.backend.requests == []
    assert lab.reasons() == ["inference_denied"]


@pytest.mark.parametrize(
    ("host", "target"),
    [
        ("10.0.0.1", "/v1/chat/completions"),
        ("169.254.169.254", "/v1/chat/completions"),
        (BACKEND_NAME, "/v1/chat/completions"),
        ("inference.local:8443", "/v1/chat/completions"),
        ("inference.local.", "/v1/chat/completions"),
        ("inference.local", "https://10.0.0.1/v1/chat/completions"),
        ("inference.local", "https://inference.local:8443/v1/chat/completions"),
    ],
)
def test_inner_host_other_than_inference_local_is_denied_and_closed(
    make_lab: Callable[..., Lab], host: str, target: str
) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(http_request("POST", target, body=CHAT_BODY, host=host))
    denied = client.read_response()
    assert denied.status == 403
    assert client.peer_closed()
    client.close()
    assert lab.backend.requests == []
    assert lab.reasons() == ["host_mismatch"]


@pytest.mark.parametrize("host", ["inference.local", "inference.local:443", "Inference.Local"])
def test_inner_host_naming_inference_local_is_routed(make_lab: Callable[..., Lab], host: str) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(http_request("GET", "/v1/models", host=host))
    assert client.read_response().status == 200
    client.close()


def test_ambiguous_framing_is_refused_with_its_status_and_closed(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    refused = client.read_response()
    assert refused.status == 400
    assert client.peer_closed()
    client.close()
    assert lab.backend.requests == []
    assert lab.reasons() == ["framing:cl-te-both"]


def test_weakened_h11_only_framing_forwards_what_strict_framing_refuses(make_lab: Callable[..., Lab]) -> None:
    cl_and_te = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: inference.local\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    lab = make_lab(strict_framing=False)
    client = lab.tunnel()
    client.send(cl_and_te)
    response = client.read_response()
    client.close()
    assert response.status == 400  # the backend's own answer to an empty body: it was forwarded
    assert len(lab.backend.requests) == 1
    assert lab.reasons() == ["routed"]


def test_http10_client_gets_a_close_delimited_body_and_a_close(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(b"GET /v1/models HTTP/1.0\r\nHost: inference.local\r\n\r\n")
    head, _, body = client.read_until_closed().partition(b"\r\n\r\n")
    client.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert b"transfer-encoding" not in head.lower()
    assert json.loads(body)["object"] == "list"


def test_connection_close_from_client_is_honoured_after_the_response(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(http_request("GET", "/v1/models", extra="Connection: close\r\n"))
    response = client.read_response()
    assert response.status == 200
    assert response.header("connection") == "close"
    assert client.peer_closed()
    client.close()


def expired() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)


@pytest.mark.parametrize(
    "backend_options",
    [
        {"cert_identities": ("other.example",)},
        {"cert_identities": ("127.0.0.1",)},
        {"cert_not_after": "expired"},
        {"untrusted_ca": True},
    ],
    ids=["certificate-for-another-name", "ip-only-san", "expired-certificate", "untrusted-ca"],
)
def test_upstream_certificate_that_fails_verification_gives_502_and_no_request(
    make_lab: Callable[..., Lab], backend_options: dict[str, Any]
) -> None:
    options = dict(backend_options)
    ca_pem = trustme.CA().cert_pem.bytes() if options.pop("untrusted_ca", False) else None
    if options.get("cert_not_after") == "expired":
        options["cert_not_after"] = expired()
    lab = make_lab(FakeInferenceBackend(BACKEND_NAME, ROUTE_KEY, **options), ca_pem=ca_pem)
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    response = client.read_response()
    assert response.status == 502
    assert client.peer_closed()
    client.close()
    assert lab.backend.requests == []
    assert lab.reasons() == ["upstream_tls_failed"]


class ScriptedUpstream:
    """A one-shot TLS origin on 127.0.0.1 that answers one request with fixed raw bytes, then closes."""

    def __init__(self, response: bytes) -> None:
        self.ca = trustme.CA()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(BACKEND_NAME).configure_cert(self.context)
        self.response = response
        self.listener = listening_socket()
        self.listener.settimeout(IO_TIMEOUT)
        self.port: int = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve_once, daemon=True)
        self.thread.start()

    def _serve_once(self) -> None:
        try:
            raw, _ = self.listener.accept()
        except OSError:
            return
        raw.settimeout(IO_TIMEOUT)
        with self.context.wrap_socket(raw, server_side=True) as tls:
            self.received = read_head(tls)
            head, _, body = self.received.partition(b"\r\n\r\n")
            lines = head.lower().split(b"\r\n")
            lengths = [line[15:] for line in lines if line.startswith(b"content-length:")]
            length = int(lengths[0]) if lengths else 0
            while len(body) < length:  # read it all: closing with unread bytes would send a RST
                body += tls.recv(65536)
            self.received = head + b"\r\n\r\n" + body
            tls.sendall(self.response)

    def stop(self) -> None:
        self.listener.close()
        self.thread.join(IO_TIMEOUT)


@pytest.fixture
def scripted_upstream() -> Iterator[Callable[[bytes], ScriptedUpstream]]:
    upstreams: list[ScriptedUpstream] = []

    def make(response: bytes) -> ScriptedUpstream:
        upstreams.append(ScriptedUpstream(response))
        return upstreams[-1]

    yield make
    for upstream in upstreams:
        upstream.stop()


@pytest.mark.parametrize(
    "bad_response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n",
    ],
    ids=["cl-and-te", "conflicting-cl", "bare-lf", "unrequested-101", "truncated-head"],
)
def test_backend_response_with_bad_framing_gives_502(
    make_lab: Callable[..., Lab], scripted_upstream: Callable[[bytes], ScriptedUpstream], bad_response: bytes
) -> None:
    upstream = scripted_upstream(bad_response)
    lab = make_lab(backend_port=upstream.port, ca_pem=upstream.ca.cert_pem.bytes())
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    response = client.read_response()
    assert response.status == 502
    assert client.peer_closed()
    assert lab.reasons() == ["upstream_protocol_error"]
    assert f"Bearer {ROUTE_KEY}".encode() in upstream.received


def test_backend_that_dies_mid_stream_cuts_the_client_connection(
    make_lab: Callable[..., Lab], scripted_upstream: Callable[[bytes], ScriptedUpstream]
) -> None:
    upstream = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\ndata: \r\n"
    )
    lab = make_lab(backend_port=upstream.port, ca_pem=upstream.ca.cert_pem.bytes())
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    with pytest.raises(EOFError):
        client.read_response()  # head and first chunk arrive, the terminating chunk never does
    assert lab.reasons() == ["routed", "upstream_protocol_error"]


def test_backend_name_that_does_not_resolve_gives_502(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(backend_host="missing.inference.test")
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    assert client.read_response().status == 502
    client.close()
    assert lab.reasons() == ["upstream_resolve_failed"]


def test_backend_that_refuses_connections_gives_502(make_lab: Callable[..., Lab]) -> None:
    closed = listening_socket()
    closed_port = closed.getsockname()[1]
    closed.close()
    lab = make_lab(backend_port=closed_port)
    client = lab.tunnel()
    client.send(CHAT_REQUEST)
    assert client.read_response().status == 502
    client.close()
    assert lab.reasons() == ["upstream_unreachable"]


def test_httpx_client_trusting_the_written_bundle_works_through_the_proxy(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = make_lab()
    bundle = lab.ca.write_bundle(tmp_path)
    # httpx 0.28 deprecates verify=<path>; a context loaded from the bundle file is the same trust.
    verify = ssl.create_default_context(cafile=str(bundle))
    with httpx.Client(proxy=f"http://127.0.0.1:{lab.front_port}", verify=verify, timeout=IO_TIMEOUT) as http:
        response = http.post(
            "https://inference.local/v1/chat/completions",
            json={"model": "m", "messages": []},
            headers={"authorization": f"Bearer {SANDBOX_KEY}"},
        )
        denied = http.get("https://inference.local/v1/files")
    assert response.status_code == 200
    assert response.json()["model"] == "m"
    assert denied.status_code == 403
    assert denied.content == DENIED_JSON
    assert [r.path for r in lab.backend.requests] == ["/v1/chat/completions"]


def test_streamed_completion_reaches_the_client_before_the_backend_has_finished(
    make_lab: Callable[..., Lab], tmp_path: Path
) -> None:
    gate = threading.Event()
    lab = make_lab(FakeInferenceBackend(BACKEND_NAME, ROUTE_KEY, stream_gate=gate))
    context = ssl.create_default_context(cafile=str(lab.ca.write_bundle(tmp_path)))
    # The backend holds the stream after its first event until `gate` is set (for up to 30 s), so
    # with a 10 s read timeout a buffering proxy fails here instead of passing slowly.
    with httpx.Client(proxy=f"http://127.0.0.1:{lab.front_port}", verify=context, timeout=IO_TIMEOUT) as http:
        with http.stream(
            "POST", "https://inference.local/v1/chat/completions", json={"model": "m", "stream": True}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            events = response.iter_bytes()
            first = next(events)
            assert b'"content": "Hello"' in first
            assert b"[DONE]" not in first
            gate.set()
            rest = b"".join(events)
    assert rest.endswith(b"data: [DONE]\n\n")
    assert b'"content": " backend"' in rest


def test_proxy_waiting_for_its_own_writer_to_close_is_not_left_hanging(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab()
    client = lab.tunnel()
    client.send(http_request("GET", "/v1/models"))
    assert client.read_response().status == 200
    client.close()
    assert lab.front.wait_for_outcomes(1) == ["closed"]


def test_client_that_does_not_trust_the_interception_ca_fails_the_handshake(
    make_lab: Callable[..., Lab],
) -> None:
    lab = make_lab()
    with pytest.raises(ssl.SSLCertVerificationError):
        TunnelClient.open(lab.front_port, InterceptionCA.create())
    assert lab.front.wait_for_outcomes(1) == ["closed"]
    assert lab.reasons() == ["client_tls_failed"]
    assert lab.backend.requests == []


# --------------------------------------------------------------------------------------------------
# Pure helpers and the CA
# --------------------------------------------------------------------------------------------------


def test_forwarded_headers_drop_client_credentials_hop_by_hop_and_connection_named_fields() -> None:
    headers = forwardable_request_headers(
        [
            ("Host", "inference.local"),
            ("Authorization", "Bearer sandbox"),
            ("x-api-key", "sandbox"),
            ("Proxy-Authorization", "Basic x"),
            ("Proxy-Connection", "keep-alive"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Content-Length", "999"),
            ("Accept", "application/json"),
        ],
        api_key="route",
        host_header="api.inference.test",
        body_length=2,
        method="POST",
    )
    assert headers == [
        ("host", "api.inference.test"),
        ("accept", "application/json"),
        ("authorization", "Bearer route"),
        ("content-length", "2"),
        ("connection", "close"),
    ]


def test_forwarded_get_without_body_carries_no_content_length() -> None:
    headers = forwardable_request_headers([], api_key="k", host_header="h", body_length=0, method="GET")
    assert [name for name, _ in headers] == ["host", "authorization", "connection"]


def test_response_headers_lose_hop_by_hop_fields_and_upstream_framing() -> None:
    assert forwardable_response_headers(
        [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked"), ("Content-Length", "5"),
         ("Connection", "close, X-Internal"), ("X-Internal", "1"), ("Keep-Alive", "timeout=5")]
    ) == [("content-type", "text/event-stream")]


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("inference.local", True),
        ("inference.local:443", True),
        ("INFERENCE.LOCAL", True),
        (b"inference.local", True),
        ("inference.local:80", False),
        ("inference.local.", False),
        ("inference.local:", False),
        ("user@inference.local", False),
        ("inference.local.evil.example", False),
        ("inference.\u212alocal", False),
        ("127.0.0.1", False),
        ("", False),
        (None, False),
    ],
)
def test_inference_authority_is_exactly_inference_local_on_port_443(
    authority: str | bytes | None, expected: bool
) -> None:
    assert is_inference_authority(authority) is expected


def test_ca_bundle_and_environment_point_every_client_at_the_same_file(
    interception_ca: InterceptionCA, tmp_path: Path
) -> None:
    bundle = interception_ca.write_bundle(tmp_path)
    assert bundle.read_bytes() == interception_ca.cert_pem
    assert interception_ca.env(bundle) == {
        "SSL_CERT_FILE": str(bundle),
        "REQUESTS_CA_BUNDLE": str(bundle),
        "CURL_CA_BUNDLE": str(bundle),
        "NODE_EXTRA_CA_CERTS": str(bundle),
    }


def test_server_context_is_cached_per_hostname(interception_ca: InterceptionCA) -> None:
    first = interception_ca.server_context("inference.local")
    assert interception_ca.server_context("inference.local") is first
    assert interception_ca.server_context("other.local") is not first


def test_backend_config_repr_hides_the_route_key() -> None:
    config = InferenceBackendConfig(
        host="h", port=443, api_key=ROUTE_KEY, server_hostname="h", ca_pem=b"-----BEGIN CERTIFICATE-----"
    )
    assert ROUTE_KEY not in repr(config)
    assert config.host_header == "h"


def test_fake_backend_rejects_requests_without_its_route_key() -> None:
    backend = FakeInferenceBackend(BACKEND_NAME, ROUTE_KEY)
    listener = listening_socket()
    port = listener.getsockname()[1]
    backend.start_in_thread(listener)
    try:
        context = ssl.create_default_context(cadata=backend.ca_pem.decode())
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname=BACKEND_NAME) as tls:
                client = TunnelClient(tls)
                for key in ("x", ROUTE_KEY):
                    authorization = f"Authorization: Bearer {key}\r\n"
                    client.send(http_request("GET", "/v1/models", host=BACKEND_NAME, extra=authorization))
                unauthorised = client.read_response()
                authorised = client.read_response()
    finally:
        backend.stop()
    assert (unauthorised.status, authorised.status) == (401, 200)
    assert [r.header("authorization") for r in backend.requests] == ["Bearer x", f"Bearer {ROUTE_KEY}"]
    backend.reset()
    assert backend.requests == []
