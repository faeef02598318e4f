"""Detection proof for the SSRF suite: a proxy weakened on purpose fails exactly the cases it opens.

Each weakening is a custom ``classify`` handed to ProxyConfig; the weakened proxy runs in the same
lab as the reference one. The suite must flag precisely the cases the hole lets through and keep
passing the rest, so its verdicts name holes rather than noise.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from pytest_sandbox.addresses import AddressVerdict, classify_address, parse_authority
from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES, SsrfCase
from pytest_sandbox.network_fixtures import RunningProxy, lab_proxy_config, start_proxy
from pytest_sandbox.ssrf_suite import (
    ProxyReply,
    build_attempts,
    judge_attempt,
    parse_reply,
    run_attempt,
)
from pytest_sandbox.verdicts import Verdict

ATTEMPTS = build_attempts()
CGNAT = ipaddress.ip_network("100.64.0.0/10")


def classify_without_cgnat(address: str) -> AddressVerdict:
    """A classifier whose table lacks 100.64.0.0/10 (RFC 6598 shared address space)."""
    if ipaddress.ip_address(address) in CGNAT:
        return AddressVerdict(address, False, "public (weakened: no 100.64.0.0/10 row)", None)
    return classify_address(address)


def classify_without_unwrapping_mapped(address: str) -> AddressVerdict:
    """A classifier that judges ::ffff:a.b.c.d as an IPv6 address and never looks inside it."""
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return AddressVerdict(address, False, "public (weakened: IPv4-mapped not unwrapped)", None)
    return classify_address(address)


def _literal_of(case: SsrfCase) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return parse_authority(case.authority).ip
    except ValueError:
        return None


def _failing_ids(running: RunningProxy) -> set[str]:
    lab = running.lab
    return {attempt.test_id for attempt in ATTEMPTS
            if not run_attempt(attempt, running.connect, lab.all_hits).passed}


@pytest.fixture
def weakened_proxy(request: pytest.FixtureRequest, _network_lab) -> Iterator[RunningProxy]:
    classify, port = request.param
    running = start_proxy(_network_lab, lab_proxy_config(classify=classify), port=port)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("weakened_proxy", [(classify_without_cgnat, 3129)], indirect=True)
def test_proxy_missing_the_cgnat_range_fails_exactly_the_cgnat_cases(weakened_proxy):
    expected = {f"{form}-{case.case_id}" for case in SSRF_CASES for form in ("connect", "absolute")
                if (ip := _literal_of(case)) is not None and ip in CGNAT}
    assert len(expected) >= 8  # first, inner, last of 100.64.0.0/10 and the Alibaba metadata address
    assert _failing_ids(weakened_proxy) == expected


@pytest.mark.parametrize("weakened_proxy", [(classify_without_unwrapping_mapped, 3130)], indirect=True)
def test_proxy_that_does_not_unwrap_ipv4_mapped_fails_exactly_the_mapped_cases(weakened_proxy):
    expected = {f"{form}-{case.case_id}" for case in SSRF_CASES for form in ("connect", "absolute")
                if isinstance(ip := _literal_of(case), ipaddress.IPv6Address) and ip.ipv4_mapped is not None}
    assert {"connect-enc6-metadata-ipv4-mapped-hex", "absolute-enc6-loopback-ipv4-mapped-dotted"} <= expected
    assert _failing_ids(weakened_proxy) == expected


def test_reference_proxy_passes_every_case_in_the_same_lab(_network_lab):
    running = start_proxy(_network_lab, port=3131)
    try:
        assert _failing_ids(running) == set()
    finally:
        running.stop()


# --- the judge itself, without sockets ------------------------------------------------------

METADATA = next(a for a in ATTEMPTS if a.test_id == "connect-meta-imds-169.254.169.254")
CONTROL = next(a for a in ATTEMPTS if a.case.expected == "allowed" and a.form == "absolute")
REFUSAL = parse_reply(b'HTTP/1.1 403 Forbidden\r\nconnection: close\r\n\r\n{"error":"ssrf_denied"}')


def test_refusal_with_closed_connection_and_no_canary_hit_is_blocked():
    judgement = judge_attempt(METADATA, ProxyReply(REFUSAL, None, closed=True, timed_out=False), {})
    assert judgement.verdict is Verdict.BLOCKED
    assert "ssrf_denied" in judgement.reason


def test_refusal_with_a_canary_hit_is_allowed():
    hits = {("169.254.169.254", 80): 1}
    judgement = judge_attempt(METADATA, ProxyReply(REFUSAL, None, closed=True, timed_out=False), hits)
    assert judgement.verdict is Verdict.ALLOWED


def test_silent_timeout_is_never_a_pass():
    silent = ProxyReply(parse_reply(b""), None, closed=False, timed_out=True)
    assert judge_attempt(METADATA, silent, {}).verdict is Verdict.INDETERMINATE


def test_bad_gateway_means_the_proxy_tried_to_dial_and_is_allowed():
    dialled = ProxyReply(parse_reply(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"), None, closed=True, timed_out=False)
    assert judge_attempt(METADATA, dialled, {}).verdict is Verdict.ALLOWED


def test_refusal_that_leaves_the_connection_open_is_not_a_pass():
    held = ProxyReply(REFUSAL, None, closed=False, timed_out=True)
    assert judge_attempt(METADATA, held, {}).verdict is Verdict.INDETERMINATE


def test_control_refused_by_the_proxy_is_broken():
    judgement = judge_attempt(CONTROL, ProxyReply(REFUSAL, None, closed=True, timed_out=False), {})
    assert judgement.verdict is Verdict.BROKEN


def test_control_answered_by_its_canary_works():
    canary = CONTROL.case.canary
    assert canary is not None
    answer = parse_reply(f"HTTP/1.1 200 OK\r\nX-Lab-Canary: {canary}\r\n\r\nok".encode())
    judgement = judge_attempt(CONTROL, ProxyReply(answer, None, closed=True, timed_out=False), {(canary, 80): 1})
    assert judgement.verdict is Verdict.WORKS


def test_control_answered_200_without_its_canary_counting_it_is_broken():
    canary = CONTROL.case.canary
    answer = parse_reply(f"HTTP/1.1 200 OK\r\nX-Lab-Canary: {canary}\r\n\r\nok".encode())
    judgement = judge_attempt(CONTROL, ProxyReply(answer, None, closed=True, timed_out=False), {})
    assert judgement.verdict is Verdict.BROKEN
