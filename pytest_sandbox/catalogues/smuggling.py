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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

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

    @property
    def is_positive_control(self) -> bool:
        """A row that must succeed: a proxy that refuses it is broken, not safe."""
        statuses = (self.expected_status,) if isinstance(self.expected_status, int) else self.expected_status
        return all(200 <= status < 300 for status in statuses)

    def accepts_status(self, status: int) -> bool:
        if isinstance(self.expected_status, int):
            return status == self.expected_status
        return status in self.expected_status


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
}

_MALFORMED_CONTENT_LENGTHS = {
    b"+5": "plus-sign",
    b"-1": "negative",
    b"0x5": "hex",
    b"1_0": "underscore",
    b"": "empty",
    b"05": "leading-zero",  # h11 accepts leading zeros
    b"99999999999999999999": "overflow",
}


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
        violation="target-chars", literal_target=True,
        also_failed_by=(_ROUTED_NOT_FRAMED,),
    ),
    SmugglingCase(
        "target-backslash",
        "a backslash in the authority: urllib and WHATWG pick different hosts",
        b"GET http://{host}:80\\@{denied}/ HTTP/1.1\r\nHost: {host}\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 3986 §3.2",
        violation="target-chars", literal_target=True,
        also_failed_by=(_ROUTED_NOT_FRAMED,),
    ),
    SmugglingCase(
        "target-userinfo",
        "userinfo in the absolute-form target",
        b"GET http://{host}@{denied}/ HTTP/1.1\r\nHost: {host}\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9110 §4.2.4",
        violation="target-userinfo", literal_target=True,
        also_failed_by=(_ROUTED_NOT_FRAMED,),
    ),
    SmugglingCase(
        "target-control-character",
        "a TAB inside the request-target",
        b"GET http://{host}/a\tb HTTP/1.1\r\nHost: {host}\r\n\r\n",
        400, must_close=True, reaches_backend=0, rfc="RFC 9112 §3.2",
        violation="target-chars", literal_target=True,
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
        )
        for field, name in _FORBIDDEN_TRAILER_CASES.items()
    ),
)
