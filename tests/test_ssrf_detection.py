"""Detection proof for the SSRF suite: a proxy weakened on purpose fails exactly the cases it opens.

Each weakening is a custom ``classify`` handed to ProxyConfig; the weakened proxy runs in the same
lab as the reference one. The suite must flag precisely the cases the hole lets through and keep
passing the rest, so its verdicts name holes rather than noise. The late dialer
(``tests/late_dial_proxy.py``) refuses exactly like the reference proxy and dials afterwards: the
campaign must still fail exactly the cases it leaked and blame no positive control, and a dial no
verdict waited for must fail the session audit.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broken_proxies.backslash_whatwg import BackslashWhatwgProxy
from broken_proxies.embedding_missed import MISSED_EMBEDDING, classify_missing_nat64
from broken_proxies.ip_encoding_inet_aton import InetAtonProxy
from broken_proxies.ipv6_embeddings import (
    IPV4_COMPATIBLE,
    IPV4_MAPPED,
    NAT64_LOCAL_USE,
    SHORT_LIST,
    SIIT,
    SIXTOFOUR,
    TEREDO,
    classify_mapped_short_list,
    classify_teredo_without_xor,
    classify_unknown_wrapper,
    classify_wrappers_by_content,
)
from broken_proxies.last_at_judge import LastAtJudgeProxy
from broken_proxies.lenient_port import LenientPortProxy
from broken_proxies.method_keyed import MethodKeyedProxy, VersionKeyedProxy
from broken_proxies.names_unchecked import NamesUncheckedProxy
from broken_proxies.origin_form_unchecked import OriginFormUncheckedProxy
from broken_proxies.other_schemes import OtherSchemeProxy
from broken_proxies.row_missing import MISSING_ROW, classify_without_unique_local
from broken_proxies.scheme_case import SchemeCaseProxy
from broken_proxies.unicode_late_normalised import LateNormalisingProxy
from broken_proxies.weak_ssrf import WeakProxy, start_weak_proxy
from late_dial_proxy import DELAY_SECONDS, LateDialer
from ssrf_selection import catalogue_selection, failed_params

from pytest_sandbox.catalogues.ssrf_cases import FAMILIES, SSRF_CASES, SsrfCase
from pytest_sandbox.fixtures.network import start_lab
from pytest_sandbox.http.framing import FramingViolation, check_request_head
from pytest_sandbox.http.responses import parse_head
from pytest_sandbox.network.addresses import AddressVerdict, classify_address, embedded_ipv4, parse_authority
from pytest_sandbox.network.harness import RunningProxy, lab_proxy_config, start_proxy
from pytest_sandbox.network.lab.lab import LAB_PUBLIC_ORIGINS, NetworkLab
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.network.proxy.decision import Refusal, split_target
from pytest_sandbox.policy.load import baseline_policy
from pytest_sandbox.probes.allowlist import allowlist_probes, allowlist_rounds, arrival_owners
from pytest_sandbox.probes.allowlist_campaign import run_allowlist_campaign
from pytest_sandbox.probes.campaign import GRACE_SECONDS, audit_lab
from pytest_sandbox.probes.ssrf import ALL_FORMS, Attempt, build_attempts
from pytest_sandbox.probes.ssrf_exchanges import UNMARKED_SUFFIX, AttemptExchange, run_attempt, run_ssrf_campaign
from pytest_sandbox.session import WATCH_AFTER_DEFAULT_SECONDS
from pytest_sandbox.verdicts.allowlist import AllowlistProbe, judge_allowlist_probe
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.ssrf import ProxyReply, endpoint_text, judge_attempt

ATTEMPTS = build_attempts()
EVERY_FORM = build_attempts(forms=ALL_FORMS)
CGNAT = ipaddress.ip_network("100.64.0.0/10")


def classify_without_cgnat(address: str) -> AddressVerdict:
    """A classifier whose table lacks 100.64.0.0/10 (RFC 6598 shared address space)."""
    if ipaddress.ip_address(address) in CGNAT:
        return AddressVerdict(address, False, "public (weakened: no 100.64.0.0/10 row)", None)
    return classify_address(address)


def classify_without_unwrapping_mapped(address: str) -> AddressVerdict:
    """A classifier that judges ::ffff:a.b.c.d as an IPv6 address and never looks inside it."""
    parsed = ipaddress.ip_address(address)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return AddressVerdict(address, False, "public (weakened: IPv4-mapped not unwrapped)", None)
    return classify_address(address)


def _literal_of(case: SsrfCase) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return parse_authority(case.authority, default_port=80).ip  # url-confusion cases carry no port
    except ValueError:
        return None


def _failing_ids(running: RunningProxy, attempts: tuple[Attempt, ...] = ATTEMPTS) -> set[str]:
    verdicts = run_ssrf_campaign(running.lab, running.connect, [AttemptExchange(a) for a in attempts])
    return {test_id for test_id, verdict in verdicts.items() if not verdict.judgement.passed}


def _unexpected(failing: dict[str, Judgement], expected: set[str]) -> dict[str, str]:
    """What a mismatch says: each unexpected failure's verdict and reason, each expected one that passed."""
    found = {test_id: f"{judgement.verdict.name}: {judgement.reason}" for test_id, judgement in failing.items()
             if test_id not in expected}
    return found | {test_id: "passed, expected to fail" for test_id in expected - set(failing)}


def _failures_in_every_form(running: RunningProxy) -> dict[str, Judgement]:
    """Every attempt in every request form against ``running`` (stopped afterwards): the failed judgements."""
    try:
        verdicts = run_ssrf_campaign(running.lab, running.connect, [AttemptExchange(a) for a in EVERY_FORM])
    finally:
        running.stop()
    return {test_id: v.judgement for test_id, v in verdicts.items() if not v.judgement.passed}


@pytest.fixture
def weakened_proxy(request: pytest.FixtureRequest, _network_lab) -> Iterator[RunningProxy]:
    classify, port = request.param
    running = start_proxy(_network_lab, lab_proxy_config(classify=classify), port=port)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("weakened_proxy", [(classify_without_cgnat, 3129)], indirect=True)
def test_proxy_missing_the_cgnat_range_fails_exactly_the_cgnat_cases(weakened_proxy):
    expected = {f"{form}-{case.case_id}" for case in SSRF_CASES for form in ("connect", "absolute")
                if form in case.forms and (ip := _literal_of(case)) is not None and ip in CGNAT}
    assert len(expected) >= 8  # first, inner, last of 100.64.0.0/10 and the Alibaba metadata address
    assert _failing_ids(weakened_proxy) == expected


