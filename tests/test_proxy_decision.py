"""The reference proxy's allow/deny decision (pytest_sandbox.network.proxy.decision): pure table tests.

Every branch of ``decide_destination`` in the order the proxy makes it (policy port, policy host,
literal or name, resolver failure or empty answer, each kind of answer, mixed answers, self
connection specific or wildcard), plus ``split_target`` and the framing/target refusals. The detail
strings are written out in full: they are the ``Decision.detail`` and the evidence text, and must not
drift. No sockets, no event loop.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from pytest_sandbox.http.framing import FramingViolation
from pytest_sandbox.network.addresses import (
    AddressVerdict,
    Authority,
    MalformedTarget,
    classify_address,
    parse_authority,
)
from pytest_sandbox.network.proxy.decision import (
    NeedsResolution,
    Refusal,
    ResolutionFailed,
    Route,
    Rules,
    decide_destination,
    refusal_for_framing,
    refusal_for_target,
    split_target,
)
from pytest_sandbox.network.proxy.self_connection import self_connection

PATTERNS = ("*.test", "11.0.0.10", "11.0.0.20", "2600:9000::10", "10.0.0.1", "169.254.169.254", "localhost")
LAB_LOCAL = {ip_address(a) for a in ("127.0.0.1", "11.0.0.10", "11.0.0.20", "::1")}


def _host_allowed(host: str) -> bool:
    return any(fnmatch.fnmatchcase(host, pattern) for pattern in PATTERNS)


def _local(address: IPv4Address | IPv6Address) -> bool:
    return address in LAB_LOCAL


def _rules(listening: Sequence[tuple[str, int]] = ()) -> Rules:
    listening_ports = {port for _address, port in listening}

    def looped(address: str, port: int) -> str | None:
        if port not in listening_ports:
            return None
        return self_connection(address, port, set(listening), _local)

    return Rules(frozenset({80, 443, 8080}), _host_allowed, classify_address, looped)


PLAIN = _rules()
SPECIFIC = _rules([("11.0.0.20", 8080)])  # a proxy listening on one lab public address
WILDCARD = _rules([("0.0.0.0", 8080)])  # a proxy listening on every local address
RULES = {"plain": PLAIN, "specific": SPECIFIC, "wildcard": WILDCARD}

PRIVATE = "10.0.0.1 is 10.0.0.0/8 Private-Use (RFC 1918)"
METADATA = "169.254.169.254 is 169.254.0.0/16 Link Local (RFC 3927)"
LOOPBACK = "127.0.0.1 is 127.0.0.0/8 Loopback (RFC 1122 §3.2.1.3)"

# (id, authority, answers, rules, expected): expected is a Route's addresses, NeedsResolution's host, or
# (status, reason, detail, addresses) of the Refusal.
ROWS: list[tuple[str, str, Sequence[str] | ResolutionFailed | None, str, object]] = [
    # 1. the port policy comes first, for names and literals alike
    ("port-denied-name", "api.test:22", None, "plain",
     (403, "policy_denied", "port 22 of api.test not permitted by policy", ())),
    ("port-denied-literal", "10.0.0.1:25", None, "plain",
     (403, "policy_denied", "port 25 of 10.0.0.1 not permitted by policy", ())),
    ("port-denied-before-host", "evil.example:22", None, "plain",
     (403, "policy_denied", "port 22 of evil.example not permitted by policy", ())),
    # 2. then the host allowlist (on the canonical lowercase host)
    ("host-denied-name", "evil.example:80", None, "plain",
     (403, "policy_denied", "host evil.example not permitted by policy", ())),
    ("host-denied-literal", "11.0.0.99:80", None, "plain",
     (403, "policy_denied", "host 11.0.0.99 not permitted by policy", ())),
    ("host-denied-even-with-answers", "evil.example:80", ["11.0.0.10"], "plain",
     (403, "policy_denied", "host evil.example not permitted by policy", ())),
    # 3. a name is resolved (once) only after the policy admitted it; a literal never is
    ("name-needs-resolution", "api.test:80", None, "plain", NeedsResolution("api.test")),
    ("literal-public", "11.0.0.10:80", None, "plain", ("11.0.0.10",)),
    ("literal-v6-public", "[2600:9000::10]:443", None, "plain", ("2600:9000::10",)),
    ("literal-private", "10.0.0.1:80", None, "plain", (403, "ssrf_denied", f"10.0.0.1:80 blocked: {PRIVATE}",
                                                       ("10.0.0.1",))),
    ("literal-metadata", "169.254.169.254:80", None, "plain",
     (403, "ssrf_denied", f"169.254.169.254:80 blocked: {METADATA}", ("169.254.169.254",))),
    ("literal-ignores-answers", "11.0.0.10:80", ["10.0.0.1"], "plain", ("11.0.0.10",)),
    ("literal-ignores-resolver-failure", "11.0.0.10:80", ResolutionFailed("OSError: boom"), "plain",
     ("11.0.0.10",)),
    # 4. the resolver failed or said nothing: 502, the resolver's words kept verbatim
    ("resolver-failed", "api.test:80", ResolutionFailed("TimeoutError: "), "plain",
     (502, "resolution_failed", "api.test:80: resolving failed: TimeoutError: ", ())),
    ("resolver-failed-gaierror", "api.test:443", ResolutionFailed("gaierror: [Errno -2] Name or service not known"),
     "plain", (502, "resolution_failed", "api.test:443: resolving failed: gaierror: [Errno -2] Name or service "
               "not known", ())),
    ("resolver-empty", "api.test:80", [], "plain",
     (502, "resolution_failed", "api.test:80: the resolver returned no address", ())),
    # 5. every answer is classified, in order; one bad answer denies the request
    ("one-public", "api.test:80", ["11.0.0.10"], "plain", ("11.0.0.10",)),
    ("two-public-order-kept", "api.test:80", ["2600:9000::10", "11.0.0.10"], "plain",
     ("2600:9000::10", "11.0.0.10")),
    ("canonical-form-dialled", "api.test:80", ["2600:9000:0:0:0:0:0:10", "::FFFF:11.0.0.10"], "plain",
     ("2600:9000::10", "::ffff:b00:a")),
    ("one-private", "api.test:80", ["10.0.0.1"], "plain",
     (403, "ssrf_denied", f"api.test:80 blocked: {PRIVATE}", ("10.0.0.1",))),
    ("one-loopback", "api.test:80", ["127.0.0.1"], "plain",
     (403, "ssrf_denied", f"api.test:80 blocked: {LOOPBACK}", ("127.0.0.1",))),
    ("mapped-loopback", "api.test:80", ["::ffff:127.0.0.1"], "plain",
     (403, "ssrf_denied", "api.test:80 blocked: ::ffff:127.0.0.1 is IPv4-mapped ::ffff:0:0/96 embeds 127.0.0.1 -> "
      "127.0.0.0/8 Loopback (RFC 1122 §3.2.1.3)", ("::ffff:127.0.0.1",))),
    ("mixed-first-special", "api.test:80", ["10.0.0.1", "11.0.0.10"], "plain",
     (403, "ssrf_denied", f"api.test:80 blocked: {PRIVATE}", ("10.0.0.1", "11.0.0.10"))),
    ("mixed-last-special", "api.test:80", ["11.0.0.10", "2600:9000::10", "169.254.169.254"], "plain",
     (403, "ssrf_denied", f"api.test:80 blocked: {METADATA}", ("11.0.0.10", "2600:9000::10", "169.254.169.254"))),
    ("answer-not-a-literal", "api.test:80", ["evil.example"], "plain",
     (403, "ssrf_denied", "api.test:80 blocked: resolver answer 'evil.example' is not an address literal",
      ("evil.example",))),
    ("answer-not-canonical-ipv4", "api.test:80", ["11.0.0.10", "127.1"], "plain",
     (403, "ssrf_denied", "api.test:80 blocked: resolver answer '127.1' is not an address literal",
      ("11.0.0.10", "127.1"))),
    # 5b. an answer that is this proxy itself (it listens on the port asked for)
    ("self-specific", "api.test:8080", ["11.0.0.20"], "specific",
     (403, "ssrf_denied", "api.test:8080 blocked: self connection: 11.0.0.20:8080 is this proxy's listening "
      "address 11.0.0.20:8080", ("11.0.0.20",))),
    ("self-specific-mapped", "api.test:8080", ["::ffff:11.0.0.20"], "specific",
     (403, "ssrf_denied", "api.test:8080 blocked: self connection: [::ffff:b00:14]:8080 is this proxy's "
      "listening address 11.0.0.20:8080 (it reaches 11.0.0.20)", ("::ffff:11.0.0.20",))),
    ("self-specific-literal", "11.0.0.20:8080", None, "specific",
     (403, "ssrf_denied", "11.0.0.20:8080 blocked: self connection: 11.0.0.20:8080 is this proxy's "
      "listening address 11.0.0.20:8080", ("11.0.0.20",))),
    ("self-specific-other-port", "api.test:80", ["11.0.0.20"], "specific", ("11.0.0.20",)),
    ("self-specific-other-address", "api.test:8080", ["11.0.0.10"], "specific", ("11.0.0.10",)),
    ("self-wildcard-local", "api.test:8080", ["11.0.0.10"], "wildcard",
     (403, "ssrf_denied", "api.test:8080 blocked: self connection: 11.0.0.10:8080 is this proxy: 11.0.0.10 is an "
      "address of its network namespace and the proxy listens on 0.0.0.0:8080, every local address",
      ("11.0.0.10",))),
    ("self-wildcard-mixed-last", "api.test:8080", ["2600:9000::10", "11.0.0.20"], "wildcard",
     (403, "ssrf_denied", "api.test:8080 blocked: self connection: 11.0.0.20:8080 is this proxy: 11.0.0.20 is an "
      "address of its network namespace and the proxy listens on 0.0.0.0:8080, every local address",
      ("2600:9000::10", "11.0.0.20"))),
    ("self-wildcard-not-local", "api.test:8080", ["11.0.0.99"], "wildcard", ("11.0.0.99",)),
    ("self-wildcard-other-port", "api.test:80", ["11.0.0.10"], "wildcard", ("11.0.0.10",)),
]


def _expected(expected: object) -> object:
    if isinstance(expected, NeedsResolution):
        return expected
    if isinstance(expected, tuple) and expected and isinstance(expected[0], int):
        status, reason, detail, addresses = expected
        return Refusal(status, reason, detail, addresses)
    assert isinstance(expected, tuple)
    return Route(expected)


@pytest.mark.parametrize(("authority", "answers", "rules", "expected"), [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_decide_destination(authority: str, answers: Sequence[str] | ResolutionFailed | None, rules: str,
                            expected: object) -> None:
    assert decide_destination(parse_authority(authority), answers, RULES[rules]) == _expected(expected)


def test_the_table_covers_every_kind_of_result() -> None:
    kinds = {type(_expected(row[4])).__name__ for row in ROWS}
    reasons = {row[4][1] for row in ROWS if isinstance(row[4], tuple) and isinstance(row[4][0], int)}
    assert kinds == {"Route", "Refusal", "NeedsResolution"}
    assert reasons == {"policy_denied", "ssrf_denied", "resolution_failed"}


class _Recording:
    """Rules callables that write down what they were asked, to check the order of the checks."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def host_allowed(self, host: str) -> bool:
        self.asked.append(f"host {host}")
        return _host_allowed(host)

    def classify(self, address: str) -> AddressVerdict:
        self.asked.append(f"classify {address}")
        return classify_address(address)

    def self_connection(self, address: str, port: int) -> str | None:
        self.asked.append(f"self {address} {port}")
        return None

    def rules(self) -> Rules:
        return Rules(frozenset({80}), self.host_allowed, self.classify, self.self_connection)


