"""SSRF conformance: every special-use destination is attempted through the proxy and must be refused.

One test per catalogue case x {CONNECT, absolute-form}, ids like ``connect-v4-cgnat-first-100.64.0.0``.
A denial counts only if the proxy refused it **and** no lab canary saw a connection (network.md §7);
the ``ctl-`` cases are positive controls that must reach their canary. The remaining tests attack
what a per-request table check misses: keep-alive reuse, Host vs request-target, mixed DNS answers
and DNS rebinding (network.md §3); the proxy's own address is in ``test_ssrf_self.py``. Runs only
with ``--sandbox``.
"""

from __future__ import annotations

import secrets
import time

import pytest

from pytest_sandbox.catalogues.ssrf_cases import SsrfCase
from pytest_sandbox.ssrf_suite import (
    ATTEMPT_TIMEOUT_SECONDS,
    Attempt,
    ProxyReply,
    SsrfJudgement,
    build_attempts,
    judge_attempt,
    new_hits,
    read_one_response,
    run_attempt,
    send_attempt,
)
from pytest_sandbox.verdicts import Verdict

# Fixtures, until plugin.py imports pytest_sandbox.network_fixtures itself.

ATTEMPTS = build_attempts()
PUBLIC_ORIGIN = "11.0.0.10"


def _category(attempt: Attempt) -> str:
    return "ssrf-controls" if attempt.case.expected == "allowed" else "ssrf"


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[a.test_id for a in ATTEMPTS])
def test_special_use_destination_is_refused_and_public_one_is_reached(
        attempt, sandbox_lab, sandbox_proxy, network_verdict):
    judgement = run_attempt(attempt, sandbox_proxy.connect, sandbox_lab.all_hits)
    network_verdict(_category(attempt), attempt.test_id, judgement, attempt.describe())


def _case(case_id: str, host: str, canary: str | None, note: str, *, expected: str = "denied",
          port: int = 80, kind: str = "name") -> SsrfCase:
    return SsrfCase(case_id, host, port, kind, expected, canary, note)


# --- keep-alive: every request on a connection is judged, not only the first -------------------

FOLLOW_UPS = (
    _case("private-10", "10.0.0.1", "10.0.0.1", "private 10/8 after an allowed request", kind="literal"),
    _case("metadata", "169.254.169.254", "169.254.169.254", "metadata after an allowed request",
          kind="literal"),
    _case("mapped-metadata", "[::ffff:169.254.169.254]", "169.254.169.254",
          "IPv4-mapped metadata after an allowed request", kind="ipv6_form"),
    _case("localhost-name", "localhost", "127.0.0.1", "a name resolving to loopback after an allowed request"),
)


@pytest.mark.parametrize("follow_up", FOLLOW_UPS, ids=[f"keepalive-{c.case_id}" for c in FOLLOW_UPS])
def test_second_request_on_keep_alive_connection_after_allowed_one_is_denied(
        follow_up, sandbox_lab, sandbox_proxy, network_verdict):
    test_id = f"keepalive-{follow_up.case_id}"
    attempt = Attempt(follow_up, "absolute")
    before = sandbox_lab.all_hits()
    origin_requests = len(sandbox_lab.origin_requests(PUBLIC_ORIGIN))
    deadline = time.monotonic() + ATTEMPT_TIMEOUT_SECONDS
    with sandbox_proxy.connect() as sock:
        sock.sendall(f"GET http://{PUBLIC_ORIGIN}/ HTTP/1.1\r\nHost: {PUBLIC_ORIGIN}\r\n\r\n".encode())
        first, first_closed = read_one_response(sock, deadline)
        if first.status != 200 or first_closed:
            network_verdict("ssrf-controls", test_id, SsrfJudgement(
                Verdict.BROKEN, "the allowed first request did not leave a usable keep-alive connection",
                "200 and the connection kept open", f"{first.status}, closed={first_closed}"),
                f"GET http://{PUBLIC_ORIGIN}/ on a keep-alive connection")
        sock.sendall(f"GET {follow_up.absolute_url} HTTP/1.1\r\nHost: {follow_up.authority}\r\n\r\n".encode())
        second, closed = read_one_response(sock, deadline)
        if not closed:
            _rest, closed = read_one_response(sock, deadline)
    assert len(sandbox_lab.origin_requests(PUBLIC_ORIGIN)) == origin_requests + 1, \
        "the allowed first request must have reached the public origin exactly once"
    reply = ProxyReply(second, None, closed=closed, timed_out=second.status is None and not closed)
    judgement = judge_attempt(attempt, reply, new_hits(before, sandbox_lab.all_hits()))
    network_verdict("ssrf", test_id, judgement,
                    f"GET http://{PUBLIC_ORIGIN}/ then {follow_up.absolute_url} on one connection")


