"""http/responses.py: the one lenient client-side response parser the probes read answers with."""

from __future__ import annotations

import pytest

from pytest_sandbox.http.responses import ParsedResponse, parse_head, parse_responses


@pytest.mark.parametrize(("data", "status", "body"), [
    (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno", 403, b"no"),
    (b"HTTP/1.0 200 OK\r\n\r\nrest", 200, b"rest"),
    (b"HTTP/1.1 200", None, b"HTTP/1.1 200"),              # no complete head
    (b"HTTP/1.1 2000 Odd\r\n\r\n", None, b""),             # status-code is 3DIGIT (RFC 9112 §4)
    (b"HTTP/2 200\r\n\r\n", None, b""),                    # not HTTP/1.x
    (b"SSH-2.0-OpenSSH\r\n\r\n", None, b""),
    (b"", None, b""),
])
def test_parse_head(data, status, body):
    reply = parse_head(data)
    assert (reply.status, reply.body) == (status, body)


def test_parse_head_lowercases_names_strips_values_and_skips_lines_without_a_colon():
    reply = parse_head(b"HTTP/1.1 200 OK\r\nX-Lab-Mark:  tok \r\nbogus line\r\nX-Two: a\r\n\r\n")
    assert reply.headers == (("x-lab-mark", "tok"), ("x-two", "a"))
    assert reply.carries("tok") and not reply.carries("other")


def test_proxy_reason_reads_the_reference_proxys_json_error_code():
    assert parse_head(b'HTTP/1.1 403 F\r\n\r\n{"error": "ssrf_denied"}').proxy_reason == "ssrf_denied"
    assert parse_head(b"HTTP/1.1 403 F\r\n\r\nnot json").proxy_reason is None
    assert parse_head(b'HTTP/1.1 403 F\r\n\r\n["error"]').proxy_reason is None


def test_parse_responses_frames_content_length_chunked_and_bodiless_and_skips_1xx():
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
            b"HTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nincomp")
    responses, used = parse_responses(data)
    assert [(r.status, r.body) for r in responses] == [(200, b"abc"), (204, b""), (200, b"hi")]
    assert data[used:].startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 9")


def test_close_delimited_body_ends_only_at_eof():
    data = b"HTTP/1.1 200 OK\r\n\r\nuntil close"
    assert parse_responses(data) == ([], 0)
    assert parse_responses(data, eof=True) == ([ParsedResponse(200, (), b"until close")], len(data))


@pytest.mark.parametrize("data", [b"garbage\r\n\r\n", b"HTTP/1.1 2000 Odd\r\n\r\n"])
def test_parse_responses_refuses_what_is_not_a_response(data):
    with pytest.raises(ValueError, match=r"not an HTTP/1\.x status line"):
        parse_responses(data)
