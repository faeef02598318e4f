"""Allowlist conformance: the proxy enforces the policy's ``allowed_hosts`` and ``allowed_ports``.

One ``CONNECT`` per probe of :func:`~pytest_sandbox.probes.allowlist.allowlist_probes`, ids like
``connect-11.0.0.10-8080``: a lab public origin (outside every special-use range) on every port the
enforced policy (``--sandbox-policy``) allows, every port the baseline allows (one the policy dropped
must now be refused) and ports policies commonly leave out; and every lab origin by address and by
name. Each destination has a lab listener, so a dial is seen whatever the proxy answers: what the
policy admits must be reached, anything else refused before any dial. Runs only with ``--sandbox``.

The probes of every selected test run as one campaign on first use (:func:`allowlist_results`), in rounds
whose listeners are pairwise disjoint (:func:`~pytest_sandbox.probes.campaign.isolation_rounds`): after a
round with a refusal in it, the grace period
(:data:`~pytest_sandbox.probes.campaign.GRACE_SECONDS`) passes before its listeners are counted, so a
proxy that refuses and dials afterwards is caught, and its late dial is never counted for another probe
of the same listener.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pytest_sandbox.fixtures.conformance import selected_params
from pytest_sandbox.fixtures.network import LAB_PORTS, VerdictCheck
from pytest_sandbox.fixtures.stash import SESSION_KEY
from pytest_sandbox.http.responses import parse_head
from pytest_sandbox.network.harness import RunningProxy
from pytest_sandbox.network.lab.lab import LAB_PUBLIC_ORIGINS, NetworkLab
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes.allowlist import allowlist_probes
from pytest_sandbox.probes.campaign import GRACE_SECONDS, isolation_rounds
from pytest_sandbox.probes.ssrf import ATTEMPT_TIMEOUT_SECONDS
from pytest_sandbox.report.categories import CategoryNotRun
from pytest_sandbox.session import SandboxSession
from pytest_sandbox.verdicts.allowlist import AllowlistProbe, judge_allowlist_probe

CATEGORY = "allowlist"
MAX_REPLY_BYTES = 65536


def enforced_policy(config: pytest.Config) -> Policy:
    session = config.stash.get(SESSION_KEY, None)
    return session.policy if session is not None else baseline_policy()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "allowlist_probe" in metafunc.fixturenames:
        probes = allowlist_probes(enforced_policy(metafunc.config).network, LAB_PUBLIC_ORIGINS,
                                  baseline_policy().network.allowed_ports)
        metafunc.parametrize("allowlist_probe", probes, ids=[probe.test_id for probe in probes])


class ProbeListeners:
    """Lab listeners on the probe destinations the lab's own origins do not serve (ports other than
    80/443); counts the connections each one was sent (the kernel completes them into the backlog)."""

    def __init__(self, lab: NetworkLab) -> None:
        self.lab = lab
        self._sockets: dict[tuple[str, int], socket.socket] = {}

    def open(self, address: str, port: int) -> None:
        if port not in LAB_PORTS and (address, port) not in self._sockets:
            listener = self.lab.listen(address, port)
            listener.setblocking(False)
            self._sockets[(address, port)] = listener

    def connections(self, address: str, port: int) -> int:
        if port in LAB_PORTS:
            return self.lab.origin_connections(address, port)
        listener, count = self._sockets[(address, port)], 0
        while True:
            try:
                peer, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return count
            peer.close()
            count += 1

    def close(self) -> None:
        for listener in self._sockets.values():
            listener.close()
        self._sockets.clear()


@pytest.fixture(scope="module")
def probe_listeners(sandbox_lab: NetworkLab) -> Iterator[ProbeListeners]:
    listeners = ProbeListeners(sandbox_lab)
    try:
        yield listeners
    finally:
        listeners.close()


@pytest.fixture
def allowlist_has_a_control(sandbox_session: SandboxSession) -> None:
    """Without one admitted destination in the lab, a refusal cannot be told from a blanket one."""
    policy = sandbox_session.policy
    if not any(probe.admitted for probe in allowlist_probes(policy.network, LAB_PUBLIC_ORIGINS)):
        raise CategoryNotRun(f"policy {policy.name} admits none of the lab's public origins (hosts "
                             f"{list(policy.network.allowed_hosts)}, ports {list(policy.network.allowed_ports)}), "
                             "so no allowlist refusal can be told from a blanket one")


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw: the proxy's answer (None: none) and the connections its listeners got in its round."""

    status: int | None
    dialled: int


