"""Allowlist conformance: the proxy enforces the policy's ``allowed_hosts`` and ``allowed_ports``.

One ``CONNECT`` per probe of :func:`~pytest_sandbox.probes.allowlist.allowlist_probes`, ids like
``connect-11.0.0.10-8080``: a lab public origin (outside every special-use range) on every port the
enforced policy (``--sandbox-policy``) allows, every port the baseline allows (one the policy dropped
must now be refused) and ports policies commonly leave out; and every lab origin by address and by
name. Each destination has a lab listener, so a dial is seen whatever the proxy answers: what the
policy admits must be reached, anything else refused before any dial. Runs only with ``--sandbox``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from pytest_sandbox.fixtures.network import LAB_PORTS, RunningProxy, VerdictCheck
from pytest_sandbox.fixtures.syscall import SESSION_KEY
from pytest_sandbox.http.responses import parse_head
from pytest_sandbox.network.lab.lab import LAB_PUBLIC_ORIGINS, NetworkLab
from pytest_sandbox.policy.model import Policy, baseline_policy
from pytest_sandbox.probes.allowlist import allowlist_probes
from pytest_sandbox.probes.ssrf import ATTEMPT_TIMEOUT_SECONDS
from pytest_sandbox.report.categories import CategoryNotRun
from pytest_sandbox.session import SandboxSession
from pytest_sandbox.verdicts.allowlist import AllowlistProbe, judge_allowlist_probe

CATEGORY = "allowlist"
# A proxy that refuses and then dials anyway (issue #8 item 2) is caught if it dials within this.
LATE_DIAL_GRACE_SECONDS = 0.2
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


def test_proxy_reaches_what_the_policy_allows_and_refuses_the_rest_before_dialling(
        allowlist_probe: AllowlistProbe, allowlist_has_a_control: None, sandbox_lab: NetworkLab,
        sandbox_proxy: RunningProxy, probe_listeners: ProbeListeners, network_verdict: VerdictCheck) -> None:
    addresses = sandbox_lab.lookup(allowlist_probe.host) if allowlist_probe.host not in LAB_PUBLIC_ORIGINS \
        else [allowlist_probe.host]
    for address in addresses:
        probe_listeners.open(address, allowlist_probe.port)
    before = sum(probe_listeners.connections(address, allowlist_probe.port) for address in addresses)
    authority = allowlist_probe.authority
    data = b""
    with sandbox_proxy.connect(timeout=ATTEMPT_TIMEOUT_SECONDS) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        try:
            while b"\r\n\r\n" not in data and len(data) < MAX_REPLY_BYTES:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    status = parse_head(data).status
    if status != 200:
        time.sleep(LATE_DIAL_GRACE_SECONDS)
    dialled = sum(probe_listeners.connections(address, allowlist_probe.port) for address in addresses) - before
    judgement = judge_allowlist_probe(allowlist_probe, status, dialled)
    network_verdict(CATEGORY, allowlist_probe.test_id, judgement,
                    f"CONNECT {authority} ({'admitted' if allowlist_probe.admitted else 'not admitted'} by the policy)")
