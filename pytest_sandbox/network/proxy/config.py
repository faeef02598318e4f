"""What the reference egress proxy is told, and what it writes down: its settings and its decision log.

Kept apart from the server so that fixtures, third-party starters and the policy can build a
``ProxyConfig`` and read ``Decision`` records without importing the asyncio server, and so that the
injection points (resolver, socket factories, CONNECT interceptor) have one definition.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_sandbox.http.streams import DEFAULT_MAX_BODY
from pytest_sandbox.network.addresses import AddressVerdict, classify_address
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.policy.model import Policy

__all__ = [
    "ConnectInterceptor",
    "Decision",
    "InterceptHandler",
    "ProxyConfig",
    "Resolver",
    "RouteSocketFactory",
    "SocketFactory",
]

# ``async resolve(name) -> address literals``: the only way a name becomes addresses (resolved once).
Resolver = Callable[[str], Awaitable[list[str]]]
# ``factory(family) -> socket``: every socket the proxy dials with (lab sockets in the lab).
SocketFactory = Callable[[int], socket.socket]
# Makes an AF_NETLINK / NETLINK_ROUTE socket in the namespace the proxy dials from (its route table).
RouteSocketFactory = Callable[[], socket.socket]
InterceptHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ConnectInterceptor = Callable[[str, int], "InterceptHandler | None"]


def _baseline_allowlist(name: str) -> Callable[[], Any]:
    """A default factory reading ``name`` from the bundled baseline policy (the one place defaults live)."""

    def default() -> Any:
        return getattr(baseline_policy().network, name)

    return default


@dataclass(frozen=True)
class ProxyConfig:
    """How the proxy judges requests. The allowlist defaults to the baseline policy's; a session's
    proxy is built with :meth:`from_policy` from the policy it enforces."""

    # fnmatch patterns on the canonical (lowercase) host
    allowed_hosts: tuple[str, ...] = field(default_factory=_baseline_allowlist("allowed_hosts"))
    allowed_ports: tuple[int, ...] = field(default_factory=_baseline_allowlist("allowed_ports"))
    classify: Callable[[str], AddressVerdict] = classify_address  # injection point for weakened proxies
    strict_framing: bool = True  # False = weakened (h11 only)
    judge_every_request: bool = True  # False = weakened (first request only)
    lax_framing: frozenset[str] = frozenset()  # weakened: http.framing.FRAMING_FAMILIES read leniently
    max_head: int = 8192  # OpenShell answers 431 beyond 8 KiB (network.md §4)
    max_body: int = DEFAULT_MAX_BODY
    max_response_body: int = 32 * 2**20
    idle_timeout: float = 60.0  # seconds a client connection may sit between requests
    connect_timeout: float = 10.0
    upstream_timeout: float = 60.0  # seconds to wait for a complete upstream response
    resolve_timeout: float = 5.0
    # Bytes of request and response bodies (and heads) the proxy may hold buffered at once, across every
    # connection. A request that would go over it is answered 503 ``memory_budget`` and closed; one
    # connection alone is still bounded by max_head + max_body (request) or max_response_body (response).
    memory_budget: int = 256 * 2**20
    # Decisions kept; older ones are dropped oldest first and counted per reason (``decision_summary``).
    max_decisions: int = 100_000

    def __post_init__(self) -> None:
        if self.memory_budget < self.max_head:
            raise ValueError(f"memory_budget ({self.memory_budget}) must hold at least one head (max_head "
                             f"{self.max_head}); raise memory_budget")
        if self.max_decisions < 1:
            raise ValueError(f"max_decisions must be at least 1, got {self.max_decisions}")

    @classmethod
    def from_policy(cls, policy: Policy, **settings: Any) -> ProxyConfig:
        """The policy's ``[network]`` allowlist, plus ``settings`` (timeouts, weakenings)."""
        allowlist = {"allowed_hosts": policy.network.allowed_hosts, "allowed_ports": policy.network.allowed_ports}
        return cls(**{**allowlist, **settings})


@dataclass(frozen=True)
class Decision:
    """One judged request or CONNECT. ``reason`` is a stable code a human can act on."""

    seq: int
    client: str
    method: str
    target: str
    host: str | None
    port: int | None
    action: str  # "allow" | "deny" | "error" | "intercept"
    status: int
    reason: str  # routed, intercepted, unjudged, ssrf_denied, policy_denied, malformed_target,
    # https_absolute_form, header_too_large, upstream_unreachable, upstream_protocol_error,
    # resolution_failed, memory_budget, client_closed, framing:<case>
    detail: str
    addresses: tuple[str, ...]
