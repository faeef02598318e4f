"""The allowlist category: the policy's ``allowed_hosts`` / ``allowed_ports`` are what the proxy enforces.

Every probe is a ``CONNECT`` to a lab public origin (outside every special-use range, so only the
allowlist can refuse it) on a port with a lab listener behind it, so a dial is seen whatever the
proxy answers. What the enforced policy admits (:meth:`NetworkPolicy.admits`, the reference proxy's
rule) must be tunnelled and reach its listener (WORKS); anything else must be refused with no
connection ever reaching the listener (BLOCKED). A proxy that kept built-in defaults instead of the
policy's allowlist reaches what the policy refuses (ALLOWED) or refuses what it admits (BROKEN).

The other network categories need the allowlist too: their refusals are meant to come from the
address checks, and their positive controls must be admitted. :func:`allowlist_gaps` names what a
test would send that the policy refuses before any address check; such a test cannot run.

Pure: no sockets. ``conformance/test_allowlist.py`` does the I/O; the judge is
:mod:`pytest_sandbox.verdicts.allowlist`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from pytest_sandbox.policy.model import NetworkPolicy
from pytest_sandbox.verdicts.allowlist import AllowlistProbe

__all__ = [
    "CONTROL_DESTINATION",
    "NAME_PROBE",
    "PROBE_ORIGIN",
    "PROBE_PORTS",
    "SUITE_DESTINATIONS",
    "allowlist_gaps",
    "allowlist_probes",
    "suite_destinations",
]

# A lab public origin, and ports a policy commonly leaves out (ssh, smtp, databases, alternative web
# ports). Each probe port gets a lab listener on the origin for the session.
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
