"""Fixtures for the network categories: one lab and one reference proxy per session (per xdist worker).

``sandbox_lab`` is a :class:`~pytest_sandbox.lab.NetworkLab` whose catch-all canary observes every
destination the SSRF catalogue needs (any address, any port), with the lab public origins and the
catalogue's names in its DNS stub; it is audited when the session ends.
``sandbox_proxy`` is the reference :class:`~pytest_sandbox.proxy.EgressProxy` serving on
127.0.0.1:3128 *inside* that lab, resolving with the lab's stub and dialling with lab sockets, so no
packet it sends can leave the lab namespace (network.md §7). Both need ``--sandbox``; the
unguarded ``_network_lab`` is for the project's own tests.

The proxy intercepts ``CONNECT inference.local:443`` (network.md §4): a per-session
:class:`~pytest_sandbox.interception.InterceptionCA` terminates TLS and inference requests go to a
:class:`~pytest_sandbox.fake_backend.FakeInferenceBackend` serving ``api.inference.test`` on the lab
public address 11.0.0.20:443 (``inference_backend`` records what reached it; ``interception_ca``
gives the CA bundle and the variables that make clients trust it). ``sandbox_proxied`` launches
commands in their own network namespace whose only listener is a reference proxy on
127.0.0.1:3128, with the proxy and CA variables set: the application-test fixture.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.addresses import MalformedTarget, parse_authority
from pytest_sandbox.allowlist_suite import allowlist_gaps, suite_destinations
from pytest_sandbox.campaign import audit_lab, audit_upstream
from pytest_sandbox.catalogues.ssrf_cases import SsrfCase
from pytest_sandbox.categories import CategoryNotRun, category_of
from pytest_sandbox.compiler import compile_policy
from pytest_sandbox.errors import HostUnsupportedError
from pytest_sandbox.fake_backend import DEFAULT_BACKEND_NAME, FakeInferenceBackend
from pytest_sandbox.inference_routes import InferenceRoute, match_route
from pytest_sandbox.interception import (
    INFERENCE_HOST,
    INFERENCE_PORT,
    InferenceBackendConfig,
    InferenceInterceptor,
    InterceptionCA,
)
from pytest_sandbox.lab import NetworkLab
from pytest_sandbox.launcher import (
    Identity,
    NetworkPlacement,
    Sandbox,
    SandboxedProcess,
    SandboxResult,
    SandboxSpec,
)
from pytest_sandbox.netns import NetnsHolder, host_can_create_netns
from pytest_sandbox.policy import Policy, baseline_policy
from pytest_sandbox.proxy import Decision, EgressProxy, InterceptHandler, ProxyConfig
from pytest_sandbox.scorecard import PROPERTY
from pytest_sandbox.session import SandboxSession
from pytest_sandbox.ssrf_suite import SsrfJudgement, lab_canaries, lab_names, verdict_record
from pytest_sandbox.third_party_proxy import (
    AttachedProxy,
    ProxyStartError,
    ThirdPartyProxy,
    attach_proxy_url,
    proxy_url,
    start_proxy_command,
)

__all__ = [
    "INFERENCE_BACKEND_ADDRESS",
    "INFERENCE_BACKEND_PORT",
    "PROXY_LISTEN_ADDRESS",
    "PROXY_LISTEN_PORT",
    "InferenceInterception",
    "InterceptionTrust",
    "ProxiedSandbox",
    "RunningProxy",
    "_inference_interception",
    "_network_lab",
    "inference_backend",
    "interception_ca",
    "interception_of",
    "network_verdict",
    "sandbox_lab",
    "sandbox_proxied",
    "sandbox_proxy",
    "start_inference_interception",
    "start_lab",
    "start_proxied_sandbox",
    "start_proxy",
]

VerdictCheck = Callable[[str, str, SsrfJudgement, str], None]

LAB_PORTS = (80, 443)
PROXY_LISTEN_ADDRESS = "127.0.0.1"
PROXY_LISTEN_PORT = 3128  # squid's customary port; only inside the lab namespace
PROXY_CONNECT_TIMEOUT_SECONDS = 3.0
# Short proxy-side timeouts keep a misbehaving case from stalling the session (the suite's own
# deadline per attempt is ssrf_suite.ATTEMPT_TIMEOUT_SECONDS).
LAB_PROXY_TIMEOUTS = {"connect_timeout": 2.0, "upstream_timeout": 2.0, "resolve_timeout": 2.0,
                      "idle_timeout": 5.0}

# The fake inference backend: a lab public address (11.0.0.0/8 is global unicast, never dialled
# from the host namespace) under the name network.md §8 uses for the upstream certificate.
INFERENCE_BACKEND_ADDRESS = "11.0.0.20"
INFERENCE_BACKEND_PORT = 443
INFERENCE_BACKEND_NAME = DEFAULT_BACKEND_NAME
# The route's own key: known to the proxy and the backend, never to anything inside the sandbox.
INFERENCE_ROUTE_KEY = "route-key-lab-backend-only"

# What a proxied sandbox's child sees (network.md §4: OpenShell sets the same variables). NO_PROXY
# is empty so that no destination, loopback included, skips the proxy.
PROXY_ENV_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
NO_PROXY_ENV_NAMES = ("NO_PROXY", "no_proxy")

InterceptionDecision = dict[str, Any]
ConnectInterceptor = Callable[[str, int], "InterceptHandler | None"]


@dataclass(frozen=True)
class InterceptionTrust:
    """The per-session interception CA and the world-readable bundle file sandboxed clients trust."""

    ca: InterceptionCA
    bundle_path: Path

    @property
    def env(self) -> dict[str, str]:
        """SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE and NODE_EXTRA_CA_CERTS -> the bundle."""
        return self.ca.env(self.bundle_path)

    @property
    def cert_pem(self) -> bytes:
        return self.ca.cert_pem


@dataclass(frozen=True)
class InferenceInterception:
    """Everything a proxy needs to intercept ``inference.local:443`` in a lab."""

    trust: InterceptionTrust
    backend: FakeInferenceBackend
    backend_config: InferenceBackendConfig

    def connect_interceptor(
        self, lab: NetworkLab, record: Callable[[InterceptionDecision], None], *,
        close_on_denied: bool = True, strict_framing: bool = True,
        routes: tuple[InferenceRoute, ...] | None = None,
    ) -> ConnectInterceptor:
        """The proxy's ``connect_interceptor``: an InferenceInterceptor for inference.local:443 only.

        Other ports of inference.local follow the ordinary policy (OpenShell since #869). The
        interceptor reaches the backend with the lab's resolver and lab sockets and forwards exactly
        ``routes`` (the enforced policy's ``[[inference.routes]]``; None: the baseline's).
        ``close_on_denied=False`` / ``strict_framing=False`` build the weakened variants.
        """
        backend = self.backend_config if routes is None else replace(self.backend_config, routes=routes)
        handler = InferenceInterceptor(
            self.trust.ca, backend, resolver=lab.resolver(), socket_factory=lab.socket,
            record=record, close_on_denied=close_on_denied, strict_framing=strict_framing,
        )

        def intercept(host: str, port: int) -> InterceptHandler | None:
            # The proxy hands over its canonical (lowercased) host.
            return handler if (host, port) == (INFERENCE_HOST, INFERENCE_PORT) else None

        return intercept


@dataclass
class RunningProxy:
    """An EgressProxy serving inside a lab: where it listens, its decisions, how to reach it.

    ``inference_decisions`` holds one dict per request the inference interceptor judged (empty when
    the proxy does not intercept).
    """

    proxy: EgressProxy
    lab: NetworkLab
    address: str
    port: int
    inference_decisions: list[InterceptionDecision] = field(default_factory=list)

    @property
    def url(self) -> str:
        return proxy_url(self.address, self.port)

    @property
    def decisions(self) -> list[Decision]:
        return self.proxy.decisions

    def connect(self, timeout: float = PROXY_CONNECT_TIMEOUT_SECONDS) -> socket.socket:
        """A new client connection to the proxy, from a socket inside the lab."""
        return self.lab.connect(self.address, self.port, timeout=timeout)

    def stop(self) -> None:
        self.proxy.stop()


def lab_proxy_config(policy: Policy | None = None, **overrides: object) -> ProxyConfig:
    """The reference proxy's configuration for the lab: ``policy``'s allowlist (the baseline's when
    None) plus short timeouts, then ``overrides``."""
    return ProxyConfig.from_policy(policy or baseline_policy(), **{**LAB_PROXY_TIMEOUTS, **overrides})


def start_lab(name: str = "ssrf-lab") -> NetworkLab:
    """A lab whose catch-all observes every canary of the catalogue (any port), with its DNS names."""
    return NetworkLab.start(lab_canaries(), ports=LAB_PORTS, names=lab_names(), name=name)


def start_proxy(lab: NetworkLab, config: ProxyConfig | None = None, *,
                address: str = PROXY_LISTEN_ADDRESS, port: int = PROXY_LISTEN_PORT,
                interception: InferenceInterception | None = None,
                close_on_denied: bool = True, routes: tuple[InferenceRoute, ...] | None = None) -> RunningProxy:
    """Start an EgressProxy with ``config`` on ``address:port`` inside ``lab``; caller stops it.

    With ``interception`` the proxy intercepts ``CONNECT inference.local:443`` and forwards
    ``routes`` (None: the baseline's); the interceptor frames as strictly as
    ``config.strict_framing`` says, and ``close_on_denied=False`` gives it the pre-#819 keep-alive rule.
    """
    config = config or lab_proxy_config()
    decisions: list[InterceptionDecision] = []
    interceptor = None if interception is None else interception.connect_interceptor(
        lab, decisions.append, close_on_denied=close_on_denied, strict_framing=config.strict_framing,
        routes=routes)
    listener = lab.listen(address, port)
    proxy = EgressProxy(config, resolver=lab.resolver(), socket_factory=lab.socket,
                        connect_interceptor=interceptor, route_socket_factory=lab.route_socket)
    try:
        proxy.start_in_thread(listener)
    except BaseException:
        listener.close()
        raise
    return RunningProxy(proxy, lab, address, port, decisions)


def write_interception_bundle(ca: InterceptionCA, directory: Path) -> InterceptionTrust:
    """Write ``ca``'s bundle world-readable into ``directory`` (the sandboxed child may not be root)."""
    directory.chmod(0o755)
    path = ca.write_bundle(directory)
    path.chmod(0o644)
    return InterceptionTrust(ca, path)


def start_inference_interception(lab: NetworkLab, bundle_directory: Path) -> InferenceInterception:
    """Start the fake backend on 11.0.0.20:443 in ``lab`` (named api.inference.test in its DNS) and
    make a fresh interception CA. The caller stops ``.backend``."""
    lab.add_name(INFERENCE_BACKEND_NAME, [INFERENCE_BACKEND_ADDRESS])
    backend = FakeInferenceBackend(INFERENCE_BACKEND_NAME, INFERENCE_ROUTE_KEY)
    listener = lab.listen(INFERENCE_BACKEND_ADDRESS, INFERENCE_BACKEND_PORT)
    try:
        backend.start_in_thread(listener)
    except BaseException:
        listener.close()
        raise
    config = InferenceBackendConfig(
        host=INFERENCE_BACKEND_NAME, port=INFERENCE_BACKEND_PORT, api_key=INFERENCE_ROUTE_KEY,
        server_hostname=INFERENCE_BACKEND_NAME, ca_pem=backend.ca_pem,
    )
    trust = write_interception_bundle(InterceptionCA.create(), bundle_directory)
    return InferenceInterception(trust, backend, config)


class ProxiedSandbox:
    """Launch commands whose only way out is a reference proxy (the ``sandbox_proxied`` fixture).

    The processes live in their own network namespace (``holder``), where nothing but the proxy
    listens, on 127.0.0.1:3128; the proxy itself dials from the lab (lab resolver, lab sockets), so
    every destination a command reaches is a lab listener. ``run``/``popen`` add the proxy and CA
    variables to the environment (they win over the caller's ``env``).
    """

    def __init__(self, sandbox: Sandbox, holder: NetnsHolder, proxy: EgressProxy,
                 trust: InterceptionTrust, inference_decisions: list[InterceptionDecision]) -> None:
        self.sandbox = sandbox
        self.holder = holder
        self.proxy = proxy
        self.trust = trust
        self.inference_decisions = inference_decisions
        self.proxy_url = f"http://{PROXY_LISTEN_ADDRESS}:{PROXY_LISTEN_PORT}"

    @property
    def env(self) -> dict[str, str]:
        """The variables every command gets: the proxy for every scheme, no exceptions, the CA."""
        return {**dict.fromkeys(PROXY_ENV_NAMES, self.proxy_url), **dict.fromkeys(NO_PROXY_ENV_NAMES, ""),
                **self.trust.env}

    @property
    def decisions(self) -> list[Decision]:
        return self.proxy.decisions

    def _environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**(os.environ if env is None else env), **self.env}

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None) -> SandboxResult:
        return self.sandbox.run(argv, input=input, timeout=timeout, env=self._environment(env), cwd=cwd)

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs: Any) -> SandboxedProcess:
        return self.sandbox.popen(argv, env=self._environment(env), **kwargs)

    def close(self) -> None:
        """Stop the spawner (by PID), the proxy, then the namespace helper (by PID)."""
        try:
            self.sandbox.close()
        finally:
            try:
                self.proxy.stop()
            finally:
                self.holder.close()


