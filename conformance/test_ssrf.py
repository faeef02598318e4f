"""SSRF conformance: every special-use destination is attempted through the proxy and must be refused.

One test per catalogue case x request form it lists (CONNECT, absolute-form, origin-form with Host,
authority-form GET, ``OPTIONS *``), ids like ``connect-v4-cgnat-first-100.64.0.0`` or
``origin-name-nip.io-metadata``; the catalogue's port is 80, and one address of every special-use row, every
metadata address and every dns-name case are sent to each other port the enforced policy admits too
(``connect-v4-private-10-inner-10.0.0.1-port-443``).
A denial counts only if the proxy refused it **and** the lab's catch-all canary saw no connection
attributed to it (network.md §7); the ``ctl-`` cases are positive controls that must reach the
catch-all at their destination. The remaining tests attack what a per-request table check misses:
keep-alive reuse, Host vs request-target, mixed DNS answers and DNS rebinding (network.md §3); the
proxy's own address is in ``test_ssrf_self.py``. Runs only with ``--sandbox``.

Evidence: the exchanges of every selected test in this module run as one campaign on first use
(:func:`pytest_sandbox.probes.ssrf_exchanges.run_ssrf_campaign`): back to back, each with its own nonce, then
the grace period, then every catch-all hit is attributed to the exchange that caused it (late dials
included); each test then reports its own verdict. Hits no verdict accounted for fail the session
when the lab closes.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.catalogues.ssrf_cases import PORT_SWEEP_FORMS, port_sweep_cases
from pytest_sandbox.fixtures.conformance import enforced_policy, selected_params
from pytest_sandbox.probes.ssrf import ALL_FORMS, Attempt, build_attempts
from pytest_sandbox.probes.ssrf_exchanges import (
    AttemptExchange,
    HostMismatchControl,
    HostMismatchDenial,
    KeepAliveFollowUp,
    MixedAnswers,
    Rebinding,
    SsrfExchange,
    SsrfVerdict,
    custom_case,
    run_ssrf_campaign,
)

_case = custom_case


@pytest.fixture(scope="module")
def ssrf_verdicts(request, sandbox_lab, sandbox_proxy) -> dict[str, SsrfVerdict]:
    """Every selected exchange of this module, run as one campaign: test id -> verdict."""
    exchanges = {exchange.key: exchange for exchange in selected_params(request, "exchange")}
    return run_ssrf_campaign(sandbox_lab, sandbox_proxy.connect, list(exchanges.values()))


def _report(exchange: SsrfExchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict) -> None:
    verdict = ssrf_verdicts.get(exchange.key)
    if verdict is None:  # not in the campaign (e.g. selected after it ran): run it alone, with the grace
        verdict = run_ssrf_campaign(sandbox_lab, sandbox_proxy.connect, [exchange])[exchange.key]
    network_verdict(verdict.category, verdict.test_id, verdict.judgement, verdict.attempted)


ATTEMPTS = tuple(AttemptExchange(attempt) for attempt in build_attempts(forms=ALL_FORMS))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.name == "test_special_use_destination_is_refused_and_public_one_is_reached":
        # The catalogue's port is 80; each other port the enforced policy admits also gets one address per
        # special-use row, each metadata address, each dns-name case and two public controls
        # (catalogues/ssrf_cases.port_sweep_cases): a proxy that classified destinations on port 80 only passed
        # every catalogue case.
        ports = enforced_policy(metafunc.config).network.allowed_ports
        sweep = tuple(AttemptExchange(attempt) for attempt in
                      build_attempts(port_sweep_cases(ports), forms=PORT_SWEEP_FORMS))
        metafunc.parametrize("exchange", (*ATTEMPTS, *sweep), ids=[e.key for e in (*ATTEMPTS, *sweep)])


def test_special_use_destination_is_refused_and_public_one_is_reached(
        exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict):
    _report(exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict)


# --- keep-alive: every request on a connection is judged, not only the first -------------------

FOLLOW_UPS = tuple(KeepAliveFollowUp(case) for case in (
    _case("private-10", "10.0.0.1", "10.0.0.1", "private 10/8 after an allowed request", kind="literal"),
    _case("metadata", "169.254.169.254", "169.254.169.254", "metadata after an allowed request",
          kind="literal"),
    _case("mapped-metadata", "[::ffff:169.254.169.254]", "169.254.169.254",
          "IPv4-mapped metadata after an allowed request", kind="ipv6_form"),
    _case("localhost-name", "localhost", "127.0.0.1", "a name resolving to loopback after an allowed request"),
))


@pytest.mark.parametrize("exchange", FOLLOW_UPS, ids=[e.key for e in FOLLOW_UPS])
def test_second_request_on_keep_alive_connection_after_allowed_one_is_denied(
        exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict):
    _report(exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict)


# --- Host header vs request target: the target decides (RFC 9112 §3.2.2) ----------------------

HOST_MISMATCH_CONTROL = (HostMismatchControl(),)


@pytest.mark.parametrize("exchange", HOST_MISMATCH_CONTROL, ids=[e.key for e in HOST_MISMATCH_CONTROL])
def test_absolute_request_with_private_host_header_is_judged_by_its_public_target(
        exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict):
    _report(exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict)


HOST_MISMATCH_DENIALS = (
    HostMismatchDenial(Attempt(_case("host-mismatch-private-target", "127.0.0.1", "127.0.0.1",
                                     "private target with a public Host header", kind="literal"), "absolute")),
    HostMismatchDenial(Attempt(_case("host-mismatch-private-connect", "169.254.169.254", "169.254.169.254",
                                     "CONNECT to metadata with a public Host header", kind="literal"), "connect")),
)


@pytest.mark.parametrize("exchange", HOST_MISMATCH_DENIALS, ids=[e.key for e in HOST_MISMATCH_DENIALS])
def test_private_target_with_public_host_header_is_denied(
        exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict):
    _report(exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict)


# --- DNS: any special answer denies; every resolution is judged again ------------------------

MIXED_ANSWERS = tuple(MixedAnswers(attempt) for attempt in build_attempts((
    _case("mixed-public-first", "mixed-public-first.lab.test", "10.0.0.1", "11.0.0.10 then 10.0.0.1"),
    _case("mixed-private-first", "mixed-private-first.lab.test", "10.0.0.1", "10.0.0.1 then 11.0.0.10"),
    _case("mixed-v6-public-first", "mixed-v6-public-first.lab.test", "fd00:ec2::254",
          "2600:9000::10 then fd00:ec2::254"),
    _case("mixed-metadata", "mixed-metadata.lab.test", "169.254.169.254", "11.0.0.11 then 169.254.169.254"),
)))


@pytest.mark.parametrize("exchange", MIXED_ANSWERS, ids=[e.key for e in MIXED_ANSWERS])
def test_name_with_one_private_answer_among_public_ones_is_denied(
        exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict):
    _report(exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict)


REBINDING = tuple(Rebinding(form) for form in ("connect", "absolute", "keepalive"))


@pytest.mark.parametrize("exchange", REBINDING, ids=[e.form for e in REBINDING])
def test_dns_rebinding_name_is_denied_when_it_turns_private(
        exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict):
    _report(exchange, ssrf_verdicts, sandbox_lab, sandbox_proxy, network_verdict)
