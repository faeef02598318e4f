"""Special-use destinations on every port the policy admits, not only the catalogue's port 80.

Every SSRF catalogue case is sent to port 80, CONNECT included. ``tests/broken_proxies/port_keyed.py`` is the
reference proxy except that on port 443 it dials a special-use address unclassified (a client's
``CONNECT 169.254.169.254:443`` goes through): before the port sweep it earned all 860 SSRF verdicts of the
conformance run (the run failed on one smuggling row that happens to use port 443). Now each other admitted
port gets one address of every special-use row, every metadata address, every name of the dns-name family and
two public controls, and that proxy must fail exactly those denials on 443 and nothing else.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from broken_proxies.port_keyed import COMMAND, UNCLASSIFIED_PORT
from ssrf_selection import failed_params

from pytest_sandbox.catalogues.ssrf_cases import (
    CASE_PORT,
    PORT_SWEEP_FORMS,
    SSRF_CASES,
    on_port,
    port_sweep_cases,
)
from pytest_sandbox.network.addresses import load_special_use_table
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.probes.ssrf import build_attempts

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
CASE_TEST = "test_special_use_destination_is_refused_and_public_one_is_reached"


def test_each_admitted_port_but_80_gets_every_special_use_row_every_metadata_address_and_two_controls():
    sweep = port_sweep_cases([80, 443, 443, 8443])
    assert {case.port for case in sweep} == {443, 8443}
    for port in (443, 8443):
        on_this_port = [case for case in sweep if case.port == port]
        rows = {case.source for case in on_this_port if case.position in ("inner", "only")}
        assert rows == {f"{row.label} ({row.cidr})" for row in load_special_use_table()}
        metadata = {case.target_host for case in on_this_port if case.position == "metadata"}
        assert metadata == {case.target_host for case in SSRF_CASES if case.position == "metadata"}
        names = {case.target_host for case in on_this_port if case.family == "dns-name"}
        assert names == {case.target_host for case in SSRF_CASES if case.family == "dns-name"}
        controls = [case for case in on_this_port if case.expected == "allowed"]
        assert [":" in case.target_host for case in controls] == [False, True]
        assert all(case.case_id.endswith(f"-port-{port}") and f", on port {port}" in case.note
                   for case in on_this_port)
    assert all(set(case.forms) <= set(PORT_SWEEP_FORMS) and case.forms for case in sweep)
    assert port_sweep_cases([CASE_PORT]) == ()


def test_a_swept_case_is_the_catalogue_case_with_only_its_port_changed():
    original = next(case for case in SSRF_CASES if case.position == "metadata")
    moved = on_port(original, 443)
    attempt = build_attempts([moved], forms=("connect", "absolute"))
    assert [a.target for a in attempt] == [f"{original.target_host}:443", f"http://{original.target_host}:443/"
                                           f"{original.suffix.removeprefix('/')}"]
    assert (moved.canary, moved.expected, moved.target_host) == (original.canary, original.expected,
                                                                 original.target_host)


def test_an_authority_written_out_is_not_moved_to_another_port():
    written = next(case for case in SSRF_CASES if case.raw_authority is not None)
    with pytest.raises(AssertionError, match="has its own port"):
        on_port(written, 443)


def _collected_ids(tmp_path: Path, ports: str) -> subprocess.CompletedProcess[str]:
    policy = tmp_path / "ports.toml"
    policy.write_text(textwrap.dedent(f"""\
        extends = "baseline"
        name = "ports"
        [network]
        mode = "proxy"
        allowed_hosts = ["*"]
        allowed_ports = [{ports}]
        """))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--collect-only", "--sandbox",
         f"--sandbox-policy={policy}", f"conformance/test_ssrf.py::{CASE_TEST}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_the_sweep_follows_the_enforced_policys_ports(tmp_path: Path):
    catalogue = {f"{form}-{case.case_id}" for case in SSRF_CASES for form in case.forms}
    collected = _collected_ids(tmp_path, "80, 8443")
    ids = set(re.findall(rf"{CASE_TEST}\[(.*)\]", collected.stdout))
    assert catalogue <= ids, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert len(ids - catalogue) == 2 * 82
    assert all(test_id.endswith("-port-8443") for test_id in ids - catalogue)
    only_80 = set(re.findall(rf"{CASE_TEST}\[(.*)\]", _collected_ids(tmp_path, "80").stdout))
    assert only_80 == catalogue


@needs_netns
def test_conformance_run_against_a_proxy_unclassified_on_443_fails_exactly_its_denials_there():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly", "-rf", "--sandbox",
         "--sandbox-proxy-cmd", COMMAND, str(ROOT / "conformance" / "test_ssrf.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    failed = failed_params(output)
    denials_on_443 = {attempt.test_id for attempt in build_attempts(port_sweep_cases([UNCLASSIFIED_PORT]),
                                                                    forms=PORT_SWEEP_FORMS)
                      if attempt.case.expected != "allowed"}
    assert len(denials_on_443) == 2 * 80
    assert failed == denials_on_443, output[-5000:]
    assert f"reached canary 169.254.169.254:{UNCLASSIFIED_PORT}" in output, output[-5000:]
