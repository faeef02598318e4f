"""A fake OpenAI-compatible inference origin for the test lab.

The interceptor forwards routed ``inference.local`` requests to "the backend". In the lab that
backend is this server: HTTPS with its **own** trustme CA (network.md §8, "upstream CA"), so the
proxy's upstream client can be made to trust only it, and so certificate failures (another name,
expired, untrusted CA, IP-only SAN) can be staged by issuing a different leaf.

It keeps **every byte** each connection delivers after TLS (:meth:`FakeInferenceBackend.received_streams`,
up to 1 MiB per connection, truncation recorded) and frames requests from those bytes
(:attr:`FakeInferenceBackend.requests`), so a test can prove what did -- and did not -- reach the
origin. It never refuses what it cannot frame (its parser is not the one under test): such bytes
are recorded and answered once. Every response carries ``X-Lab-Mark: <FakeInferenceBackend.mark>``,
a random token per backend, so a judge can tell the backend's answers from the proxy's (see
:mod:`pytest_sandbox.http.upstream`). It insists on ``Authorization: Bearer <api_key>`` so a test can
prove the proxy swapped in the route's key (the sandbox never sees it).

It serves on a listening socket it is *given*: the lab creates that socket inside its network
namespace; unit tests pass a 127.0.0.1 socket. The server runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import h11
import trustme

from pytest_sandbox.http.fields import HeaderLookup
from pytest_sandbox.http.framing import READ_SIZE
from pytest_sandbox.http.upstream import MARK_HEADER, STREAM_RECORD_LIMIT, ReceivedStream, new_mark

DEFAULT_BACKEND_NAME = "api.inference.test"
DEFAULT_MODEL = "fake-model"
DEFAULT_STREAM_PIECES: tuple[str, ...] = ("Hello", " from", " the", " fake", " backend")

_MAX_REQUEST_BODY = 1024 * 1024
# Bounds every wait, so a wedged client or test can never hang the backend thread forever.
_GATE_TIMEOUT_SECONDS = 30.0
_STOP_TIMEOUT_SECONDS = 10.0
# After bytes h11 cannot frame, the connection is kept and recorded until it idles this long.
_RECORD_IDLE_SECONDS = 5.0
# After a response that ends the connection, bytes already on their way are still recorded.
_CLOSE_GRACE_SECONDS = 0.1


@dataclass(frozen=True)
class RecordedRequest(HeaderLookup):
    """One request exactly as the backend received it.

    ``path`` is the raw request-target (query included); header names are lower-cased, values
    kept verbatim and in order (``header``/``header_values`` compare case-insensitively).
    """

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


class _Stream:
    """The raw record of one connection (mutated on the backend's loop, read under the lock)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.data = bytearray()
        self.received = 0
        self.arrivals: list[tuple[float, int]] = []  # (when, bytes received in all by then)

    def add(self, chunk: bytes) -> None:
        if not chunk:
            return
        room = STREAM_RECORD_LIMIT - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.received += len(chunk)
        self.arrivals.append((time.monotonic(), self.received))


class FakeInferenceBackend:
    """OpenAI-compatible HTTPS origin: ``POST /v1/chat/completions``, ``GET /v1/models``, else 404.

    ``cert_identities`` and ``cert_not_after`` stage bad upstream certificates: e.g.
    ``cert_identities=("other.example",)``, ``cert_identities=("127.0.0.1",)`` (IP-only SAN), or a
    ``cert_not_after`` in the past. ``stream_gate``, when given, holds every SSE stream after its
    first chunk until the event is set, so a test can prove the first chunk crossed the proxy
    before the origin had finished -- i.e. streaming passes through, without timing assertions.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKEND_NAME,
        api_key: str = "route-key-fake-backend",
        *,
        cert_identities: Iterable[str] | None = None,
        cert_not_after: datetime.datetime | None = None,
        stream_pieces: tuple[str, ...] = DEFAULT_STREAM_PIECES,
        stream_chunk_delay: float = 0.01,
        stream_gate: threading.Event | None = None,
        ca: trustme.CA | None = None,
    ) -> None:
        self.name = name
        self.api_key = api_key
        # ``ca``: a CA the caller holds (--sandbox-backend-ca), so a proxy can be told to trust it beforehand.
        self.ca = ca if ca is not None else trustme.CA(organization_name="pytest-sandbox fake inference upstream")
        identities = tuple(cert_identities) if cert_identities is not None else (name,)
        not_before = None
        if cert_not_after is not None:
            not_before = cert_not_after - datetime.timedelta(days=1)
        self.leaf = self.ca.issue_cert(*identities, not_before=not_before, not_after=cert_not_after)
        self.stream_pieces = stream_pieces
        self.stream_chunk_delay = stream_chunk_delay
        self.stream_gate = stream_gate
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._streams: list[_Stream] = []
        # The token in X-Lab-Mark on every response; a proxy cannot know it in advance.
        self.mark = new_mark()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- what tests look at -----------------------------------------------------------------------

    @property
    def ca_pem(self) -> bytes:
        """The PEM of the CA that signed the backend's certificate (what the proxy should trust)."""
        return self.ca.cert_pem.bytes()

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def received_streams(self) -> list[ReceivedStream]:
        """Every byte each connection delivered after TLS (up to 1 MiB each), oldest connection first."""
        listener = f"backend {self.name}"
        with self._lock:
            return [ReceivedStream(listener, stream.index, bytes(stream.data), stream.received, tuple(stream.arrivals))
                    for stream in self._streams]

    def reset(self) -> None:
        """Forget the recorded requests and bytes."""
        with self._lock:
            self._requests.clear()
            self._streams.clear()

    # -- lifecycle --------------------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        """The server-side TLS context presenting the backend's leaf certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        self.leaf.configure_cert(context)
        return context

    def start_in_thread(self, listen_sock: socket.socket) -> None:
        """Serve HTTPS on the already-listening ``listen_sock`` from a daemon thread.

        The backend takes ownership of the socket and closes it in :meth:`stop`.
        """
        if self._thread is not None:
            raise RuntimeError("FakeInferenceBackend is already running")
        context = self.server_context()
        self._ready.clear()
        self._thread = threading.Thread(
            target=self._run, args=(listen_sock, context), name="fake-inference-backend", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(_STOP_TIMEOUT_SECONDS):
            raise RuntimeError("fake inference backend did not start")
        if self._startup_error is not None:
            raise RuntimeError("fake inference backend failed to start") from self._startup_error

    def stop(self) -> None:
        """Stop serving, drop open connections and join the thread. Safe to call twice."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_STOP_TIMEOUT_SECONDS)
        if thread.is_alive():
            raise RuntimeError("fake inference backend thread did not stop")
        self._thread = None

    def __enter__(self) -> FakeInferenceBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the server -------------------------------------------------------------------------------

    def _run(self, listen_sock: socket.socket, context: ssl.SSLContext) -> None:
        try:
            asyncio.run(self._serve(listen_sock, context))
        except BaseException as error:  # surfaced to start_in_thread if it happened at startup
            self._startup_error = error
            self._ready.set()

    async def _serve(self, listen_sock: socket.socket, context: ssl.SSLContext) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        handlers: set[asyncio.Task[None]] = set()

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await self._handle_connection(reader, writer)
            except asyncio.CancelledError:
                # stop() cancels open connections. Ending normally keeps asyncio's start_server
                # callback (which calls task.exception()) from logging the cancellation as an error.
                pass
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(on_connection, sock=listen_sock, ssl=context)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(handlers):
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)
            # Python 3.12+ wait_closed() also waits for connections; they are gone by now.
            await asyncio.wait_for(server.wait_closed(), _STOP_TIMEOUT_SECONDS)

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        with self._lock:
            stream = _Stream(len(self._streams) + 1)
            self._streams.append(stream)
        try:
            while True:
                try:
                    request = await self._read_request(connection, reader, stream)
                except h11.RemoteProtocolError as error:
                    await self._unframeable(connection, writer, reader, stream, error)
                    return
                if request is None:
                    return
                self._record(request)
                await self._respond(connection, writer, request)
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    # The response ends the connection (Connection: close, HTTP/1.0): record what
                    # is already on its way, then close (a close-delimited body needs the close).
                    await self._drain_to_record(reader, stream, _CLOSE_GRACE_SECONDS)
                    return
                connection.start_next_cycle()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_chunk(self, reader: asyncio.StreamReader, stream: _Stream) -> bytes:
        data = await reader.read(READ_SIZE)
        with self._lock:
            stream.add(data)
        return data

    async def _drain_to_record(self, reader: asyncio.StreamReader, stream: _Stream, idle: float) -> None:
        """Keep recording until the peer closes or sends nothing for ``idle`` seconds."""
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.TimeoutError):
            while await asyncio.wait_for(self._read_chunk(reader, stream), idle):
                pass

    async def _unframeable(self, connection: h11.Connection, writer: asyncio.StreamWriter,
                           reader: asyncio.StreamReader, stream: _Stream, error: h11.RemoteProtocolError) -> None:
        """Bytes h11 cannot frame: answer once (marked) if no response is under way, keep recording.

        Never a refusal: the judges read the raw record, not this answer.
        """
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = json.dumps({"lab": f"could not frame the request ({error}); every byte is recorded"}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         + f"content-length: {len(body)}\r\n{MARK_HEADER}: {self.mark}\r\n".encode()
                         + b"x-lab-unframed: 1\r\n\r\n" + body)
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.drain()
        await self._drain_to_record(reader, stream, _RECORD_IDLE_SECONDS)

    async def _read_request(
        self, connection: h11.Connection, reader: asyncio.StreamReader, stream: _Stream
    ) -> RecordedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await self._read_chunk(reader, stream)
                connection.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_REQUEST_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return RecordedRequest(
                    method=head.method.decode("ascii"),
                    path=head.target.decode("ascii", "replace"),
                    headers=tuple(
                        (name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers
                    ),
                    body=bytes(body),
                )

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    async def _respond(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, request: RecordedRequest
    ) -> None:
        head = request.method == "HEAD"
        if request.header_values("authorization") != [f"Bearer {self.api_key}"]:
            await self._send_json(
                connection, writer, 401, {"error": {"message": "invalid api key", "type": "auth_error"}}, head=head
            )
            return
        path = request.path.partition("?")[0]
        if request.method == "POST" and path == "/v1/chat/completions":
            await self._chat_completion(connection, writer, request)
        elif request.method == "GET" and path == "/v1/models":
            await self._send_json(
                connection,
                writer,
                200,
                {"object": "list", "data": [{"id": DEFAULT_MODEL, "object": "model", "owned_by": "lab"}]},
            )
        else:
            await self._send_json(connection, writer, 404, {"error": {"message": f"no route {path}"}}, head=head)

    async def _chat_completion(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, request: RecordedRequest
    ) -> None:
        try:
            payload = json.loads(request.body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            error = {"error": {"message": "body is not a JSON object"}}
            await self._send_json(connection, writer, 400, error)
            return
        model = str(payload.get("model", DEFAULT_MODEL))
        if payload.get("stream") is True:
            await self._stream_chat_completion(connection, writer, model)
            return
        await self._send_json(
            connection,
            writer,
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(self.stream_pieces)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    async def _stream_chat_completion(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, model: str
    ) -> None:
        # No Content-Length on an HTTP/1.1 response: h11 frames it chunked (RFC 9112 §7.1).
        await _send(
            connection,
            writer,
            h11.Response(
                status_code=200,
                headers=[("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                         (MARK_HEADER, self.mark)],
            ),
        )
        for index, piece in enumerate(self.stream_pieces):
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
            }
            await _send(connection, writer, h11.Data(data=_sse_event(json.dumps(chunk))))
            if index == 0 and self.stream_gate is not None:
                await _wait_for_gate(self.stream_gate)
            elif self.stream_chunk_delay:
                await asyncio.sleep(self.stream_chunk_delay)
        await _send(connection, writer, h11.Data(data=_sse_event("[DONE]")))
        await _send(connection, writer, h11.EndOfMessage())

    async def _send_json(
        self, connection: h11.Connection, writer: asyncio.StreamWriter, status: int, payload: object, *,
        head: bool = False,
    ) -> None:
        body = json.dumps(payload).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), (MARK_HEADER, self.mark)]
        await _send(connection, writer, h11.Response(status_code=status, headers=headers))
        # A response to HEAD has the GET's fields and no content (RFC 9110 §9.3.2); h11 refuses a body there.
        if not head:
            await _send(connection, writer, h11.Data(data=body))
        await _send(connection, writer, h11.EndOfMessage())


async def _send(connection: h11.Connection, writer: asyncio.StreamWriter, event: h11.Event) -> None:
    data = connection.send(event)
    if data:
        writer.write(data)
        await writer.drain()


def _sse_event(data: str) -> bytes:
    # Server-sent events (WHATWG HTML §9.2): one "data:" line, then a blank line ends the event.
    return f"data: {data}\n\n".encode()


async def _wait_for_gate(gate: threading.Event) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _GATE_TIMEOUT_SECONDS
    while not gate.is_set() and loop.time() < deadline:
        await asyncio.sleep(0.005)
