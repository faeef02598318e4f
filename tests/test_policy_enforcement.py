"""The policy's network section drives the proxy, the interceptor and the judges (issue #8 item 6).

A policy that keeps only ``POST /v1/chat/completions`` of the baseline's routes (so drops
``GET /v1/models`` and five more) and adds ``POST /v1/files`` or narrows the allowlist is
enforced by the reference proxy and judged by the suite; the stale proxy of ``tests/broken_proxies/stale_defaults.py``
(built-in defaults, whatever the policy says) fails exactly the changed routes and ports. Where the
allowlist leaves a category nothing to prove (the SSRF controls' public origin refused), the
category does not run and says why. The bundled baseline is the one source of every default.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from broken_proxies.stale_defaults import STALE_PROXY_CONFTEST

from pytest_sandbox.errors import PolicyError
from pytest_sandbox.inference.interceptor import InferenceBackendConfig
from pytest_sandbox.inference.routes import InferenceRoute, RouteProbe, route_probes
from pytest_sandbox.network.harness import lab_proxy_config
from pytest_sandbox.network.proxy.config import ProxyConfig
from pytest_sandbox.policy.load import baseline_policy, baseline_routes, load_policy
from pytest_sandbox.policy.model import NetworkPolicy, Policy
from pytest_sandbox.probes.allowlist import allowlist_gaps, allowlist_probes, suite_destinations
from pytest_sandbox.verdicts.allowlist import AllowlistProbe, judge_allowlist_probe
from pytest_sandbox.verdicts.judgement import Verdict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def pytester_imports_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester's subprocesses run elsewhere, where an editable install may point at another checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
ORIGINS = ("11.0.0.10", "11.0.0.11", "2600:9000::10")

DROP_MODELS = """
name = "drop-models"
extends = "baseline"

[inference]
routes = [
    { method = "POST", path = "/v1/chat/completions" },
    { method = "POST", path = "/v1/files" },
]
"""
NARROW_ALLOWLIST = """
name = "narrow-allowlist"
extends = "baseline"

