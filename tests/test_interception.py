"""inference.local interception: route matching, the fake backend, and the TLS-terminating interceptor.

Every socket here is on 127.0.0.1; the "upstream" is a fake backend with its own trustme CA.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.inference_routes import (
    DEFAULT_ROUTES,
    InferenceRoute,
    match_route,
    parse_request_target,
)

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
    matched = match_route(DEFAULT_ROUTES, method, target)
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
    assert match_route(DEFAULT_ROUTES, method, target) is None


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
