"""The kernel socket table and TCP counters as loop evidence (pytest_sandbox.network.socket_table).

Parsing is table-tested on lines in the kernel's own format; one lab test checks that the lab's real
table, read from outside the namespace, shows both ends of a connection made inside it.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.network.socket_table import (
    TCP_LISTEN,
    TcpSocket,
    parse_tcp_counters,
    parse_tcp_table,
    peers_of,
    read_active_opens,
    read_tcp_table,
)

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
# tcp4_seq_show: "%4d: %08X:%04X %08X:%04X %02X ..."; addresses are __be32 printed as host-order u32.
TCP4 = HEADER + (
    "   0: 1400000B:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 101 1 0\n"
    "   1: 1400000B:C350 1400000B:1F90 01 00000000:00000000 00:00000000 00000000     0        0 102 1 0\n"
    "   2: 1400000B:1F90 1400000B:C350 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0\n"
    "   3: 0100007F:0050 0100007F:D431 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0\n"
)
TCP6 = HEADER + (
    "   0: 0000000000000000FFFF00001400000B:C351 0000000000000000FFFF00001400000B:1F90 06 "
    "00000000:00000000 03:00001770 00000000     0        0 0 3 0\n"
    "   1: 00900026000000000000000010000000:0050 00900026000000000000000010000000:9C40 01 "
    "00000000:00000000 00:00000000 00000000     0        0 104 1 0\n"
)


def test_ipv4_rows_are_decoded_in_host_byte_order():
    rows = parse_tcp_table(TCP4, byteorder="little")
    assert rows[0] == TcpSocket(("11.0.0.20", 8080), ("0.0.0.0", 0), TCP_LISTEN)
    assert rows[1] == TcpSocket(("11.0.0.20", 50000), ("11.0.0.20", 8080), 1)
    assert rows[3] == TcpSocket(("127.0.0.1", 80), ("127.0.0.1", 54321), 6)  # TIME-WAIT is listed


def test_ipv6_rows_show_ipv4_mapped_ends_as_ipv4():
    rows = parse_tcp_table(TCP6, byteorder="little")
    assert rows[0] == TcpSocket(("11.0.0.20", 50001), ("11.0.0.20", 8080), 6)
    assert rows[1].local == ("2600:9000::10", 80)


def test_big_endian_hosts_print_the_same_address_the_other_way_round():
    line = HEADER + "   0: 0B000014:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1 0\n"
    assert parse_tcp_table(line, byteorder="big")[0].local == ("11.0.0.20", 8080)


def test_port_filter_keeps_rows_with_the_port_on_either_side():
    rows = parse_tcp_table(TCP4 + TCP6.split("\n", 1)[1], byteorder="little", port=8080)
    assert [row.local[1] for row in rows] == [8080, 50000, 8080, 50001]
    assert parse_tcp_table(TCP4, byteorder="little", port=443) == ()


def test_peers_of_an_endpoint_are_the_far_ends_of_its_connections_not_the_listener():
    rows = parse_tcp_table(TCP4, byteorder="little") + parse_tcp_table(TCP6, byteorder="little")
    # Both ends of 11.0.0.20:50000 <-> :8080 name the same peer; the TIME-WAIT :50001 end still counts.
    assert peers_of(rows, ("11.0.0.20", 8080)) == {("11.0.0.20", 50000), ("11.0.0.20", 50001)}
    assert peers_of(rows, ("11.0.0.21", 8080)) == frozenset()


SNMP = (
    "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
    "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n"
    "Tcp: 1 200 120000 -1 448 425 3\n"
)


def test_tcp_counters_are_read_by_name():
    assert parse_tcp_counters(SNMP)["ActiveOpens"] == 448
    assert parse_tcp_counters(SNMP)["PassiveOpens"] == 425


def test_snmp_text_without_tcp_counters_is_an_error_not_zero():
    with pytest.raises(ValueError, match="Tcp:"):
        parse_tcp_counters("Ip: Forwarding\nIp: 1\n")


def test_the_lab_table_read_from_outside_shows_both_ends_and_counts_the_connect(_network_lab):
    lab = _network_lab
    listener = lab.listen("11.0.0.10", 8123)
    try:
        opens = read_active_opens(lab.holder.pid)
        client = lab.connect("11.0.0.10", 8123)
        accepted, _ = listener.accept()
        with client, accepted:
            local = client.getsockname()[:2]
            assert read_active_opens(lab.holder.pid) == opens + 1
            rows = read_tcp_table(lab.holder.pid, port=8123)
            assert peers_of(rows, ("11.0.0.10", 8123)) == {(local[0], local[1])}
            assert any(row.state == TCP_LISTEN for row in rows)
            # The host's own table does not hold the lab's sockets.
            with open("/proc/self/net/tcp", encoding="ascii") as host_table:
                assert not peers_of(parse_tcp_table(host_table.read(), port=8123), ("11.0.0.10", 8123))
    finally:
        listener.close()
