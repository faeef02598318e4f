"""A deliberately broken proxy that recognises the harness: it judges only requests that carry its marker.

Every request the conformance probes send carries the attempt's nonce in ``X-Sandbox-Probe`` (and, where
there is a path, in ``/sandbox-probe/<nonce>``). This proxy applies the reference's checks to exactly those
requests and dials anything else unchecked: a real client's ``GET http://169.254.169.254/`` goes through.
A suite whose every denial probe carries the marker credits it with BLOCKED everywhere; the unmarked
twin of each denial probe (``probes/ssrf_unmarked.py``) must fail it.

In-process: :class:`MarkerKeyedProxy` with :func:`broken_proxies.weak_ssrf.start_weak_proxy`. As a command
inside a lab: :data:`COMMAND` (``--sandbox-proxy-cmd``).

The twin must not be recognisable either. Three more proxies judge what a twin could give away and dial
the rest unchecked: :class:`RequestIdKeyedProxy` judges the marked requests and those with an
``X-Request-ID`` field (where the twin used to carry its nonce), :class:`RequestIdAbsentKeyedProxy` only
requests without that field, :class:`NonceTextKeyedProxy` only requests whose bytes hold ``sbx-`` (the
harness's nonce text), :class:`UserAgentAbsentKeyedProxy` only requests without a ``User-Agent`` (the marked
probes send none; a twin sends curl's), :class:`ConnectionCloseKeyedProxy` only CONNECTs, requests asking for the
close (every marked probe sends ``Connection: close``) and later requests on a connection. As commands:
:func:`command` with their :data:`KEYED` name.

:class:`MarkerKeyedInterceptor` is the same inside the intercepted ``inference.local`` tunnel: #819's 403 for
a marked request that matches no route, and an unmarked one forwarded to the backend whatever it asks for
(``GET /admin``, another Host), with the route key, as if it were routed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: use this checkout's package, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncio
from collections.abc import Iterator
from typing import Any

from broken_proxies.harness import backend_config, proxy_with_interceptor
from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.http.streams import Request
from pytest_sandbox.inference import interceptor as interceptor_module
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.inference.interceptor import InferenceInterceptor
from pytest_sandbox.inference.routes import InferenceRoute, parse_request_target
from pytest_sandbox.inference.routing import Deny, Forward, forwardable_request_headers, route_request
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.harness import RunningProxy, interception_of
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, NONCE_PATH_PREFIX
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.proxy.server import _Refused
from pytest_sandbox.network.third_party import main_reference, reference_command

COMMAND = reference_command(sys.executable, str(Path(__file__).resolve()))

_UNMARKED: contextvars.ContextVar[bool] = contextvars.ContextVar("unmarked", default=False)
# Set for an unmarked request the reference would have refused (the one this proxy leaks).
_LEAKING: contextvars.ContextVar[bool] = contextvars.ContextVar("leaking", default=False)
# Set only by MarkerKeyedInterceptor around its own requests: every other interceptor in the process (the
# reference's, in the same test session) keeps the reference decision.
_UNMARKED_IN_TUNNEL: contextvars.ContextVar[bool] = contextvars.ContextVar("unmarked_in_tunnel", default=False)


def carries_marker(request: Request) -> bool:
    """Whether ``request`` looks like the harness's: its nonce field or its nonce path."""
    return request.header(NONCE_HEADER) is not None or NONCE_PATH_PREFIX in request.target


class MarkerKeyedProxy(WeakProxy):
    @staticmethod
    def judges(request: Request) -> bool:
        """Whether this proxy applies the policy to ``request`` (else it dials it unchecked)."""
        return carries_marker(request)

    async def _admit(self, request: Request) -> tuple[Authority, str, tuple[str, ...]]:
        _UNMARKED.set(not self.judges(request))
        return await super()._admit(request)

    async def _handle_connect(self, conn, request: Request) -> None:  # type: ignore[no-untyped-def]
        _UNMARKED.set(not self.judges(request))
        await super()._handle_connect(conn, request)

    async def _destination(self, authority: Authority) -> tuple[str, ...]:
        _LEAKING.set(False)
        if _UNMARKED.get():
            try:
                await super()._destination(authority)
            except _Refused:  # the reference would refuse it
                _LEAKING.set(True)
            return await self.unchecked_addresses(authority)  # the hole: nobody is looking
        return await super()._destination(authority)


