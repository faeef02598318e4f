"""Strict HTTP/1.1 message framing, as pure functions over raw bytes.

A policy proxy is only as good as its agreement with the origin about where one request ends and the
next begins. Every check here exists because a real parser disagreed with another one (request
smuggling); the ones h11 0.16 does *not* do itself are marked "h11 accepts" (network.md §5).

Nothing in this module touches a socket: ``check_request_head`` / ``check_response_head`` judge a
complete head, ``ChunkedBodyParser`` judges a chunked body fed incrementally. The async reader in
``http_stream`` drives them. Section numbers are RFC 9112 (HTTP/1.1) unless another RFC is named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypeVar

__all__ = [
    "FAMILY_OF_VIOLATION",
    "FORBIDDEN_TRAILERS",
    "FRAMING_FAMILIES",
    "HEAD_END",
    "MAX_HEAD_BYTES",
    "MAX_RESPONSE_HEAD_BYTES",
    "READ_SIZE",
    "ROUTING_OVERRIDE_FIELDS",
    "BodyFraming",
    "ChunkedBody",
    "ChunkedBodyParser",
    "FramedPipeline",
    "FramingViolation",
    "RequestHead",
    "ResponseHead",
    "check_request_head",
    "check_response_head",
    "first_bare_line_ending",
    "frame_pipeline",
    "frozen_instance",
    "full_request_head",
    "full_response_head",
    "is_aliased_field",
    "strict_request_head",
    "strict_response_head",
]

# OpenShell reads at most 8 KiB of request head and answers 431 beyond that (network.md §4).
MAX_HEAD_BYTES = 8192
# The end of an HTTP/1.1 message head (RFC 9112 §2.1: the empty line after the field lines).
HEAD_END = b"\r\n\r\n"
# One recv()/read() of a socket or stream: every HTTP reader in the package uses this size.
READ_SIZE = 65536
# Upstream response heads may be larger than what we accept from clients (long Set-Cookie lists).
MAX_RESPONSE_HEAD_BYTES = 65536
# A chunk-size line longer than this is an attack, not a size: 16 hex digits already exceed 2**63.
_MAX_CHUNK_SIZE_DIGITS = 16
# Content-Length > 2**63 overflows most parsers (network.md §5, "malformed CL").
_MAX_CONTENT_LENGTH_DIGITS = 18


class FramingViolation(Exception):
    """A message whose framing is ambiguous or malformed; the connection must be closed.

    ``case`` is a stable identifier (used in decision logs and the smuggling catalogue), ``status``
    the HTTP status to answer with (400, 501 for an unknown transfer coding, 431 for an oversized
    head, 413 for an oversized body), ``detail`` a sentence for humans.
    """

    def __init__(self, case: str, detail: str, status: int = 400) -> None:
        super().__init__(f"{case}: {detail}")
        self.case = case
        self.status = status
        self.detail = detail


# --- grammar (RFC 9110 §5.6.2, §5.5; RFC 9112 §3, §7.1) as byte tables ------------------------------

# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~"
#         / DIGIT / ALPHA                                               (RFC 9110 §5.6.2)
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# field-vchar = VCHAR / obs-text; field-content allows SP and HTAB inside  (RFC 9110 §5.5)
_FIELD_VALUE_CHARS = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)) + b" \t"
# request-target characters (RFC 9112 §3.2 -> RFC 3986 §2): unreserved, gen-delims, sub-delims and "%"
# of a pct-encoded triplet, minus the fragment delimiter "#" (never sent, §3.2). Everything else that is
# printable ASCII (``"`` ``<`` ``>`` ``\`` ``^`` `````` ``{`` ``|`` ``}``) is not a URI character: parsers
# disagree on it ("\" as "/", network.md §3), so it is refused. CTL, SP and non-ASCII are absent too.
_TARGET_CHARS = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
                 b":/?[]@" b"!$&'()*+,;=" b"%")
# Host = uri-host [ ":" port ] (RFC 9110 §7.2): a reg-name of unreserved characters (pct-encoding and
# sub-delims are legal in RFC 3986 but no DNS name holds them; "," would make a singleton field a list,
# RFC 9110 §5.3), an IPv4 literal, or an IP-literal in brackets; the port is digits.
_HOST_NAME_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_IP_LITERAL_CHARS = b"0123456789ABCDEFabcdef:.vV"
# A field section holds field-value characters plus the CRLFs between lines (bare CR/LF are
# rejected before this is used).
_SECTION_CHARS = _FIELD_VALUE_CHARS + b"\r\n"
_HEXDIG = b"0123456789ABCDEFabcdef"
_DIGIT = b"0123456789"
_OWS = b" \t"


def _only(value: bytes, allowed: bytes) -> bool:
    """True when every byte of ``value`` is in ``allowed`` (bytes.translate deletes the allowed set)."""
    return not value.translate(None, allowed)


# Hop-by-hop framing/routing fields a client must never ask a proxy to drop (RFC 9110 §7.6.1: the
# Connection option list names fields to remove *before* forwarding; naming these re-frames the
# message on the next hop).
_CONNECTION_FORBIDDEN_OPTIONS = frozenset({b"content-length", b"transfer-encoding", b"host"})

# Fields that tell an origin to route or run the request differently from its request line (what this
# proxy and the interceptor judged), refused in requests and trailers:
# * the target: X-Original-URL / X-Rewrite-URL (IIS URL Rewrite, Symfony, Zend: the origin serves that
#   path instead of the request-target; RFC 9112 §3.2 makes the request-target the only target);
# * the method: X-HTTP-Method-Override / X-HTTP-Method / X-Method-Override (Google, Rails, ASP.NET run
#   that method; RFC 9110 §9.1: the method is the request line's token, and the route was chosen on it);
# * the authority: X-Forwarded-Host / X-Host / X-Forwarded-Server / X-Original-Host and Forwarded
#   (RFC 7239 §4: appended by proxies, never by a client; this proxy is the client's first hop, so a
#   client-supplied value can only be forged, and origins build URLs and virtual hosts from it).
# Stripping would leave the refusal invisible to the client and to the decision log; refusing (400)
# is fail-closed and names the field. X-Forwarded-For / X-Real-IP name the client, not a route: kept.
ROUTING_OVERRIDE_FIELDS = frozenset(
    {
        b"x-original-url",
        b"x-rewrite-url",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-forwarded-host",
        b"x-host",
        b"x-forwarded-server",
        b"x-original-host",
        b"forwarded",
        # PortSwigger param-miner's header list: host, path and URL overrides
        b"x-http-host-override",
        b"x-http-path-override",
        b"x-http-destinationurl",
        b"x-proxy-url",
        # Traefik ForwardAuth / nginx auth_request hand the judged target to an auth server in these, which
        # then decides on a client's forgery
        b"x-forwarded-uri",
        b"x-original-uri",
    }
)

# Fields whose name, with "_" read as "-", is a framing or routing field: servers that map headers
# to CGI-style variables (HTTP_TRANSFER_ENCODING), and some Python/Ruby frameworks, normalise "_" to
# "-" (Http11Probe SMUG-TRANSFER_ENCODING; smuggler "underjoin1"), so the next hop may frame or route
# by a field this proxy never read as one.
_ALIASED_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade",
                             b"te", b"trailer", b"expect"}) | ROUTING_OVERRIDE_FIELDS



def is_aliased_field(name: bytes) -> bool:
    """Whether ``name`` (lowercase) is spelled differently from a framing or routing field but reads as one
    with ``_`` taken for ``-`` or with ``%XX`` decoded (``Transfer-%45ncoding``: "%" is a tchar, RFC 9110
    §5.6.2, so the name is a valid token to us; PortSwigger http-request-smuggler's "encode" permutation
    targets the next hop that URL-decodes field names)."""
    if b"_" not in name and b"%" not in name:
        return False
    return _percent_decoded(name).lower().replace(b"_", b"-") in _ALIASED_FIELDS


def _percent_decoded(value: bytes) -> bytes:
    """``value`` with every ``%`` HEXDIG HEXDIG triplet decoded (RFC 3986 §2.1); other bytes unchanged. Pure."""
    parts = value.split(b"%")
    decoded = bytearray(parts[0])
    for part in parts[1:]:
        if len(part) >= 2 and _only(part[:2], _HEXDIG):
            decoded += bytes([int(part[:2], 16)]) + part[2:]
        else:
            decoded += b"%" + part
    return bytes(decoded)


# Trailer fields that must never be merged into the header section (RFC 9110 §6.5.1: framing,
# routing, authentication and request modifiers are not allowed in trailers).
FORBIDDEN_TRAILERS = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"authorization",
        b"proxy-authorization",
        b"connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"cookie",
        b"expect",
        # RFC 9110 §6.5.1 further: request modifiers and how to process the content
        b"max-forwards",
        b"cache-control",
        b"range",
        b"content-encoding",
        b"content-type",
        b"content-range",
    }
) | ROUTING_OVERRIDE_FIELDS

# Upgrade tokens for cleartext HTTP/2 (RFC 7540 §3.2; removed in RFC 9113 §3.1). An h2c upgrade
# through a policy proxy turns a judged HTTP/1.1 request into an unjudged HTTP/2 connection.
_H2C_UPGRADE_TOKENS = frozenset({b"h2c", b"h2", b"http/2", b"http/2.0"})

# The checks above, grouped into the families the smuggling catalogue is organised by: family ->
# the ``FramingViolation.case`` values its checks raise. ``lax`` (check_request_head,
# ChunkedBodyParser) names families whose checks are *not* enforced and are replaced by the lenient
# reading a real weak parser does (each noted where it happens). It exists only so that the test suite
# can build a proxy with exactly one family's mistake and prove the catalogue catches it.
FRAMING_FAMILIES: Mapping[str, frozenset[str]] = MappingProxyType({
    "request-line": frozenset({"request-line", "http-version", "target-chars"}),
    "target-form": frozenset({"target-form", "target-userinfo"}),
    "host-value": frozenset({"host-missing-or-duplicate", "host-value"}),
    "header-name": frozenset({"ws-before-colon", "field-syntax", "header-name-alias", "ws-before-first-field"}),
    "content-length": frozenset({"cl-malformed", "cl-duplicate"}),
    "transfer-encoding": frozenset({"te-not-chunked", "te-http10", "cl-te-both"}),
    "trailer": frozenset({"trailer-forbidden"}),
    "h2c": frozenset({"upgrade-h2c"}),
    "routing-override": frozenset({"routing-override"}),
    "connect-body": frozenset({"connect-body"}),
    "chunked-body": frozenset({"chunk-size", "chunk-ext", "chunk-terminator"}),
})
FAMILY_OF_VIOLATION: Mapping[str, str] = MappingProxyType({
    violation: family for family, violations in FRAMING_FAMILIES.items() for violation in violations
})
# A C-style strtoul into 32 bits: what the lenient Content-Length reading wraps to (2**32 + 5 -> 5).
_LENIENT_LENGTH_MODULUS = 2**32


BodyFraming = tuple[Literal["none", "length", "chunked"], int]
_Frozen = TypeVar("_Frozen")


def frozen_instance(cls: type[_Frozen], **values: object) -> _Frozen:
    """``cls(**values)`` for a frozen dataclass without ``__post_init__``, every field given: the instance's
    ``__dict__`` is filled at once instead of by the generated ``__init__``'s ``object.__setattr__`` per field
    (0.9 against 2.3 µs for six fields; four such objects are built per proxied request). Hot paths only."""
    instance: _Frozen = object.__new__(cls)
    instance.__dict__.update(values)
    return instance


@dataclass(frozen=True)
class RequestHead:
    """A request head that passed every framing check."""

    method: str
    target: str
    http_version: str  # "1.1" or "1.0"
    headers: tuple[tuple[bytes, bytes], ...]  # (lowercase name, OWS-trimmed value), in order
    body_framing: BodyFraming
    keep_alive: bool  # False for HTTP/1.0 (App. C.2.2: close after the response) or Connection: close

    def header(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lowercase), or None."""
        for field_name, value in self.headers:
            if field_name == name:
                return value
        return None