def start_proxied_sandbox(lab: NetworkLab, policy: Policy, interception: InferenceInterception, *,
                          config: ProxyConfig | None = None) -> ProxiedSandbox:
    """A fresh namespace with a reference proxy on its 127.0.0.1:3128 and a proxy-mode sandbox in it.

    The proxy enforces ``policy``: its allowlist (unless ``config`` is given) and its inference routes.
    """
    holder = NetnsHolder.start(name="sandbox-proxied")
    try:
        listener = holder.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((PROXY_LISTEN_ADDRESS, PROXY_LISTEN_PORT))
            listener.listen(128)
        except BaseException:
            listener.close()
            raise
        decisions: list[InterceptionDecision] = []
        proxy = EgressProxy(config or lab_proxy_config(policy), resolver=lab.resolver(), socket_factory=lab.socket,
                            connect_interceptor=interception.connect_interceptor(
                                lab, decisions.append, routes=policy.inference_routes),
                            route_socket_factory=lab.route_socket)
        try:
            proxy.start_in_thread(listener)
        except BaseException:
            listener.close()
            raise
        try:
            placement = NetworkPlacement("proxy", netns_path=holder.netns_path, userns_path=holder.userns_path)
            sandbox = Sandbox(SandboxSpec(compile_policy(policy, "proxy"), placement, Identity.current()))
        except BaseException:
            proxy.stop()
            raise
    except BaseException:
        holder.close()
        raise
    return ProxiedSandbox(sandbox, holder, proxy, interception.trust, decisions)