def test_a_refused_port_is_decided_before_anything_else_is_asked() -> None:
    recording = _Recording()
    decide_destination(parse_authority("api.test:22"), ["11.0.0.10"], recording.rules())
    assert recording.asked == []


def test_a_refused_host_is_never_resolved_or_classified() -> None:
    recording = _Recording()
    assert isinstance(decide_destination(parse_authority("evil.example:80"), None, recording.rules()), Refusal)
    assert recording.asked == ["host evil.example"]


def test_answers_are_classified_in_order_and_the_first_bad_one_stops_the_check() -> None:
    recording = _Recording()
    decided = decide_destination(parse_authority("api.test:80"), ["11.0.0.10", "10.0.0.1", "11.0.0.20"],
                                 recording.rules())
    assert isinstance(decided, Refusal) and decided.reason == "ssrf_denied"
    assert recording.asked == ["host api.test", "classify 11.0.0.10", "self 11.0.0.10 80", "classify 10.0.0.1"]


def test_the_self_check_is_asked_with_the_canonical_address() -> None:
    recording = _Recording()
    decide_destination(parse_authority("api.test:80"), ["::FFFF:11.0.0.10"], recording.rules())
    assert "self ::ffff:b00:a 80" in recording.asked


def test_a_weakened_classifier_is_what_decides() -> None:
    """The classifier is an injection point (weakened proxies): the decision trusts it and nothing else."""
    def admits_everything(address: str) -> AddressVerdict:
        return AddressVerdict(str(ip_address(address)), False, "public", None)

    weakened = Rules(frozenset({80}), _host_allowed, admits_everything, lambda _address, _port: None)
    assert decide_destination(parse_authority("api.test:80"), ["10.0.0.1"], weakened) == Route(("10.0.0.1",))
    assert isinstance(decide_destination(parse_authority("api.test:80"), ["10.0.0.1"], PLAIN), Refusal)


