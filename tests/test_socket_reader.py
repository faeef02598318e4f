"""probes/exchange.py's SocketReader at its deadline: what already arrived is read, silence still times out.

A reader thread starved on a loaded machine can look at its deadline only after it has passed, with the
proxy's answer and close already in the socket buffer. It used to call that "timed out, not closed" without
reading them (measured: ``test_proxy_reading_one_family_leniently_fails_exactly_that_familys_cases`` judged a
refused-and-closed attempt "the connection was not closed" in 1 of 12 lenient-family campaigns at load 16).
"""

from __future__ import annotations

import select
import socket
import time

from pytest_sandbox.probes.exchange import SocketReader

ANSWER = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _late(sock: socket.socket) -> SocketReader:
    """A reader whose deadline passed before it first looked (what a starved thread sees)."""
    return SocketReader(sock, time.monotonic() - 1.0, bytearray())


def test_an_answer_and_close_that_arrived_before_a_late_look_are_read_not_timed_out() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(ANSWER)
        theirs.shutdown(socket.SHUT_WR)
        reader = _late(ours)
        reader.fill()
        assert (bytes(reader.buffer), reader.eof, reader.timed_out) == (ANSWER, True, False)
        assert [response.status for response in reader.responses()] == [400]


def test_a_starved_reader_waking_after_the_deadline_still_sees_the_close() -> None:
    """The stop condition itself is slow (it parses and looks upstream): the deadline passes inside it."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = SocketReader(ours, time.monotonic() + 0.2, bytearray())
        asked: list[float] = []

        def slow_until() -> bool:
            if not asked:
                theirs.sendall(ANSWER)
                theirs.shutdown(socket.SHUT_WR)
                time.sleep(0.3)  # past the deadline, with the answer and the close already sent
            asked.append(time.monotonic())
            return False

        reader.fill(slow_until)
        assert (reader.eof, reader.timed_out, reader.responses()[0].status) == (True, False, 400)


def test_a_silent_open_peer_still_times_out_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = _late(ours)
        reader.fill()
        assert (bytes(reader.buffer), reader.eof, reader.timed_out) == (b"", False, True)
        reader = SocketReader(ours, time.monotonic() + 0.1, bytearray())
        reader.fill()
        assert (bytes(reader.buffer), reader.eof, reader.timed_out) == (b"", False, True)


def test_bytes_without_a_close_are_kept_and_the_read_still_times_out() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(ANSWER)
        reader = _late(ours)
        reader.fill(poll=0.05)
        assert (bytes(reader.buffer), reader.eof, reader.timed_out) == (ANSWER, False, True)


def test_a_reset_seen_late_is_an_ending_not_a_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        accepted.close()  # SO_LINGER 0: a TCP RST
        assert select.select([client], [], [], 10.0)[0], "the reset never arrived"  # bounded wait for it
        reader = _late(client)
        reader.fill()
        assert reader.eof and not reader.timed_out and "ConnectionResetError" in reader.error


def test_the_sockets_timeout_is_left_as_it_was_after_the_late_look() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(2.5)
        _late(ours).fill()
        assert ours.gettimeout() == 2.5