@pytest.fixture(scope="session")
def _network_lab(pytestconfig: pytest.Config) -> Iterator[NetworkLab]:
    """The session's lab, without the ``--sandbox`` gate (for the project's own tests).

    On a host that cannot create a network namespace, every test that needs the lab fails with the
    reason under ``--sandbox`` (SPEC "Fail closed": the network categories did not run, and the
    scorecard says so); without ``--sandbox`` such tests are skipped.

    When the session ends it audits the lab's catch-all canary: a connection no verdict accounted
    for (a dial after its case was judged, or one nobody watched) fails the run, naming it; and the
    bytes its origins and inference backend received: bytes an upstream attempt accounts for that
    arrived after its verdict (a late forward) fail the run, naming where and what.
    """
    available, why = host_can_create_netns()
    lab: NetworkLab | None = None
    if not available:
        why = f"the network lab needs a private network namespace, and this host cannot create one: {why}"
    else:
        try:
            lab = start_lab()
        except HostUnsupportedError as error:
            why = f"the network lab cannot start: {error}"
    if lab is None:  # outside the except block: one line, no exception chain
        if pytestconfig.getoption("sandbox", False):
            raise CategoryNotRun(why)
        pytest.skip(why)
    problem = None
    try:
        yield lab
        problem = audit_lab(lab)
        streams = [*lab.origin_streams(), *(stream for interception in _interceptions_of(lab)
                                            for stream in interception.backend.received_streams())]
        late = audit_upstream(lab.upstream_ledger, streams)
        problem = "\n".join(part for part in (problem, late) if part) or None
    finally:
        try:
            _stop_interception(lab)
        finally:
            lab.close()
    if problem is not None:
        pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def sandbox_lab(sandbox_session: SandboxSession, _network_lab: NetworkLab) -> NetworkLab:
    """The network lab: the catch-all canary (``hits``, ``canary_hits``), public origins, the DNS stub.
    Needs --sandbox."""
    return _network_lab