# --- split_target ---------------------------------------------------------------------------------

SPLITS = [
    ("CONNECT", "api.test:443", ("api.test", 443, ""), None),
    ("CONNECT", "[2600:9000::10]:443", ("2600:9000::10", 443, ""), None),
    ("CONNECT", "API.Test:443", ("api.test", 443, ""), None),
    ("GET", "http://api.test/", ("api.test", 80, "/"), None),
    ("GET", "http://api.test", ("api.test", 80, "/"), None),
    ("POST", "http://api.test:8080/v1/x?q=1", ("api.test", 8080, "/v1/x?q=1"), None),
    ("GET", "http://11.0.0.10/", ("11.0.0.10", 80, "/"), None),
    ("CONNECT", "api.test", None, "malformed_target"),
    ("CONNECT", "user@api.test:443", None, "malformed_target"),
    ("CONNECT", "127.1:443", None, "malformed_target"),
    ("GET", "/relative", None, "malformed_target"),
    ("GET", "http://api.test/#frag", None, "malformed_target"),
    ("GET", "https://api.test/", None, "https_absolute_form"),
]


@pytest.mark.parametrize(("method", "target", "expected", "reason"), SPLITS,
                         ids=[f"{m}-{t}" for m, t, _e, _r in SPLITS])
def test_split_target(method: str, target: str, expected: tuple[str, int, str] | None, reason: str | None) -> None:
    split = split_target(method, target)
    if expected is None:
        assert isinstance(split, Refusal)
        assert (split.status, split.reason, split.action) == (400, reason, "deny")
    else:
        assert not isinstance(split, Refusal)
        authority, path = split
        assert (authority.host, authority.port, path) == expected


