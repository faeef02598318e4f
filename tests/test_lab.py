"""The network lab: namespace holder, guard, the catch-all canary, lab-only origins and the DNS stub.

Safety: no test here sends a packet from the host namespace to anything but loopback. Every socket
that connects to a canary or origin comes from a lab namespace; the guard tests never connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest

from pytest_sandbox.errors import HostUnsupportedError
from pytest_sandbox.network.addresses import classify_address
from pytest_sandbox.network.dns_stub import (
    DnsFormatError,
    DnsQuery,
    DnsZone,
    QueryType,
    ResponseCode,
    answer_query,
    decode_name,
    encode_name,
    encode_query,
    encode_response,
    parse_query,
    parse_response,
)
from pytest_sandbox.network.lab.lab import LAB_PUBLIC_ORIGINS, NetworkLab
from pytest_sandbox.network.lab.origin import ORIGIN_RECORD_LIMIT
from pytest_sandbox.network.netns import (
    HARNESS_MARK,
    SOCKET_BATCH,
    NetnsHolder,
    assert_not_host_netns,
    catch_all_ruleset,
    ensure_lab_socket,
    host_can_create_netns,
    parse_syn_counts,
    socket_netns_inode,
)
from pytest_sandbox.network.socket_table import read_tcp_table

CANARIES = ("10.0.0.1", "169.254.169.254", "100.64.0.1", "fd00:ec2::254", "127.0.0.1")
HOST_NETNS_PATH = "/proc/self/ns/net"
NOBODY = 65534


def _host_netns_id() -> tuple[int, int]:
    info = os.stat(HOST_NETNS_PATH)
    return (info.st_dev, info.st_ino)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


NETNS_OK, NETNS_REASON = host_can_create_netns()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")


@pytest.fixture(scope="module")
def shared_lab() -> Iterator[NetworkLab]:
    if not NETNS_OK:
        pytest.skip(f"cannot create network namespaces: {NETNS_REASON}")
    lab = NetworkLab.start(CANARIES, name="test-lab", idle_timeout=2.0)
    yield lab
    lab.close()


@pytest.fixture
def lab(shared_lab: NetworkLab) -> NetworkLab:
    shared_lab.reset_hits()
    shared_lab.set_zone({})
    return shared_lab


@pytest.fixture
def holder() -> Iterator[NetnsHolder]:
    if not NETNS_OK:
        pytest.skip(f"cannot create network namespaces: {NETNS_REASON}")
    with NetnsHolder.start(name="test-holder") as started:
        yield started


def _http_get(sock: socket.socket, target: str = "/", host: str = "lab.test") -> bytes:
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return _read_until_closed(sock)


def _read_until_closed(sock: socket.socket, limit: int = 65536) -> bytes:
    received = b""
    while len(received) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


# --------------------------------------------------------------------------------------------------
# DNS wire format (pure)
# --------------------------------------------------------------------------------------------------


def test_query_encoding_round_trips_through_parse_query() -> None:
    wire = encode_query("Metadata.Lab.Test", QueryType.AAAA, 0xBEEF)
    query = parse_query(wire)
    assert query == DnsQuery(query_id=0xBEEF, name="Metadata.Lab.Test", qtype=QueryType.AAAA)
    assert wire[12:] == b"\x08Metadata\x03Lab\x04Test\x00\x00\x1c\x00\x01"


def test_response_answers_point_at_the_question_name_and_parse_back() -> None:
    query = DnsQuery(query_id=7, name="mixed.lab.test", qtype=QueryType.A)
    wire = encode_response(query, ["11.0.0.10", "10.0.0.1"])
    assert wire.count(b"\xc0\x0c") == 2  # RFC 1035 §4.1.4 pointer to offset 12
    response = parse_response(wire)
    assert response.query_id == 7
    assert response.rcode == ResponseCode.NOERROR
    assert response.question_name == "mixed.lab.test"
    assert response.addresses == ["11.0.0.10", "10.0.0.1"]
    assert [answer.name for answer in response.answers] == ["mixed.lab.test"] * 2
    assert {answer.ttl for answer in response.answers} == {0}


def test_decode_name_follows_a_pointer_into_the_middle_of_an_earlier_name() -> None:
    message = b"\x00" * 12 + b"\x03www\x07example\x04test\x00" + b"\x03api\xc0\x10"
    first, after_first = decode_name(message, 12)
    second, after_second = decode_name(message, after_first)
    assert first == "www.example.test"
    assert second == "api.example.test"
    assert after_second == len(message)


@pytest.mark.parametrize(
    ("message", "offset", "problem"),
    [
        (b"\x00" * 12 + b"\xc0\x0c", 12, "points at itself (a loop)"),
        (b"\x00" * 12 + b"\xc0\x0e\x00", 12, "points forwards"),
        (b"\x00" * 12 + b"\x05ab", 12, "label runs past the end"),
        (b"\x00" * 12 + b"\x03abc", 12, "no terminating root label"),
        (b"\x00" * 12 + b"\x40abc\x00", 12, "reserved 01 label type"),
        (b"\x00" * 12 + b"\xc0", 12, "truncated pointer"),
        (b"\x00" * 12 + (b"\x3f" + b"a" * 63) * 4 + b"\x00", 12, "name over 255 octets"),
    ],
)
def test_decode_name_rejects_malformed_names(message: bytes, offset: int, problem: str) -> None:
    with pytest.raises(DnsFormatError):
        decode_name(message, offset)


@pytest.mark.parametrize(
    "name", ["a..test", "x" * 64 + ".test", "münchen.test", ".".join(["abcdefghi"] * 26)]
)
def test_encode_name_rejects_names_rfc_1035_cannot_carry(name: str) -> None:
    with pytest.raises(DnsFormatError):
        encode_name(name)


def test_parse_query_refuses_a_response_and_multiple_questions() -> None:
    response = encode_response(DnsQuery(1, "a.test", QueryType.A), ["11.0.0.10"])
    with pytest.raises(DnsFormatError):
        parse_query(response)
    two_questions = bytearray(encode_query("a.test", QueryType.A, 1))
    two_questions[4:6] = b"\x00\x02"
    with pytest.raises(DnsFormatError):
        parse_query(bytes(two_questions))


def test_parse_response_rejects_an_a_record_with_the_wrong_length() -> None:
    wire = bytearray(encode_response(DnsQuery(1, "a.test", QueryType.A), ["11.0.0.10"]))
    wire[-6:-4] = b"\x00\x03"  # RDLENGTH 3 for an A record
    with pytest.raises(DnsFormatError):
        parse_response(bytes(wire[:-1]))


# --------------------------------------------------------------------------------------------------
# The zone and answering (pure)
# --------------------------------------------------------------------------------------------------


def _ask(zone: DnsZone, name: str, qtype: int = QueryType.A, query_id: int = 0x1234) -> tuple[int, list[str]]:
    reply = answer_query(zone, encode_query(name, qtype, query_id))
    assert reply is not None
    response = parse_response(reply)
    assert response.query_id == query_id
    return response.rcode, response.addresses


def test_multi_answer_name_returns_every_address_of_the_asked_family() -> None:
    zone = DnsZone({"mixed.test": ["11.0.0.10", "10.0.0.1", "2600:9000::10", "fd00:ec2::254"]})
    assert _ask(zone, "mixed.test", QueryType.A) == (ResponseCode.NOERROR, ["11.0.0.10", "10.0.0.1"])
    assert _ask(zone, "mixed.test", QueryType.AAAA) == (
        ResponseCode.NOERROR, ["2600:9000::10", "fd00:ec2::254"])


def test_names_match_case_insensitively_and_ignore_the_root_dot() -> None:
    zone = DnsZone({"Meta.Test.": ["169.254.169.254"]})
    assert _ask(zone, "mEtA.tEsT") == (ResponseCode.NOERROR, ["169.254.169.254"])


def test_unknown_name_is_nxdomain() -> None:
    assert _ask(DnsZone({"known.test": ["11.0.0.10"]}), "unknown.test") == (ResponseCode.NXDOMAIN, [])


def test_known_name_without_records_of_the_asked_type_is_nodata_not_nxdomain() -> None:
    assert _ask(DnsZone({"v4only.test": ["11.0.0.10"]}), "v4only.test", QueryType.AAAA) == (
        ResponseCode.NOERROR, [])


def test_rebinding_name_alternates_public_then_loopback_for_each_query_type() -> None:
    zone = DnsZone()
    zone.add_rebinding_name("rbnd.test", [["11.0.0.10", "2600:9000::10"], ["127.0.0.1", "::1"]])
    answers = []
    for _ in range(2):
        # getaddrinfo asks A and AAAA together; neither may consume the other's step.
        answers.append((_ask(zone, "rbnd.test", QueryType.A)[1], _ask(zone, "rbnd.test", QueryType.AAAA)[1]))
    answers.append((_ask(zone, "rbnd.test", QueryType.A)[1], _ask(zone, "rbnd.test", QueryType.AAAA)[1]))
    assert answers == [
        (["11.0.0.10"], ["2600:9000::10"]),
        (["127.0.0.1"], ["::1"]),
        (["11.0.0.10"], ["2600:9000::10"]),
    ]


def test_stub_never_answers_a_response() -> None:
    response = encode_response(DnsQuery(1, "a.test", QueryType.A), ["11.0.0.10"])
    assert answer_query(DnsZone({"a.test": ["11.0.0.10"]}), response) is None
    assert answer_query(DnsZone(), b"\x00\x01") is None


def test_malformed_question_gets_formerr_and_other_opcodes_get_notimp() -> None:
    malformed = encode_query("a.test", QueryType.A, 9)[:-3]
    assert parse_response(answer_query(DnsZone(), malformed) or b"").rcode == ResponseCode.FORMERR
    status_opcode = bytearray(encode_query("a.test", QueryType.A, 9))
    status_opcode[2] |= 2 << 3  # opcode 2 (STATUS)
    assert parse_response(answer_query(DnsZone(), bytes(status_opcode)) or b"").rcode == ResponseCode.NOTIMP


def test_answers_that_overflow_512_octets_are_cut_and_marked_truncated() -> None:
    many = [f"11.0.{i // 250}.{i % 250 + 1}" for i in range(60)]
    reply = answer_query(DnsZone({"big.test": many}), encode_query("big.test", QueryType.A, 1))
    assert reply is not None and len(reply) <= 512
    response = parse_response(reply)
    assert response.truncated
    assert 0 < len(response.addresses) < 60
    assert response.addresses == many[: len(response.addresses)]


def test_zone_logs_every_question() -> None:
    zone = DnsZone({"a.test": ["11.0.0.10"]})
    _ask(zone, "A.test", QueryType.A)
    _ask(zone, "missing.test", QueryType.AAAA)
    assert zone.queries() == [("a.test", QueryType.A), ("missing.test", QueryType.AAAA)]


# --------------------------------------------------------------------------------------------------
# The namespace holder and the guard
# --------------------------------------------------------------------------------------------------


@needs_netns
def test_holder_process_is_gone_after_close_and_close_is_idempotent() -> None:
    holder = NetnsHolder.start(name="lifecycle")
    pid = holder.pid
    assert _process_exists(pid)
    holder.close()
    holder.close()
    assert not _process_exists(pid)
    with pytest.raises(RuntimeError, match="closed"):
        holder.socket()


def test_holder_sockets_live_in_the_holders_namespace_not_the_hosts(holder: NetnsHolder) -> None:
    with holder.socket() as stream, holder.socket(socket.AF_INET6, socket.SOCK_DGRAM) as datagram:
        assert socket_netns_inode(stream) == holder.netns_id
        assert socket_netns_inode(datagram) == holder.netns_id
    assert holder.netns_id != _host_netns_id()
    assert os.stat(holder.netns_path).st_ino == holder.netns_id[1]


def _open_fds() -> set[str]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            found.add(f"{name} {os.readlink(f'/proc/self/fd/{name}')}")
    return found


def test_a_batch_of_sockets_costs_one_request_and_each_is_fresh_marked_in_the_lab_and_close_on_exec(
        holder: NetnsHolder, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = []
    exchange = holder._exchange
    monkeypatch.setattr(holder, "_exchange", lambda message, **kw: requests.append(message) or exchange(message, **kw))
    made = [holder.socket(socket.AF_INET, socket.SOCK_STREAM, mark=HARNESS_MARK, batch=SOCKET_BATCH)
            for _ in range(SOCKET_BATCH + 1)]
    try:
        assert [request["count"] for request in requests] == [SOCKET_BATCH, SOCKET_BATCH]
        assert len({sock.fileno() for sock in made}) == len(made)
        for sock in made:
            assert socket_netns_inode(sock) == holder.netns_id
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == HARNESS_MARK
            assert not os.get_inheritable(sock.fileno())  # never handed to a process the harness starts
            with pytest.raises(OSError, match="not connected"):
                sock.getpeername()
            assert sock.getsockname() == ("0.0.0.0", 0)
        # Another kind is never served from that pool: no mark, and not transparent.
        with holder.socket(socket.AF_INET, socket.SOCK_STREAM, batch=SOCKET_BATCH) as unmarked:
            assert unmarked.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
        assert len(requests) == 3
        with holder.socket(socket.AF_INET, socket.SOCK_STREAM, mark=HARNESS_MARK) as one:
            assert socket_netns_inode(one) == holder.netns_id and not os.get_inheritable(one.fileno())
        assert len(requests) == 3  # the pool's
    finally:
        for sock in made:
            sock.close()


def test_closing_the_holder_closes_the_sockets_waiting_in_its_pool() -> None:
    if not NETNS_OK:
        pytest.skip(f"cannot create network namespaces: {NETNS_REASON}")
    before = _open_fds()
    holder = NetnsHolder.start(name="pool")
    holder.socket(mark=HARNESS_MARK, batch=SOCKET_BATCH).close()
    holder.socket(socket.AF_INET6, batch=SOCKET_BATCH).close()
    assert len(_open_fds() - before) >= 2 * (SOCKET_BATCH - 1)
    holder.close()
    assert _open_fds() - before == set()
    with pytest.raises(RuntimeError, match="closed"):
        holder.socket(mark=HARNESS_MARK, batch=SOCKET_BATCH)


def test_a_holder_whose_helper_stopped_answering_hands_out_nothing_from_its_pool() -> None:
    if not NETNS_OK:
        pytest.skip(f"cannot create network namespaces: {NETNS_REASON}")
    holder = NetnsHolder.start(name="pool-dead-helper")
    try:
        holder.socket(mark=HARNESS_MARK, batch=SOCKET_BATCH).close()  # 31 wait in the pool
        os.kill(holder.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"stopped answering|exited unexpectedly"):
            holder.add_address("10.9.9.9")
        with pytest.raises(RuntimeError, match="closed"):
            holder.socket(mark=HARNESS_MARK, batch=SOCKET_BATCH)
    finally:
        holder.close()


def test_fresh_holder_has_loopback_up_so_127_0_0_1_binds_and_connects(holder: NetnsHolder) -> None:
    with holder.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with holder.socket() as client:
            client.settimeout(5)
            client.connect(listener.getsockname())
            accepted, _peer = listener.accept()
            with accepted:
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"


def test_added_ipv4_and_ipv6_addresses_are_bindable_only_inside_the_namespace(holder: NetnsHolder) -> None:
    holder.add_address("10.0.0.1")
    holder.add_address("fd00:ec2::254")
    holder.add_address("127.0.0.7")  # already local through 127.0.0.0/8: a no-op, not an error
    with holder.socket() as v4, holder.socket(socket.AF_INET6) as v6:
        v4.bind(("10.0.0.1", 0))
        v6.bind(("fd00:ec2::254", 0))


def test_run_executes_commands_inside_the_namespace(holder: NetnsHolder) -> None:
    result = holder.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"net:[{holder.netns_id[1]}]"


def test_popen_starts_a_stoppable_process_inside_the_namespace(holder: NetnsHolder) -> None:
    process = holder.popen(["sh", "-c", "readlink /proc/self/ns/net && exec sleep 30"],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == f"net:[{holder.netns_id[1]}]"
        # nsenter and sh exec in place: the PID we hold is the command inside the namespace.
        assert os.stat(f"/proc/{process.pid}/ns/net").st_ino == holder.netns_id[1]
    finally:
        process.kill()
        process.wait(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


def test_guard_refuses_a_host_socket_before_anything_is_sent() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as host_socket:
        with pytest.raises(RuntimeError, match="refusing to run a network probe outside a lab namespace"):
            ensure_lab_socket(host_socket)
        with pytest.raises(OSError):  # ENOTCONN: the check itself never connected or sent anything
            host_socket.getpeername()


def test_guard_refuses_the_host_namespace_path() -> None:
    with pytest.raises(RuntimeError, match="outside a lab namespace"):
        assert_not_host_netns(HOST_NETNS_PATH)


def test_guard_accepts_a_holder_namespace(holder: NetnsHolder) -> None:
    assert_not_host_netns(holder.netns_path)
    with holder.socket() as sock:
        ensure_lab_socket(sock, holder.netns_id)


class _NeverConnects(socket.socket):
    """A host socket that fails the test instead of sending a SYN, should the guard ever let it by."""

    def connect(self, address: object) -> None:
        raise AssertionError(f"the guard let a host socket connect to {address!r}")


def test_lab_connect_refuses_a_host_socket_aimed_at_a_canary(
        lab: NetworkLab, monkeypatch: pytest.MonkeyPatch) -> None:
    def host_socket(*_args: int, **_options: object) -> socket.socket:
        return _NeverConnects(socket.AF_INET, socket.SOCK_STREAM)

    monkeypatch.setattr(lab.holder, "socket", host_socket)
    with pytest.raises(RuntimeError, match="host network namespace"):
        lab.connect("10.0.0.1", 80)
    with pytest.raises(RuntimeError, match="host network namespace"):
        lab.dial("10.0.0.1", 80)
    monkeypatch.undo()
    assert lab.canary_hits("10.0.0.1") == 0


def test_guard_refuses_a_socket_from_another_lab(lab: NetworkLab, holder: NetnsHolder) -> None:
    with holder.socket() as foreign, pytest.raises(RuntimeError, match="not in the expected lab"):
        ensure_lab_socket(foreign, lab.netns_id)


# --------------------------------------------------------------------------------------------------
# The catch-all canary
# --------------------------------------------------------------------------------------------------


def test_ruleset_diverts_only_first_segments_nobody_owns_and_lets_the_harness_through() -> None:
    rules = catch_all_ruleset(40001, 40002)
    assert "tcp flags & (fin | syn | rst | ack) != syn accept" in rules
    assert f"meta mark {HARNESS_MARK:#x} accept" in rules
    assert "socket wildcard 0 accept" in rules
    assert "tproxy ip to 127.0.0.1:40001" in rules and "tproxy ip6 to [::1]:40002" in rules
    catch_all = rules[rules.index("chain catch_all"):]
    assert catch_all.index("socket wildcard 0 accept") < catch_all.index("socket transparent 0 accept") \
        < catch_all.index("goto divert\n    }")
    with pytest.raises(ValueError, match=r"not in 1\.\.65535"):
        catch_all_ruleset(0, 40002)


def test_syn_counter_counts_dials_per_destination_including_a_reused_4_tuple_but_not_the_harness(
    lab: NetworkLab,
) -> None:
    """A connection whose accepting end closed first leaves TIME_WAIT there; a new dial from the same source
    port reuses the 4-tuple (no new row in the socket table), and the counter still sees its SYN."""
    listener = lab.socket()
    listener.bind(("11.0.0.20", 0))
    listener.listen(8)
    endpoint = ("11.0.0.20", listener.getsockname()[1])
    before = lab.holder.syn_counts().get(endpoint, 0)
    with lab.connect(*endpoint):  # the harness's own: carries the mark, never counted
        listener.accept()[0].close()
    assert lab.holder.syn_counts().get(endpoint, 0) == before
    source_port = 0
    for _ in range(2):
        dialler = lab.socket()
        dialler.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        dialler.bind(("11.0.0.20", source_port))
        source_port = dialler.getsockname()[1]
        dialler.connect(endpoint)
        accepted, _ = listener.accept()
        accepted.close()  # the accepting end closes first: TIME_WAIT is on its side
        time.sleep(0.05)
        dialler.close()
    listener.close()
    rows = [row for row in read_tcp_table(lab.holder.pid, port=endpoint[1]) if row.local == endpoint]
    assert [row.remote for row in rows if row.remote[1] == source_port] == [("11.0.0.20", source_port)], \
        f"the second dial did not reuse the first one's 4-tuple, so this proves nothing: {rows}"
    assert lab.holder.syn_counts().get(endpoint, 0) == before + 2


def test_parse_syn_counts_reads_both_families() -> None:
    listing = json.dumps({"nftables": [{"metainfo": {}}, {"set": {"name": "syn4", "elem": [
        {"elem": {"val": {"concat": ["11.0.0.20", 8080]}, "counter": {"packets": 3, "bytes": 180}}}]}}]})
    assert parse_syn_counts(listing) == {("11.0.0.20", 8080): 3}
    listing6 = json.dumps({"nftables": [{"set": {"name": "syn6", "elem": [
        {"elem": {"val": {"concat": ["2600:9000:0::10", 443]}, "counter": {"packets": 1, "bytes": 80}}}]}}]})
    assert parse_syn_counts(listing6) == {("2600:9000::10", 443): 1}
    assert parse_syn_counts(json.dumps({"nftables": [{"set": {"name": "syn4"}}]})) == {}


def test_connection_to_a_canary_increments_exactly_that_canary(lab: NetworkLab) -> None:
    with lab.dial("169.254.169.254", 80) as sock:
        response = _http_get(sock, "/latest/meta-data/")
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"X-Lab-Canary: 169.254.169.254\r\n" in response
    assert response.endswith(b"canary 169.254.169.254 port 80\n")
    assert lab.all_hits() == {("169.254.169.254", 80): 1}
    assert lab.canary_hits("169.254.169.254") == 1
    assert lab.canary_hits("169.254.169.254", 443) == 0
    assert lab.received("169.254.169.254") == [b"GET /latest/meta-data/ HTTP/1.1\r\nHost: lab.test\r\n\r\n"]


@pytest.mark.parametrize(("address", "port"), [("169.254.169.254", 8443), ("10.0.0.1", 1), ("192.0.2.77", 65535),
                                               ("11.0.0.10", 8080), ("127.0.0.1", 9)])
def test_catch_all_sees_any_address_on_any_port_nothing_listens_on(lab: NetworkLab, address: str, port: int) -> None:
    with lab.dial(address, port) as sock:
        assert _http_get(sock).endswith(f"canary {address} port {port}\n".encode())
    assert lab.all_hits() == {(address, port): 1}


def test_ipv6_canary_counts_its_own_connections(lab: NetworkLab) -> None:
    with lab.dial("fd00:ec2::254", 443) as sock:
        sock.sendall(b"\x16\x03\x01")  # a TLS record header: not HTTP, still recorded
        sock.shutdown(socket.SHUT_WR)
        _read_until_closed(sock)
    assert lab.canary_hits("FD00:EC2:0::254", 443) == 1
    assert lab.received("fd00:ec2::254", 443) == [b"\x16\x03\x01"]
    assert sum(lab.all_hits().values()) == 1


def test_link_local_destination_dialled_with_a_scope_id_is_seen(lab: NetworkLab) -> None:
    with lab.dial("fe80::1", 80, scope_id=socket.if_nametoindex("lo")) as sock:
        _http_get(sock)
    assert lab.all_hits() == {("fe80::1", 80): 1}


def test_ipv4_mapped_destination_is_recorded_as_the_ipv4_address_it_reaches(lab: NetworkLab) -> None:
    with lab.socket(socket.AF_INET6) as sock:
        sock.settimeout(5)
        sock.connect(("::ffff:10.0.0.7", 80))
        _http_get(sock)
    assert lab.all_hits() == {("10.0.0.7", 80): 1}


def test_loopback_broadcast_address_is_an_ordinary_destination_in_the_lab(lab: NetworkLab) -> None:
    # On a host, lo's 127.0.0.0/8 makes 127.255.255.255 a broadcast route (ENETUNREACH); the lab
    # removes that route, so a proxy that dials it really reaches the catch-all.
    with lab.dial("127.255.255.255", 80) as sock:
        _http_get(sock)
    assert lab.canary_hits("127.255.255.255", 80) == 1


@pytest.mark.parametrize("address", ["224.0.0.1", "239.255.255.255", "255.255.255.255", "ff02::1"])
def test_multicast_and_limited_broadcast_cannot_be_dialled_over_tcp_at_all(lab: NetworkLab, address: str) -> None:
    scope = socket.if_nametoindex("lo") if ":" in address else 0
    with pytest.raises(OSError) as refused:
        lab.dial(address, 80, scope_id=scope)
    assert refused.value.errno in (errno.EINVAL, errno.ENETUNREACH)
    assert lab.all_hits() == {}


def test_connection_reset_before_the_lab_accepts_it_is_still_counted(lab: NetworkLab) -> None:
    sock = lab.dial("10.0.0.1", 443)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST: a proxy that dials and aborts must still leave a trace
    assert lab.canary_hits("10.0.0.1", 443) == 1


def test_canary_keeps_only_the_first_4_kib(lab: NetworkLab) -> None:
    with lab.dial("100.64.0.1", 80) as sock:
        sock.sendall(b"X" * 10000)
        sock.shutdown(socket.SHUT_WR)
        _read_until_closed(sock)
    assert lab.received("100.64.0.1") == [b"X" * 4096]


def test_connect_without_sending_is_counted_immediately(lab: NetworkLab) -> None:
    with lab.dial("127.0.0.1", 80):
        assert lab.canary_hits("127.0.0.1", 80) == 1
        (hit,) = lab.hits()
        assert (hit.address, hit.port, hit.received) == ("127.0.0.1", 80, b"")


def test_the_harness_own_connections_are_never_caught(lab: NetworkLab) -> None:
    with pytest.raises(ConnectionRefusedError):
        lab.connect("10.0.0.1", 80)
    with pytest.raises(ConnectionRefusedError):
        lab.connect("127.0.0.1", 9)
    assert lab.all_hits() == {}


def test_a_listener_bound_to_its_exact_address_gets_its_connections_and_nothing_else(lab: NetworkLab) -> None:
    with lab.listen("11.0.0.30", 9000) as listener:
        listener.settimeout(5)
        with lab.dial("11.0.0.30", 9000):
            accepted, _peer = listener.accept()
            accepted.close()
        with lab.dial("11.0.0.30", 9001) as sock:
            _http_get(sock)
    assert lab.all_hits() == {("11.0.0.30", 9001): 1}


def test_a_wildcard_listener_owns_only_addresses_really_local_to_the_lab(lab: NetworkLab) -> None:
    # With every address routed locally, 0.0.0.0:9100 would otherwise take a dial to any address.
    with lab.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 9100))
        listener.listen()
        listener.settimeout(5)
        for local in ("127.0.0.1", LAB_PUBLIC_ORIGINS[0]):
            with lab.dial(local, 9100):
                accepted, _peer = listener.accept()
                assert accepted.getsockname()[0] == local
                accepted.close()
        with lab.dial("10.0.0.1", 9100) as sock:
            _http_get(sock)
    assert lab.all_hits() == {("10.0.0.1", 9100): 1}


def test_what_the_lab_says_it_owns_is_what_a_wildcard_listener_receives(lab: NetworkLab) -> None:
    # One record (NetnsHolder.owned_addresses) for "a wildcard listener really receives on it":
    # lo and the catch-all's sets follow it, so a dial agrees with it before and after an address
    # is added. A bind probe cannot say: AnyIP makes every IPv4 address bindable.
    fresh = next(f"11.0.0.{host}" for host in range(150, 200) if f"11.0.0.{host}" not in lab.owned_addresses())
    assert LAB_PUBLIC_ORIGINS[0] in lab.owned_addresses() and lab.holder.owns("127.0.0.9")
    assert not lab.holder.owns(fresh) and not lab.holder.owns(f"::ffff:{fresh}")
    with lab.socket() as listener, lab.socket(socket.AF_INET6) as listener6:
        for sock, address in ((listener, "0.0.0.0"), (listener6, "::")):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, 9110))
            sock.listen()
            sock.settimeout(5)
        with lab.dial(fresh, 9110) as sock:
            _http_get(sock)
        with lab.dial("2600:9000::7f", 9110) as sock:
            _http_get(sock)
        assert lab.all_hits() == {(fresh, 9110): 1, ("2600:9000::7f", 9110): 1}
        lab.holder.add_addresses([fresh, "2600:9000::7f"])
        assert {fresh, "2600:9000::7f"} <= lab.owned_addresses() and lab.holder.owns(f"::ffff:{fresh}")
        for sock, address in ((listener, fresh), (listener6, "2600:9000::7f")):
            with lab.dial(address, 9110):
                accepted, _peer = sock.accept()
                assert accepted.getsockname()[0] == address
                accepted.close()
    assert lab.all_hits() == {(fresh, 9110): 1, ("2600:9000::7f", 9110): 1}  # nothing new
    shown = lab.run(["ip", "-o", "address", "show", "dev", "lo"], capture_output=True, text=True, check=True).stdout
    assert f"inet {fresh}/32" in shown and "inet6 2600:9000::7f/128" in shown  # `ip addr` lists what it owns


def test_ruleset_starts_its_sets_with_the_addresses_the_lab_already_owns() -> None:
    rules = catch_all_ruleset(40001, 40002, owned=[ipaddress.ip_address("11.0.0.10"),
                                                   ipaddress.ip_address("2600:9000::10"),
                                                   ipaddress.ip_address("127.0.0.9")])
    assert "elements = { 127.0.0.0/8, 11.0.0.10 }" in rules
    assert "elements = { ::1, 2600:9000::10 }" in rules


def _dial_from(lab: NetworkLab, source_port: int, address: str, port: int) -> socket.socket:
    sock = lab.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", source_port))
    sock.settimeout(5)
    sock.connect((address, port))
    return sock


def test_a_connection_reusing_the_4_tuple_of_a_listener_time_wait_still_reaches_the_listener(
        lab: NetworkLab) -> None:
    # The listener's side closes first, so its end of each connection stays in TIME_WAIT; the next
    # SYN from the same source port finds that socket, not the listener, when the lab looks.
    with lab.listen("127.0.0.1", 9200) as listener:
        listener.settimeout(5)
        for _ in range(3):
            with _dial_from(lab, 45201, "127.0.0.1", 9200):
                accepted, _peer = listener.accept()
                accepted.close()
                time.sleep(0.05)
    assert lab.all_hits() == {}


def test_a_dial_reusing_the_4_tuple_of_a_catch_all_time_wait_is_caught_again(lab: NetworkLab) -> None:
    for _ in range(3):
        with _dial_from(lab, 45202, "10.0.0.1", 80) as sock:
            _http_get(sock)  # the catch-all answers and closes first
    assert lab.all_hits() == {("10.0.0.1", 80): 3}


def test_hits_carry_the_time_the_lab_accepted_them_in_order(lab: NetworkLab) -> None:
    before = time.monotonic()
    for address in ("10.0.0.1", "10.0.0.2"):
        with lab.dial(address, 80) as sock:
            _http_get(sock)
    first, second = lab.hits()
    assert before <= first.at <= second.at <= time.monotonic()
    assert (first.index, second.index) == (0, 1)
    assert lab.hits(since=1) == [second]
    assert lab.hit_mark() == 2


def test_hits_stay_unaccounted_until_a_verdict_counts_them(lab: NetworkLab) -> None:
    for address in ("10.0.0.1", "10.0.0.2"):
        with lab.dial(address, 80) as sock:
            _http_get(sock)
    assert [hit.address for hit in lab.unaccounted_hits()] == ["10.0.0.1", "10.0.0.2"]
    lab.account([0], by="test-a")
    lab.account([0, 1], by="test-b")
    assert (lab.accounted_by(0), lab.accounted_by(1)) == ("test-a", "test-b")
    assert lab.unaccounted_hits() == []


def test_reset_hits_forgets_counts_and_recorded_bytes(lab: NetworkLab) -> None:
    with lab.dial("10.0.0.1", 80) as sock:
        _http_get(sock)
    lab.reset_hits()
    assert lab.all_hits() == {}
    assert lab.received("10.0.0.1") == []
    assert lab.unaccounted_hits() == [] and lab.attempt_windows() == []


def test_asking_for_hits_of_something_that_is_not_an_ip_address_is_an_error(lab: NetworkLab) -> None:
    with pytest.raises(ValueError, match="is not an IP address"):
        lab.canary_hits("10.0.0.256")
    with pytest.raises(ValueError, match="is not an IP address"):
        lab.received("metadata.google.internal")


@pytest.mark.parametrize(
    "address", ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "ff02::1", "::ffff:10.0.0.1", "not-an-ip"],
)
def test_addresses_where_a_canary_would_prove_nothing_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="canary"):
        NetworkLab.start([address])


def test_a_canary_cannot_also_be_a_public_origin() -> None:
    with pytest.raises(ValueError, match="both canaries and public origins"):
        NetworkLab.start(["11.0.0.10"])


def test_a_public_origin_cannot_be_link_local() -> None:
    with pytest.raises(ValueError, match="needs a scope id"):
        NetworkLab.start(public_origins=["fe80::10"])


@needs_netns
def test_a_lab_without_nft_fails_with_one_line_naming_the_package(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("ip", "nsenter"):
        found = shutil.which(tool)
        assert found is not None
        (tools / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(tools))
    with pytest.raises(HostUnsupportedError, match=r"package nftables\) is not installed") as failure:
        NetworkLab.start(name="no-nft")
    assert "\n" not in str(failure.value)


# --------------------------------------------------------------------------------------------------
# Lab-only public origins
# --------------------------------------------------------------------------------------------------


def test_lab_public_origins_are_outside_every_special_use_range() -> None:
    for origin in LAB_PUBLIC_ORIGINS:
        verdict = classify_address(origin)
        assert not verdict.denied, verdict.reason


def test_public_origin_answers_200_and_records_each_keep_alive_request(lab: NetworkLab) -> None:
    origin = LAB_PUBLIC_ORIGINS[0]
    client = h11.Connection(h11.CLIENT)
    bodies = []
    with lab.connect(origin, 80) as sock:
        for path in ("/first", "/second"):
            sock.sendall(client.send(h11.Request(method="POST", target=path,
                                                 headers=[("Host", "origin.test"), ("Content-Length", "2")])))
            sock.sendall(client.send(h11.Data(data=b"hi")) + client.send(h11.EndOfMessage()))
            body = b""
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(sock.recv(4096))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            bodies.append(body)
            client.start_next_cycle()
    assert bodies == [f"origin {origin} port 80: POST /first\n".encode(),
                      f"origin {origin} port 80: POST /second\n".encode()]
    requests = lab.origin_requests(origin)
    assert [(r.method, r.target, r.body, r.connection) for r in requests] == [
        ("POST", "/first", b"hi", 1), ("POST", "/second", b"hi", 1)]
    assert requests[0].header("HOST") == "origin.test"
    assert lab.origin_connections(origin, 80) == 1
    assert lab.all_hits() == {}


def test_pipelined_requests_are_each_recorded(lab: NetworkLab) -> None:
    origin = LAB_PUBLIC_ORIGINS[2]
    with lab.connect(origin, 443) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: o\r\n\r\n"
                     b"GET /b HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
        response = _read_until_closed(sock)
    assert response.count(b"HTTP/1.1 200 OK") == 2
    assert [r.target for r in lab.origin_requests(origin, 443)] == ["/a", "/b"]


def test_origin_never_refuses_bytes_it_cannot_frame_and_keeps_every_byte(lab: NetworkLab) -> None:
    """The origin's parser is not the one under test: two Host fields (h11 says 400) are recorded,
    answered once with a marked 200, and what follows on the connection is recorded too."""
    origin = LAB_PUBLIC_ORIGINS[1]
    unframeable = b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    with lab.connect(origin, 80) as sock:
        sock.sendall(unframeable)
        answer = sock.recv(4096)
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        rest = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Lab-Unframed: 1" in answer
    assert f"X-Lab-Mark: {lab.origin_mark}".encode() in answer
    assert rest == b""  # answered once; the rest is only recorded
    assert lab.origin_requests(origin) == []
    whole = unframeable + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n"
    assert lab.received(origin) == [whole]
    [stream] = lab.origin_streams(origin)
    assert (stream.listener, stream.connection, stream.data, stream.received) == (f"{origin}:80", 1, whole, len(whole))


def test_every_origin_answer_carries_the_labs_secret_mark(lab: NetworkLab) -> None:
    origin = LAB_PUBLIC_ORIGINS[0]
    with lab.connect(origin, 80) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: o\r\n\r\nCONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n")
        response = _read_until_closed(sock)
    assert response.count(f"\r\nX-Lab-Mark: {lab.origin_mark}\r\n".encode()) == 2
    assert b"HTTP/1.1 405 " in response  # CONNECT is answered (an origin is no proxy), marked too
    assert len(lab.origin_mark) == 32


@needs_netns
def test_two_labs_have_different_marks() -> None:
    with NetworkLab.start([], name="mark-a") as first, NetworkLab.start([], name="mark-b") as second:
        assert first.origin_mark != second.origin_mark


def test_origin_requests_point_into_the_raw_record(lab: NetworkLab) -> None:
    origin = LAB_PUBLIC_ORIGINS[2]
    pipelined = (b"POST /a HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                 b"GET /b HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
    with lab.connect(origin, 80) as sock:
        sock.sendall(pipelined)
        _read_until_closed(sock)
    [stream] = lab.origin_streams(origin, 80)
    requests = lab.origin_requests(origin, 80)
    second = pipelined.index(b"GET /b")
    assert [stream.data[r.start:r.end] for r in requests] == [pipelined[:second], pipelined[second:]]
    assert [(r.target, r.body) for r in requests] == [("/a", b"hello"), ("/b", b"")]


def test_origin_record_is_capped_and_says_it_was_truncated(lab: NetworkLab) -> None:
    origin = LAB_PUBLIC_ORIGINS[0]
    head = b"POST /big HTTP/1.1\r\nHost: o\r\nContent-Length: %d\r\n\r\n"
    size = ORIGIN_RECORD_LIMIT + 100_000
    with lab.connect(origin, 443) as sock:
        sock.sendall(head % size + b"x" * size)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    [stream] = lab.origin_streams(origin, 443)
    assert len(stream.data) == ORIGIN_RECORD_LIMIT and stream.truncated
    assert stream.received == len(head % size) + size
    [request] = lab.origin_requests(origin, 443)
    assert request.target == "/big"  # framed from every byte, not only the recorded ones


# --------------------------------------------------------------------------------------------------
# The DNS stub inside the lab
# --------------------------------------------------------------------------------------------------


def test_stub_answers_a_raw_udp_query_on_its_lab_address(lab: NetworkLab) -> None:
    lab.add_name("meta.lab.test", ["169.254.169.254"])
    with lab.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(encode_query("meta.lab.test", QueryType.A, 0x4242), lab.dns_server)
        response = parse_response(sock.recv(512))
    assert response.query_id == 0x4242
    assert response.addresses == ["169.254.169.254"]
    assert lab.dns_server == ("127.0.0.53", 53)


def test_lab_resolver_returns_mixed_answers_and_empty_for_nxdomain(lab: NetworkLab) -> None:
    lab.set_zone({"mixed.lab.test": ["11.0.0.10", "10.0.0.1", "fd00:ec2::254"]})
    resolve = lab.resolver()

    async def both() -> tuple[list[str], list[str], list[str]]:
        return (await resolve("mixed.lab.test"), await resolve("absent.lab.test"), await resolve("10.0.0.1"))

    mixed, absent, literal = asyncio.run(both())
    assert mixed == ["11.0.0.10", "10.0.0.1", "fd00:ec2::254"]
    assert absent == []
    assert literal == ["10.0.0.1"]
    assert ("absent.lab.test", QueryType.A) in lab.dns_queries()
    assert ("10.0.0.1", QueryType.A) not in lab.dns_queries()  # literals never reach the stub


def test_lab_rebinding_name_answers_public_origin_then_loopback(lab: NetworkLab) -> None:
    lab.add_rebinding_name("rbnd.lab.test", LAB_PUBLIC_ORIGINS[0])
    assert [lab.lookup("rbnd.lab.test") for _ in range(3)] == [
        [LAB_PUBLIC_ORIGINS[0]], ["127.0.0.1"], [LAB_PUBLIC_ORIGINS[0]]]


# --------------------------------------------------------------------------------------------------
# Independence, lifecycle, privilege
# --------------------------------------------------------------------------------------------------


@needs_netns
def test_two_labs_with_the_same_canary_are_independent() -> None:
    with NetworkLab.start(["10.0.0.1"], public_origins=(), name="a") as first, \
            NetworkLab.start(["10.0.0.1"], public_origins=(), name="b") as second:
        assert first.netns_id != second.netns_id
        first.add_name("only-in-a.test", ["10.0.0.1"])
        with first.dial("10.0.0.1", 80) as sock:
            _http_get(sock)
        assert first.canary_hits("10.0.0.1") == 1
        assert second.canary_hits("10.0.0.1") == 0
        assert first.lookup("only-in-a.test") == ["10.0.0.1"]
        assert second.lookup("only-in-a.test") == []


@needs_netns
def test_closing_a_lab_stops_its_helper_and_loop_thread() -> None:
    lab = NetworkLab.start(["10.0.0.1"], public_origins=())
    pid, thread = lab.holder.pid, lab._loop_thread.thread
    listening = [listener.sock for listener in lab._listeners.values()]
    lab.close()
    lab.close()
    assert not _process_exists(pid)
    assert not thread.is_alive()
    assert listening and all(sock.fileno() == -1 for sock in listening)
    with pytest.raises(RuntimeError, match="closed"):
        lab.canary_hits("10.0.0.1")


def test_host_can_create_netns_reports_a_reason() -> None:
    ok, reason = host_can_create_netns()
    assert isinstance(ok, bool) and reason
    if ok:
        assert reason.startswith("network namespaces available")


_UNPRIVILEGED_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    sys.path[:0] = sys.argv[1:3]
    from pytest_sandbox.errors import HostUnsupportedError
    from pytest_sandbox.network.lab.lab import NetworkLab
    from pytest_sandbox.network.netns import ensure_lab_socket
    try:
        lab = NetworkLab.start(["10.0.0.1", "fd00:ec2::254"], names={"meta.test": ["10.0.0.1"]})
    except HostUnsupportedError as exc:
        print(json.dumps({"unsupported": str(exc)}))
        sys.exit(0)
    with lab:
        with lab.dial("10.0.0.1", 80) as sock:
            sock.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            first_line = sock.recv(4096).split(b"\\r\\n")[0].decode()
        with lab.connect("11.0.0.10", 443) as sock:
            sock.sendall(b"GET /up HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            origin_line = sock.recv(4096).split(b"\\r\\n")[0].decode()
        with socket.socket() as host_socket:
            try:
                ensure_lab_socket(host_socket)
                guard = "allowed"
            except RuntimeError as exc:
                guard = str(exc)
        result = {
            "uid": os.getuid(), "mode": lab.holder.mode, "userns": lab.holder.userns_path,
            "hits": lab.canary_hits("10.0.0.1", 80), "other_hits": lab.canary_hits("fd00:ec2::254"),
            "first_line": first_line, "origin_line": origin_line,
            "origin_targets": [r.target for r in lab.origin_requests()],
            "lookup": lab.lookup("meta.test"), "guard": guard,
            "run": lab.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout.strip(),
            "netns_inode": lab.netns_id[1], "pid": lab.holder.pid,
        }
    try:
        os.kill(result["pid"], 0)
        result["helper_alive_after_close"] = True
    except ProcessLookupError:
        result["helper_alive_after_close"] = False
    print(json.dumps(result))
""")


