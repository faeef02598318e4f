"""The allowlist category: the policy's ``allowed_hosts`` / ``allowed_ports`` are what the proxy enforces.

Every probe is a ``CONNECT`` to a lab public origin (outside every special-use range, so only the
allowlist can refuse it): ports 80 and 443 reach the origin's listeners, every other port the lab's
catch-all, so a dial is seen whatever the proxy answers, however late. What the enforced policy
admits (:meth:`NetworkPolicy.admits`, the reference proxy's rule) must be tunnelled and reached
(WORKS); anything else must be refused with no connection ever arriving there (BLOCKED). A proxy
that kept built-in defaults instead of the policy's allowlist reaches what the policy refuses
(ALLOWED) or refuses what it admits (BROKEN).

The other network categories need the allowlist too: their refusals are meant to come from the
address checks, and their positive controls must be admitted. :func:`allowlist_gaps` names what a
test would send that the policy refuses before any address check; such a test cannot run.

Pure: no sockets. ``conformance/test_allowlist.py`` does the I/O; the judge is
:mod:`pytest_sandbox.verdicts.allowlist`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from pytest_sandbox.policy.model import NetworkPolicy
from pytest_sandbox.probes.campaign import isolation_rounds
from pytest_sandbox.verdicts.allowlist import AllowlistProbe

__all__ = [
    "CONTROL_DESTINATION",
    "NAME_PROBE",
    "PROBE_ORIGIN",
    "PROBE_PORTS",
    "SUITE_DESTINATIONS",
    "Endpoint",
    "allowlist_gaps",
    "allowlist_probes",
    "allowlist_rounds",
    "arrival_owners",
    "suite_destinations",
]

# Where a probe's dial arrives: (address, port), a lab origin or the catch-all.
Endpoint = tuple[str, int]

# A lab public origin, and ports a policy commonly leaves out (ssh, smtp, databases, alternative web
# ports). A dial to one of them reaches the lab's catch-all.
PROBE_ORIGIN = "11.0.0.10"
PROBE_PORTS: tuple[int, ...] = (22, 25, 3306, 8080, 8443)
# A lab name for the origin: host patterns match names as well as literals.
NAME_PROBE = "public-origin.lab.test"
# Where the SSRF and smuggling suites send their allowed requests (positive controls, the first
# request of a keep-alive pair, the absolute-form smuggling origin).
CONTROL_DESTINATION = (PROBE_ORIGIN, 80)
# What each category's tests send besides their own case, which the allowlist must admit so that a
# refusal comes from the check under test: (category, node-id pattern, destinations). The absolute-
# form smuggling payloads also carry a request for the 10.0.0.1 canary that the SSRF check must refuse.
SUITE_DESTINATIONS: tuple[tuple[str, str, tuple[tuple[str, int], ...]], ...] = (
    ("ssrf", "*", (CONTROL_DESTINATION,)),
    ("ssrf-malformed", "*", (CONTROL_DESTINATION,)),
    ("ssrf-controls", "*", (CONTROL_DESTINATION,)),
    ("smuggling", "*[[]absolute-*", (CONTROL_DESTINATION, ("10.0.0.1", 80))),
)


def allowlist_probes(network: NetworkPolicy, origins: Sequence[str],
                     reference_ports: Iterable[int] = ()) -> tuple[AllowlistProbe, ...]:
    """Port probes (the origin on every port the policy allows, on every ``reference_ports`` port -- the
    baseline's: a port the policy dropped must now be refused -- and on :data:`PROBE_PORTS`), then host
    probes (every lab origin and :data:`NAME_PROBE` on port 80, or the first allowed port). Pure."""
    ports = sorted(set(network.allowed_ports) | set(reference_ports) | set(PROBE_PORTS))
    host_port = 80 if 80 in network.allowed_ports else min(network.allowed_ports, default=80)
    wanted = [(PROBE_ORIGIN, port) for port in ports]
    wanted += [(host, host_port) for host in (*origins, NAME_PROBE)]
    return tuple(AllowlistProbe(host, port, network.admits(host, port)) for host, port in dict.fromkeys(wanted))


def suite_destinations(category: str | None, nodeid: str) -> tuple[tuple[str, int], ...] | None:
    """What a test of ``category`` sends besides its case; None when the allowlist does not matter to
    it (the intercepted inference path, the egress and syscall categories). Pure."""
    for wanted, pattern, destinations in SUITE_DESTINATIONS:
        if category == wanted and fnmatch.fnmatchcase(nodeid, pattern):
            return destinations
    return None


def allowlist_gaps(network: NetworkPolicy, destinations: Iterable[tuple[str, int]]) -> list[str]:
    """The ``host:port`` destinations the allowlist refuses, in order. Pure."""
    return [f"{host}:{port}" for host, port in dict.fromkeys(destinations) if not network.admits(host, port)]


def allowlist_rounds(probes: Sequence[AllowlistProbe], endpoints: Mapping[str, frozenset[Endpoint]]
                     ) -> tuple[list[list[str]], bool]:
    """The campaign's rounds (test ids) and whether the grace period must pass before the first refused round.

    Within a round the probes' endpoints are pairwise disjoint, so a connection during a round (or its
    grace period) at one of them is that round's probe's. Every round of admitted probes comes before
    every round of refused ones: a connection at a refused probe's endpoint after its round can then only
    be a late dial of a refused probe (never an admitted probe's own tunnel), so it is blamed, not
    dropped (:func:`arrival_owners`). When an admitted probe shares an endpoint with a refused one, the
    grace period passes between the two layers, so a slow second dial of an admitted probe is not
    blamed on the refused one. Pure.
    """
    admitted = [probe.test_id for probe in probes if probe.admitted]
    refused = [probe.test_id for probe in probes if not probe.admitted]
    shared = bool({e for key in admitted for e in endpoints[key]} & {e for key in refused for e in endpoints[key]})
    spelled = {key: frozenset(f"{address} {port}" for address, port in places) for key, places in endpoints.items()}
    return isolation_rounds(admitted, spelled) + isolation_rounds(refused, spelled), shared


def arrival_owners(rounds: Sequence[Sequence[str]], endpoints: Mapping[str, frozenset[Endpoint]],
                   admitted: Mapping[str, bool]) -> list[dict[Endpoint, tuple[str, ...]]]:
    """For round ``k`` and each probed endpoint: the probes a connection there during round ``k`` (or its grace
    period, up to the next round's start) is counted for. Pure.

    * the probe of round ``k`` on that endpoint, if there is one (endpoints are disjoint within a round);
    * else every refused probe on it from an earlier round: a late dial no grace period covered is blamed
      on every probe that can have caused it (sound; a proxy that dials refused destinations late fails
      each of them);
    * else every admitted probe on it from an earlier round (a second dial of a destination the policy
      admits: counted, harmless);
    * an endpoint no probe has used yet gets no owner (such a connection is left to the session-end audit).

    A refused probe's very late dial that lands in a later round with a refused probe on the same endpoint is
    counted for that later probe only: that probe fails, so the run fails either way.
    """
    probed: dict[Endpoint, list[str]] = {}
    owners: list[dict[Endpoint, tuple[str, ...]]] = []
    every = {e for members in rounds for key in members for e in endpoints[key]}
    for members in rounds:
        own = {e: key for key in members for e in endpoints[key]}
        round_owners: dict[Endpoint, tuple[str, ...]] = {}
        for endpoint in sorted(every):
            if endpoint in own:
                round_owners[endpoint] = (own[endpoint],)
            elif earlier := probed.get(endpoint):
                refused = tuple(key for key in earlier if not admitted[key])
                round_owners[endpoint] = refused or tuple(earlier)
        owners.append(round_owners)
        for endpoint, key in own.items():
            probed.setdefault(endpoint, []).append(key)
    return owners
