"""Inside the intercepted tunnel, every method and HTTP/1.0 are routed or refused like the rest.

The inference tests sent GET, POST and DELETE only, as HTTP/1.1. ``tests/broken_proxies/method_keyed.py`` has an
interceptor that applies #819's routes to those methods only and forwards any other request to the backend with the
route key (``method``), and one that does the same for HTTP/1.0 (``version``): each earned every verdict of
``conformance/test_inference.py`` (14 BLOCKED, 9 WORKS) while a ``TRACE`` or a ``GET /admin HTTP/1.0`` reached the
backend. The route probes now send PUT, PATCH, OPTIONS and TRACE too, and every extra request again as HTTP/1.0
with one routed HTTP/1.0 control, and each extra request with a body again chunked and with ``Expect: 100-continue``
(the ``chunked`` and ``expect`` fakes judge only Content-Length bodies without it), each with a routed control:
each fake must fail exactly the probes it forwards (and the backend record), and the reference pass them all.

The same for the request-target: the route probes send eleven other spellings of every route's path
(``path_spellings``). ``tests/broken_proxies/path_normalising.py`` has an interceptor that normalises the path
before matching and forwards the bytes it was sent (``spelling``: it passed every inference test) and one that
forwards the path it matched (``canonical``: safe). The first must fail every spelling it routes, the second none.
When only the first route was spelt, the same hole for GET requests alone (``spelling-get``) passed every test; so
did a matcher that reads a route's ``*`` as a shell glob (``glob``: ``GET /v1/models/../../admin`` is
``/v1/models/*`` to ``fnmatch``), until the probes sent each wildcard route's escapes (``wildcard_escapes``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
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
    wildcard_escapes,
)
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.probes.inference import inference_request

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
BASELINE_ROUTES = baseline_policy().inference_routes


def _reference_verdicts(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The reference interceptor's inference verdicts, from a run that passed (what each fake is compared with)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    reference, verdicts = _inference_run(pytester, marker_keyed=False)
    assert reference.ret == 0, reference.stdout.str()[-3000:]
    return verdicts


def _changed(verdicts: dict[str, str], reference_verdicts: dict[str, str]) -> set[str]:
    """The tests whose verdict differs from the reference's."""
    return {test for test, verdict in verdicts.items() if verdict != reference_verdicts[test]}


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
    reference_verdicts = _reference_verdicts(pytester, monkeypatch)
    probes = route_probes(BASELINE_ROUTES, BASELINE_ROUTES)
    forwarded = {probe.test_id for probe in probes if not probe.routed and FORWARDED_BY[keyed_on](probe)}
    assert len(forwarded) >= 4 and all(reference_verdicts[test] == "BLOCKED" for test in forwarded)
    assert {reference_verdicts[f"route-{line}POST-/v1/chat/completions"]
            for line in ("http10-", "chunked-", "expect-continue-")} == {"WORKS"}
    keyed, verdicts = _inference_run(pytester, marker_keyed=True, keyed_on=keyed_on, module="method_keyed")
    output = keyed.stdout.str()
    failed = _changed(verdicts, reference_verdicts)
    assert failed == forwarded | {"backend-record"}, (sorted(failed ^ forwarded), output[-4000:])
    assert all(verdicts[test] == "ALLOWED" for test in failed), verdicts
    assert "is no route of the policy, yet it reached the backend" in output, output[-4000:]


def test_every_spelling_of_every_route_reads_as_the_route_to_a_normalising_matcher_and_as_no_route_to_the_strict_one():
    probes = [probe for probe in route_probes(BASELINE_ROUTES) if probe.canonical]
    for route in BASELINE_ROUTES:
        spelt = [probe for probe in probes if probe.canonical == route.example()]
        assert [probe.path for probe in spelt] == list(path_spellings(route.example())), route
        assert len(spelt) == 11 and not any(probe.routed for probe in spelt)
        for probe in spelt:
            assert probe.method == route.method
            assert match_route(BASELINE_ROUTES, route.method, probe.path) is None
            assert normalised(probe.path) == probe.canonical, probe.path
    assert len(probes) == 11 * len(BASELINE_ROUTES)
    assert FRAMING_REFUSED == {probe.test_id for probe in probes if "\\" in probe.path}
    assert len(FRAMING_REFUSED) == len(BASELINE_ROUTES)