def _listeners(lab: NetworkLab, probe: AllowlistProbe) -> list[tuple[str, int]]:
    addresses = lab.lookup(probe.host) if probe.host not in LAB_PUBLIC_ORIGINS else [probe.host]
    return [(address, probe.port) for address in addresses]


def _answer(proxy: RunningProxy, probe: AllowlistProbe) -> int | None:
    authority = probe.authority
    data = b""
    with proxy.connect(timeout=ATTEMPT_TIMEOUT_SECONDS) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        try:
            while b"\r\n\r\n" not in data and len(data) < MAX_REPLY_BYTES:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    return parse_head(data).status


def run_allowlist_campaign(lab: NetworkLab, proxy: RunningProxy, listeners: ProbeListeners,
                           probes: list[AllowlistProbe]) -> dict[str, ProbeResult]:
    """Every probe once, in rounds with pairwise disjoint listeners; after a round that saw a refusal the grace
    period passes (a proxy that refuses and dials afterwards, issue #8 item 2), then the round's listeners are
    counted. Test id -> result."""
    where = {probe.test_id: _listeners(lab, probe) for probe in probes}
    for places in where.values():
        for address, port in places:
            listeners.open(address, port)
    by_id = {probe.test_id: probe for probe in probes}
    results: dict[str, ProbeResult] = {}
    rounds = isolation_rounds(list(by_id), {key: frozenset(f"{a}:{p}" for a, p in where[key]) for key in by_id})
    for members in rounds:
        before = {key: sum(listeners.connections(address, port) for address, port in where[key]) for key in members}
        statuses = {key: _answer(proxy, by_id[key]) for key in members}
        if any(status != 200 for status in statuses.values()):
            time.sleep(GRACE_SECONDS)
        for key in members:
            dialled = sum(listeners.connections(address, port) for address, port in where[key]) - before[key]
            results[key] = ProbeResult(statuses[key], dialled)
    return results


@pytest.fixture(scope="module")
def allowlist_results(request: pytest.FixtureRequest, sandbox_lab: NetworkLab, sandbox_proxy: RunningProxy,
                      probe_listeners: ProbeListeners) -> dict[str, ProbeResult]:
    """Every selected probe of this module, run as one campaign: test id -> result."""
    probes = {probe.test_id: probe for probe in selected_params(request, "allowlist_probe")}
    return run_allowlist_campaign(sandbox_lab, sandbox_proxy, probe_listeners, list(probes.values()))


def test_proxy_reaches_what_the_policy_allows_and_refuses_the_rest_before_dialling(
        allowlist_probe: AllowlistProbe, allowlist_has_a_control: None, sandbox_lab: NetworkLab,
        sandbox_proxy: RunningProxy, probe_listeners: ProbeListeners, allowlist_results: dict[str, ProbeResult],
        network_verdict: VerdictCheck) -> None:
    result = allowlist_results.get(allowlist_probe.test_id)
    if result is None:  # not in the campaign (selected after it ran): a campaign of its own
        result = run_allowlist_campaign(sandbox_lab, sandbox_proxy, probe_listeners,
                                        [allowlist_probe])[allowlist_probe.test_id]
    judgement = judge_allowlist_probe(allowlist_probe, result.status, result.dialled)
    network_verdict(CATEGORY, allowlist_probe.test_id, judgement,
                    f"CONNECT {allowlist_probe.authority} "
                    f"({'admitted' if allowlist_probe.admitted else 'not admitted'} by the policy)")
