"""A third-party interceptor certified end to end: the reference proxy, run as a separate process with a CA
of its own, through ``--sandbox-proxy-cmd`` + ``--sandbox-proxy-ca``.

The proxy command is handed the lab's fake inference backend (``{backend}`` and the
``PYTEST_SANDBOX_BACKEND*`` variables), writes its own interception CA where the test says, and the
suite trusts exactly that CA. It must pass every network category. The same proxy judged with
another CA fails the tunnel tests (the CA option is really what the suite trusts), and without
``--sandbox-proxy-ca`` those tests are not run, with a reason naming the option (fail closed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme

from pytest_sandbox.network.harness import BACKEND_ENV, ProxyCaError, external_trust
from pytest_sandbox.network.third_party import expand_command, main, reference_command

ROOT = Path(__file__).resolve().parent.parent
NETWORK_FILES = ("test_ssrf.py", "test_egress.py", "test_allowlist.py", "test_inference.py", "test_smuggling.py")
NETWORK_CATEGORIES = ("ssrf", "ssrf-controls", "egress", "allowlist", "inference", "smuggling")


def run_suite(tmp_path: Path, files: tuple[str, ...], *options: str) -> tuple[subprocess.CompletedProcess[str],
                                                                               dict[str, Any]]:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox", *(str(ROOT / "conformance" / name) for name in files),
         "-p", "no:cacheprovider", "-p", "no:randomly", "-q", "--sandbox-report", str(report), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=570, check=False)
    scorecard = json.loads(report.read_text())["scorecard"] if report.exists() else {}
    return result, scorecard


@pytest.fixture(scope="module")
def reference_interceptor_run(tmp_path_factory: pytest.TempPathFactory
                              ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    directory = tmp_path_factory.mktemp("reference-interceptor")
    ca_file = directory / "proxy-ca" / "ca.pem"
    result, scorecard = run_suite(directory, NETWORK_FILES, "--sandbox-proxy-cmd",
                                  reference_command(intercept_ca_out=ca_file), "--sandbox-proxy-ca", str(ca_file))
    return result, scorecard, ca_file


def test_reference_run_as_a_separate_interceptor_passes_every_network_category(reference_interceptor_run):
    result, scorecard, ca_file = reference_interceptor_run
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    for category in NETWORK_CATEGORIES:
        row = scorecard[category]
        assert row["status"] == "ran" and row["not_run"] == 0, (category, row)
        assert row["ALLOWED"] == row["INDETERMINATE"] == row["BROKEN"] == 0, (category, row)
        assert row["BLOCKED"] + row["WORKS"] == row["selected"] > 0, (category, row)
    # The routed requests and the tunnel smuggling cases really went through its interception.
    assert scorecard["inference"]["WORKS"] >= 5 and scorecard["smuggling"]["WORKS"] >= 5, scorecard
    assert b"BEGIN CERTIFICATE" in ca_file.read_bytes()  # written by the proxy process, not by the suite


def test_a_ca_other_than_the_interceptors_fails_its_tunnel_tests(tmp_path):
    """The broken setup: the suite told to trust a CA the proxy does not intercept with. Nothing inside
    the tunnel can then be shown, so the tunnel tests fail (never a pass)."""
    wrong = tmp_path / "other-ca.pem"
    wrong.write_bytes(trustme.CA().cert_pem.bytes())
    command = reference_command(intercept_ca_out=tmp_path / "real-ca.pem")
    result, scorecard = run_suite(tmp_path, ("test_inference.py",), "--sandbox-proxy-cmd", command,
                                  "--sandbox-proxy-ca", str(wrong))
    assert result.returncode != 0
    row = scorecard["inference"]
    assert row["BLOCKED"] + row["WORKS"] <= 2, row  # only the two CONNECTs to other ports, no tunnel
    assert "CERTIFICATE_VERIFY_FAILED" in result.stdout or "certificate verify failed" in result.stdout, \
        result.stdout[-3000:]


def test_without_the_proxy_ca_the_tunnel_tests_are_not_run_and_the_reason_names_the_option(tmp_path):
    command = reference_command(intercept_ca_out=tmp_path / "ca.pem")
    result, scorecard = run_suite(tmp_path, ("test_inference.py", "test_smuggling.py"), "--sandbox-proxy-cmd",
                                  command, "-k", "inference or tunnel or absolute-cl0-then-denied")
    assert result.returncode != 0
    inference, smuggling = scorecard["inference"], scorecard["smuggling"]
    assert inference["not_run"] == inference["selected"] - 2 > 0, inference
    assert inference["WORKS"] == 0 and smuggling["WORKS"] == 0, (inference, smuggling)
    assert smuggling["not_run"] == smuggling["selected"] - 1 > 0, smuggling  # the absolute-form case still ran
    for row in (inference, smuggling):
        assert "--sandbox-proxy-ca" in row["reason"], row


def test_proxy_ca_without_a_third_party_proxy_is_a_usage_error(tmp_path):
    result, _ = run_suite(tmp_path, ("test_egress.py",), "--sandbox-proxy-ca", str(tmp_path / "ca.pem"))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "--sandbox-proxy-ca is the CA of a third-party proxy" in result.stderr
    assert "Traceback" not in result.stderr


def test_external_trust_keeps_certificates_only_and_names_a_bad_file(tmp_path):
    ca = trustme.CA()
    combined = tmp_path / "combined.pem"
    combined.write_bytes(ca.private_key_pem.bytes() + ca.cert_pem.bytes())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    trust = external_trust(combined, bundle)
    assert trust.ca is None and trust.cert_pem.strip() == ca.cert_pem.bytes().strip()
    assert b"PRIVATE KEY" not in trust.bundle_path.read_bytes()
    assert trust.env["SSL_CERT_FILE"] == str(trust.bundle_path)
    with pytest.raises(ProxyCaError, match=r"missing\.pem: cannot read it"):
        external_trust(tmp_path / "missing.pem", bundle)
    (tmp_path / "key.pem").write_bytes(ca.private_key_pem.bytes())
    with pytest.raises(ProxyCaError, match="no PEM certificate"):
        external_trust(tmp_path / "key.pem", bundle)


def test_backend_placeholders_are_substituted_quoted():
    placeholders = {"{backend}": "11.0.0.20:443", "{backend_ca}": "/tmp/a dir/ca.pem"}
    expanded = expand_command("proxy --port {port} --on {address} --to {backend} --ca {backend_ca} {other}",
                              3200, "127.0.0.1", placeholders)
    assert expanded == "proxy --port 3200 --on 127.0.0.1 --to 11.0.0.20:443 --ca '/tmp/a dir/ca.pem' {other}"
    assert BACKEND_ENV[0] == "PYTEST_SANDBOX_BACKEND"


def test_reference_interception_without_a_backend_is_refused_in_one_line(capsys, monkeypatch):
    for name in BACKEND_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        main(["reference", "--host", "127.0.0.1", "--port", "3200", "--intercept-ca-out", "/tmp/x.pem"])
    assert "--intercept-ca-out needs --backend, --backend-name, --backend-ca, --backend-key" in capsys.readouterr().err