@pytest.mark.parametrize("weakened_proxy", [(classify_without_unwrapping_mapped, 3130)], indirect=True)
def test_proxy_that_does_not_unwrap_ipv4_mapped_fails_exactly_the_mapped_cases(weakened_proxy):
    expected = {f"{form}-{case.case_id}" for case in SSRF_CASES for form in ("connect", "absolute")
                if form in case.forms
                and isinstance(ip := _literal_of(case), ipaddress.IPv6Address) and ip.ipv4_mapped is not None}
    assert {"connect-enc6-metadata-ipv4-mapped-hex", "absolute-enc6-loopback-ipv4-mapped-dotted"} <= expected
    assert _failing_ids(weakened_proxy) == expected


def test_reference_proxy_passes_every_case_in_every_form_in_the_same_lab(_network_lab):
    running = start_proxy(_network_lab, port=3131)
    try:
        assert _failing_ids(running, EVERY_FORM) == set()
    finally:
        running.stop()


# --- one weak proxy per corpus family: exactly that family's cases fail, each naming its hole -------

FORWARD_FORMS = ("connect", "absolute")
WEAK_PROXIES = [
    # (the mistake, its port, which attempts it must fail, the family those attempts come from)
    # It reads with h11, which lets a backslash through (the reference's strict framing refuses it,
    # RFC 3986 §2): the auth-backslash-at-public-* targets then go to urllib's host, the public origin,
    # and are answered 200 where a refusal is required. Named here, not hidden.
    pytest.param(LastAtJudgeProxy, 3132,
                 lambda a: a.case.family == "url-confusion"
                 or (a.case.case_id.startswith("auth-backslash-at-public-") and a.form == "absolute"),
                 "url-confusion", id="last-at-judge"),
    pytest.param(SchemeCaseProxy, 3133, lambda a: a.case.family == "scheme-case", "scheme-case", id="scheme-case"),
    # Its check lives in its http:// path: every https://, ws://, wss://, ftp://, sftp://, ldap://, gopher:// and
    # dict:// case reaches its canary (absolute-form only; nothing else differs from the reference).
    pytest.param(OtherSchemeProxy, 3146, lambda a: a.case.family == "other-scheme", "other-scheme",
                 id="other-scheme"),
    # Every destination the reference denies (403) leaks through the unchecked transparent path; the
    # ones it refuses as malformed are refused by the Host canonicaliser first, as in the reference.
    pytest.param(OriginFormUncheckedProxy, 3134, lambda a: a.form == "origin" and a.case.expected == "denied",
                 "origin-form", id="origin-form-unchecked"),
    # Names reach the resolver only in the forward forms: the others are refused before any lookup.
    # The request-line family requests a name too (localhost, on every swept request line): the same hole.
    pytest.param(NamesUncheckedProxy, 3135,
                 lambda a: a.case.kind == "name" and a.case.family in ("dns-name", "request-line")
                 and a.form in FORWARD_FORMS,
                 "dns-name", id="names-unchecked"),
]


@pytest.mark.parametrize(("proxy_class", "port", "opened", "family"), WEAK_PROXIES)
def test_weak_proxy_fails_exactly_its_familys_cases_and_each_failure_names_the_hole(
        _network_lab, proxy_class: type[WeakProxy], port: int, opened, family: str):
    expected = {a.test_id for a in EVERY_FORM if opened(a)}
    assert len(expected) >= 4, family
    running = start_weak_proxy(_network_lab, proxy_class, port)
    failing = _failures_in_every_form(running)
    assert set(failing) == expected, _unexpected(failing, expected)
    by_id = {a.test_id: a for a in EVERY_FORM}
    for test_id, judgement in failing.items():
        attempt = by_id[test_id]
        assert judgement.verdict is Verdict.ALLOWED, (test_id, judgement)
        if attempt.case.case_id.startswith("auth-backslash-at-public-"):  # forwarded to the public origin
            assert judgement.reason.startswith("proxy answered 200: it let the request through"), judgement
            continue
        # The message names what was sent, in which form, and the canary it reached (or the dial).
        assert repr(attempt.target) in judgement.reason or "tried to dial" in judgement.reason, judgement
        if attempt.case.canary is not None:
            reached = f"canary {endpoint_text(attempt.case.canary, attempt.case.port)}"
            assert reached in judgement.reason or "tried to dial" in judgement.reason, judgement


# --- the remaining families: one mistake each, the exact set it fails ------------------------------
# Where a family's cases cannot all be failed by one mistake, the predicate says which of them it opens,
# and the comment says why the others stay refused (they overlap another family's check, or no reader
# lets them reach a decision).


def _in_network(case: SsrfCase, network) -> bool:
    ip = _literal_of(case)
    return ip is not None and ip.version == network.version and ip in network


def _classifier_proxy(classify):
    def start(lab: NetworkLab, port: int) -> RunningProxy:
        return start_proxy(lab, lab_proxy_config(classify=classify), port=port)
    return start


def _weak(proxy_class: type[WeakProxy]):
    return lambda lab, port: start_weak_proxy(lab, proxy_class, port)


FAMILY_PROXIES = [
    # The classifier knows dotted-decimal only; getaddrinfo dials every inet_aton form. The family's
    # other cases (NUL, space, TAB, '%', '..', 'o177', and the denied 127.127.127.127 and trailing dot)
    # are refused for reasons inet_aton shares or are canonical: exactly the inet_aton forms fail.
    pytest.param(_weak(InetAtonProxy), 3137, "ip-encoding",
                 lambda a: a.case.family == "ip-encoding" and "inet_aton" in a.case.note, id="ip-encoding-inet-aton"),
    # Classified before NFKC/IDNA, dialled after: every unicode case, in the two forward forms.
    pytest.param(_weak(LateNormalisingProxy), 3138, "unicode", lambda a: a.case.family == "unicode",
                 id="unicode-late-normalised"),
    # A strtoul-style port read into 16 bits: every all-digit port it misreads (65536 -> 0, 65616 -> 80,
    # leading zeros, 0) reaches its host. A port with anything but ASCII digits never gets this far: the
    # strict framing this proxy keeps refuses it first (RFC 3986 §3.2.3, port = *DIGIT).
    pytest.param(_weak(LenientPortProxy), 3139, "port",
                 lambda a: a.case.family == "port" and a.case.raw_authority is not None
                 and a.case.raw_authority.partition(":")[2].isascii()
                 and a.case.raw_authority.partition(":")[2].isdigit(),
                 id="port-strtoul"),
    # urllib's host judged, WHATWG's dialled: only where the two differ and the judged one is public
    # (the auth-backslash-at-public-* cases); every other userinfo/backslash case names a special host
    # to urllib too, so the check itself refuses it. Only absolute-form has a URL to read two ways.
    pytest.param(_weak(BackslashWhatwgProxy), 3140, "userinfo-backslash",
                 lambda a: a.case.case_id.startswith("auth-backslash-at-public-") and a.form == "absolute",
                 id="backslash-whatwg"),
    # NAT64 not unwrapped (64:ff9b::/96 judged global): the family's NAT64 cases and, necessarily, the
    # special-use-range cases of the 64:ff9b::/96 row itself (first, inner, last): the same mistake.
    pytest.param(_classifier_proxy(classify_missing_nat64), 3141, "ipv6-form",
                 lambda a: _in_network(a.case, MISSED_EMBEDDING), id="ipv6-form-nat64-missed"),
    # One row missing (fc00::/7): its range cases and the AWS IPv6 metadata address inside it.
    pytest.param(_classifier_proxy(classify_without_unique_local), 3142, "special-use-range",
                 lambda a: _in_network(a.case, MISSING_ROW), id="special-use-range-fc00-missing"),
    # Classified for GET, HEAD, CONNECT and OPTIONS only: the request-line family's POST, PUT, DELETE and PATCH
    # denials, and nothing else (every other case is sent with a method it classifies, the HTTP/1.0 ones too).
    pytest.param(_weak(MethodKeyedProxy), 3149, "request-line",
                 lambda a: a.case.family == "request-line" and a.case.method != "", id="method-keyed"),
    # Classified for HTTP/1.1 only: the request-line family's HTTP/1.0 denials, CONNECT and GET.
    pytest.param(_weak(VersionKeyedProxy), 3167, "request-line",
                 lambda a: a.case.family == "request-line" and a.case.http_version == "1.0", id="version-keyed"),
]


