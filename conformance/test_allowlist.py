"""Allowlist conformance: the proxy enforces the policy's ``allowed_hosts`` and ``allowed_ports``.

One ``CONNECT`` per probe of :func:`~pytest_sandbox.probes.allowlist.allowlist_probes`, ids like
``connect-11.0.0.10-8080``: a lab public origin (outside every special-use range) on every port the
enforced policy (``--sandbox-policy``) allows, every port the baseline allows (one the policy dropped
must now be refused) and ports policies commonly leave out; and every lab origin by address and by
name. Every destination is observed whatever the proxy answers: ports 80 and 443 are lab origins, every other
port reaches the lab's catch-all. What the policy admits must be reached, anything else refused before any
dial. Runs only with ``--sandbox``.

The probes of every selected test run as one campaign on first use (:func:`allowlist_results`), in rounds
(:func:`~pytest_sandbox.probes.allowlist_campaign.run_allowlist_campaign`, rounds from
:func:`~pytest_sandbox.probes.allowlist.allowlist_rounds`): within a round the probes' endpoints are pairwise
disjoint, and the admitted probes' rounds come first. After a round with a refusal in it, the grace period
(:data:`~pytest_sandbox.probes.campaign.GRACE_SECONDS`) passes before what arrived is counted, so a proxy that
refuses and dials afterwards fails that probe; a dial later than that is counted for every refused probe of its
endpoint in an earlier round (:func:`~pytest_sandbox.probes.allowlist.arrival_owners`), and one after the
campaign reaches the catch-all, which the session-end audit reports (the run fails). A late dial is never
dropped: the listeners are the lab's own, not the module's.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.fixtures.conformance import enforced_policy, selected_params
from pytest_sandbox.fixtures.network import VerdictCheck
from pytest_sandbox.network.harness import RunningProxy
from pytest_sandbox.network.lab.lab import LAB_PUBLIC_ORIGINS, NetworkLab
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.probes.allowlist import allowlist_probes
from pytest_sandbox.probes.allowlist_campaign import CATEGORY, ProbeResult, run_allowlist_campaign
from pytest_sandbox.report.categories import CategoryNotRun
from pytest_sandbox.session import SandboxSession
from pytest_sandbox.verdicts.allowlist import AllowlistProbe, judge_allowlist_probe


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "allowlist_probe" in metafunc.fixturenames:
        probes = allowlist_probes(enforced_policy(metafunc.config).network, LAB_PUBLIC_ORIGINS,
                                  baseline_policy().network.allowed_ports)
        metafunc.parametrize("allowlist_probe", probes, ids=[probe.test_id for probe in probes])


@pytest.fixture
def allowlist_has_a_control(sandbox_session: SandboxSession) -> None:
    """Without one admitted destination in the lab, a refusal cannot be told from a blanket one."""
    policy = sandbox_session.policy
    if not any(probe.admitted for probe in allowlist_probes(policy.network, LAB_PUBLIC_ORIGINS)):
        raise CategoryNotRun(f"policy {policy.name} admits none of the lab's public origins (hosts "
                             f"{list(policy.network.allowed_hosts)}, ports {list(policy.network.allowed_ports)}), "
                             "so no allowlist refusal can be told from a blanket one")


@pytest.fixture(scope="module")
def allowlist_results(request: pytest.FixtureRequest, sandbox_lab: NetworkLab,
                      sandbox_proxy: RunningProxy) -> dict[str, ProbeResult]:
    """Every selected probe of this module, run as one campaign: test id -> result."""
    probes = {probe.test_id: probe for probe in selected_params(request, "allowlist_probe")}
    return run_allowlist_campaign(sandbox_lab, sandbox_proxy, list(probes.values()))


def test_proxy_reaches_what_the_policy_allows_and_refuses_the_rest_before_dialling(
        allowlist_probe: AllowlistProbe, allowlist_has_a_control: None, sandbox_lab: NetworkLab,
        sandbox_proxy: RunningProxy, allowlist_results: dict[str, ProbeResult],
        network_verdict: VerdictCheck) -> None:
    result = allowlist_results.get(allowlist_probe.test_id)
    if result is None:  # not in the campaign (selected after it ran): a campaign of its own
        result = run_allowlist_campaign(sandbox_lab, sandbox_proxy, [allowlist_probe])[allowlist_probe.test_id]
    judgement = judge_allowlist_probe(allowlist_probe, result.status, result.dialled, result.late)
    network_verdict(CATEGORY, allowlist_probe.test_id, judgement,
                    f"CONNECT {allowlist_probe.authority} "
                    f"({'admitted' if allowlist_probe.admitted else 'not admitted'} by the policy)")
