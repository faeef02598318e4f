"""tests/wire.py: reading up to the end of a head stops at the head, at EOF, at the byte limit, and at the deadline."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from wire import HEAD_END, read_head


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.settimeout(5.0)
        yield ours, peer


def test_reads_across_chunks_up_to_the_end_of_the_head_and_keeps_what_came_with_it(pair) -> None:
    ours, peer = pair
    peer.sendall(b"HTTP/1.1 200 OK\r\n")
    peer.sendall(b"Content-Length: 2\r\n\r\nok")
    data = read_head(ours)
    assert data.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert HEAD_END in data
    assert ours.gettimeout() == 5.0  # the caller's timeout is restored


def test_stops_at_eof_with_what_arrived(pair) -> None:
    ours, peer = pair
    peer.sendall(b"HTTP/1.1 200 OK\r\n")
    peer.shutdown(socket.SHUT_WR)
    assert read_head(ours) == b"HTTP/1.1 200 OK\r\n"


def test_stops_past_the_byte_limit_without_an_end(pair) -> None:
    ours, peer = pair
    peer.sendall(b"X" * 300)
    data = read_head(ours, limit=100)
    assert len(data) > 100 and HEAD_END not in data


def test_a_peer_that_never_ends_its_head_is_a_timeout_naming_what_came(pair) -> None:
    ours, peer = pair
    peer.sendall(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(TimeoutError, match=r"received b'HTTP/1\.1 200 OK"):
        read_head(ours, seconds=0.3)
    assert ours.gettimeout() == 5.0