[network]
allowed_hosts = ["11.0.0.10", "public-origin.lab.test"]
allowed_ports = [443, 8080]
"""


def write_policy(directory: Path, text: str) -> Path:
    path = directory / "policy.toml"
    path.write_text(text)
    return path


# --- one source of truth: the baseline -------------------------------------------------------


def test_every_network_and_inference_default_is_the_bundled_baselines() -> None:
    baseline = baseline_policy()
    assert baseline_routes() == baseline.inference_routes and len(baseline_routes()) == 7
    assert replace(NetworkPolicy(), socket_domains=baseline.network.socket_domains) == baseline.network
    defaults = ProxyConfig()
    assert (defaults.allowed_hosts, defaults.allowed_ports) == (baseline.network.allowed_hosts,
                                                                baseline.network.allowed_ports)
    backend = InferenceBackendConfig(host="h", port=443, api_key="k", server_hostname="h", ca_pem=b"x")
    assert backend.routes == baseline.inference_routes


def test_a_policy_without_extends_takes_the_baselines_allowlist_and_routes_but_states_its_own_domains(
        tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, '[seccomp]\ndeny = ["ptrace"]\n'))
    baseline = baseline_policy()
    assert policy.inference_routes == baseline.inference_routes
    assert (policy.network.mode, policy.network.allowed_hosts, policy.network.allowed_ports) == (
        baseline.network.mode, baseline.network.allowed_hosts, baseline.network.allowed_ports)
    assert policy.network.socket_domains == ()
    assert load_policy(ROOT / "fixtures/oci/docker-like-default.json").inference_routes == baseline.inference_routes


def test_routes_replace_the_parents_and_an_empty_list_routes_nothing(tmp_path: Path) -> None:
    dropped = load_policy(write_policy(tmp_path, DROP_MODELS))
    assert dropped.inference_routes == (InferenceRoute("POST", "/v1/chat/completions"),
                                        InferenceRoute("POST", "/v1/files"))
    nothing = write_policy(tmp_path, 'extends = "baseline"\n[inference]\nroutes = []\n')
    assert load_policy(nothing).inference_routes == ()


@pytest.mark.parametrize("path", ["/v1/chat%2Fcompletions", "/v1//models", "/v1/../admin", "/v1/models/"])
def test_a_route_the_matcher_could_never_match_is_a_policy_error_naming_the_field(tmp_path: Path, path: str) -> None:
    text = f'[[inference.routes]]\nmethod = "GET"\npath = "{path}"\n'
    with pytest.raises(PolicyError, match=r"inference\.routes\[0\]\.path: .*unmatchable segment"):
        load_policy(write_policy(tmp_path, text))


def test_the_proxy_config_is_the_policys_allowlist(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, NARROW_ALLOWLIST))
    config = lab_proxy_config(policy)
    assert (config.allowed_hosts, config.allowed_ports) == (("11.0.0.10", "public-origin.lab.test"), (443, 8080))
    assert config.connect_timeout == 2.0  # the lab's short timeouts still apply
    assert lab_proxy_config().allowed_ports == baseline_policy().network.allowed_ports


# --- the judges (pure) ----------------------------------------------------------------------


def test_route_probes_cover_the_policys_routes_the_dropped_baseline_routes_and_non_routes(tmp_path: Path) -> None:
    dropped = load_policy(write_policy(tmp_path, DROP_MODELS))
    probes = {(p.method, p.path): p.routed for p in route_probes(dropped.inference_routes, baseline_routes())}
    assert probes[("POST", "/v1/chat/completions")] and probes[("POST", "/v1/files")]
    assert probes[("GET", "/v1/models")] is False and probes[("GET", "/v1/models/fake-model")] is False
    assert probes[("GET", "/admin")] is False
    assert RouteProbe("GET", "/v1/models", False).test_id == "route-GET-/v1/models"


def test_allowlist_probes_decide_by_the_policy_and_probe_the_ports_it_dropped(tmp_path: Path) -> None:
    narrow = load_policy(write_policy(tmp_path, NARROW_ALLOWLIST)).network
    probes = {(p.host, p.port): p.admitted for p in allowlist_probes(narrow, ORIGINS, (80, 443))}
    assert probes[("11.0.0.10", 80)] is False and probes[("11.0.0.10", 8080)] is True
    assert probes[("11.0.0.10", 22)] is False
    assert probes[("11.0.0.11", 443)] is False and probes[("public-origin.lab.test", 443)] is True
    assert probes[("2600:9000::10", 443)] is False


@pytest.mark.parametrize(("admitted", "status", "dialled", "verdict"), [
    (True, 200, 1, Verdict.WORKS),
    (True, 403, 0, Verdict.BROKEN),
    (False, 403, 0, Verdict.BLOCKED),
    (False, 403, 1, Verdict.ALLOWED),  # refused, then dialled anyway
    (False, 200, 1, Verdict.ALLOWED),
    (False, 502, 0, Verdict.INDETERMINATE),
    (False, None, 0, Verdict.INDETERMINATE),
])
def test_allowlist_judge(admitted: bool, status: int | None, dialled: int, verdict: Verdict) -> None:
    judgement = judge_allowlist_probe(AllowlistProbe("11.0.0.10", 8080, admitted), status, dialled)
    assert judgement.verdict is verdict
    assert "11.0.0.10:8080" in judgement.reason


def test_what_the_suites_send_must_be_admitted(tmp_path: Path) -> None:
    narrow = load_policy(write_policy(tmp_path, NARROW_ALLOWLIST)).network
    assert suite_destinations("ssrf", "conformance/test_ssrf.py::t[x]") == (("11.0.0.10", 80),)
    assert suite_destinations("smuggling", "conformance/test_smuggling.py::t[absolute-cl-te]") == (
        ("11.0.0.10", 80), ("10.0.0.1", 80))
    assert suite_destinations("smuggling", "conformance/test_smuggling.py::t[tunnel-cl-te]") is None
    assert suite_destinations("inference", "conformance/test_inference.py::t") is None
    assert allowlist_gaps(narrow, [("11.0.0.10", 80), ("11.0.0.10", 443)]) == ["11.0.0.10:80"]
    assert allowlist_gaps(baseline_policy().network, [("169.254.169.254", 80), ("x.lab.test", 443)]) == []


# --- the suite against the reference and against the stale proxy ---------------------------------


def run_suite(pytester: pytest.Pytester, modules: str, policy: Path, *args: str,
              stale: bool = False) -> pytest.RunResult:
    """Copy the conformance ``modules`` (space-separated) into a fresh ``conformance/`` and run them."""
    (pytester.path / "conformance").mkdir(exist_ok=True)
    for module in modules.split():
        (pytester.path / "conformance" / module).write_text((ROOT / "conformance" / module).read_text())
    if stale:
        pytester.makeconftest(STALE_PROXY_CONFTEST.format(tests=str(ROOT / "tests")))
    return pytester.runpytest_subprocess("--sandbox", f"--sandbox-policy={policy}", "-p", "no:cacheprovider",
                                         "-p", "no:benchmark", *(f"conformance/{m}" for m in modules.split()), *args)


def failed_ids(result: pytest.RunResult) -> set[str]:
    """The parameter id (or the function name) of every FAILED line, read from the node id alone: the
    message after it may hold brackets too, and is cut or not depending on the terminal's width."""
    node_ids = [line.split()[1] for line in result.stdout.lines if line.startswith("FAILED ")]
    return {node_id.split("[", 1)[1].rsplit("]", 1)[0] if "[" in node_id else node_id.split("::")[-1]
            for node_id in node_ids}