@dataclass(frozen=True)
class ResponseHead:
    """A response status line and header section that passed every framing check."""

    http_version: str
    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...]
    content_length: int | None  # the single valid Content-Length, if present
    chunked: bool  # Transfer-Encoding: chunked
    keep_alive: bool


def first_bare_line_ending(data: bytes) -> str | None:
    """``"bare-lf"`` / ``"bare-cr"`` if ``data`` holds an LF or CR that is not part of a CRLF.

    §2.2: a recipient MAY accept bare LF, but parsers that do and parsers that don't see different
    header sections (h11 accepts bare LF). A bare CR MUST be rejected or replaced. A trailing CR is
    not judged: its LF may still be in flight.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf:
        return "bare-lf"
    cr = data.count(b"\r")
    if cr != crlf and not (cr == crlf + 1 and data.endswith(b"\r")):
        return "bare-cr"
    return None


def _split_field_lines(section: bytes, lax: frozenset[str] = frozenset()) -> list[tuple[bytes, bytes]]:
    """Parse CRLF-separated field lines (no terminating empty line) into (lowercase name, value).

    The fast path checks every value byte of the section at once; any line that does not look like
    ``token ":" value`` goes to ``_diagnose_field_line``, which names the exact problem. With
    ``"header-name"`` in ``lax`` a name is read the lenient way (whitespace around it stripped, any bytes
    taken, ``_`` and ``%XX`` left alone) and a line without a name is skipped.
    """
    if not section:
        return []
    lenient_names = "header-name" in lax
    if section.translate(None, _SECTION_CHARS):
        for line in section.split(b"\r\n"):
            _diagnose_field_line(line, lenient_names)
    fields: list[tuple[bytes, bytes]] = []
    for line in section.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if lenient_names:
            # What a parser built on Python's str.strip() does (HTTP Garden server bug 20): VT, FF, \x1c-\x1f,
            # \x85 and \xa0 count as whitespace too.
            name = name.decode("latin-1").strip().encode("latin-1")
            if not colon or not name:
                continue
        elif not colon or not name or not _only(name, _TCHAR):
            _diagnose_field_line(line)
        lowered = name.lower()
        if not lenient_names and is_aliased_field(lowered):
            raise FramingViolation("header-name-alias", f"{name.decode()!r} reads as a framing or routing field "
                                   "where '_' is taken for '-' or '%XX' is decoded")
        fields.append((lowered, value.strip(_OWS)))
    return fields


def _diagnose_field_line(line: bytes, lenient_names: bool = False) -> None:
    """Raise the specific violation for a malformed field line (returns for a valid one)."""
    if not line:
        raise FramingViolation("field-syntax", "empty line inside the field section")
    if line[0] in _OWS:
        # §5.2: obs-fold. h11 accepts and unfolds it; a proxy that unfolds while the origin
        # does not (or vice versa) sees a different Transfer-Encoding.
        raise FramingViolation("obs-fold", "obsolete line folding (§5.2)")
    colon = line.find(b":")
    if not lenient_names:
        if colon <= 0:
            raise FramingViolation("field-syntax", f"field line without a name: {line[:40]!r}")
        name = line[:colon]
        if name[-1] in _OWS:
            # §5.1: "No whitespace is allowed between the field name and colon ... MUST reject".
            raise FramingViolation("ws-before-colon", f"whitespace before colon in {name!r}")
        if not _only(name, _TCHAR):
            raise FramingViolation("field-syntax", f"field name is not a token: {name[:40]!r}")
    if colon > 0 and not _only(line[colon + 1 :], _FIELD_VALUE_CHARS):
        # RFC 9110 §5.5: NUL and other CTLs are invalid in field values.
        raise FramingViolation("field-value", f"control character in the value of {line[:colon].decode('latin-1')!r}")


def _comma_list(value: bytes) -> list[bytes]:
    """RFC 9110 §5.6.1 list elements, OWS-trimmed and lowercased; empty elements kept as b""."""
    return [element.strip(_OWS).lower() for element in value.split(b",")]


def _content_length(values: list[bytes], lax: frozenset[str] = frozenset()) -> int:
    """The single Content-Length value; anything but one ``0|[1-9][0-9]*`` is rejected.

    §6.3 allows collapsing identical duplicates; a policy proxy rejects them (simplest, and h11
    silently accepts ``5, 5`` and leading zeros). With ``"content-length"`` in ``lax`` the first value is
    read like C ``strtoul`` into 32 bits: OWS and ``+`` skipped, the leading digits taken, the rest
    ignored, wrapped at 2**32 (``5x`` -> 5, ``1 0`` -> 1, ``0x5`` -> 0, 2**32+5 and 2**64+5 -> 5).
    """
    if "content-length" in lax:
        text = values[0].lstrip(b" \t+")
        digits = text[: len(text) - len(text.lstrip(_DIGIT))]
        return int(digits or b"0") % _LENIENT_LENGTH_MODULUS
    if len(values) > 1:
        raise FramingViolation("cl-duplicate", "more than one Content-Length field (§6.3)")
    value = values[0]
    if b"," in value:
        raise FramingViolation("cl-duplicate", f"Content-Length is a list: {value[:40]!r} (§6.3)")
    if (
        not value
        or not _only(value, _DIGIT)
        or (len(value) > 1 and value[0:1] == b"0")
        or len(value) > _MAX_CONTENT_LENGTH_DIGITS
    ):
        raise FramingViolation("cl-malformed", f"Content-Length must be 0|[1-9][0-9]*: {value[:40]!r}")
    return int(value)


def _require_chunked(values: list[bytes]) -> None:
    """Accept exactly one ASCII ``chunked`` (case-insensitive, OWS-trimmed), nothing else.

    §6.1: chunked must be the final coding; this proxy supports no other coding, so any other
    well-formed coding list is 501 (RFC 9112 §6.1 "SHOULD respond with 501") and anything malformed
    is 400. Non-ASCII bytes are rejected before case-folding so that the Kelvin sign (U+212A,
    which ``str.lower()`` folds to "k") can never turn ``chunKed`` into ``chunked``.
    """
    if len(values) > 1:
        raise FramingViolation("te-not-chunked", "more than one Transfer-Encoding field")
    value = values[0]
    if not value.isascii():
        raise FramingViolation("te-not-chunked", f"non-ASCII Transfer-Encoding: {value[:40]!r}")
    if value.lower() == b"chunked":
        return
    codings = _comma_list(value)
    if all(coding and _only(coding, _TCHAR) for coding in codings) and any(
        coding != b"chunked" for coding in codings
    ):
        raise FramingViolation("te-not-chunked", f"unsupported transfer coding {value[:40]!r}", 501)
    raise FramingViolation("te-not-chunked", f"Transfer-Encoding must be exactly chunked: {value[:40]!r}")


def _lenient_chunked(values: list[bytes]) -> bool:
    """The lenient reading (``"transfer-encoding"`` in ``lax``): chunked when any Transfer-Encoding
    value, decoded as UTF-8 with bad bytes dropped and case-folded, contains ``chunked`` (a substring
    match: ``chunked, cow``, ``\\xa0chunked`` and the Kelvin sign all count; ``chunk`` does not)."""
    return any("chunked" in value.decode("utf-8", "ignore").lower() for value in values)


def _target_form(method: bytes, target: bytes) -> str:
    """``"origin"`` | ``"absolute"`` | ``"authority"`` | ``"asterisk"`` (RFC 9112 §3.2.1-§3.2.4)."""
    if target == b"*":
        return "asterisk"
    if target.startswith(b"/"):
        return "origin"
    scheme, separator, _ = target.partition(b"://")
    if separator and scheme and _only(scheme, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+-."):
        return "absolute"
    return "authority"


def _check_target(method: bytes, target: bytes, lax: frozenset[str]) -> None:
    if "request-line" not in lax:
        if not target or not _only(target, _TARGET_CHARS):
            raise FramingViolation(
                "target-chars",
                f"request-target holds a character outside RFC 3986 (CTL, space, '#', '\\\\', '|', '{{', "
                f"'^', non-ASCII...): {target[:60]!r}")
        percent = target.find(b"%")
        while percent != -1:
            if not _only(target[percent + 1 : percent + 3], _HEXDIG) or len(target) < percent + 3:
                # RFC 3986 §2.1: "%" only starts a pct-encoded triplet; decoders disagree on "%zz".
                raise FramingViolation("target-chars", f"'%' not followed by two hex digits: {target[:60]!r}")
            percent = target.find(b"%", percent + 3)
    if "target-form" in lax:
        return
    form = _target_form(method, target)
    if method == b"CONNECT":
        if form != "authority":
            # §3.2.3: authority-form is only and always for CONNECT (whether it is a valid host:port is the
            # proxy's own authority parser's to say: network.proxy.decision.split_target).
            raise FramingViolation("target-form", f"CONNECT needs authority-form host:port: {target[:60]!r}")
    elif form == "authority":
        raise FramingViolation("target-form", f"authority-form is only for CONNECT (§3.2.3): {target[:60]!r}")
    elif form == "asterisk" and method != b"OPTIONS":
        raise FramingViolation("target-form", "asterisk-form is only for OPTIONS (§3.2.4)")
    elif target.startswith(b"//"):
        # RFC 3986 §4.2: "//host/path" is a network-path reference; a parser that resolves it (urljoin,
        # WHATWG) takes "host" as the authority, one that reads it as a path does not.
        raise FramingViolation("target-form", f"a network-path reference is neither origin- nor absolute-form: "
                               f"{target[:60]!r}")
    if form == "absolute":
        rest = target[target.find(b"://") + 3 :]
        authority_end = len(rest)
        for delimiter in b"/?":
            position = rest.find(bytes([delimiter]))
            if position != -1:
                authority_end = min(authority_end, position)
        if b"@" in rest[:authority_end]:
            # RFC 9110 §4.2.4: userinfo is deprecated in http(s) URIs; parsers disagree on which "@"
            # ends it (network.md §3), so the authority a proxy judges may not be the one dialled.
            raise FramingViolation("target-userinfo", f"userinfo in absolute-form target: {target[:60]!r}")


def _lenient_target(method: bytes, target: bytes, host: bytes) -> bytes:
    """The lenient reading of a target in the wrong form (``"target-form"`` in ``lax``): what a proxy
    that "helps" does. A CONNECT takes its authority from an absolute URL or from Host; any other method
    with an authority-form or asterisk-form target gets an absolute URL on that authority (or Host), and a
    schemeless ``//host/path`` gets ``http:`` in front."""
    form = _target_form(method, target)
    if method == b"CONNECT":
        if form == "absolute":
            return target.partition(b"://")[2].partition(b"/")[0]
        return target if form == "authority" else host
    if form == "authority":
        return b"http://" + target + b"/"
    if target.startswith(b"//"):
        return b"http:" + target
    if form == "asterisk" and method != b"OPTIONS":
        return b"http://" + host + b"/"
    return target


