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
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.network.harness import BACKEND_ENV, ProxyCaError, external_trust
from pytest_sandbox.network.third_party import (
    BackendCaError,
    expand_command,
    load_backend_ca,
    main,
    reference_command,
    write_backend_ca,
)
from pytest_sandbox.session import SandboxOptions, check_options

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


# --- --sandbox-proxy URL: a proxy its user started, told about the backend before the session -------
#
# A proxy attached by URL is not started by pytest-sandbox, so nothing can be substituted into its
# command. The fake backend is fixed (11.0.0.20:443 in the lab, api.inference.test, the route key), and
# --sandbox-backend-ca hands in the CA that signs its certificate, so the user configures the proxy to
# trust it beforehand. The user's proxy is started inside the lab by a plugin of the user's own (``-p``):
# ``start_proxy_command`` runs a command in the lab's namespace, with the lab's DNS, stopped by PID.

USER_PLUGIN = '''
import pytest
from pytest_sandbox.network.third_party import start_proxy_command

COMMAND = {command!r}


@pytest.fixture(scope="session", autouse=True)
def users_own_proxy(sandbox_lab):
    running = start_proxy_command(sandbox_lab, COMMAND, port={port})
    try:
        yield
    finally:
        running.stop()
'''
USER_PROXY_PORT = 3300
FIXED_BACKEND = ("--backend", "11.0.0.20:443", "--backend-name", "api.inference.test",
                 "--backend-key", "route-key-lab-backend-only")


def users_proxy_command(ca_out: Path, trusted_backend_ca: Path) -> str:
    """The reference run as the user's own interceptor, every backend detail written in beforehand."""
    return shlex.join([sys.executable, "-m", "pytest_sandbox.network.third_party", "reference", "--host",
                       "127.0.0.1", "--port", "{port}", "--allow-port", "80", "--allow-port", "443",
                       "--intercept-ca-out", str(ca_out), *FIXED_BACKEND, "--backend-ca", str(trusted_backend_ca)])


def run_attached(tmp_path: Path, command: str, *options: str) -> tuple[subprocess.CompletedProcess[str],
                                                                        dict[str, Any]]:
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "users_proxy_plugin.py").write_text(USER_PLUGIN.format(command=command, port=USER_PROXY_PORT))
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox", str(ROOT / "conformance" / "test_inference.py"),
         str(ROOT / "conformance" / "test_smuggling.py"), "-k", "inference or tunnel", "-p", "users_proxy_plugin",
         "-p", "no:cacheprovider", "-p", "no:randomly", "-q", "--sandbox-report", str(report),
         "--sandbox-proxy", f"http://127.0.0.1:{USER_PROXY_PORT}", *options],
        cwd=ROOT, capture_output=True, text=True, timeout=570, check=False, env=env)
    scorecard = json.loads(report.read_text())["scorecard"] if report.exists() else {}
    return result, scorecard


@pytest.fixture(scope="module")
def backend_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_backend_ca(tmp_path_factory.mktemp("backend-ca"))


def test_a_proxy_attached_by_url_with_the_backend_ca_handed_in_passes_inference_and_tunnel_smuggling(
        tmp_path, backend_ca):
    both, cert = backend_ca
    proxy_ca = tmp_path / "users-proxy-ca.pem"
    result, scorecard = run_attached(tmp_path, users_proxy_command(proxy_ca, cert),
                                     "--sandbox-proxy-ca", str(proxy_ca), "--sandbox-backend-ca", str(both))
    output = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    for category in ("inference", "smuggling"):
        row = scorecard[category]
        assert row["status"] == "ran" and row["not_run"] == 0, (category, row)
        assert row["ALLOWED"] == row["INDETERMINATE"] == row["BROKEN"] == 0, (category, row)
        assert row["BLOCKED"] + row["WORKS"] == row["selected"] > 0, (category, row)
    # Routed requests crossed the user's interception to the backend (WORKS), tunnel cases ran through it.
    assert scorecard["inference"]["WORKS"] >= 5 and scorecard["smuggling"]["WORKS"] >= 5, scorecard
    assert "tunnel-" in result.stdout or scorecard["smuggling"]["selected"] >= 20, output
    assert b"BEGIN CERTIFICATE" in proxy_ca.read_bytes()  # the user's proxy wrote it, not the suite


