"""The one client-side HTTP/1.x response parser the probes read answers with. Pure, lenient.

The probes read what a proxy under test sends back; they must record whatever came, so this parser
never refuses a head: a status line that is not ``HTTP/1.x`` + three digits gives ``status=None``
(``parse_head``), or ``ValueError`` where a sequence of responses is being framed (``parse_responses``).
It is deliberately *not* the strict parser the reference proxy judges upstream bytes with
(``http/framing.check_response_head`` and ``http/incremental.ResponseFramer``): that one must refuse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pytest_sandbox.http.fields import HeaderLookup
from pytest_sandbox.http.framing import HEAD_END
from pytest_sandbox.http.upstream import MARK_HEADER


@dataclass(frozen=True)
class ParsedResponse(HeaderLookup):
    """One response: status (None when the head is not an HTTP/1.x status line), lowercased header
    names with stripped values, and the body (chunked coding removed where the response was framed)."""

    status: int | None
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def carries(self, mark: str) -> bool:
        """Whether the upstream server wrote this response (its X-Lab-Mark token is present)."""
        return mark in self.header_values(MARK_HEADER)

    @property
    def proxy_reason(self) -> str | None:
        """The reference proxy's JSON ``error`` code, if the body carries one."""
        try:
            decoded = json.loads(self.body)
        except ValueError:
            return None
        reason = decoded.get("error") if isinstance(decoded, dict) else None
        return reason if isinstance(reason, str) else None


def _parse_head(head: bytes) -> tuple[int | None, tuple[tuple[str, str], ...], str]:
    """(status or None, headers, status line) of a head without its final empty line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status: int | None = None
    # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]; status-code = 3DIGIT
    if len(parts) >= 2 and parts[0].startswith("HTTP/1.") and parts[1].isdigit() and len(parts[1]) == 3:
        status = int(parts[1])
    headers = tuple((name.strip().lower(), value.strip()) for name, sep, value in
                    (line.partition(":") for line in lines[1:]) if sep)
    return status, headers, lines[0]


def parse_head(data: bytes) -> ParsedResponse:
    """``data`` as one response head plus everything after it as the body; status None when there is no
    complete head or it is not an HTTP/1.x status line."""
    head, found, body = data.partition(HEAD_END)
    if not found:
        return ParsedResponse(None, (), data)
    status, headers, _ = _parse_head(head)
    return ParsedResponse(status, headers, body)


def _parse_one(data: bytes, offset: int, eof: bool) -> tuple[ParsedResponse, int] | None:
    """One response starting at ``offset``: (response, end offset), or None if incomplete."""
    head_end = data.find(HEAD_END, offset)
    if head_end == -1:
        return None
    status, headers, status_line = _parse_head(data[offset:head_end])
    if status is None:
        raise ValueError(f"not an HTTP/1.x status line: {status_line!r}")
    response = ParsedResponse(status, headers, b"")
    position = head_end + len(HEAD_END)
    # RFC 9112 §6.3 rule 1: 1xx, 204 and 304 end at the head.
    if 100 <= status < 200 or status in (204, 304):
        return response, position
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            line_end = data.find(b"\r\n", position)
            if line_end == -1:
                return None
            size = int(data[position:line_end].split(b";")[0], 16)
            position = line_end + 2
            if size == 0:
                trailer_end = data.find(b"\r\n", position)  # no trailers: the empty line
                if trailer_end == -1:
                    return None
                return ParsedResponse(status, headers, bytes(body)), trailer_end + 2
            if len(data) < position + size + 2:
                return None
            body += data[position:position + size]
            position += size + 2
    length = response.header("content-length")
    if length is not None:
        end = position + int(length)
        if len(data) < end:
            return None
        return ParsedResponse(status, headers, data[position:end]), end
    if not eof:
        return None  # close-delimited body (RFC 9112 §6.3 rule 8)
    return ParsedResponse(status, headers, data[position:]), len(data)


def parse_responses(data: bytes, *, eof: bool = False) -> tuple[list[ParsedResponse], int]:
    """Every complete final response in ``data`` (1xx skipped), and the bytes they used.

    Raises ValueError for bytes that are not HTTP/1.x responses; every response returned has a status.
    """
    responses: list[ParsedResponse] = []
    offset = 0
    while offset < len(data):
        parsed = _parse_one(data, offset, eof)
        if parsed is None:
            break
        response, offset = parsed
        if response.status is not None and not 100 <= response.status < 200:
            responses.append(response)
    return responses, offset
