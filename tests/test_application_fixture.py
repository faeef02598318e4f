"""The application fixture: real clients inside the sandbox reach inference.local only through the proxy.

``sandbox_proxied`` launches commands in their own network namespace whose only listener is a
reference proxy on 127.0.0.1:3128, with HTTP(S)_PROXY, ALL_PROXY, an empty NO_PROXY and the
interception CA variables set (network.md §4). httpx and curl, unmodified, call
``https://inference.local/v1/chat/completions`` and get the fake backend's answer; a non-inference
path on the same connection is refused with #819's 403 and only the first request reaches the
backend. Plain HTTP to a lab origin works through the proxy, and the same request with the proxy
bypassed fails: the namespace has no route anywhere else.
"""

from __future__ import annotations

import json
import sys

from pytest_sandbox.inference.fake_backend import FakeInferenceBackend
from pytest_sandbox.network.harness import INFERENCE_ROUTE_KEY, ProxiedSandbox
from pytest_sandbox.network.lab.lab import NetworkLab

RUN_TIMEOUT_SECONDS = 30
CHAT_URL = "https://inference.local/v1/chat/completions"
ADMIN_URL = "https://inference.local/admin"
CHAT_BODY = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
LAB_ORIGIN = "11.0.0.10"
DENIED_JSON = '{"error":"connection not allowed by policy"}'
WRITE_OUT = "\\n%{http_code} %{num_connects}\\n"
CURL_COULDNT_CONNECT = 7  # curl(1) EXIT CODES: "Failed to connect to host"


HTTPX_CLIENT = """
import json, sys
import httpx
# Nothing here names the proxy or the CA: httpx finds both in the environment (trust_env).
with httpx.Client(timeout=10) as client:
    chat = client.post(sys.argv[1], content=sys.argv[3], headers={
        "content-type": "application/json", "authorization": "Bearer sk-inside-the-sandbox"})
    admin = client.get(sys.argv[2])
print(json.dumps({"chat_status": chat.status_code, "chat": chat.json(),
                  "admin_status": admin.status_code, "admin": admin.text,
                  "admin_type": admin.headers.get("content-type")}))
"""


def intercepted_connections(proxied: ProxiedSandbox, since: int) -> int:
    return sum(decision.reason == "intercepted" for decision in proxied.decisions[since:])


def test_httpx_inside_the_sandbox_gets_the_backend_answer_and_a_403_for_a_non_inference_path(
        sandbox_proxied: ProxiedSandbox, inference_backend: FakeInferenceBackend) -> None:
    before, decisions_before = len(inference_backend.requests), len(sandbox_proxied.decisions)
    result = sandbox_proxied.run([sys.executable, "-c", HTTPX_CLIENT, CHAT_URL, ADMIN_URL, CHAT_BODY],
                                 timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    answer = json.loads(result.stdout)
    assert answer["chat_status"] == 200
    assert answer["chat"]["choices"][0]["message"]["content"] == "Hello from the fake backend"
    assert (answer["admin_status"], answer["admin"]) == (403, DENIED_JSON)
    assert answer["admin_type"] == "application/json"
    arrived = inference_backend.requests[before:]
    assert [(r.method, r.path) for r in arrived] == [("POST", "/v1/chat/completions")]
    assert arrived[0].header_values("authorization") == [f"Bearer {INFERENCE_ROUTE_KEY}"]
    assert intercepted_connections(sandbox_proxied, decisions_before) == 1, "both requests used one connection"


def test_curl_inside_the_sandbox_gets_the_backend_answer_then_a_403_on_the_same_connection(
        sandbox_proxied: ProxiedSandbox, inference_backend: FakeInferenceBackend) -> None:
    before, decisions_before = len(inference_backend.requests), len(sandbox_proxied.decisions)
    # --next starts a second transfer in the same curl process; curl reuses the open connection.
    result = sandbox_proxied.run(
        ["curl", "-sS", "--max-time", "10", CHAT_URL, "-H", "content-type: application/json",
         "-H", "authorization: Bearer sk-inside-the-sandbox", "-d", CHAT_BODY, "-w", WRITE_OUT,
         "--next", "-sS", "--max-time", "10", ADMIN_URL, "-w", WRITE_OUT],
        timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    chat_body, chat_status, admin_body, admin_status = result.stdout.decode().split("\n")[:4]
    assert chat_status == "200 1"
    assert json.loads(chat_body)["choices"][0]["message"]["content"] == "Hello from the fake backend"
    assert (admin_body, admin_status) == (DENIED_JSON, "403 0"), "the 403 came on the reused connection"
    arrived = inference_backend.requests[before:]
    assert [(r.method, r.path) for r in arrived] == [("POST", "/v1/chat/completions")]
    assert "sk-inside-the-sandbox" not in repr(arrived[0].headers)
    assert intercepted_connections(sandbox_proxied, decisions_before) == 1


def test_plain_http_to_a_lab_origin_works_through_the_proxy(
        sandbox_proxied: ProxiedSandbox, _network_lab: NetworkLab) -> None:
    before = len(_network_lab.origin_requests(LAB_ORIGIN))
    result = sandbox_proxied.run(["curl", "-sS", "--max-time", "10", "-D", "-", f"http://{LAB_ORIGIN}/app-control"],
                                 timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.startswith(b"HTTP/1.1 200")
    assert f"x-lab-origin: {LAB_ORIGIN}".encode() in result.stdout.lower()
    assert [r.target for r in _network_lab.origin_requests(LAB_ORIGIN)[before:]] == ["/app-control"]


def test_bypassing_the_proxy_fails_because_the_sandbox_has_no_other_route(
        sandbox_proxied: ProxiedSandbox, _network_lab: NetworkLab) -> None:
    connections = _network_lab.origin_connections(LAB_ORIGIN)
    result = sandbox_proxied.run(["curl", "-sS", "--max-time", "5", "--noproxy", "*", f"http://{LAB_ORIGIN}/direct"],
                                 timeout=RUN_TIMEOUT_SECONDS)
    assert result.returncode == CURL_COULDNT_CONNECT, (result.returncode, result.stderr.decode()[-500:])
    assert _network_lab.origin_connections(LAB_ORIGIN) == connections