def _check_host(value: bytes) -> None:
    """RFC 9112 §3.2: a Host field with an invalid value is answered 400 (``Host = uri-host [":" port]``)."""
    host, port = value, b""
    if value.startswith(b"["):
        end = value.find(b"]")
        host, rest = value[: end + 1], value[end + 1 :]
        valid = end > 1 and _only(host[1:-1], _IP_LITERAL_CHARS) and (not rest or (rest[:1] == b":" and len(rest) > 1))
        port = rest[1:]
    else:
        host, colon, port = value.partition(b":")
        valid = bool(host) and _only(host, _HOST_NAME_CHARS) and (not colon or bool(port))
    # A port beyond 65535 is left to the target's own parser (network.proxy.decision): refusing it here
    # would hide the SSRF catalogue's port-wraparound cases (65616 -> 80) from a strtoul weak proxy.
    if not valid or not _only(port, _DIGIT) or len(port) > 5:
        raise FramingViolation("host-value", f"Host is not uri-host[:port]: {value[:60]!r} (RFC 9110 §7.2)")


def _parse_request_line(request_line: bytes, lax: frozenset[str]) -> tuple[bytes, bytes, str]:
    """Method, target and version of a request-line (§3: exactly ``method SP target SP HTTP/1.x``).

    With ``"request-line"`` in ``lax`` it is read the whitespace-tolerant way (RFC 9112 §3 names it: any
    of SP, HTAB, VT, FF as a separator, leading and trailing whitespace ignored): the version is what
    follows the last ``HTTP/`` in any case, whitespace removed (read as 1.1 unless it says 1.0; none at
    all is an HTTP/0.9-style line, read as 1.0), the first word is the method and the words between are
    the target, joined by a space.

    Strictly, the version is ``HTTP/`` DIGIT "." DIGIT (§2.3): HTTP/1.1 and HTTP/1.0 are served, any other
    well-formed version is 505 (RFC 9110 §15.6.6), and anything else (``HTTP/1``, ``HTTP/01.01``,
    ``HTTP/ 1.1``, ``http/1.1``, none) is a malformed request-line (400).
    """
    if "request-line" in lax:
        return _lenient_request_line(request_line)
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not _only(parts[0], _TCHAR):
        raise FramingViolation("request-line", f"malformed request-line: {request_line[:80]!r}")
    method, target, version = parts
    if version == b"HTTP/1.1":
        return method, target, "1.1"
    if version == b"HTTP/1.0":
        return method, target, "1.0"
    if len(version) == 8 and version.startswith(b"HTTP/") and version[6:7] == b"." \
            and _only(version[5:6] + version[7:], _DIGIT):
        raise FramingViolation("http-version", f"unsupported version {version[:20]!r}", 505)
    raise FramingViolation("request-line", f"malformed request-line: {request_line[:80]!r}")


