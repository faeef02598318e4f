"""Special-use destinations requested with every method a client sends to an origin, and as HTTP/1.0.

The request forms send GET, CONNECT and OPTIONS only, as HTTP/1.1. ``tests/broken_proxies/method_keyed.py`` has
the reference proxy with a special-use destination dialled unclassified for any other method (``method``) or
for HTTP/1.0 (``version``): before the ``request-line`` family each earned every SSRF verdict of the conformance
run, while a client's ``PUT http://169.254.169.254/latest/api/token`` (the IMDSv2 token request) or ``CONNECT
... HTTP/1.0`` (Python's http.client opens its tunnels so) went through. Each must now fail exactly the family's
denials it leaks, and the reference pass them all and their controls.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from broken_proxies.method_keyed import CLASSIFIED_METHODS, command
from ssrf_selection import failed_params

from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES, SWEPT_METHODS
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.probes.ssrf import ALL_FORMS, build_attempts

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
LINE_CASES = [case for case in SSRF_CASES if case.method or case.http_version != "1.1"]  # denials and controls
LINE_ATTEMPTS = build_attempts(LINE_CASES, forms=ALL_FORMS)


def test_each_swept_request_line_has_its_denials_and_a_control_of_its_own():
    assert not set(SWEPT_METHODS) & CLASSIFIED_METHODS
    lines = {(case.method, case.http_version) for case in LINE_CASES}
    assert lines == {*((method, "1.1") for method in SWEPT_METHODS), ("", "1.0")}
    for method, version in lines:
        cases = [case for case in LINE_CASES if (case.method, case.http_version) == (method, version)]
        assert [case.expected for case in cases].count("allowed") == 1
        assert {case.canary for case in cases if case.expected == "denied"} >= {"169.254.169.254", "127.0.0.1"}
        assert all(case.forms == (("absolute",) if method else ("connect", "absolute")) for case in cases)


def test_the_request_says_its_method_and_version_and_a_body_method_says_its_empty_body():
    attempts = {attempt.test_id: attempt for attempt in LINE_ATTEMPTS}
    token = attempts["absolute-method-put-meta-imds-169.254.169.254"].request_bytes("n", marked=False)
    assert token.startswith(b"PUT http://169.254.169.254:80/n/latest/api/token HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 0\r\n" in token
    delete = attempts["absolute-method-delete-name-localhost"].request_bytes(None, marked=False)
    assert delete.startswith(b"DELETE http://localhost:80/ HTTP/1.1\r\n") and b"Content-Length" not in delete
    old = attempts["absolute-http10-v4-private-10-inner-10.0.0.1"].request_bytes(None, marked=False)
    assert old.startswith(b"GET http://10.0.0.1:80/ HTTP/1.0\r\n")
    tunnel = attempts["connect-http10-meta-imds-169.254.169.254"].request_bytes(None, marked=False)
    assert tunnel.startswith(b"CONNECT 169.254.169.254:80 HTTP/1.0\r\n")


LEAKED_BY = {  # the request-line family's denials each fake dials unclassified
    "method": lambda attempt: attempt.method not in CLASSIFIED_METHODS,
    "version": lambda attempt: attempt.case.http_version != "1.1",
}


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
@pytest.mark.parametrize("keyed_on", sorted(LEAKED_BY))
def test_conformance_run_against_a_proxy_keyed_on_the_request_line_fails_exactly_what_it_leaks(keyed_on: str):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly", "-rf", "--sandbox",
         "--sandbox-proxy-cmd", command(keyed_on), str(ROOT / "conformance" / "test_ssrf.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    failed = failed_params(output)
    leaked = {attempt.test_id for attempt in LINE_ATTEMPTS
              if attempt.case.expected == "denied" and LEAKED_BY[keyed_on](attempt)}
    assert len(leaked) == {"method": 20, "version": 10}[keyed_on]
    assert failed == leaked, output[-5000:]
    assert "reached canary 169.254.169.254:80" in output, output[-5000:]