# --- Host header vs request target: the target decides (RFC 9112 §3.2.2) ----------------------


def test_absolute_request_with_private_host_header_is_judged_by_its_public_target(
        sandbox_lab, sandbox_proxy, network_verdict):
    before = sandbox_lab.all_hits()
    already = len(sandbox_lab.origin_requests(PUBLIC_ORIGIN))
    with sandbox_proxy.connect() as sock:
        sock.sendall(f"GET http://{PUBLIC_ORIGIN}/host-mismatch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     "Connection: close\r\n\r\n".encode())
        reply, _closed = read_one_response(sock, time.monotonic() + ATTEMPT_TIMEOUT_SECONDS)
    hits = new_hits(before, sandbox_lab.all_hits())
    reached = sandbox_lab.origin_requests(PUBLIC_ORIGIN)[already:]
    expected = "routed to the target 11.0.0.10 with Host rewritten (or 400 on mismatch); no canary hit"
    observed = f"{reply.status}, origin requests {[(r.target, r.header('host')) for r in reached]}, hits {hits}"
    if hits:
        judgement = SsrfJudgement(Verdict.ALLOWED, "the Host header steered the proxy to a canary", expected,
                                  observed)
    elif reply.status == 400 and not reached:
        judgement = SsrfJudgement(Verdict.WORKS, "strict proxy: 400 on Host/target mismatch", expected, observed)
    elif reply.status == 200 and len(reached) == 1 and reached[0].header("host") == PUBLIC_ORIGIN:
        judgement = SsrfJudgement(Verdict.WORKS, "routed by the target; Host replaced", expected, observed)
    else:
        judgement = SsrfJudgement(Verdict.BROKEN, "not routed by the request target", expected, observed)
    network_verdict("ssrf-controls", "host-mismatch-public-target", judgement,
                    f"GET http://{PUBLIC_ORIGIN}/ with Host: 127.0.0.1")


HOST_MISMATCH_DENIALS = (
    Attempt(_case("host-mismatch-private-target", "127.0.0.1", "127.0.0.1",
                  "private target with a public Host header", kind="literal"), "absolute"),
    Attempt(_case("host-mismatch-private-connect", "169.254.169.254", "169.254.169.254",
                  "CONNECT to metadata with a public Host header", kind="literal"), "connect"),
)


@pytest.mark.parametrize("attempt", HOST_MISMATCH_DENIALS, ids=[a.case.case_id for a in HOST_MISMATCH_DENIALS])
def test_private_target_with_public_host_header_is_denied(attempt, sandbox_lab, sandbox_proxy, network_verdict):
    method = "CONNECT" if attempt.form == "connect" else "GET"
    raw = f"{method} {attempt.target} HTTP/1.1\r\nHost: {PUBLIC_ORIGIN}\r\nConnection: close\r\n\r\n".encode()
    before = sandbox_lab.all_hits()
    with sandbox_proxy.connect() as sock:
        sock.sendall(raw)
        reply, closed = read_one_response(sock, time.monotonic() + ATTEMPT_TIMEOUT_SECONDS)
        if not closed and reply.status is not None:
            _rest, closed = read_one_response(sock, time.monotonic() + ATTEMPT_TIMEOUT_SECONDS)
    judgement = judge_attempt(attempt, ProxyReply(reply, None, closed=closed, timed_out=reply.status is None),
                              new_hits(before, sandbox_lab.all_hits()))
    network_verdict("ssrf", attempt.case.case_id, judgement, f"{method} {attempt.target} with Host: {PUBLIC_ORIGIN}")


# --- DNS: any special answer denies; every resolution is judged again ------------------------

MIXED_ANSWERS = (
    _case("mixed-public-first", "mixed-public-first.lab.test", "10.0.0.1", "11.0.0.10 then 10.0.0.1"),
    _case("mixed-private-first", "mixed-private-first.lab.test", "10.0.0.1", "10.0.0.1 then 11.0.0.10"),
    _case("mixed-v6-public-first", "mixed-v6-public-first.lab.test", "fd00:ec2::254",
          "2600:9000::10 then fd00:ec2::254"),
    _case("mixed-metadata", "mixed-metadata.lab.test", "169.254.169.254", "11.0.0.11 then 169.254.169.254"),
)
MIXED_ATTEMPTS = build_attempts(MIXED_ANSWERS)


@pytest.mark.parametrize("attempt", MIXED_ATTEMPTS, ids=[a.test_id for a in MIXED_ATTEMPTS])
def test_name_with_one_private_answer_among_public_ones_is_denied(
        attempt, sandbox_lab, sandbox_proxy, network_verdict):
    origins_before = {origin: sandbox_lab.origin_connections(origin) for origin in sandbox_lab.public_origins}
    judgement = run_attempt(attempt, sandbox_proxy.connect, sandbox_lab.all_hits)
    dialled = {origin: sandbox_lab.origin_connections(origin) - count for origin, count in origins_before.items()}
    if any(dialled.values()) and judgement.verdict is Verdict.BLOCKED:
        judgement = SsrfJudgement(Verdict.ALLOWED, f"the public answer was dialled anyway: {dialled}",
                                  judgement.expected, judgement.observed)
    network_verdict("ssrf", attempt.test_id, judgement, attempt.describe())


@pytest.mark.parametrize("form", ["connect", "absolute", "keepalive"])
def test_dns_rebinding_name_is_denied_when_it_turns_private(form, sandbox_lab, sandbox_proxy, network_verdict):
    name = f"rebind-{secrets.token_hex(4)}.lab.test"
    sandbox_lab.add_rebinding_name(name, PUBLIC_ORIGIN, "127.0.0.1")
    case = _case(f"rebind-{form}", name, "127.0.0.1", "public first, then 127.0.0.1 (TTL 0)")
    test_id = f"{form}-dns-rebinding"
    before = sandbox_lab.all_hits()
    already = len(sandbox_lab.origin_requests(PUBLIC_ORIGIN))
    deadline = time.monotonic() + 2 * ATTEMPT_TIMEOUT_SECONDS
    if form == "keepalive":
        with sandbox_proxy.connect() as sock:
            sock.sendall(f"GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
            first, _ = read_one_response(sock, deadline)
            sock.sendall(f"GET http://{name}/again HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
            second, closed = read_one_response(sock, deadline)
            if not closed and second.status is not None:
                _rest, closed = read_one_response(sock, deadline)
        reply = ProxyReply(second, None, closed=closed, timed_out=second.status is None and not closed)
        first_status = first.status
    else:
        attempt = Attempt(case, form)
        with sandbox_proxy.connect() as sock:
            first_reply = send_attempt(sock, Attempt(_case("rebind-first", name, PUBLIC_ORIGIN, "first",
                                                           expected="allowed"), form))
        first_status = first_reply.final.status
        with sandbox_proxy.connect() as sock:
            reply = send_attempt(sock, attempt)
    reached = len(sandbox_lab.origin_requests(PUBLIC_ORIGIN)) - already
    judgement = judge_attempt(Attempt(case, "absolute" if form == "keepalive" else form), reply,
                              new_hits(before, sandbox_lab.all_hits()))
    if judgement.passed and (first_status != 200 or reached != 1):
        judgement = SsrfJudgement(Verdict.INDETERMINATE, f"the first, public resolution was not served "
                                  f"(status {first_status}, origin requests {reached}): rebinding not shown",
                                  judgement.expected, judgement.observed)
    network_verdict("ssrf", test_id, judgement, f"{form}: {name} answers {PUBLIC_ORIGIN}, then 127.0.0.1")
