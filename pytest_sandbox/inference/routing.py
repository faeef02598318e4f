"""The interceptor's routing decision for one decrypted request: forward it, or deny it. Pure.

Kept apart from the TLS and socket code (``inference/interceptor.py``) so that the rule OpenShell adopted
in PR #819 -- an inner request is forwarded only if its Host names ``inference.local`` and it matches an
inference route, and a denial closes the connection -- is a function with table tests
(``tests/test_inference_routing.py``), like the egress proxy's ``decide_destination``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pytest_sandbox.http.fields import end_to_end
from pytest_sandbox.http.framing import ROUTING_OVERRIDE_FIELDS, is_aliased_field
from pytest_sandbox.inference.routes import InferenceRoute, match_route, parse_request_target

__all__ = [
    "DENIED_BODY",
    "DENIED_STATUS",
    "INFERENCE_HOST",
    "INFERENCE_PORT",
    "REASONS",
    "UPSTREAM_FAILED_STATUS",
    "Deny",
    "Forward",
    "forwardable_request_headers",
    "forwardable_response_headers",
    "is_inference_authority",
    "route_request",
]

INFERENCE_HOST = "inference.local"
INFERENCE_PORT = 443

# The exact refusal OpenShell sends since #819 for a non-inference request (network.md §4).
DENIED_STATUS = 403
DENIED_BODY = b'{"error":"connection not allowed by policy"}'
UPSTREAM_FAILED_STATUS = 502

# Reason codes recorded for each decision.
REASONS: dict[str, str] = {
    "routed": "matched an inference route and was forwarded to the backend",
    "inference_denied": "matched no inference route; 403 and (unless weakened) the connection closed",
    "host_mismatch": "inner Host or absolute-form authority is not inference.local[:443]",
    "framing:<case>": "the request framing was ambiguous or malformed (see pytest_sandbox.http.framing)",
    "client_tls_failed": "the client did not complete the TLS handshake with the interception leaf",
    "upstream_resolve_failed": "the backend host did not resolve",
    "upstream_unreachable": "no resolved backend address accepted the connection",
    "upstream_tls_failed": "the backend certificate failed verification; never retried without it",
    "upstream_protocol_error": "the backend sent a malformed or oversized response, or went idle",
    "request_not_forwardable": "the request could not be re-serialised for the backend",
    "client_closed_mid_request": "the client closed the connection in the middle of a request",
    "client_timeout": "the client did not deliver a complete request within the idle deadline (slowloris)",
    "client_closed_mid_response": "the client hung up or stopped reading while the response was relayed",
}

# The fields the interceptor always writes itself (plus the hop-by-hop ones http.fields drops).
# Routing-override fields (X-HTTP-Method-Override, X-Original-URL, Forwarded, ...: http.framing) are
# refused by the strict reader before routing; they are dropped here too, so that no reader that lets one
# through can make the backend run another method or path than the route that was matched (RFC 9110 §9.1).
_REWRITTEN_REQUEST_FIELDS = frozenset({b"host", b"content-length", b"authorization", b"x-api-key"}) \
    | ROUTING_OVERRIDE_FIELDS
_REWRITTEN_RESPONSE_FIELDS = frozenset({b"content-length"})


@dataclass(frozen=True)
class Forward:
    """Send the request to the backend: as ``target`` (origin-form, query kept verbatim) with ``headers``."""

    route: InferenceRoute
    target: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Deny:
    """Answer #819's 403. ``close``: whether the connection then closes (always, unless weakened)."""

    reason: str  # "host_mismatch" | "inference_denied"
    detail: str
    close: bool