def _lenient_request_line(request_line: bytes) -> tuple[bytes, bytes, str]:
    """The whitespace-tolerant reading of :func:`_parse_request_line` (``"request-line"`` in ``lax``)."""
    marker = request_line.upper().rfind(b"HTTP/")
    if marker > 0 and request_line[marker - 1 : marker].isspace():
        words, version = request_line[:marker].split(), b"".join(request_line[marker:].split()).upper()
    else:
        words, version = request_line.split(), b"HTTP/1.0"
    if len(words) < 2:
        raise FramingViolation("request-line", f"malformed request-line: {request_line[:80]!r}")
    return words[0], b" ".join(words[1:]), "1.0" if version == b"HTTP/1.0" else "1.1"


def check_request_head(
    head: bytes, *, max_head: int = MAX_HEAD_BYTES, lax: frozenset[str] = frozenset()
) -> RequestHead:
    """Validate a raw request head (request-line through the terminating CRLFCRLF).

    Raises ``FramingViolation`` for anything ambiguous; returns the parsed head otherwise. Pure: the
    same bytes always give the same verdict. ``lax`` names :data:`FRAMING_FAMILIES` read leniently
    instead (weakened proxies in the test suite only; empty everywhere else).

    The common, strictly valid shape is taken by :func:`strict_request_head` (one regex match); everything
    else, every refusal included, is judged by :func:`full_request_head`.
    """
    if not lax:
        fast = strict_request_head(head, max_head)
        if fast is not None:
            return fast
    return full_request_head(head, max_head=max_head, lax=lax)