def test_a_dropped_route_is_refused_by_the_proxy_and_judged_by_the_suite(pytester: pytest.Pytester,
                                                                        tmp_path: Path) -> None:
    policy = write_policy(tmp_path, DROP_MODELS)
    report = tmp_path / "report.json"
    result = run_suite(pytester, "test_inference.py", policy, f"--sandbox-report={report}")
    assert result.ret == 0, result.stdout.str()[-3000:]
    verdicts = {p["test"]: p["verdict"] for p in json.loads(report.read_text())["probes"]}
    assert verdicts["route-GET-/v1/models"] == "BLOCKED"
    assert verdicts["route-GET-/v1/models/fake-model"] == "BLOCKED"
    assert verdicts["route-POST-/v1/files"] == "WORKS"
    assert verdicts["backend-record"] == "BLOCKED"


def test_a_proxy_keeping_the_default_routes_fails_the_suite_on_exactly_the_changed_routes(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, DROP_MODELS)
    result = run_suite(pytester, "test_inference.py", policy, "-rf", stale=True)
    assert result.ret == 1
    dropped = {f"route-{r.method}-{r.example()}" for r in baseline_routes()} - {"route-POST-/v1/chat/completions"}
    assert len(dropped) == 6
    # The added route is also sent as HTTP/1.0, chunked and with Expect: 100-continue (route_probes: every extra
    # request is, and every one with a body), and refused each way too.
    added = {f"route-{line}POST-/v1/files" for line in ("", "http10-", "chunked-", "expect-continue-")}
    assert failed_ids(result) == {*dropped, *added,
                                  "test_backend_record_holds_only_inference_routes_with_the_route_key"}
    output = result.stdout.str()
    assert "GET /v1/models is no route of the policy, yet it reached the backend" in output
    assert "POST /v1/files is a route of the policy but was not forwarded as routed" in output
    # The backend record names its first five strays in arrival order, and the refusals drawn for a bare twin run
    # last, so which dropped routes lead changes from run to run: every one named must be a dropped route's request.
    strays = re.search(r"requests that must never reach the backend did: \[(.*?)\]", output)
    assert strays, output[-3000:]
    named = re.findall(r"'(\w+) ([^'?]*)", strays.group(1))
    assert named and {f"route-{method}-{path}" for method, path in named} <= dropped, strays.group(1)
    assert "POST /v1/completions is no route of the policy, yet it reached the backend" in output


