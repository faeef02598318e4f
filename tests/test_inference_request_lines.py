"""Inside the intercepted tunnel, every method and HTTP/1.0 are routed or refused like the rest.

The inference tests sent GET, POST and DELETE only, as HTTP/1.1. ``tests/broken_proxies/method_keyed.py`` has an
interceptor that applies #819's routes to those methods only and forwards any other request to the backend with the
route key (``method``), and one that does the same for HTTP/1.0 (``version``): each earned every verdict of
``conformance/test_inference.py`` (14 BLOCKED, 9 WORKS) while a ``TRACE`` or a ``GET /admin HTTP/1.0`` reached the
backend. The route probes now send PUT, PATCH, OPTIONS and TRACE too, and every extra request again as HTTP/1.0
with one routed HTTP/1.0 control, and each extra request with a body again chunked and with ``Expect: 100-continue``
(the ``chunked`` and ``expect`` fakes judge only Content-Length bodies without it), each with a routed control:
each fake must fail exactly the probes it forwards (and the backend record), and the reference pass them all.

The same for the request-target: the route probes send eleven other spellings of the first route's path
(``path_spellings``). ``tests/broken_proxies/path_normalising.py`` has an interceptor that normalises the path
before matching and forwards the bytes it was sent (``spelling``: it passed every inference test) and one that
forwards the path it matched (``canonical``: safe). The first must fail every spelling it routes, the second none.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from broken_proxies.method_keyed import JUDGED_IN_TUNNEL
from broken_proxies.path_normalising import normalised
from test_marker_keyed import FRAMING_REFUSED, _inference_run

from pytest_sandbox.inference.routes import (
    BODY_FRAMINGS,
    HTTP10,
    METHODS_WITH_CONTENT,
    NON_ROUTE_REQUESTS,
    RouteProbe,
    match_route,
    path_spellings,
    route_probes,
)
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.probes.inference import inference_request

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
BASELINE_ROUTES = baseline_policy().inference_routes


def test_every_extra_request_is_sent_in_both_versions_with_one_routed_http10_control():
    probes = route_probes(BASELINE_ROUTES, BASELINE_ROUTES)
    http10 = [probe for probe in probes if probe.http_version == HTTP10]
    assert {(probe.method, probe.path) for probe in http10 if not probe.routed} == set(NON_ROUTE_REQUESTS)
    controls = [probe for probe in http10 if probe.routed]
    assert [(probe.method, probe.path) for probe in controls] == [("POST", "/v1/chat/completions")]
    assert {probe.method for probe in probes} >= {"GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "TRACE"}
    assert len({probe.test_id for probe in probes}) == len(probes)
    assert RouteProbe("GET", "/admin", False, HTTP10).test_id == "route-http10-GET-/admin"
    assert RouteProbe("GET", "/admin", False, HTTP10).request_line == "GET /admin HTTP/1.0"
    assert RouteProbe("GET", "/admin", False).test_id == "route-GET-/admin"


def test_the_request_says_its_version_and_a_method_with_content_says_its_length():
    put = inference_request("PUT", "/v1/chat/completions", http_version=HTTP10)
    assert put.startswith(b"PUT /v1/chat/completions HTTP/1.0\r\nHost: inference.local\r\n")
    assert b"\r\nContent-Length: 0\r\n" in put
    trace = inference_request("TRACE", "/v1/chat/completions")
    assert trace.startswith(b"TRACE /v1/chat/completions HTTP/1.1\r\n") and b"Content-Length" not in trace


FORWARDED_BY: dict[str, Callable[[RouteProbe], bool]] = {  # the refusals each fake forwards instead
    "method": lambda probe: probe.method not in JUDGED_IN_TUNNEL,
    "version": lambda probe: probe.http_version == HTTP10,
    "chunked": lambda probe: probe.framing == "chunked",
    "expect": lambda probe: probe.framing == "expect-continue",
}


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
@pytest.mark.parametrize("keyed_on", sorted(FORWARDED_BY))
def test_an_interceptor_judging_only_the_old_request_lines_fails_exactly_the_probes_it_forwards(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, keyed_on: str) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    reference, reference_verdicts = _inference_run(pytester, marker_keyed=False)
    assert reference.ret == 0, reference.stdout.str()[-3000:]
    probes = route_probes(BASELINE_ROUTES, BASELINE_ROUTES)
    forwarded = {probe.test_id for probe in probes if not probe.routed and FORWARDED_BY[keyed_on](probe)}
    assert len(forwarded) >= 4 and all(reference_verdicts[test] == "BLOCKED" for test in forwarded)
    assert {reference_verdicts[f"route-{line}POST-/v1/chat/completions"]
            for line in ("http10-", "chunked-", "expect-continue-")} == {"WORKS"}
    keyed, verdicts = _inference_run(pytester, marker_keyed=True, keyed_on=keyed_on, module="method_keyed")
    output = keyed.stdout.str()
    failed = {test for test, verdict in verdicts.items() if verdict != reference_verdicts[test]}
    assert failed == forwarded | {"backend-record"}, (sorted(failed ^ forwarded), output[-4000:])
    assert all(verdicts[test] == "ALLOWED" for test in failed), verdicts
    assert "is no route of the policy, yet it reached the backend" in output, output[-4000:]


def test_every_spelling_reads_as_the_route_to_a_normalising_matcher_and_as_no_route_to_the_strict_one():
    probes = [probe for probe in route_probes(BASELINE_ROUTES) if probe.canonical]
    assert [probe.path for probe in probes] == list(path_spellings("/v1/chat/completions"))
    assert len(probes) == 11 and not any(probe.routed for probe in probes)
    for probe in probes:
        assert probe.canonical == "/v1/chat/completions" and probe.method == "POST"
        assert match_route(BASELINE_ROUTES, "POST", probe.path) is None
        assert normalised(probe.path) == probe.canonical, probe.path


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_an_interceptor_forwarding_the_spelling_it_normalised_fails_and_one_forwarding_the_route_passes(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    reference, reference_verdicts = _inference_run(pytester, marker_keyed=False)
    assert reference.ret == 0, reference.stdout.str()[-3000:]
    spellings = {probe.test_id for probe in route_probes(BASELINE_ROUTES) if probe.canonical}
    assert all(reference_verdicts[test] == "BLOCKED" for test in spellings), reference_verdicts
    leaky, verdicts = _inference_run(pytester, marker_keyed=True, keyed_on="spelling", module="path_normalising")
    output = leaky.stdout.str()
    failed = {test for test, verdict in verdicts.items() if verdict != reference_verdicts[test]}
    assert failed == spellings - {FRAMING_REFUSED} | {"backend-record"}, (sorted(failed), output[-4000:])
    assert all(verdicts[test] == "ALLOWED" for test in failed), verdicts
    assert "which it may read as another path" in output, output[-4000:]
    safe, safe_verdicts = _inference_run(pytester, marker_keyed=True, keyed_on="canonical", module="path_normalising")
    assert safe.ret == 0, safe.stdout.str()[-4000:]
    assert safe_verdicts == reference_verdicts
    # ... and it passed the spellings by forwarding them as the route, not by refusing them.
    reasons = {probe["test"]: probe["reason"] for probe in json.loads((pytester.path / "canonical.json").read_text())
               ["probes"]}
    forwarded = {test for test in spellings if "was forwarded only as the route's own path" in reasons[test]}
    assert forwarded == spellings - {FRAMING_REFUSED}, reasons


def test_every_extra_request_with_a_body_is_sent_framed_each_way_with_a_routed_control():
    probes = route_probes(BASELINE_ROUTES, BASELINE_ROUTES)
    for framing in BODY_FRAMINGS:
        framed = [probe for probe in probes if probe.framing == framing]
        assert {(probe.method, probe.path) for probe in framed if not probe.routed} == {
            (method, path) for method, path in NON_ROUTE_REQUESTS if method in METHODS_WITH_CONTENT}
        assert [(probe.method, probe.path) for probe in framed if probe.routed] == [("POST", "/v1/chat/completions")]
    chunked = inference_request("PUT", "/v1/chat/completions", body=b"{}", framing="chunked")
    assert chunked.endswith(b"\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                            b"2\r\n{}\r\n0\r\n\r\n")
    assert b"Content-Length" not in chunked
    expect = inference_request("PATCH", "/v1/models/fake-model", framing="expect-continue")
    assert b"\r\nContent-Length: 0\r\n" in expect and b"\r\nExpect: 100-continue\r\n" in expect
