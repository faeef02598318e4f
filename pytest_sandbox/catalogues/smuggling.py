"""Raw request-smuggling payloads, as data (network.md §5). A new smuggling case = a row here.

Each row is sent over a raw socket to the proxy in **one write** (client libraries would normalise
the attack away), on two paths. The payload is a template; a :class:`PathForm` says what its
placeholders become on each path (:func:`render`):

* ``{get}``, ``{post}``, ``{ws}``, ``{secret}``: request-targets. :data:`ABSOLUTE_FORM` (a plain
  connection to the proxy) makes them absolute-form URLs on ``{host}``/``{denied}``;
  :data:`TUNNEL_FORM` (inside ``CONNECT inference.local:443``) makes them origin-form inference routes,
  and ``{secret}`` a non-inference path on the same host (exactly the #819 bug).
* ``{body}``: a 5-byte body (``hello``; in the tunnel a 5-byte JSON object, so a routed POST is a
  valid chat completion); Content-Length values and chunk sizes count on the 5 bytes.
* ``{host}``: the allowed origin (``name`` or ``name:port``), ``{denied}``: a host the proxy must refuse;
  both ``inference.local`` in the tunnel.

A row whose request-target *is* the attack (``literal_target``) writes its target out and is sent
as written on both paths. A suite asserts, per row:

* the client receives ``reaches_backend`` ordinary origin responses, then (unless the row is a
  positive control) one refusal whose status is ``expected_status`` (or one of them), written by
  the proxy itself (it does not carry the origin's ``X-Lab-Mark``);
* the proxy closed the connection when ``must_close`` (``recv`` returns ``b""`` before a timeout);
* the bytes that reached the origin frame strictly into exactly the payload's first
  ``reaches_backend`` requests, not one byte more, and nothing reached ``{denied}``. Those first
  requests must therefore themselves be clean (``upstream.allowed_prefix`` checks it).

``violation`` is the ``FramingViolation.case`` the pure framing layer must raise for the payload
(None: the bytes frame cleanly and the refusal is a policy decision). ``holes`` names the
weakened proxy configurations this row detects because the weakened reader *forwards* it:
``"h11-only"`` (no framing checks beyond h11 0.16) and ``"first-request-only"`` (only the first
request of a connection judged, OpenShell #819's absolute-form path and HAProxy's old tunnel mode).
``also_failed_by`` lists the weakenings that make the row fail for another reason (answered
differently, or never answered), per path, with why.

Every row has a ``family`` (the catalogue's table of contents, and the README's) and a ``source``: the
public corpus entry it reproduces (defparam/smuggler's ``configs/exhaustive.py`` mutation names, which
follow PortSwigger's http-request-smuggler permutations; that tool's own ``DesyncBox`` permutation names;
MDA2AV/Http11Probe test ids; narfindustries/http-garden's numbered bugs in ``TROPHIES.md``; PortSwigger
param-miner's header list; RFC 9110/9112 edge cases). A row whose violation belongs to one of
``http.framing.FRAMING_FAMILIES`` is in that family, and a proxy that reads exactly that family leniently
(``ProxyConfig.lax_framing``) must fail exactly that family's rows (tests/broken_proxies/lenient_families.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

from pytest_sandbox.http.framing import FAMILY_OF_VIOLATION

__all__ = ["ABSOLUTE_FORM", "SMUGGLING_CASES", "TUNNEL_FORM", "PathForm", "SmugglingCase", "case_by_id", "render"]

H11_ONLY = "h11-only"
FIRST_REQUEST_ONLY = "first-request-only"
# ``also_failed_by`` path value for a row that fails the same way on both paths.
BOTH_PATHS = "both"


@dataclass(frozen=True)
class SmugglingCase:
    case_id: str
    description: str
    payload: bytes  # template: placeholders in the module docstring, filled by render()
    expected_status: int | tuple[int, ...]  # status of the last response on the connection
    must_close: bool
    reaches_backend: int  # requests the origin may see (and ordinary responses before the last)
    rfc: str
    violation: str | None = None
    holes: frozenset[str] = frozenset()
    # The request-target is the attack: written out (``http://{host}...``) and sent as written on both paths.
    literal_target: bool = False
    # (weakening, path "absolute" | "tunnel" | "both", why): failed for a reason other than a hole.
    also_failed_by: tuple[tuple[str, str, str], ...] = ()
    # The public corpus entry this row reproduces; "" = an RFC edge case (``rfc`` names it).
    source: str = ""
    # "" = derived: the framing family of ``violation``, else the group of the row (see _family()).
    family: str = ""

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", _family(self))

    @property
    def provenance(self) -> str:
        """Where the row comes from: its corpus source, or the RFC edge case it is."""
        return self.source or f"{self.rfc} edge case"

    @property
    def is_positive_control(self) -> bool:
        """A row that must succeed: a proxy that refuses it is broken, not safe."""
        statuses = (self.expected_status,) if isinstance(self.expected_status, int) else self.expected_status
        return all(200 <= status < 300 for status in statuses)

    def accepts_status(self, status: int) -> bool:
        if isinstance(self.expected_status, int):
            return status == self.expected_status
        return status in self.expected_status


# Families of the rows whose violation is no framing family's (FAMILY_OF_VIOLATION covers the rest).
POSITIVE_CONTROLS = "positive-controls"
PIPELINING = "pipelining"  # clean requests refused by policy on a shared connection
LINE_SYNTAX = "line-and-field-syntax"  # line endings, folding, CTLs in values, head size, Connection options
CHUNKED_BODY = "chunked-body"
TARGET_AUTHORITY = "target-authority"  # targets the proxy's own URL parser refuses as well (network.md §3)


def _family(case: SmugglingCase) -> str:
    if case.is_positive_control:
        return POSITIVE_CONTROLS
    if case.violation is None:
        return PIPELINING
    if case.violation in FAMILY_OF_VIOLATION:
        return FAMILY_OF_VIOLATION[case.violation]
    if case.violation.startswith("chunk"):
        return CHUNKED_BODY
    return LINE_SYNTAX


@dataclass(frozen=True)
class PathForm:
    """What a payload's request-target and body placeholders become on one path."""

    name: str  # "absolute" | "tunnel"
    targets: Mapping[bytes, bytes]  # {get} {post} {ws} {secret} -> request-target
    body: bytes  # {body}: 5 bytes on every path (Content-Length values and chunk sizes count on it)


# A forward proxy's client sends absolute-form targets (RFC 9112 §3.2.2).
ABSOLUTE_FORM = PathForm("absolute", MappingProxyType({
    b"{get}": b"http://{host}/",
    b"{post}": b"http://{host}/upload",
    b"{ws}": b"http://{host}/ws",
    b"{secret}": b"http://{denied}/secret",
}), b"hello")
# Inside the intercepted tunnel: origin-form (RFC 9112 §3.2.1) inference routes; the "denied" request is a
# non-inference path on inference.local; the backend answers 400 to a non-JSON chat completion, hence "{   }".
TUNNEL_FORM = PathForm("tunnel", MappingProxyType({
    b"{get}": b"/v1/models",
    b"{post}": b"/v1/chat/completions",
    b"{ws}": b"/v1/models",
    b"{secret}": b"/secret",
}), b"{   }")


def render(case: SmugglingCase, form: PathForm = ABSOLUTE_FORM, *, host: str, denied: str) -> bytes:
    """The bytes to send on ``form``'s path: targets first (an absolute one holds ``{host}``), then ``{body}``,
    then ``{host}`` and ``{denied}``. Pure."""
    payload = case.payload
    for placeholder, target in form.targets.items():
        payload = payload.replace(placeholder, target)
    payload = payload.replace(b"{body}", form.body)
    return payload.replace(b"{host}", host.encode("ascii")).replace(b"{denied}", denied.encode("ascii"))


def case_by_id(case_id: str) -> SmugglingCase:
    for case in SMUGGLING_CASES:
        if case.case_id == case_id:
            return case
    raise KeyError(case_id)


# Building blocks; the targets are placeholders so that each path's PathForm fills them in.
_GET_ALLOWED = b"GET {get} HTTP/1.1\r\nHost: {host}\r\n\r\n"
_GET_DENIED = b"GET {secret} HTTP/1.1\r\nHost: {denied}\r\n\r\n"
_POST_HEAD = b"POST {post} HTTP/1.1\r\nHost: {host}\r\n"
_CHUNKED_HELLO = b"5\r\n{body}\r\n0\r\n\r\n"
# A request hidden inside chunk data, for TE.CL: a fixed size so the chunk-size line is exact.
_SMUGGLED_ORIGIN_FORM = b"GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n"


# ``also_failed_by`` of a row the h11-only weakening fails although it is not one of its ``holes`` (the rows
# whose framing h11 alone accepts, which the framing and proxy tests check as such).
def _h11_only_also(why: str, path: str = BOTH_PATHS) -> tuple[tuple[str, str, str], ...]:
    return ((H11_ONLY, path, why),)


# Inside the tunnel h11 accepts '#', '\\' and userinfo in the target; the interceptor's route matcher then
# refuses them with 403 instead of the framing check's 400 (nothing is forwarded).
_ROUTED_NOT_FRAMED = (H11_ONLY, "tunnel", "refused 403 by routing, not 400 by framing")


def _post(*headers: bytes, body: bytes = b"") -> bytes:
    return _POST_HEAD + b"".join(header + b"\r\n" for header in headers) + b"\r\n" + body


def _te(value: bytes, *, h11_accepts: bool = False) -> SmugglingCase:
    """A Transfer-Encoding obfuscation row: anything but one ASCII ``chunked`` is refused."""
    return SmugglingCase(
        case_id="te-" + _TE_IDS[value],
        description=f"Transfer-Encoding: {value!r} must not be read as chunked",
        payload=_post(b"Transfer-Encoding: " + value, body=_CHUNKED_HELLO + _GET_DENIED),
        expected_status=(400, 501),
        must_close=True,
        reaches_backend=0,
        rfc="RFC 9112 §6.1",
        violation="te-not-chunked",
        holes=frozenset({H11_ONLY}) if h11_accepts else frozenset(),
    )


_TE_IDS = {
    b"xchunked": "xchunked",
    b"chunked, chunked": "chunked-twice",
    b"chunked;x=y": "chunked-with-parameter",
    b",chunked": "leading-comma",
    b"identity": "identity",
    b"gzip": "gzip",
    b"gzip, chunked": "gzip-then-chunked",
    b'"chunked"': "quoted",
    b"chunk": "chunk",
    "chun\u212aed".encode(): "kelvin-sign",  # U+212A KELVIN SIGN: str.lower() folds it to "k"
    b"chunked\xff": "trailing-obs-text",
    b"\xa0chunked": "leading-nbsp",
}

_CHUNK_SIZE_CASES = {
    b"0x5": "hex-prefix",
    b"+5": "plus-sign",
    b"-1": "negative",
    b"5_0": "underscore",
    b" 5": "leading-space",
    b"5 ": "trailing-space",  # h11 accepts OWS after the size; RFC 9112 §7.1 grammar has none
    b"": "empty",
    b"1" + b"0" * 16: "overflow",
}

_CHUNK_EXTENSION_CASES = {
    b"5;": "bare-semicolon",
    b"5;a=b": "name-value",
    b"5;a\x00b": "nul",
    b"5;a\rb": "bare-cr",
    b"5;" + b"x" * 4096: "huge",
}

_FORBIDDEN_TRAILER_CASES = {
    b"Host: {denied}": "host",
    b"Content-Length: 50": "content-length",
    b"Transfer-Encoding: chunked": "transfer-encoding",
    b"Authorization: Bearer stolen": "authorization",
    # Http11Probe SMUG-TRAILER-* and the rest of RFC 9110 §6.5.1's list
    b"Connection: close": "connection",
    b"TE: trailers": "te",
    b"Trailer: Host": "trailer",
    b"Upgrade: h2c": "upgrade",
    b"Cookie: session=stolen": "cookie",
    b"Expect: 100-continue": "expect",
    b"Proxy-Authorization: Basic c3RvbGVu": "proxy-authorization",
    b"Content-Type: text/html": "content-type",
    b"Content-Encoding: gzip": "content-encoding",
    b"Max-Forwards: 0": "max-forwards",
    b"X-HTTP-Method-Override: DELETE": "x-http-method-override",
    b"X-Forwarded-Host: {denied}": "x-forwarded-host",
}

_HTTP11PROBE_TRAILERS = frozenset({"host", "content-length", "transfer-encoding", "authorization", "te",
                                   "content-type"})

_MALFORMED_CONTENT_LENGTHS = {
    b"+5": "plus-sign",
    b"-1": "negative",
    b"0x5": "hex",
    b"1_0": "underscore",
    b"": "empty",
    b"05": "leading-zero",  # h11 accepts leading zeros
    b"99999999999999999999": "overflow",
}


# --- rows from the public corpora (issue #9): each names its source ------------------------------------

SMUGGLER = "defparam/smuggler configs/exhaustive.py"  # its mutation names follow PortSwigger's permutations
HTTP11PROBE = "MDA2AV/Http11Probe"


