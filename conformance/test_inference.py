"""Inference conformance: on the intercepted ``inference.local`` connection only inference requests pass.

Through the session's reference proxy, over raw sockets and TLS trusting only the interception CA
(network.md §4): a routed chat completion reaches the fake backend with the route's key and without
the sandbox's; a streamed completion passes through; a non-inference request after a routed one on
the same keep-alive connection gets #819's exact 403, the connection closes, the backend saw only
the routed request and a further request gets nothing; an inner Host other than inference.local is
refused; ``CONNECT inference.local`` on other ports follows the ordinary policy. The route table is
the enforced policy's ``[[inference.routes]]`` (``--sandbox-policy``): each of its routes is
forwarded, and every other request (the baseline's routes the policy dropped included) is refused. The requests
that are no route use every method a client sends (PUT, PATCH, OPTIONS and TRACE too), and are sent again as
HTTP/1.0, and (with a body) chunked and with ``Expect: 100-continue``, each beside a routed control
(``inference/routes.py``), so an interceptor that judges only the methods, version or body framing it expects
fails; other spellings of a route's path (``path_spellings``) must be refused or forwarded as exactly that route's
path, never as spelt.

Every selected test's exchange runs in one campaign on first use (:func:`inference_results`,
:func:`~pytest_sandbox.probes.inference_campaign.run_inference_campaign`): each request carries its
exchange's nonce, and each test is judged on what reached the backend (and the catch-all) because of it
once the grace period after the last exchange has passed, so an interceptor that refuses and forwards the
refused request a moment later fails that test, not the next one. The backend's record is checked last:
nothing but the policy's routes carrying the route key ever reached it, and nothing an exchange caused
arrived after it was judged. Runs only with ``--sandbox``.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable
from typing import Any, cast

import pytest

from pytest_sandbox.fixtures.conformance import enforced_policy
from pytest_sandbox.fixtures.network import VerdictCheck, interception_ca_missing
from pytest_sandbox.http.responses import ParsedResponse, parse_head
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.inference.routes import InferenceRoute, RouteProbe, match_route, route_probes
from pytest_sandbox.network.harness import INFERENCE_ROUTE_KEY, InterceptionTrust, RunningProxy
from pytest_sandbox.network.lab.attribution import NONCE_HEADER, twin_nonce
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes.campaign import audit_upstream
from pytest_sandbox.probes.inference import (
    answer_to,
    closes_without_more_bytes,
    inference_request,
    open_inference_tunnel,
    send_and_read,
)
from pytest_sandbox.probes.inference_campaign import (
    BackendArrival,
    ExchangeEvidence,
    InferenceExchange,
    run_inference_campaign,
)
from pytest_sandbox.report.categories import CategoryNotRun
from pytest_sandbox.session import SandboxSession
from pytest_sandbox.verdicts.inference import is_inference_refusal, judge_backend_record
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

# The lab, proxy and verdict fixtures come from the plugin (rebinding them here would start a second
# session lab for this module).

SANDBOX_KEY = "sk-sandbox-held-placeholder"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
CHAT_BODY = json.dumps(CHAT).encode()
CLIENT_CREDENTIALS = (("Authorization", f"Bearer {SANDBOX_KEY}"), ("X-Api-Key", SANDBOX_KEY))
CATEGORY = "inference"
INNER_HOSTS = ("10.0.0.1", "api.inference.test", "inference.local:8443", "inference.local.", "11.0.0.20")
OTHER_PORTS = (80, 8443)


def request_with_nonce(nonce: str, method: str, path: str, *, body: bytes = b"", credentials: bool = True,
                       **options: Any) -> bytes:
    """An inference request carrying the exchange's nonce (and, by default, the sandbox's own key)."""
    headers = (*(CLIENT_CREDENTIALS if credentials else ()), (NONCE_HEADER, nonce))
    return inference_request(method, path, body=body, headers=headers, **options)


def unmarked_request(nonce: str, method: str, path: str, *, body: bytes = b"", credentials: bool = True,
                     **options: Any) -> bytes:
    """The same request without the harness's nonce field, as any client sends it: the nonce rides only in the
    query (routes match the path alone), spelt as a random request id (:func:`twin_nonce`: a UUID4, no ``sbx-``
    text), where a client's own token would, so what it causes is still its own. An interceptor that applies
    #819 only to requests carrying the marker (or the harness's nonce text) forwards this one."""
    headers = CLIENT_CREDENTIALS if credentials else ()
    return inference_request(method, f"{path}?{twin_nonce(nonce)}", body=body, headers=headers, **options)


