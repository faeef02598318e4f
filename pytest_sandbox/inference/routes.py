"""Which requests on an intercepted ``inference.local`` connection count as inference traffic.

Pure: no sockets, no I/O. The interceptor asks :func:`match_route` about every request it reads from
the decrypted stream; anything that does not match is denied and the connection closed (the
behaviour OpenShell adopted in PR #819).

The matcher is deliberately *strict*. A proxy that normalises a path before matching (decoding
``%2F``, resolving ``..``, collapsing ``//``, dropping a trailing ``/``, folding case) and then
forwards the *original* bytes lets the backend see a different path from the one that was judged:
the classic path-confusion bypass. Rather than normalise, every spelling other than the canonical
one simply does not match. Each refusal rule below names the trick it closes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass

WILDCARD_SEGMENT = "*"

# RFC 9110 §9.1: a method is a case-sensitive token; the registered methods are upper case.
_METHOD = re.compile(r"[A-Z]+")

# RFC 3986 §3.3 pchar without pct-encoded: unreserved / sub-delims / ":" / "@". Anything else in a
# path (space, CTL, "\\", non-ASCII, "%", "#", "[" ...) means the request is not in canonical form.
_PCHAR_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]*")

# What one ``*`` may stand for: a model id such as ``gpt-4o-mini`` or ``llama3:8b``. Narrower than
# pchar on purpose: ``;`` is a path-parameter separator for Tomcat/Spring-style servers
# (``..;/admin``), and the remaining sub-delims have no business in a model id.
_WILDCARD_VALUE = re.compile(r"[A-Za-z0-9\-._~:@+]+")

# RFC 3986 §3.1: scheme names are case-insensitive; only the two web schemes reach this proxy.
_ABSOLUTE_FORM = re.compile(r"(?i:https?)://(?P<authority>[^/?#]*)(?P<rest>.*)", re.DOTALL)


@dataclass(frozen=True)
class InferenceRoute:
    """One allowed ``method path`` pair; ``*`` in the path stands for exactly one segment."""

    method: str
    path: str  # the pattern: literal segments, ``*`` for exactly one

    def __post_init__(self) -> None:
        if not _METHOD.fullmatch(self.method):
            raise ValueError(f"route method must be an upper-case token, got {self.method!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"route path must start with '/', got {self.path!r}")
        for segment in self.path.split("/")[1:]:
            if segment == WILDCARD_SEGMENT:
                continue
            if not segment or segment in (".", "..") or not _PCHAR_SEGMENT.fullmatch(segment):
                raise ValueError(f"route path has an unmatchable segment {segment!r}: {self.path!r}")

    def __str__(self) -> str:
        return f"{self.method} {self.path}"

    def example(self, wildcard: str = "fake-model") -> str:
        """A concrete path this route matches: each ``*`` replaced by ``wildcard``."""
        return "/".join(wildcard if segment == WILDCARD_SEGMENT else segment for segment in self.path.split("/"))

    def matches(self, method: str, path: str) -> bool:
        """Whether ``method`` and an already-canonical ``path`` (see :func:`request_path`) match."""
        if method != self.method:
            return False
        wanted = self.path.split("/")
        got = path.split("/")
        if len(wanted) != len(got):
            return False
        return all(
            _WILDCARD_VALUE.fullmatch(have) is not None and not _only_dots(have)
            if want == WILDCARD_SEGMENT
            else have == want
            for want, have in zip(wanted, got, strict=True)
        )


@dataclass(frozen=True)
class RouteProbe:
    """One request for the route table to decide: ``routed`` is whether the enforced routes forward it;
    ``http_version`` is the version its request line names (HTTP/1.0 copies carry it in their id)."""

    method: str
    path: str
    routed: bool
    http_version: str = "1.1"
    framing: str = ""  # how its body is framed: "" (Content-Length), or one of BODY_FRAMINGS
    # For another spelling of a route's path (:func:`path_spellings`): that route's path. Such a request is
    # refused, or forwarded as exactly this path; the spelling itself must never reach the backend.
    canonical: str = ""

    @property
    def test_id(self) -> str:
        version = "" if self.http_version == "1.1" else f"http{self.http_version.replace('.', '')}-"
        framing = f"{self.framing}-" if self.framing else ""
        return f"route-{version}{framing}{self.method}-{self.path}"

    @property
    def request_line(self) -> str:
        """How a verdict names the request: ``GET /admin``, ``GET /admin HTTP/1.0`` for a copy."""
        version = "" if self.http_version == "1.1" else f" HTTP/{self.http_version}"
        framing = f" ({BODY_FRAMINGS[self.framing]})" if self.framing else ""
        return f"{self.method} {self.path}{version}{framing}"


# Requests no route of OpenShell's table covers (network.md §4): each must be refused, unless the
# enforced policy routes it. A wrong method on a routed path, an admin path, a file upload; then one
# request for each method no other inference test sends (PUT, PATCH, OPTIONS, TRACE): an interceptor
# that applies the routes only to the methods it expects (GET, POST, DELETE) forwards them. TRACE is
# the one whose forward hurts most: the backend echoes the request it received (RFC 9110 §9.3.8),
# route key included, back into the sandbox.
NON_ROUTE_REQUESTS: tuple[tuple[str, str], ...] = (
    ("GET", "/v1/chat/completions"),
    ("DELETE", "/v1/models/fake-model"),
    ("POST", "/v1/files"),
    ("POST", "/v1/audio/transcriptions"),
    ("GET", "/admin"),
    ("PUT", "/v1/chat/completions"),
    ("PATCH", "/v1/models/fake-model"),
    ("OPTIONS", "/v1/chat/completions"),
    ("TRACE", "/v1/chat/completions"),
)

# HTTP/1.0 (RFC 9112 §2.3, RFC 1945) is still a request line any client may send, and Python's http.client
# sends it for CONNECT. An interceptor whose route check sits behind an HTTP/1.1-only path forwards such a
# request unjudged, so every extra request is sent again as HTTP/1.0, and the policy's first route too, as
# the positive control that HTTP/1.0 is refused for its route and not for its version.
HTTP10 = "1.0"

# RFC 9110 §8.6: the methods that define a meaning for content (a client sends Content-Length, 0 without any).
METHODS_WITH_CONTENT = frozenset({"POST", "PUT", "PATCH"})

# The other ways a client frames a request body (RFC 9112 §6.1 chunked; RFC 9110 §10.1.1 Expect: 100-continue,
# which curl adds to a large upload). An interceptor that judges only the requests its Content-Length path
# reads, and hands the rest to another (a streaming one, say), forwards them unjudged: every extra request with a
# body is sent again framed each way, beside the policy's first route with a body as the positive control.
BODY_FRAMINGS = {"chunked": "chunked body", "expect-continue": "Expect: 100-continue"}


def path_spellings(path: str) -> tuple[str, ...]:
    """Other spellings of the route path ``path`` that a normalising matcher reads as ``path``. Pure.

    Each names a normalisation some server or proxy applies (the path-confusion corpus: Orange Tsai's
    "Breaking Parser Logic", Black Hat USA 2018; PortSwigger's URL validation bypass cheat sheet). A matcher that
    applies one before matching and then forwards the original bytes routes the spelling, and the backend may
    read it as another path: ``/admin/../v1/chat/completions`` is under ``/admin`` to a server that does not
    resolve dot segments, and Tomcat reads ``..;`` as ``..``. The strict matcher refuses them all.
    """
    segments = path.split("/")[1:]
    first, rest, last = segments[0], "/".join(segments[1:]), segments[-1]
    head = path[:len(path) - len(last)]
    spellings = (
        f"{path}/",                                    # trailing slash dropped
        f"/{first}//{rest}",                           # empty segment collapsed
        f"/{first}/./{rest}",                          # dot segment removed (RFC 3986 §5.2.4)
        f"/admin/..{path}",                            # dot-dot resolved: the bytes name /admin
        f"/admin/%2e%2e{path}",                        # percent-encoded dot-dot decoded, then resolved
        f"/admin/..;{path}",                           # Tomcat: path parameter stripped, then dot-dot
        f"{path};x=1",                                 # path parameter stripped (RFC 3986 §3.3)
        f"/{first}%2F{rest}",                          # encoded slash decoded
        f"{head}%{ord(last[0]):02X}{last[1:]}",        # unreserved character decoded (RFC 3986 §6.2.2.2)
        path.upper(),                                  # case folded
        "/" + "\\".join(segments),                     # backslash read as slash (WHATWG URL, special schemes)
    )
    return tuple(spelling for spelling in dict.fromkeys(spellings) if spelling != path)


def wildcard_escapes(route: InferenceRoute) -> tuple[str, ...]:
    """Paths a matcher that reads the route's ``*`` as "anything" routes, and that name another path. Pure.

    A shell glob's ``*`` crosses ``/`` (``fnmatch``; a prefix check does the same), so ``/v1/models/*`` matches
    ``/v1/models/../../admin``, which a backend resolves to ``/admin`` (RFC 3986 §5.2.4), and
    ``/v1/models/fake-model/extra``, a path the table never named. The escapes climb out of every fixed segment
    before the wildcard, plainly, percent-encoded, as one segment with encoded slashes and with Tomcat's ``..;``.
    None of them normalises to a route path, so even a matcher that resolves them first refuses them; the strict
    matcher (one pchar value per ``*``) refuses them all. Empty for a route without a wildcard.
    """
    segments = route.path.split("/")
    if WILDCARD_SEGMENT not in segments:
        return ()
    depth = segments.index(WILDCARD_SEGMENT) - 1  # the fixed segments before the first wildcard
    climb = [".."] * depth + ["admin"]
    values = ("fake-model/extra",                                # one more segment
              "/".join(climb),                                   # dot-dot out of the prefix
              "/".join(["%2e%2e"] * depth + ["admin"]),          # the same, percent-encoded
              "%2F".join(climb),                                 # one segment, slashes encoded
              "/".join(["..;"] * depth + ["admin"]))             # Tomcat: ..; is ..
    return tuple(dict.fromkeys(
        "/".join(value if segment == WILDCARD_SEGMENT else segment for segment in segments) for value in values))


def route_probes(enforced: Iterable[InferenceRoute], reference: Iterable[InferenceRoute] = (),
                 extra: Iterable[tuple[str, str]] = NON_ROUTE_REQUESTS) -> tuple[RouteProbe, ...]:
    """One probe per route of ``enforced``, per route of ``reference`` (the baseline's: a route the
    policy dropped must now be refused) and per ``extra`` request, each decided by ``enforced``; then the
    first route of ``enforced`` and every ``extra`` request again as HTTP/1.0; then the first route with a body
    and every ``extra`` request with one in each of :data:`BODY_FRAMINGS`; then, for every route of ``enforced``,
    each of :func:`path_spellings` of its path that the table does not route (one the strict matcher routes, a
    wildcard value such as ``%66ake-model``, is no probe: a stricter matcher may refuse it), and each of its
    :func:`wildcard_escapes`. Pure."""
    table = tuple(enforced)
    extra = tuple(extra)

    def decided(method: str, path: str, **variant: str) -> RouteProbe:
        return RouteProbe(method, path, match_route(table, method, path) is not None, **variant)

    requests = [(route.method, route.example()) for route in (*table, *reference)] + list(extra)
    http10 = [(route.method, route.example()) for route in table[:1]] + list(extra)
    with_content = [(route.method, route.example()) for route in table if route.method in METHODS_WITH_CONTENT][:1]
    with_content += [(method, path) for method, path in extra if method in METHODS_WITH_CONTENT]
    candidates = [*(decided(method, path) for method, path in requests),
                  *(decided(method, path, http_version=HTTP10) for method, path in http10),
                  *(decided(method, path, framing=framing)
                    for framing in BODY_FRAMINGS for method, path in with_content)]
    for route in table:
        spellings = (decided(route.method, spelling) for spelling in path_spellings(route.example()))
        candidates += [dataclasses.replace(probe, canonical=route.example()) for probe in spellings if not probe.routed]
        candidates += [decided(route.method, escape) for escape in wildcard_escapes(route)]
    unique: dict[str, RouteProbe] = {}  # one probe per test id, the first
    for probe in candidates:
        unique.setdefault(probe.test_id, probe)
    return tuple(unique.values())


@dataclass(frozen=True)
class RequestTarget:
    """A request-target split into what routing needs.

    ``authority`` is set only for absolute-form (``https://inference.local/v1/models``), so the
    interceptor can hold it to the same ``inference.local`` rule as the Host header.
    ``path`` is the canonical path, ``query`` the raw query without its ``?`` (``None`` if absent).
    """

    authority: str | None
    path: str
    query: str | None

    @property
    def origin_form(self) -> str:
        """The target as it is sent upstream (RFC 9112 §3.2.1), with the query kept verbatim."""
        return self.path if self.query is None else f"{self.path}?{self.query}"


def parse_request_target(target: str | bytes) -> RequestTarget | None:
    """Split ``target`` into authority, path and query, or ``None`` if it is not canonical.

    Refused (``None``), each for the bypass it closes:

    - non-ASCII bytes, CTLs, space, ``\\``: parsers disagree on them (some treat ``\\`` as ``/``);
    - ``#``: a fragment is never part of a request-target (RFC 9112 §3.2); a backend that keeps it
      sees a different path;
    - asterisk-form ``*`` and authority-form ``host:port``: not used for inference requests;
    - absolute-form with userinfo (``https://u@inference.local/...``): RFC 9110 §4.2.4 forbids it and
      it is a classic host-confusion trick;
    - ``%`` anywhere in the path: ``/v1/chat%2Fcompletions`` or ``/v1/%63hat/completions`` might be
      decoded by the backend into a route this matcher did not see, or the reverse;
    - ``.`` or ``..`` segments (RFC 3986 §5.2.4 dot-segment removal happens in some backends only);
    - empty segments (``//``), including a trailing ``/``: many frameworks collapse them, some don't;
    - characters outside RFC 3986 pchar.

    Case is kept as sent: RFC 3986 §6.2.2.1 makes paths case-sensitive, so ``/V1/Models`` is a
    different resource and matches no route.
    """
    text = _ascii(target)
    if text is None or not text or any(ch <= " " or ch in "\x7f\\#" for ch in text):
        return None
    authority: str | None = None
    if not text.startswith("/"):
        absolute = _ABSOLUTE_FORM.fullmatch(text)
        if absolute is None:
            return None
        authority = absolute.group("authority")
        if not authority or "@" in authority:
            return None
        text = absolute.group("rest")
        if not text.startswith("/"):
            # "https://inference.local" or "https://inference.local?x": the path is empty, which
            # RFC 9112 §3.2.2 turns into "/" -- and "/" is no route.
            return None
    path, separator, query = text.partition("?")
    segments = path.split("/")[1:]
    for segment in segments:
        if not segment or segment in (".", "..") or not _PCHAR_SEGMENT.fullmatch(segment):
            return None
    return RequestTarget(authority=authority, path=path, query=query if separator else None)


def request_path(target: str | bytes) -> str | None:
    """The canonical path of ``target`` (query removed, absolute-form reduced), or ``None``."""
    parsed = parse_request_target(target)
    return None if parsed is None else parsed.path


def match_route(
    routes: Iterable[InferenceRoute], method: str | bytes, target: str | bytes
) -> InferenceRoute | None:
    """The first route that allows ``method target``, or ``None`` (the request must be denied).

    The method is compared exactly: RFC 9110 §9.1 makes it case-sensitive, so ``post`` is not
    ``POST`` (a backend that folds it would otherwise run a request nobody matched).
    """
    method_text = _ascii(method)
    parsed = parse_request_target(target)
    if method_text is None or parsed is None:
        return None
    for route in routes:
        if route.matches(method_text, parsed.path):
            return route
    return None


def _ascii(value: str | bytes) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if value.isascii() else None


def _only_dots(segment: str) -> bool:
    # "..." is harmless on POSIX but Windows-hosted backends strip trailing dots, turning it into "".
    return segment.strip(".") == ""