def _refused(case_id: str, description: str, payload: bytes, violation: str, source: str, rfc: str, *,
             status: int | tuple[int, ...] = 400, **extra: object) -> SmugglingCase:
    """A row strict framing refuses outright: nothing reaches upstream, the answer is ``status``, then close."""
    return SmugglingCase(case_id, description, payload, status, must_close=True, reaches_backend=0, rfc=rfc,
                         violation=violation, source=source, **extra)  # type: ignore[arg-type]


def _control(case_id: str, description: str, payload: bytes, source: str, rfc: str) -> SmugglingCase:
    """A row that must be served: one request, 200, the connection kept."""
    return SmugglingCase(case_id, description, payload, 200, must_close=False, reaches_backend=1, rfc=rfc,
                         source=source)


def _chunked_te(field: bytes) -> bytes:
    """A POST whose only framing is ``field`` (a mutated Transfer-Encoding line), then a denied request."""
    return _post(field, body=_CHUNKED_HELLO + _GET_DENIED)


_HEADER_NAME_ROWS = (
    # (id, field line, violation, source)
    ("hn-space-joined", b"Transfer Encoding: chunked", "field-syntax", f"{SMUGGLER} spacejoin1"),
    ("hn-underscore-joined", b"Transfer_Encoding: chunked", "header-name-alias",
     f"{SMUGGLER} underjoin1; {HTTP11PROBE} SMUG-TRANSFER_ENCODING"),
    ("hn-smashed", b"Transfer Encoding:chunked", "field-syntax", f"{SMUGGLER} smashed"),
    ("hn-tab-before-colon", b"Transfer-Encoding\t:\tchunked", "ws-before-colon", f"{SMUGGLER} tabprefix2"),
    ("hn-accented-name", b"Transf\x82r-Encoding: chunked", "field-syntax", f"{SMUGGLER} accentTE"),
    ("hn-vertical-tab-before-colon", b"Transfer-Encoding\x0b: chunked", "field-syntax", f"{SMUGGLER} postspace-0b"),
    ("hn-nul-before-colon", b"Transfer-Encoding\x00: chunked", "field-syntax", f"{SMUGGLER} postspace-00"),
    ("hn-ff-before-colon", b"Transfer-Encoding\xff: chunked", "field-syntax", f"{SMUGGLER} postspace-ff"),
)

_CL_NAME_ROWS = (
    ("hn-content-length-underscore", b"Content_Length: 5", "header-name-alias", f"{HTTP11PROBE} SMUG-CL-UNDERSCORE"),
    ("hn-content-length-space-before-colon", b"Content-Length : 5", "ws-before-colon", f"{HTTP11PROBE} RFC9112-5.1"),
    ("hn-empty-name", b": 5", "field-syntax", f"{HTTP11PROBE} empty-header-name"),
    ("hn-no-colon", b"Content-Length 5", "field-syntax", f"{HTTP11PROBE} header-no-colon"),
    ("hn-forwarded-host-underscore", b"X_Forwarded_Host: {denied}", "header-name-alias",
     "RFC 9110 §5.1 + CGI HTTP_* mapping (Http11Probe SMUG-TRANSFER_ENCODING's reasoning)"),
)

PORTSWIGGER = "PortSwigger http-request-smuggler DesyncBox"  # its permutation names

# Header-name mutations of the public corpora (issue #9, second pass): smuggler's byte loops (one row per
# class of byte: C0 control, DEL, C1, NBSP), PortSwigger's name permutations, Http11Probe's name cases.
_HEADER_NAME_CORPUS_ROWS = (
    # (id, field line, violation, source): a POST framed only by the mutated line, then a denied request
    ("hn-space-junk-before-colon", b"Transfer-Encoding x: chunked", "field-syntax",
     f"{PORTSWIGGER} spjunk (Amit Klein, HTTP Request Smuggling in 2020)"),
    ("hn-backslash-joined", b"Transfer\\Encoding: chunked", "field-syntax", f"{PORTSWIGGER} backslash"),
    ("hn-percent-encoded-name", b"Transfer-%45ncoding: chunked", "header-name-alias", f"{PORTSWIGGER} encode"),
    ("hn-backtick-name-space-before-colon", b"Transfer-Encoding`chunked : chunked", "ws-before-colon",
     f"{PORTSWIGGER} h2colon (sent over HTTP/1.1)"),
    ("hn-space-in-name-before-colon", b"Transfer-Encoding chunked : chunked", "ws-before-colon",
     f"{PORTSWIGGER} h2space (sent over HTTP/1.1)"),
    ("hn-name-without-colon", b"Transfer-Encoding`chunked", "field-syntax",
     f"{PORTSWIGGER} h2name (sent over HTTP/1.1)"),
    ("hn-soh-before-colon", b"Transfer-Encoding\x01: chunked", "field-syntax", f"{SMUGGLER} postspace-01"),
    ("hn-form-feed-before-colon", b"Transfer-Encoding\x0c: chunked", "field-syntax", f"{SMUGGLER} postspace-0c"),
    ("hn-unit-separator-before-colon", b"Transfer-Encoding\x1f: chunked", "field-syntax", f"{SMUGGLER} postspace-1f"),
    ("hn-del-before-colon", b"Transfer-Encoding\x7f: chunked", "field-syntax", f"{SMUGGLER} postspace-7f"),
    ("hn-c1-before-colon", b"Transfer-Encoding\x85: chunked", "field-syntax", f"{SMUGGLER} postspace-85"),
    ("hn-nbsp-before-colon", b"Transfer-Encoding\xa0: chunked", "field-syntax", f"{SMUGGLER} postspace-a0"),
)
# smuggler's prespace-XX: the byte before the *first* field name (its gadget follows the request-line).
_FIRST_FIELD_PREFIXES = {
    b" ": ("hn-space-before-first-name", "ws-before-first-field",
           f"{SMUGGLER} nameprefix1, prespace-20; RFC 9112 §2.2"),
    b"\t": ("hn-tab-before-first-name", "ws-before-first-field", f"{SMUGGLER} prespace-09; RFC 9112 §2.2"),
    b"\x00": ("hn-nul-before-first-name", "field-syntax", f"{SMUGGLER} prespace-00"),
    b"\x0b": ("hn-vertical-tab-before-first-name", "field-syntax", f"{SMUGGLER} prespace-0b"),
    b"\x0c": ("hn-form-feed-before-first-name", "field-syntax", f"{SMUGGLER} prespace-0c"),
    b"\x7f": ("hn-del-before-first-name", "field-syntax", f"{SMUGGLER} prespace-7f"),
    b"\xff": ("hn-ff-before-first-name", "field-syntax", f"{SMUGGLER} prespace-ff"),
}
# A field with a bad name on an otherwise allowed GET: a lenient reader forwards the request.
_GET_FIELD_NAME_ROWS = (
    ("hn-bracket-in-name", b"Bad[Name: value", "field-syntax", f"{HTTP11PROBE} RFC9112-5-INVALID-HEADER-NAME"),
    ("hn-non-ascii-name", b"X-T\xc3\xa9st: value", "field-syntax", f"{HTTP11PROBE} MAL-NON-ASCII-HEADER-NAME"),
    ("hn-space-before-colon", b"X-Test : value", "ws-before-colon", f"{HTTP11PROBE} RFC9110-5.6.2-SP-BEFORE-COLON"),
    ("hn-x-original-url-underscore", b"X_Original_URL: /admin", "header-name-alias",
     f"{PORTSWIGGER} underjoin1 on X-Original-URL"),
    ("hn-method-override-underscore", b"X_HTTP_Method_Override: DELETE", "header-name-alias",
     f"{PORTSWIGGER} underjoin1 on X-HTTP-Method-Override"),
)
# Beside a valid Content-Length (Http11Probe's normalization cases): the alias must not reach a next hop
# that would frame by it.
_CL_BESIDE_NAME_ROWS = (
    ("hn-tab-in-content-length-name", b"Content\tLength: 99", "field-syntax", f"{HTTP11PROBE} NORM-TAB-IN-NAME"),
    ("hn-content-length-underscore-beside-real", b"Content_Length: 99", "header-name-alias",
     f"{HTTP11PROBE} NORM-UNDERSCORE-CL"),
    ("hn-transfer-encoding-underscore-beside-cl", b"Transfer_Encoding: chunked", "header-name-alias",
     f"{HTTP11PROBE} NORM-UNDERSCORE-TE"),
)
GARDEN = "narfindustries/http-garden TROPHIES.md"  # its bug lists, numbered

# HTTP Garden's header-name bugs, each as a request its payload's mistake would frame differently.
_GARDEN_NAME_ROWS = (
    # (id, request, violation, source)
    ("hn-tab-before-first-content-length", b"POST {post} HTTP/1.1\r\n\tContent-Length: 5\r\nHost: {host}\r\n\r\n{body}"
     + _GET_DENIED, "ws-before-first-field", f"{GARDEN} server bug 4"),
    ("hn-c1-after-content-length-name", _post(b"Content-Length\x85: 5", body=b"{body}") + _GET_DENIED, "field-syntax",
     f"{GARDEN} server bug 20"),
    ("hn-nbsp-after-content-length-name", _post(b"Content-Length\xa0: 5", body=b"{body}") + _GET_DENIED,
     "field-syntax", f"{GARDEN} server bug 20"),
    ("hn-name-continued-across-lines", _post(b"Transfer-", b"Encoding: chunked", b"Content-Length: 5", body=b"{body}")
     + _GET_DENIED, "field-syntax", f"{GARDEN} server bug 37"),
    ("hn-disallowed-ascii-in-name", b"GET {get} HTTP/1.1\r\nHost: {host}\r\n" + bytes(range(0x01, 0x09))
     + b"\x0e\x1f\"(),/;<=>?@[]{}: whatever\r\n\r\n", "field-syntax", f"{GARDEN} server bug 14"),
    ("hn-non-ascii-first-name-byte", b"GET {get} HTTP/1.1\r\nHost: {host}\r\n\xefoo: bar\r\n\r\n", "field-syntax",
     f"{GARDEN} server bug 8"),
    ("hn-empty-name-and-value", b"GET {get} HTTP/1.1\r\nHost: {host}\r\n:\r\nI: am chopped off\r\n\r\n",
     "field-syntax", f"{GARDEN} server bug 27"),
    ("hn-empty-name-first-line", b"GET {get} HTTP/1.1\r\n: ignored\r\nHost: {host}\r\n\r\n", "field-syntax",
     f"{GARDEN} server bug 18; {HTTP11PROBE} RFC9112-5-EMPTY-HEADER-NAME"),
)

# Valid spellings from the same lists: served.
_NAME_VALID = (
    ("hn-valid-uppercase-name", b"TRANSFER-ENCODING: CHUNKED", f"{PORTSWIGGER} UPPERCASE; {SMUGGLER} yelling"),
    ("hn-valid-no-space-after-colon", b"Transfer-Encoding:chunked", f"{PORTSWIGGER} nospace1"),
)

