"""Deliberately broken proxies that classify a destination only for the request lines the harness used to send.

Every SSRF catalogue case is sent as GET (absolute, origin and authority form), CONNECT or OPTIONS, as HTTP/1.1.
Each proxy here is the reference everywhere except that for some other request line it dials a special-use
destination unclassified (the policy's host and port rules and the self-connection check still stand):

* :class:`MethodKeyedProxy` classifies GET, HEAD, CONNECT and OPTIONS only: a client's ``PUT
  http://169.254.169.254/latest/api/token`` (the IMDSv2 token request every AWS SDK sends first) goes through,
  as in a proxy whose address check sits in its GET path (a cache's, say);
* :class:`VersionKeyedProxy` classifies HTTP/1.1 requests only: an HTTP/1.0 GET goes through.

As commands inside a lab: :func:`command` with their :data:`KEYED` name (``--sandbox-proxy-cmd``).

The same two keys inside the intercepted ``inference.local`` tunnel, where the inference tests used to send GET,
POST and DELETE only, as HTTP/1.1: :data:`KEYED_INTERCEPTORS` apply #819's routes to those requests and forward
any other (a ``TRACE``, a ``GET /admin HTTP/1.0``) to the backend with the route key, as if it were routed. Two
more key on how a body is framed, which the inference tests never varied (Content-Length only): ``chunked`` judges
only requests without Transfer-Encoding, ``expect`` only those without ``Expect: 100-continue``.
"""

from __future__ import annotations

import contextvars
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: use this checkout's package, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broken_proxies.marker_keyed import MarkerKeyedInterceptor
from broken_proxies.weak_ssrf import WeakProxy
from pytest_sandbox.http.streams import Request
from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.proxy.server import _Refused
from pytest_sandbox.network.third_party import main_reference, reference_command

CLASSIFIED_METHODS = frozenset({"GET", "HEAD", "CONNECT", "OPTIONS"})
_CLASSIFIED: contextvars.ContextVar[bool] = contextvars.ContextVar("classified", default=True)


class RequestLineKeyedProxy(WeakProxy):
    """The reference, except that a request :meth:`classifies` says no to gets its special-use refusal waived."""

    @staticmethod
    def classifies(request: Request) -> bool:
        raise NotImplementedError

    async def _admit(self, request: Request):  # type: ignore[no-untyped-def]
        _CLASSIFIED.set(self.classifies(request))
        return await super()._admit(request)

    async def _handle_connect(self, conn, request: Request) -> None:  # type: ignore[no-untyped-def]
        _CLASSIFIED.set(self.classifies(request))
        await super()._handle_connect(conn, request)

    async def _destination(self, authority: Authority) -> tuple[str, ...]:
        try:
            return await super()._destination(authority)
        except _Refused as refused:
            if (_CLASSIFIED.get() or refused.refusal.reason != "ssrf_denied"
                    or "self connection" in refused.refusal.detail):
                raise
            return await self.unchecked_addresses(authority)  # the hole: this request line is not classified


class MethodKeyedProxy(RequestLineKeyedProxy):
    @staticmethod
    def classifies(request: Request) -> bool:
        return request.method in CLASSIFIED_METHODS


class VersionKeyedProxy(RequestLineKeyedProxy):
    @staticmethod
    def classifies(request: Request) -> bool:
        return request.http_version == "1.1"


KEYED: dict[str, type[RequestLineKeyedProxy]] = {"method": MethodKeyedProxy, "version": VersionKeyedProxy}

JUDGED_IN_TUNNEL = frozenset({"GET", "POST", "DELETE"})  # the methods the inference tests sent before PUT and the rest


class MethodKeyedInterceptor(MarkerKeyedInterceptor):
    @staticmethod
    def judges(request: Request) -> bool:
        return request.method in JUDGED_IN_TUNNEL


class VersionKeyedInterceptor(MarkerKeyedInterceptor):
    @staticmethod
    def judges(request: Request) -> bool:
        return request.http_version == "1.1"


class ChunkedKeyedInterceptor(MarkerKeyedInterceptor):
    @staticmethod
    def judges(request: Request) -> bool:
        return request.header("transfer-encoding") is None


class ExpectKeyedInterceptor(MarkerKeyedInterceptor):
    @staticmethod
    def judges(request: Request) -> bool:
        return request.header("expect") is None


KEYED_INTERCEPTORS: dict[str, type[MarkerKeyedInterceptor]] = {
    "method": MethodKeyedInterceptor, "version": VersionKeyedInterceptor, "chunked": ChunkedKeyedInterceptor,
    "expect": ExpectKeyedInterceptor}


def command(keyed_on: str) -> str:
    """The ``--sandbox-proxy-cmd`` of the proxy :data:`KEYED` names ``keyed_on``."""
    return reference_command(sys.executable, str(Path(__file__).resolve()), "--keyed-on", keyed_on)


if __name__ == "__main__":
    ARGS = sys.argv[1:]
    KEYED_ON = ARGS[1] if ARGS[:1] == ["--keyed-on"] else "method"
    raise SystemExit(main_reference(ARGS[2:] if ARGS[:1] == ["--keyed-on"] else ARGS, KEYED[KEYED_ON]))