@pytest.mark.parametrize(("start", "port", "family", "opened"), FAMILY_PROXIES)
def test_each_family_has_a_weak_proxy_that_fails_exactly_the_cases_its_mistake_opens(
        _network_lab, start, port: int, family: str, opened):
    expected = {a.test_id for a in EVERY_FORM if a.form in FORWARD_FORMS and opened(a)}
    by_id = {a.test_id: a for a in EVERY_FORM}
    assert len(expected) >= 3 and any(by_id[i].case.family == family for i in expected), family
    running = start(_network_lab, port)
    failing = _failures_in_every_form(running)
    assert set(failing) == expected, _unexpected(failing, expected)
    for test_id, judgement in failing.items():
        attempt = by_id[test_id]
        assert judgement.verdict is Verdict.ALLOWED, (test_id, judgement)
        # The destination as sent, and the canary reached (any port: a mangled port is dialled as read).
        assert f"destination {attempt.target!r} reached canary " in judgement.reason, judgement
        assert attempt.case.canary is not None
        assert f"reached canary {endpoint_text(attempt.case.canary, 0)[:-1]}" in judgement.reason, judgement


# --- ipv6-form: one weak proxy per IPv4-carrying IPv6 form (network.md section 1.4) -------------------
# Each names the exact cases its mistake opens, computed from the mistake's definition, never from a run.

def _unknown_wrapper_opens(network: ipaddress.IPv6Network, *kept: str):
    # ``kept``: rows nested in the prefix that keep their own check (:: and ::1 inside ::/96).
    kept_rows = [ipaddress.ip_network(row) for row in kept]
    return lambda case: _in_network(case, network) and not any(_in_network(case, row) for row in kept_rows)


def _teredo_xor_opens(case: SsrfCase) -> bool:
    # ipaddress's ``teredo`` de-obfuscates the client (RFC 4380 §4); the weak proxy reads the raw bits.
    ip = _literal_of(case)
    if not (isinstance(ip, ipaddress.IPv6Address) and ip in TEREDO and ip.teredo is not None):
        return False
    server, client = ip.teredo
    raw_client = ipaddress.IPv4Address(~int(client) & 0xFFFF_FFFF)
    return not classify_address(server).denied and not classify_address(raw_client).denied


def _short_list_opens(case: SsrfCase) -> bool:
    ip = _literal_of(case)
    return (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None
            and not any(ip.ipv4_mapped in network for network in SHORT_LIST))


def _content_opens(case: SsrfCase) -> bool:
    # A wrapper the reference denies as a range although everything it carries is public (64:ff9b:1::/48
    # is denied outright, as a plain row: nothing is unwrapped there).
    ip = _literal_of(case)
    if not isinstance(ip, ipaddress.IPv6Address) or ip in IPV4_MAPPED or ip in NAT64_LOCAL_USE:
        return False
    carried = embedded_ipv4(ip)
    return (bool(carried) and classify_address(ip).denied and not any(classify_address(v4).denied for v4 in carried)
            and not _in_network(case, ipaddress.ip_network("::/127")))


EMBEDDING_PROXIES = [
    pytest.param(classify_unknown_wrapper(SIXTOFOUR), 3170, _unknown_wrapper_opens(SIXTOFOUR),
                 {"enc6-loopback-6to4", "enc6-metadata-6to4", "enc6-6to4-of-public-11.0.0.10"}, id="6to4-unknown"),
    pytest.param(classify_unknown_wrapper(IPV4_COMPATIBLE), 3171,
                 _unknown_wrapper_opens(IPV4_COMPATIBLE, "::/128", "::1/128"),
                 {"enc6-loopback-ipv4-compatible", "enc6-metadata-ipv4-compatible",
                  "enc6-ipv4-compatible-of-public-11.0.0.10"}, id="ipv4-compatible-unknown"),
    pytest.param(classify_unknown_wrapper(SIIT), 3172, _unknown_wrapper_opens(SIIT),
                 {"enc6-loopback-siit", "enc6-metadata-siit", "enc6-siit-of-public-11.0.0.10"}, id="siit-unknown"),
    pytest.param(classify_unknown_wrapper(NAT64_LOCAL_USE), 3173, _unknown_wrapper_opens(NAT64_LOCAL_USE),
                 {"enc6-metadata-nat64-local-use", "enc6-nat64-local-use-of-public-11.0.0.10"},
                 id="nat64-local-use-unknown"),
    # Only cases whose server is public and whose raw low 32 bits look public: the special clients (the
    # range rows' first, inner and last addresses carry server 0.0.0.0 or 255.255.255.255, and the public
    # client 11.0.0.10 reads raw as 244.255.255.245, inside 240.0.0.0/4, so the weak proxy denies it).
    pytest.param(classify_teredo_without_xor, 3174, _teredo_xor_opens,
                 {"enc6-loopback-teredo-client", "enc6-metadata-teredo-client"}, id="teredo-client-without-xor"),
    # Only the new per-row IPv4-mapped cases (and the mapped row's own inner and last) can see this one:
    # the hand-written mapped cases carry 127.0.0.1 and 169.254.169.254, which are on every short list.
    pytest.param(classify_mapped_short_list, 3175, _short_list_opens,
                 {"enc6-ipv4-mapped-test-net-1-192.0.2.1", "enc6-ipv4-mapped-reserved-240.0.0.1",
                  "enc6-ipv4-mapped-as112-192.31.196.1"}, id="ipv4-mapped-short-list"),
    pytest.param(classify_wrappers_by_content, 3176, _content_opens,
                 {"enc6-6to4-of-public-11.0.0.10", "enc6-nat64-of-public-11.0.0.10", "enc6-siit-of-public-11.0.0.10",
                  "enc6-ipv4-compatible-of-public-11.0.0.10", "enc6-teredo-client-of-public-11.0.0.10"},
                 id="wrappers-judged-by-content"),
]


