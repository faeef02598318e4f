"""The proxy's own address: no request may loop through the proxy (network.md §1.3), however it is spelled.

Every spelling of :mod:`pytest_sandbox.catalogues.self_cases` (dotted, IPv4-mapped in dotted, hex and
expanded form, the other IPv4-carrying IPv6 forms, DNS names with A and AAAA answers) is attempted as
CONNECT and as absolute-form against three targets:

* ``own``: the proxy under test where it listens (127.0.0.1 for the reference and for
  ``--sandbox-proxy-cmd``): loopback, so the address classifier already refuses;
* ``public``: a second instance started by the harness on the lab public address 11.0.0.20
  (``{address}`` in ``--sandbox-proxy-cmd``), with its own port allowed, where only a self check
  can refuse;
* ``wildcard``: an instance on 0.0.0.0, attempted at a local address of the lab and at one the
  harness adds only after the instance started.

A loop is seen in the lab's kernel socket table and, for CONNECT, by a nonce request sent inside the
tunnel reaching a lab origin: evidence no proxy log can hide (:mod:`pytest_sandbox.probes.self_loop`).
Late loops (after a case was judged) fail the module at teardown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from pytest_sandbox.network.harness import RunningProxy, lab_proxy_config, start_proxy
from pytest_sandbox.network.third_party import start_proxy_command
from pytest_sandbox.probes.self_loop import (
    SELF_CASES,
    SelfCase,
    SelfTarget,
    SelfTargets,
    describe_late_loops,
    run_instance_control,
    run_self_attempt,
    self_attempt,
    start_self_targets,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

# A proxy that answers first and dials itself later still leaves a socket behind for 60 s; one
# bounded wait at the end of the module catches it.
LATE_LOOP_GRACE_SECONDS = 0.3
NO_ADDRESS_PLACEHOLDER = (
    "the harness cannot start this proxy on a lab public address, where only a self check can refuse "
    "its own address: put {address} in --sandbox-proxy-cmd (e.g. 'CMD --host {address} --port {port}') "
    "so the harness can choose where it listens")
ATTACHED = ("the proxy given with --sandbox-proxy listens only where it was started; start it with "
            "--sandbox-proxy-cmd 'CMD --host {address} --port {port}' so the harness can choose a lab public address")


@pytest.fixture(scope="module")
def self_targets(sandbox_session, sandbox_lab, sandbox_proxy) -> Iterator[SelfTargets]:
    options = sandbox_session.options
    if isinstance(sandbox_proxy, RunningProxy):
        def start(address: str, port: int) -> RunningProxy:
            return start_proxy(sandbox_lab, lab_proxy_config(allowed_ports=(80, 443, port)),
                               address=address, port=port)
        starter, reason = start, ""
    elif options.proxy_cmd is not None and "{address}" in options.proxy_cmd:
        def start(address: str, port: int) -> RunningProxy:  # type: ignore[misc]
            return start_proxy_command(sandbox_lab, options.proxy_cmd, address=address, port=port)
        starter, reason = start, ""
    else:
        starter, reason = None, NO_ADDRESS_PLACEHOLDER if options.proxy_cmd is not None else ATTACHED
    targets = start_self_targets(sandbox_lab, sandbox_proxy, starter, no_instance_reason=reason)
    try:
        yield targets
        time.sleep(LATE_LOOP_GRACE_SECONDS)
        late = targets.ledger.sweep()
    finally:
        targets.stop()
    if late:
        pytest.fail(f"ALLOWED: the proxy connected to itself after answering: {describe_late_loops(late)}",
                    pytrace=False)


def _unavailable(reason: str) -> Judgement:
    return Judgement(Verdict.INDETERMINATE, reason, "the case attempted against the proxy under test",
                         "not attempted")


@pytest.mark.parametrize("case", SELF_CASES, ids=[c.test_id for c in SELF_CASES])
def test_proxy_never_connects_to_its_own_address(case: SelfCase, self_targets, sandbox_lab, network_verdict):
    target = self_targets.target(case)
    if not isinstance(target, SelfTarget):
        network_verdict("ssrf", case.test_id, _unavailable(target), f"{case.test_id} (not attempted)")
        return
    attempt = self_attempt(case, target.endpoint, target.instance)
    if attempt is None:
        pytest.skip(f"{case.spelling.spelling_id} has no form for {target.endpoint[0]}")
    judgement, _evidence = run_self_attempt(attempt, target, sandbox_lab, self_targets.ledger)
    network_verdict("ssrf", case.test_id, judgement, attempt.describe())


@pytest.mark.parametrize("kind", ["public", "wildcard"])
def test_instance_for_self_cases_is_a_working_proxy(kind: str, self_targets, sandbox_lab, network_verdict):
    case = next(c for c in SELF_CASES if c.kind == kind)
    test_id = f"ctl-proxy-self-{kind}-instance-forwards"
    target = self_targets.target(case)
    if not isinstance(target, SelfTarget):
        network_verdict("ssrf-controls", test_id, _unavailable(target), test_id)
        return
    judgement = run_instance_control(target, sandbox_lab, self_targets.ledger)
    network_verdict("ssrf-controls", test_id, judgement, f"an allowed request through {target.instance}")