def route_request(method: str, target: str, headers: Sequence[tuple[str, str]], body_length: int, *,
                  routes: Sequence[InferenceRoute], api_key: str, host_header: str,
                  close_on_denied: bool = True) -> Forward | Deny:
    """The decision for one request read inside the intercepted tunnel. Pure.

    1. The Host (its first field) and any absolute-form authority must name ``inference.local[:443]``
       (:func:`is_inference_authority`), else ``Deny("host_mismatch")``, and the connection closes.
    2. The request must match one of ``routes`` (``match_route``) with a target that parses, else
       ``Deny("inference_denied")``; it closes unless ``close_on_denied=False`` (the pre-#819 weakening).
    3. Else ``Forward``: origin-form target, headers for the backend (:func:`forwardable_request_headers`,
       ``host_header`` and ``api_key`` are the backend's).
    """
    host = next((value for name, value in headers if name.lower() == "host"), None)
    parsed = parse_request_target(target)
    absolute_authority = parsed.authority if parsed is not None else None
    if not is_inference_authority(host) or (
        absolute_authority is not None and not is_inference_authority(absolute_authority)
    ):
        return Deny("host_mismatch", REASONS["host_mismatch"], close=True)
    route = match_route(routes, method, target)
    if route is None or parsed is None:
        return Deny("inference_denied", "no inference route matches", close=close_on_denied)
    forwarded = forwardable_request_headers(
        headers, api_key=api_key, host_header=host_header, body_length=body_length, method=method
    )
    return Forward(route, parsed.origin_form, tuple(forwarded))


def is_inference_authority(authority: str | bytes | None) -> bool:
    """Whether a Host value or absolute-form authority names ``inference.local`` (port 443 only).

    Host names compare case-insensitively (RFC 3986 §3.2.2); nothing else is normalised: a trailing
    dot, userinfo, another port or an IP literal is a mismatch.
    """
    if authority is None:
        return False
    text = authority.decode("latin-1") if isinstance(authority, bytes) else authority
    # ASCII first: str.lower() folds some non-ASCII letters to ASCII ones (U+212A Kelvin -> "k").
    return text.isascii() and text.lower() in (INFERENCE_HOST, f"{INFERENCE_HOST}:{INFERENCE_PORT}")


def forwardable_request_headers(
    headers: Iterable[tuple[str, str]], *, api_key: str, host_header: str, body_length: int, method: str
) -> list[tuple[str, str]]:
    """The header list sent upstream for a routed request. Pure.

    Dropped: hop-by-hop fields and every field the client's ``Connection`` names (RFC 9110
    §7.6.1), ``proxy-*``, routing overrides (``http.framing.ROUTING_OVERRIDE_FIELDS``) and ``_``
    aliases of framing and routing fields, the client's credentials (``authorization``, ``x-api-key``:
    the sandbox never holds the real key), ``host`` and ``content-length`` (re-derived here; the body
    has already been de-chunked by the framing reader). Added: the backend's Host, the route key, a
    fresh Content-Length, and ``connection: close`` (one upstream connection per request, so no
    request can ride another's upstream connection).
    """
    # "_" aliases of framing and routing fields (Transfer_Encoding, X_Forwarded_Host) go too: a backend that
    # maps "_" to "-" would frame or route by them (the strict reader refuses them before this).
    kept = [(name, value) for name, value in _end_to_end_text(headers, _REWRITTEN_REQUEST_FIELDS)
            if not is_aliased_field(name.lower().encode("latin-1"))]
    # RFC 9110 §8.6: no Content-Length on a bodiless request whose method defines no body.
    has_content = body_length > 0 or method in ("POST", "PUT", "PATCH")
    framing = [("content-length", str(body_length))] if has_content else []
    return [
        ("host", host_header),
        *kept,
        ("authorization", f"Bearer {api_key}"),
        *framing,
        ("connection", "close"),
    ]


def forwardable_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The backend's response headers minus hop-by-hop fields, ``proxy-*`` and its own framing. Pure."""
    return _end_to_end_text(headers, _REWRITTEN_RESPONSE_FIELDS)


def _end_to_end_text(headers: Iterable[tuple[str, str]], rewritten: frozenset[bytes]) -> list[tuple[str, str]]:
    """``http.fields.end_to_end`` over latin-1 text (the field values h11 and the framing reader decoded)."""
    fields = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    return [(name.decode("latin-1"), value.decode("latin-1"))
            for name, value in end_to_end(fields, rewritten=rewritten, drop_proxy_fields=True)]