def full_request_head(
    head: bytes, *, max_head: int = MAX_HEAD_BYTES, lax: frozenset[str] = frozenset()
) -> RequestHead:
    """Every check of :func:`check_request_head`, one by one (the reference the fast path is tested against)."""
    _check_head_envelope(head, max_head, what="request", too_large_status=431)

    request_line, _, section = head[:-4].partition(b"\r\n")
    method, target, http_version = _parse_request_line(request_line, lax)
    _check_target(method, target, lax)

    if section[:1] in (b" ", b"\t") and "header-name" not in lax:
        # §2.2: whitespace between the start-line and the first field line MUST be rejected or the line
        # skipped unprocessed; a parser that strips it reads " Transfer-Encoding" as Transfer-Encoding.
        raise FramingViolation("ws-before-first-field", "whitespace before the first field line (§2.2)")
    headers = _split_field_lines(section, lax)
    content_lengths: list[bytes] = []
    transfer_encodings: list[bytes] = []
    connection_options: list[bytes] = []
    hosts: list[bytes] = []
    for name, value in headers:
        if name == b"content-length":
            content_lengths.append(value)
        elif name == b"transfer-encoding":
            transfer_encodings.append(value)
        elif name == b"host":
            hosts.append(value)
        elif name == b"connection":
            connection_options.extend(_comma_list(value))
        elif name in ROUTING_OVERRIDE_FIELDS and "routing-override" not in lax:
            raise FramingViolation("routing-override", f"{name.decode()} would route the request differently "
                                   "from its request line at the next hop")
        elif "h2c" in lax:
            continue
        elif name == b"upgrade":
            if any(token in _H2C_UPGRADE_TOKENS for token in _comma_list(value)):
                raise FramingViolation("upgrade-h2c", "cleartext HTTP/2 upgrade is refused")
        elif name == b"http2-settings":
            raise FramingViolation("upgrade-h2c", "HTTP2-Settings only accompanies an h2c upgrade")

    if "host-value" not in lax:
        if len(hosts) > 1 or (not hosts and http_version == "1.1"):
            # §3.2: a server MUST respond 400 to an HTTP/1.1 request without Host or with more than one.
            raise FramingViolation("host-missing-or-duplicate", f"{len(hosts)} Host fields (§3.2)")
        for host in hosts:
            _check_host(host)
    forbidden_options = _CONNECTION_FORBIDDEN_OPTIONS.intersection(connection_options)
    if forbidden_options:
        raise FramingViolation(
            "connection-lists-framing-header",
            f"Connection lists {b', '.join(sorted(forbidden_options)).decode()}",
        )
    if method == b"CONNECT" and (content_lengths or transfer_encodings) and "connect-body" not in lax:
        # RFC 9110 §9.3.6: "A CONNECT request message does not have content"; whatever a client frames
        # after its head would be read as a body by one party and as tunnel bytes by another.
        raise FramingViolation("connect-body", "CONNECT with Content-Length or Transfer-Encoding (RFC 9110 §9.3.6)")

    if "target-form" in lax:
        target = _lenient_target(method, target, hosts[0] if hosts else b"")
    if method == b"CONNECT" and "connect-body" in lax:
        framing = _lenient_connect_framing(content_lengths, transfer_encodings)
    else:
        framing = _body_framing(content_lengths, transfer_encodings, http_version, lax)
    keep_alive = http_version == "1.1" and b"close" not in connection_options
    return RequestHead(
        method=method.decode("latin-1"),
        target=target.decode("latin-1"),
        http_version=http_version,
        headers=tuple(headers),
        body_framing=framing,
        keep_alive=keep_alive,
    )


def _body_framing(content_lengths: list[bytes], transfer_encodings: list[bytes], http_version: str,
                  lax: frozenset[str]) -> BodyFraming:
    """§6.3: how the request body is delimited (``"transfer-encoding"`` in ``lax``: the lenient reading
    of :func:`_lenient_chunked`, Transfer-Encoding winning over Content-Length, HTTP/1.0 included)."""
    if transfer_encodings and "transfer-encoding" in lax:
        if _lenient_chunked(transfer_encodings):
            return ("chunked", 0)
        transfer_encodings = []
    if transfer_encodings:
        if content_lengths:
            # §6.1: such a message "ought to be handled as an error"; the server MUST close after
            # responding. h11 accepts it and lets TE win.
            raise FramingViolation("cl-te-both", "both Content-Length and Transfer-Encoding (§6.1)")
        if http_version == "1.0":
            # §6.1: TE in an HTTP/1.0 message means faulty framing; h11 accepts it as chunked,
            # Go net/http ignores it: a classic differential.
            raise FramingViolation("te-http10", "Transfer-Encoding in an HTTP/1.0 request (§6.1)")
        _require_chunked(transfer_encodings)
        return ("chunked", 0)
    if content_lengths:
        return ("length", _content_length(content_lengths, lax))
    return ("none", 0)


def _lenient_connect_framing(content_lengths: list[bytes], transfer_encodings: list[bytes]) -> BodyFraming:
    """The lenient reading of a CONNECT's content (``"connect-body"`` in ``lax``): a proxy that reads the body
    the obsolete RFC 7230 §3.3.3 way (Transfer-Encoding overrides Content-Length; a coding list ending in
    chunked is chunked, any other coding means no body), drops it and opens the tunnel. Bytes it does not
    read as the body become tunnel bytes."""
    if transfer_encodings:
        codings = _comma_list(transfer_encodings[-1])
        return ("chunked", 0) if codings[-1] == b"chunked" else ("none", 0)
    if content_lengths:
        return ("length", _content_length(content_lengths))
    return ("none", 0)


