"""The inference judges: what reached the fake backend, and whether an answer is #819's refusal. Pure.

A request the backend logged is legitimate only if it matches an inference route of the enforced
policy and carries exactly the route key (the interceptor swaps the sandbox's credentials for it);
every byte the backend received must frame strictly into such requests (network.md §4).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from pytest_sandbox.http.responses import ParsedResponse
from pytest_sandbox.http.upstream import ReceivedStream, UpstreamSegment, read_upstream
from pytest_sandbox.inference.routes import DEFAULT_ROUTES, InferenceRoute, match_route
from pytest_sandbox.inference.routing import DENIED_BODY, DENIED_STATUS
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

__all__ = ["BackendRequest", "is_inference_refusal", "judge_backend_record", "stray_backend_requests"]


class BackendRequest(Protocol):
    """One request in a backend log (:class:`~pytest_sandbox.inference.fake_backend.RecordedRequest`)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...
    def header_values(self, name: str) -> list[str]: ...


def stray_backend_requests(recorded: Iterable[BackendRequest], route_key: str,
                           routes: tuple[InferenceRoute, ...] = DEFAULT_ROUTES,
                           forbidden_values: Iterable[str] = ()) -> list[str]:
    """Requests in a backend log that should never have reached it: off-route, not carrying exactly
    the route key, or carrying any of ``forbidden_values`` (the sandbox's own credentials). Pure."""
    forbidden = tuple(forbidden_values)
    return [f"{r.method} {r.path}" for r in recorded
            if match_route(routes, r.method, r.path) is None
            or r.header_values("authorization") != [f"Bearer {route_key}"]
            or any(value in text for _name, text in r.headers for value in forbidden)]


def judge_backend_record(recorded: Sequence[BackendRequest], route_key: str,
                         forbidden_values: Iterable[str] = (),
                         routes: tuple[InferenceRoute, ...] = DEFAULT_ROUTES,
                         streams: Iterable[ReceivedStream] = ()) -> Judgement:
    """BLOCKED when the backend saw only requests matching ``routes`` (the enforced policy's), each
    with the route key, and every byte it received (``streams``, its raw record) frames strictly into
    requests. Pure.

    The raw record matters: bytes the backend's own parser could not frame never appear in
    ``recorded``, yet they reached it.
    """
    strays = stray_backend_requests(recorded, route_key, routes, forbidden_values=forbidden_values)
    unframed = [leftover.describe() for stream in streams for leftover in read_upstream([UpstreamSegment(
        f"{stream.listener} connection {stream.connection}", stream.data, stream.truncated)]).leftovers]
    expected = "only inference routes, each with exactly the route key; every byte received strictly framed"
    observed = f"{len(recorded)} recorded, strays {strays[:5]}, unframed bytes {unframed[:3]}"
    if strays:
        return Judgement(Verdict.ALLOWED, f"requests that must never reach the backend did: {strays[:5]}",
                         expected, observed)
    if unframed:
        return Judgement(Verdict.ALLOWED, f"bytes that are not a clean request reached the backend: {unframed[0]}",
                         expected, observed)
    if not recorded:
        return Judgement(Verdict.INDETERMINATE, "the backend recorded nothing, so nothing was proven",
                         expected, observed)
    return Judgement(Verdict.BLOCKED, "every request the backend saw was a routed inference request "
                     "carrying the route key, and every byte it received was one of them", expected, observed)


def is_inference_refusal(response: ParsedResponse) -> bool:
    """Exactly #819's answer to a non-inference request (network.md §4)."""
    return (response.status == DENIED_STATUS and response.body == DENIED_BODY
            and response.header("content-type") == "application/json")