# Request-line oddities (issue #9, second pass): (id, description, request-line, violation, source, rfc, status).
# RFC 9112 §3 names the whitespace a tolerant parser takes as SP (HTAB, VT, FF, bare CR): each is a row.
_REQUEST_LINE_CORPUS_ROWS = (
    ("rl-missing-version", "no version: an HTTP/0.9-style line followed by fields", b"GET {get}", "request-line",
     f"{HTTP11PROBE} RFC9112-2.3-HTTP09-REQUEST", "RFC 9112 §2.3", 400),
    ("rl-version-9-9", "HTTP/9.9: well-formed, unsupported", b"GET {get} HTTP/9.9", "http-version",
     f"{HTTP11PROBE} RFC9112-2.3-INVALID-VERSION", "RFC 9110 §15.6.6", 505),
    ("rl-version-0-9", "HTTP/0.9 written out", b"GET {get} HTTP/0.9", "http-version", "RFC 9112 App. C.1",
     "RFC 9110 §15.6.6", 505),
    ("rl-version-missing-minor", "HTTP/1: no minor version", b"GET {get} HTTP/1", "request-line",
     f"{HTTP11PROBE} COMP-VERSION-MISSING-MINOR", "RFC 9112 §2.3", 400),
    ("rl-version-leading-zeros", "HTTP/01.01: one DIGIT each", b"GET {get} HTTP/01.01", "request-line",
     f"{HTTP11PROBE} COMP-VERSION-LEADING-ZEROS", "RFC 9112 §2.3", 400),
    ("rl-version-whitespace", "HTTP/ 1.1: whitespace inside the version", b"GET {get} HTTP/ 1.1", "request-line",
     f"{HTTP11PROBE} COMP-VERSION-WHITESPACE", "RFC 9112 §2.3", 400),
    ("rl-version-two-digit-minor", "HTTP/1.10: one DIGIT each", b"GET {get} HTTP/1.10", "request-line",
     "RFC 9112 §2.3", "RFC 9112 §2.3", 400),
    ("rl-version-trailing-garbage", "HTTP/1.1x", b"GET {get} HTTP/1.1x", "request-line", "RFC 9112 §2.3",
     "RFC 9112 §2.3", 400),
    ("rl-tab-after-method", "a tab between method and target", b"GET\t{get} HTTP/1.1", "request-line",
     f"{HTTP11PROBE} COMP-REQUEST-LINE-TAB", "RFC 9112 §3", 400),
    ("rl-vertical-tab-separators", "VT as the separator", b"GET\x0b{get}\x0bHTTP/1.1", "request-line",
     "RFC 9112 §3 (whitespace-tolerant parsers)", "RFC 9112 §3", 400),
    ("rl-form-feed-separators", "FF as the separator", b"GET\x0c{get}\x0cHTTP/1.1", "request-line",
     "RFC 9112 §3 (whitespace-tolerant parsers)", "RFC 9112 §3", 400),
    ("rl-double-space-before-version", "two spaces before the version", b"GET {get}  HTTP/1.1", "request-line",
     "RFC 9112 §3", "RFC 9112 §3", 400),
    ("rl-method-not-a-token", "'(' in the method", b"GE(T {get} HTTP/1.1", "request-line",
     "RFC 9110 §9.1 (method = token)", "RFC 9110 §9.1", 400),
    ("rl-version-longest-prefix", "HTTP/1.32: read as HTTP/1.3 by a longest-prefix parser", b"GET {get} HTTP/1.32",
     "request-line", f"{GARDEN} server bug 5", "RFC 9112 §2.3", 400),
    ("rl-version-integer-overflow", "HTTP/4294967295.255: 1.1 in a parser that wraps", b"GET {get} HTTP/4294967295.255",
     "request-line", f"{GARDEN} server bug 24", "RFC 9112 §2.3", 400),
    ("rl-method-longest-prefix", "a method full of delimiters, 'G' to a longest-prefix parser",
     b'G=":<>(e),[T];?" {get} HTTP/1.1', "request-line", f"{GARDEN} server bug 6",
     "RFC 9110 §9.1", 400),
    ("rl-nul-method-dotted-version", "NUL as the method and a version of dots",
     b"\x00 {get} HTTP/............0596.7407.", "request-line", f"{GARDEN} server bug 40", "RFC 9112 §3", 400),
)
_TARGET_CHARACTER_CORPUS_ROWS = (
    ("rl-space-in-target", "a space inside the target", b"GET {get}pa th HTTP/1.1", "request-line",
     f"{HTTP11PROBE} COMP-SPACE-IN-TARGET", "RFC 9112 §3.2", 400),
    ("rl-nul-in-target", "a NUL in the target", b"GET {get}\x00test HTTP/1.1", "target-chars",
     f"{HTTP11PROBE} MAL-NUL-IN-URL", "RFC 3986 §2", 400),
    ("rl-non-ascii-target", "UTF-8 bytes in the target", b"GET {get}caf\xc3\xa9 HTTP/1.1", "target-chars",
     f"{HTTP11PROBE} MAL-NON-ASCII-URL", "RFC 3986 §2", 400),
    ("rl-overlong-utf8-target", "an overlong UTF-8 '/' (0xC0 0xAF) in the target", b"GET {get}\xc0\xafetc HTTP/1.1",
     "target-chars", f"{HTTP11PROBE} MAL-URL-OVERLONG-UTF8", "RFC 3986 §2", 400),
    ("rl-backslash-in-path", "a backslash in the path", b"GET {get}path\\file HTTP/1.1", "target-chars",
     f"{HTTP11PROBE} MAL-URL-BACKSLASH", "RFC 3986 §2", 400),
    ("rl-fragment-in-target", "a fragment in the target (never sent, RFC 9112 §3.2)", b"GET {get}path#frag HTTP/1.1",
     "target-chars", f"{HTTP11PROBE} RFC9112-3.2-FRAGMENT-IN-TARGET", "RFC 9112 §3.2", 400),
)

# Host values (issue #9, second pass): value -> (id suffix, source).
_HOST_VALUE_CORPUS = {
    b":80": ("port-only", "issue #9 Host values; RFC 3986 §3.2.2 (host may not be empty for http)"),
    b"{host}:-80": ("negative-port", "RFC 3986 §3.2.3 (port = *DIGIT)"),
    b"::1": ("ipv6-unbracketed", "RFC 3986 §3.2.2 (IP-literal = '[' ... ']')"),
    b"[::1": ("ipv6-unclosed", "RFC 3986 §3.2.2"),
    b"[::1]x": ("ipv6-junk-after-bracket", "RFC 3986 §3.2.2"),
    b"[::1]:": ("ipv6-empty-port", "RFC 9110 §7.2"),
    b"[fe80::1%25eth0]": ("ipv6-zone-id", "RFC 6874 (a zone identifier is local to the node; not in Host)"),
    b"[::g]": ("ipv6-not-hex", "RFC 3986 §3.2.2"),
    b"{host}\t{denied}": ("tab-inside", "RFC 9110 §7.2"),
    b"\xff{host}\xff": ("non-ascii", f"{GARDEN} (Host of troubles: bytes > 0x80 in Host)"),
}

# Transfer-Encoding values (the TE permutations): anything but one ASCII "chunked" is refused.
_TE_CORPUS = {
    b"chunked, cow": ("comma-cow", f"{SMUGGLER} commaCow"),
    b"cow, chunked": ("cow-comma", f"{SMUGGLER} cowComma"),
    b"cow chunked bar": ("nested", f"{SMUGGLER} nested"),
    b"'chunked'": ("apostrophes", f"{SMUGGLER} aposed"),
    b"ch\x96nked": ("accented-value", f"{SMUGGLER} accentCH"),
    b"\xffchunked": ("ff-prefix", f"{SMUGGLER} spaceFF"),
    b"": ("empty", f"{HTTP11PROBE} SMUG-TE-EMPTY-VALUE"),
    b"chunked,": ("trailing-comma", f"{HTTP11PROBE} SMUG-TE-TRAILING-COMMA"),
    b"chunked, gzip": ("not-final-chunked", f"{HTTP11PROBE} SMUG-TE-NOT-FINAL-CHUNKED"),
}

# Valid spellings from the same permutation lists: served, so strictness costs nothing real clients send.
_TE_VALID = (
    ("tabprefix1", b"Transfer-Encoding:\tchunked"),
    ("valueprefix1", b"Transfer-Encoding:  chunked"),
    ("sarcasm", b"TrAnSFer-EnCODinG: cHuNkeD"),
    ("tabsuffix", b"Transfer-Encoding: chunked\t"),
)

# Content-Length values: one 0|[1-9][0-9]* only; wraparound values frame as 5 in a 32/64-bit strtoul.
_CL_CORPUS = {
    b"5x": ("trailing-garbage", f"{HTTP11PROBE} RFC9110-8.6-CL-NON-NUMERIC"),
    b"1 0": ("internal-space", f"{HTTP11PROBE} SMUG-CL-INTERNAL-SPACE"),
    b"-0": ("negative-zero", f"{HTTP11PROBE} SMUG-CL-NEGATIVE-ZERO"),
    b"00": ("double-zero", f"{HTTP11PROBE} SMUG-CL-DOUBLE-ZERO"),
    b"5.0": ("decimal", "RFC 9110 §8.6 (1*DIGIT)"),
    b"5, 6": ("comma-different", f"{HTTP11PROBE} SMUG-CL-COMMA-DIFFERENT"),
    str(2**64 + 5).encode(): ("wrap-2-64-plus-5", "issue #9 (2^64+5 wraparound); Http11Probe MAL-CL-OVERFLOW"),
}

_H2C_ROWS = (
    ("h2c-without-settings", b"Connection: Upgrade\r\nUpgrade: h2c",
     "RFC 7540 §3.2 (a proxy must not forward the upgrade); BishopFox h2csmuggler"),
    ("h2c-uppercase-token", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: H2C\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
     "RFC 9110 §7.8 (protocol names are case-insensitive); h2csmuggler"),
    ("h2c-in-a-list", b"Connection: Upgrade\r\nUpgrade: websocket, h2c", "RFC 9110 §7.8 (Upgrade is a list)"),
    ("h2c-settings-alone", b"HTTP2-Settings: AAMAAABkAAQAAP__", "RFC 7540 §3.2.1"),
    ("h2c-without-connection", b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
     "h2csmuggler (proxies that forward Upgrade not named in Connection)"),
)

_ROUTING_OVERRIDES = {
    b"X-Original-URL: /admin": "x-original-url",
    b"X-Rewrite-URL: /admin": "x-rewrite-url",
    b"X-HTTP-Method-Override: DELETE": "x-http-method-override",
    b"X-HTTP-Method: DELETE": "x-http-method",
    b"X-Method-Override: DELETE": "x-method-override",
    b"X-Forwarded-Host: {denied}": "x-forwarded-host",
    b"X-Host: {denied}": "x-host",
    b"X-Forwarded-Server: {denied}": "x-forwarded-server",
    b"X-Original-Host: {denied}": "x-original-host",
    b"Forwarded: host={denied};proto=http": "forwarded",
}
# Second pass: field -> (id suffix, source).
PARAM_MINER = "PortSwigger param-miner resources/headers"
_ROUTING_OVERRIDE_CORPUS = {
    b"X-HTTP-Host-Override: {denied}": ("x-http-host-override",
                                        f"{PARAM_MINER}; PortSwigger Web Security Academy (Host header attacks)"),
    b"X-HTTP-Path-Override: /admin": ("x-http-path-override", PARAM_MINER),
    b"X-HTTP-DestinationURL: https://{denied}/": ("x-http-destinationurl", PARAM_MINER),
    b"X-Proxy-URL: https://{denied}/": ("x-proxy-url", PARAM_MINER),
    # what forward-auth servers decide on: a client's forgery would be judged instead of the real target
    b"X-Forwarded-Uri: /admin": ("x-forwarded-uri", "Traefik ForwardAuth (X-Forwarded-Uri)"),
    b"X-Original-URI: /admin": ("x-original-uri", "nginx auth_request (X-Original-URI convention)"),
}

_CONNECT_ALLOWED = b"CONNECT {host}:80 HTTP/1.1\r\nHost: {host}:80\r\n"

