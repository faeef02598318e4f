"""Interceptors whose route matcher normalises the path first: one forwards the bytes it was sent, one what it matched.

The reference matcher is strict: any spelling of a route's path other than the route's own is no route
(``inference/routes.py``). Many matchers normalise instead (percent-decoding, backslash to slash, Tomcat-style path
parameters, case, empty and dot segments, a trailing slash) and then match:

* :class:`SpellingForwardingInterceptor` forwards the request-target as it arrived once its normalised path
  matched: ``POST /admin/../v1/chat/completions`` reaches the backend as sent, and a backend that resolves paths
  differently (or not at all) serves another path. The path-confusion bypass; it must fail every spelling it
  routes.
* :class:`CanonicalisingInterceptor` forwards the normalised path it matched: the backend sees only route paths.
  Safe, if not strict, and it must pass every spelling probe (the suite must not fail a safe interceptor).

Both leave everything else to the reference (host, framing, the routes themselves, #819's refusal and close).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import posixpath
from typing import Any
from urllib.parse import unquote

from pytest_sandbox.http.streams import Request
from pytest_sandbox.inference import interceptor as interceptor_module
from pytest_sandbox.inference.interceptor import InferenceInterceptor
from pytest_sandbox.inference.routing import Deny, Forward

# "original" or "normalised" while one of these interceptors decides; "" for every other interceptor in the process.
_FORWARDS: contextvars.ContextVar[str] = contextvars.ContextVar("forwards", default="")
_PREVIOUS_ROUTE_REQUEST = interceptor_module.route_request


def normalised(path: str) -> str:
    """``path`` as a lenient matcher reads it: percent-decoded, backslashes as slashes, each segment's ``;``
    parameters dropped (Tomcat), lower case, dot and empty segments resolved, no trailing slash."""
    decoded = unquote(path).replace("\\", "/").lower()
    segments = [segment.split(";", 1)[0] for segment in decoded.split("/")]
    resolved = posixpath.normpath("/".join(segments))
    return "/" + resolved.lstrip("/")


def _route_normalised(method: str, target: str, headers: Any, body_length: int, **options: Any) -> Forward | Deny:
    forwards = _FORWARDS.get()
    if not forwards or not target.startswith("/"):
        return _PREVIOUS_ROUTE_REQUEST(method, target, headers, body_length, **options)
    path, mark, query = target.partition("?")
    matched_target = normalised(path) + mark + query
    decision = _PREVIOUS_ROUTE_REQUEST(method, matched_target, headers, body_length, **options)
    if isinstance(decision, Forward) and forwards == "original":
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


KEYED_INTERCEPTORS: dict[str, type[InferenceInterceptor]] = {
    "spelling": SpellingForwardingInterceptor, "canonical": CanonicalisingInterceptor}