# One interception (backend + CA) per lab, started on first use and stopped with the lab by
# ``_network_lab``; so ``sandbox_proxy`` needs no fixture beyond the ones every module already binds.
_INTERCEPTIONS: dict[int, tuple[InferenceInterception, Path]] = {}


def interception_of(lab: NetworkLab) -> InferenceInterception:
    """The inference interception (fake backend, CA bundle) of ``lab``, started on first use."""
    found = _INTERCEPTIONS.get(id(lab))
    if found is None:
        directory = Path(tempfile.mkdtemp(prefix="pytest-sandbox-ca-"))
        try:
            found = (start_inference_interception(lab, directory), directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        _INTERCEPTIONS[id(lab)] = found
    return found[0]


def _interceptions_of(lab: NetworkLab) -> list[InferenceInterception]:
    found = _INTERCEPTIONS.get(id(lab))
    return [found[0]] if found is not None else []


def _stop_interception(lab: NetworkLab) -> None:
    found = _INTERCEPTIONS.pop(id(lab), None)
    if found is not None:
        interception, directory = found
        try:
            interception.backend.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def _inference_interception(_network_lab: NetworkLab) -> InferenceInterception:
    """The session's fake inference backend and interception CA (no ``--sandbox`` gate)."""
    return interception_of(_network_lab)


@pytest.fixture(scope="session")
def inference_backend(_network_lab: NetworkLab) -> FakeInferenceBackend:
    """The fake inference backend behind ``inference.local``: ``.requests`` is what reached it."""
    return interception_of(_network_lab).backend


@pytest.fixture(scope="session")
def interception_ca(_network_lab: NetworkLab) -> InterceptionTrust:
    """The interception CA: ``.bundle_path`` (world-readable PEM), ``.env`` (the four CA variables)."""
    return interception_of(_network_lab).trust


@pytest.fixture(scope="session")
def sandbox_proxy(sandbox_session: SandboxSession,
                  sandbox_lab: NetworkLab) -> Iterator[RunningProxy | ThirdPartyProxy | AttachedProxy]:
    """The proxy under test inside the lab: ``.url``, ``.connect()``, ``.decisions``, ``.stop()``.

    The reference egress proxy on 127.0.0.1:3128, enforcing ``--sandbox-policy``: its allowlist and
    its inference routes (it intercepts ``CONNECT inference.local:443``). Unless ``--sandbox-proxy-cmd``
    starts a third-party proxy inside the lab or ``--sandbox-proxy`` names one already listening
    there (refused if the lab cannot reach it: a proxy outside the lab would dial real special-use
    addresses); the suite then judges it against the same policy.
    """
    options = sandbox_session.options
    running: RunningProxy | ThirdPartyProxy | AttachedProxy
    if options.proxy_cmd is not None:
        try:
            running = start_proxy_command(sandbox_lab, options.proxy_cmd)
        except ProxyStartError as exc:
            pytest.exit(f"pytest-sandbox: --sandbox-proxy-cmd: {exc}", returncode=4)
    elif options.proxy_url is not None:
        try:
            running = attach_proxy_url(sandbox_lab, options.proxy_url)
        except ValueError as exc:
            pytest.exit(f"pytest-sandbox: --sandbox-proxy: {exc}", returncode=4)
    else:
        policy = sandbox_session.policy
        running = start_proxy(sandbox_lab, lab_proxy_config(policy), interception=interception_of(sandbox_lab),
                              routes=policy.inference_routes)
    try:
        yield running
    finally:
        with contextlib.suppress(Exception):
            running.stop()


class ProxiedPool:
    """One proxied sandbox (namespace, proxy, spawner) per policy, for the session; closed by PID."""

    def __init__(self, lab: NetworkLab) -> None:
        self.lab = lab
        self._proxied: dict[Policy, ProxiedSandbox] = {}

    def get(self, policy: Policy) -> ProxiedSandbox:
        if policy not in self._proxied:
            self._proxied[policy] = start_proxied_sandbox(self.lab, policy, interception_of(self.lab))
        return self._proxied[policy]

    def close(self) -> None:
        while self._proxied:
            _policy, proxied = self._proxied.popitem()
            with contextlib.suppress(Exception):
                proxied.close()


@pytest.fixture(scope="session")
def _proxied_pool(_network_lab: NetworkLab) -> Iterator[ProxiedPool]:
    pool = ProxiedPool(_network_lab)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def sandbox_proxied(sandbox_policy: Policy, _proxied_pool: ProxiedPool) -> ProxiedSandbox:
    """Run commands whose only network is the reference proxy: ``run``/``popen`` with HTTP(S)_PROXY,
    ALL_PROXY and the CA variables set; ``inference.local`` reaches the fake backend.

    The policy is the test's ``@pytest.mark.sandbox_policy(...)``, else ``--sandbox-policy``
    (``baseline`` by default): compiled for proxy mode, and its allowlist and inference routes are
    what the proxy enforces. One proxied sandbox per policy is kept for the session.
    """
    return _proxied_pool.get(sandbox_policy)


def _case_destinations(item: pytest.Item) -> list[tuple[str, int]]:
    """The host and port of ``item``'s SSRF case, if it has one the parser accepts."""
    wanted = []
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec is not None else ()):
        case = getattr(value, "case", value)
        if isinstance(case, SsrfCase) and case.expected in ("denied", "allowed"):
            with contextlib.suppress(MalformedTarget):
                authority = parse_authority(case.authority)
                wanted.append((authority.host, authority.port))
    return wanted