def test_split_target_refusal_detail_is_the_parser_sentence_and_code() -> None:
    split = split_target("GET", "https://api.test/")
    try:
        parse_authority("user@api.test:443")
    except MalformedTarget as error:
        assert refusal_for_target(error).detail == f"{error} ({error.reason})"
    assert isinstance(split, Refusal) and split.detail.endswith(" (https_absolute_form)")


def test_split_target_on_a_literal_keeps_its_address() -> None:
    split = split_target("GET", "http://[2600:9000::10]:8080/x")
    assert not isinstance(split, Refusal)
    assert split[0] == Authority("2600:9000::10", 8080, IPv6Address("2600:9000::10")) and split[1] == "/x"


# --- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("violation", "expected"), [
    (FramingViolation("head-too-large", "request head exceeds 8192 bytes", 431),
     Refusal(431, "header_too_large", "request head exceeds 8192 bytes")),
    (FramingViolation("cl-te", "both Content-Length and Transfer-Encoding"),
     Refusal(400, "framing:cl-te", "both Content-Length and Transfer-Encoding")),
    (FramingViolation("te-unsupported", "transfer coding gzip", 501),
     Refusal(501, "framing:te-unsupported", "transfer coding gzip")),
], ids=["head-too-large", "cl-te", "te-501"])
def test_refusal_for_framing(violation: FramingViolation, expected: Refusal) -> None:
    assert refusal_for_framing(violation) == expected


@pytest.mark.parametrize(("status", "action"), [(400, "deny"), (403, "deny"), (413, "deny"), (431, "deny"),
                                                (501, "deny"), (502, "error"), (504, "error")])
def test_refusal_action(status: int, action: str) -> None:
    assert Refusal(status, "x", "y").action == action
