"""Egress conformance: a sandboxed process reaches nothing directly, and ordinary networking still works.

The target is the reference launcher in proxy mode (``sandbox_proxied``: its own network namespace, the proxy on
127.0.0.1:3128 there), or, with ``--sandbox-exec PREFIX``, the third party's launcher, started in a namespace of the
harness's wired into the lab, which stands in for the host (``network/lab/wired.py``). One probe run reports where
it runs and tries every target, over TCP and with a UDP datagram; the harness listens where a launcher that
isolates nothing would let it arrive (the host's or the stand-in's loopback, the lab's catch-all and UDP sockets),
so a broken launcher cannot earn BLOCKED (see :mod:`pytest_sandbox.probes.egress`); it also tries setns(2) back
into every other network namespace it can name (``netns-escape``). A direct attempt is BLOCKED
only if it failed with an errno where the process runs, that place is shown isolated (the namespace made for it;
for a third party, one of its launcher's holding nothing but a loopback) or wholly watched, and nothing saw it; a
timeout is INDETERMINATE. The positive control: a request through the proxy's address reaches a lab origin (the
reference), or a TCP round trip over the process's own loopback works (a third party, whose proxy the harness
does not know). Runs only with ``--sandbox``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_sandbox.network.lab.wired import unwire_from_lab, wire_into_lab
from pytest_sandbox.network.netns import NetnsHolder
from pytest_sandbox.probes.egress import (
    DIRECT_TARGETS,
    HOST_LOOPBACK_ADDRESSES,
    TRANSPORTS,
    EgressEvidence,
    StandInLauncher,
    host_loopback_target_id,
    run_egress_probe,
)
from pytest_sandbox.probes.syscall import ExecTarget

# The lab, proxied-sandbox and verdict fixtures come from the plugin.

HOST_LOOPBACK = tuple(host_loopback_target_id(transport, address)
                      for transport in TRANSPORTS for address, _family in HOST_LOOPBACK_ADDRESSES)
TARGET_IDS = (*HOST_LOOPBACK, *(target.target_id for target in DIRECT_TARGETS))


@pytest.fixture(scope="module")
def egress_evidence(sandbox_session, sandbox_lab, _proxied_pool) -> Iterator[EgressEvidence]:
    """One probe run, judged: under the reference launcher in proxy mode (the session's policy), or under the
    ``--sandbox-exec`` launcher started in a namespace wired into the lab for just that run."""
    if not sandbox_session.third_party:
        proxied = _proxied_pool.get(sandbox_session.policy)
        yield run_egress_probe(proxied, sandbox_lab, proxied.holder.netns_id)
        return
    with NetnsHolder.start(name="egress-stand-in") as stand_in:
        wire_into_lab(stand_in, sandbox_lab, link="standin")
        try:
            launcher = StandInLauncher(ExecTarget(sandbox_session.options.exec_prefix), stand_in)
            evidence = run_egress_probe(launcher, sandbox_lab, None, proxy=None, stand_in=stand_in)
        finally:
            unwire_from_lab(sandbox_lab, link="standin")  # the lab's routes to the stand-in go now, not later
    yield evidence


def test_sandboxed_process_runs_in_a_namespace_of_its_own(egress_evidence, network_verdict):
    network_verdict("egress", "netns-own", egress_evidence.namespace,
                    "compare /proc/self/ns/net inside the sandbox with the host's, the lab's and the one made for it "
                    "or its launcher was started in, and list its interfaces")


def test_sandboxed_process_cannot_enter_another_network_namespace(egress_evidence, network_verdict):
    network_verdict("egress", "netns-escape", egress_evidence.escape,
                    "setns(2) with CLONE_NEWNET into its own namespace and into every other one it can name "
                    "(/proc/<pid>/ns/net, /run/netns, its open fds)")


@pytest.mark.parametrize("target_id", TARGET_IDS)
def test_sandboxed_process_cannot_connect_directly(target_id, egress_evidence, network_verdict):
    if target_id not in egress_evidence.direct:
        pytest.skip(f"{target_id}: this host has no such loopback address to listen on")
    target, judgement = egress_evidence.direct[target_id]
    attempt = (f"a UDP datagram to ({target.address!r}, {target.port})" if target.transport == "udp"
               else f"connect(({target.address!r}, {target.port}))")
    network_verdict("egress", target_id, judgement, f"{attempt} from the sandbox ({target.what})")


def test_ordinary_networking_still_works_in_the_sandbox(egress_evidence, network_verdict):
    network_verdict("egress", egress_evidence.control_id, egress_evidence.control, egress_evidence.control_attempt)