# Inference routes the smuggling suite's tunnel payloads are built on (inference_suite.TUNNEL_TARGETS,
# and the GET that primes its backend record): (category, node-id pattern, (method, path) pairs).
SUITE_ROUTES: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("smuggling", "*[[]tunnel-*", (("POST", "/v1/chat/completions"), ("GET", "/v1/models"))),
    ("smuggling", "*::test_backend_record_*", (("GET", "/v1/models"),)),
)


def require_policy_admits(item: pytest.Item, policy: Policy) -> None:
    """Raise CategoryNotRun when the policy refuses what ``item`` must get through: a destination its
    allowlist refuses (the refusals would prove the allowlist, not the check under test, and the
    controls could not pass), or an inference request its tunnel payloads need routed."""
    category = category_of(item.nodeid)
    for wanted, pattern, needed in SUITE_ROUTES:
        missing = [f"{method} {path}" for method, path in needed
                   if category == wanted and fnmatch.fnmatchcase(item.nodeid, pattern)
                   and match_route(policy.inference_routes, method, path) is None]
        if missing:
            raise CategoryNotRun(
                f"policy {policy.name} does not route {', '.join(missing)}, which the smuggling tunnel cases send "
                "as their allowed requests (every case would read as a refusal); route them, or deselect the tunnel "
                "cases (-k 'not tunnel')")
    destinations = suite_destinations(category, item.nodeid)
    if destinations is None:
        return
    if allowlist_gaps(policy.network, [*destinations, *_case_destinations(item)]):
        what = "absolute-form smuggling" if category == "smuggling" else category
        sent = " and ".join(f"{host}:{port}" for host, port in destinations)
        raise CategoryNotRun(
            f"policy {policy.name} allows hosts {list(policy.network.allowed_hosts)} on ports "
            f"{list(policy.network.allowed_ports)}, which refuses what the {what} tests send ({sent}, and each case "
            "its own address and port) before any address check, so their refusals would prove the allowlist "
            "alone; run them under a policy whose allowlist admits them (extends = \"baseline\" does), or "
            "deselect them")


@pytest.fixture
def network_verdict(request: pytest.FixtureRequest) -> VerdictCheck:
    """Attach a network verdict to the report (the scorecard counts it), then pass or fail.

    Call as ``network_verdict(category, test_id, judgement, attempted)``; BLOCKED and WORKS pass,
    everything else (INDETERMINATE included) fails with the judgement's reason. A test whose
    destinations or routes the enforced policy refuses does not run (:func:`require_policy_admits`).
    """
    session: SandboxSession = request.getfixturevalue("sandbox_session")
    require_policy_admits(request.node, session.policy)

    def check(category: str, test_id: str, judgement: SsrfJudgement, attempted: str) -> None:
        request.node.user_properties.append((PROPERTY, verdict_record(category, test_id, judgement, attempted)))
        if not judgement.passed:
            pytest.fail(f"{attempted}: {judgement.verdict.value}, expected {judgement.expected} "
                        f"(observed {judgement.observed}) - {judgement.reason}", pytrace=False)

    return check
