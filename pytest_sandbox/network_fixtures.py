"""Fixtures for the network categories: one lab and one reference proxy per session (per xdist worker).

``sandbox_lab`` is a :class:`~pytest_sandbox.lab.NetworkLab` holding every canary the SSRF catalogue
needs (ports 80 and 443), the lab public origins and the catalogue's names in its DNS stub.
``sandbox_proxy`` is the reference :class:`~pytest_sandbox.proxy.EgressProxy` serving on
127.0.0.1:3128 *inside* that lab, resolving with the lab's stub and dialling with lab sockets, so no
packet it sends can leave the lab namespace (network.md §7). Both need ``--sandbox``; the
unguarded ``_network_lab`` is for the project's own tests.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pytest_sandbox.lab import NetworkLab
from pytest_sandbox.netns import host_can_create_netns
from pytest_sandbox.proxy import Decision, EgressProxy, ProxyConfig
from pytest_sandbox.scorecard import PROPERTY
from pytest_sandbox.session import SandboxSession
from pytest_sandbox.ssrf_suite import SsrfJudgement, lab_canaries, lab_names, verdict_record

__all__ = [
    "PROXY_LISTEN_ADDRESS",
    "PROXY_LISTEN_PORT",
    "RunningProxy",
    "_network_lab",
    "network_verdict",
    "sandbox_lab",
    "sandbox_proxy",
    "start_lab",
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


@dataclass
class RunningProxy:
    """An EgressProxy serving inside a lab: where it listens, its decisions, how to reach it."""

    proxy: EgressProxy
    lab: NetworkLab
    address: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    @property
    def decisions(self) -> list[Decision]:
        return self.proxy.decisions

    def connect(self, timeout: float = PROXY_CONNECT_TIMEOUT_SECONDS) -> socket.socket:
        """A new client connection to the proxy, from a socket inside the lab."""
        return self.lab.connect(self.address, self.port, timeout=timeout)

    def stop(self) -> None:
        self.proxy.stop()


def lab_proxy_config(**overrides: object) -> ProxyConfig:
    """The reference proxy's configuration for the lab: defaults plus short timeouts."""
    settings: dict[str, object] = {**LAB_PROXY_TIMEOUTS, **overrides}
    return ProxyConfig(**settings)  # type: ignore[arg-type]


def start_lab(name: str = "ssrf-lab") -> NetworkLab:
    """A lab with every observable canary of the catalogue on ports 80 and 443 and its DNS names."""
    return NetworkLab.start(lab_canaries(), ports=LAB_PORTS, names=lab_names(), name=name)


def start_proxy(lab: NetworkLab, config: ProxyConfig | None = None, *,
                address: str = PROXY_LISTEN_ADDRESS, port: int = PROXY_LISTEN_PORT) -> RunningProxy:
    """Start an EgressProxy with ``config`` on ``address:port`` inside ``lab``; caller stops it."""
    listener = lab.listen(address, port)
    proxy = EgressProxy(config or lab_proxy_config(), resolver=lab.resolver(), socket_factory=lab.socket)
    try:
        proxy.start_in_thread(listener)
    except BaseException:
        listener.close()
        raise
    return RunningProxy(proxy, lab, address, port)


@pytest.fixture(scope="session")
def _network_lab() -> Iterator[NetworkLab]:
    """The session's lab, without the ``--sandbox`` gate (for the project's own tests)."""
    available, why = host_can_create_netns()
    if not available:
        pytest.skip(f"the network lab needs a private network namespace: {why}")
    lab = start_lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def sandbox_lab(sandbox_session: SandboxSession, _network_lab: NetworkLab) -> NetworkLab:
    """The network lab: canaries (``canary_hits``), public origins, the DNS stub. Needs --sandbox."""
    return _network_lab


@pytest.fixture(scope="session")
def sandbox_proxy(sandbox_lab: NetworkLab) -> Iterator[RunningProxy]:
    """The reference egress proxy on 127.0.0.1:3128 inside the lab: ``.url``, ``.decisions``."""
    running = start_proxy(sandbox_lab)
    try:
        yield running
    finally:
        with contextlib.suppress(Exception):
            running.stop()


@pytest.fixture
def network_verdict(request: pytest.FixtureRequest) -> VerdictCheck:
    """Attach a network verdict to the report (the scorecard counts it), then pass or fail.

    Call as ``network_verdict(category, test_id, judgement, attempted)``; BLOCKED and WORKS pass,
    everything else (INDETERMINATE included) fails with the judgement's reason.
    """

    def check(category: str, test_id: str, judgement: SsrfJudgement, attempted: str) -> None:
        request.node.user_properties.append((PROPERTY, verdict_record(category, test_id, judgement, attempted)))
        if not judgement.passed:
            pytest.fail(f"{attempted}: {judgement.verdict.value}, expected {judgement.expected} "
                        f"(observed {judgement.observed}) - {judgement.reason}", pytrace=False)

    return check