_CORPUS_ROWS_UNMARKED: tuple[SmugglingCase, ...] = (
    # --- header-name mutations ----------------------------------------------------------------------
    *(_refused(case_id, f"{field!r}: not a Transfer-Encoding field to us, maybe one to the next hop",
               _chunked_te(field), violation, source, "RFC 9110 §5.1")
      for case_id, field, violation, source in _HEADER_NAME_ROWS),
    *(_refused(case_id, f"{field!r} next to a body the next hop may frame by it",
               _post(field, body=b"{body}") + _GET_DENIED, violation, source, "RFC 9112 §5.1")
      for case_id, field, violation, source in _CL_NAME_ROWS),
    # header-name, second pass: smuggler byte loops, PortSwigger permutations, Http11Probe name cases
    *(_refused(case_id, f"{field!r}: not a Transfer-Encoding field to us, maybe one to the next hop",
               _chunked_te(field), violation, source, "RFC 9110 §5.1")
      for case_id, field, violation, source in _HEADER_NAME_CORPUS_ROWS),
    *(_refused(case_id, f"{prefix!r} before the first field name: a stripping reader sees Transfer-Encoding",
               b"POST {post} HTTP/1.1\r\n" + prefix + b"Transfer-Encoding: chunked\r\nHost: {host}\r\n\r\n"
               + _CHUNKED_HELLO + _GET_DENIED, violation, source, "RFC 9112 §2.2")
      for prefix, (case_id, violation, source) in _FIRST_FIELD_PREFIXES.items()),
    _refused("hn-whitespace-line-before-fields", "a whitespace-only line between the request-line and Host",
             b"GET {get} HTTP/1.1\r\n \r\nHost: {host}\r\n\r\n", "ws-before-first-field",
             f"{HTTP11PROBE} COMP-WHITESPACE-BEFORE-HEADERS", "RFC 9112 §2.2"),
    *(_refused(case_id, f"{field!r}: not a valid field name", b"GET {get} HTTP/1.1\r\nHost: {host}\r\n" + field
               + b"\r\n\r\n", violation, source, "RFC 9110 §5.1")
      for case_id, field, violation, source in _GET_FIELD_NAME_ROWS),
    *(_refused(case_id, f"{field!r} beside Content-Length: 5", _post(b"Content-Length: 5", field, body=b"{body}")
               + _GET_DENIED, violation, source, "RFC 9110 §5.1")
      for case_id, field, violation, source in _CL_BESIDE_NAME_ROWS),
    *(_refused(case_id, f"HTTP Garden: {request.split(b'{host}')[-1][:40]!r}...", request, violation, source,
               "RFC 9110 §5.1")
      for case_id, request, violation, source in _GARDEN_NAME_ROWS),
    *(_control(case_id, f"{field!r} is Transfer-Encoding: chunked: served", _post(field, body=_CHUNKED_HELLO),
               source, "RFC 9110 §5.1")
      for case_id, field, source in _NAME_VALID),
    # --- Transfer-Encoding permutations -------------------------------------------------------------
    *(SmugglingCase(f"te-{name}", f"Transfer-Encoding: {value!r} must not be read as chunked",
                    _chunked_te(b"Transfer-Encoding: " + value), (400, 501), must_close=True, reaches_backend=0,
                    rfc="RFC 9112 §6.1", violation="te-not-chunked", source=source)
      for value, (name, source) in _TE_CORPUS.items()),
    SmugglingCase("te-cow-then-chunked-fields", "Transfer-Encoding: cow, then Transfer-Encoding: chunked",
                  _post(b"Transfer-Encoding: cow", b"Transfer-Encoding: chunked", body=_CHUNKED_HELLO + _GET_DENIED),
                  (400, 501), must_close=True, reaches_backend=0, rfc="RFC 9112 §6.1", violation="te-not-chunked",
                  source=f"{SMUGGLER} revdualchunk"),
    *(_control(f"te-valid-{name}", f"{field!r} is the chunked coding: served",
               _post(field, body=_CHUNKED_HELLO), f"{SMUGGLER} {name}", "RFC 9110 §5.5")
      for name, field in _TE_VALID),
    # --- Content-Length values ------------------------------------------------------------------------
    *(_refused(f"cl-{name}", f"Content-Length: {value!r} is not 0|[1-9][0-9]*",
               _post(b"Content-Length: " + value, body=b"{body}") + _GET_DENIED,
               "cl-duplicate" if b"," in value else "cl-malformed", source, "RFC 9110 §8.6")
      for value, (name, source) in _CL_CORPUS.items()),
    _refused("cl-wrap-2-32-plus-5", "Content-Length: 2^32+5 is a valid number beyond the body limit (413); a "
             "32-bit parser reads 5", _post(b"Content-Length: %d" % (2**32 + 5), body=b"{body}") + _GET_DENIED,
             "body-too-large", "issue #9 (2^32+5 wraparound)", "RFC 9110 §8.6", status=413,
             family="content-length"),
    # --- request-line oddities ----------------------------------------------------------------------
    *(_refused(case_id, description, line + b"\r\nHost: {host}\r\n\r\n", violation, source, "RFC 9112 §3",
               status=status)
      for case_id, description, line, violation, source, status in (
          ("rl-double-space", "two spaces after the method", b"GET  {get} HTTP/1.1", "request-line",
           f"{HTTP11PROBE} RFC9112-3-MULTI-SP-REQUEST-LINE", 400),
          ("rl-tab-separators", "tabs instead of spaces", b"GET\t{get}\tHTTP/1.1", "request-line",
           "RFC 9112 §3 (SP only)", 400),
          ("rl-trailing-space", "a space after the version", b"GET {get} HTTP/1.1 ", "request-line",
           "RFC 9112 §3", 400),
          ("rl-leading-space", "a space before the method", b" GET {get} HTTP/1.1", "request-line",
           f"{HTTP11PROBE} whitespace-before-request-line", 400),
          ("rl-lowercase-version", "http/1.1: the version is case-sensitive", b"GET {get} http/1.1", "request-line",
           f"{HTTP11PROBE} RFC9112-2.3-INVALID-VERSION", 400),
          ("rl-version-2", "HTTP/2.0 in an HTTP/1 request-line", b"GET {get} HTTP/2.0", "http-version",
           f"{HTTP11PROBE} RFC9112-2.3-HTTP2-VERSION", 505),
          ("rl-target-bad-percent", "'%zz' is no pct-encoding (issue #9)", b"GET {get}?x=%zz HTTP/1.1",
           "target-chars", "issue #9; RFC 3986 §2.1", 400),
          ("rl-target-unsafe-characters", "'|', '{', '}', '^' are no URI characters (issue #9)",
           b"GET {get}a|b{}^ HTTP/1.1", "target-chars", "issue #9; RFC 3986 §2", 400),
          ("rl-target-quote-and-angle", "'\"' '<' '>' are no URI characters", b'GET {get}"<x>" HTTP/1.1',
           "target-chars", "RFC 3986 §2 (WHATWG encodes them; raw ones are an attack)", 400),
          ("rl-target-truncated-percent", "a '%' at the end of the target", b"GET {get}?x=% HTTP/1.1",
           "target-chars", "RFC 3986 §2.1", 400),
      )),
    _refused("rl-h2-preface", "the HTTP/2 connection preface sent to an HTTP/1.1 proxy",
             b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http-version", f"{HTTP11PROBE} MAL-H2-PREFACE", "RFC 9113 §3.4",
             status=505),
    # request-line, second pass: Http11Probe's request-line and malformed-input cases, RFC 9112 §2.3/§3 edges
    *(_refused(case_id, description, line + b"\r\nHost: {host}\r\n\r\n", violation, source, rfc, status=status)
      for case_id, description, line, violation, source, rfc, status in _REQUEST_LINE_CORPUS_ROWS),
    # ... and the target characters the proxy's own URL parser refuses as well (a lenient request-line reader
    # alone does not open them: network.proxy.decision.split_target still answers 400)
    *(_refused(case_id, description, line + b"\r\nHost: {host}\r\n\r\n", violation, source, rfc, status=status,
               family=TARGET_AUTHORITY)
      for case_id, description, line, violation, source, rfc, status in _TARGET_CHARACTER_CORPUS_ROWS),
    SmugglingCase("rl-valid-http10", "an HTTP/1.0 request is served (and the connection closed after it)",
                  b"GET {get} HTTP/1.0\r\nHost: {host}\r\n\r\n", 200, must_close=True, reaches_backend=1,
                  rfc="RFC 9112 App. C.2.2", source=f"{HTTP11PROBE} COMP-HTTP10-DEFAULT-CLOSE"),
    _control("rl-valid-percent-crlf-stays-encoded", "'%0d%0a' in the query is valid pct-encoding: served, and "
             "forwarded encoded (a proxy that decodes it writes a header of its own)",
             b"GET {get}?q=%0d%0aX-Injected:%20true HTTP/1.1\r\nHost: {host}\r\n\r\n",
             f"{HTTP11PROBE} MAL-URL-PERCENT-CRLF", "RFC 3986 §2.1"),
    # --- target forms ---------------------------------------------------------------------------------
    _refused("tf-authority-form-get", "authority-form on a GET (only CONNECT may use it)",
             b"GET {host}:80 HTTP/1.1\r\nHost: {host}\r\n\r\n", "target-form", "issue #9 request forms",
             "RFC 9112 §3.2.3"),
    _refused("tf-asterisk-form-get", "asterisk-form on a GET (only OPTIONS may use it)",
             b"GET * HTTP/1.1\r\nHost: {host}\r\n\r\n", "target-form", "issue #9 request forms", "RFC 9112 §3.2.4"),
    _refused("tf-connect-origin-form", "CONNECT with an origin-form target, the authority only in Host",
             b"CONNECT / HTTP/1.1\r\nHost: {host}:80\r\n\r\n" + _GET_DENIED, "target-form", "issue #9 request forms",
             "RFC 9112 §3.2.3"),
    _refused("tf-connect-absolute-form", "CONNECT with an absolute-form target",
             b"CONNECT http://{host}:80/ HTTP/1.1\r\nHost: {host}:80\r\n\r\n" + _GET_DENIED, "target-form",
             "issue #9 request forms", "RFC 9112 §3.2.3", literal_target=True),
    # target forms, second pass: every form a forward proxy can receive, on other methods (issue #9; Http11Probe
    # COMP-ASTERISK-WITH-GET; the network-path reference of RFC 3986 §4.2)
    _refused("tf-authority-form-post", "authority-form on a POST with a body",
             b"POST {host}:80 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\n{body}", "target-form",
             "issue #9 request forms", "RFC 9112 §3.2.3"),
    _refused("tf-authority-form-options", "authority-form on an OPTIONS",
             b"OPTIONS {host}:80 HTTP/1.1\r\nHost: {host}\r\n\r\n", "target-form", "issue #9 request forms",
             "RFC 9112 §3.2.3"),
    _refused("tf-authority-form-head", "authority-form on a HEAD",
             b"HEAD {host}:80 HTTP/1.1\r\nHost: {host}\r\n\r\n", "target-form", "issue #9 request forms",
             "RFC 9112 §3.2.3"),
    _refused("tf-asterisk-form-post", "asterisk-form on a POST with a body",
             b"POST * HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\n{body}", "target-form",
             f"{HTTP11PROBE} COMP-ASTERISK-WITH-GET (on POST)", "RFC 9112 §3.2.4"),
    _refused("tf-asterisk-form-connect", "CONNECT * with the authority only in Host",
             b"CONNECT * HTTP/1.1\r\nHost: {host}:80\r\n\r\n" + _GET_DENIED, "target-form",
             "issue #9 request forms", "RFC 9112 §3.2.3"),
    _refused("tf-schemeless-get", "GET //host/: a network-path reference, no scheme",
             b"GET //{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n", "target-form", "issue #9 request forms (schemeless)",
             "RFC 3986 §4.2"),
    _refused("tf-connect-schemeless", "CONNECT //host:80: a network-path reference instead of host:port",
             b"CONNECT //{host}:80 HTTP/1.1\r\nHost: {host}:80\r\n\r\n" + _GET_DENIED, "target-form",
             "issue #9 request forms (CONNECT with a path)", "RFC 9112 §3.2.3"),
    # --- Host values ----------------------------------------------------------------------------------
    *(_refused(f"host-{name}", f"Host: {value!r} is not uri-host[:port]",
               b"GET {get} HTTP/1.1\r\nHost: " + value + b"\r\n\r\n", "host-value", source, "RFC 9112 §3.2")
      for value, (name, source) in {
          b"{host}, {denied}": ("comma-list", f"issue #9; {HTTP11PROBE} SMUG-MULTIPLE-HOST-COMMA"),
          b"user@{host}": ("userinfo", f"issue #9; {HTTP11PROBE} host-with-userinfo"),
          b"{host}/path": ("path", f"issue #9; {HTTP11PROBE} host-with-path"),
          b"": ("empty", f"{HTTP11PROBE} host-empty-value"),
          b"{host} {denied}": ("space-inside", "RFC 9110 §7.2"),
          b"{host}:8o": ("bad-port", "RFC 3986 §3.2.3 (port = *DIGIT)"),
          b"{host}:": ("empty-port", "RFC 9110 §7.2"),
      }.items()),
    _refused("host-duplicate-same", "Host twice with the same value", b"GET {get} HTTP/1.1\r\nHost: {host}\r\n"
             b"Host: {host}\r\n\r\n", "host-missing-or-duplicate", f"{HTTP11PROBE} duplicate-host-same",
             "RFC 9112 §3.2"),
    # Host values, second pass: port-only, port range, IP-literal forms (RFC 3986 §3.2.2-§3.2.3)
    *(_refused(f"host-{name}", f"Host: {value!r} is not uri-host[:port]",
               b"GET {get} HTTP/1.1\r\nHost: " + value + b"\r\n\r\n", "host-value", source, "RFC 9112 §3.2")
      for value, (name, source) in _HOST_VALUE_CORPUS.items()),
    # --- trailers: see _FORBIDDEN_TRAILER_CASES (rows built with the RFC rows above) -----------------
    # --- h2c upgrade ----------------------------------------------------------------------------------
    *(_refused(case_id, f"an h2c upgrade ({fields.splitlines()[-1]!r})",
               b"GET {get} HTTP/1.1\r\nHost: {host}\r\n" + fields + b"\r\n\r\n", "upgrade-h2c", source,
               "RFC 7540 §3.2")
      for case_id, fields, source in _H2C_ROWS),
    _refused("h2c-post-with-body", "an h2c upgrade on a POST whose body the origin would read as HTTP/2",
             _post(b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAAQAAP__",
                   b"Content-Length: 5", body=b"{body}"), "upgrade-h2c", "h2csmuggler (upgrade on a request with "
             "a body)", "RFC 7540 §3.2"),
    # --- routing-override headers -------------------------------------------------------------------
    *(_refused(f"override-{name}", f"{field!r}: the origin would route or run what the proxy did not judge",
               b"GET {get} HTTP/1.1\r\nHost: {host}\r\n" + field + b"\r\n\r\n", "routing-override",
               "issue #9 routing-override family", "RFC 9110 §9.1 / RFC 7239 §4")
      for field, name in _ROUTING_OVERRIDES.items()),
    # routing-override, second pass: param-miner's header list and forward-auth conventions
    *(_refused(f"override-{name}", f"{field!r}: the origin would route or run what the proxy did not judge",
               b"GET {get} HTTP/1.1\r\nHost: {host}\r\n" + field + b"\r\n\r\n", "routing-override", source,
               "RFC 9110 §9.1 / RFC 7239 §4")
      for field, (name, source) in _ROUTING_OVERRIDE_CORPUS.items()),
    # --- CONNECT with a body --------------------------------------------------------------------------
    _refused("connect-content-length-body", "CONNECT with Content-Length: a body for one party, tunnel bytes for "
             "another", _CONNECT_ALLOWED + b"Content-Length: 5\r\n\r\n{body}" + _GET_DENIED, "connect-body",
             "issue #9 CONNECT with a body", "RFC 9110 §9.3.6"),
    _refused("connect-chunked-body", "CONNECT with a chunked body",
             _CONNECT_ALLOWED + b"Transfer-Encoding: chunked\r\n\r\n" + _CHUNKED_HELLO + _GET_DENIED, "connect-body",
             "issue #9 CONNECT with a body", "RFC 9110 §9.3.6"),
    _refused("connect-content-length-zero", "CONNECT with Content-Length: 0 (content has no meaning: refused)",
             _CONNECT_ALLOWED + b"Content-Length: 0\r\n\r\n" + _GET_DENIED, "connect-body",
             "issue #9 CONNECT with a body", "RFC 9110 §9.3.6"),
    # --- field values ---------------------------------------------------------------------------------
    _control("obs-text-header-value", "a field value with a non-ASCII byte (obs-text) is legal and served",
             b"GET {get} HTTP/1.1\r\nHost: {host}\r\nX-Note: caf\xe9\r\n\r\n",
             "issue #9 (the interceptor dropped the connection)", "RFC 9110 §5.5"),
)