def test_lab_works_for_an_unprivileged_user_through_a_user_namespace() -> None:
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop to uid 65534")
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    else:
        prefix = []  # already unprivileged: run the scenario as ourselves
    package_parent = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory(prefix="lab-unprivileged-") as scratch:
        # h11 may live under a directory uid 65534 cannot read (e.g. a pyenv in /root): copy it out.
        shutil.copytree(Path(h11.__file__).parent, Path(scratch) / "h11")
        for directory, _dirs, files in os.walk(scratch):
            os.chmod(directory, 0o755)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o644)
        completed = subprocess.run(
            [*prefix, sys.executable, "-I", "-c", _UNPRIVILEGED_SCRIPT, package_parent, scratch],
            capture_output=True, text=True, timeout=60, cwd="/", check=False,
        )
    if completed.returncode != 0 and "Permission denied" in completed.stderr and "pytest_sandbox" not in (
            completed.stderr):
        pytest.skip(f"uid {NOBODY} cannot run this interpreter: {completed.stderr.strip()[-200:]}")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if "unsupported" in result:
        pytest.skip(f"this host forbids unprivileged user namespaces: {result['unsupported']}")
    assert result["uid"] != 0
    assert result["mode"] == "user" and result["userns"]
    assert (result["hits"], result["other_hits"]) == (1, 0)
    assert result["first_line"] == "HTTP/1.1 200 OK"
    assert result["origin_line"] == "HTTP/1.1 200 OK"
    assert result["origin_targets"] == ["/up"]
    assert result["lookup"] == ["10.0.0.1"]
    assert "refusing to run a network probe outside a lab namespace" in result["guard"]
    assert result["run"] == f"net:[{result['netns_inode']}]"
    assert result["helper_alive_after_close"] is False


@needs_netns
def test_start_failure_is_a_host_unsupported_error_naming_the_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pytest_sandbox.network.netns._HELPER_BOOTSTRAP", "import sys; sys.exit(3)")
    with pytest.raises(HostUnsupportedError, match="'doomed'"):
        NetnsHolder.start(name="doomed")


def test_helper_exits_by_itself_when_its_owner_goes_away(holder: NetnsHolder) -> None:
    holder._channel.close()  # what the kernel does to the parent's end when pytest dies
    assert holder._process.wait(timeout=10) == 0


def test_a_failed_request_is_reported_and_the_helper_keeps_serving(holder: NetnsHolder) -> None:
    with pytest.raises(OSError) as failure:
        holder.socket(family=12345)
    assert failure.value.errno == errno.EAFNOSUPPORT
    with holder.socket() as sock:
        assert socket_netns_inode(sock) == holder.netns_id