REQUEST_ID = "x-request-id"


class StrippingMarkerKeyedProxy(MarkerKeyedProxy):
    """:class:`MarkerKeyedProxy` that also forwards what it leaks (an unmarked request the reference would refuse)
    without its query and ``X-Request-ID`` (as a proxy that rebuilds requests from a field allowlist would): what
    an unmarked twin puts at the canary then carries no nonce, and only time, destination and the isolation reruns
    can say whose it is."""

    async def _exchange(self, conn, request: Request, authority: Authority, path: str,  # type: ignore[no-untyped-def]
                        addresses: tuple[str, ...]):
        if _LEAKING.get():
            request = dataclasses.replace(
                request, headers=tuple(item for item in request.headers if item[0] != REQUEST_ID),
                raw_headers=tuple(item for item in request.raw_headers if item[0] != REQUEST_ID.encode()))
            path = path.partition("?")[0]
        return await super()._exchange(conn, request, authority, path, addresses)


class RequestIdKeyedProxy(MarkerKeyedProxy):
    """Judges the marked requests and those carrying ``X-Request-ID`` (the old twin's field)."""

    @staticmethod
    def judges(request: Request) -> bool:
        return carries_marker(request) or request.header(REQUEST_ID) is not None


class RequestIdAbsentKeyedProxy(MarkerKeyedProxy):
    """Judges only requests without ``X-Request-ID`` (every marked probe): one with the field goes through."""

    @staticmethod
    def judges(request: Request) -> bool:
        return request.header(REQUEST_ID) is None


class NonceTextKeyedProxy(MarkerKeyedProxy):
    """Judges only requests whose bytes hold the harness's nonce text ``sbx-`` (target or any field)."""

    @staticmethod
    def judges(request: Request) -> bool:
        return b"sbx-" in request.raw or "sbx-" in request.target


class UserAgentAbsentKeyedProxy(MarkerKeyedProxy):
    """Judges only requests without a ``User-Agent`` (every marked probe): a client's request goes through."""

    @staticmethod
    def judges(request: Request) -> bool:
        return request.header("user-agent") is None


# RFC 9562 §5.4's lowercase spelling of a version 4 UUID, what every unmarked twin used to carry its nonce in.
_UUID4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


class UuidKeyedProxy(MarkerKeyedProxy):
    """Judges the marked requests and those holding a version 4 UUID anywhere in the head (target or field):
    a client's request without one goes through."""

    @staticmethod
    def judges(request: Request) -> bool:
        return carries_marker(request) or _UUID4.search(request.raw) is not None \
            or _UUID4.search(request.target.encode("latin-1", "replace")) is not None


_REQUESTS_ON_CONNECTION: contextvars.ContextVar[list[int]] = contextvars.ContextVar("requests_on_connection")


class ConnectionCloseKeyedProxy(MarkerKeyedProxy):
    """Judges CONNECTs, requests that ask for the close (``Connection: close``, as every marked probe sends) and
    every request after the first on a connection (the keep-alive checks'): a client's first request on a
    persistent connection (HTTP/1.1's default, RFC 9112 §9.3; curl sends no ``Connection``) goes through."""

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _REQUESTS_ON_CONNECTION.set([0])  # this connection's task (and the tasks it starts) see this one list
        await super()._serve_client(reader, writer)

    def judges(self, request: Request) -> bool:  # type: ignore[override]
        seen = _REQUESTS_ON_CONNECTION.get([0])
        seen[0] += 1
        return request.method == "CONNECT" or not request.keep_alive or seen[0] > 1


KEYED: dict[str, type[MarkerKeyedProxy]] = {
    "marker": MarkerKeyedProxy, "marker-stripping": StrippingMarkerKeyedProxy, "request-id": RequestIdKeyedProxy,
    "no-request-id": RequestIdAbsentKeyedProxy,
    "nonce-text": NonceTextKeyedProxy, "no-user-agent": UserAgentAbsentKeyedProxy,
    "connection-close": ConnectionCloseKeyedProxy, "uuid": UuidKeyedProxy}