def _check_head_envelope(head: bytes, max_head: int, *, what: str, too_large_status: int) -> None:
    """Size, terminator and line endings of a request or response head (RFC 9112 §2.2)."""
    if len(head) > max_head:
        raise FramingViolation("head-too-large", f"{what} head exceeds {max_head} bytes", too_large_status)
    if not head.endswith(HEAD_END):
        raise FramingViolation("head-unterminated", f"{what} head does not end with CRLFCRLF")
    bare = first_bare_line_ending(head)
    if bare is not None:
        raise FramingViolation(bare, f"{what} line endings must be CRLF (§2.2)")


def check_response_head(head: bytes, *, max_head: int = MAX_RESPONSE_HEAD_BYTES) -> ResponseHead:
    """Validate an upstream response head; bad framing means 502 and never reusing that upstream.

    The common, strictly valid shape is taken by :func:`strict_response_head`; everything else by
    :func:`full_response_head`."""
    fast = strict_response_head(head, max_head)
    if fast is not None:
        return fast
    return full_response_head(head, max_head=max_head)


def full_response_head(head: bytes, *, max_head: int = MAX_RESPONSE_HEAD_BYTES) -> ResponseHead:
    """Every check of :func:`check_response_head`, one by one (the reference the fast path is tested against)."""
    _check_head_envelope(head, max_head, what="response", too_large_status=502)
    status_line, _, section = head[:-4].partition(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    status_code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(status_code) != 3 or not _only(status_code, _DIGIT):
        raise FramingViolation("status-line", f"malformed status-line: {status_line[:80]!r}")
    if not _only(reason, _FIELD_VALUE_CHARS):
        raise FramingViolation("status-line", "control character in the reason phrase")
    headers = _split_field_lines(section)
    content_lengths: list[bytes] = []
    transfer_encodings: list[bytes] = []
    connection_options: list[bytes] = []
    for name, value in headers:
        if name == b"content-length":
            content_lengths.append(value)
        elif name == b"transfer-encoding":
            transfer_encodings.append(value)
        elif name == b"connection":
            connection_options.extend(_comma_list(value))
    if transfer_encodings and content_lengths:
        raise FramingViolation("cl-te-both", "upstream sent both Content-Length and Transfer-Encoding")
    content_length = _content_length(content_lengths) if content_lengths else None
    if transfer_encodings:
        _require_chunked(transfer_encodings)
    http_version = version[5:].decode("ascii")
    return ResponseHead(
        http_version=http_version,
        status=int(status_code),
        reason=reason.decode("latin-1"),
        headers=tuple(headers),
        content_length=content_length,
        chunked=bool(transfer_encodings),
        keep_alive=http_version == "1.1" and b"close" not in connection_options,
    )


# --- the fast path: one regex for the common, strictly valid head shape -------------------------------
#
# ``strict_request_head`` / ``strict_response_head`` accept a *strict subset* of what the full checks
# accept and return exactly what the full checks would; for anything outside the subset they return None
# and the full checks run (they alone raise, so every refusal, its case and its status come from them).
# The subset, request side: a method from a fixed list (no CONNECT); an absolute-form http(s) target with no
# userinfo, or an origin-form one not starting "//" (RFC 9112 §3.2), of RFC 3986 characters with only valid
# pct-encodings; HTTP/1.1 or HTTP/1.0; one or more field lines ``token ":" field-value`` (RFC 9110 §5.5, §5.6.2)
# whose names hold neither "_" nor "%" (so no name can read as another, ``is_aliased_field``); exactly one Host
# of reg-name[:port] (RFC 9110 §7.2); at most one Content-Length of 0|[1-9][0-9]{0,17}; Connection options
# only keep-alive/close; no Transfer-Encoding, Upgrade, HTTP2-Settings or routing-override field. Response side:
# ``HTTP/1.x SP 3DIGIT SP reason``, the same field lines, at most one Content-Length as above or one
# Transfer-Encoding that is exactly "chunked" (ASCII, any case), not both. tests/test_fast_framing.py proves the
# subset property over a generated corpus (every framing and smuggling vector, mutated).
_FAST_TCHAR = rb"[!#$&'*+\-.^`|~0-9A-Za-z]"  # tchar (RFC 9110 §5.6.2) minus "%" and "_"
_FAST_FIELD_LINES = rb"(?:" + _FAST_TCHAR + rb"+:[\x21-\x7e\x80-\xff \t]*\r\n)"
_FAST_PCHARS = rb"[A-Za-z0-9\-._~:/?\[\]@!$&'()*+,;=]*"  # _TARGET_CHARS minus "%"
_FAST_TARGET_CHARS = _FAST_PCHARS + rb"(?:%[0-9A-Fa-f]{2}" + _FAST_PCHARS + rb")*"  # "%" only in a triplet
_FAST_REQUEST = re.compile(
    rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE) "
    rb"((?:https?://[A-Za-z0-9\-._~:\[\]]+(?:[/?]" + _FAST_TARGET_CHARS + rb")?|/(?!/)" + _FAST_TARGET_CHARS + rb")) "
    rb"HTTP/1\.([01])\r\n(" + _FAST_FIELD_LINES + rb"+)\r\n"
)
_FAST_RESPONSE = re.compile(
    rb"HTTP/1\.([01]) ([0-9]{3}) ([\x21-\x7e\x80-\xff \t]*)\r\n(" + _FAST_FIELD_LINES + rb"*)\r\n"
)
_FAST_HOST = re.compile(rb"[A-Za-z0-9\-._~]+(?::[0-9]{1,5})?")
_FAST_CONTENT_LENGTH = re.compile(rb"0|[1-9][0-9]{0,17}")
# Request fields whose checks the fast path does not repeat: any of them sends the head to the full checks.
_FAST_REQUEST_FALLBACK = frozenset({b"transfer-encoding", b"upgrade", b"http2-settings"}) | ROUTING_OVERRIDE_FIELDS
_FAST_CONNECTION_OPTIONS = frozenset({b"keep-alive", b"close"})


