"""The framing fast path (``strict_request_head`` / ``strict_response_head``) against the full checks.

The fast path may only accept a *subset* of what ``full_request_head`` / ``full_response_head`` accept, and
must return exactly what they return. Proved over a bounded, generated corpus: every HTTP message literal in
the framing, smuggling, proxy and SSRF tests, every smuggling catalogue payload (both path forms) and every SSRF
catalogue destination, heads generated from their request lines and field lines, and byte mutations of all of
them. A fast path widened on purpose (a fixture per widening) must fail the same check, naming the head.
"""

from __future__ import annotations

import ast
import functools
import itertools
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_sandbox.catalogues.smuggling import ABSOLUTE_FORM, SMUGGLING_CASES, TUNNEL_FORM, render
from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES
from pytest_sandbox.http import framing
from pytest_sandbox.http.framing import (
    HEAD_END,
    FramingViolation,
    check_request_head,
    check_response_head,
    full_request_head,
    full_response_head,
    strict_request_head,
    strict_response_head,
)

ROOT = Path(__file__).resolve().parent.parent
# Test files whose literals are HTTP messages (framing, smuggling, proxy, SSRF, upstream, interception).
VECTOR_FILES = sorted(
    path for pattern in ("tests/test_framing*.py", "tests/test_smuggling*.py", "tests/test_proxy*.py",
                         "tests/test_ssrf*.py", "tests/test_upstream*.py", "tests/test_interception.py",
                         "tests/test_http_responses.py", "tests/test_wire.py", "tests/wire.py",
                         "conformance/test_smuggling.py", "conformance/test_ssrf*.py")
    for path in ROOT.glob(pattern)
)
# Bytes a mutation inserts or substitutes: separators, CTLs, the characters the fast regexes exclude, obs-text.
MUTATION_BYTES = b" \t\r\n\x00\x0b\x0c_%@#\\:,;/?[]\"<>{}|^`0159AaZz-.~\x7f\x80\xa0\xff"
MUTANTS_PER_SEED = 16
SEED = 20261130
MIN_FAST_ACCEPTED = 200  # the corpus must exercise the fast path, or the proof is vacuous


def literals() -> Iterator[bytes]:
    """Every str and bytes constant of the vector files (str as latin-1)."""
    for path in VECTOR_FILES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
                value = node.value
                if isinstance(value, str):
                    try:
                        value = value.encode("latin-1")
                    except UnicodeEncodeError:
                        continue
                yield value


def heads_in(data: bytes) -> Iterator[bytes]:
    """Every span of ``data`` from its start or the end of a head to a later CRLFCRLF (pipelined heads)."""
    ends = [match.start() + len(HEAD_END) for match in re.finditer(re.escape(HEAD_END), data)]
    for start in [0, *ends]:
        for end in ends:
            if end > start:
                yield data[start:end]