def command(keyed_on: str) -> str:
    """The ``--sandbox-proxy-cmd`` of the proxy :data:`KEYED` names ``keyed_on``."""
    return reference_command(sys.executable, str(Path(__file__).resolve()), "--keyed-on", keyed_on)


_REFERENCE_ROUTE_REQUEST = route_request
_ANY = InferenceRoute("GET", "/unmarked")  # what the forward is recorded under; never matched


def _route_unless_unmarked(method: str, target: str, headers: Any, body_length: int, **options: Any) -> Forward | Deny:
    """The reference decision for the interceptors that do not ask otherwise; for an unmarked request seen by
    a :class:`MarkerKeyedInterceptor`, a forward of whatever it asked for (the hole)."""
    if not _UNMARKED_IN_TUNNEL.get():
        return _REFERENCE_ROUTE_REQUEST(method, target, headers, body_length, **options)
    parsed = parse_request_target(target)
    forwarded = forwardable_request_headers(headers, api_key=options["api_key"], host_header=options["host_header"],
                                            body_length=body_length, method=method)
    # A target the strict parser refuses (a spelling such as /v1\\chat) goes as it came, query (and twin UUID) kept.
    return Forward(_ANY, parsed.origin_form if parsed is not None else target, tuple(forwarded))


interceptor_module.route_request = _route_unless_unmarked  # type: ignore[assignment]


class MarkerKeyedInterceptor(InferenceInterceptor):
    @staticmethod
    def judges(request: Request) -> bool:
        """Whether this interceptor applies the routes to ``request`` (else it forwards it, as if routed)."""
        return request.header(NONCE_HEADER) is not None

    async def _handle(self, request: Request, client: asyncio.StreamWriter) -> bool:
        token = _UNMARKED_IN_TUNNEL.set(not self.judges(request))
        try:
            return await super()._handle(request, client)
        finally:
            _UNMARKED_IN_TUNNEL.reset(token)


# The same keys inside the tunnel: an interceptor per KEYED proxy, judging exactly what that proxy judges.
KEYED_INTERCEPTORS: dict[str, type[MarkerKeyedInterceptor]] = {
    name: type(f"{proxy_class.__name__.removesuffix('Proxy')}Interceptor", (MarkerKeyedInterceptor,),
               {"judges": staticmethod(proxy_class.judges)})
    # The connection-close key counts requests per client connection, state the tunnel's interceptor has not.
    for name, proxy_class in KEYED.items() if name != "connection-close"}


@contextlib.contextmanager
def marker_keyed_lab_proxy(lab: NetworkLab, backend: FakeInferenceBackend, port: int,
                           keyed_on: str = "marker") -> Iterator[RunningProxy]:
    """The smuggling fake: the :data:`KEYED` proxy ``keyed_on`` on 127.0.0.1:``port`` in ``lab``, intercepting
    ``inference.local:443`` with the interceptor keyed the same way (forwarding to ``backend``, the lab's CA).
    Every request it recognises as the harness's (every smuggling probe's: each head carries ``X-Sandbox-Probe``)
    gets the reference's checks, so every catalogue row is refused as the reference refuses it; the same bytes
    from a client (no marker) get the framing checks only, so a pipelined request to a denied host is dialled
    and a non-inference request in the tunnel forwarded to the backend."""
    interceptor = KEYED_INTERCEPTORS[keyed_on](interception_of(lab).trust.ca, backend_config(backend),
                                               resolver=lab.resolver(), socket_factory=lab.socket,
                                               record=lambda decision: None)
    with proxy_with_interceptor(lab, interceptor, port, KEYED[keyed_on]) as running:
        yield running


if __name__ == "__main__":
    ARGS = sys.argv[1:]
    KEYED_ON = ARGS[1] if ARGS[:1] == ["--keyed-on"] else "marker"
    raise SystemExit(main_reference(ARGS[2:] if ARGS[:1] == ["--keyed-on"] else ARGS, KEYED[KEYED_ON]))
