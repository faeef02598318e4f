"""SSRF refusals after the proxy was left alone: a proxy that refuses only while requests keep coming fails.

The last test of the session (the plugin runs this module last, after the modules that send nothing through
the proxy): five special-use destinations (metadata by literal, IPv6 and name, RFC 1918 private; absolute-form
and CONNECT), each also sent without the harness's marker, and two positive controls, sent once the lab has
carried no traffic for at least :data:`~pytest_sandbox.probes.after_quiet.MIN_QUIET_SECONDS` (about 4 s when
the whole suite runs; the quiet reached is in each verdict). A denial counts as in ``test_ssrf.py``: refused,
marked and unmarked, and no catch-all hit attributed to it; a control must reach its canary.

One test and one verdict for the whole set: which request ends the quiet (and so meets the hole) is whichever
denial arrives first, so the set is judged as one, where it was sent. Under xdist the
test runs on one worker, against that worker's lab and proxy instance. Runs only with ``--sandbox``. See
:mod:`pytest_sandbox.probes.after_quiet`.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.fixtures.after_quiet import quiet_watch
from pytest_sandbox.network.addresses import parse_authority
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.probes.after_quiet import CONTROLS, DENIALS, AfterQuietRun, run_after_quiet
from pytest_sandbox.probes.allowlist import allowlist_gaps
from pytest_sandbox.report.categories import CategoryNotRun


def _admitted(policy: Policy) -> None:
    """Not run when the allowlist refuses a destination of the set: its refusals would prove the allowlist."""
    gaps = allowlist_gaps(policy.network, [(a.host, a.port) for a in (parse_authority(attempt.case.authority)
                                                                     for attempt in (*DENIALS, *CONTROLS))])
    if gaps:
        raise CategoryNotRun(f"policy {policy.name} refuses {', '.join(gaps)} by its allowlist, which the "
                             "after-quiet exchanges send: their refusals would prove the allowlist alone")


@pytest.fixture(scope="module")
def after_quiet_run(request, sandbox_session, sandbox_lab, sandbox_proxy) -> AfterQuietRun:
    """Every exchange of the set, sent once after the quiet, as one campaign."""
    _admitted(sandbox_session.policy)
    return run_after_quiet(sandbox_lab, sandbox_proxy.connect, quiet_watch(request.config))


def test_special_use_destinations_are_refused_after_the_proxy_was_left_alone(after_quiet_run, network_verdict):
    network_verdict("ssrf", "after-quiet", after_quiet_run.judgement, after_quiet_run.attempted)
