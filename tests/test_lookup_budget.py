"""The reference never gives up a name lookup before the client gives up the attempt.

Under load the lab's DNS stub (a thread of the harness's own process) can answer seconds late. The lab's
reference proxy used to bound a lookup by 2 s while the suite waits 3 s for an answer
(``probes.ssrf.ATTEMPT_TIMEOUT_SECONDS``): a late stub made the reference answer ``502 resolution_failed``,
which a denial's verdict reads as "it tried to dial" (a false ALLOWED; seen as 15 unmarked name twins
failing one loaded conformance run). Now a lookup gets at least the client's deadline, so a stub slower than
that ends as the client's own timeout (INDETERMINATE), never as a 502 from the reference.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pytest_sandbox.network.harness import LAB_PROXY_TIMEOUTS, start_proxy
from pytest_sandbox.network.lab.dns_client import DNS_TIMEOUT_SECONDS, Resolver
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.probes.after_quiet import DENIALS
from pytest_sandbox.probes.ssrf import ATTEMPT_TIMEOUT_SECONDS, send_attempt

NETNS_OK, NETNS_REASON = host_can_create_netns()
# The metadata name (the stub resolves it to 169.254.169.254): refused once resolved, 502 if the lookup fails.
NAME_DENIAL = next(attempt for attempt in DENIALS if attempt.case.case_id == "name-metadata-google-internal")
# Longer than the old 2 s bound, inside the client's 3 s.
LATE_BY = ATTEMPT_TIMEOUT_SECONDS - 0.8


def test_a_lookup_gets_at_least_the_clients_deadline():
    assert LAB_PROXY_TIMEOUTS["resolve_timeout"] >= ATTEMPT_TIMEOUT_SECONDS
    assert DNS_TIMEOUT_SECONDS >= LAB_PROXY_TIMEOUTS["resolve_timeout"]


def _answering_late(resolve: Resolver, seconds: float) -> Resolver:
    """``resolve``, its answer held back until ``seconds`` after the question (the real lookup included)."""
    async def late(name: str) -> list[str]:
        began = time.monotonic()
        answers = await resolve(name)
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))
        return answers
    return late


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_a_late_stub_answer_is_still_judged_by_the_reference(_network_lab, monkeypatch):
    real = _network_lab.resolver
    monkeypatch.setattr(_network_lab, "resolver", lambda **kwargs: _answering_late(real(**kwargs), LATE_BY))
    running = start_proxy(_network_lab, port=3244)
    try:
        with running.connect() as sock:
            reply = send_attempt(sock, NAME_DENIAL, timeout=3 * ATTEMPT_TIMEOUT_SECONDS, marked=False)
    finally:
        running.stop()
    assert reply.proxy.status == 403 and reply.proxy.proxy_reason == "ssrf_denied", reply.describe()