# What the h11-only weakening does with the corpus rows (measured; tests/test_inference_detection.py
# asserts the whole set): the rows it forwards on the absolute path (its holes; in the tunnel they are
# forwarded too or refused 403 by routing instead of 400) ...
_H11_FORWARDS = frozenset({
    "hn-underscore-joined", "hn-content-length-underscore", "hn-forwarded-host-underscore",
    "rl-version-2", "rl-target-bad-percent", "rl-target-unsafe-characters", "rl-target-quote-and-angle",
    "rl-target-truncated-percent",
    *(f"host-{name}" for name in ("comma-list", "userinfo", "path", "empty", "space-inside", "bad-port", "empty-port")),
    *(case_id for case_id, _fields, _source in _H2C_ROWS), "h2c-post-with-body",
    *(f"override-{name}" for name in _ROUTING_OVERRIDES.values()),
    "connect-content-length-body", "connect-content-length-zero",
    "cl-double-zero",  # h11 accepts leading zeros (as cl-malformed-leading-zero)
})
# ... and the rows it fails for another reason, per path.
_H11_OTHERWISE: dict[str, tuple[str, str]] = {
    "cl-wrap-2-32-plus-5": (BOTH_PATHS, "h11 waits for 2^32+5 bytes: no answer, no close"),
    "cl-wrap-2-64-plus-5": (BOTH_PATHS, "h11 refuses the value but neither answers nor closes"),
    "connect-chunked-body": (BOTH_PATHS, "h11 reads the CONNECT body: the tunnel opens (absolute), routing answers "
                                         "403 (tunnel)"),
    "rl-h2-preface": (BOTH_PATHS, "h11 answers 400 (absolute) / routing 403 (tunnel), not 505"),
    **{case_id: ("tunnel", "h11 takes the target; routing refuses it 403, not framing 400")
       for case_id in ("tf-authority-form-get", "tf-asterisk-form-get", "tf-connect-origin-form",
                       "tf-connect-absolute-form")},
}


# The same for the second pass over header-name, request-line, Host-value and target-form corpora (measured).
_H11_FORWARDS = _H11_FORWARDS | {
    "hn-percent-encoded-name", "hn-x-original-url-underscore", "hn-method-override-underscore",
    "hn-content-length-underscore-beside-real", "hn-transfer-encoding-underscore-beside-cl",
    "rl-version-9-9", "rl-version-0-9",  # h11 takes any HTTP/D.D
    *(f"host-{name}" for name, _source in _HOST_VALUE_CORPUS.values()),
    *(f"override-{name}" for name, _source in _ROUTING_OVERRIDE_CORPUS.values()),
}
_H11_OTHERWISE.update({
    **{case_id: ("tunnel", "h11 takes the target; routing refuses it 403, not framing 400")
       for case_id in ("rl-backslash-in-path", "rl-fragment-in-target", "tf-authority-form-post",
                       "tf-authority-form-options", "tf-asterisk-form-post", "tf-asterisk-form-connect",
                       "tf-schemeless-get", "tf-connect-schemeless")},
    "tf-authority-form-head": (BOTH_PATHS, "h11 takes the target: the refusal to HEAD is never written (absolute), "
                                           "routing answers 403 (tunnel)"),
})


def _h11_marked(case: SmugglingCase) -> SmugglingCase:
    if case.case_id in _H11_FORWARDS:
        return replace(case, holes=case.holes | {H11_ONLY})
    if case.case_id in _H11_OTHERWISE:
        path, why = _H11_OTHERWISE[case.case_id]
        return replace(case, also_failed_by=(*case.also_failed_by, (H11_ONLY, path, why)))
    return case


_CORPUS_ROWS = tuple(_h11_marked(case) for case in _CORPUS_ROWS_UNMARKED)


# --- issue #9, second pass (task C): content-length, transfer-encoding, trailer, connect-body, chunked-body, h2c
# Read from defparam/smuggler configs/{default,exhaustive,doubles}.py, MDA2AV/Http11Probe's Smuggling and
# MalformedInput suites, BishopFox/h2csmuggler (h2csmuggler.py and its Burp/nuclei checks) and RFC 9112 §6-§7,
# RFC 9110 §6.5.1, §8.6, §9.3.6. Each row's source is the corpus's own test id or mutation name.

H2CSMUGGLER = "BishopFox/h2csmuggler"
# h2csmuggler's own HTTP2-Settings value (it avoids hyper-h2's '_' which "triggered errors on some faulty h2c
# implementations").
_H2CSMUGGLER_SETTINGS = b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"
# A CL.TE body: the chunked reader ends at "0\r\n\r\n", a Content-Length reader takes the smuggled GET as body.
_CLTE_BODY = b"0\r\n\r\n" + _SMUGGLED_ORIGIN_FORM

# Content-Length values (RFC 9110 §8.6: 1*DIGIT; this proxy also refuses leading zeros and lists).
_CL_SECOND_PASS = {
    b"005": ("leading-zeros", f"{HTTP11PROBE} SMUG-CL-LEADING-ZEROS"),
    b"0o5": ("octal-prefix", f"{HTTP11PROBE} SMUG-CL-OCTAL"),
    b"5, 5, 5": ("comma-triple", f"{HTTP11PROBE} SMUG-CL-COMMA-TRIPLE"),
    b"5e0": ("exponent", "RFC 9110 §8.6 (a float reader takes 5e0 as 5)"),
    "\u0665".encode(): ("arabic-indic-digit", "RFC 9110 §8.6 DIGIT is ASCII (Python int() takes U+0665 as 5)"),
    b"5\x00": ("trailing-nul", "RFC 9110 §8.6 (C strtoul stops at NUL)"),  # a CTL: field-value, not CL
}
# Whitespace around the value is OWS, not part of it (RFC 9110 §5.5): served.
_CL_OWS_CONTROLS = {
    b"Content-Length:\t5": ("tab-before-value", f"{HTTP11PROBE} MAL-CL-TAB-BEFORE-VALUE"),
    b"Content-Length:  5": ("extra-leading-space", f"{HTTP11PROBE} SMUG-CL-EXTRA-LEADING-SP"),
    b"Content-Length: 5 ": ("trailing-space", f"{HTTP11PROBE} SMUG-CL-TRAILING-SPACE"),
}

# Transfer-Encoding values (TE only, a chunked body hiding a denied request, as _TE_CORPUS).
_TE_SECOND_PASS = {
    b", chunked": ("leading-comma-space", f"{HTTP11PROBE} SMUG-TE-LEADING-COMMA"),
    b"chunked, identity": ("chunked-then-identity", "RFC 9112 §6.1 (chunked must be the final coding)"),
    b"identity, chunked": ("identity-then-chunked", "RFC 9112 §7 (identity is no registered coding)"),
    b"chunked chunked": ("space-separated-twice", "RFC 9110 §5.6.1 (list elements are comma-separated)"),
    b"chunked\x00": ("trailing-nul", f"{HTTP11PROBE} SMUG-TE-NULL"),  # a CTL: field-value, not TE
}

