"""http/fields.py: the one header lookup and the one hop-by-hop filter (RFC 9110 §5.1, §7.6.1)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pytest_sandbox.http.fields import HOP_BY_HOP, HeaderLookup, connection_options, end_to_end


@dataclass(frozen=True)
class _Message(HeaderLookup):
    headers: tuple[tuple[str, str], ...]


def test_lookup_is_case_insensitive_on_both_sides_and_keeps_order():
    message = _Message((("Host", "a"), ("x-one", "1"), ("X-One", "2")))
    assert message.header("host") == "a"
    assert message.header("HOST") == "a"
    assert message.header_values("x-ONE") == ["1", "2"]
    assert message.header("absent") is None
    assert message.header_values("absent") == []


@pytest.mark.parametrize(("fields", "expected"), [
    ([(b"connection", b"close")], {b"close"}),
    ([(b"Connection", b" Keep-Alive ,\tX-Secret")], {b"keep-alive", b"x-secret"}),
    ([(b"connection", b"a"), (b"connection", b"b")], {b"a", b"b"}),
    ([(b"x-connection", b"a")], set()),
])
def test_connection_options(fields, expected):
    assert connection_options(fields) == expected


def test_end_to_end_drops_hop_by_hop_listed_rewritten_and_optionally_proxy_fields():
    fields = [(b"Host", b"h"), (b"Connection", b"x-private"), (b"X-Private", b"p"), (b"Upgrade", b"ws"),
              (b"Proxy-Authorization", b"secret"), (b"Accept", b"*/*"), (b"Content-Length", b"5")]
    assert end_to_end(fields, rewritten=frozenset({b"host", b"content-length"}), drop_proxy_fields=True) == [
        (b"accept", b"*/*")]
    assert end_to_end(fields, rewritten=frozenset({b"content-length"}), drop_proxy_fields=False) == [
        (b"host", b"h"), (b"proxy-authorization", b"secret"), (b"accept", b"*/*")]


def test_every_rfc_9110_hop_by_hop_field_is_listed():
    # RFC 9110 §7.6.1 names these; Trailer describes this hop's chunked coding (§6.6.2).
    assert {b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade",
            b"trailer"} == HOP_BY_HOP