@pytest.mark.parametrize(("classify", "port", "opens", "must_include"), EMBEDDING_PROXIES)
def test_each_ipv6_embedding_has_a_weak_proxy_that_fails_exactly_that_embeddings_cases(
        _network_lab, classify, port: int, opens, must_include: set[str]):
    by_id = {a.test_id: a for a in EVERY_FORM}
    # Only the forward forms reach the address check: the reference's request-target check refuses the
    # others (400) before any lookup, and these proxies keep it.
    expected = {a.test_id for a in EVERY_FORM if a.form in FORWARD_FORMS and opens(a.case)}
    assert {f"{form}-{case_id}" for case_id in must_include for form in FORWARD_FORMS} <= expected
    families = {by_id[test_id].case.family for test_id in expected}
    assert families <= {"ipv6-form", "special-use-range", "url-confusion"}, families
    running = _classifier_proxy(classify)(_network_lab, port)
    failing = _failures_in_every_form(running)
    assert set(failing) == expected, _unexpected(failing, expected)
    for test_id, judgement in failing.items():
        attempt = by_id[test_id]
        assert judgement.verdict is Verdict.ALLOWED, (test_id, judgement)
        if attempt.case.canary is None:  # multicast or broadcast: no TCP peer, the dial itself is the leak
            assert "tried to dial" in judgement.reason, judgement
            continue
        assert f"destination {attempt.target!r} reached canary {endpoint_text(attempt.case.canary, 80)}" \
            in judgement.reason, judgement


def test_the_catalogue_has_every_ipv4_row_as_ipv4_mapped_and_every_wrapper_carrying_a_public_ipv4():
    from pytest_sandbox.network.addresses import load_special_use_table

    mapped = {ip.ipv4_mapped for case in SSRF_CASES
              if isinstance(ip := _literal_of(case), ipaddress.IPv6Address) and ip.ipv4_mapped is not None}
    for row in load_special_use_table():
        if isinstance(row.network, ipaddress.IPv4Network):
            assert any(ip in row.network for ip in mapped), row
    wrappers = (IPV4_COMPATIBLE, SIIT, MISSED_EMBEDDING, NAT64_LOCAL_USE, SIXTOFOUR, TEREDO)
    for wrapper in wrappers:
        assert any(_in_network(case, wrapper) and case.case_id.endswith("-of-public-11.0.0.10")
                   for case in SSRF_CASES), wrapper


@pytest.mark.parametrize("wrapper", ["ipv4-mapped", "ipv4-compatible", "siit", "nat64", "6to4", "teredo-server",
                                     "teredo-client"])
def test_the_reference_classifier_denies_every_embedding_of_every_special_ipv4_row_and_names_it(wrapper):
    # The whole product (every wrapper x every IPv4 row) is judged here, without sockets; the conformance
    # catalogue carries the mapped product and a public IPv4 in each wrapper (its case budget is ~400).
    from pytest_sandbox.network.addresses import load_special_use_table

    for row in load_special_use_table():
        if not isinstance(row.network, ipaddress.IPv4Network):
            continue
        v4 = int(row.network.network_address) + (row.network.num_addresses > 1)
        address = {
            "ipv4-mapped": ipaddress.IPv6Address(0xFFFF << 32 | v4),
            "ipv4-compatible": ipaddress.IPv6Address(v4),
            "siit": ipaddress.IPv6Address(0xFFFF << 48 | v4),
            "nat64": ipaddress.IPv6Address(0x64FF9B << 96 | v4),
            "6to4": ipaddress.IPv6Address(0x2002 << 112 | v4 << 80),
            "teredo-server": ipaddress.IPv6Address(0x2001 << 112 | v4 << 64 | 0xF7F7F7F7),  # client 8.8.8.8
            "teredo-client": ipaddress.IPv6Address(0x2001 << 112 | 0x4136E378 << 64 | (~v4 & 0xFFFF_FFFF)),
        }[wrapper]
        verdict = classify_address(address)
        assert verdict.denied, (row, address)
        if int(address) > 1:  # :: and ::1 are rows of their own
            # The reason names the embedded IPv4 and the denial is attributed to the row it falls in.
            ipv4 = ipaddress.IPv4Address(v4)
            assert str(ipv4) in verdict.reason, (row, address, verdict)
            assert verdict.range is not None and ipv4 in ipaddress.ip_network(verdict.range), (row, address, verdict)


def test_every_family_has_a_weak_proxy():
    covered = {"url-confusion", "scheme-case", "other-scheme", "dns-name"} | {p.values[2] for p in FAMILY_PROXIES}
    assert covered == set(FAMILIES) - {"control"}


# --- the judge itself, without sockets ------------------------------------------------------

METADATA = next(a for a in ATTEMPTS if a.test_id == "connect-meta-imds-169.254.169.254")
CONTROL = next(a for a in ATTEMPTS if a.case.expected == "allowed" and a.form == "absolute")
REFUSAL = parse_head(b'HTTP/1.1 403 Forbidden\r\nconnection: close\r\n\r\n{"error":"ssrf_denied"}')


def test_refusal_with_closed_connection_and_no_canary_hit_is_blocked():
    judgement = judge_attempt(METADATA, ProxyReply(REFUSAL, None, closed=True, timed_out=False), {})
    assert judgement.verdict is Verdict.BLOCKED
    assert "ssrf_denied" in judgement.reason


def test_refusal_with_a_canary_hit_is_allowed():
    hits = {("169.254.169.254", 80): 1}
    judgement = judge_attempt(METADATA, ProxyReply(REFUSAL, None, closed=True, timed_out=False), hits)
    assert judgement.verdict is Verdict.ALLOWED


def test_silent_timeout_is_never_a_pass():
    silent = ProxyReply(parse_head(b""), None, closed=False, timed_out=True)
    assert judge_attempt(METADATA, silent, {}).verdict is Verdict.INDETERMINATE


def test_bad_gateway_means_the_proxy_tried_to_dial_and_is_allowed():
    dialled = ProxyReply(parse_head(b"HTTP/1.1 502 Bad Gateway\r\n\r\n"), None, closed=True, timed_out=False)
    assert judge_attempt(METADATA, dialled, {}).verdict is Verdict.ALLOWED


def test_refusal_that_leaves_the_connection_open_is_not_a_pass():
    held = ProxyReply(REFUSAL, None, closed=False, timed_out=True)
    assert judge_attempt(METADATA, held, {}).verdict is Verdict.INDETERMINATE


def test_control_refused_by_the_proxy_is_broken():
    judgement = judge_attempt(CONTROL, ProxyReply(REFUSAL, None, closed=True, timed_out=False), {})
    assert judgement.verdict is Verdict.BROKEN