# CL.TE and TE.CL with the request each reader would see next (Http11Probe's SMUGGLED-* sequences).
_CLTE_SECOND_PASS = (
    # (id, fields, body, source)
    ("cl-te-plus-length", (b"Content-Length: +%d" % len(_CLTE_BODY), b"Transfer-Encoding: chunked"), _CLTE_BODY,
     f"{HTTP11PROBE} SMUG-CLTE-SMUGGLED-GET-CL-PLUS"),
    ("cl-te-non-numeric-length", (b"Content-Length: %dx" % len(_CLTE_BODY), b"Transfer-Encoding: chunked"),
     _CLTE_BODY, f"{HTTP11PROBE} SMUG-CLTE-SMUGGLED-GET-CL-NON-NUMERIC"),
    ("cl-te-leading-comma", (b"Content-Length: %d" % len(_CLTE_BODY), b"Transfer-Encoding: , chunked"), _CLTE_BODY,
     f"{HTTP11PROBE} SMUG-CLTE-SMUGGLED-GET-TE-LEADING-COMMA"),
    ("cl-te-trailing-space", (b"Content-Length: %d" % len(_CLTE_BODY), b"Transfer-Encoding: chunked "), _CLTE_BODY,
     f"{HTTP11PROBE} SMUG-CLTE-SMUGGLED-GET-TE-TRAILING-SPACE"),
    ("cl-te-case-mismatch", (b"Content-Length: %d" % len(_CLTE_BODY), b"Transfer-Encoding: Chunked"), _CLTE_BODY,
     f"{HTTP11PROBE} SMUG-CLTE-SMUGGLED-GET-TE-CASE-MISMATCH"),
    ("cl-te-smuggled-head", (b"Content-Length: %d" % (5 + len(_SMUGGLED_ORIGIN_FORM)), b"Transfer-Encoding: chunked"),
     b"0\r\n\r\nHEAD" + _SMUGGLED_ORIGIN_FORM[3:], f"{HTTP11PROBE} SMUG-CLTE-SMUGGLED-HEAD"),
    ("te-te-cl",
     (b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", b"Content-Length: %d" % len(_CLTE_BODY)),
     _CLTE_BODY, f"{HTTP11PROBE} SMUG-TE-DUPLICATE-HEADERS-SMUGGLED-GET"),
    ("te-cl-short-length", (b"Transfer-Encoding: chunked", b"Content-Length: 4"),
     b"%x\r\n%s\r\n0\r\n\r\n" % (len(_SMUGGLED_ORIGIN_FORM), _SMUGGLED_ORIGIN_FORM),
     f"{HTTP11PROBE} SMUG-TECL-SMUGGLED-GET"),
    ("cl-te-pipeline", (b"Content-Length: 4", b"Transfer-Encoding: chunked"), b"0\r\n\r\n",
     f"{HTTP11PROBE} SMUG-CLTE-PIPELINE"),
)

# More trailer fields RFC 9110 §6.5.1 forbids (routing, request modifiers, content handling).
_TRAILERS_SECOND_PASS = {
    b"HOST: {denied}": "host-uppercase-name",
    b"Range: bytes=0-0": "range",
    b"Cache-Control: no-cache": "cache-control",
    b"Content-Range: bytes 0-4/5": "content-range",
    b"X-Original-URL: /admin": "x-original-url",
    b"Forwarded: host={denied}": "forwarded",
}

# Chunked bodies (RFC 9112 §7.1): sizes, extensions and terminators from Http11Probe not yet in the RFC rows.
_CHUNKED_SECOND_PASS = (
    # (id, body, violation, source)
    ("chunk-ext-invalid-token", b"5;bad[=x\r\n{body}\r\n0\r\n\r\n", "chunk-ext",
     f"{HTTP11PROBE} SMUG-CHUNK-EXT-INVALID-TOKEN"),
    ("chunk-ext-64k", b"5;" + b"a" * 65536 + b"\r\n{body}\r\n0\r\n\r\n", "chunk-ext",
     f"{HTTP11PROBE} MAL-CHUNK-EXT-64K"),
    ("chunk-data-spill", b"5\r\n{body}!!\r\n0\r\n\r\n", "chunk-terminator", f"{HTTP11PROBE} SMUG-CHUNK-SPILL"),
    ("chunk-data-lf-terminator", b"5\r\n{body}\n0\r\n\r\n", "chunk-terminator", f"{HTTP11PROBE} SMUG-CHUNK-LF-TERM"),
    ("chunk-last-lf-only", b"5\r\n{body}\r\n0\r\n\n", "bare-lf", f"{HTTP11PROBE} SMUG-CHUNK-LF-TRAILER"),
    ("chunk-size-plus-zero", b"+0\r\n\r\n", "chunk-size", f"{HTTP11PROBE} SMUG-CHUNK-INVALID-SIZE-DESYNC"),
    ("chunk-size-uppercase-0x", b"0X5\r\n{body}\r\n0\r\n\r\n", "chunk-size", "RFC 9112 §7.1 (1*HEXDIG, no prefix)"),
)
# Served: valid chunked bodies the strict parser must not refuse (the 5-byte body split or doubled).
_CHUNKED_CONTROLS = (
    # 10 bytes: the body then 5 spaces (in the tunnel still a JSON object, which the backend needs).
    ("chunked-hex-uppercase", b"A\r\n{body}     \r\n0\r\n\r\n", f"{HTTP11PROBE} COMP-CHUNKED-HEX-UPPERCASE"),
    ("chunked-size-leading-zeros", b"0005\r\n{body}\r\n0000\r\n\r\n", "RFC 9112 §7.1 (1*HEXDIG: zeros are digits)"),
    ("chunked-harmless-trailer", b"5\r\n{body}\r\n0\r\nX-Checksum: 1\r\n\r\n",
     f"{HTTP11PROBE} COMP-CHUNKED-TRAILER-VALID"),
)

# CONNECT with content (RFC 9110 §9.3.6: "A CONNECT request message does not have content"; RFC 9112 §9.3 a
# tunnel starts right after the head). Each must be refused before any tunnel opens. The same to inference.local
# (the early-data bypass) is tests/test_inference_detection.py's own test: a row could not show a proxy
# that forwards it late (tests/test_late_forwarder.py), inference.local being no address in the lab.
_CONNECT_BODY_SECOND_PASS = (
    # (id, description, payload)
    ("connect-content-length-and-chunked", "CONNECT with Content-Length and Transfer-Encoding: chunked",
     _CONNECT_ALLOWED + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + _CHUNKED_HELLO),
    ("connect-expect-100-continue", "CONNECT with Expect: 100-continue and a Content-Length body",
     _CONNECT_ALLOWED + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n{body}" + _GET_DENIED),
    ("connect-identity-coding", "CONNECT with Transfer-Encoding: identity (a reader that ignores it opens the "
     "tunnel and relays the body)", _CONNECT_ALLOWED + b"Transfer-Encoding: identity\r\n\r\n{body}" + _GET_DENIED),
    ("connect-http10-content-length", "an HTTP/1.0 CONNECT with a Content-Length body",
     b"CONNECT {host}:80 HTTP/1.0\r\nHost: {host}:80\r\nContent-Length: 5\r\n\r\n{body}" + _GET_DENIED),
)

# h2c upgrades as h2csmuggler and its Burp/nuclei checks send them, on each method, and spelling variants.
_H2CSMUGGLER_FIELDS = b"Accept: */*\r\nAccept-Language: en\r\nUpgrade: h2c\r\n" + _H2CSMUGGLER_SETTINGS
_H2C_SECOND_PASS = (
    # (id, request-line, fields, body, source)
    ("h2c-h2csmuggler-get", b"GET {get} HTTP/1.1", _H2CSMUGGLER_FIELDS + b"\r\nConnection: Upgrade, HTTP2-Settings",
     b"",
     f"{H2CSMUGGLER} h2csmuggler.py send_initial_request"),
    ("h2c-h2csmuggler-upgrade-only", b"GET {get} HTTP/1.1", _H2CSMUGGLER_FIELDS + b"\r\nConnection: Upgrade", b"",
     f"{H2CSMUGGLER} --upgrade-only; h2csmuggle-upgrade-only-nuclei.yaml"),
    ("h2c-h2csmuggler-post", b"POST {post} HTTP/1.1", _H2CSMUGGLER_FIELDS + b"\r\nConnection: Upgrade, HTTP2-Settings"
     b"\r\nContent-Length: 5", b"{body}", f"{H2CSMUGGLER} -XPOST -d"),
    ("h2c-options", b"OPTIONS {get} HTTP/1.1", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
     + _H2CSMUGGLER_SETTINGS, b"", "RFC 7540 §3.2 (any method may carry the upgrade)"),
    ("h2c-connection-order-reversed", b"GET {get} HTTP/1.1", b"Connection: HTTP2-Settings, Upgrade\r\nUpgrade: h2c\r\n"
     + _H2CSMUGGLER_SETTINGS, b"", "RFC 9110 §7.6.1 (Connection is an unordered list)"),
    ("h2c-lowercase-names", b"GET {get} HTTP/1.1", b"connection: upgrade, http2-settings\r\nupgrade: h2c\r\n"
     b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA", b"",
     "RFC 9110 §5.1 (field names are case-insensitive)"),
    ("h2c-connection-keep-alive-upgrade", b"GET {get} HTTP/1.1", b"Connection: keep-alive, Upgrade, HTTP2-Settings\r\n"
     b"Upgrade: h2c\r\n" + _H2CSMUGGLER_SETTINGS, b"", "h2cSmugglingCheck.py (Connection rewritten, not added)"),
    ("h2c-second-upgrade-field", b"GET {get} HTTP/1.1",
     b"Connection: Upgrade\r\nUpgrade: websocket\r\nUpgrade: h2c", b"",
     "RFC 9110 §5.3 (two Upgrade fields are one list)"),
    ("h2c-token-h2", b"GET {get} HTTP/1.1", b"Connection: Upgrade\r\nUpgrade: h2", b"",
     "RFC 9113 §3.1 (h2 is the TLS token; still an HTTP/2 upgrade)"),
    ("h2c-token-http-2-0", b"GET {get} HTTP/1.1", b"Connection: Upgrade\r\nUpgrade: HTTP/2.0", b"",
     "RFC 9110 §7.8 (protocol-name/version)"),
    ("h2c-http10", b"GET {get} HTTP/1.0", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
     + _H2CSMUGGLER_SETTINGS, b"", f"{HTTP11PROBE} COMP-UPGRADE-HTTP10 (an HTTP/1.0 upgrade)"),
)

# smuggler's byte loops, generated from a table (positions x bytes) as configs/default.py does. The full loops
# (exhaustive.py: 4 positions x 160 bytes; doubles.py: 6 position pairs x 160 bytes) would be about 1,600 rows,
# 3,200 conformance tests: far beyond the 20 s budget of the whole suite (each row is two tests, about 10 ms
# each). The strict reader's verdict depends only on the byte's class (OWS, CR, LF, other CTL, obs-text), so
# the faithful subset is smuggler's own default.py selection, which has every class (and DEL, NBSP, 0xFF), on
# all ten of default.py's positions. ``_BYTE_LOOP_OUTCOMES`` says per position and class what the strict
# reader must do (a FramingViolation case, or CHUNKED / PLAIN: a valid request that is served).
_SMUGGLER_DEFAULT_BYTES = (0x01, 0x04, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1F, 0x20, 0x7F, 0xA0, 0xFF)
_BYTE_LOOP_POSITIONS = {  # smuggler's mutation name -> its gadget, "%c" the byte
    "midspace": b"Transfer-Encoding:%cchunked",
    "postspace": b"Transfer-Encoding%c: chunked",
    "prespace": b"%cTransfer-Encoding: chunked",
    "endspace": b"Transfer-Encoding: chunked%c",
    "xprespace": b"X: X%cTransfer-Encoding: chunked",
    "endspacex": b"Transfer-Encoding: chunked%cX: X",
    "rxprespace": b"X: X\r%cTransfer-Encoding: chunked",
    "xnprespace": b"X: X%c\nTransfer-Encoding: chunked",
    "endspacerx": b"Transfer-Encoding: chunked\r%cX: X",
    "endspacexn": b"Transfer-Encoding: chunked%c\nX: X",
}
CHUNKED, PLAIN = "served-chunked", "served-plain"


def _byte_class(byte: int) -> str:
    """RFC 9110 §5.6.3 OWS, RFC 9112 §2.2 CR / LF, RFC 5234 CTL (with DEL), RFC 9110 §5.5 obs-text."""
    if byte in (0x09, 0x20):
        return "ows"
    if byte in (0x0D, 0x0A):
        return {0x0D: "cr", 0x0A: "lf"}[byte]
    return "obs" if byte >= 0x80 else "ctl"


_BYTE_LOOP_OUTCOMES: dict[str, dict[str, str]] = {
    # OWS around a value is not part of it (RFC 9110 §5.5); a CTL inside a value is invalid (§5.5); obs-text in
    # a Transfer-Encoding value is no coding (RFC 9112 §6.1); a bare CR or LF is refused (RFC 9112 §2.2).
    "midspace": {"ows": CHUNKED, "cr": "bare-cr", "lf": "bare-lf", "ctl": "field-value", "obs": "te-not-chunked"},
    "endspace": {"ows": CHUNKED, "cr": "bare-cr", "lf": "bare-lf", "ctl": "field-value", "obs": "te-not-chunked"},
    # Between name and colon: whitespace MUST be rejected (RFC 9112 §5.1), anything else is no token (RFC 9110 §5.1).
    "postspace": {"ows": "ws-before-colon", "cr": "bare-cr", "lf": "bare-lf", "ctl": "field-syntax",
                  "obs": "field-syntax"},
    # Before the name: whitespace makes the line an obs-fold continuation (RFC 9112 §5.2).
    "prespace": {"ows": "obs-fold", "cr": "bare-cr", "lf": "bare-lf", "ctl": "field-syntax", "obs": "field-syntax"},
    # Inside X's value: OWS and obs-text keep "Transfer-Encoding: chunked" as X's value (served, no body).
    "xprespace": {"ows": PLAIN, "cr": "bare-cr", "lf": "bare-lf", "ctl": "field-value", "obs": PLAIN},
    # After chunked: "chunked X: X" is no coding list.
    "endspacex": {"ows": "te-not-chunked", "cr": "bare-cr", "lf": "bare-lf", "ctl": "field-value",
                  "obs": "te-not-chunked"},
    # Around a CR or LF: only the byte that completes a CRLF gives a valid field line.
    "rxprespace": {"ows": "bare-cr", "cr": "bare-cr", "lf": CHUNKED, "ctl": "bare-cr", "obs": "bare-cr"},
    "xnprespace": {"ows": "bare-lf", "cr": CHUNKED, "lf": "bare-lf", "ctl": "bare-lf", "obs": "bare-lf"},
    "endspacerx": {"ows": "bare-cr", "cr": "bare-cr", "lf": CHUNKED, "ctl": "bare-cr", "obs": "bare-cr"},
    "endspacexn": {"ows": "bare-lf", "cr": CHUNKED, "lf": "bare-lf", "ctl": "bare-lf", "obs": "bare-lf"},
}


def _byte_loop_row(position: str, byte: int) -> SmugglingCase:
    gadget = _BYTE_LOOP_POSITIONS[position] % bytes([byte])
    outcome = _BYTE_LOOP_OUTCOMES[position][_byte_class(byte)]
    case_id, source = f"te-{position}-{byte:02x}", f"{SMUGGLER} {position}-{byte:02x} (configs/default.py)"
    if outcome == CHUNKED:
        return _control(case_id, f"{gadget!r} is a valid Transfer-Encoding: chunked: served",
                        _post(gadget, body=_CHUNKED_HELLO), source, "RFC 9110 §5.5")
    if outcome == PLAIN:
        return _control(case_id, f"{gadget!r} is one X field; the body is framed by Content-Length: served",
                        _post(gadget, b"Content-Length: 5", body=b"{body}"), source, "RFC 9110 §5.5")
    # Whitespace before a name is obs-fold to the strict reader and a name prefix to a lenient name reader (which
    # strips it): a header-name mutation, as smuggler's nameprefix1.
    return _refused(case_id, f"{gadget!r} must not be read as chunked", _chunked_te(gadget), outcome, source,
                    "RFC 9112 §2.2, §5, §6.1", status=(400, 501) if outcome == "te-not-chunked" else 400,
                    family="header-name" if outcome == "obs-fold" else "")


# Byte-loop mutations already in the catalogue under a named row with the same bytes: not generated twice.
BYTE_LOOP_COVERED = MappingProxyType({
    ("midspace", 0x09): "te-valid-tabprefix1",
    ("endspace", 0x09): "te-valid-tabsuffix",
    ("postspace", 0x0B): "hn-vertical-tab-before-colon",
    ("postspace", 0xFF): "hn-ff-before-colon",
    ("endspace", 0xFF): "te-trailing-obs-text",
    ("prespace", 0x20): "te-nameprefix1",
    ("endspace", 0x0D): "te-0dsuffix",
    ("postspace", 0x01): "hn-soh-before-colon",
    ("postspace", 0x0C): "hn-form-feed-before-colon",
    ("postspace", 0x1F): "hn-unit-separator-before-colon",
    ("postspace", 0x7F): "hn-del-before-colon",
    ("postspace", 0xA0): "hn-nbsp-before-colon",
})


def _byte_loop_rows() -> tuple[SmugglingCase, ...]:
    """default.py's positions x bytes, minus the covered ones and the spellings two positions share (a CR
    before "\\n" and a "\\n" after "\\r" both make a plain CRLF): the first position's row is kept."""
    rows: dict[bytes, SmugglingCase] = {}
    for position in _BYTE_LOOP_POSITIONS:
        for byte in _SMUGGLER_DEFAULT_BYTES:
            if (position, byte) not in BYTE_LOOP_COVERED:
                row = _byte_loop_row(position, byte)
                rows.setdefault(row.payload, row)
    return tuple(rows.values())


_SECOND_PASS_UNMARKED: tuple[SmugglingCase, ...] = (
    # --- content-length ---------------------------------------------------------------------------------
    *(_refused(f"cl-{name}", f"Content-Length: {value!r} is not 0|[1-9][0-9]*",
               _post(b"Content-Length: " + value, body=b"{body}") + _GET_DENIED,
               "field-value" if b"\x00" in value else "cl-duplicate" if b"," in value else "cl-malformed",
               source, "RFC 9110 §8.6")
      for value, (name, source) in _CL_SECOND_PASS.items()),
    # Http11Probe sends 200 bytes: a decimal reader that skips the leading zero takes them all, an octal one 128.
    _refused("cl-leading-zero-octal", "Content-Length: 0200 (200, or 128 in octal) with 200 bytes of body",
             _post(b"Content-Length: 0200", body=b"{body}" + b"A" * 195) + _GET_DENIED, "cl-malformed",
             f"{HTTP11PROBE} SMUG-CL-LEADING-ZEROS-OCTAL", "RFC 9110 §8.6"),
    *(_control(f"cl-valid-{name}", f"{field!r}: the OWS is not part of the value: served",
               _post(field, body=b"{body}"), source, "RFC 9110 §5.5")
      for field, (name, source) in _CL_OWS_CONTROLS.items()),
    _refused("cl-duplicate-smuggled-get", "Content-Length: 4 and a second Content-Length covering a smuggled GET",
             _post(b"Content-Length: 4", b"Content-Length: %d" % (4 + len(_SMUGGLED_ORIGIN_FORM)),
                   body=b"PING" + _SMUGGLED_ORIGIN_FORM), "cl-duplicate",
             f"{HTTP11PROBE} SMUG-DUPLICATE-CL-SMUGGLED-GET", "RFC 9112 §6.3"),
    # --- transfer-encoding ------------------------------------------------------------------------------
    *(SmugglingCase(f"te-{name}", f"Transfer-Encoding: {value!r} must not be read as chunked",
                    _chunked_te(b"Transfer-Encoding: " + value), 400 if b"\x00" in value else (400, 501),
                    must_close=True, reaches_backend=0, rfc="RFC 9112 §6.1",
                    violation="field-value" if b"\x00" in value else "te-not-chunked", source=source)
      for value, (name, source) in _TE_SECOND_PASS.items()),
    _refused("te-chunked-then-identity-fields", "Transfer-Encoding: chunked, then Transfer-Encoding: identity",
             _post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", body=_CHUNKED_HELLO + _GET_DENIED),
             "te-not-chunked", f"{HTTP11PROBE} SMUG-TE-DUPLICATE-HEADERS", "RFC 9112 §6.1", status=(400, 501)),
    *(_refused(case_id, f"{b' + '.join(fields)!r}: two framings, a request between them", _post(*fields, body=body)
               + _GET_DENIED, "cl-te-both", source, "RFC 9112 §6.1")
      for case_id, fields, body, source in _CLTE_SECOND_PASS),
    *(_refused(f"te-{name}", f"smuggler {name}: {field!r}", _chunked_te(field), violation, f"{SMUGGLER} {name}",
               "RFC 9112 §2.2, §5.2", family="header-name" if violation == "obs-fold" else "")
      for name, field, violation in (
          ("nameprefix1", b" Transfer-Encoding: chunked", "obs-fold"),
          ("linewrapped1", b"Transfer-Encoding:\n chunked", "bare-lf"),
          ("0dsuffix", b"Transfer-Encoding: chunked\r", "bare-cr"),
          ("0dspam", b"Transfer\r-Encoding: chunked", "bare-cr"),
      )),
    # smuggler's "yelling" (TRANSFER-ENCODING: CHUNKED) is the control hn-valid-uppercase-name.
    # --- trailer ----------------------------------------------------------------------------------------
    *(_refused(f"trailer-{name}", f"a {field.partition(b':')[0]!r} field in the trailer section must never be merged",
               _post(b"Transfer-Encoding: chunked", body=b"5\r\n{body}\r\n0\r\n" + field + b"\r\n\r\n"),
               "trailer-forbidden", "RFC 9110 §6.5.1", "RFC 9110 §6.5.1")
      for field, name in _TRAILERS_SECOND_PASS.items()),
    # --- chunked-body -----------------------------------------------------------------------------------
    *(_refused(case_id, f"chunked body {body[:24]!r}", _post(b"Transfer-Encoding: chunked", body=body), violation,
               source, "RFC 9112 §7.1")
      for case_id, body, violation, source in _CHUNKED_SECOND_PASS),
    *(_control(case_id, f"chunked body {body[:24]!r} is valid: served", _post(b"Transfer-Encoding: chunked",
               body=body), source, "RFC 9112 §7.1")
      for case_id, body, source in _CHUNKED_CONTROLS),
    # --- connect-body -----------------------------------------------------------------------------------
    *(_refused(case_id, description, payload, "connect-body", "issue #9 CONNECT with a body (9 public cases)",
               "RFC 9110 §9.3.6")
      for case_id, description, payload in _CONNECT_BODY_SECOND_PASS),
    # --- h2c --------------------------------------------------------------------------------------------
    *(_refused(case_id, f"an h2c upgrade ({source})", request_line + b"\r\nHost: {host}\r\n" + fields + b"\r\n\r\n"
               + body, "upgrade-h2c", source, "RFC 7540 §3.2")
      for case_id, request_line, fields, body, source in _H2C_SECOND_PASS),
    SmugglingCase("h2c-pipelined-after-allowed", "an allowed GET, then h2csmuggler's upgrade on the same connection",
                  _GET_ALLOWED + b"GET {get} HTTP/1.1\r\nHost: {host}\r\n" + _H2CSMUGGLER_FIELDS
                  + b"\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n", 400, must_close=True, reaches_backend=1,
                  rfc="RFC 7540 §3.2", violation="upgrade-h2c", source=f"{H2CSMUGGLER} (a reused connection)"),
    # --- smuggler's byte loops (configs/default.py bytes x positions) -----------------------------------
    *_byte_loop_rows(),
)

# What the h11-only weakening does with these rows (measured, as _H11_FORWARDS above): h11 0.16 takes leading
# zeros and lists in Content-Length, lets Transfer-Encoding win over Content-Length, unfolds obs-fold, ends lines
# at a bare LF, takes CTLs in values, merges any trailer, ignores chunk extensions and h2c upgrades, and reads a
# CONNECT's body.
_H11_TAKES_BYTE_LOOP = {  # smuggler position -> bytes h11 0.16 takes there
    "prespace": (0x09, 0x0A),
    "xprespace": (0x01, 0x04, 0x08, 0x0A, 0x1F, 0x7F),
    "endspacex": (0x0A,),
    "xnprespace": (0x01, 0x04, 0x08, 0x09, 0x0A, 0x1F, 0x20, 0x7F, 0xA0, 0xFF),
    "endspacexn": (0x09, 0x20),
}
_SECOND_PASS_H11_FORWARDS: frozenset[str] = frozenset({
    "cl-leading-zeros", "cl-comma-triple", "cl-leading-zero-octal",
    "cl-te-trailing-space", "cl-te-case-mismatch", "cl-te-smuggled-head", "te-cl-short-length", "cl-te-pipeline",
    "te-nameprefix1", "te-linewrapped1",
    *(f"trailer-{name}" for name in _TRAILERS_SECOND_PASS.values()),
    "chunk-ext-invalid-token", "chunk-last-lf-only",
    *(case_id for case_id, _description, _payload in _CONNECT_BODY_SECOND_PASS
      if case_id != "connect-identity-coding"),
    *(case_id for case_id, *_rest in _H2C_SECOND_PASS),
    *(f"te-{position}-{byte:02x}" for position, taken in _H11_TAKES_BYTE_LOOP.items() for byte in taken),
})
# ... and where h11 refuses with another status: a Transfer-Encoding it does not read as exactly "chunked" is 501
# ("Only Transfer-Encoding: chunked is supported") where the strict reader's verdict is 400; VT and FF in the value
# h11 itself refuses with 400.
_CTL_BYTES = tuple(byte for byte in _SMUGGLER_DEFAULT_BYTES if _byte_class(byte) == "ctl" and byte not in (0x0B, 0x0C))
_H11_501_BYTE_LOOP = {
    "midspace": _CTL_BYTES,
    "endspace": _CTL_BYTES,
    "endspacex": _CTL_BYTES,
    "endspacexn": (*_CTL_BYTES, 0xA0, 0xFF),
}
_H11_501 = "h11 answers 501 (only Transfer-Encoding: chunked), not the catalogued 400"
_SECOND_PASS_H11_OTHERWISE: dict[str, tuple[str, str]] = {
    # A hole too, but in the second request (``holes`` rows are checked on their first request).
    "h2c-pipelined-after-allowed": (BOTH_PATHS, "h11 forwards the upgrade that follows the allowed request"),
    "chunk-ext-64k": (BOTH_PATHS, "h11 answers 431 to a 64 KiB chunk-size line, not the catalogued 400"),
    **{case_id: (BOTH_PATHS, _H11_501) for case_id in ("cl-te-leading-comma", "te-te-cl", "connect-identity-coding")},
    **{f"te-{position}-{byte:02x}": (BOTH_PATHS, _H11_501)
       for position, refused in _H11_501_BYTE_LOOP.items() for byte in refused},
}


def _second_pass_h11_marked(case: SmugglingCase) -> SmugglingCase:
    if case.case_id in _SECOND_PASS_H11_FORWARDS:
        return replace(case, holes=case.holes | {H11_ONLY})
    if case.case_id in _SECOND_PASS_H11_OTHERWISE:
        path, why = _SECOND_PASS_H11_OTHERWISE[case.case_id]
        return replace(case, also_failed_by=(*case.also_failed_by, (H11_ONLY, path, why)))
    return case


_SECOND_PASS_ROWS = tuple(_second_pass_h11_marked(case) for case in _SECOND_PASS_UNMARKED)


SMUGGLING_CASES: tuple[SmugglingCase, ...] = (
    # --- positive controls -------------------------------------------------------------------
    SmugglingCase(
        "pipeline-safe",
        "two allowed GETs pipelined in one write: both answered, in order, connection kept",
        _GET_ALLOWED + _GET_ALLOWED,
        200, must_close=False, reaches_backend=2, rfc="RFC 9112 §9.3.2",
    ),
    SmugglingCase(
        "pipeline-safe-chunked-then-get",
        "a valid chunked POST then a GET in one write: both reach the origin",
        _post(b"Transfer-Encoding: chunked", body=_CHUNKED_HELLO) + _GET_ALLOWED,
        200, must_close=False, reaches_backend=2, rfc="RFC 9112 §7.1",
    ),
    SmugglingCase(
        "te-uppercase-chunked",
        "Transfer-Encoding: CHUNKED is the chunked coding (names are case-insensitive)",
        _post(b"Transfer-Encoding: CHUNKED", body=_CHUNKED_HELLO),
        200, must_close=False, reaches_backend=1, rfc="RFC 9112 §7",
    ),
    SmugglingCase(
        "expect-100-continue-body-sent",
        "Expect: 100-continue with the body sent anyway is framed by Content-Length",
        _post(b"Content-Length: 5", b"Expect: 100-continue", body=b"{body}"),
        200, must_close=False, reaches_backend=1, rfc="RFC 9110 §10.1.1",
    ),
    # --- every request judged on its own ------------------------------------------------------
    SmugglingCase(
        "routed-then-denied",
        "an allowed GET, then a GET to a denied host on the same connection in one write",
        _GET_ALLOWED + _GET_DENIED,
        403, must_close=True, reaches_backend=1, rfc="RFC 9112 §9.3.2",
        holes=frozenset({FIRST_REQUEST_ONLY}),
    ),
    SmugglingCase(
        "pipelined-denied-in-the-middle",
        "allowed, denied, allowed: the third request is never parsed",
        _GET_ALLOWED + _GET_DENIED + _GET_ALLOWED,
        403, must_close=True, reaches_backend=1, rfc="RFC 9112 §9.3.2",
        holes=frozenset({FIRST_REQUEST_ONLY}),
    ),
    SmugglingCase(
        "cl0-then-denied",
        "Content-Length: 0 on a GET followed by a request to a denied host (CL.0)",
        b"GET {get} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n" + _GET_DENIED,
        403, must_close=True, reaches_backend=1, rfc="RFC 9112 §6.3",
        holes=frozenset({FIRST_REQUEST_ONLY}),
    ),
    SmugglingCase(
        "body-then-denied",
        "a POST whose Content-Length body is followed by a request to a denied host",
        _post(b"Content-Length: 5", body=b"{body}") + _GET_DENIED,
        403, must_close=True, reaches_backend=1, rfc="RFC 9112 §6.3",
        holes=frozenset({FIRST_REQUEST_ONLY}),
    ),
    SmugglingCase(
        "upgrade-websocket-then-denied",
        "Upgrade: websocket without a 101: the next bytes are a new request and are judged",
        b"GET {ws} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        + _GET_DENIED,
        403, must_close=True, reaches_backend=1, rfc="RFC 9110 §7.8",
        holes=frozenset({FIRST_REQUEST_ONLY}),
    ),
    SmugglingCase(
        "http10-keep-alive",
        "HTTP/1.0 with Connection: keep-alive: answered, then closed; the second request never parsed",
        b"GET {get} HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n" + _GET_DENIED,
        200, must_close=True, reaches_backend=1, rfc="RFC 9112 App. C.2.2",
    ),
    SmugglingCase(
        "denied-connect-with-trailing-bytes",
        "CONNECT to a denied host immediately followed by a request: denial, close, nothing parsed",
        b"CONNECT {denied}:443 HTTP/1.1\r\nHost: {denied}:443\r\n\r\n" + _GET_ALLOWED,
        403, must_close=True, reaches_backend=0, rfc="RFC 9931 §3",
    ),
    SmugglingCase(
        "head-too-large-after-good-request",
        "an allowed GET, then a request whose head exceeds 8 KiB",
        _GET_ALLOWED + b"GET {get} HTTP/1.1\r\nHost: {host}\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n",
        431, must_close=True, reaches_backend=1, rfc="RFC 6585 §5",
        violation="head-too-large",
        also_failed_by=_h11_only_also("the 8 KiB head limit is the strict reader's; h11 allows 16 KiB: forwarded"),
    ),
    # --- Content-Length / Transfer-Encoding disagreements -------------------------------------
    SmugglingCase(
        "cl-te-both",
        "CL.TE: Content-Length and Transfer-Encoding together, smuggled request in the body",
        _post(b"Content-Length: 6", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + _GET_DENIED),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §6.1",
        violation="cl-te-both", holes=frozenset({H11_ONLY}),
    ),
    SmugglingCase(
        "te-cl",
        "TE.CL: Transfer-Encoding before Content-Length, chunk data hides a request",
        _post(b"Transfer-Encoding: chunked", b"Content-Length: 4",
              body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(_SMUGGLED_ORIGIN_FORM), _SMUGGLED_ORIGIN_FORM)),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §6.1",
        violation="cl-te-both", holes=frozenset({H11_ONLY}),
    ),
    SmugglingCase(
        "te-http10",
        "Transfer-Encoding on an HTTP/1.0 request (Go ignores it, h11 decodes it)",
        b"POST {post} HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _CHUNKED_HELLO,
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §6.1",
        violation="te-http10", holes=frozenset({H11_ONLY}),
    ),
    SmugglingCase(
        "te-duplicate-header",
        "two Transfer-Encoding fields",
        _post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=_CHUNKED_HELLO),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §6.1",
        violation="te-not-chunked",
        also_failed_by=_h11_only_also("h11 refuses two Transfer-Encoding fields with 501, not the catalogued 400"),
    ),
    *(_te(value) for value in _TE_IDS),
    SmugglingCase(
        "te-vertical-tab",
        "a vertical tab before chunked (a CTL in a field value)",
        _post(b"Transfer-Encoding: \x0bchunked", body=_CHUNKED_HELLO),
        400, must_close=True, reaches_backend=0, rfc="RFC 9110 §5.5",
        violation="field-value",
    ),
    SmugglingCase(
        "te-form-feed",
        "a form feed after chunked (a CTL in a field value)",
        _post(b"Transfer-Encoding: chunked\x0c", body=_CHUNKED_HELLO),
        400, must_close=True, reaches_backend=0, rfc="RFC 9110 §5.5",
        violation="field-value",
    ),
    SmugglingCase(
        "cl-duplicate-different",
        "Content-Length: 5 and Content-Length: 6",
        _post(b"Content-Length: 5", b"Content-Length: 6", body=b"{body}!"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §6.3",
        violation="cl-duplicate",
    ),
    SmugglingCase(
        "cl-duplicate-same",
        "Content-Length: 5 twice",
        _post(b"Content-Length: 5", b"Content-Length: 5", body=b"{body}"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §6.3",
        violation="cl-duplicate",
        also_failed_by=_h11_only_also("h11 0.16 accepts identical duplicate Content-Length fields (network.md §5): "
                                      "forwarded"),
    ),
    SmugglingCase(
        "cl-list",
        "Content-Length: 5, 5 (h11 collapses it)",
        _post(b"Content-Length: 5, 5", body=b"{body}"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §6.3",
        violation="cl-duplicate", holes=frozenset({H11_ONLY}),
    ),
    *(
        SmugglingCase(
            f"cl-malformed-{name}",
            f"Content-Length: {value!r} is not 0|[1-9][0-9]*",
            _post(b"Content-Length: " + value, body=b"{body}"),
            400, must_close=True, reaches_backend=0, rfc="RFC 9110 §8.6",
            violation="cl-malformed",
            holes=frozenset({H11_ONLY}) if name == "leading-zero" else frozenset(),
            also_failed_by=_h11_only_also("h11 rejects the value, but the h11-only path neither answers nor closes")
            if name == "overflow" else (),
        )
        for value, name in _MALFORMED_CONTENT_LENGTHS.items()
    ),
    # --- header-section syntax ----------------------------------------------------------------
    SmugglingCase(
        "obs-fold",
        "Transfer-Encoding folded onto a continuation line",
        _post(b"Transfer-Encoding:\r\n chunked", body=_CHUNKED_HELLO),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §5.2",
        violation="obs-fold", holes=frozenset({H11_ONLY}),
    ),
    SmugglingCase(
        "bare-cr",
        "a bare CR hides a Transfer-Encoding line from CRLF parsers",
        _post(b"X: a\rTransfer-Encoding: chunked", body=_CHUNKED_HELLO),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §2.2",
        violation="bare-cr",
    ),
    SmugglingCase(
        "bare-lf-in-header",
        "a bare LF hides a Transfer-Encoding line from strict parsers",
        _post(b"X: y\nTransfer-Encoding: chunked", body=_CHUNKED_HELLO),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §2.2",
        violation="bare-lf", holes=frozenset({H11_ONLY}),
    ),
    SmugglingCase(
        "bare-lf-only",
        "a request whose every line ends in a bare LF (it never contains CRLFCRLF)",
        b"GET {get} HTTP/1.1\nHost: {host}\n\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §2.2",
        violation="bare-lf", holes=frozenset({H11_ONLY}),
    ),
    SmugglingCase(
        "ws-before-colon",
        "Transfer-Encoding : chunked (whitespace between name and colon)",
        _post(b"Transfer-Encoding : chunked", body=_CHUNKED_HELLO),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §5.1",
        violation="ws-before-colon",
    ),
    SmugglingCase(
        "host-missing",
        "an HTTP/1.1 request without Host",
        b"GET {get} HTTP/1.1\r\nAccept: */*\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §3.2",
        violation="host-missing-or-duplicate",
    ),
    SmugglingCase(
        "host-duplicate",
        "two Host fields",
        b"GET {get} HTTP/1.1\r\nHost: {host}\r\nHost: {denied}\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §3.2",
        violation="host-missing-or-duplicate",
    ),
    SmugglingCase(
        "target-fragment",
        "a '#' in the request-target",
        b"GET http://{host}/a#@{denied}/ HTTP/1.1\r\nHost: {host}\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §3.2",
        violation="target-chars", literal_target=True, family=TARGET_AUTHORITY,
        also_failed_by=(_ROUTED_NOT_FRAMED,),
    ),
    SmugglingCase(
        "target-backslash",
        "a backslash in the authority: urllib and WHATWG pick different hosts",
        b"GET http://{host}:80\\@{denied}/ HTTP/1.1\r\nHost: {host}\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 3986 §3.2",
        violation="target-chars", literal_target=True, family=TARGET_AUTHORITY,
        also_failed_by=(_ROUTED_NOT_FRAMED,),
    ),
    SmugglingCase(
        "target-userinfo",
        "userinfo in the absolute-form target",
        b"GET http://{host}@{denied}/ HTTP/1.1\r\nHost: {host}\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9110 §4.2.4",
        violation="target-userinfo", literal_target=True, family=TARGET_AUTHORITY,
        also_failed_by=(_ROUTED_NOT_FRAMED,),
    ),
    SmugglingCase(
        "target-control-character",
        "a TAB inside the request-target",
        b"GET http://{host}/a\tb HTTP/1.1\r\nHost: {host}\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §3.2",
        violation="target-chars", literal_target=True, family=TARGET_AUTHORITY,
    ),
    SmugglingCase(
        "upgrade-h2c",
        "Upgrade: h2c with HTTP2-Settings (an unjudged HTTP/2 connection behind the proxy)",
        b"GET {get} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 7540 §3.2",
        violation="upgrade-h2c",
        also_failed_by=_h11_only_also("refusing h2c is the strict reader's check; h11 passes the Upgrade header: "
                                      "forwarded"),
    ),
    SmugglingCase(
        "connection-lists-content-length",
        "Connection: Content-Length asks the proxy to drop the framing header",
        _post(b"Connection: Content-Length", b"Content-Length: 5", body=b"{body}"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9110 §7.6.1",
        violation="connection-lists-framing-header",
        also_failed_by=_h11_only_also("refusing framing fields in Connection (RFC 9110 §7.6.1) is the strict "
                                      "reader's own check: forwarded"),
    ),
    SmugglingCase(
        "connection-lists-host",
        "Connection: Host asks the proxy to drop Host",
        b"GET {get} HTTP/1.1\r\nHost: {host}\r\nConnection: Host\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9110 §7.6.1",
        violation="connection-lists-framing-header",
        also_failed_by=_h11_only_also("as above, for Host: forwarded"),
    ),
    # --- chunked body syntax ------------------------------------------------------------------
    *(
        SmugglingCase(
            f"chunk-size-{name}",
            f"chunk size {size!r} is not 1*HEXDIG",
            _post(b"Transfer-Encoding: chunked", body=size + b"\r\n{body}\r\n0\r\n\r\n"),
            400, must_close=True, reaches_backend=0, rfc="RFC 9112 §7.1",
            violation="chunk-size",
            holes=frozenset({H11_ONLY}) if name == "trailing-space" else frozenset(),
            also_failed_by=_h11_only_also("h11 takes a 17-hex-digit chunk size and waits for 2**64 bytes: no answer, "
                                          "no close") if name == "overflow" else (),
        )
        for size, name in _CHUNK_SIZE_CASES.items()
    ),
    *(
        SmugglingCase(
            f"chunk-ext-{name}",
            "a chunk extension (refused outright; h11 accepts any bytes after ';')",
            _post(b"Transfer-Encoding: chunked", body=line + b"\r\n{body}\r\n0\r\n\r\n"),
            400, must_close=True, reaches_backend=0, rfc="RFC 9112 §7.1.1",
            violation="chunk-ext", holes=frozenset({H11_ONLY}),
        )
        for line, name in _CHUNK_EXTENSION_CASES.items()
    ),
    SmugglingCase(
        "chunk-ext-bare-lf",
        "5;\\n: an extension ended by a bare LF (Kestrel CVE-2025-55315)",
        _post(b"Transfer-Encoding: chunked", body=b"5;\n{body}\r\n0\r\n\r\n"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §7.1.1",
        violation="chunk-ext",
    ),
    SmugglingCase(
        "chunk-size-line-bare-lf",
        "a chunk-size line ended by a bare LF",
        _post(b"Transfer-Encoding: chunked", body=b"5\n{body}\r\n0\r\n\r\n"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §7.1",
        violation="chunk-size",
    ),
    SmugglingCase(
        "chunk-size-line-bare-cr",
        "a chunk-size line ended by a bare CR",
        _post(b"Transfer-Encoding: chunked", body=b"5\r{body}\r\n0\r\n\r\n"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §7.1",
        violation="chunk-size",
    ),
    SmugglingCase(
        "chunk-data-bad-terminator",
        "two bytes other than CRLF after the chunk data (CVE-2025-43859)",
        _post(b"Transfer-Encoding: chunked", body=b"5\r\n{body}XX0\r\n\r\n"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §7.1",
        violation="chunk-terminator",
    ),
    SmugglingCase(
        "chunk-data-longer-than-size",
        "chunk data longer than its size smuggles a request",
        _post(b"Transfer-Encoding: chunked", body=b"1\r\n{body}\r\n0\r\n\r\n"),
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §7.1",
        violation="chunk-terminator",
    ),
    *(
        SmugglingCase(
            f"trailer-{name}",
            f"a {name} field in the trailer section must never be merged",
            _post(b"Transfer-Encoding: chunked", body=b"5\r\n{body}\r\n0\r\n" + field + b"\r\n\r\n"),
            400, must_close=True, reaches_backend=0, rfc="RFC 9110 §6.5.1",
            violation="trailer-forbidden", holes=frozenset({H11_ONLY}),
            source=f"{HTTP11PROBE} SMUG-TRAILER-{name.upper()}" if name in _HTTP11PROBE_TRAILERS else "",
        )
        for field, name in _FORBIDDEN_TRAILER_CASES.items()
    ),
    *_CORPUS_ROWS,
    *_SECOND_PASS_ROWS,
)
