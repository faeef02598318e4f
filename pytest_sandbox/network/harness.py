"""Starting the reference lab's servers: the egress proxy, the inference interception, a proxied sandbox.

What the network fixtures (``fixtures/network.py``) and the project's own tests start inside a
:class:`~pytest_sandbox.network.lab.lab.NetworkLab`, without pytest: each starter returns a handle the
caller stops (by PID or thread). The fixtures add the session lifetime and the ``--sandbox`` gate.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trustme

from pytest_sandbox.guardian import session_temp_dir
from pytest_sandbox.inference.ca import InterceptionCA
from pytest_sandbox.inference.fake_backend import DEFAULT_BACKEND_NAME, FakeInferenceBackend
from pytest_sandbox.inference.interceptor import InferenceBackendConfig, InferenceInterceptor
from pytest_sandbox.inference.routes import InferenceRoute
from pytest_sandbox.inference.routing import INFERENCE_HOST, INFERENCE_PORT
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.netns import NetnsHolder
from pytest_sandbox.network.proxy.config import Decision, InterceptHandler, ProxyConfig
from pytest_sandbox.network.proxy.server import EgressProxy
from pytest_sandbox.network.third_party import BACKEND_VARIABLES, proxy_url
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.policy.model import Policy
from pytest_sandbox.seccomp.compiler import compile_policy
from pytest_sandbox.seccomp.launcher import (
    Identity,
    NetworkPlacement,
    Sandbox,
    SandboxedProcess,
    SandboxResult,
    SandboxSpec,
)

PROXY_LISTEN_ADDRESS = "127.0.0.1"
PROXY_LISTEN_PORT = 3128  # squid's customary port; only inside the lab namespace
PROXY_CONNECT_TIMEOUT_SECONDS = 3.0
# Short proxy-side timeouts keep a misbehaving case from stalling the session (the suite's own
# deadline per attempt is probes.ssrf.ATTEMPT_TIMEOUT_SECONDS, 3 s). A lookup is given that deadline, not
# less: the lab's stub answers on loopback, but on a loaded machine its loop thread can wait seconds for
# the CPU, and a lookup the reference gave up on first answered 502 resolution_failed, which a denial's
# verdict reads as a dial (a false ALLOWED against the reference); a stub slower than the client's deadline
# now ends as the client's own timeout (INDETERMINATE), never as a 502.
LAB_PROXY_TIMEOUTS = {"connect_timeout": 2.0, "upstream_timeout": 2.0, "resolve_timeout": 3.0,
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
    """The interception CA and the world-readable bundle file sandboxed clients trust.

    ``ca`` is the per-session :class:`InterceptionCA` (its key signs the interceptor's leaves) when the
    reference proxy intercepts; a third-party interceptor's CA (``--sandbox-proxy-ca``) is known by its
    certificate alone, and ``ca`` is then None.
    """

    ca: InterceptionCA | None
    bundle_path: Path
    cert_pem: bytes

    @property
    def env(self) -> dict[str, str]:
        """SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE and NODE_EXTRA_CA_CERTS -> the bundle."""
        return InterceptionCA.env(self.bundle_path)


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
        if self.trust.ca is None:
            raise ValueError("a third party's interception CA has no key here: only that proxy can intercept with it")
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
    return InterceptionTrust(ca, path, ca.cert_pem)


class ProxyCaError(ValueError):
    """``--sandbox-proxy-ca`` names no readable PEM certificate."""


def external_trust(pem_file: Path, directory: Path) -> InterceptionTrust:
    """The CA a third-party proxy intercepts ``inference.local`` with (``--sandbox-proxy-ca FILE``).

    Only ``CERTIFICATE`` blocks are kept (a private key in the file is never copied); the bundle the
    sandboxed clients trust is written world-readable into ``directory``. Raises ProxyCaError naming
    the file and what is wrong with it.
    """
    try:
        text = pem_file.read_bytes()
    except OSError as exc:
        raise ProxyCaError(f"--sandbox-proxy-ca {pem_file}: cannot read it ({exc.strerror or exc}); give the PEM "
                           "file the proxy under test intercepts inference.local with (the proxy command may "
                           "write it before it listens)") from None
    blocks = _PEM_CERTIFICATE.findall(text)
    if not blocks:
        raise ProxyCaError(f"--sandbox-proxy-ca {pem_file}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    pem = b"".join(block + b"\n" for block in blocks)
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise ProxyCaError(f"--sandbox-proxy-ca {pem_file}: the certificate does not load ({exc})") from None
    directory.chmod(0o755)
    path = directory / "pytest-sandbox-proxy-ca.pem"
    path.write_bytes(pem)
    path.chmod(0o644)
    return InterceptionTrust(None, path, pem)


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----")


@dataclass(frozen=True)
class BackendHandoff:
    """What a third-party interceptor needs to forward to the lab's fake inference backend.

    Handed to the proxy command as placeholders (``{backend}`` beside ``{port}``, and
    ``{backend_name}``, ``{backend_ca}``, ``{backend_key}``) and as environment variables
    (:data:`BACKEND_ENV`): the backend's lab address, the name its certificate is for, the PEM file of
    the CA that signed it and the route key the backend accepts.
    """

    address: str  # "11.0.0.20:443"
    name: str
    ca_file: Path
    key: str

    def placeholders(self) -> dict[str, str]:
        return {"{backend}": self.address, "{backend_name}": self.name, "{backend_ca}": str(self.ca_file),
                "{backend_key}": self.key}

    def env(self) -> dict[str, str]:
        values = (self.address, self.name, str(self.ca_file), self.key)
        return dict(zip(BACKEND_ENV, values, strict=True))


# The variables a third-party proxy command reads the fake backend from (same order as the fields).
BACKEND_ENV = BACKEND_VARIABLES


def backend_handoff(interception: InferenceInterception, directory: Path) -> BackendHandoff:
    """Write the fake backend's CA into ``directory`` (world-readable) and describe the backend."""
    directory.chmod(0o755)
    ca_file = directory / "pytest-sandbox-backend-ca.pem"
    ca_file.write_bytes(interception.backend_config.ca_pem)
    ca_file.chmod(0o644)
    return BackendHandoff(f"{INFERENCE_BACKEND_ADDRESS}:{INFERENCE_BACKEND_PORT}", INFERENCE_BACKEND_NAME, ca_file,
                          INFERENCE_ROUTE_KEY)


def start_inference_interception(lab: NetworkLab, bundle_directory: Path,
                                 backend_ca: trustme.CA | None = None) -> InferenceInterception:
    """Start the fake backend on 11.0.0.20:443 in ``lab`` (named api.inference.test in its DNS) and
    make a fresh interception CA. The caller stops ``.backend``. ``backend_ca`` signs the backend's
    certificate instead of a fresh CA (``--sandbox-backend-ca``)."""
    lab.add_name(INFERENCE_BACKEND_NAME, [INFERENCE_BACKEND_ADDRESS])
    backend = FakeInferenceBackend(INFERENCE_BACKEND_NAME, INFERENCE_ROUTE_KEY, ca=backend_ca)
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


# One interception (backend + CA) per lab, started on first use and stopped with the lab (the
# ``_network_lab`` fixture calls stop_interception); so ``sandbox_proxy`` needs no fixture of its own.
_INTERCEPTIONS: dict[int, tuple[InferenceInterception, Path]] = {}


def interception_of(lab: NetworkLab, backend_ca: trustme.CA | None = None) -> InferenceInterception:
    """The inference interception (fake backend, CA bundle) of ``lab``, started on first use (its backend's
    certificate signed by ``backend_ca`` when given)."""
    found = _INTERCEPTIONS.get(id(lab))
    if found is None:
        directory = session_temp_dir("pytest-sandbox-ca-")  # removed by the janitor however the session ends
        try:
            found = (start_inference_interception(lab, directory, backend_ca), directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        _INTERCEPTIONS[id(lab)] = found
    return found[0]


def handoff_of(lab: NetworkLab) -> BackendHandoff:
    """``lab``'s fake backend described for a third-party proxy command (starts the interception)."""
    interception_of(lab)
    return backend_handoff(interception_of(lab), _INTERCEPTIONS[id(lab)][1])


def external_trust_of(lab: NetworkLab, pem_file: Path) -> InterceptionTrust:
    """The third-party CA in ``pem_file``, its bundle written beside ``lab``'s (removed with it)."""
    interception_of(lab)
    return external_trust(pem_file, _INTERCEPTIONS[id(lab)][1])


def interceptions_of(lab: NetworkLab) -> list[InferenceInterception]:
    """The interception started for ``lab`` (none or one), for the end-of-session audit."""
    found = _INTERCEPTIONS.get(id(lab))
    return [found[0]] if found is not None else []


def stop_interception(lab: NetworkLab) -> None:
    """Stop ``lab``'s fake backend (its thread) and remove its CA bundle directory, if it has one."""
    found = _INTERCEPTIONS.pop(id(lab), None)
    if found is not None:
        interception, directory = found
        try:
            interception.backend.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
