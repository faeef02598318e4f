"""Errors the harness raises for bad input or an unsupported host.

Each carries one readable sentence naming what is wrong and how to fix it; the plugin and the CLI
print that sentence instead of a traceback.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class for every error pytest-sandbox reports to a user."""


class PolicyError(SandboxError):
    """A policy file that cannot be parsed, names an unknown syscall, or uses a bad field."""


class HostUnsupportedError(SandboxError):
    """This host cannot enforce what was asked (no seccomp, no user namespaces, ...)."""


class LaunchError(SandboxError):
    """A sandboxed process could not be started; nothing was run unsandboxed."""
