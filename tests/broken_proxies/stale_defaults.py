"""Deliberately broken proxies that ignore the policy the session enforces (issue #8 item 6).

``start_stale_proxy`` is the reference proxy as it was wired before the policy drove it: the
built-in defaults for the allowlist (``ProxyConfig()``) and for the inference routes, whatever
``--sandbox-policy`` says. Against the baseline it is indistinguishable from the reference; against a
policy that changes a route or a port the conformance suite must fail it, naming the route or port.

``STALE_PROXY_CONFTEST`` is a conftest that makes it the session's ``sandbox_proxy``.
"""

from __future__ import annotations

from pytest_sandbox.fixtures.network import LAB_PROXY_TIMEOUTS, RunningProxy, interception_of, start_proxy
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.proxy.config import ProxyConfig


def start_stale_proxy(lab: NetworkLab, port: int = 3128) -> RunningProxy:
    """The reference proxy on its usual address, with the defaults instead of the policy."""
    return start_proxy(lab, ProxyConfig(**LAB_PROXY_TIMEOUTS), port=port,  # type: ignore[arg-type]
                       interception=interception_of(lab), routes=None)


STALE_PROXY_CONFTEST = '''
import sys

import pytest

sys.path.insert(0, {tests!r})
from broken_proxies.stale_defaults import start_stale_proxy


@pytest.fixture(scope="session")
def sandbox_proxy(sandbox_session, sandbox_lab):
    running = start_stale_proxy(sandbox_lab)
    yield running
    running.stop()
'''