def bare_request(nonce: str, method: str, path: str, *, body: bytes = b"", credentials: bool = True,
                 **options: Any) -> bytes:
    """The same request with no token at all (the *bare twin*): no nonce field, no request id in its query. The
    unmarked twin's query still holds a UUID, so an interceptor that applied #819 only to requests holding one
    refused the marked request and the twin and forwarded a client's; this one it forwards. ``nonce`` is not
    sent: what it causes upstream is named by its exchange's window (the campaign runs such an exchange after the
    others, a grace period apart: ``InferenceExchange.alone``)."""
    del nonce
    return inference_request(method, path, body=body, headers=CLIENT_CREDENTIALS if credentials else (), **options)


# The statuses a refusal predicate below accepts: #819's 403 (and an inner Host's), and 400 for a target the
# interceptor will not read.
REFUSAL_STATUSES = frozenset({400, 403})


def refused_and_closed(answer: ParsedResponse | None, closed: bool) -> bool:
    """#819's refusal: the 403 JSON answer, then the connection closed."""
    return answer is not None and is_inference_refusal(answer) and closed


def forbidden_and_closed(answer: ParsedResponse | None, closed: bool) -> bool:
    """A 403 answer, then the connection closed (what an inner-Host refusal must be)."""
    return answer is not None and answer.status == 403 and closed


def unmarked_note(twin: tuple[ParsedResponse | None, bool] | None) -> str:
    """How a refusal's unmarked twin was answered, for ``observed`` (empty when there was none)."""
    if twin is None:
        return ""
    answer, closed = twin
    return f"; the same request without the marker: answer {answer.status if answer else None}, closed {closed}"


# How many refusals the interceptor decides also send a bare twin, drawn at random per session: each runs after the
# others, a grace period apart (its bytes carry no nonce), so each costs the campaign half a second; an interceptor
# that keys on a token forwards every bare twin, and cannot tell in advance which refusals send one.
BARE_TWIN_SAMPLE = 3
MARKER_HOLE = ("refused only when the request carried the harness's marker (its nonce field); the same request "
               "without it was not refused and closed")
TOKEN_HOLE = ("refused only requests carrying a token (the harness's nonce field, or a request id in the query); "
              "the same request with none, as a client sends it, was not refused and closed")


def bare_note(bare: tuple[ParsedResponse | None, bool] | None) -> str:
    """How a refusal's bare twin was answered, for ``observed`` (empty when there was none)."""
    if bare is None:
        return ""
    answer, closed = bare
    return f"; the same request with no token at all: answer {answer.status if answer else None}, closed {closed}"


def hole_of(marked_ok: bool, twin_ok: bool, bare_ok: bool) -> str:
    """Which of the two holes a refusal that held only for some of its sends shows ("" if none)."""
    if not marked_ok:
        return ""
    return MARKER_HOLE if not twin_ok else TOKEN_HOLE if not bare_ok else ""


def every_send_refused(refused: Callable[[ParsedResponse | None, bool], bool], marked: Refusal,
                       twin: Refusal | None, bare: Refusal | None) -> tuple[bool, str]:
    """Whether ``refused`` holds for the marked send and for the twins that were sent, and which hole it shows
    if it held only for some (:func:`hole_of`)."""
    marked_ok = refused(*marked)
    twin_ok = twin is None or refused(*twin)
    bare_ok = bare is None or refused(*bare)
    return marked_ok and twin_ok and bare_ok, hole_of(marked_ok, twin_ok, bare_ok)


def chat_request(nonce: str, *, stream: bool = False) -> bytes:
    body = json.dumps({**CHAT, "stream": True}).encode() if stream else CHAT_BODY
    return request_with_nonce(nonce, "POST", "/v1/chat/completions", body=body)


def judged(ok: bool, passing: Verdict, failing: Verdict, reason: str, expected: str, observed: str) -> Judgement:
    return Judgement(passing if ok else failing, reason, expected, observed)


def tunnel(proxy: RunningProxy, trust: InterceptionTrust) -> socket.socket:
    return open_inference_tunnel(proxy.connect(), trust.cert_pem)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "route_probe" in metafunc.fixturenames:
        probes = route_probes(enforced_policy(metafunc.config).inference_routes, baseline_policy().inference_routes)
        metafunc.parametrize("route_probe", probes, ids=[probe.test_id for probe in probes])


def chat_routed(policy: Policy) -> bool:
    return match_route(policy.inference_routes, "POST", "/v1/chat/completions") is not None