def test_an_added_route_is_forwarded_and_every_backend_record_is_judged_by_the_policys_routes(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    routes = [*((r.method, r.path) for r in baseline_routes()), ("POST", "/v1/files")]
    policy = write_policy(tmp_path, 'name = "add-files"\nextends = "baseline"\n[inference]\nroutes = [\n' + "".join(
        f'  {{ method = "{method}", path = "{path}" }},\n' for method, path in routes) + "]\n")
    report = tmp_path / "report.json"
    result = run_suite(pytester, "test_inference.py test_smuggling.py", policy, "-k",
                       "route_table or backend_record or pipeline-safe", f"--sandbox-report={report}")
    assert result.ret == 0, result.stdout.str()[-3000:]
    verdicts = {p["test"]: p["verdict"] for p in json.loads(report.read_text())["probes"]}
    assert verdicts["route-POST-/v1/files"] == "WORKS"  # and it is in the backend's log when these are judged:
    assert verdicts["backend-record"] == verdicts["tunnel-backend-record"] == "BLOCKED"


def test_tunnel_smuggling_under_a_policy_that_does_not_route_its_requests_does_not_run_and_says_why(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, DROP_MODELS)
    report = tmp_path / "report.json"
    result = run_suite(pytester, "test_smuggling.py", policy, "-k", "pipeline-safe or backend_record",
                       f"--sandbox-report={report}")
    assert result.ret == 1
    smuggling = json.loads(report.read_text())["scorecard"]["smuggling"]
    assert (smuggling["status"], smuggling["selected"], smuggling["not_run"]) == ("ran", 5, 3)
    assert smuggling["reason"].startswith("policy drop-models does not route GET /v1/models, which the smuggling "
                                          "tunnel cases send")


def test_the_stale_proxy_is_indistinguishable_under_the_baseline(pytester: pytest.Pytester) -> None:
    """The difference is the policy alone: with the defaults in force the stale proxy passes."""
    result = run_suite(pytester, "test_inference.py", ROOT / "pytest_sandbox/policy/bundled/baseline.toml", stale=True)
    assert result.ret == 0, result.stdout.str()[-3000:]


def test_a_narrowed_allowlist_is_enforced_and_a_proxy_with_the_default_allowlist_fails_it(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, NARROW_ALLOWLIST)
    good = run_suite(pytester, "test_allowlist.py", policy, "-rf")
    assert good.ret == 0, good.stdout.str()[-3000:]
    stale = run_suite(pytester, "test_allowlist.py", policy, "-rf", stale=True)
    assert stale.ret == 1
    assert failed_ids(stale) == {"connect-11.0.0.10-80", "connect-11.0.0.10-8080", "connect-11.0.0.11-443",
                                 "connect-2600:9000::10-443"}
    output = stale.stdout.str()
    assert "11.0.0.10:80 is outside the policy's allowlist, yet the proxy dialled it" in output
    assert "11.0.0.10:8080 is admitted by the policy but was not reached" in output


def test_ssrf_controls_under_an_allowlist_that_refuses_their_origin_do_not_run_and_say_why(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, NARROW_ALLOWLIST)
    report = tmp_path / "report.json"
    result = run_suite(pytester, "test_ssrf.py", policy, "-k", "v4-private-10 or keepalive",
                       f"--sandbox-report={report}")
    assert result.ret == 1
    scorecard = json.loads(report.read_text())["scorecard"]
    for category in ("ssrf", "ssrf-controls"):
        assert scorecard[category]["status"] == "not run"
        assert scorecard[category]["reason"].startswith("policy narrow-allowlist allows hosts ['11.0.0.10', "
                                                        "'public-origin.lab.test'] on ports [443, 8080], which "
                                                        f"refuses what the {category} tests send (11.0.0.10:80")
    assert "so their refusals would prove the allowlist alone" in result.stdout.str()


def test_application_fixture_enforces_the_marker_policys_routes(pytester: pytest.Pytester, tmp_path: Path) -> None:
    policy = write_policy(tmp_path, DROP_MODELS)
    pytester.makepyfile(f"""
        import pytest

        CURL = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{{http_code}}",
                "https://inference.local/v1/models"]

        def test_baseline_routes_models(sandbox_proxied):
            assert sandbox_proxied.run(CURL, timeout=30).stdout == b"200"

        @pytest.mark.sandbox_policy({str(policy)!r})
        def test_marker_policy_refuses_models(sandbox_proxied, sandbox_policy):
            assert sandbox_policy.name == "drop-models"
            assert sandbox_proxied.run(CURL, timeout=30).stdout == b"403"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:benchmark")
    result.assert_outcomes(passed=2)


def test_policy_type_is_hashable_for_the_proxied_pool() -> None:
    assert isinstance(hash(baseline_policy()), int) and isinstance(baseline_policy(), Policy)