def test_control_answered_by_its_canary_works():
    canary = CONTROL.case.canary
    assert canary is not None
    answer = parse_head(f"HTTP/1.1 200 OK\r\nX-Lab-Canary: {canary}\r\n\r\nok".encode())
    judgement = judge_attempt(CONTROL, ProxyReply(answer, None, closed=True, timed_out=False), {(canary, 80): 1})
    assert judgement.verdict is Verdict.WORKS


def test_control_answered_200_without_its_canary_counting_it_is_broken():
    canary = CONTROL.case.canary
    answer = parse_head(f"HTTP/1.1 200 OK\r\nX-Lab-Canary: {canary}\r\n\r\nok".encode())
    judgement = judge_attempt(CONTROL, ProxyReply(answer, None, closed=True, timed_out=False), {})
    assert judgement.verdict is Verdict.BROKEN


# --- the late dialer: refuses like the reference proxy, dials 200 ms later ------------------------

NETNS_OK, NETNS_REASON = host_can_create_netns()
# Denied cases on a few destinations (four of them on 169.254.169.254, in several spellings), some
# the reference refuses as malformed (400: no destination, so no late dial), each followed by a
# positive control, so a late hit lands in the control's window.
LATE_DENIED = ("connect-meta-imds-169.254.169.254", "absolute-meta-imds-169.254.169.254",
               "connect-enc-metadata-trailing-dot-169.254.169.254.", "connect-name-metadata-google-internal",
               "absolute-name-metadata-google-internal", "connect-enc6-metadata-ipv4-mapped-dotted",
               "connect-meta-aws-imds-ipv6-fd00:ec2::254", "connect-meta-alibaba-100.100.100.200",
               "connect-name-localhost", "absolute-enc-loopback-trailing-dot-127.0.0.1.",
               "connect-enc-metadata-hex-0xa9fea9fe", "connect-enc6-metadata-zone-id")
CONTROLS = [a for a in ATTEMPTS if a.case.expected == "allowed"][:len(LATE_DENIED)]
BY_ID = {a.test_id: a for a in ATTEMPTS}
CONTROL_IDS = {a.test_id for a in CONTROLS}
LATE_SUBSET = [attempt for pair in zip((BY_ID[i] for i in LATE_DENIED), CONTROLS, strict=True) for attempt in pair]


@dataclass
class RunningLateDialer:
    lab: NetworkLab
    inner: RunningProxy
    relay: LateDialer
    port: int

    def connect(self):
        return self.lab.connect("127.0.0.1", self.port)

    @property
    def as_proxy(self) -> RunningProxy:
        """A proxy handle on the relay (what a campaign that connects through ``.connect(timeout=...)`` takes)."""
        return RunningProxy(self.inner.proxy, self.lab, "127.0.0.1", self.port)

    def leaked_keys(self) -> set[str]:
        """The attempts whose requests the relay dialled late, by the nonce each request carried."""
        by_nonce = {w.nonce: w.key.split("/", 1)[1].split("#", 1)[0].removesuffix(UNMARKED_SUFFIX)
                    for w in self.lab.attempt_windows()}
        return {by_nonce[dial.nonce] for dial in self.relay.dialled if dial.nonce in by_nonce}


@pytest.fixture(scope="module")
def late_lab() -> Iterator[NetworkLab]:
    """A lab of its own: these tests leave hits unaccounted on purpose, for the audit to find."""
    if not NETNS_OK:
        pytest.skip(f"cannot create network namespaces: {NETNS_REASON}")
    lab = start_lab(name="late-dial-lab")
    yield lab
    lab.close()


@contextlib.contextmanager
def running_late_dialer(lab: NetworkLab, *, delay: float = DELAY_SECONDS, literals: bool = False,
                        slowdown: float = 0.0, once: frozenset[str] = frozenset()) -> Iterator[RunningLateDialer]:
    """The late dialer in this process (``literals``: it also dials refused literal CONNECTs), ``delay`` after
    each 403 (``slowdown`` more for a target's later dials; the targets in ``once`` dialled the first time only),
    in front of a reference proxy; the lab's hits reset first."""
    lab.reset_hits()
    inner = start_proxy(lab, port=3160)
    relay = LateDialer(lambda: lab.connect(inner.address, inner.port), lab.socket, lambda: inner.decisions,
                       delay=delay, dial_refused_literals=literals, slowdown=slowdown, once=once)
    relay.start_in_thread(lab.listen("127.0.0.1", 3161))
    try:
        yield RunningLateDialer(lab, inner, relay, 3161)
    finally:
        relay.stop()
        inner.stop()


@pytest.fixture
def late_dialer(late_lab: NetworkLab) -> Iterator[RunningLateDialer]:
    with running_late_dialer(late_lab) as running:
        yield running


def test_late_dialer_fails_exactly_the_cases_it_leaked_and_no_positive_control(late_dialer):
    # No bare twins (tests/test_bare_twins.py): the late dialer leaks them too, adding hits to a random sample.
    verdicts = run_ssrf_campaign(late_dialer.lab, late_dialer.connect, [AttemptExchange(a) for a in LATE_SUBSET],
                                 bare=())
    leaked = late_dialer.leaked_keys()
    failing = {test_id: v.judgement for test_id, v in verdicts.items() if not v.judgement.passed}
    # The relay dialled every case the reference refused with 403 after resolving it (not the 400s).
    assert {"connect-meta-imds-169.254.169.254", "absolute-name-metadata-google-internal",
            "connect-name-localhost"} <= leaked
    assert "connect-enc6-metadata-zone-id" not in leaked
    assert set(failing) == leaked, _blame_text(failing, leaked)
    assert all(judgement.verdict is Verdict.ALLOWED for judgement in failing.values())
    assert {v.test_id for v in verdicts.values() if v.category == "ssrf-controls"
            and v.judgement.verdict is Verdict.WORKS} == {a.test_id for a in CONTROLS}
    imds = failing["connect-meta-imds-169.254.169.254"]
    # Its own dial (no bytes: a CONNECT) and the one its rerun alone made, each about 0.2 s after; the same
    # again for its unmarked twin (an exchange of its own, judged with it).
    assert imds.reason == "destination '169.254.169.254:80' reached canary 169.254.169.254:80 x4"
    assert imds.observed.count("s after it ended, no bytes") == 4
    # Exact, not merely sound: no leaked case shares the blame for a hit with another case.
    assert [test_id for test_id, judgement in failing.items() if "together with" in judgement.observed] == []
    assert late_dialer.lab.unaccounted_hits() == []


def _blame_text(failing: dict[str, Judgement], leaked: set[str]) -> str:
    """What a blame assertion shows when it fails: the cases failed beyond the leaked ones, and every verdict."""
    lines = [f"failed but did not leak: {sorted(set(failing) - leaked)}; "
             f"leaked but passed: {sorted(leaked - set(failing))}"]
    lines += [f"{test_id}: {judgement.verdict.name} {judgement.reason} || {judgement.observed}"
              for test_id, judgement in sorted(failing.items())]
    return "\n".join(lines)


