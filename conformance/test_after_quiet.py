"""SSRF refusals after the proxy was left alone: a proxy that refuses only while requests keep coming fails.

The last tests of the session (the plugin runs this module last, after the modules that send nothing through
the proxy): five special-use destinations (metadata by literal, IPv6 and name, RFC 1918 private; absolute-form
and CONNECT), each also sent without the harness's marker, and two positive controls, sent once the lab has
carried no traffic for at least :data:`~pytest_sandbox.probes.after_quiet.MIN_QUIET_SECONDS` (about 4 s when
the whole suite runs; the quiet reached is in each verdict). A denial counts as in ``test_ssrf.py``: refused,
marked and unmarked, and no catch-all hit attributed to it; a control must reach its canary.
Runs only with ``--sandbox``. See :mod:`pytest_sandbox.probes.after_quiet`.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.fixtures.after_quiet import quiet_watch
from pytest_sandbox.probes.after_quiet import CONTROLS, DENIALS, AfterQuietRun, after_quiet_key, run_after_quiet

ATTEMPTS = (*DENIALS, *CONTROLS)


@pytest.fixture(scope="module")
def after_quiet_run(request, sandbox_lab, sandbox_proxy) -> AfterQuietRun:
    """Every exchange of this module, sent once after the quiet, as one campaign."""
    return run_after_quiet(sandbox_lab, sandbox_proxy.connect, quiet_watch(request.config))


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=[after_quiet_key(a) for a in ATTEMPTS])
def test_special_use_destination_is_refused_after_the_proxy_was_left_alone(attempt, after_quiet_run,
                                                                          network_verdict):
    verdict = after_quiet_run.verdicts[after_quiet_key(attempt)]
    network_verdict(verdict.category, verdict.test_id, verdict.judgement, verdict.attempted)