@pytest.fixture
def chat_is_routed(sandbox_session: SandboxSession) -> None:
    """These tests send chat completions, the request the fake backend serves: under a policy that does
    not route them, a refusal could not be told from a blanket one, so they cannot run."""
    policy = sandbox_session.policy
    if not chat_routed(policy):
        raise CategoryNotRun(f"policy {policy.name} does not route POST /v1/chat/completions, the request the "
                             "inference category's controls and refusals are built on, so no refusal could be told "
                             "from a blanket one; route it, or deselect the category (-m 'not sandbox_inference')")


def admin_routed(policy: Policy) -> bool:
    return match_route(policy.inference_routes, "GET", "/admin") is not None


# --- the exchanges: what each test sends (through ``proxy``, trusting ``trust``), by test id --------------

Perform = Callable[[str], Any]


def routed_chat(proxy: RunningProxy, trust: InterceptionTrust) -> Perform:
    def perform(nonce: str) -> list[ParsedResponse]:
        with tunnel(proxy, trust) as tls:
            return send_and_read(tls, chat_request(nonce))[0]
    return perform


def streamed_chat(proxy: RunningProxy, trust: InterceptionTrust) -> Perform:
    def perform(nonce: str) -> list[ParsedResponse]:
        with tunnel(proxy, trust) as tls:
            return send_and_read(tls, chat_request(nonce, stream=True))[0]
    return perform


RoutedThenAdmin = tuple[list[ParsedResponse], list[ParsedResponse], bool, ParsedResponse | None]
Request = Callable[..., bytes]
Refusal = tuple[ParsedResponse | None, bool]  # a request's answer on a tunnel of its own, and whether it then closed


def routed_then_admin_on_a_tunnel(proxy: RunningProxy, trust: InterceptionTrust, nonce: str,
                                  request: Request) -> RoutedThenAdmin:
    """A chat completion, then ``GET /admin`` and a ``GET /v1/models`` follow-up on one tunnel, built by
    ``request`` (:func:`request_with_nonce`, or :func:`unmarked_request` for the twin)."""
    with tunnel(proxy, trust) as tls:
        routed, _ = send_and_read(tls, request(nonce, "POST", "/v1/chat/completions", body=CHAT_BODY))
        refused, closed = send_and_read(tls, request(nonce, "GET", "/admin", credentials=False))
        closed = closes_if_it_may_be_a_refusal(tls, refused, closed)
        follow_up = answer_to(tls, request(nonce, "GET", "/v1/models", credentials=False))
    return routed, refused, closed, follow_up


def routed_then_admin(proxy: RunningProxy, trust: InterceptionTrust, bare: bool) -> Perform:
    def perform(nonce: str) -> tuple[RoutedThenAdmin, ...]:
        requests = (request_with_nonce, unmarked_request, *((bare_request,) if bare else ()))
        return tuple(routed_then_admin_on_a_tunnel(proxy, trust, nonce, request) for request in requests)
    return perform


def refused_after_routed(seen: RoutedThenAdmin) -> bool:
    """The chat completion answered 200, then #819's refusal, the close, and no answer to the follow-up."""
    routed, refused, closed, follow_up = seen
    return (len(routed) == 1 and routed[0].status == 200 and bool(refused) and is_inference_refusal(refused[0])
            and closed and follow_up is None)


def describe_routed_then_admin(seen: RoutedThenAdmin) -> str:
    routed, refused, closed, follow_up = seen
    refusal = refused[0] if refused else None
    return (f"routed {[r.status for r in routed]}, then {refusal.status if refusal else None} "
            f"{refusal.body if refusal else b''!r}, closed {closed}, follow-up "
            f"{follow_up.status if follow_up else 'no answer'}")


def refusal_on_a_tunnel(proxy: RunningProxy, trust: InterceptionTrust, request: bytes) -> Refusal:
    """``request`` alone on a new tunnel: its first answer and whether the connection then closed."""
    with tunnel(proxy, trust) as tls:
        responses, closed = send_and_read(tls, request)
        closed = closes_if_it_may_be_a_refusal(tls, responses, closed)
    return (responses[0] if responses else None), closed


def closes_if_it_may_be_a_refusal(tls: socket.socket, responses: list[ParsedResponse], closed: bool) -> bool:
    """Whether the tunnel closed after ``responses``, waited for (up to the close deadline) only when the first
    answer may be a refusal: none yet, or one of :data:`REFUSAL_STATUSES`. Any other answer (a forward's 200, the
    backend's 404) fails every refusal predicate here however the connection ends, and waiting out the deadline
    on it only made a leaky target's run slow (about 3 s per forwarded send)."""
    if closed or (responses and responses[0].status not in REFUSAL_STATUSES):
        return closed
    return closes_without_more_bytes(tls)