def test_a_dialer_whose_lateness_drifts_is_blamed_exactly_by_count_after_the_confirmation_reruns(late_lab):
    """Every dial of a target after its first comes 0.15 s later (what a loaded machine does to the relay's timer
    and the lab's threads): no phase-one hit matches its rerun's lateness, so the candidates whose reruns reached
    nothing are rerun again and the hits go, by count, to the cases that reproduced them, one each."""
    with running_late_dialer(late_lab, slowdown=0.15) as running:
        verdicts = run_ssrf_campaign(late_lab, running.connect, [AttemptExchange(a) for a in LATE_SUBSET],
                                     bare=())  # as above: no random sample of extra hits
        leaked = running.leaked_keys()
    failing = {test_id: v.judgement for test_id, v in verdicts.items() if not v.judgement.passed}
    assert set(failing) == leaked, _blame_text(failing, leaked)
    assert {"connect-meta-imds-169.254.169.254", "connect-name-metadata-google-internal"} <= leaked
    assert all(judgement.verdict is Verdict.ALLOWED for judgement in failing.values())
    assert {v.test_id for v in verdicts.values() if v.judgement.verdict is Verdict.WORKS} == CONTROL_IDS
    imds = failing["connect-meta-imds-169.254.169.254"]
    # Its dial and its rerun's, and the same two for its unmarked twin (an exchange of its own, judged with it).
    assert imds.reason == "destination '169.254.169.254:80' reached canary 169.254.169.254:80 x4", imds.observed
    by_count = [test_id for test_id, judgement in failing.items() if "put on it by count" in judgement.observed]
    assert by_count, _blame_text(failing, leaked)
    assert [test_id for test_id, judgement in failing.items() if "together with" in judgement.observed] == []
    assert late_lab.unaccounted_hits() == []


def test_a_case_that_leaked_once_and_never_on_its_reruns_still_fails_together_with_its_suspects(late_lab):
    """The trailing-dot CONNECT is dialled the first time only (a proxy that leaks sometimes). Its hit has no nonce,
    its reruns reach nothing and every case that reproduced a hit there explains one of its own, so no count is
    left to place it: it stays blamed on every case that can have caused it, and the leaker fails with them."""
    leaker = "connect-enc-metadata-trailing-dot-169.254.169.254."
    with running_late_dialer(late_lab, once=frozenset({BY_ID[leaker].target})) as running:
        verdicts = run_ssrf_campaign(late_lab, running.connect, [AttemptExchange(a) for a in LATE_SUBSET],
                                     bare=())  # as above: no random sample of extra hits
        leaked = running.leaked_keys()
    failing = {test_id: v.judgement for test_id, v in verdicts.items() if not v.judgement.passed}
    assert leaker in leaked and leaked <= set(failing), _blame_text(failing, leaked)
    assert failing[leaker].verdict is Verdict.ALLOWED and "together with" in failing[leaker].observed
    for test_id in set(failing) - leaked:  # blamed with it: said so, and only cases that could reach that canary
        assert "169.254.169.254" in BY_ID[test_id].case.canary and "together with" in failing[test_id].observed
    assert {v.test_id for v in verdicts.values() if v.judgement.verdict is Verdict.WORKS} == CONTROL_IDS
    assert late_lab.unaccounted_hits() == []


def test_late_dial_after_an_immediate_verdict_is_named_by_the_session_audit(late_dialer):
    attempt = BY_ID["connect-meta-imds-169.254.169.254"]
    judgement = run_attempt(attempt, late_dialer.connect, late_dialer.lab)  # grace 0: judged at once
    assert judgement.verdict is Verdict.BLOCKED  # the dial has not happened yet...
    problem = audit_lab(late_dialer.lab)  # ...but the audit waits one grace period and finds it
    assert problem is not None
    assert "169.254.169.254:80" in problem and "connect-meta-imds-169.254.169.254" in problem
    assert "no verdict accounted for them" in problem


def test_late_dial_is_blamed_on_its_own_case_when_the_grace_period_is_waited(late_dialer):
    attempt = BY_ID["connect-meta-imds-169.254.169.254"]
    judgement = run_attempt(attempt, late_dialer.connect, late_dialer.lab, grace=GRACE_SECONDS)
    assert judgement.verdict is Verdict.ALLOWED
    control = run_attempt(CONTROLS[0], late_dialer.connect, late_dialer.lab, grace=GRACE_SECONDS)
    assert control.verdict is Verdict.WORKS
    assert audit_lab(late_dialer.lab, grace=0) is None


def test_the_reference_proxy_leaves_nothing_for_the_audit(late_lab):
    late_lab.reset_hits()
    running = start_proxy(late_lab, port=3162)
    try:
        started = time.monotonic()
        verdicts = run_ssrf_campaign(late_lab, running.connect, [AttemptExchange(a) for a in LATE_SUBSET])
    finally:
        running.stop()
    assert all(v.judgement.passed for v in verdicts.values())
    assert time.monotonic() - started < 5 * GRACE_SECONDS  # no isolation reruns for a proxy that never leaks
    assert audit_lab(late_lab) is None


# --- end to end: the session audit and a late dialer behind --sandbox-proxy-cmd ---------------------

ROOT = Path(__file__).resolve().parent.parent
LEAKING_TEST = '''
import pytest

@pytest.mark.parametrize("address", ["169.254.169.254", "10.0.0.1"])
def test_dials_behind_every_verdicts_back(_network_lab, address):
    with _network_lab.dial(address, 80) as sock:
        sock.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
'''