def _fast_fields(section: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercase name, OWS-trimmed value) of field lines the fast regex matched (``section`` ends in CRLF)."""
    fields = []
    for line in section[:-2].split(b"\r\n"):
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(_OWS)))
    return fields


def strict_request_head(head: bytes, max_head: int = MAX_HEAD_BYTES) -> RequestHead | None:
    """The :class:`RequestHead` :func:`full_request_head` returns for ``head`` when ``head`` is of the common
    strictly valid shape (the subset above); None for anything else, which is then the full checks' to judge."""
    if type(head) is not bytes or len(head) > max_head:
        return None
    match = _FAST_REQUEST.fullmatch(head)
    if match is None:
        return None
    method, target, minor, section = match.groups()
    host = content_length = None
    connection: list[bytes] = []
    fields = _fast_fields(section)
    for name, value in fields:
        if name == b"host":
            if host is not None or _FAST_HOST.fullmatch(value) is None:
                return None
            host = value
        elif name == b"content-length":
            if content_length is not None or _FAST_CONTENT_LENGTH.fullmatch(value) is None:
                return None
            content_length = value
        elif name == b"connection":
            connection += _comma_list(value)
            if not _FAST_CONNECTION_OPTIONS.issuperset(connection):
                return None
        elif name in _FAST_REQUEST_FALLBACK:
            return None
    if host is None:
        return None
    http_version = "1.1" if minor == b"1" else "1.0"
    return frozen_instance(
        RequestHead,
        method=method.decode("latin-1"),
        target=target.decode("latin-1"),
        http_version=http_version,
        headers=tuple(fields),
        body_framing=("none", 0) if content_length is None else ("length", int(content_length)),
        keep_alive=http_version == "1.1" and b"close" not in connection,
    )


def strict_response_head(head: bytes, max_head: int = MAX_RESPONSE_HEAD_BYTES) -> ResponseHead | None:
    """The :class:`ResponseHead` :func:`full_response_head` returns for ``head`` when ``head`` is of the common
    strictly valid shape (the subset above); None for anything else."""
    if type(head) is not bytes or len(head) > max_head:
        return None
    match = _FAST_RESPONSE.fullmatch(head)
    if match is None:
        return None
    minor, status, reason, section = match.groups()
    content_length = None
    chunked = False
    connection: list[bytes] = []
    fields = _fast_fields(section) if section else []
    for name, value in fields:
        if name == b"content-length":
            if content_length is not None or chunked or _FAST_CONTENT_LENGTH.fullmatch(value) is None:
                return None
            content_length = int(value)
        elif name == b"transfer-encoding":
            if chunked or content_length is not None or not value.isascii() or value.lower() != b"chunked":
                return None
            chunked = True
        elif name == b"connection":
            connection += _comma_list(value)
    http_version = "1.1" if minor == b"1" else "1.0"
    return frozen_instance(
        ResponseHead,
        http_version=http_version,
        status=int(status),
        reason=reason.decode("latin-1"),
        headers=tuple(fields),
        content_length=content_length,
        chunked=chunked,
        keep_alive=http_version == "1.1" and b"close" not in connection,
    )


# --- chunked transfer coding (§7.1) ------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkedBody:
    """A complete chunked body: decoded bytes, encoded length consumed, and what came after it."""

    body: bytes
    consumed: int  # bytes of chunked encoding, counted from the first byte fed
    leftover: bytes  # bytes fed after the end of the body: the start of the next message
    trailers: tuple[tuple[bytes, bytes], ...]


