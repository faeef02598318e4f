"""Interceptors whose route matcher reads the path leniently: it normalises first, or reads ``*`` as a shell glob.

The reference matcher is strict: any spelling of a route's path other than the route's own is no route
(``inference/routes.py``). Many matchers normalise instead (percent-decoding, backslash to slash, Tomcat-style path
parameters, case, empty and dot segments, a trailing slash) and then match:

* :class:`SpellingForwardingInterceptor` forwards the request-target as it arrived once its normalised path
  matched: ``POST /admin/../v1/chat/completions`` reaches the backend as sent, and a backend that resolves paths
  differently (or not at all) serves another path. The path-confusion bypass; it must fail every spelling it
  routes.
* :class:`CanonicalisingInterceptor` forwards the normalised path it matched: the backend sees only route paths.
  Safe, if not strict, and it must pass every spelling probe (the suite must not fail a safe interceptor).
* :class:`GetSpellingForwardingInterceptor` is the first, for GET requests only (a matcher that canonicalises
  resource lookups such as ``/v1/models/*``): the probes once spelt only the policy's first route, a POST, and it
  passed every inference test.
* :class:`GlobRouteInterceptor` matches each route as a shell pattern (``fnmatch``: its ``*`` crosses ``/``, as a
  glob or prefix check does) on the path as sent, and forwards it: ``GET /v1/models/../../admin`` matches
  ``/v1/models/*`` and reaches the backend, which resolves it to ``/admin``. It passed every inference test too
  (its routes without a wildcard match exactly).

Both leave everything else to the reference (host, framing, the routes themselves, #819's refusal and close).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import fnmatch
import posixpath
from typing import Any
from urllib.parse import unquote

from pytest_sandbox.http.streams import Request
from pytest_sandbox.inference import interceptor as interceptor_module
from pytest_sandbox.inference.interceptor import InferenceInterceptor
from pytest_sandbox.inference.routing import Deny, Forward

# "original", "normalised", "original-get" or "glob" while one of these interceptors decides; "" for every other
# interceptor in the process.
_FORWARDS: contextvars.ContextVar[str] = contextvars.ContextVar("forwards", default="")
_PREVIOUS_ROUTE_REQUEST = interceptor_module.route_request


def normalised(path: str) -> str:
    """``path`` as a lenient matcher reads it: percent-decoded, backslashes as slashes, each segment's ``;``
    parameters dropped (Tomcat), lower case, dot and empty segments resolved, no trailing slash."""
    decoded = unquote(path).replace("\\", "/").lower()
    segments = [segment.split(";", 1)[0] for segment in decoded.split("/")]
    resolved = posixpath.normpath("/".join(segments))
    return "/" + resolved.lstrip("/")


def _globbed(method: str, path: str, routes: Any) -> str:
    """The example path of the first route whose pattern ``path`` matches as a shell glob, else ``path``."""
    return next((route.example() for route in routes
                 if route.method == method and fnmatch.fnmatchcase(path, route.path)), path)


def _route_normalised(method: str, target: str, headers: Any, body_length: int, **options: Any) -> Forward | Deny:
    forwards = _FORWARDS.get()
    if not forwards or not target.startswith("/") or (forwards == "original-get" and method != "GET"):
        return _PREVIOUS_ROUTE_REQUEST(method, target, headers, body_length, **options)
    path, mark, query = target.partition("?")
    matched = _globbed(method, path, options["routes"]) if forwards == "glob" else normalised(path)
    decision = _PREVIOUS_ROUTE_REQUEST(method, matched + mark + query, headers, body_length, **options)
    if isinstance(decision, Forward) and forwards != "normalised":
        return dataclasses.replace(decision, target=target)  # the hole: the bytes that were sent, not those matched
    return decision


interceptor_module.route_request = _route_normalised  # type: ignore[assignment]


class SpellingForwardingInterceptor(InferenceInterceptor):
    forwards = "original"

    async def _handle(self, request: Request, client: asyncio.StreamWriter) -> bool:
        token = _FORWARDS.set(self.forwards)
        try:
            return await super()._handle(request, client)
        finally:
            _FORWARDS.reset(token)


class CanonicalisingInterceptor(SpellingForwardingInterceptor):
    forwards = "normalised"


class GetSpellingForwardingInterceptor(SpellingForwardingInterceptor):
    forwards = "original-get"


class GlobRouteInterceptor(SpellingForwardingInterceptor):
    forwards = "glob"


KEYED_INTERCEPTORS: dict[str, type[InferenceInterceptor]] = {
    "spelling": SpellingForwardingInterceptor, "canonical": CanonicalisingInterceptor,
    "spelling-get": GetSpellingForwardingInterceptor, "glob": GlobRouteInterceptor}