def seeds() -> tuple[list[bytes], list[bytes]]:
    """(request heads, response heads) before mutation: literals, catalogues and generated combinations."""
    messages: set[bytes] = set()
    request_lines: set[bytes] = {b"GET http://a.test/ HTTP/1.1", b"POST http://a.test/x?y=%41 HTTP/1.0",
                                 b"GET / HTTP/1.1", b"OPTIONS * HTTP/1.1", b"CONNECT a.test:443 HTTP/1.1"}
    field_lines: set[bytes] = {b"Host: a.test", b"Content-Length: 5", b"Connection: keep-alive",
                               b"Connection: close", b"Transfer-Encoding: chunked", b"Accept: */*"}
    status_lines: set[bytes] = {b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found", b"HTTP/1.1 204 ", b"HTTP/1.1 200"}
    for value in literals():
        if HEAD_END in value:
            messages.add(value)
        elif b"\r\n" not in value and len(value) < 200:
            if value.startswith(b"HTTP/"):
                status_lines.add(value)
            elif re.fullmatch(rb"\S+ \S+ HTTP/\S*", value):
                request_lines.add(value)
            elif b":" in value[1:]:
                field_lines.add(value)
    for case in SMUGGLING_CASES:
        for form in (ABSOLUTE_FORM, TUNNEL_FORM):
            messages.add(render(case, form, host="allowed.test", denied="metadata.test"))
    for ssrf in SSRF_CASES:
        authority = ssrf.authority.encode("latin-1", "replace")
        url = ssrf.absolute_url.encode("latin-1", "replace")
        messages.add(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (url, authority))
        messages.add(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (url, ssrf.target_host.encode("latin-1", "replace")))
        messages.add(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
    requests: set[bytes] = set()
    responses: set[bytes] = set()
    for message in messages:
        for head in heads_in(message):
            (responses if head.startswith(b"HTTP/") else requests).add(head)
            field_lines.update(line for line in head[: -len(HEAD_END)].split(b"\r\n")[1:] if line)
    # Every field line alone after a clean request line and a clean status line, and beside a length.
    for line in sorted(field_lines):
        requests.add(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n%s\r\n\r\n" % line)
        requests.add(b"POST http://a.test/ HTTP/1.1\r\n%s\r\nHost: a.test\r\nContent-Length: 5\r\n\r\n" % line)
        responses.add(b"HTTP/1.1 200 OK\r\n%s\r\n\r\n" % line)
        responses.add(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n%s\r\n\r\n" % line)
    generator = random.Random(SEED)
    fields = sorted(field_lines)
    for line in sorted(request_lines):
        for _ in range(12):
            chosen = [b"Host: a.test", *generator.sample(fields, generator.randint(0, 3))]
            generator.shuffle(chosen)
            requests.add(b"\r\n".join([line, *chosen]) + HEAD_END)
    for line in sorted(status_lines):
        for _ in range(12):
            chosen = generator.sample(fields, generator.randint(0, 3))
            responses.add(b"\r\n".join([line, *chosen]) + HEAD_END)
    return sorted(requests), sorted(responses)


def mutants(head: bytes, generator: random.Random) -> Iterator[bytes]:
    """``MUTANTS_PER_SEED`` single-byte deletions, insertions, substitutions and case flips of ``head``."""
    for _ in range(MUTANTS_PER_SEED):
        position = generator.randrange(len(head))
        byte = bytes([generator.choice(MUTATION_BYTES)])
        operation = generator.randrange(4)
        if operation == 0:
            yield head[:position] + head[position + 1 :]
        elif operation == 1:
            yield head[:position] + byte + head[position:]
        elif operation == 2:
            yield head[:position] + byte + head[position + 1 :]
        else:
            yield head[:position] + head[position : position + 1].swapcase() + head[position + 1 :]


@functools.cache
def corpus() -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(request heads, response heads): the seeds and their mutants, built once per process."""
    requests, responses = seeds()
    generator = random.Random(SEED)
    mutated_requests = {mutant for head in requests for mutant in mutants(head, generator)}
    mutated_responses = {mutant for head in responses for mutant in mutants(head, generator)}
    return tuple(sorted(set(requests) | mutated_requests)), tuple(sorted(set(responses) | mutated_responses))


def disagreements(heads: tuple[bytes, ...], fast: Callable[[bytes], object],
                  full: Callable[[bytes], object]) -> tuple[list[str], int]:
    """Heads the fast path accepts where the full checks refuse or answer differently, and how many it accepted."""
    found: list[str] = []
    accepted = 0
    for head in heads:
        got = fast(head)
        if got is None:
            continue
        accepted += 1
        try:
            want = full(head)
        except FramingViolation as violation:
            found.append(f"{head!r}: the fast path accepts it, the full checks refuse it ({violation.case})")
            continue
        if got != want:
            found.append(f"{head!r}: the fast path gives {got!r}, the full checks {want!r}")
    return found, accepted


def verdict(check: Callable[[bytes], object], head: bytes) -> object:
    try:
        return check(head)
    except FramingViolation as violation:
        return (violation.case, violation.status, violation.detail)


def test_the_corpus_holds_every_vector_source() -> None:
    assert len(VECTOR_FILES) >= 10
    requests, responses = corpus()
    assert len(requests) > 20000 and len(responses) > 2000
    refused = sum(1 for head in requests if isinstance(verdict(full_request_head, head), tuple))
    assert refused > len(requests) // 4, "the mutations must produce refused heads near the accepted ones"


def test_fast_request_heads_are_a_subset_with_identical_results() -> None:
    found, accepted = disagreements(corpus()[0], strict_request_head, full_request_head)
    assert not found, "\n".join(found[:20])
    assert accepted >= MIN_FAST_ACCEPTED


def test_fast_response_heads_are_a_subset_with_identical_results() -> None:
    found, accepted = disagreements(corpus()[1], strict_response_head, full_response_head)
    assert not found, "\n".join(found[:20])
    assert accepted >= MIN_FAST_ACCEPTED


def test_check_functions_give_the_full_checks_verdict_for_every_head() -> None:
    """The public checks (fast path first) refuse with the same case, status and detail, and accept alike."""
    requests, responses = corpus()
    for head in requests:
        assert verdict(check_request_head, head) == verdict(full_request_head, head), head
    for head in responses:
        assert verdict(check_response_head, head) == verdict(full_response_head, head), head


def test_lax_heads_never_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(head: bytes, max_head: int = 0) -> None:
        raise AssertionError("the fast path ran for a lax reading")

    monkeypatch.setattr(framing, "strict_request_head", never)
    data = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert check_request_head(data, lax=frozenset({"header-name"})).target == "http://a.test/"


def test_the_fast_path_takes_the_common_shapes() -> None:
    get = b"GET http://11.0.0.10/ HTTP/1.1\r\nHost: 11.0.0.10\r\nUser-Agent: x\r\nConnection: keep-alive\r\n\r\n"
    post = b"POST http://a.test/up?x=%2F HTTP/1.1\r\nHost: a.test:8080\r\nContent-Length: 5\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1024\r\n\r\n"
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
    assert strict_request_head(get) == full_request_head(get)
    assert strict_request_head(post) == full_request_head(post)
    assert strict_response_head(response) == full_response_head(response)
    assert strict_response_head(chunked) == full_response_head(chunked)


# --- a fast path widened on purpose must fail the same check ---------------------------------------------------


class _AnyOptions(frozenset[bytes]):
    def issuperset(self, other: object) -> bool:  # type: ignore[override]
        return True


def _request_regex(*, tchar: bytes = framing._FAST_TCHAR,
                   target: bytes = framing._FAST_TARGET_CHARS) -> re.Pattern[bytes]:
    lines = rb"(?:" + tchar + rb"+:[\x21-\x7e\x80-\xff \t]*\r\n)"
    return re.compile(
        rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE) "
        rb"((?:https?://[A-Za-z0-9\-._~:\[\]]+(?:[/?]" + target + rb")?|/(?!/)" + target + rb")) "
        rb"HTTP/1\.([01])\r\n(" + lines + rb"+)\r\n"
    )


# name -> (module attribute, widened value, a byte string every reported disagreement set must mention)
WIDENINGS: dict[str, tuple[str, object, bytes]] = {
    "underscore in field names": ("_FAST_REQUEST", _request_regex(tchar=rb"[!#$&'*+\-.^_`|~0-9A-Za-z]"), b"_"),
    "percent in field names": ("_FAST_REQUEST", _request_regex(tchar=rb"[!#$%&'*+\-.^`|~0-9A-Za-z]"), b"%"),
    "backslash and hash in targets": (
        "_FAST_REQUEST", _request_regex(target=rb"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=\\#]*"), b"\\"),
    "stray percent in targets": (
        "_FAST_REQUEST", _request_regex(target=rb"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=%]*"), b"%"),
    "any Host value": ("_FAST_HOST", re.compile(rb"[^\r\n]+"), b"Host"),
    "leading zeros in Content-Length": ("_FAST_CONTENT_LENGTH", re.compile(rb"[0-9]+"), b"Content-Length"),
    "no fallback fields": ("_FAST_REQUEST_FALLBACK", frozenset(), b"Transfer-Encoding"),
    "any Connection option": ("_FAST_CONNECTION_OPTIONS", _AnyOptions(), b"Connection"),
}


@pytest.fixture(params=sorted(WIDENINGS))
def widened(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A deliberately broken fast path: one of its restrictions widened; returns what its holes mention."""
    attribute, value, mentioned = WIDENINGS[request.param]
    monkeypatch.setattr(framing, attribute, value)
    return mentioned


def test_a_widened_fast_path_fails_the_differential_check_naming_the_head(widened: bytes) -> None:
    found, _ = disagreements(corpus()[0], strict_request_head, full_request_head)
    assert found, "the differential check passed a fast path that accepts what the full checks refuse"
    assert any(repr(widened)[2:-1] in line for line in found), found[:5]
    refused_or_differs = r"the fast path accepts it, the full checks refuse it|the fast path gives"
    with pytest.raises(AssertionError, match=refused_or_differs):
        assert not found, "\n".join(found[:20])


@pytest.mark.parametrize(("attribute", "value"), [
    ("_FAST_RESPONSE", re.compile(rb"HTTP/1\.([01]) ([0-9]{2,3}) ([\x00-\x7e\x80-\xff \t]*)\r\n("
                                  + framing._FAST_FIELD_LINES + rb"*)\r\n")),
    ("_FAST_CONTENT_LENGTH", re.compile(rb"[0-9]+")),
], ids=["status and reason", "leading zeros in Content-Length"])
def test_a_widened_response_fast_path_fails_the_differential_check(
        attribute: str, value: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(framing, attribute, value)
    found, _ = disagreements(corpus()[1], strict_response_head, full_response_head)
    assert found and all("HTTP/" in line for line in found)


def test_mutations_are_deterministic_and_bounded() -> None:
    head = b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"
    first = list(mutants(head, random.Random(1)))
    assert first == list(mutants(head, random.Random(1))) and len(first) == MUTANTS_PER_SEED
    assert len(set(itertools.islice(heads_in(head * 3), 10))) == 3


def test_frozen_instance_equals_the_constructor_for_every_hot_path_class() -> None:
    """``frozen_instance`` fills exactly the fields the constructor would (every field, no others)."""
    from dataclasses import fields

    from pytest_sandbox.http.framing import RequestHead, ResponseHead, frozen_instance
    from pytest_sandbox.http.incremental import Response
    from pytest_sandbox.http.streams import Request

    pairs = ((b"host", b"a"),)
    samples: list[tuple[type, dict[str, object]]] = [
        (RequestHead, {"method": "GET", "target": "http://a/", "http_version": "1.1", "headers": pairs,
                       "body_framing": ("none", 0), "keep_alive": True}),
        (ResponseHead, {"http_version": "1.1", "status": 200, "reason": "OK", "headers": pairs,
                        "content_length": 0, "chunked": False, "keep_alive": True}),
        (Request, {"method": "GET", "target": "http://a/", "http_version": "1.1", "headers": (("host", "a"),),
                   "body": b"", "raw": b"x", "raw_headers": pairs}),
        (Response, {"http_version": "1.1", "status": 200, "reason": "OK", "headers": (("host", "a"),), "body": b"",
                    "keep_alive": True, "raw_headers": pairs}),
    ]
    for cls, values in samples:
        assert set(values) == {item.name for item in fields(cls)}, cls
        built = frozen_instance(cls, **values)
        assert type(built) is cls and built == cls(**values) and vars(built) == vars(cls(**values))
