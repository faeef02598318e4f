"""Table tests of the interceptor's pure routing decision (``inference/routing.route_request``).

Each row is (method, target, headers, close_on_denied) -> Forward(route, target) or Deny(reason, close):
the Host rule (first Host field, any absolute-form authority: exactly inference.local[:443]), the route
rule (the enforced routes, canonical spellings only), and the close rule (a denial closes the
connection; only the pre-#819 weakening keeps it open after ``inference_denied``, never after a Host
mismatch). The socket-level behaviour of the same rules is in ``tests/test_interception.py``.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.inference.routes import DEFAULT_ROUTES, InferenceRoute
from pytest_sandbox.inference.routing import REASONS, Deny, Forward, route_request

HOST = [("host", "inference.local")]
CHAT = InferenceRoute("POST", "/v1/chat/completions")
MODELS = InferenceRoute("GET", "/v1/models")
MODEL = InferenceRoute("GET", "/v1/models/*")

# (id, method, target, headers, routed to (route, forwarded target) or None)
FORWARDED = [
    ("chat", "POST", "/v1/chat/completions", HOST, (CHAT, "/v1/chat/completions")),
    ("models", "GET", "/v1/models", HOST, (MODELS, "/v1/models")),
    ("model-wildcard", "GET", "/v1/models/gpt-4o-mini", HOST, (MODEL, "/v1/models/gpt-4o-mini")),
    ("query-kept-verbatim", "GET", "/v1/models?x=%2F", HOST, (MODELS, "/v1/models?x=%2F")),
    ("host-with-port-443", "GET", "/v1/models", [("host", "inference.local:443")], (MODELS, "/v1/models")),
    ("host-upper-case", "GET", "/v1/models", [("Host", "INFERENCE.LOCAL")], (MODELS, "/v1/models")),
    ("absolute-form-to-origin-form", "GET", "http://inference.local/v1/models", HOST, (MODELS, "/v1/models")),
    ("absolute-form-https-443", "GET", "https://inference.local:443/v1/models?a=1", HOST,
     (MODELS, "/v1/models?a=1")),
]

# (id, method, target, headers, reason)
DENIED = [
    ("no-host", "GET", "/v1/models", [], "host_mismatch"),
    ("other-host", "GET", "/v1/models", [("host", "api.openai.com")], "host_mismatch"),
    ("host-other-port", "GET", "/v1/models", [("host", "inference.local:80")], "host_mismatch"),
    ("host-trailing-dot", "GET", "/v1/models", [("host", "inference.local.")], "host_mismatch"),
    ("host-userinfo", "GET", "/v1/models", [("host", "user@inference.local")], "host_mismatch"),
    ("host-kelvin-sign", "GET", "/v1/models", [("host", "inference.\u212alocal")], "host_mismatch"),
    ("first-host-field-decides", "GET", "/v1/models", [("host", "evil.test"), ("host", "inference.local")],
     "host_mismatch"),
    ("absolute-form-other-authority", "GET", "http://evil.test/v1/models", HOST, "host_mismatch"),
    ("absolute-form-other-port", "GET", "http://inference.local:8443/v1/models", HOST, "host_mismatch"),
    ("off-route-path", "GET", "/admin", HOST, "inference_denied"),
    ("the-819-secret", "GET", "/secret", HOST, "inference_denied"),
    ("wrong-method", "GET", "/v1/chat/completions", HOST, "inference_denied"),
    ("dot-dot-segment", "GET", "/v1/models/../admin", HOST, "inference_denied"),
    ("trailing-slash", "GET", "/v1/models/", HOST, "inference_denied"),
    ("encoded-slash", "GET", "/v1%2Fmodels", HOST, "inference_denied"),
    ("fragment", "GET", "/v1/models#x", HOST, "inference_denied"),
    ("asterisk-form", "OPTIONS", "*", HOST, "inference_denied"),
    ("authority-form", "CONNECT", "inference.local:443", HOST, "inference_denied"),
]


def decide(method: str, target: str, headers: list[tuple[str, str]], *, close_on_denied: bool = True,
           routes: tuple[InferenceRoute, ...] = DEFAULT_ROUTES, body_length: int = 0) -> Forward | Deny:
    return route_request(method, target, headers, body_length, routes=routes, api_key="route-key",
                         host_header="api.inference.test:8443", close_on_denied=close_on_denied)


@pytest.mark.parametrize(("method", "target", "headers", "expected"),
                         [row[1:] for row in FORWARDED], ids=[row[0] for row in FORWARDED])
def test_inference_requests_on_inference_local_are_forwarded_in_origin_form(
        method: str, target: str, headers: list[tuple[str, str]], expected: tuple[InferenceRoute, str]) -> None:
    decision = decide(method, target, headers)
    assert isinstance(decision, Forward), decision
    assert (decision.route, decision.target) == expected


@pytest.mark.parametrize("close_on_denied", [True, False], ids=["reference", "pre-819"])
@pytest.mark.parametrize(("method", "target", "headers", "reason"),
                         [row[1:] for row in DENIED], ids=[row[0] for row in DENIED])
def test_everything_else_is_denied_and_only_the_pre_819_weakening_keeps_a_route_denial_open(
        method: str, target: str, headers: list[tuple[str, str]], reason: str, close_on_denied: bool) -> None:
    decision = decide(method, target, headers, close_on_denied=close_on_denied)
    assert isinstance(decision, Deny), decision
    assert decision.reason == reason
    expected_detail = REASONS["host_mismatch"] if reason == "host_mismatch" else "no inference route matches"
    assert decision.detail == expected_detail
    # A Host mismatch always closes; a route denial closes unless weakened (#819).
    assert decision.close is (reason == "host_mismatch" or close_on_denied)


def test_only_the_enforced_routes_count() -> None:
    assert isinstance(decide("GET", "/v1/models", HOST, routes=(CHAT,)), Deny)
    assert isinstance(decide("POST", "/v1/chat/completions", HOST, routes=()), Deny)
    assert isinstance(decide("POST", "/v1/chat/completions", HOST, routes=(CHAT,)), Forward)


def test_forwarded_headers_carry_the_backend_host_and_route_key_not_the_sandbox_credentials() -> None:
    decision = decide("POST", "/v1/chat/completions",
                      [("Host", "inference.local"), ("Authorization", "Bearer sandbox"), ("X-Api-Key", "sandbox"),
                       ("Proxy-Authorization", "Basic x"), ("Connection", "X-Hop"), ("X-Hop", "1"),
                       ("Content-Length", "999"), ("Accept", "application/json")], body_length=2)
    assert isinstance(decision, Forward)
    assert decision.headers == (
        ("host", "api.inference.test:8443"),
        ("accept", "application/json"),
        ("authorization", "Bearer route-key"),
        ("content-length", "2"),
        ("connection", "close"),
    )


def test_connection_tokens_are_trimmed_of_optional_whitespace_only() -> None:
    """RFC 9110 §5.6.3 OWS is SP / HTAB: a token padded with either names the field; the list is
    case-insensitive (RFC 9110 §7.6.1)."""
    decision = decide("GET", "/v1/models", [*HOST, ("connection", "\tX-A ,x-b"), ("X-A", "1"), ("x-B", "2"),
                                            ("x-c", "3")])
    assert isinstance(decision, Forward)
    assert [name for name, _ in decision.headers] == ["host", "x-c", "authorization", "connection"]
