"""pytest-sandbox: prove a Linux sandbox blocks what it claims to block.

The public API, for code that drives the reference sandbox or the lab itself rather than through the
pytest plugin (``pytest --sandbox``) or the ``pytest-sandbox`` console script:

* policies: :func:`load_policy` (a bundled name, a TOML policy or an OCI/Docker profile) gives a
  :class:`Policy`; :func:`compile_policy` gives its :class:`CompiledFilter` for one network mode;
* the reference launcher: :class:`Sandbox` runs commands under a :class:`SandboxSpec` (filter,
  :class:`NetworkPlacement`, :class:`Identity`) and returns a :class:`SandboxResult`, or a
  :class:`SandboxedProcess` from ``popen``;
* the network: :class:`NetworkLab` (a private namespace with a catch-all canary, public origins and a
  DNS stub), :class:`EgressProxy` with its :class:`ProxyConfig` and :class:`Decision` log,
  :class:`FakeInferenceBackend`; the fixtures' handles :class:`RunningProxy`, :class:`ProxiedSandbox`,
  :class:`InterceptionTrust` and :class:`SandboxLauncher`;
* verdicts: :class:`Verdict`, :class:`Judgement`, :class:`Outcome`;
* errors: :class:`SandboxError` and its kinds :class:`PolicyError`, :class:`HostUnsupportedError`,
  :class:`LaunchError`, each carrying one sentence that names what is wrong and the fix.

Names resolve lazily (PEP 562): ``import pytest_sandbox`` imports nothing else, because the lab's
namespace helper and the unprivileged probe runs import single modules with only the standard
library (and h11 or pyseccomp) available. Everything not listed here is private.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME: dict[str, str] = {
    "CompiledFilter": "pytest_sandbox.seccomp.compiler",
    "compile_policy": "pytest_sandbox.seccomp.compiler",
    "Decision": "pytest_sandbox.network.proxy.config",
    "EgressProxy": "pytest_sandbox.network.proxy.server",
    "ProxyConfig": "pytest_sandbox.network.proxy.config",
    "FakeInferenceBackend": "pytest_sandbox.inference.fake_backend",
    "HostUnsupportedError": "pytest_sandbox.errors",
    "LaunchError": "pytest_sandbox.errors",
    "PolicyError": "pytest_sandbox.errors",
    "SandboxError": "pytest_sandbox.errors",
    "Identity": "pytest_sandbox.seccomp.launcher",
    "NetworkPlacement": "pytest_sandbox.seccomp.launcher",
    "Sandbox": "pytest_sandbox.seccomp.launcher",
    "SandboxedProcess": "pytest_sandbox.seccomp.launcher",
    "SandboxResult": "pytest_sandbox.seccomp.launcher",
    "SandboxSpec": "pytest_sandbox.seccomp.launcher",
    "InterceptionTrust": "pytest_sandbox.network.harness",
    "ProxiedSandbox": "pytest_sandbox.network.harness",
    "RunningProxy": "pytest_sandbox.network.harness",
    "SandboxLauncher": "pytest_sandbox.fixtures.sandbox",
    "Judgement": "pytest_sandbox.verdicts.judgement",
    "Outcome": "pytest_sandbox.verdicts.judgement",
    "Verdict": "pytest_sandbox.verdicts.judgement",
    "NetworkLab": "pytest_sandbox.network.lab.lab",
    "Policy": "pytest_sandbox.policy.model",
    "load_policy": "pytest_sandbox.policy.load",
}

__all__ = ["CompiledFilter", "Decision", "EgressProxy", "FakeInferenceBackend", "HostUnsupportedError",
    "Identity", "InterceptionTrust", "Judgement", "LaunchError", "NetworkLab", "NetworkPlacement", "Outcome",
    "Policy", "PolicyError", "ProxiedSandbox", "ProxyConfig", "RunningProxy", "Sandbox", "SandboxError",
    "SandboxLauncher", "SandboxResult", "SandboxSpec", "SandboxedProcess", "Verdict", "compile_policy",
    "load_policy"]


def __getattr__(name: str) -> Any:
    """Import a public name from its home module on first use (PEP 562)."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'pytest_sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from pytest_sandbox.errors import HostUnsupportedError, LaunchError, PolicyError, SandboxError
    from pytest_sandbox.fixtures.sandbox import SandboxLauncher
    from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
    from pytest_sandbox.network.harness import InterceptionTrust, ProxiedSandbox, RunningProxy
    from pytest_sandbox.network.lab.lab import NetworkLab
    from pytest_sandbox.network.proxy.config import Decision, ProxyConfig
    from pytest_sandbox.network.proxy.server import EgressProxy
    from pytest_sandbox.policy.load import load_policy
    from pytest_sandbox.policy.model import Policy
    from pytest_sandbox.seccomp.compiler import CompiledFilter, compile_policy
    from pytest_sandbox.seccomp.launcher import (
        Identity,
        NetworkPlacement,
        Sandbox,
        SandboxedProcess,
        SandboxResult,
        SandboxSpec,
    )
    from pytest_sandbox.verdicts.judgement import Judgement, Outcome, Verdict
