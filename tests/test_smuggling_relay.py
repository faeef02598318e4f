"""Proof that no smuggling verdict can be earned by a proxy that refuses nothing.

Two deliberately broken targets, kept in ``tests/broken_proxies``:

* ``raw_relay.py``: a forward proxy that relays every byte to the host of the first request (or a
  lab origin) and checks nothing. Before the judge read the origin's raw bytes it earned 36 BLOCKED
  smuggling verdicts, because the lab origin's own parser (h11) refused the bytes with 400/501, the
  relay passed that answer on and the judge took it for the proxy's refusal.
* ``raw_interceptor.py``: the same inside the intercepted ``inference.local`` tunnel.

Both must now earn **0 BLOCKED**, and every denied case must fail as ALLOWED naming the case and
the bytes that reached the origin (or backend).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from broken_proxies.harness import (
    DENIED_CANARY,
    PUBLIC_ORIGIN,
    backend_config,
    judge_catalogue,
    private_backend,
    proxy_with_interceptor,
    quoted_prefix,
)
from broken_proxies.raw_interceptor import RawRelayInterceptor
from broken_proxies.raw_relay import destination

from pytest_sandbox.catalogues.smuggling import _SECOND_PASS_ROWS, SMUGGLING_CASES, case_by_id, render
from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.network.harness import interception_of
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.third_party import start_proxy_command
from pytest_sandbox.probes.smuggling import (
    ABSOLUTE,
    TUNNEL,
    tunnel_payload,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict

ROOT = Path(__file__).resolve().parent.parent
RELAY = Path(__file__).resolve().parent / "broken_proxies" / "raw_relay.py"
RELAY_COMMAND = f"{sys.executable} {RELAY} --port {{port}} --address {{address}}"
# The cases the raw relay earned BLOCKED with before the judge read the raw upstream bytes (the
# absolute path of ``pytest --sandbox --sandbox-proxy-cmd RELAY conformance/test_smuggling.py``).
FORMERLY_BLOCKED: tuple[str, ...] = (
    "te-xchunked", "te-chunked-twice", "te-chunked-with-parameter", "te-leading-comma", "te-identity",
    "te-gzip", "te-gzip-then-chunked", "te-quoted", "te-chunk", "te-kelvin-sign", "te-trailing-obs-text",
    "te-leading-nbsp", "te-vertical-tab", "te-form-feed", "cl-duplicate-different", "cl-malformed-plus-sign",
    "cl-malformed-negative", "cl-malformed-hex", "cl-malformed-underscore", "cl-malformed-empty", "bare-cr",
    "ws-before-colon", "host-missing", "host-duplicate", "target-control-character", "chunk-size-hex-prefix",
    "chunk-size-plus-sign", "chunk-size-negative", "chunk-size-underscore", "chunk-size-leading-space",
    "chunk-size-empty", "chunk-ext-bare-lf", "chunk-size-line-bare-lf", "chunk-size-line-bare-cr",
    "chunk-data-bad-terminator", "chunk-data-longer-than-size",
)
# The broken interceptor's own backend (see broken_proxies.harness).
RELAY_BACKEND_NAME = "relay-backend.inference.test"
RELAY_BACKEND_ADDRESS = "11.0.0.21"
RELAY_BACKEND_KEY = "route-key-relay-backend"
RELAY_PROXY_PORT = 3160


@pytest.fixture(scope="module")
def relay_absolute(_network_lab: NetworkLab) -> dict[str, Judgement]:
    running = start_proxy_command(_network_lab, RELAY_COMMAND)
    interception = interception_of(_network_lab)
    try:
        return judge_catalogue(running, _network_lab, interception.backend, interception.trust.cert_pem, ABSOLUTE)
    finally:
        running.stop()


@pytest.fixture(scope="module")
def relay_backend(_network_lab: NetworkLab) -> Iterator[FakeInferenceBackend]:
    with private_backend(_network_lab, RELAY_BACKEND_NAME, RELAY_BACKEND_ADDRESS, RELAY_BACKEND_KEY) as backend:
        yield backend


@pytest.fixture(scope="module")
def relay_tunnel(_network_lab: NetworkLab, relay_backend: FakeInferenceBackend) -> dict[str, Judgement]:
    trust = interception_of(_network_lab).trust
    handler = RawRelayInterceptor(trust.ca, backend_config(relay_backend), resolver=_network_lab.resolver(),
                                  socket_factory=_network_lab.socket, record=lambda decision: None)
    with proxy_with_interceptor(_network_lab, handler, RELAY_PROXY_PORT) as running:
        return judge_catalogue(running, _network_lab, relay_backend, trust.cert_pem, TUNNEL)


def _denied(judgements: dict[str, Judgement]) -> dict[str, Judgement]:
    return {case_id: j for case_id, j in judgements.items() if not case_by_id(case_id).is_positive_control}


# --- the raw relay, absolute-form -------------------------------------------------------------------


def test_raw_relay_earns_no_blocked_verdict_and_every_denied_case_is_allowed(relay_absolute) -> None:
    counts = Counter(j.verdict for j in relay_absolute.values())
    assert counts[Verdict.BLOCKED] == 0, {k: j.reason for k, j in relay_absolute.items()
                                          if j.verdict is Verdict.BLOCKED}
    not_allowed = {k: f"{j.verdict.value}: {j.reason}" for k, j in _denied(relay_absolute).items()
                   if j.verdict is not Verdict.ALLOWED}
    assert not_allowed == {}
    for case_id, judgement in relay_absolute.items():
        assert judgement.reason.startswith(f"{case_id}:"), judgement.reason


def test_raw_relay_failures_name_the_bytes_that_reached_the_origin(relay_absolute) -> None:
    for case_id in FORMERLY_BLOCKED:
        judgement = relay_absolute[case_id]
        payload = render(case_by_id(case_id), host=PUBLIC_ORIGIN, denied=DENIED_CANARY)
        assert judgement.verdict is Verdict.ALLOWED, (case_id, judgement.reason)
        assert f"reached {PUBLIC_ORIGIN}:80 connection" in judgement.reason, (case_id, judgement.reason)
        assert quoted_prefix(payload) in judgement.reason, (case_id, judgement.reason)
    kelvin = relay_absolute["te-kelvin-sign"].reason
    assert "non-ASCII Transfer-Encoding" in kelvin and r"chun\xe2\x84\xaaed" in kelvin


def test_raw_relay_still_serves_the_clean_single_connection_controls(relay_absolute) -> None:
    """It is a working relay: the controls that are plain keep-alive exchanges pass."""
    works = {k for k, j in relay_absolute.items() if j.verdict is Verdict.WORKS}
    assert works == {"pipeline-safe", "pipeline-safe-chunked-then-get", "te-uppercase-chunked",
                     "expect-100-continue-body-sent", "te-valid-tabprefix1", "te-valid-valueprefix1",
                     "te-valid-sarcasm", "te-valid-tabsuffix", "obs-text-header-value",
                     "hn-valid-uppercase-name", "hn-valid-no-space-after-colon", "rl-valid-http10",
                     "rl-valid-percent-crlf-stays-encoded",
                     *(case.case_id for case in _SECOND_PASS_ROWS if case.is_positive_control)}
    # The HTTP/1.0 control is no pass either: the relay sent the denied request behind it.
    http10 = relay_absolute["http10-keep-alive"]
    assert http10.verdict is Verdict.ALLOWED and "GET /secret" in http10.reason


# --- the raw interceptor, inside the tunnel ---------------------------------------------------------


def test_raw_interceptor_earns_no_blocked_verdict_in_the_tunnel(relay_tunnel) -> None:
    counts = Counter(j.verdict for j in relay_tunnel.values())
    assert counts[Verdict.BLOCKED] == 0, {k: j.reason for k, j in relay_tunnel.items() if j.verdict is Verdict.BLOCKED}
    not_allowed = {k: f"{j.verdict.value}: {j.reason}" for k, j in _denied(relay_tunnel).items()
                   if j.verdict is not Verdict.ALLOWED}
    assert not_allowed == {}


def test_raw_interceptor_failures_name_the_bytes_that_reached_the_backend(relay_tunnel) -> None:
    for case_id in FORMERLY_BLOCKED:
        judgement = relay_tunnel[case_id]
        payload = tunnel_payload(case_by_id(case_id))
        assert judgement.verdict is Verdict.ALLOWED, (case_id, judgement.reason)
        assert f"backend {RELAY_BACKEND_NAME} connection" in judgement.reason, (case_id, judgement.reason)
        # The request line as sent: the relay inserts its key only after it.
        assert quoted_prefix(payload, payload.index(b"\r\n")) in judgement.reason, (case_id, judgement.reason)


def test_raw_interceptor_serves_a_lone_routed_request(relay_tunnel) -> None:
    """Its ALLOWED verdicts are not artefacts of a dead relay: a lone routed request is answered by the
    backend. (Only the first request of a connection gets the key, so follow-ups get 401: BROKEN.)"""
    for case_id in ("te-uppercase-chunked", "expect-100-continue-body-sent"):
        judgement = relay_tunnel[case_id]
        assert judgement.observed.startswith("statuses [200 (origin)]"), judgement.observed
        assert judgement.verdict is Verdict.BROKEN and "follow-up request (401)" in judgement.reason


# --- end to end: pytest --sandbox --sandbox-proxy-cmd RELAY --------------------------------------


def test_conformance_run_with_the_raw_relay_has_no_blocked_smuggling_verdict(tmp_path: Path) -> None:
    report = tmp_path / "relay.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox", "--sandbox-proxy-cmd", RELAY_COMMAND,
         "--sandbox-report", str(report), str(ROOT / "conformance" / "test_smuggling.py"),
         "-p", "no:cacheprovider", "-q", "-p", "no:randomly"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    probes = {record["test"]: record for record in json.loads(report.read_text())["probes"]
              if record["category"] == "smuggling"}
    # The relay does not intercept inference.local and no --sandbox-proxy-ca is given: only the
    # absolute-form cases run; the tunnel ones are not run, failing the run with the reason (issue #9).
    assert len(probes) == len(SMUGGLING_CASES), output
    assert [test for test, record in probes.items() if record["verdict"] == "BLOCKED"] == []
    kelvin = probes["absolute-te-kelvin-sign"]
    assert kelvin["verdict"] == "ALLOWED"
    assert kelvin["reason"].startswith("te-kelvin-sign: bytes beyond the 0 allowed request(s) reached 11.0.0.10:80")
    assert r"Transfer-Encoding: chun\xe2\x84\xaaed" in kelvin["reason"]
    # The failure message pytest prints names the case and the bytes too.
    assert "te-kelvin-sign: bytes beyond the 0 allowed request(s) reached 11.0.0.10:80" in output
    # No tunnel through a relay that cannot intercept: never a pass either, but not run, naming the option.
    assert "tunnel-te-kelvin-sign" not in probes
    assert "not run: the proxy under test is a third party and --sandbox-proxy-ca was not given" in output, output


# --- the relay's own routing (pure) ------------------------------------------------------------------


@pytest.mark.parametrize("head, expected", [
    (b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n", ("10.0.0.1", 443, True)),
    (b"CONNECT [fd00:ec2::254]:443 HTTP/1.1\r\n", ("fd00:ec2::254", 443, True)),
    (b"GET http://11.0.0.10/ HTTP/1.1\r\n", ("11.0.0.10", 80, False)),
    (b"POST http://11.0.0.11:443/upload HTTP/1.1\r\n", ("11.0.0.11", 443, False)),
    (b"GET http://11.0.0.10@10.0.0.1/ HTTP/1.1\r\n", ("10.0.0.1", 80, False)),
    (b"GET / HTTP/1.1\r\n", ("11.0.0.10", 80, False)),
])
def test_relay_dials_the_first_requests_authority_or_its_default(head: bytes, expected: tuple[str, int, bool]) -> None:
    assert destination(head, ("11.0.0.10", 80)) == expected
