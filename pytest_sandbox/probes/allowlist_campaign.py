"""The allowlist category's I/O: one ``CONNECT`` per probe through the proxy under test, and what arrived where.

:func:`run_allowlist_campaign` sends every probe once, in the rounds of
:func:`~pytest_sandbox.probes.allowlist.allowlist_rounds`, and counts what arrived at each probe's endpoints
(a lab origin on the lab's origin ports, the lab's catch-all on every other port) for the probes
:func:`~pytest_sandbox.probes.allowlist.arrival_owners` names. The judge is
:func:`~pytest_sandbox.verdicts.allowlist.judge_allowlist_probe`; ``conformance/test_allowlist.py`` reports.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from pytest_sandbox.http.framing import HEAD_END
from pytest_sandbox.http.responses import parse_head
from pytest_sandbox.network.harness import RunningProxy
from pytest_sandbox.network.lab.attribution import AttemptWindow, CatchAllHit, new_nonce
from pytest_sandbox.network.lab.lab import LAB_PUBLIC_ORIGINS, NetworkLab
from pytest_sandbox.probes.allowlist import Endpoint, allowlist_rounds, arrival_owners
from pytest_sandbox.probes.campaign import GRACE_SECONDS
from pytest_sandbox.probes.exchange import SocketReader
from pytest_sandbox.probes.ssrf import ATTEMPT_TIMEOUT_SECONDS
from pytest_sandbox.verdicts.allowlist import AllowlistProbe

__all__ = ["CATEGORY", "ProbeResult", "run_allowlist_campaign"]

CATEGORY = "allowlist"
MAX_REPLY_BYTES = 65536


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw: the proxy's answer (None: none) and the connections counted for it at its listeners,
    ``late`` of them after its round's grace period."""

    status: int | None
    dialled: int
    late: int = 0


def _endpoints(lab: NetworkLab, probe: AllowlistProbe) -> frozenset[Endpoint]:
    addresses = lab.lookup(probe.host) if probe.host not in LAB_PUBLIC_ORIGINS else [probe.host]
    return frozenset((str(ipaddress.ip_address(address)), probe.port) for address in addresses)


def _answer(proxy: RunningProxy, probe: AllowlistProbe) -> int | None:
    """The status the proxy answers ``CONNECT`` with (None: none within the attempt's deadline)."""
    authority = probe.authority
    with proxy.connect(timeout=ATTEMPT_TIMEOUT_SECONDS) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        reader = SocketReader(sock, time.monotonic() + ATTEMPT_TIMEOUT_SECONDS, bytearray(), limit=MAX_REPLY_BYTES)
        reader.fill(lambda: HEAD_END in reader.buffer)
    return parse_head(bytes(reader.buffer)).status


class _Arrivals:
    """Connections at the probes' endpoints, round by round: a lab origin's accepted connections (on the lab's
    origin ports), and the catch-all's hits everywhere else (each with its index, to be accounted for)."""

    def __init__(self, lab: NetworkLab, endpoints: set[Endpoint]) -> None:
        self.lab = lab
        self.endpoints = endpoints
        self.origins = sorted(endpoint for endpoint in endpoints if endpoint[1] in lab.origin_ports
                              and endpoint[0] in lab.public_origins)
        self.mark = lab.hit_mark()
        self.counts = self._origin_counts()

    def _origin_counts(self) -> dict[Endpoint, int]:
        return {endpoint: self.lab.origin_connections(*endpoint) for endpoint in self.origins}

    def since_last(self) -> tuple[dict[Endpoint, int], dict[Endpoint, list[CatchAllHit]]]:
        """What arrived since the previous call: connections per origin endpoint, catch-all hits per endpoint."""
        hits = self.lab.hits(since=self.mark)
        counts = self._origin_counts()
        self.mark += len(hits)
        arrived = {endpoint: counts[endpoint] - self.counts[endpoint] for endpoint in self.origins}
        self.counts = counts
        caught: dict[Endpoint, list[CatchAllHit]] = {}
        for hit in hits:
            if (hit.address, hit.port) in self.endpoints:
                caught.setdefault((hit.address, hit.port), []).append(hit)
        return arrived, caught


def run_allowlist_campaign(lab: NetworkLab, proxy: RunningProxy, probes: list[AllowlistProbe]
                           ) -> dict[str, ProbeResult]:
    """Every probe once, in rounds (:func:`~pytest_sandbox.probes.allowlist.allowlist_rounds`); after a round that
    saw a refusal the grace period passes (a proxy that refuses and dials afterwards, issue #8 item 2), then what
    arrived at the probes' endpoints is counted for the probes :func:`~pytest_sandbox.probes.allowlist.arrival_owners`
    names, so a dial later than its own round is still counted. Catch-all hits counted here are accounted
    for; a dial after the campaign reaches the catch-all and fails the run at the session-end audit. Test id ->
    result."""
    where = {probe.test_id: _endpoints(lab, probe) for probe in probes}
    admitted = {probe.test_id: probe.admitted for probe in probes}
    by_id = {probe.test_id: probe for probe in probes}
    rounds, settle_between_layers = allowlist_rounds(probes, where)
    owners = arrival_owners(rounds, where, admitted)
    arrivals = _Arrivals(lab, {endpoint for places in where.values() for endpoint in places})
    statuses: dict[str, int | None] = {}
    own: dict[str, int] = dict.fromkeys(by_id, 0)
    late: dict[str, int] = dict.fromkeys(by_id, 0)
    for index, members in enumerate(rounds):
        if settle_between_layers and index and admitted[rounds[index - 1][0]] and not admitted[members[0]]:
            time.sleep(GRACE_SECONDS)
        windows = []
        for key in members:
            begin = time.monotonic()
            statuses[key] = _answer(proxy, by_id[key])
            if not admitted[key]:  # a dial after the campaign: the audit names the refused probes as its candidates
                windows.append(AttemptWindow(f"{CATEGORY}/{key}", new_nonce(), frozenset(a for a, _ in where[key]),
                                             begin, time.monotonic()))
        lab.register_attempts(windows)
        if any(statuses[key] != 200 for key in members):
            time.sleep(GRACE_SECONDS)
        arrived, caught = arrivals.since_last()
        for endpoint, blamed in owners[index].items():
            count = arrived.get(endpoint, 0) + len(caught.get(endpoint, []))
            for key in blamed:
                (own if key in members else late)[key] += count
            if caught.get(endpoint):
                lab.account((hit.index for hit in caught[endpoint]), by=", ".join(f"{CATEGORY}/{k}" for k in blamed))
    return {key: ProbeResult(statuses[key], own[key] + late[key], late[key]) for key in by_id}
