"""The reference proxy's self check, in the lab: every spelling of its own address, and every local
address of a wildcard listener (including one added after it started), is refused before any dial.

Each test also runs the pre-fix check (tests/broken_self_check_proxy.py) on the same input and shows
it loops, so these tests can fail.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Callable, Iterator

import pytest
from broken_self_check_proxy import TextSelfCheckProxy
from wire import read_head

from pytest_sandbox.catalogues.self_cases import spellings_for
from pytest_sandbox.http.responses import ParsedResponse, parse_head
from pytest_sandbox.network.addresses import AddressVerdict, classify_address
from pytest_sandbox.network.harness import lab_proxy_config
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.netns import NetnsHolder, host_can_create_netns
from pytest_sandbox.network.proxy.server import EgressProxy
from pytest_sandbox.network.socket_table import peers_of, read_tcp_table

IO_TIMEOUT = 3.0
_ports = itertools.count(8170)


def allow_every_address(address: str) -> AddressVerdict:
    """A classifier that lets every wrapper through: only the self check is left to refuse."""
    return AddressVerdict(address, False, "public", None)


def serve(lab: NetworkLab, address: str, proxy_class: type[EgressProxy] = EgressProxy,
          classify: Callable[[str], AddressVerdict] = classify_address) -> tuple[EgressProxy, int]:
    port = next(_ports)
    listener = lab.listen(address, port)
    proxy = proxy_class(lab_proxy_config(allowed_ports=(80, 443, port), classify=classify), resolver=lab.resolver(),
                        socket_factory=lab.socket, route_socket_factory=lab.route_socket)
    proxy.start_in_thread(listener)
    return proxy, port


@pytest.fixture
def proxies() -> Iterator[list[EgressProxy]]:
    started: list[EgressProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def connect_through(lab: NetworkLab, proxy_port: int, authority: str, via: str = "127.0.0.1") -> tuple[int | None, str]:
    """CONNECT ``authority`` through the proxy at ``via``:``proxy_port``: (status, JSON detail or '')."""
    with lab.connect(via, proxy_port, timeout=IO_TIMEOUT) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        reply = read_connect_answer(sock)
    try:
        detail = json.loads(reply.body)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = ""
    return reply.status, detail


def read_connect_answer(sock: socket.socket) -> ParsedResponse:
    """The proxy's answer to a CONNECT: the head (a 2xx opens a tunnel that stays open), or the
    whole refusal."""
    data = read_head(sock)
    reply = parse_head(data)
    if reply.status is not None and 200 <= reply.status < 300:
        return reply
    while chunk := sock.recv(65536):
        data += chunk
    return parse_head(data)


def loops_at(lab: NetworkLab, endpoint: tuple[str, int], harness: set[tuple[str, int]]) -> set[tuple[str, int]]:
    return set(peers_of(read_tcp_table(lab.holder.pid, port=endpoint[1]), endpoint)) - harness


def fresh_address(lab: NetworkLab) -> str:
    # Not a bind(2) probe: the catch-all's AnyIP routes make every IPv4 address bindable in the lab.
    owned = lab.owned_addresses()
    for host in range(200, 250):
        address = f"11.0.0.{host}"
        if address not in owned:
            return address
    raise AssertionError("no unused 11.0.0.x address left in the lab")


SPELLINGS = spellings_for(4)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=[s.spelling_id for s in SPELLINGS])
def test_every_spelling_of_the_public_listening_address_is_refused_as_a_self_connection(
        _network_lab, proxies, spelling):
    lab = _network_lab
    # Every wrapper is let through by the classifier, so the self check alone must unwrap it.
    proxy, port = serve(lab, "11.0.0.22", classify=allow_every_address)
    proxies.append(proxy)
    name = f"self-{spelling.spelling_id}-{port}.lab.test"
    host, records = spelling.render("11.0.0.22", name)
    if records:
        lab.add_name(name, records)
    status, detail = connect_through(lab, port, f"{host}:{port}", via="11.0.0.22")
    assert status == 403
    assert "self connection" in detail and "11.0.0.22:" in detail, detail
    assert len(proxy.decisions) == 1  # nothing came back in through the proxy


MAPPED = [s for s in SPELLINGS if s.spelling_id in ("mapped", "mapped-hex", "mapped-expanded", "name-aaaa-mapped")]


@pytest.mark.parametrize("spelling", MAPPED, ids=[s.spelling_id for s in MAPPED])
def test_the_pre_fix_text_comparison_loops_on_the_mapped_spellings(_network_lab, proxies, spelling):
    lab = _network_lab
    proxy, port = serve(lab, "11.0.0.22", TextSelfCheckProxy)
    proxies.append(proxy)
    name = f"old-self-{spelling.spelling_id}-{port}.lab.test"
    host, records = spelling.render("11.0.0.22", name)
    if records:
        lab.add_name(name, records)
    status, _detail = connect_through(lab, port, f"{host}:{port}", via="11.0.0.22")
    assert status == 200  # the tunnel was opened to the proxy itself
    assert len(proxy.decisions) >= 1 and proxy.decisions[0].reason == "routed"


def test_wildcard_listener_refuses_every_local_address_even_one_added_after_it_started(_network_lab, proxies):
    lab = _network_lab
    proxy, port = serve(lab, "0.0.0.0")
    proxies.append(proxy)
    later = fresh_address(lab)
    lab.holder.add_address(later)  # the proxy never saw this address at start
    for target in ("11.0.0.10", "127.0.0.1", "127.0.0.9", later, f"[::ffff:{later}]"):
        status, detail = connect_through(lab, port, f"{target}:{port}")
        assert status == 403, target
        if not target.startswith("127."):
            assert "every local address" in detail, detail
    assert all(decision.action == "deny" for decision in proxy.decisions)
    # Positive control: the same proxy still tunnels to another port of a local address.
    status, _ = connect_through(lab, port, "11.0.0.10:80")
    assert status == 200


def test_pre_fix_wildcard_check_loops_through_a_local_address(_network_lab, proxies):
    lab = _network_lab
    proxy, port = serve(lab, "0.0.0.0", TextSelfCheckProxy)
    proxies.append(proxy)
    with lab.connect("127.0.0.1", port, timeout=IO_TIMEOUT) as sock:
        harness = {sock.getsockname()[:2]}
        sock.sendall(f"CONNECT 11.0.0.10:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert read_connect_answer(sock).status == 200
        assert loops_at(lab, ("11.0.0.10", port), harness)  # the kernel saw the proxy dial itself


def test_a_proxy_that_cannot_tell_what_is_local_refuses_rather_than_loops(_network_lab, proxies):
    lab = _network_lab

    def no_sockets_for_probes(family: int) -> socket.socket:
        raise OSError("no socket")

    port = next(_ports)
    listener = lab.listen("0.0.0.0", port)
    proxy = EgressProxy(lab_proxy_config(allowed_ports=(port,)), resolver=lab.resolver(),
                        socket_factory=no_sockets_for_probes, route_socket_factory=lab.route_socket)
    proxy.start_in_thread(listener)
    proxies.append(proxy)
    status, detail = connect_through(lab, port, f"11.0.0.10:{port}")
    assert status == 403 and "self connection" in detail


# --------------------------------------------------------------------------------------------------
# Outside the lab: a namespace with AnyIP routes and no catch-all, where the kernel alone decides
# --------------------------------------------------------------------------------------------------

NETNS_OK, NETNS_REASON = host_can_create_netns()
ANYIP_DESTINATION = "2600:9000::77"  # on no interface; `local ::/0 dev lo` delivers it to a :: listener


@pytest.fixture
def anyip_holder() -> Iterator[NetnsHolder]:
    if not NETNS_OK:
        pytest.skip(f"cannot create network namespaces: {NETNS_REASON}")
    with NetnsHolder.start(name="test-anyip") as holder:
        for family in ("-4", "-6"):
            holder.run(["ip", family, "route", "add", "local", "0.0.0.0/0" if family == "-4" else "::/0",
                        "dev", "lo"], check=True, capture_output=True)
        yield holder


def _connect_in(holder: NetnsHolder, proxy_port: int, authority: str) -> tuple[int | None, str, set[tuple[str, int]]]:
    with holder.socket(socket.AF_INET6) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.connect(("::1", proxy_port))
        harness = {(str(sock.getsockname()[0]), int(sock.getsockname()[1]))}
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        reply = read_connect_answer(sock)
        loops = set(peers_of(read_tcp_table(holder.pid, port=proxy_port), (ANYIP_DESTINATION, proxy_port))) - harness
    try:
        detail = json.loads(reply.body)["detail"]
    except (ValueError, KeyError, TypeError):
        detail = ""
    return reply.status, detail, loops


def _serve_in(holder: NetnsHolder, with_routes: bool) -> tuple[EgressProxy, int]:
    async def no_names(name: str) -> list[str]:
        return []

    port = next(_ports)
    listener = holder.socket(socket.AF_INET6)
    listener.bind(("::", port))
    listener.listen(16)
    routes = (lambda: holder.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)) if with_routes else None
    proxy = EgressProxy(lab_proxy_config(allowed_ports=(port, port + 1000), classify=allow_every_address),
                        resolver=no_names,
                        socket_factory=lambda family: holder.socket(family), route_socket_factory=routes)
    proxy.start_in_thread(listener)
    return proxy, port


def test_wildcard_listener_refuses_an_anyip_routed_ipv6_address_that_does_not_bind(anyip_holder, proxies):
    proxy, port = _serve_in(anyip_holder, with_routes=True)
    proxies.append(proxy)
    status, detail, loops = _connect_in(anyip_holder, port, f"[{ANYIP_DESTINATION}]:{port}")
    assert status == 403 and "self connection" in detail and "every local address" in detail, detail
    assert not loops
    # Positive control: another port of the same address is another service, and it is dialled.
    status, _detail, _loops = _connect_in(anyip_holder, port, f"[{ANYIP_DESTINATION}]:{port + 1000}")
    assert status == 502  # nothing listens there: the proxy tried, and said so


def test_a_bind_probe_alone_misses_anyip_routes_and_loops(anyip_holder, proxies):
    # The check before the route lookup (no route socket): bind(2) refuses an IPv6 address on no
    # interface, so the proxy dialled it, and the kernel delivered that to its own :: listener.
    proxy, port = _serve_in(anyip_holder, with_routes=False)
    proxies.append(proxy)
    status, _detail, loops = _connect_in(anyip_holder, port, f"[{ANYIP_DESTINATION}]:{port}")
    assert status == 200 and loops, (status, loops)