def _pytest(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_hit_no_verdict_accounted_for_fails_the_session_and_names_its_destination(tmp_path, workers):
    leaking = tmp_path / "test_leaking.py"
    leaking.write_text(LEAKING_TEST)
    result = _pytest(*workers, str(leaking))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "2 passed" in output and "error" in output, output
    assert "no verdict accounted for them" in output, output
    assert "169.254.169.254:80" in output and "10.0.0.1:80" in output, output


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_conformance_run_against_the_late_dialer_fails_exactly_its_leaks_and_no_control():
    command = f"{sys.executable} {ROOT / 'tests' / 'late_dial_proxy.py'} {{port}}"
    result = _pytest("--sandbox", "--sandbox-proxy-cmd", command, "-p", "no:randomly", "-rf",
                     str(ROOT / "conformance" / "test_ssrf.py"),
                     "-k", catalogue_selection("meta-imds-169 or ctl-v4-private-10-above"))
    output = result.stdout + result.stderr
    # meta-imds in origin, authority and asterisk form: refused (400) before any dial, like the reference
    assert "2 failed, 5 passed" in output, output
    failed = failed_params(output)
    assert failed == {"connect-meta-imds-169.254.169.254", "absolute-meta-imds-169.254.169.254"}, output
    assert "reached canary 169.254.169.254:80" in output and "s after it ended, no bytes" in output, output
    assert "no verdict accounted for them" not in output, output  # every late hit was judged, none left over


def _failed_and_audited(output: str) -> tuple[set[str], set[str]]:
    """The failed allowlist test ids, and the refused probes whose endpoint the session-end audit named."""
    failed = failed_params(output)
    audit = output.partition("no verdict accounted for them")[2]
    audited = {probe for probe in REFUSED_PROBES if f"11.0.0.10:{probe.rsplit('-', 1)[1]} (" in audit}
    return failed, audited


REFUSED_PROBES = frozenset(f"connect-11.0.0.10-{port}" for port in (22, 25, 3306, 8080, 8443))


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_allowlist_run_against_the_late_dialer_fails_exactly_the_refused_ports():
    """The allowlist category against a proxy that refuses like the reference and dials 0.2 s after the
    client closed: each refused port fails, as its own test (the round's grace period outlasts the late dial)
    or, on a machine so loaded that the dial came later than the whole campaign, through the session-end audit,
    which names it; every admitted destination still passes."""
    command = f"{sys.executable} {ROOT / 'tests' / 'late_dial_proxy.py'} {{port}} --literals"
    result = _pytest("--sandbox", "--sandbox-proxy-cmd", command, "-p", "no:randomly", "-rf",
                     str(ROOT / "conformance" / "test_allowlist.py"))
    output = result.stdout + result.stderr
    failed, audited = _failed_and_audited(output)
    assert result.returncode != 0, output
    assert failed <= REFUSED_PROBES and failed | audited == REFUSED_PROBES, output
    assert f"{len(failed)} failed, 5 passed" in output, output
    assert "is outside the policy's allowlist, yet the proxy dialled it" in output, output


# A late dialer whose dials come long after its refusals: later than the default watch after the last test, within a
# longer one. The proxy under test is stopped when the watch ends, so a dial it has not made by then is made never.
FAR_LATE_SECONDS = 4.0


def _allowlist_against_far_late_dialer(delay: float, *watch: str) -> tuple[str, set[str], set[str]]:
    command = f"{sys.executable} {ROOT / 'tests' / 'late_dial_proxy.py'} {{port}} --literals --delay {delay}"
    result = _pytest("--sandbox", "--sandbox-proxy-cmd", command, *watch, "-p", "no:randomly", "-rf",
                     str(ROOT / "conformance" / "test_allowlist.py"))
    output = result.stdout + result.stderr
    return (output, *_failed_and_audited(output))


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_a_dial_later_than_the_watch_after_the_last_test_is_seen_by_nothing_and_the_scorecard_says_how_long():
    """The bound every network verdict has: a proxy that refuses each port and dials it 30 s later passes the
    allowlist category when the lab is watched one grace period after the last test (it is stopped before it
    dials); the scorecard states the window, so the pass is read with it."""
    output, failed, audited = _allowlist_against_far_late_dialer(30.0)
    assert "10 passed" in output and not failed and not audited, output
    assert "The lab was watched 0.5 s after the last test (--sandbox-watch-after)" in output, output


@pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
def test_watching_longer_after_the_last_test_catches_the_far_late_dials():
    """The same dialer at FAR_LATE_SECONDS, with the lab watched twice that: every refused port's dial lands in the
    watch, after its verdict was given, and the session-end audit names each one and fails the run."""
    output, failed, audited = _allowlist_against_far_late_dialer(
        FAR_LATE_SECONDS, "--sandbox-watch-after", str(2 * FAR_LATE_SECONDS))
    assert "LATE EVIDENCE" in output and "no verdict accounted for them" in output, output
    assert failed | audited == REFUSED_PROBES and not failed & audited, output
    assert f"The lab was watched {2 * FAR_LATE_SECONDS:g} s after the last test" in output, output


def test_the_default_watch_is_one_grace_period():
    """session.py keeps its own copy (it is imported where only the standard library is): the two must agree."""
    assert WATCH_AFTER_DEFAULT_SECONDS == GRACE_SECONDS


@pytest.mark.parametrize("value", ["-1", "nan", "3601"])
def test_a_watch_outside_0_to_3600_seconds_is_one_usage_error(value):
    result = _pytest("--sandbox", "--sandbox-watch-after", value, "--co", str(ROOT / "conformance" / "test_egress.py"))
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert f"--sandbox-watch-after {value}" in output, output  # -1.0, nan, 3601.0
    assert "from 0 to 3600" in output and "Traceback" not in output, output


def test_a_watch_that_is_no_number_is_refused_by_the_option_parser():
    result = _pytest("--sandbox", "--sandbox-watch-after", "soon", "--co", str(ROOT / "conformance" / "test_egress.py"))
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "--sandbox-watch-after: invalid float value: 'soon'" in output and "Traceback" not in output, output


def _allowlist_verdicts(results) -> dict[str, Verdict]:
    return {key: judge_allowlist_probe(BASELINE_ALLOWLIST[key], r.status, r.dialled, r.late).verdict
            for key, r in results.items()}


BASELINE_ALLOWLIST = {probe.test_id: probe for probe in allowlist_probes(
    baseline_policy().network, LAB_PUBLIC_ORIGINS, baseline_policy().network.allowed_ports)}


def test_allowlist_campaign_blames_a_dial_within_the_grace_period_on_its_probe_and_accounts_for_it(late_lab):
    with running_late_dialer(late_lab, literals=True) as running:
        relay = running.relay
        results = run_allowlist_campaign(late_lab, running.as_proxy, list(BASELINE_ALLOWLIST.values()))
        verdicts = _allowlist_verdicts(results)
        deadline = time.monotonic() + 10
        while len(relay.dialled) < len(REFUSED_PROBES) and time.monotonic() < deadline:
            time.sleep(0.05)
    dialled = {f"connect-{dial.address}-{dial.port}" for dial in relay.dialled}
    assert dialled == REFUSED_PROBES
    # Each refused probe failed on its own dial (0.2 s after its close, inside its round's grace period), none
    # was blamed for another's, and every admitted one works. On a machine so loaded that a dial came after the
    # whole campaign, that dial is left to the session-end audit instead: never dropped, never a pass of the run.
    failed = {key for key, verdict in verdicts.items() if verdict is Verdict.ALLOWED}
    audited = {f"connect-{hit.address}-{hit.port}" for hit in late_lab.unaccounted_hits()}
    assert failed | audited == dialled and not failed & audited
    assert all(results[key].dialled == 1 for key in failed)
    assert {key for key, verdict in verdicts.items() if verdict is Verdict.WORKS} == \
        {key for key, probe in BASELINE_ALLOWLIST.items() if probe.admitted}


def test_a_dial_after_the_allowlist_campaign_is_named_by_the_session_audit(late_lab):
    """A dial later than the whole campaign is not counted by it, but it reached the lab's catch-all, so the
    session-end audit fails the run and names it (and the probes to its address it can have come from)."""
    with running_late_dialer(late_lab, delay=2.0, literals=True) as running:
        relay = running.relay
        results = run_allowlist_campaign(late_lab, running.as_proxy, list(BASELINE_ALLOWLIST.values()))
        deadline = time.monotonic() + 10
        while len(relay.dialled) < len(REFUSED_PROBES) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert all(results[key].dialled == 0 for key in REFUSED_PROBES)  # too late for the campaign...
    problem = audit_lab(late_lab)  # ...not for the audit
    assert problem is not None and "no verdict accounted for them" in problem
    for key in REFUSED_PROBES:
        port = key.rsplit("-", 1)[1]
        assert f"11.0.0.10:{port} (" in problem, problem
    assert "can have come from allowlist/connect-11.0.0.10-" in problem, problem


def test_allowlist_rounds_put_every_admitted_probe_before_the_refused_ones_and_keep_endpoints_disjoint():
    probes = [AllowlistProbe("11.0.0.10", 22, False), AllowlistProbe("11.0.0.10", 80, True),
              AllowlistProbe("public-origin.lab.test", 80, True), AllowlistProbe("public-origin.lab.test", 22, False),
              AllowlistProbe("11.0.0.10", 25, False)]
    endpoints = {probe.test_id: frozenset({("11.0.0.10", probe.port)}) for probe in probes}
    rounds, settle = allowlist_rounds(probes, endpoints)
    assert rounds == [["connect-11.0.0.10-80"], ["connect-public-origin.lab.test-80"],
                      ["connect-11.0.0.10-22", "connect-11.0.0.10-25"], ["connect-public-origin.lab.test-22"]]
    assert settle is False  # no refused probe shares an endpoint with an admitted one
    shared = [AllowlistProbe("11.0.0.10", 80, True), AllowlistProbe("public-origin.lab.test", 80, False)]
    assert allowlist_rounds(shared, {p.test_id: frozenset({("11.0.0.10", 80)}) for p in shared})[1] is True


def test_a_connection_after_its_round_is_blamed_on_every_earlier_refused_probe_of_its_endpoint():
    a, b, c = ("11.0.0.10", 22), ("11.0.0.10", 25), ("11.0.0.10", 80)
    endpoints = {"adm": frozenset({c}), "r1": frozenset({a}), "r2": frozenset({b}), "r3": frozenset({a}),
                 "adm2": frozenset({c})}
    admitted = {"adm": True, "adm2": True, "r1": False, "r2": False, "r3": False}
    owners = arrival_owners([["adm"], ["adm2"], ["r1", "r2"], ["r3"]], endpoints, admitted)
    assert owners[0] == {c: ("adm",)}  # nothing probed a or b yet: a connection there is left to the audit
    assert owners[1] == {c: ("adm2",)}
    assert owners[2] == {a: ("r1",), b: ("r2",), c: ("adm", "adm2")}  # a second dial of an admitted one
    # r3's round owns a; r2's endpoint has no probe in it, so a late dial there is still r2's
    assert owners[3] == {a: ("r3",), b: ("r2",), c: ("adm", "adm2")}
    refused_twice = arrival_owners([["r1"], ["r2"], ["x"]], {**endpoints, "x": frozenset({c})},
                                   {**admitted, "x": False})
    assert refused_twice[2][a] == ("r1",) and refused_twice[2][b] == ("r2",)


def test_the_allowlist_judge_names_a_late_dial():
    probe = AllowlistProbe("11.0.0.10", 25, False)
    judgement = judge_allowlist_probe(probe, 403, 1, late=1)
    assert judgement.verdict is Verdict.ALLOWED
    assert "1 after its round's grace period" in judgement.observed
    assert judge_allowlist_probe(probe, 403, 0).verdict is Verdict.BLOCKED


# --- the catalogue: every case carries its family and source ----------------------------------------

def test_every_case_names_a_known_family_and_a_source_and_ids_are_unique():
    assert all(case.family in FAMILIES and case.source for case in SSRF_CASES)
    assert len({case.case_id for case in SSRF_CASES}) == len(SSRF_CASES)
    assert {case.family for case in SSRF_CASES} == set(FAMILIES)
    assert {a.form for a in EVERY_FORM} == set(ALL_FORMS)


# --- the reference's request-target and Host checks (RFC 9112 §3.2), pure --------------------------
# Target characters and Host values are framing (http/framing.py, table-tested in tests/test_framing.py);
# which request forms are routed at all is the proxy's decision (split_target).

@pytest.mark.parametrize(("target", "hosts"), [
    ("http://api.test/?x=%zz", ("api.test",)),
    ("http://api.test/a|b{c}^", ("api.test",)),
    ("http://api.test/", ("a, b",)),
    ("http://api.test/", ("user@h",)),
    ("http://api.test/", ("h/path",)),
    ("http://api.test/", ("api.test", "api.test")),
])
def test_the_framing_refuses_bad_targets_and_host_lines_with_400(target, hosts):
    head = f"GET {target} HTTP/1.1\r\n".encode() + b"".join(b"Host: %s\r\n" % h.encode() for h in hosts) + b"\r\n"
    with pytest.raises(FramingViolation) as raised:
        check_request_head(head)
    assert raised.value.status == 400


@pytest.mark.parametrize(("method", "target", "reason"), [
    ("GET", "/", "malformed_target"),  # origin-form: for origin servers, never routed
    ("OPTIONS", "*", "malformed_target"),
    ("GET", "api.test:80", "malformed_target"),  # authority-form is CONNECT's alone
    ("GET", "HTTP://127.0.0.1/", None),  # scheme case is not malformed: judged as http (then denied)
    ("GET", "http://api.test/a/b;c=d?x=%41&y=/?@z", None),
])
def test_split_target_routes_only_the_forward_proxy_forms(method, target, reason):
    split = split_target(method, target)
    if reason is None:
        assert not isinstance(split, Refusal), split
    else:
        assert isinstance(split, Refusal) and (split.status, split.reason) == (400, reason), split


# --- HEAD: the lab origin answers it, and the reference's refusals to it carry no body ---------------

def _head(running: RunningProxy, target: str) -> bytes:
    with running.connect() as sock:
        sock.sendall(f"HEAD {target} HTTP/1.1\r\nHost: x.test\r\nConnection: close\r\n\r\n".encode())
        sock.settimeout(5)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_head_is_answered_by_the_origin_and_refused_without_a_body(_network_lab):
    running = start_proxy(_network_lab, port=3136)
    try:
        allowed = _head(running, "http://11.0.0.10/head")
        refused = _head(running, "http://169.254.169.254/head")
    finally:
        running.stop()
    head, _, body = allowed.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head.lower() and body == b"", allowed
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403") and b"x-proxy-error: ssrf_denied" in head.lower(), refused
    assert body == b"", refused