def other_inner_host(proxy: RunningProxy, trust: InterceptionTrust, inner_host: str, bare: bool) -> Perform:
    def perform(nonce: str) -> tuple[ParsedResponse | None, bool, Refusal, Refusal | None]:
        def refusal(build: Request) -> Refusal:
            return refusal_on_a_tunnel(proxy, trust, build(nonce, "POST", "/v1/chat/completions", body=CHAT_BODY,
                                                           credentials=False, host=inner_host))
        answer, closed = refusal(request_with_nonce)
        return answer, closed, refusal(unmarked_request), refusal(bare_request) if bare else None
    return perform


def connect_other_port(proxy: RunningProxy, port: int) -> Perform:
    def perform(nonce: str) -> tuple[ParsedResponse, list[str]]:
        decisions_before = len(proxy.decisions)
        with proxy.connect() as sock:
            sock.sendall(f"CONNECT inference.local:{port} HTTP/1.1\r\nHost: inference.local:{port}\r\n"
                         f"{NONCE_HEADER}: {nonce}\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return parse_head(data), [decision.reason for decision in proxy.decisions[decisions_before:]]
    return perform


def route_probe_exchange(proxy: RunningProxy, trust: InterceptionTrust, probe: RouteProbe, bare: bool) -> Perform:
    def perform(nonce: str) -> tuple[list[ParsedResponse], bool, Refusal | None, Refusal | None]:
        with tunnel(proxy, trust) as tls:
            responses, closed = send_and_read(tls, probe_request(nonce, probe))
            if not probe.routed:
                # A refusal must close (#819); a forward is judged on what reached the backend.
                closed = closes_if_it_may_be_a_refusal(tls, responses, closed)
        if probe.routed:
            return responses, closed, None, None

        def refusal(build: Request) -> Refusal:
            return refusal_on_a_tunnel(proxy, trust, probe_request(nonce, probe, build))
        return responses, closed, refusal(unmarked_request), refusal(bare_request) if bare else None
    return perform


def planned_exchange(name: str, params: dict[str, Any], proxy: RunningProxy, trust: InterceptionTrust | None,
                     policy: Policy, bare: bool = False) -> InferenceExchange | None:
    """The exchange of test function ``name`` with ``params``; None for a test that does not run under ``policy``
    (it says why itself), sends nothing through the tunnel, or needs the interception CA ``trust`` (None: not
    given). ``bare``: a refusal the interceptor decides also sends its bare twin (and runs alone)."""
    if name == OTHER_PORT_TEST:
        port = params["port"]
        return InferenceExchange(f"connect-other-port-{port}", connect_other_port(proxy, port))
    if trust is None:
        return None
    chat = chat_routed(policy)
    if name == "test_routed_chat_completion_reaches_backend_with_route_key_and_without_client_key" and chat:
        return InferenceExchange("routed-chat-completion", routed_chat(proxy, trust))
    if name == "test_streamed_completion_passes_through_as_server_sent_events" and chat:
        return InferenceExchange("streamed-completion", streamed_chat(proxy, trust))
    if name == "test_non_inference_request_after_a_routed_one_is_refused_closed_and_never_forwarded" \
            and chat and not admin_routed(policy):
        return InferenceExchange("routed-then-non-inference", routed_then_admin(proxy, trust, bare), twinned=True,
                                 alone=bare)
    if name == "test_inner_host_other_than_inference_local_is_refused" and chat:
        host = params["inner_host"]
        return InferenceExchange(f"inner-host-{host}", other_inner_host(proxy, trust, host, bare), twinned=True,
                                 alone=bare)
    if name == "test_route_table_is_the_enforced_policys":
        probe = params["route_probe"]
        twinned = not probe.routed
        return InferenceExchange(probe.test_id, route_probe_exchange(proxy, trust, probe, bare and twinned),
                                 twinned=twinned, alone=bare and twinned)
    return None


OTHER_PORT_TEST = "test_connect_to_inference_local_on_another_port_follows_the_ordinary_policy"


@pytest.fixture(scope="module")
def inference_results(request: pytest.FixtureRequest, sandbox_session: SandboxSession, sandbox_lab: NetworkLab,
                      sandbox_proxy: RunningProxy, inference_backend: FakeInferenceBackend
                      ) -> dict[str, ExchangeEvidence]:
    """Every selected test's exchange in this module, run as one campaign: test id -> evidence. Without the
    interception CA of a third party (``--sandbox-proxy-ca``) only the CONNECTs to other ports run (the tunnel
    tests are not run, and say why)."""
    trust = None if interception_ca_missing(sandbox_session) else request.getfixturevalue("interception_ca")
    planned = []
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            params = getattr(getattr(item, "callspec", None), "params", {})
            name = getattr(item, "originalname", item.name)
            exchange = planned_exchange(name, params, sandbox_proxy, trust, sandbox_session.policy)
            if exchange is not None:
                planned.append((name, params, exchange))
    twinned = [exchange.test_id for _name, _params, exchange in planned if exchange.twinned]
    bare = set(random.SystemRandom().sample(twinned, min(BARE_TWIN_SAMPLE, len(twinned))))
    exchanges = [cast(InferenceExchange, planned_exchange(name, params, sandbox_proxy, trust, sandbox_session.policy,
                                                          bare=True)) if exchange.test_id in bare else exchange
                 for name, params, exchange in planned]
    return run_inference_campaign(sandbox_lab, inference_backend, exchanges)


@pytest.fixture
def evidence(request: pytest.FixtureRequest, sandbox_session: SandboxSession, sandbox_lab: NetworkLab,
                      sandbox_proxy: RunningProxy, inference_backend: FakeInferenceBackend,
                      inference_results: dict[str, ExchangeEvidence]) -> ExchangeEvidence:
    """This test's evidence from the module's campaign, or (selected after it ran) from a campaign of its own."""
    trust = None if interception_ca_missing(sandbox_session) else request.getfixturevalue("interception_ca")
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    exchange = planned_exchange(request.node.originalname, params, sandbox_proxy, trust, sandbox_session.policy)
    assert exchange is not None, f"{request.node.name} runs, so its exchange was planned"
    found = inference_results.get(exchange.test_id)
    if found is None:
        found = run_inference_campaign(sandbox_lab, inference_backend, [exchange])[exchange.test_id]
    if found.error is not None:
        raise found.error
    return found


@pytest.fixture
def admin_is_not_routed(sandbox_session: SandboxSession) -> None:
    if admin_routed(sandbox_session.policy):
        raise CategoryNotRun(f"policy {sandbox_session.policy.name} routes GET /admin, this test's non-inference "
                             "request (the route table test judges it instead)")


def test_routed_chat_completion_reaches_backend_with_route_key_and_without_client_key(
        interception_ca: InterceptionTrust, network_verdict: VerdictCheck, chat_is_routed: None,
        evidence: ExchangeEvidence) -> None:
    responses: list[ParsedResponse] = evidence.observation
    arrived = evidence.arrived
    answer = responses[0] if responses else None
    content = json.loads(answer.body)["choices"][0]["message"]["content"] if answer and answer.status == 200 else None
    headers = arrived[0].headers if len(arrived) == 1 else ()
    leaked = [name for name, value in headers if SANDBOX_KEY in value]
    ok = (answer is not None and answer.status == 200 and content is not None and len(arrived) == 1
          and not evidence.unframed and arrived[0].header_values("authorization") == [f"Bearer {INFERENCE_ROUTE_KEY}"]
          and not leaked and INFERENCE_ROUTE_KEY.encode() not in answer.body)
    observed = (f"answer {answer.status if answer else None} content {content!r}; backend saw {len(arrived)} "
                f"request(s), authorization {arrived[0].header_values('authorization') if arrived else None}, "
                f"sandbox key in {leaked or 'no header'}" + (f"; reached {evidence.reached}" if len(arrived) > 1
                                                             or evidence.unframed else ""))
    network_verdict(CATEGORY, "routed-chat-completion", judged(
        ok, Verdict.WORKS, Verdict.BROKEN, "a chat completion is routed with the route's key" if ok else
        "the routed request did not arrive as it should", "200 from the backend; backend saw one request "
        "with the route key and no sandbox credential", observed), "POST /v1/chat/completions via inference.local")


def test_streamed_completion_passes_through_as_server_sent_events(
        inference_backend: FakeInferenceBackend, interception_ca: InterceptionTrust, network_verdict: VerdictCheck,
        chat_is_routed: None, evidence: ExchangeEvidence) -> None:
    responses: list[ParsedResponse] = evidence.observation
    answer = responses[0] if responses else None
    events = [line[len(b"data: "):] for line in (answer.body.split(b"\n") if answer else [])
              if line.startswith(b"data: ")]
    pieces = [json.loads(event)["choices"][0]["delta"]["content"] for event in events[:-1]]
    ok = (answer is not None and answer.status == 200 and answer.header("content-type") == "text/event-stream"
          and answer.header("transfer-encoding") == "chunked" and events[-1:] == [b"[DONE]"]
          and tuple(pieces) == inference_backend.stream_pieces)
    observed = f"status {answer.status if answer else None}, {len(events)} events, pieces {pieces}"
    network_verdict(CATEGORY, "streamed-completion", judged(
        ok, Verdict.WORKS, Verdict.BROKEN, "SSE events relayed chunked, in order, to [DONE]" if ok else
        "the stream was not relayed intact", "200 text/event-stream, chunked, every piece then [DONE]",
        observed), "POST /v1/chat/completions stream=true via inference.local")


def test_non_inference_request_after_a_routed_one_is_refused_closed_and_never_forwarded(
        interception_ca: InterceptionTrust, network_verdict: VerdictCheck, chat_is_routed: None,
        admin_is_not_routed: None, evidence: ExchangeEvidence) -> None:
    """OpenShell #819: after a routed request the loop kept reading; now 403 and close, always. Sent twice: with
    the harness's nonce field, as its unmarked twin on a tunnel of its own (the nonce only in the query), and as
    (when drawn for it) as its bare twin, no token at all, on a third."""
    sends = evidence.observation
    arrived = evidence.arrived
    # The backend must see exactly one chat completion per send (the twin's query aside).
    only_chats = sorted(r.path.split("?", 1)[0] for r in arrived) == ["/v1/chat/completions"] * len(sends)
    marked_ok, twin_ok = refused_after_routed(sends[0]), refused_after_routed(sends[1])
    bare_ok = len(sends) < 3 or refused_after_routed(sends[2])
    ok = marked_ok and twin_ok and bare_ok and only_chats and not evidence.unframed
    observed = (f"{describe_routed_then_admin(sends[0])}; the same requests without the marker: "
                f"{describe_routed_then_admin(sends[1])}" + "".join(
                    f"; with no token at all: {describe_routed_then_admin(seen)}" for seen in sends[2:])
                + f"; backend saw {evidence.reached or 'nothing'}")
    leaked = any(seen[3] is not None for seen in sends) or len(arrived) > len(sends) or bool(evidence.unframed)
    hole = hole_of(marked_ok, twin_ok, bare_ok)
    reason = ("refused with #819's 403 JSON and closed, marked or not; only the routed requests reached the backend"
              if ok else f"the non-inference request was {hole}" if hole else
              "the non-inference request was not refused and closed as #819 requires")
    network_verdict(CATEGORY, "routed-then-non-inference", judged(
        ok, Verdict.BLOCKED, Verdict.ALLOWED if leaked else Verdict.INDETERMINATE, reason,
        '200, then 403 application/json {"error":"connection not allowed by policy"}, EOF, follow-up gets '
        "nothing, marked, unmarked (and with no token); backend saw only the chat completions", observed),
        "POST /v1/chat/completions then GET /admin on one keep-alive TLS connection")


@pytest.mark.parametrize("inner_host", INNER_HOSTS)
def test_inner_host_other_than_inference_local_is_refused(
        inner_host: str, interception_ca: InterceptionTrust, network_verdict: VerdictCheck, chat_is_routed: None,
        evidence: ExchangeEvidence) -> None:
    answer, closed, twin, bare = evidence.observation
    reached = len(evidence.arrived) + len(evidence.unframed)
    hits = len(evidence.hits)
    refused, hole = every_send_refused(forbidden_and_closed, (answer, closed), twin, bare)
    ok = refused and reached == 0 and hits == 0
    observed = (f"status {answer.status if answer else None}, closed {closed}, backend saw {reached}, canary hits "
                f"{hits}" + (f" ({evidence.reached})" if reached or hits else "") + unmarked_note(twin)
                + bare_note(bare))
    reason = ("an inner Host other than the CONNECT authority is refused" if ok else
              f"inner Host mismatch {hole}" if hole else "inner Host mismatch not refused")
    network_verdict(CATEGORY, f"inner-host-{inner_host}", judged(
        ok, Verdict.BLOCKED, Verdict.ALLOWED if reached or hits else Verdict.INDETERMINATE, reason,
        "403, closed, nothing reached; the same without the marker and with no token too", observed),
        f"CONNECT inference.local:443 then Host: {inner_host}")


@pytest.mark.parametrize("port", OTHER_PORTS)
def test_connect_to_inference_local_on_another_port_follows_the_ordinary_policy(
        port: int, network_verdict: VerdictCheck, evidence: ExchangeEvidence) -> None:
    """Only 443 is intercepted (OpenShell since #869); inference.local does not resolve in the lab."""
    reply, reasons = evidence.observation
    reached = bool(evidence.arrived or evidence.unframed or evidence.hits)
    ok = reply.status is not None and reply.status >= 400 and "intercepted" not in reasons and not reached
    observed = f"status {reply.status} {reply.proxy_reason}, proxy decisions {reasons}" + (
        f"; reached {evidence.reached}" if reached else "")
    network_verdict(CATEGORY, f"connect-other-port-{port}", judged(
        ok, Verdict.BLOCKED, Verdict.ALLOWED if "intercepted" in reasons or reached else Verdict.INDETERMINATE,
        "judged by the ordinary policy, not intercepted" if ok else "another port was intercepted or let through",
        "not intercepted: a policy refusal (8443) or a resolution failure (80), nothing reached", observed),
        f"CONNECT inference.local:{port}")


def probe_request(nonce: str, probe: RouteProbe, build: Request = request_with_nonce) -> bytes:
    """The request a route probe sends, built by ``build`` (marked; :func:`unmarked_request` or
    :func:`bare_request` for its twins) in its HTTP version and body framing: a POST carries a chat body, all
    carry the sandbox's key."""
    return build(nonce, probe.method, probe.path, body=CHAT_BODY if probe.method == "POST" else b"",
                 http_version=probe.http_version, framing=probe.framing)


def judge_route_probe(probe: RouteProbe, answer: ParsedResponse | None, closed: bool,
                      arrived: list[tuple[str, str, list[str]]], unframed: tuple[str, ...] = (),
                      twin: tuple[ParsedResponse | None, bool] | None = None,
                      bare: tuple[ParsedResponse | None, bool] | None = None) -> Judgement:
    """Judge one route probe from the answer, the close and what reached the backend because of it
    (method, path, authorization values; and bytes that frame into no request), and for a refusal its
    unmarked twin's answer and close (the same request without the nonce field) and its bare twin's (no token at
    all). Pure."""
    request = probe.request_line
    refusal = " (#819 refusal)" if answer is not None and is_inference_refusal(answer) else ""
    observed = (f"answer {answer.status if answer else None}{refusal}, closed {closed}; "
                f"backend saw {[f'{m} {p}' for m, p, _ in arrived]}" + (f", unframed {list(unframed)}"
                                                                       if unframed else "") + unmarked_note(twin)
                + bare_note(bare))
    reached = [(m, p, key) for m, p, key in arrived if (m, p) == (probe.method, probe.path)]
    if probe.routed:
        expected = f"forwarded: the backend saw {request} once, with the route key; the answer is the backend's"
        ok = (len(arrived) == 1 and len(reached) == 1 and reached[0][2] == [f"Bearer {INFERENCE_ROUTE_KEY}"]
              and not unframed and answer is not None and not is_inference_refusal(answer))
        return judged(ok, Verdict.WORKS, Verdict.BROKEN, f"{request} is a route of the policy and was forwarded"
                      if ok else f"{request} is a route of the policy but was not forwarded as routed",
                      expected, observed)
    if probe.canonical:
        return judge_spelling(probe, answer, closed, arrived, unframed, twin, bare, observed)
    expected = ("refused with #819's 403 and closed, with and without the marker and with no token; nothing reached "
                "the backend")
    ok, hole = every_send_refused(refused_and_closed, (answer, closed), twin, bare)
    if arrived or unframed:
        return Judgement(Verdict.ALLOWED, f"{request} is no route of the policy, yet it reached the backend"
                         + (f"; {hole}" if hole else ""), expected, observed)
    reason = (f"{request} is no route of the policy and was refused" if ok else
              f"{request} was {hole}" if hole else f"{request} was not refused as #819 requires")
    return judged(ok, Verdict.BLOCKED, Verdict.INDETERMINATE, reason, expected, observed)


def refused_as_unreadable_or_denied(answer: ParsedResponse | None, closed: bool) -> bool:
    """A spelling's refusal: #819's 403, or a 400 for a request-target the interceptor will not read; then the
    close."""
    return answer is not None and (is_inference_refusal(answer) or answer.status == 400) and closed


def judge_spelling(probe: RouteProbe, answer: ParsedResponse | None, closed: bool,
                   arrived: list[tuple[str, str, list[str]]], unframed: tuple[str, ...],
                   twin: tuple[ParsedResponse | None, bool] | None, bare: tuple[ParsedResponse | None, bool] | None,
                   observed: str) -> Judgement:
    """Judge another spelling of a route's path (``probe.canonical``): refused, or forwarded as exactly the route's
    path (a matcher that normalises and forwards what it matched is safe); the spelling itself reaching the
    backend is ALLOWED, whatever the answer was, since the backend may read it as another path. Pure."""
    request = probe.request_line
    expected = (f"refused (400 or #819's 403) and closed, with and without the marker and with no token, or "
                f"forwarded only as {probe.method} {probe.canonical}; the spelling never reaches the backend")
    ok, hole = every_send_refused(refused_as_unreadable_or_denied, (answer, closed), twin, bare)
    spelled = [f"{method} {path}" for method, path, _ in arrived
               if (method, path.split("?", 1)[0]) != (probe.method, probe.canonical)]
    if spelled or unframed:
        return Judgement(Verdict.ALLOWED, f"{request} is another spelling of the route {probe.canonical}, and the "
                         f"backend received {spelled or list(unframed)}, which it may read as another path"
                         + (f"; {hole}" if hole else ""), expected, observed)
    if arrived:
        return Judgement(Verdict.BLOCKED, f"{request} was forwarded only as the route's own path {probe.canonical}",
                         expected, observed)
    reason = (f"{request}, another spelling of the route {probe.canonical}, was refused" if ok else
              f"{request} was {hole}" if hole else f"{request} was neither refused nor forwarded as {probe.canonical}")
    return judged(ok, Verdict.BLOCKED, Verdict.INDETERMINATE, reason, expected, observed)


def arrivals_of(arrived: tuple[BackendArrival, ...]) -> list[tuple[str, str, list[str]]]:
    return [(a.method, a.path, a.header_values("authorization")) for a in arrived]


def test_route_table_is_the_enforced_policys(
        route_probe: RouteProbe, interception_ca: InterceptionTrust, network_verdict: VerdictCheck,
        evidence: ExchangeEvidence) -> None:
    """Each route of ``--sandbox-policy`` is forwarded; anything else is refused, including a baseline
    route the policy dropped (a proxy that kept the built-in table forwards it: ALLOWED)."""
    responses, closed, twin, bare = evidence.observation
    judgement = judge_route_probe(route_probe, responses[0] if responses else None, closed,
                                  arrivals_of(evidence.arrived), evidence.unframed, twin, bare)
    network_verdict(CATEGORY, route_probe.test_id, judgement,
                    f"{route_probe.request_line} via inference.local "
                    f"({'a route' if route_probe.routed else 'not a route'} of the policy)")


def test_backend_record_holds_only_inference_routes_with_the_route_key(
        sandbox_lab: NetworkLab, inference_backend: FakeInferenceBackend, sandbox_proxy: RunningProxy,
        interception_ca: InterceptionTrust, network_verdict: VerdictCheck, sandbox_session: SandboxSession) -> None:
    """Runs after the rest of this module (and whatever else this worker sent through the proxy).

    One routed request first, so the log is never empty (under xdist this may be the worker's first
    inference test); then the whole log is judged against the policy's routes, and no byte an exchange
    caused may have arrived after that exchange was judged.
    """
    routes: tuple[InferenceRoute, ...] = sandbox_session.policy.inference_routes
    if not routes:
        raise CategoryNotRun(f"policy {sandbox_session.policy.name} lists no inference routes: nothing can be routed, "
                             "so no refusal can be told from a blanket one")
    with tunnel(sandbox_proxy, interception_ca) as tls:
        send_and_read(tls, inference_request(routes[0].method, routes[0].example(), headers=CLIENT_CREDENTIALS,
                                             body=CHAT_BODY if routes[0].method == "POST" else b""))
    streams = inference_backend.received_streams()
    judgement = judge_backend_record(inference_backend.requests, INFERENCE_ROUTE_KEY, forbidden_values=[SANDBOX_KEY],
                                     routes=routes, streams=streams)
    # Bytes an exchange caused (its nonce, its connection) that reached the backend after its verdict: a forward
    # later than the campaign's grace period, which a route and the route key would otherwise let pass here.
    late = audit_upstream(sandbox_lab.upstream_ledger, streams)
    if late is not None:
        reason = late if judgement.passed else f"{judgement.reason}; {late}"
        judgement = Judgement(Verdict.ALLOWED, reason, judgement.expected, judgement.observed)
    network_verdict(CATEGORY, "backend-record", judgement, "the fake backend's whole request log")