def test_every_wildcard_route_is_probed_with_escapes_a_glob_routes_and_no_normaliser_reads_as_a_route():
    probes = {(probe.method, probe.path): probe for probe in route_probes(BASELINE_ROUTES)}
    wildcards = [route for route in BASELINE_ROUTES if "*" in route.path]
    assert [route.path for route in wildcards] == ["/v1/models/*"]
    escapes = wildcard_escapes(wildcards[0])
    assert escapes == ("/v1/models/fake-model/extra", "/v1/models/../../admin", "/v1/models/%2e%2e/%2e%2e/admin",
                       "/v1/models/..%2F..%2Fadmin", "/v1/models/..;/..;/admin")
    for escape in escapes:
        probe = probes[("GET", escape)]
        assert not probe.routed and not probe.canonical, probe
        assert fnmatch.fnmatchcase(escape, "/v1/models/*")
        assert match_route(BASELINE_ROUTES, "GET", normalised(escape)) is None, escape
    assert all(wildcard_escapes(route) == () for route in BASELINE_ROUTES if route not in wildcards)
    # The climb reaches above every fixed segment before the wildcard, wherever it sits.
    middle = dataclasses.replace(wildcards[0], path="/v1/org/*/models")
    assert normalised(wildcard_escapes(middle)[1]) == "/admin/models"


def glob_routed(probe: RouteProbe) -> bool:
    """Whether a matcher reading each route as a shell glob routes ``probe``, which the strict one refuses."""
    return not probe.routed and any(route.method == probe.method and fnmatch.fnmatchcase(probe.path, route.path)
                                    for route in BASELINE_ROUTES)


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_an_interceptor_forwarding_the_spelling_it_normalised_fails_and_one_forwarding_the_route_passes(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_verdicts = _reference_verdicts(pytester, monkeypatch)
    probes = route_probes(BASELINE_ROUTES)
    spellings = {probe.test_id for probe in probes if probe.canonical}
    assert all(reference_verdicts[test] == "BLOCKED" for test in spellings), reference_verdicts
    leaky, verdicts = _inference_run(pytester, marker_keyed=True, keyed_on="spelling", module="path_normalising")
    output = leaky.stdout.str()
    failed = _changed(verdicts, reference_verdicts)
    assert failed == spellings - FRAMING_REFUSED | {"backend-record"}, (sorted(failed), output[-4000:])
    assert all(verdicts[test] == "ALLOWED" for test in failed), verdicts
    assert "which it may read as another path" in output, output[-4000:]
    safe, safe_verdicts = _inference_run(pytester, marker_keyed=True, keyed_on="canonical", module="path_normalising")
    assert safe.ret == 0, safe.stdout.str()[-4000:]
    assert safe_verdicts == reference_verdicts
    # ... and it passed the spellings by forwarding them as the route, not by refusing them.
    reasons = {probe["test"]: probe["reason"] for probe in json.loads((pytester.path / "canonical.json").read_text())
               ["probes"]}
    forwarded = {test for test in spellings if "was forwarded only as the route's own path" in reasons[test]}
    assert forwarded == spellings - FRAMING_REFUSED, reasons
    # Before the spellings of every route, the same hole for GET requests alone passed every inference test.
    get_only, get_verdicts = _inference_run(pytester, marker_keyed=True, keyed_on="spelling-get",
                                            module="path_normalising")
    failed = _changed(get_verdicts, reference_verdicts)
    spelt_get = {probe.test_id for probe in probes if probe.canonical and probe.method == "GET"}
    assert len(spelt_get) == 22 and "route-POST-/v1/chat/completions/" not in spelt_get
    assert failed == spelt_get - FRAMING_REFUSED | {"backend-record"}, (sorted(failed), get_only.stdout.str()[-4000:])
    assert all(get_verdicts[test] == "ALLOWED" for test in failed), get_verdicts


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_an_interceptor_matching_routes_as_shell_globs_fails_every_escape_and_spelling_its_star_swallows(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """It passed every inference test while the probes spelt only the first route and sent no escape."""
    reference_verdicts = _reference_verdicts(pytester, monkeypatch)
    leaky, verdicts = _inference_run(pytester, marker_keyed=True, keyed_on="glob", module="path_normalising")
    output = leaky.stdout.str()
    failed = _changed(verdicts, reference_verdicts)
    swallowed = {probe.test_id for probe in route_probes(BASELINE_ROUTES) if glob_routed(probe)}
    escapes = {f"route-GET-{escape}" for route in BASELINE_ROUTES for escape in wildcard_escapes(route)}
    # the five escapes, and the spellings /v1/models/, /v1/models/fake-model/, ...;x=1 and /v1/models/%66ake-model
    assert escapes < swallowed and len(swallowed) == 9, sorted(swallowed)
    assert failed == swallowed | {"backend-record"}, (sorted(failed), output[-4000:])
    assert all(verdicts[test] == "ALLOWED" for test in failed), verdicts


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
