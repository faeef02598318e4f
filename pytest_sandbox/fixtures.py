"""Fixtures for application test suites: launch the application's own processes under the policy.

``sandbox.run([...])`` / ``sandbox.popen([...])`` start a command under the active policy (the
``--sandbox-policy`` option, or a test's ``@pytest.mark.sandbox_policy(...)``) in the policy's network
mode. One spawner per (policy, mode) is kept for the session and stopped by PID at the end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from pytest_sandbox.compiler import compile_policy
from pytest_sandbox.errors import SandboxError
from pytest_sandbox.launcher import Identity, NetworkPlacement, Sandbox, SandboxedProcess, SandboxResult, SandboxSpec
from pytest_sandbox.policy import Policy, load_policy


class SandboxLauncher:
    """What the ``sandbox`` fixture returns: run or popen commands under one policy and mode."""

    def __init__(self, pool: SandboxPool, policy: Policy, mode: str) -> None:
        self._pool, self.policy, self.mode = pool, policy, mode

    def _sandbox(self, mode: str | None) -> Sandbox:
        return self._pool.get(self.policy, mode or self.mode)

    def run(self, argv: Sequence[str], *, mode: str | None = None, **kwargs: Any) -> SandboxResult:
        return self._sandbox(mode).run(argv, **kwargs)

    def popen(self, argv: Sequence[str], *, mode: str | None = None, **kwargs: Any) -> SandboxedProcess:
        return self._sandbox(mode).popen(argv, **kwargs)


class SandboxPool:
    def __init__(self) -> None:
        self._sandboxes: dict[tuple[Policy, str], Sandbox] = {}

    def get(self, policy: Policy, mode: str) -> Sandbox:
        key = (policy, mode)
        if key not in self._sandboxes:
            spec = SandboxSpec(compile_policy(policy, mode), NetworkPlacement(mode), Identity.current())
            self._sandboxes[key] = Sandbox(spec)
        return self._sandboxes[key]

    def close(self) -> None:
        for sandbox in self._sandboxes.values():
            sandbox.close()
        self._sandboxes.clear()


@pytest.fixture(scope="session")
def _sandbox_pool() -> Iterator[SandboxPool]:
    pool = SandboxPool()
    yield pool
    pool.close()


@pytest.fixture
def sandbox_policy(request: pytest.FixtureRequest) -> Policy:
    """The policy in force for this test: the marker's, else ``--sandbox-policy``, else ``baseline``."""
    marker = request.node.get_closest_marker("sandbox_policy")
    name = marker.args[0] if marker and marker.args else request.config.getoption("sandbox_policy", "baseline")
    try:
        return load_policy(name)
    except SandboxError as exc:
        pytest.fail(f"pytest-sandbox: {exc}", pytrace=False)


@pytest.fixture
def sandbox(sandbox_policy: Policy, _sandbox_pool: SandboxPool) -> SandboxLauncher:
    """Launch processes under the active policy: ``sandbox.run(argv)``, ``sandbox.popen(argv)``."""
    return SandboxLauncher(_sandbox_pool, sandbox_policy, sandbox_policy.network.mode)