class ChunkedBodyParser:
    """Incremental strict decoder for ``Transfer-Encoding: chunked`` bodies.

    Sizes are ``1*HEXDIG`` exactly (no sign, ``0x``, ``_``, whitespace or OWS; aiohttp
    CVE-2023-47627 came from ``int()`` accepting such forms). Chunk extensions are rejected
    outright: no client this proxy serves needs them, h11 accepts any bytes after ``;`` (bare CR and
    NUL included), and Kestrel CVE-2025-55315, Netty CVE-2025-58056 and Go CVE-2023-39326 were all
    extension parsing bugs, so the only safe extension is none. The two bytes after each chunk's data
    must be CRLF (the h11 0.16.0 fix for CVE-2025-43859). Trailers that carry framing, routing or
    credentials are rejected (RFC 9110 §6.5.1); the others are returned and never merged.
    """

    def __init__(self, *, max_body: int = 10 * 2**20, max_trailer: int = MAX_HEAD_BYTES,
                 lax: frozenset[str] = frozenset()) -> None:
        self._max_body = max_body
        self._lax = lax  # "trailer" in it: forbidden trailer fields are returned like any other
        self._max_trailer = max_trailer
        self._buffer = bytearray()
        self._position = 0  # parse position inside _buffer
        self._discarded = 0  # bytes already dropped from the front of _buffer
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._pending_data = -1  # bytes of chunk data still expected; -1 while reading a size line
        self._in_trailer = False
        self._result: ChunkedBody | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def feed(self, data: bytes) -> ChunkedBody | None:
        """Feed more bytes; returns the complete body once its last chunk and trailers arrived."""
        if self._result is not None:
            raise RuntimeError("chunked body already complete")
        self._buffer += data
        while True:
            if self._in_trailer:
                return self._parse_trailer()
            if self._pending_data >= 0:
                if not self._take_data():
                    return None
            elif not self._take_size_line():
                return None

    def _compact(self) -> None:
        if self._position > 65536:
            del self._buffer[: self._position]
            self._discarded += self._position
            self._position = 0

    def _take_size_line(self) -> bool:
        if "chunked-body" in self._lax:
            return self._take_size_line_leniently()
        end = self._buffer.find(b"\r\n", self._position)
        line = bytes(self._buffer[self._position : end if end != -1 else len(self._buffer)])
        if b";" in line:
            raise FramingViolation("chunk-ext", f"chunk extensions are refused: {line[:40]!r}")
        if end == -1:
            partial = line[:-1] if line.endswith(b"\r") else line
            if len(partial) > _MAX_CHUNK_SIZE_DIGITS or not _only(partial, _HEXDIG):
                raise FramingViolation("chunk-size", f"chunk-size line is not 1*HEXDIG CRLF: {line[:40]!r}")
            return False
        if not line or len(line) > _MAX_CHUNK_SIZE_DIGITS or not _only(line, _HEXDIG):
            raise FramingViolation("chunk-size", f"chunk-size is not 1*HEXDIG: {line[:40]!r}")
        self._position = end + 2
        return self._start_chunk(int(line, 16))

    def _start_chunk(self, size: int) -> bool:
        if size == 0:
            self._in_trailer = True
            return True
        if self._body_size + size > self._max_body:
            raise FramingViolation("body-too-large", f"chunked body exceeds {self._max_body} bytes", 413)
        self._pending_data = size
        return True

    def _take_size_line_leniently(self) -> bool:
        """The lenient chunk-size reading (``"chunked-body"`` in ``lax``), a C parser's: the line ends at LF (a CR
        before it dropped) or, before any extension, at a bare CR; its size is ``strtoul(line, 16)`` (whitespace,
        a sign and ``0x`` skipped, digits up to the first non-hex byte, saturating; ``-1`` wraps), and whatever
        follows, extensions included, is ignored."""
        start = self._position
        line_feed = self._buffer.find(b"\n", start)
        carriage_return = self._buffer.find(b"\r", start)
        if (carriage_return != -1 and (line_feed == -1 or carriage_return < line_feed)
                and b";" not in self._buffer[start:carriage_return] and carriage_return + 1 < len(self._buffer)
                and self._buffer[carriage_return + 1] != 0x0A):
            line, self._position = bytes(self._buffer[start:carriage_return]), carriage_return + 1
        elif line_feed != -1:
            line, self._position = bytes(self._buffer[start:line_feed]).rstrip(b"\r"), line_feed + 1
        else:
            return False
        text = line.lstrip(_OWS)
        negative = text[:1] == b"-"
        text = text[1:] if text[:1] in (b"+", b"-") else text
        text = text[2:] if text[:2].lower() == b"0x" else text
        digits = text[: len(text) - len(text.lstrip(_HEXDIG))]
        size = min(int(digits or b"0", 16), 2**64 - 1)
        return self._start_chunk((2**64 - size) % 2**64 if negative else size)

    def _take_data(self) -> bool:
        available = len(self._buffer) - self._position
        size = self._pending_data
        if "chunked-body" in self._lax:
            # Lenient: the two bytes after the data are skipped unchecked (h11 < 0.16.0, CVE-2025-43859).
            if available < size + 2:
                return False
            self._chunks.append(bytes(self._buffer[self._position : self._position + size]))
            self._body_size += size
            self._position += size + 2
            self._pending_data = -1
            return True
        if available < size + 2:
            # Judge the first terminator byte as soon as it is here.
            if available == size + 1 and self._buffer[self._position + size] != 0x0D:
                raise FramingViolation("chunk-terminator", "chunk data not followed by CRLF")
            return False
        end = self._position + size
        if self._buffer[end : end + 2] != b"\r\n":
            raise FramingViolation("chunk-terminator", "chunk data not followed by CRLF")
        self._chunks.append(bytes(self._buffer[self._position : end]))
        self._body_size += size
        self._position = end + 2
        self._pending_data = -1
        self._compact()
        return True

    def _parse_trailer(self) -> ChunkedBody | None:
        start = self._position
        if self._buffer[start : start + 2] == b"\r\n":
            return self._finish(start + 2, ())
        end = self._buffer.find(HEAD_END, start)
        pending = bytes(self._buffer[start : end + len(HEAD_END) if end != -1 else len(self._buffer)])
        if len(pending) > self._max_trailer:
            raise FramingViolation("trailer-too-large", f"trailer section exceeds {self._max_trailer} bytes")
        bare = first_bare_line_ending(pending)
        if bare is not None:
            raise FramingViolation(bare, "trailer line endings must be CRLF (§2.2)")
        if end == -1:
            return None
        section = pending[:-4]
        if "chunked-body" in self._lax:
            # Lenient: trailer lines that are no field (no colon) are dropped, as the size line's leftovers are.
            section = b"\r\n".join(line for line in section.split(b"\r\n") if b":" in line)
        trailers = _split_field_lines(section, self._lax)
        for name, _ in trailers:
            if name in FORBIDDEN_TRAILERS and "trailer" not in self._lax:
                raise FramingViolation(
                    "trailer-forbidden", f"{name.decode()} is not allowed in trailers (RFC 9110 §6.5.1)"
                )
        return self._finish(end + len(HEAD_END), tuple(trailers))

    def _finish(self, end: int, trailers: tuple[tuple[bytes, bytes], ...]) -> ChunkedBody:
        self._result = ChunkedBody(
            body=b"".join(self._chunks),
            consumed=self._discarded + end,
            leftover=bytes(self._buffer[end:]),
            trailers=trailers,
        )
        self._buffer = bytearray()
        return self._result


# --- a whole pipeline, for catalogues and tests --------------------------------------------------------


@dataclass(frozen=True)
class FramedPipeline:
    """How strict framing splits a byte string that a client wrote in one go."""

    requests: tuple[tuple[RequestHead, bytes], ...]  # (head, decoded body) in order
    violation: FramingViolation | None  # what stopped parsing, if anything
    unparsed: bytes  # bytes never parsed: after a violation, after a CONNECT, or an incomplete tail


def frame_pipeline(
    data: bytes, *, max_head: int = MAX_HEAD_BYTES, max_body: int = 10 * 2**20, lax: frozenset[str] = frozenset()
) -> FramedPipeline:
    """Split ``data`` into requests exactly as the proxy's reader does, stopping at the first problem.

    Parsing also stops after a CONNECT head: whatever follows is tunnel payload, or must never be
    parsed at all if the CONNECT is refused (RFC 9931).
    """
    requests: list[tuple[RequestHead, bytes]] = []
    rest = data
    while rest:
        end = rest.find(HEAD_END)
        if end == -1 or end + len(HEAD_END) > max_head:
            probe = rest[: max_head + 1] if end == -1 else rest[: end + len(HEAD_END)]
            if len(probe) > max_head:
                violation = FramingViolation("head-too-large", f"request head exceeds {max_head} bytes", 431)
                return FramedPipeline(tuple(requests), violation, rest)
            bare = first_bare_line_ending(rest)
            if bare is not None:
                violation = FramingViolation(bare, "line endings must be CRLF (§2.2)")
                return FramedPipeline(tuple(requests), violation, rest)
            return FramedPipeline(tuple(requests), None, rest)
        try:
            head = check_request_head(rest[: end + len(HEAD_END)], max_head=max_head, lax=lax)
            kind, length = head.body_framing
            after_head = rest[end + len(HEAD_END) :]
            if kind == "chunked":
                result = ChunkedBodyParser(max_body=max_body, lax=lax).feed(after_head)
                if result is None:
                    return FramedPipeline(tuple(requests), None, rest)
                body, rest = result.body, result.leftover
            else:
                if length > max_body:
                    raise FramingViolation("body-too-large", f"body exceeds {max_body} bytes", 413)
                if len(after_head) < length:
                    return FramedPipeline(tuple(requests), None, rest)
                body, rest = after_head[:length], after_head[length:]
        except FramingViolation as violation:
            return FramedPipeline(tuple(requests), violation, rest)
        requests.append((head, body))
        if head.method == "CONNECT":
            return FramedPipeline(tuple(requests), None, rest)
    return FramedPipeline(tuple(requests), None, b"")
