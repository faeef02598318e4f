"""What the broken-proxy tests share: judging a proxy over the smuggling catalogue, a private fake
backend, and the reference proxy serving a broken ``inference.local`` interceptor.

A broken interceptor gets a backend of its own so that what it lets through never lands in the
session backend's log (the conformance suite judges that log as a whole).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.inference.interceptor import InferenceBackendConfig
from pytest_sandbox.inference.routing import INFERENCE_HOST, INFERENCE_PORT
from pytest_sandbox.network.harness import RunningProxy, lab_proxy_config
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.proxy.config import InterceptHandler
from pytest_sandbox.network.proxy.server import EgressProxy
from pytest_sandbox.network.third_party import ThirdPartyProxy
from pytest_sandbox.probes.smuggling import SMUGGLING_CONCURRENCY, build_attempts, run_smuggling_campaign
from pytest_sandbox.verdicts.judgement import Judgement

PUBLIC_ORIGIN = "11.0.0.10"
DENIED_CANARY = "10.0.0.1"
TIMEOUT_SECONDS = 1.0


def quoted_prefix(payload: bytes, length: int = 40) -> str:
    """How the first bytes of ``payload`` appear inside a verdict that quotes the bytes (repr of bytes
    holding the whole payload: Python quotes with ``"`` when they hold a ``'`` and no ``"``)."""
    quoted = repr(payload[:length])[:-1]
    if b"'" in payload and b'"' not in payload and b"'" not in payload[:length]:
        return 'b"' + quoted[2:]
    return quoted


def judge_catalogue(running: RunningProxy | ThirdPartyProxy, lab: NetworkLab, backend: FakeInferenceBackend,
                    ca_pem: bytes, path: str, *, concurrency: int = SMUGGLING_CONCURRENCY) -> dict[str, Judgement]:
    """Every smuggling case on ``path`` against ``running``, as one campaign: case id -> judgement."""
    attempts = build_attempts(paths=[path])
    results = run_smuggling_campaign(attempts, running.connect, lab, backend, ca_pem, origin=PUBLIC_ORIGIN,
                                     denied=DENIED_CANARY, timeout=TIMEOUT_SECONDS, concurrency=concurrency)
    return {attempt.case.case_id: results[attempt.test_id][0] for attempt in attempts}


@contextlib.contextmanager
def private_backend(lab: NetworkLab, name: str, address: str, key: str) -> Iterator[FakeInferenceBackend]:
    """A fake backend of its own at ``name`` (``address``:443 in the lab), stopped on exit."""
    lab.add_name(name, [address])
    backend = FakeInferenceBackend(name, key)
    listener = lab.listen(address, 443)
    try:
        backend.start_in_thread(listener)
    except BaseException:
        listener.close()
        raise
    try:
        yield backend
    finally:
        backend.stop()


def backend_config(backend: FakeInferenceBackend) -> InferenceBackendConfig:
    """How an interceptor reaches ``backend`` over verified TLS, with its route key."""
    return InferenceBackendConfig(host=backend.name, port=443, api_key=backend.api_key,
                                  server_hostname=backend.name, ca_pem=backend.ca_pem)


@contextlib.contextmanager
def proxy_with_interceptor(lab: NetworkLab, handler: InterceptHandler, port: int,
                           proxy_class: type[EgressProxy] = EgressProxy) -> Iterator[RunningProxy]:
    """The reference proxy (or ``proxy_class``) on 127.0.0.1:``port`` in the lab, handing ``inference.local:443``
    to ``handler``."""

    def intercept(host: str, target_port: int) -> InterceptHandler | None:
        return handler if (host, target_port) == (INFERENCE_HOST, INFERENCE_PORT) else None

    listener = lab.listen("127.0.0.1", port)
    proxy = proxy_class(lab_proxy_config(), resolver=lab.resolver(), socket_factory=lab.socket,
                        route_socket_factory=lab.route_socket, connect_interceptor=intercept)
    try:
        proxy.start_in_thread(listener)
    except BaseException:
        listener.close()
        raise
    running = RunningProxy(proxy, lab, "127.0.0.1", port)
    try:
        yield running
    finally:
        running.stop()