def test_a_proxy_attached_by_url_judged_with_another_ca_fails_its_tunnel_tests(tmp_path, backend_ca):
    both, cert = backend_ca
    wrong = tmp_path / "other-ca.pem"
    wrong.write_bytes(trustme.CA().cert_pem.bytes())
    result, scorecard = run_attached(tmp_path, users_proxy_command(tmp_path / "real-ca.pem", cert),
                                     "--sandbox-proxy-ca", str(wrong), "--sandbox-backend-ca", str(both))
    assert result.returncode != 0
    assert scorecard["inference"]["WORKS"] == 0 and scorecard["smuggling"]["WORKS"] == 0, scorecard
    assert scorecard["inference"]["BLOCKED"] <= 2, scorecard  # only the CONNECTs to other ports, no tunnel
    assert "certificate verify failed" in result.stdout or "CERTIFICATE_VERIFY_FAILED" in result.stdout, \
        result.stdout[-3000:]


def test_a_proxy_that_trusts_another_backend_ca_than_the_one_handed_in_gets_no_routed_request_through(
        tmp_path, backend_ca):
    """The handoff is real: the backend serves a certificate signed by --sandbox-backend-ca, so a proxy told
    to trust any other CA cannot verify it and no routed request reaches the backend (never a pass)."""
    both, _cert = backend_ca
    other = tmp_path / "other-backend-ca.pem"
    other.write_bytes(trustme.CA().cert_pem.bytes())
    proxy_ca = tmp_path / "users-proxy-ca.pem"
    result, scorecard = run_attached(tmp_path, users_proxy_command(proxy_ca, other),
                                     "--sandbox-proxy-ca", str(proxy_ca), "--sandbox-backend-ca", str(both))
    assert result.returncode != 0
    row = scorecard["inference"]
    assert row["not_run"] == 0 and row["BLOCKED"] + row["WORKS"] < row["selected"], row
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert any("test_routed_chat_completion_reaches_backend" in line for line in failed), result.stdout[-3000:]


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read it"),
    ("cert-only", "expected one PEM certificate and its private key, found 1 certificate(s) and 0 key(s)"),
    ("leaf", "the certificate is not a CA"),
    ("mismatch", "the private key is not the certificate's"),
])
def test_a_bad_backend_ca_is_one_line_naming_the_option(tmp_path, content, message):
    ca, other = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("api.inference.test")
    path = tmp_path / "backend-ca.pem"
    data = {None: None, "cert-only": ca.cert_pem.bytes(),
            "leaf": leaf.cert_chain_pems[0].bytes() + leaf.private_key_pem.bytes(),
            "mismatch": ca.cert_pem.bytes() + other.private_key_pem.bytes()}[content]
    if data is not None:
        path.write_bytes(data)
    options = SandboxOptions(proxy_url="http://127.0.0.1:3300", backend_ca=str(path))
    with pytest.raises(PolicyError) as raised:
        check_options(options)
    assert str(raised.value).startswith(f"--sandbox-backend-ca {path}: ") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_backend_ca_without_a_third_party_proxy_is_a_usage_error(tmp_path, backend_ca):
    both, _cert = backend_ca
    with pytest.raises(PolicyError, match=r"--sandbox-backend-ca is for a third-party proxy's interception"):
        check_options(SandboxOptions(backend_ca=str(both)))
    check_options(SandboxOptions(proxy_url="http://127.0.0.1:3300", backend_ca=str(both)))  # the good pair
    # Interception certified by URL: the proxy cannot know the session's own backend CA, so one is required.
    with pytest.raises(PolicyError, match="--sandbox-proxy URL with --sandbox-proxy-ca needs --sandbox-backend-ca"):
        check_options(SandboxOptions(proxy_url="http://127.0.0.1:3300", proxy_ca=str(both)))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--sandbox", str(ROOT / "conformance" / "test_egress.py"), "-q",
         "-p", "no:cacheprovider", "--sandbox-backend-ca", str(both)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "--sandbox-backend-ca is for a third-party proxy" in result.stderr and "Traceback" not in result.stderr


def test_backend_ca_cli_writes_a_ca_the_loader_accepts_and_a_certificate_alone_for_the_proxy(tmp_path):
    assert main(["backend-ca", str(tmp_path / "out")]) == 0
    both, cert = tmp_path / "out" / "backend-ca.pem", tmp_path / "out" / "backend-ca-cert.pem"
    assert (both.stat().st_mode & 0o777) == 0o600 and b"PRIVATE KEY" not in cert.read_bytes()
    ca = load_backend_ca(both)
    assert ca.cert_pem.bytes() == cert.read_bytes()
    with pytest.raises(BackendCaError, match=r"missing\.pem: cannot read it"):
        load_backend_ca(tmp_path / "missing.pem")
