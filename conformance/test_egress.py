"""Egress conformance: a process sandboxed in proxy mode reaches nothing directly, only its proxy.

The process runs under the reference launcher in proxy mode (``sandbox_proxied``: its own network
namespace, the proxy on 127.0.0.1:3128 there). One probe run reports where it runs and tries every
target, over TCP and with a UDP datagram; the harness listens where a launcher that isolates nothing
would let it arrive (the host's loopback, the lab's catch-all and UDP sockets), so a broken launcher
cannot earn BLOCKED (see
:mod:`pytest_sandbox.probes.egress`). A direct attempt is BLOCKED only if it failed with an errno in
the namespace made for the process and nothing saw it; a timeout is INDETERMINATE. The positive
control: a request through the proxy's address reaches a lab origin. Runs only with ``--sandbox``.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.probes.egress import (
    DIRECT_TARGETS,
    HOST_LOOPBACK_ADDRESSES,
    TRANSPORTS,
    EgressEvidence,
    host_loopback_target_id,
    run_egress_probe,
)

# The lab, proxied-sandbox and verdict fixtures come from the plugin.

HOST_LOOPBACK = tuple(host_loopback_target_id(transport, address)
                      for transport in TRANSPORTS for address, _family in HOST_LOOPBACK_ADDRESSES)
TARGET_IDS = (*HOST_LOOPBACK, *(target.target_id for target in DIRECT_TARGETS))


@pytest.fixture(scope="module")
def egress_evidence(sandbox_session, sandbox_lab, _proxied_pool) -> EgressEvidence:
    """One probe run under the reference launcher in proxy mode (the session's policy), judged."""
    proxied = _proxied_pool.get(sandbox_session.policy)
    return run_egress_probe(proxied, sandbox_lab, proxied.holder.netns_id)


def test_sandboxed_process_runs_in_the_namespace_made_for_it(egress_evidence, network_verdict):
    network_verdict("egress", "netns-own", egress_evidence.namespace,
                    "compare /proc/self/ns/net inside the sandbox with the host's, the lab's and its own")


@pytest.mark.parametrize("target_id", TARGET_IDS)
def test_sandboxed_process_cannot_connect_directly(target_id, egress_evidence, network_verdict):
    if target_id not in egress_evidence.direct:
        pytest.skip(f"{target_id}: this host has no such loopback address to listen on")
    target, judgement = egress_evidence.direct[target_id]
    attempt = (f"a UDP datagram to ({target.address!r}, {target.port})" if target.transport == "udp"
               else f"connect(({target.address!r}, {target.port}))")
    network_verdict("egress", target_id, judgement, f"{attempt} from the sandbox ({target.what})")


def test_sandboxed_process_reaches_a_lab_origin_through_its_proxy(egress_evidence, network_verdict):
    network_verdict("egress", "proxy-control", egress_evidence.proxy_control,
                    "GET http://11.0.0.10/ through the proxy at 127.0.0.1:3128 in the sandbox's namespace")
