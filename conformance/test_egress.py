"""Egress conformance: a process sandboxed in proxy mode has no direct route to anything.

In proxy mode the sandboxed process lives in a private network namespace where only the proxy
would listen (network.md §7), so a direct TCP connect to a canary or to a public lab origin must
fail, and the lab's canary must count nothing. The positive control proves this is not a blanket
socket ban: the same process can create an AF_INET socket and reach a listener the harness placed
on 127.0.0.1 inside that very namespace. Runs only with ``--sandbox``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from pytest_sandbox.compiler import compile_policy
from pytest_sandbox.launcher import Identity, NetworkPlacement, Sandbox, SandboxSpec
from pytest_sandbox.netns import NetnsHolder
from pytest_sandbox.ssrf_suite import SsrfJudgement
from pytest_sandbox.verdicts import Verdict

# Fixtures, until plugin.py imports pytest_sandbox.network_fixtures itself.

CONNECT_TIMEOUT_SECONDS = 2
RUN_TIMEOUT_SECONDS = 10
# Prints CONNECTED, or ERRNO <number> <name> (a timeout has no errno: ERRNO None timeout).
DIRECT_CONNECT = (
    "import errno, socket, sys\n"
    "try:\n"
    "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
    "    s.sendall(b'ping'); s.close(); print('CONNECTED')\n"
    "except OSError as e:\n"
    "    print('ERRNO', e.errno, errno.errorcode.get(e.errno or 0, 'timeout'))\n"
)
DIRECT_TARGETS = (
    ("169.254.169.254", "metadata canary"),
    ("10.0.0.1", "private 10/8 canary"),
    ("fd00:ec2::254", "IPv6 metadata canary"),
    ("11.0.0.10", "public lab origin"),
    ("2600:9000::10", "public IPv6 lab origin"),
)


@pytest.fixture(scope="module")
def proxy_mode_namespace(sandbox_lab) -> Iterator[NetnsHolder]:
    """A fresh namespace for the sandboxed process (not the lab's: nothing listens there)."""
    with NetnsHolder.start(name="egress-sandbox") as holder:
        yield holder


@pytest.fixture(scope="module")
def proxy_mode_sandbox(sandbox_session, proxy_mode_namespace) -> Iterator[Sandbox]:
    placement = NetworkPlacement("proxy", netns_path=proxy_mode_namespace.netns_path,
                                 userns_path=proxy_mode_namespace.userns_path)
    spec = SandboxSpec(compile_policy(sandbox_session.policy, "proxy"), placement, Identity.current())
    with Sandbox(spec) as sandbox:
        yield sandbox


def _direct_connect(sandbox: Sandbox, address: str, port: int) -> str:
    result = sandbox.run(["python3", "-S", "-c", DIRECT_CONNECT, address, str(port),
                          str(CONNECT_TIMEOUT_SECONDS)], timeout=RUN_TIMEOUT_SECONDS)
    out = result.stdout.decode(errors="replace").strip()
    return out if result.returncode == 0 else (
        f"exit {result.returncode} ({result.signal_name}): {out} {result.stderr.decode(errors='replace')[-300:]}")


@pytest.mark.parametrize(("address", "what"), DIRECT_TARGETS, ids=[f"direct-{a}" for a, _ in DIRECT_TARGETS])
def test_sandboxed_process_cannot_connect_directly(address, what, sandbox_lab, proxy_mode_sandbox,
                                                   network_verdict):
    before = sandbox_lab.all_hits()
    origin_before = sandbox_lab.origin_connections(address) if address in sandbox_lab.public_origins else 0
    observed = _direct_connect(proxy_mode_sandbox, address, 80)
    canary_hits = sum(sandbox_lab.all_hits().values()) - sum(before.values())
    origin_hits = (sandbox_lab.origin_connections(address) - origin_before
                   if address in sandbox_lab.public_origins else 0)
    expected = "connect fails with an errno (or times out); no lab listener sees a connection"
    evidence = f"{observed}; canary connections {canary_hits}, origin connections {origin_hits}"
    if canary_hits or origin_hits or "CONNECTED" in observed:
        judgement = SsrfJudgement(Verdict.ALLOWED, f"direct connection to the {what} succeeded", expected, evidence)
    elif observed.startswith("ERRNO"):
        judgement = SsrfJudgement(Verdict.BLOCKED, f"direct connect refused: {observed}", expected, evidence)
    else:
        judgement = SsrfJudgement(Verdict.INDETERMINATE, "the probe did not run to completion", expected, evidence)
    network_verdict("egress", f"direct-{address}", judgement, f"connect(({address!r}, 80)) from the sandbox")


def test_sandboxed_process_can_still_use_sockets_inside_its_namespace(proxy_mode_namespace, proxy_mode_sandbox,
                                                                      network_verdict):
    with proxy_mode_namespace.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        observed = _direct_connect(proxy_mode_sandbox, "127.0.0.1", port)
        listener.settimeout(RUN_TIMEOUT_SECONDS)
        received = b""
        if observed == "CONNECTED":
            peer, _ = listener.accept()
            with peer:
                peer.settimeout(RUN_TIMEOUT_SECONDS)
                received = peer.recv(16)
    expected = "AF_INET socket created, connected to the harness listener, 'ping' received"
    evidence = f"{observed}; listener received {received!r}"
    if observed == "CONNECTED" and received == b"ping":
        judgement = SsrfJudgement(Verdict.WORKS, "ordinary sockets still work in proxy mode", expected, evidence)
    else:
        judgement = SsrfJudgement(Verdict.BROKEN, "the sandbox broke plain loopback sockets", expected, evidence)
    network_verdict("egress", "loopback-control", judgement, "connect to 127.0.0.1 inside the sandbox's namespace")
