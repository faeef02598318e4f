"""The SSRF conformance catalogue: every destination the egress proxy must refuse, as data.

Three parts, in this order in ``SSRF_CASES``:

* **Range cases**, generated from ``network/special_use.csv`` so the catalogue never drifts from the
  table: the first, last and one inner address of every row (the one address of a /32 or /128),
  plus well-known cloud-metadata addresses.  Expected ``denied``.
* **Positive controls**: public addresses just outside a row's edges (IPv4, and IPv6 rows inside
  2000::/3).  Expected ``allowed``, so a proxy that refuses everything cannot score 100 %.
* **Encodings** (network.md section 3): other spellings of loopback and the metadata address,
  IPv6 wrappers, zone ids, userinfo, backslashes and bad ports.  Expected ``denied`` (canonicalises
  to a special address) or ``malformed`` (400 before any lookup); ``name`` cases need the lab's
  stub resolver and are ``denied`` after resolution.

* **Corpus families** (PayloadsAllTheThings' SSRF page, cujanovic/SSRF-Testing, Orange Tsai's "A New
  Era of SSRF"): URL-parser confusion (the text after the last ``@`` is public, the RFC 3986 host
  is not), scheme case, DNS services that answer a special-use address, cloud metadata names and paths.

Every case carries its ``family`` and ``source`` (:data:`FAMILIES`), and the request ``forms`` it is
sent in (:data:`ALL_FORMS`): a CONNECT authority, an absolute-form GET (``absolute_url``), an
origin-form GET with the authority in Host (transparent-proxy style), the authority as a GET's
request-target, and ``OPTIONS *`` with the authority in Host.
``canary`` is the address a careless proxy would really reach (the lab's catch-all canary observes
every address and port; a proxy reaches fe80::/10 only with a scope id, which the lab's lo routes
locally); ``None`` where no TCP peer can exist.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from pytest_sandbox.network.addresses import SpecialUseRange, classify_address, load_special_use_table

__all__ = ["ALL_FORMS", "CASE_PORT", "FAMILIES", "PORT_SWEEP_FORMS", "SSRF_CASES", "SsrfCase", "canary_addresses",
           "on_port", "port_sweep_cases", "sample_addresses", "ssrf_cases"]

# Port every case targets and every canary listens on (metadata services answer on 80).
CASE_PORT = 80

# Every request form a forward proxy can receive (RFC 9112 §3.2): authority-form with CONNECT,
# absolute-form, origin-form with Host (what a transparent proxy receives), authority-form with a
# method other than CONNECT, and asterisk-form (OPTIONS *), the last two with the authority in Host.
ALL_FORMS: tuple[str, ...] = ("connect", "absolute", "origin", "authority", "asterisk")
# Positive controls are sent only where a forward proxy must route them.
CONTROL_FORMS: tuple[str, ...] = ("connect", "absolute")
# The rows of the special-use table test the address check, which a proxy applies whatever the form;
# they go in the two forward forms and origin-form (a transparent path may use a table of its own).
# The bare-authority and asterisk forms test request-target handling: the hand-written cases carry them.
RANGE_FORMS: tuple[str, ...] = ("connect", "absolute", "origin")

_LOOPBACK = "127.0.0.1"
_PUBLIC_NAME = "public-origin.lab.test"  # a lab name whose only answer is a public origin (11.0.0.10)
_METADATA = "169.254.169.254"
_PATT = "PayloadsAllTheThings, Server Side Request Forgery/README.md"
_CUJANOVIC = "cujanovic/SSRF-Testing"
_ORANGE = "Orange Tsai, A New Era of SSRF (Black Hat USA 2017)"

# family -> where its cases come from (the README table is this mapping and the counts per family).
FAMILIES: dict[str, str] = {
    "special-use-range": "IANA special-purpose registries, RFC 6890 (network/special_use.csv); cloud metadata "
                         f"addresses and paths from {_CUJANOVIC} cloud-metadata.txt and {_PATT} (Cloud Instances)",
    "control": "public neighbours of every special-use row (positive controls)",
    "ip-encoding": f"{_PATT} (decimal, octal, hex, rare address, CIDR); {_CUJANOVIC} ip.py; inet_aton(3)",
    "unicode": f"{_PATT} (enclosed alphanumerics, unicode); {_ORANGE} (NFKC/IDNA); UTS 46",
    "ipv6-form": f"{_PATT} ([::], IPv6/IPv4 embedding); RFC 4291, RFC 6052, RFC 3056, RFC 4380, RFC 6874",
    "userinfo-backslash": f"{_PATT} (weak parser: '\\@'); {_ORANGE}; RFC 3986 §3.2.1",
    "port": f"{_PATT} (malformed urls: localhost:+11211aaa, :00011211aaaa); RFC 9110 §4.2",
    "dns-name": f"{_PATT} (domain redirection: localtest.me, nip.io, spoofed.burpcollaborator.net, "
                "mail.ebc.apple.com, bugbounty.dod.network, 1u.ms); "
                f"{_CUJANOVIC} cloud-metadata.txt (metadata, metadata.google.internal); sslip.io",
    "url-confusion": f"{_ORANGE} ('?@', '#@', '/@' after the RFC 3986 host); {_PATT} (weak parser, "
                     "'#\\@'); RFC 3986 §3.2",
    "scheme-case": "RFC 3986 §3.1 (schemes are case-insensitive); issue #9 (HTTP://127.0.0.1/)",
    "other-scheme": f"{_PATT} (SSRF exploiting URL scheme: dict://, sftp://, ldap://, gopher://; file:// and tftp:// "
                    "reach no TCP canary); RFC 9110 §4.2.2 (https), RFC 6455 §3 (ws, wss), RFC 1738 §3.2 (ftp)",
    "request-line": "RFC 9110 §9.3 (POST, PUT, DELETE), RFC 5789 (PATCH) and HTTP/1.0 (RFC 9112 §2.3, App. C.2; "
                    "Python's http.client opens its tunnels with CONNECT ... HTTP/1.0); the AWS IMDSv2 token request "
                    "(PUT /latest/api/token, AWS EC2 user guide)",
}


@dataclass(frozen=True)
class SsrfCase:
    """One destination to attempt through the proxy.

    ``target_host`` is the host exactly as written in the authority (IPv6 literals bracketed);
    ``raw_authority`` replaces ``host:port`` when the case is about the authority's syntax itself
    (bad ports, userinfo, backslashes).
    """

    case_id: str
    target_host: str
    port: int
    kind: str  # literal | encoding | ipv6_form | authority_syntax | name
    expected: str  # denied | malformed | allowed
    canary: str | None
    note: str
    raw_authority: str | None = None
    family: str = ""
    source: str = ""
    forms: tuple[str, ...] = ALL_FORMS
    scheme: str = "http"  # as written in the absolute-form target
    suffix: str = "/"  # what follows the authority in the absolute-form target (path, query, '#...')
    # For a special-use row's cases, which of its addresses this is (first, inner, last, only); ``metadata``
    # for a metadata service's own address. Empty for every other case.
    position: str = ""
    # The absolute-form request's method (else the form's) and the request's HTTP version, where the
    # ``request-line`` family sets them.
    method: str = ""
    http_version: str = "1.1"

    @property
    def authority(self) -> str:
        """The CONNECT authority-form text for this case."""
        if self.raw_authority is not None:
            return self.raw_authority
        return f"{self.target_host}:{self.port}"

    @property
    def absolute_url(self) -> str:
        """The same destination as an absolute-form request-target."""
        return f"{self.scheme}://{self.authority}{self.suffix}"


# --------------------------------------------------------------------------------------------
# Readable slugs for case ids, keyed by table CIDR (rows added later fall back to their name)
# --------------------------------------------------------------------------------------------

_RANGE_SLUGS = {
    "0.0.0.0/8": "this-network",
    "0.0.0.0/32": "this-host",
    "10.0.0.0/8": "private-10",
    "100.64.0.0/10": "cgnat",
    "127.0.0.0/8": "loopback",
    "169.254.0.0/16": "link-local",
    "172.16.0.0/12": "private-172",
    "192.0.0.0/24": "ietf-assignments",
    "192.0.0.0/29": "service-continuity",
    "192.0.0.8/32": "dummy",
    "192.0.0.9/32": "pcp-anycast",
    "192.0.0.10/32": "turn-anycast",
    "192.0.0.170/32": "nat64-discovery",
    "192.0.0.171/32": "nat64-discovery",
    "192.0.2.0/24": "test-net-1",
    "192.31.196.0/24": "as112",
    "192.52.193.0/24": "amt",
    "192.88.99.0/24": "6to4-relay-anycast",
    "192.88.99.2/32": "6a44-relay",
    "192.168.0.0/16": "private-192",
    "192.175.48.0/24": "as112-direct",
    "198.18.0.0/15": "benchmarking",
    "198.51.100.0/24": "test-net-2",
    "203.0.113.0/24": "test-net-3",
    "240.0.0.0/4": "reserved",
    "255.255.255.255/32": "limited-broadcast",
    "224.0.0.0/4": "multicast",
    "::1/128": "loopback",
    "::/128": "unspecified",
    "::ffff:0:0/96": "ipv4-mapped",
    "64:ff9b::/96": "nat64",
    "64:ff9b:1::/48": "nat64-local",
    "100::/64": "discard",
    "100:0:0:1::/64": "dummy",
    "2001::/23": "ietf-assignments",
    "2001::/32": "teredo",
    "2001:1::1/128": "pcp-anycast",
    "2001:1::2/128": "turn-anycast",
    "2001:1::3/128": "dnssd-srp-anycast",
    "2001:2::/48": "benchmarking",
    "2001:3::/32": "amt",
    "2001:4:112::/48": "as112",
    "2001:10::/28": "orchid",
    "2001:20::/28": "orchidv2",
    "2001:30::/28": "drone-det",
    "2001:db8::/32": "documentation",
    "2002::/16": "6to4",
    "2620:4f:8000::/48": "as112-direct",
    "3fff::/20": "documentation-3fff",
    "5f00::/16": "srv6",
    "fc00::/7": "unique-local",
    "fe80::/10": "link-local",
    "ff00::/8": "multicast",
    "fec0::/10": "site-local",
    "::/96": "ipv4-compatible",
    "::ffff:0:0:0/96": "siit",
    "::/3": "non-global-unicast",
    "4000::/2": "non-global-unicast",
    "8000::/1": "non-global-unicast",
}


def _slug(row: SpecialUseRange) -> str:
    known = _RANGE_SLUGS.get(row.cidr)
    if known is not None:
        return known
    return re.sub(r"[^a-z0-9]+", "-", row.name.lower()).strip("-")


def _family(address: IPv4Address | IPv6Address) -> str:
    return f"v{address.version}"


# --------------------------------------------------------------------------------------------
# Canaries: the address a TCP connect() to a destination really reaches, on Linux
# --------------------------------------------------------------------------------------------

_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")
# TCP connect() to multicast or the limited broadcast address fails before any packet exists
# (tcp_v4_connect refuses RTCF_MULTICAST|RTCF_BROADCAST routes, tcp_v6_connect multicast
# destinations), so no TCP peer can exist there.  No canary for these; the proxy must still refuse
# them.  (127.255.255.255 is a broadcast route only because lo carries 127.0.0.1/8; the lab removes
# that route, so a careless proxy really reaches it there.)
_NO_TCP_PEER: tuple[IPv4Network | IPv6Network, ...] = (
    IPv4Network("224.0.0.0/4"),
    IPv4Network("255.255.255.255/32"),
    IPv6Network("ff00::/8"),
)
# Linux routes connect() to INADDR_ANY to 127.0.0.1 (ip_route_output_key_hash_rcu) and to
# in6addr_any to ::1 (tcp_v6_connect): the canary is the loopback listener.
_UNSPECIFIED_REACHES = {IPv4Address("0.0.0.0"): "127.0.0.1", IPv6Address("::"): "::1"}


def _canary_for(address: IPv4Address | IPv6Address) -> str | None:
    if isinstance(address, IPv6Address) and address in _IPV4_MAPPED:
        # A dual-stack socket dials the embedded IPv4 itself (RFC 4291 section 2.5.5.2).
        address = IPv4Address(int(address) & 0xFFFF_FFFF)
    if any(address.version == network.version and address in network for network in _NO_TCP_PEER):
        return None
    return _UNSPECIFIED_REACHES.get(address, str(address))


def _host_text(address: IPv4Address | IPv6Address) -> str:
    return f"[{address}]" if isinstance(address, IPv6Address) else str(address)


# --------------------------------------------------------------------------------------------
# Range cases and positive controls, generated from the table
# --------------------------------------------------------------------------------------------


def _more_specific_rows(row: SpecialUseRange, table: tuple[SpecialUseRange, ...]) -> list[SpecialUseRange]:
    return [
        other
        for other in table
        if other.network.version == row.network.version
        and other.network.prefixlen > row.network.prefixlen
        and other.network.subnet_of(row.network)  # type: ignore[arg-type]
    ]


def sample_addresses(
    row: SpecialUseRange, table: tuple[SpecialUseRange, ...]
) -> tuple[tuple[str, IPv4Address | IPv6Address], ...]:
    """The (position, address) pairs to attempt for one row: ``only`` for a single address,
    otherwise ``first``, ``inner`` and ``last``.  The inner address avoids any more specific row
    nested in this one, so at least one attempt is judged by this row itself."""
    network = row.network
    first, last = network.network_address, network.broadcast_address
    if first == last:
        return (("only", first),)
    nested = _more_specific_rows(row, table)
    candidates = (first + 1, first + (network.num_addresses // 2))
    inner = next(
        (candidate for candidate in candidates if not any(candidate in other.network for other in nested)),
        candidates[-1],
    )
    return (("first", first), ("inner", inner), ("last", last))


# Cloud metadata services live inside denied ranges; name them so a report says what was reached.
# (id, address, note, path the corpus requests, source)
_METADATA_ADDRESSES = (
    ("meta-imds", "169.254.169.254", "AWS/GCP/Azure/OCI instance metadata service", "/",
     f"{_CUJANOVIC} cloud-metadata.txt (AWS - Dirs: http://169.254.169.254/)"),
    ("meta-aws-ecs", "169.254.170.2", "AWS ECS task metadata endpoint", "/v2/credentials/",
     f"{_PATT} (SSRF URL for AWS ECS)"),
    ("meta-aws-imds-ipv6", "fd00:ec2::254", "AWS IMDS over IPv6 (unique-local)", "/latest/meta-data/",
     "AWS EC2 user guide (IMDS IPv6 endpoint)"),
    ("meta-alibaba", "100.100.100.200", "Alibaba Cloud metadata service (in CGN space)", "/latest/meta-data/",
     f"{_PATT} (SSRF URL for Alibaba)"),
    ("meta-oracle", "192.0.0.192", "Oracle Cloud metadata service (IETF protocol assignments block)",
     "/latest/meta-data/", f"{_PATT} (SSRF URL for Oracle Cloud)"),
)
# More corpus paths on the metadata address itself: each provider's path is a case of its own, so a
# proxy that filters by path (not by destination) is caught.
_METADATA_PATHS = (
    ("meta-aws-path", "/latest/meta-data/iam/security-credentials/", f"{_CUJANOVIC} cloud-metadata.txt (AWS)"),
    ("meta-gcp-path", "/computeMetadata/v1/", f"{_CUJANOVIC} cloud-metadata.txt (Google Cloud)"),
    ("meta-digitalocean-path", "/metadata/v1.json", f"{_CUJANOVIC} cloud-metadata.txt (Digital Ocean)"),
    ("meta-azure-path", "/metadata/instance?api-version=2017-04-02", f"{_CUJANOVIC} cloud-metadata.txt (Azure)"),
    ("meta-openstack-path", "/openstack", f"{_PATT} (SSRF URL for OpenStack/RackSpace)"),
)


def _range_cases(table: tuple[SpecialUseRange, ...]) -> list[SsrfCase]:
    # Most specific rows claim an address first, so 0.0.0.0 is attributed to 0.0.0.0/32 and ::1 to
    # ::1/128; each address is attempted once, then cases are listed in table order.
    order = {row: index for index, row in enumerate(table)}
    claimed: dict[IPv4Address | IPv6Address, tuple[int, int, SsrfCase]] = {}
    for row in sorted(table, key=lambda row: -row.network.prefixlen):
        for position_index, (position, address) in enumerate(sample_addresses(row, table)):
            if address in claimed:
                continue
            position_part = "" if position == "only" else f"{position}-"
            case = SsrfCase(
                case_id=f"{_family(address)}-{_slug(row)}-{position_part}{address}",
                target_host=_host_text(address),
                port=CASE_PORT,
                kind="literal",
                expected="denied",
                canary=_canary_for(address),
                note=f"{position} address of {row.label}",
                family="special-use-range",
                source=f"{row.label} ({row.cidr})",
                forms=RANGE_FORMS,
                position=position,
            )
            claimed[address] = (order[row], position_index, case)
    cases = [case for _, _, case in sorted(claimed.values(), key=lambda entry: entry[:2])]
    for case_id, text, note, path, source in _METADATA_ADDRESSES:
        address = IPv4Address(text) if ":" not in text else IPv6Address(text)
        if address not in claimed:
            cases.append(
                SsrfCase(
                    case_id=f"{case_id}-{address}",
                    target_host=_host_text(address),
                    port=CASE_PORT,
                    kind="literal",
                    expected="denied",
                    canary=_canary_for(address),
                    note=note if path == "/" else f"{note}, GET {path}",
                    family="special-use-range",
                    source=source,
                    suffix=path,
                    position="metadata",
                )
            )
    for case_id, path, source in _METADATA_PATHS:
        cases.append(SsrfCase(f"{case_id}-169.254.169.254", _METADATA, CASE_PORT, "literal", "denied", _METADATA,
                              f"metadata service, GET {path}", family="special-use-range", source=source,
                              suffix=path))
    return cases


_GLOBAL_UNICAST = IPv6Network("2000::/3")


def _neighbour(row: SpecialUseRange, side: str) -> IPv4Address | IPv6Address | None:
    network = row.network
    try:
        if side == "below":
            return network.network_address - 1
        return network.broadcast_address + 1
    except ValueError:  # 0.0.0.0/8 has nothing below it, 240.0.0.0/4 nothing above.
        return None


def _control_cases(table: tuple[SpecialUseRange, ...]) -> list[SsrfCase]:
    cases: list[SsrfCase] = []
    seen: set[IPv4Address | IPv6Address] = set()
    for row in table:
        if isinstance(row.network, IPv6Network) and not row.network.subnet_of(_GLOBAL_UNICAST):
            continue
        for side in ("below", "above"):
            address = _neighbour(row, side)
            if address is None or address in seen or classify_address(address).denied:
                continue
            if isinstance(address, IPv6Address) and address not in _GLOBAL_UNICAST:
                continue
            seen.add(address)
            cases.append(
                SsrfCase(
                    case_id=f"ctl-{_family(address)}-{_slug(row)}-{side}-{address}",
                    target_host=_host_text(address),
                    port=CASE_PORT,
                    kind="literal",
                    expected="allowed",
                    canary=str(address),
                    note=f"public address just {side} {row.label}: must still be reachable",
                    family="control",
                    source=f"the public neighbour of {row.cidr}",
                    forms=CONTROL_FORMS,
                )
            )
    return cases


# --------------------------------------------------------------------------------------------
# Every port the policy admits, not only the catalogue's
# --------------------------------------------------------------------------------------------

# Every case above is sent to port 80, CONNECT included, where a real HTTPS client sends CONNECT host:443. A
# proxy that classifies destinations on one port only (its address check in the plain-HTTP path, tunnels
# checked against the allowlist alone) refused all of them and let ``CONNECT 169.254.169.254:443`` through:
# tests/broken_proxies/port_keyed.py passed the whole SSRF category. So one address of every special-use row
# (its inner address, or its only one), every metadata service's address, the dns-name family (``CONNECT
# localhost:443`` is as plain a request as there is) and a public control per address family are also sent to
# each other port the enforced policy admits (on a port it does not admit, a refusal would come from the port
# rule, not from the address check). They go in the two forms a forward proxy serves, CONNECT and absolute-form.
PORT_SWEEP_FORMS: tuple[str, ...] = ("connect", "absolute")
_PORT_SWEEP_POSITIONS = ("inner", "only", "metadata")


def on_port(case: SsrfCase, port: int) -> SsrfCase:
    """``case`` sent to ``port`` instead of :data:`CASE_PORT`, in the forms of :data:`PORT_SWEEP_FORMS` it has."""
    assert case.raw_authority is None, f"{case.case_id}: an authority written out has its own port"
    return dataclasses.replace(case, case_id=f"{case.case_id}-port-{port}", port=port,
                               note=f"{case.note}, on port {port}",
                               forms=tuple(form for form in PORT_SWEEP_FORMS if form in case.forms))


def port_sweep_cases(ports: Iterable[int]) -> tuple[SsrfCase, ...]:
    """For each of ``ports`` but :data:`CASE_PORT` (in the order given): each special-use row's representative
    address, each metadata address and each name of the ``dns-name`` family, then the first IPv4 and the first
    IPv6 positive control."""
    cases = ssrf_cases()
    representatives = [case for case in cases
                       if (case.family == "special-use-range" and case.position in _PORT_SWEEP_POSITIONS)
                       or case.family == "dns-name"]
    controls = [next(case for case in cases if case.family == "control" and _family_text(case) == family)
                for family in ("v4", "v6")]
    wanted = [port for port in dict.fromkeys(ports) if port != CASE_PORT]
    return tuple(on_port(case, port) for port in wanted for case in (*representatives, *controls))


def _family_text(case: SsrfCase) -> str:
    return "v6" if ":" in case.target_host else "v4"


# --------------------------------------------------------------------------------------------
# Every method, not only the ones the forms use
# --------------------------------------------------------------------------------------------

# The forms send GET, CONNECT and OPTIONS only, as HTTP/1.1. A proxy whose address check sits in its GET path (a
# cache's, say) refused every case above and let ``PUT http://169.254.169.254/latest/api/token`` through, the
# IMDSv2 token request every AWS SDK sends before it reads a credential; one that judged HTTP/1.1 requests only
# let ``CONNECT 169.254.169.254:80 HTTP/1.0`` through, the request line Python's http.client (and so urllib3 and
# requests) opens its tunnels with (tests/broken_proxies/method_keyed.py: each passed the whole SSRF category).
# So a few destinations are also requested with each other method a client sends to an origin (absolute-form)
# and as HTTP/1.0 (CONNECT and absolute-form GET), each request line with a public control of its own.
SWEPT_METHODS: tuple[str, ...] = ("POST", "PUT", "DELETE", "PATCH")
_REQUEST_LINE_DESTINATIONS = ("meta-imds-169.254.169.254", "meta-aws-imds-ipv6-fd00:ec2::254",
                              "v4-loopback-inner-127.0.0.1", "v4-private-10-inner-10.0.0.1", "name-localhost")
_REQUEST_LINE_CONTROL = "ctl-v4-private-10-above-11.0.0.0"
_IMDSV2_TOKEN_PATH = "/latest/api/token"


def _request_line_cases(cases: tuple[SsrfCase, ...]) -> list[SsrfCase]:
    by_id = {case.case_id: case for case in cases}
    # (id label, method or "" for the form's, HTTP version, forms, how the note says it)
    lines: list[tuple[str, str, str, tuple[str, ...], str]] = [
        (f"method-{method.lower()}", method, "1.1", ("absolute",), method) for method in SWEPT_METHODS]
    lines.append(("http10", "", "1.0", ("connect", "absolute"), "HTTP/1.0"))
    swept: list[SsrfCase] = []
    for label, method, version, forms, as_sent in lines:
        for case_id in (*_REQUEST_LINE_DESTINATIONS, _REQUEST_LINE_CONTROL):
            case = by_id[case_id]
            token = method == "PUT" and case.target_host == _METADATA
            control = case.expected == "allowed"
            swept.append(dataclasses.replace(
                case, case_id=f"ctl-{label}-{case_id.removeprefix('ctl-')}" if control else f"{label}-{case_id}",
                method=method, http_version=version, family=case.family if control else "request-line",
                forms=forms, suffix=_IMDSV2_TOKEN_PATH if token else case.suffix, position="",
                note=f"{case.note}, as {as_sent}" + (" (the IMDSv2 token request)" if token else ""),
                source=case.source if control else FAMILIES["request-line"]))
    return swept


# --------------------------------------------------------------------------------------------
# Encodings of loopback and the metadata address (network.md section 3), written out by hand
# --------------------------------------------------------------------------------------------

def _case(
    case_id: str,
    target_host: str,
    kind: str,
    expected: str,
    canary: str | None,
    note: str,
    raw_authority: str | None = None,
) -> SsrfCase:
    return SsrfCase(case_id, target_host, CASE_PORT, kind, expected, canary, note, raw_authority)


# fmt: off
_ENCODING_CASES = (
    # inet_aton number forms: glibc resolves them, a strict parser must not call them names.
    _case("enc-loopback-decimal-2130706433", "2130706433", "encoding", "malformed", _LOOPBACK,
          "32-bit decimal, inet_aton -> 127.0.0.1"),
    _case("enc-loopback-hex-0x7f000001", "0x7f000001", "encoding", "malformed", _LOOPBACK,
          "32-bit hex, inet_aton -> 127.0.0.1"),
    _case("enc-loopback-hex-upper-0X7F000001", "0X7F000001", "encoding", "malformed", _LOOPBACK,
          "upper-case hex prefix, inet_aton -> 127.0.0.1"),
    _case("enc-loopback-octal-017700000001", "017700000001", "encoding", "malformed", _LOOPBACK,
          "32-bit octal, inet_aton -> 127.0.0.1"),
    _case("enc-loopback-dotted-octal-0177.0.0.1", "0177.0.0.1", "encoding", "malformed", _LOOPBACK,
          "octal first octet, inet_aton -> 127.0.0.1"),
    _case("enc-loopback-leading-zeros-127.000.000.001", "127.000.000.001", "encoding", "malformed",
          _LOOPBACK, "zero-padded octets (octal to inet_aton), -> 127.0.0.1"),
    _case("enc-loopback-dotted-hex-0x7f.0x0.0x0.0x1", "0x7f.0x0.0x0.0x1", "encoding", "malformed",
          _LOOPBACK, "hex octets, inet_aton -> 127.0.0.1"),
    _case("enc-loopback-hex-short-0x7f.1", "0x7f.1", "encoding", "malformed", _LOOPBACK,
          "a.b form with hex, inet_aton -> 127.0.0.1"),
    _case("enc-loopback-short-127.1", "127.1", "encoding", "malformed", _LOOPBACK,
          "a.b form, inet_aton -> 127.0.0.1"),
    _case("enc-loopback-short-127.0.1", "127.0.1", "encoding", "malformed", _LOOPBACK,
          "a.b.c form, inet_aton -> 127.0.0.1"),
    _case("enc-this-host-zero-0", "0", "encoding", "malformed", _LOOPBACK,
          "inet_aton -> 0.0.0.0, and connect() to 0.0.0.0 reaches the loopback listener"),
    # Non-ASCII: Python's idna codec applies NFKC before glibc sees the name.
    _case("enc-loopback-fullwidth-digits", "１２７.０.０.１", "encoding", "malformed", _LOOPBACK,
          "fullwidth digits, NFKC -> 127.0.0.1"),
    _case("enc-loopback-fullwidth-full-stop", "127．0．0．1", "encoding", "malformed", _LOOPBACK,
          "fullwidth full stops, NFKC/UTS 46 -> 127.0.0.1"),
    _case("enc-loopback-ideographic-full-stop", "127。0。0。1", "encoding", "malformed", _LOOPBACK,
          "ideographic full stops, UTS 46 label separator -> 127.0.0.1"),
    _case("enc-loopback-halfwidth-ideographic-full-stop", "127｡0｡0｡1", "encoding", "malformed",
          _LOOPBACK, "halfwidth ideographic full stops, UTS 46 label separator -> 127.0.0.1"),
    _case("enc-loopback-circled-digits", "①②⑦.⓪.⓪.①", "encoding", "malformed", _LOOPBACK,
          "circled digits, NFKC -> 127.0.0.1"),
    _case("enc-loopback-mathematical-digits", "𝟏𝟐𝟕.0.0.1", "encoding", "malformed", _LOOPBACK,
          "mathematical bold digits, NFKC -> 127.0.0.1"),
    _case("enc-localhost-circled-letters", "ⓛⓞⓒⓐⓛⓗⓞⓢⓣ", "encoding", "malformed", _LOOPBACK,
          "circled letters, NFKC -> localhost -> 127.0.0.1"),
    _case("enc-localhost-fullwidth-letters", "ｌｏｃａｌｈｏｓｔ", "encoding", "malformed", _LOOPBACK,
          "fullwidth letters, NFKC -> localhost -> 127.0.0.1"),
    # C-string truncation and whitespace.
    _case("enc-loopback-nul-truncation", "127.0.0.1\x00.allowed.example", "encoding", "malformed",
          _LOOPBACK, "glibc stops at the NUL and resolves 127.0.0.1; an allowlist sees allowed.example"),
    _case("enc-loopback-space-suffix", "127.0.0.1 .allowed.example", "encoding", "malformed", _LOOPBACK,
          "space inside the authority"),
    _case("enc-loopback-tab-suffix", "127.0.0.1\t", "encoding", "malformed", _LOOPBACK,
          "control character inside the authority"),
    _case("enc-loopback-percent-encoded", "%31%32%37.0.0.1", "encoding", "malformed", _LOOPBACK,
          "percent-encoded digits decode to 127.0.0.1"),
    # Trailing dots: exactly one is the DNS root and is stripped, then the address is judged.
    _case("enc-loopback-trailing-dot-127.0.0.1.", "127.0.0.1.", "encoding", "denied", _LOOPBACK,
          "one trailing dot is stripped -> 127.0.0.1 -> 127.0.0.0/8"),
    _case("enc-loopback-double-trailing-dot-127.0.0.1..", "127.0.0.1..", "encoding", "malformed",
          _LOOPBACK, "two trailing dots leave an empty label"),
    # Metadata address, same families of spelling.
    _case("enc-metadata-decimal-2852039166", "2852039166", "encoding", "malformed", _METADATA,
          "32-bit decimal, inet_aton -> 169.254.169.254"),
    _case("enc-metadata-hex-0xa9fea9fe", "0xa9fea9fe", "encoding", "malformed", _METADATA,
          "32-bit hex, inet_aton -> 169.254.169.254"),
    _case("enc-metadata-octal-025177524776", "025177524776", "encoding", "malformed", _METADATA,
          "32-bit octal, inet_aton -> 169.254.169.254"),
    _case("enc-metadata-dotted-octal-0251.0376.0251.0376", "0251.0376.0251.0376", "encoding",
          "malformed", _METADATA, "octal octets, inet_aton -> 169.254.169.254"),
    _case("enc-metadata-dotted-hex-0xa9.0xfe.0xa9.0xfe", "0xa9.0xfe.0xa9.0xfe", "encoding",
          "malformed", _METADATA, "hex octets, inet_aton -> 169.254.169.254"),
    _case("enc-metadata-mixed-0xa9.254.0251.0xfe", "0xa9.254.0251.0xfe", "encoding", "malformed",
          _METADATA, "mixed hex/decimal/octal octets, inet_aton -> 169.254.169.254"),
    _case("enc-metadata-short-169.16689662", "169.16689662", "encoding", "malformed", _METADATA,
          "a.b form, inet_aton -> 169.254.169.254"),
    _case("enc-metadata-short-169.254.43518", "169.254.43518", "encoding", "malformed", _METADATA,
          "a.b.c form, inet_aton -> 169.254.169.254"),
    _case("enc-metadata-fullwidth-digits", "１６９.２５４.１６９.２５４", "encoding", "malformed",
          _METADATA, "fullwidth digits, NFKC -> 169.254.169.254"),
    _case("enc-metadata-ideographic-full-stop", "169。254。169。254", "encoding", "malformed",
          _METADATA, "ideographic full stops -> 169.254.169.254"),
    _case("enc-metadata-circled-digits", "①⑥⑨.②⑤④.①⑥⑨.②⑤④", "encoding", "malformed", _METADATA,
          "circled digits, NFKC -> 169.254.169.254"),
    _case("enc-metadata-nul-truncation", "169.254.169.254\x00.allowed.example", "encoding",
          "malformed", _METADATA, "glibc stops at the NUL and resolves 169.254.169.254"),
    _case("enc-metadata-trailing-dot-169.254.169.254.", "169.254.169.254.", "encoding", "denied",
          _METADATA, "one trailing dot is stripped -> 169.254.0.0/16"),
    # IPv6 spellings and IPv4-carrying wrappers.  Without a translator in the lab a careless proxy
    # dials the IPv6 literal itself, so that literal is the canary (IPv4-mapped reaches the IPv4).
    _case("enc6-loopback-uncompressed", "[0000:0000:0000:0000:0000:0000:0000:0001]", "ipv6_form",
          "denied", "::1", "uncompressed ::1"),
    _case("enc6-unspecified-uncompressed", "[0:0:0:0:0:0:0:0]", "ipv6_form", "denied", "::1",
          "uncompressed ::; connect() to in6addr_any reaches ::1"),
    _case("enc6-loopback-ipv4-mapped-dotted", "[::ffff:127.0.0.1]", "ipv6_form", "denied", _LOOPBACK,
          "IPv4-mapped: a dual-stack socket reaches 127.0.0.1"),
    _case("enc6-loopback-ipv4-mapped-hex", "[::ffff:7f00:1]", "ipv6_form", "denied", _LOOPBACK,
          "IPv4-mapped in hex"),
    _case("enc6-loopback-ipv4-mapped-uncompressed", "[0:0:0:0:0:FFFF:7F00:0001]", "ipv6_form", "denied",
          _LOOPBACK, "IPv4-mapped, uncompressed, upper case"),
    _case("enc6-loopback-ipv4-compatible", "[::127.0.0.1]", "ipv6_form", "denied", "::7f00:1",
          "IPv4-compatible ::/96 (deprecated)"),
    _case("enc6-loopback-siit", "[::ffff:0:7f00:1]", "ipv6_form", "denied", "::ffff:0:7f00:1",
          "SIIT IPv4-translated ::ffff:0:0:0/96"),
    _case("enc6-loopback-nat64", "[64:ff9b::7f00:1]", "ipv6_form", "denied", "64:ff9b::7f00:1",
          "well-known NAT64 prefix; a gateway would reach 127.0.0.1"),
    _case("enc6-loopback-nat64-dotted", "[64:ff9b::127.0.0.1]", "ipv6_form", "denied", "64:ff9b::7f00:1",
          "well-known NAT64 prefix, dotted tail"),
    _case("enc6-loopback-6to4", "[2002:7f00:1::]", "ipv6_form", "denied", "2002:7f00:1::",
          "6to4 carrying 127.0.0.1"),
    _case("enc6-loopback-teredo-client", "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "ipv6_form", "denied",
          "2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo: client = NOT low 32 bits = 127.0.0.1"),
    _case("enc6-metadata-ipv4-mapped-dotted", "[::ffff:169.254.169.254]", "ipv6_form", "denied",
          _METADATA, "IPv4-mapped metadata"),
    _case("enc6-metadata-ipv4-mapped-hex", "[::ffff:a9fe:a9fe]", "ipv6_form", "denied", _METADATA,
          "IPv4-mapped metadata in hex"),
    _case("enc6-metadata-ipv4-compatible", "[::169.254.169.254]", "ipv6_form", "denied", "::a9fe:a9fe",
          "IPv4-compatible metadata"),
    _case("enc6-metadata-siit", "[::ffff:0:a9fe:a9fe]", "ipv6_form", "denied", "::ffff:0:a9fe:a9fe",
          "SIIT IPv4-translated metadata"),
    _case("enc6-metadata-nat64", "[64:ff9b::a9fe:a9fe]", "ipv6_form", "denied", "64:ff9b::a9fe:a9fe",
          "well-known NAT64 prefix; a gateway would reach 169.254.169.254"),
    _case("enc6-metadata-nat64-dotted", "[64:ff9b::169.254.169.254]", "ipv6_form", "denied",
          "64:ff9b::a9fe:a9fe", "well-known NAT64 prefix, dotted tail"),
    _case("enc6-metadata-nat64-local-use", "[64:ff9b:1::a9fe:a9fe]", "ipv6_form", "denied",
          "64:ff9b:1::a9fe:a9fe", "local-use NAT64 /48, denied outright (prefix length varies)"),
    _case("enc6-metadata-6to4", "[2002:a9fe:a9fe::]", "ipv6_form", "denied", "2002:a9fe:a9fe::",
          "6to4 carrying 169.254.169.254"),
    _case("enc6-metadata-teredo-server", "[2001:0:a9fe:a9fe::f7f7:f7f7]", "ipv6_form", "denied",
          "2001:0:a9fe:a9fe::f7f7:f7f7", "Teredo: server bits 32-63 = 169.254.169.254"),
    _case("enc6-metadata-teredo-client", "[2001:0:4136:e378:8000:63bf:5601:5601]", "ipv6_form", "denied",
          "2001:0:4136:e378:8000:63bf:5601:5601", "Teredo: client = NOT low 32 bits = 169.254.169.254"),
    # Zone ids and bracket syntax (RFC 9112 section 3.2.3, RFC 3986 section 3.2.2, RFC 6874).
    _case("enc6-link-local-zone-id", "[fe80::1%lo]", "ipv6_form", "malformed", "fe80::1",
          "zone id selects an interface"),
    _case("enc6-link-local-zone-id-percent-encoded", "[fe80::1%25lo]", "ipv6_form", "malformed",
          "fe80::1", "RFC 6874 percent-encoded zone id"),
    _case("enc6-link-local-zone-id-unbracketed", "fe80::1%lo", "ipv6_form", "malformed", "fe80::1",
          "unbracketed scoped literal"),
    _case("enc6-metadata-zone-id", "[fd00:ec2::254%eth0]", "ipv6_form", "malformed", "fd00:ec2::254",
          "zone id on the AWS IPv6 metadata address"),
    _case("enc6-loopback-unbracketed", "::1", "ipv6_form", "malformed", "::1",
          "'::1:80' is ambiguous without brackets"),
    _case("enc6-loopback-unbalanced-open", "[::1", "ipv6_form", "malformed", "::1", "missing ']'"),
    _case("enc6-loopback-unbalanced-close", "::1]", "ipv6_form", "malformed", "::1", "missing '['"),
    _case("enc-loopback-bracketed-ipv4", "[127.0.0.1]", "encoding", "malformed", _LOOPBACK,
          "brackets are for IPv6 literals only"),
    # Userinfo and backslashes: parsers disagree about which host is meant (RFC 9110 section 4.2.4).
    _case("auth-userinfo-loopback", "allowed.example@127.0.0.1", "authority_syntax", "malformed",
          _LOOPBACK, "userinfo: an allowlist may read allowed.example, the dialer 127.0.0.1"),
    _case("auth-userinfo-password-loopback", "user:pass@127.0.0.1", "authority_syntax", "malformed",
          _LOOPBACK, "userinfo with a password"),
    _case("auth-double-at-loopback", "a@b@127.0.0.1", "authority_syntax", "malformed", _LOOPBACK,
          "second '@': parsers split at the first or the last"),
    _case("auth-userinfo-metadata", "allowed.example@169.254.169.254", "authority_syntax", "malformed",
          _METADATA, "userinfo in front of the metadata address"),
    _case("auth-backslash-at-loopback", "127.1.1.1", "authority_syntax", "malformed", "127.2.2.2",
          "urllib dials 127.2.2.2, WHATWG 127.1.1.1", raw_authority="127.1.1.1:80\\@127.2.2.2"),
    _case("auth-backslash-metadata", "allowed.example\\@169.254.169.254", "authority_syntax",
          "malformed", _METADATA, "backslash before '@'"),
    # The same payload with the public host after the '@': urllib reads public-origin.lab.test, the WHATWG
    # parser ends the authority at the backslash and dials the special host (a check that reads one and a
    # dialler that reads the other leaks; where both readings are special, the check refuses anyway).
    _case("auth-backslash-at-public-metadata", _METADATA, "authority_syntax", "malformed", _METADATA,
          "urllib: public-origin.lab.test, WHATWG: 169.254.169.254",
          raw_authority=f"169.254.169.254:80\\@{_PUBLIC_NAME}"),
    _case("auth-backslash-at-public-loopback", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK,
          "urllib: public-origin.lab.test, WHATWG: 127.0.0.1", raw_authority=f"127.0.0.1\\@{_PUBLIC_NAME}"),
    _case("auth-backslash-at-public-private", "10.0.0.1", "authority_syntax", "malformed", "10.0.0.1",
          "urllib: public-origin.lab.test, WHATWG: 10.0.0.1", raw_authority=f"10.0.0.1:80\\@{_PUBLIC_NAME}"),
    # Ports (RFC 9110 section 4.2 and 9.3.6): only [1-9][0-9]{0,4} up to 65535.
    _case("port-plus-sign", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK, "signed port",
          raw_authority="127.0.0.1:+80"),
    _case("port-minus-sign", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK, "negative port",
          raw_authority="127.0.0.1:-80"),
    _case("port-leading-zeros", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK,
          "leading zeros (octal to some parsers)", raw_authority="127.0.0.1:00080"),
    _case("port-65536", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK,
          "out of range; 16-bit truncation gives 0", raw_authority="127.0.0.1:65536"),
    _case("port-65616-wraps-to-80", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK,
          "out of range; 16-bit truncation gives 80", raw_authority="127.0.0.1:65616"),
    _case("port-zero", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK, "port 0",
          raw_authority="127.0.0.1:0"),
    _case("port-empty", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK, "empty port",
          raw_authority="127.0.0.1:"),
    _case("port-hex", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK, "hex port",
          raw_authority="127.0.0.1:0x50"),
    _case("port-fullwidth-digits", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK,
          "fullwidth digits in the port", raw_authority="127.0.0.1:８０"),
    # Not in Host: a field value's trailing whitespace is OWS, not part of it (RFC 9110 §5.5).
    dataclasses.replace(_case("port-trailing-space", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK,
                              "space after the port", raw_authority="127.0.0.1:80 "),
                        forms=("connect", "absolute", "authority")),
    _case("port-twice", _LOOPBACK, "authority_syntax", "malformed", _LOOPBACK, "two ports",
          raw_authority="127.0.0.1:80:80"),
    # Names that resolve internally: parse_authority accepts them; the proxy's resolver (the lab's
    # stub resolver) answers with the canary, and the answer must be denied.
    _case("name-localhost", "localhost", "name", "denied", _LOOPBACK, "resolves to 127.0.0.1"),
    _case("name-localhost-trailing-dot", "localhost.", "name", "denied", _LOOPBACK,
          "one trailing dot is stripped -> localhost -> 127.0.0.1"),
    _case("name-localhost-upper-case", "LOCALHOST", "name", "denied", _LOOPBACK,
          "names are case-insensitive -> localhost"),
    _case("name-localtest.me", "localtest.me", "name", "denied", _LOOPBACK,
          "public DNS name whose A record is 127.0.0.1 (lab stub resolver)"),
    _case("name-nip.io-loopback", "127.0.0.1.nip.io", "name", "denied", _LOOPBACK,
          "wildcard DNS echoing the address (lab stub resolver)"),
    _case("name-metadata-google-internal", "metadata.google.internal", "name", "denied", _METADATA,
          "GCP metadata name (lab stub resolver)"),
)
# fmt: on


def _family_of(case: SsrfCase) -> str:
    """The corpus family of a hand-written case, from its id and kind."""
    if case.kind == "name":
        return "dns-name"
    if case.kind == "ipv6_form":
        return "ipv6-form"
    if case.case_id.startswith("port-"):
        return "port"
    if case.case_id.startswith("auth-"):
        return "userinfo-backslash"
    if any(ord(char) > 0x7F for char in case.target_host):
        return "unicode"
    return "ip-encoding"


# fmt: off
# Corpus cases beyond network.md section 3 (each with its own source).
_CORPUS_CASES = (
    # PayloadsAllTheThings "Bypass localhost with [::]" / "with CIDR" / "rare address".
    SsrfCase("enc6-unspecified-bracketed-::", "[::]", CASE_PORT, "ipv6_form", "denied", "::1",
             "http://[::]:80/: connect() to in6addr_any reaches ::1", family="ipv6-form",
             source=f"{_PATT} (Bypass localhost with [::])"),
    SsrfCase("enc-loopback-cidr-127.127.127.127", "127.127.127.127", CASE_PORT, "encoding", "denied",
             "127.127.127.127", "any address of 127.0.0.0/8 is loopback", family="ip-encoding",
             source=f"{_PATT} (Bypass localhost with CIDR)"),
    SsrfCase("enc-private-decimal-3232235521", "3232235521", CASE_PORT, "encoding", "malformed", "192.168.0.1",
             "32-bit decimal, inet_aton -> 192.168.0.1", family="ip-encoding",
             source=f"{_PATT} (Bypass using a decimal IP location)"),
    SsrfCase("enc-loopback-octal-o-prefix-o177.0.0.1", "o177.0.0.1", CASE_PORT, "encoding", "malformed",
             _LOOPBACK, "'o' octal prefix some parsers read as 0177", family="ip-encoding",
             source=f"{_PATT} (Bypass using octal IP)"),
    SsrfCase("enc-loopback-octal-0o-prefix-0o177.0.0.1", "0o177.0.0.1", CASE_PORT, "encoding", "malformed",
             _LOOPBACK, "'0o' octal prefix some parsers read as 0177", family="ip-encoding",
             source=f"{_PATT} (Bypass using octal IP)"),
    SsrfCase("enc-loopback-crlf-percent-encoded", "127.0.0.1%0d%0a.public-origin.lab.test", CASE_PORT,
             "encoding", "malformed", _LOOPBACK, "percent-encoded CRLF inside the host",
             family="ip-encoding", source=f"{_ORANGE} (CRLF injection); {_PATT} (Bypass using URL encoding)"),
    SsrfCase("enc-loopback-tab-name-127.0.0.1-pct09-foo", "127.0.0.1%09foo.public-origin.lab.test", CASE_PORT,
             "encoding", "malformed", _LOOPBACK, "percent-encoded TAB: glibc stops at the whitespace",
             family="ip-encoding", source=f"{_ORANGE} (http://127.0.0.1%2509foo.google.com)"),
    SsrfCase("port-plus-sign-trailing-letters", _LOOPBACK, CASE_PORT, "authority_syntax", "malformed", _LOOPBACK,
             "localhost:+11211aaa style port", raw_authority="127.0.0.1:+80aaa", family="port",
             source=f"{_PATT} (Bypass using malformed urls)"),
    SsrfCase("port-leading-zeros-trailing-letters", _LOOPBACK, CASE_PORT, "authority_syntax", "malformed",
             _LOOPBACK, "localhost:00011211aaaa style port", raw_authority="127.0.0.1:00080aaaa", family="port",
             source=f"{_PATT} (Bypass using malformed urls)"),
    SsrfCase("port-two-ports-orange", _LOOPBACK, CASE_PORT, "authority_syntax", "malformed", _LOOPBACK,
             "http://127.0.0.1:11211:80/: parsers take the first or the last port",
             raw_authority="127.0.0.1:80:8080", family="port", source=f"{_ORANGE} (port confusion)"),
    # DNS names that answer a special-use address (the lab stub answers what the real service does).
    SsrfCase("name-spoofed.burpcollaborator.net", "spoofed.burpcollaborator.net", CASE_PORT, "name", "denied",
             _LOOPBACK, "public name whose A record is 127.0.0.1", family="dns-name",
             source=f"{_PATT} (Bypass localhost with a domain redirection)"),
    SsrfCase("name-nip.io-embedded-label", "customer1.app.localhost.my.company.127.0.0.1.nip.io", CASE_PORT,
             "name", "denied", _LOOPBACK, "nip.io answers the dotted address before .nip.io", family="dns-name",
             source=f"{_PATT} (Bypass localhost with a domain redirection)"),
    SsrfCase("name-nip.io-metadata", "169.254.169.254.nip.io", CASE_PORT, "name", "denied", _METADATA,
             "nip.io echoing the metadata address", family="dns-name", source="nip.io (dotted form)"),
    SsrfCase("name-nip.io-hex", "magic.7f000001.nip.io", CASE_PORT, "name", "denied", _LOOPBACK,
             "nip.io hex form: 7f000001 -> 127.0.0.1", family="dns-name", source="nip.io (hex form)"),
    SsrfCase("name-sslip.io-dashed-metadata", "169-254-169-254.sslip.io", CASE_PORT, "name", "denied", _METADATA,
             "sslip.io dashed form -> 169.254.169.254", family="dns-name", source="sslip.io (dashed form)"),
    SsrfCase("name-sslip.io-private", "10.0.0.1.sslip.io", CASE_PORT, "name", "denied", "10.0.0.1",
             "sslip.io dotted form -> 10.0.0.1", family="dns-name", source="sslip.io (dotted form)"),
    SsrfCase("name-mail.ebc.apple.com", "mail.ebc.apple.com", CASE_PORT, "name", "denied", "127.0.0.6",
             "public name whose A record is 127.0.0.6", family="dns-name",
             source=f"{_PATT} (Bypass localhost with a domain redirection)"),
    SsrfCase("name-bugbounty.dod.network", "bugbounty.dod.network", CASE_PORT, "name", "denied", "127.0.0.2",
             "public name whose A record is 127.0.0.2", family="dns-name",
             source=f"{_PATT} (Bypass localhost with a domain redirection)"),
    SsrfCase("name-1u.ms-metadata", "make-169.254.169.254-rr.1u.ms", CASE_PORT, "name", "denied", _METADATA,
             "1u.ms answers the address in the name", family="dns-name",
             source=f"{_PATT} (Bypassing using DNS Rebinding: 1u.ms)"),
    SsrfCase("name-metadata-gcp-short", "metadata", CASE_PORT, "name", "denied", _METADATA,
             "GCP's short metadata name, GET /computeMetadata/v1/", family="dns-name",
             source=f"{_CUJANOVIC} cloud-metadata.txt (Google Cloud)", suffix="/computeMetadata/v1/"),
    # URL-parser confusion: the text after the last '@' names a public host, the RFC 3986 authority
    # (ended by the first '/', '?' or '#') a special one. Only an absolute-form URL has these parts.
    SsrfCase("url-confusion-query-at-metadata", _METADATA, CASE_PORT, "authority_syntax", "denied", _METADATA,
             "'?@public' after the authority: the host is 169.254.169.254", raw_authority="169.254.169.254:80",
             family="url-confusion", source=f"{_ORANGE}; issue #9", forms=("absolute",),
             suffix=f"?@{_PUBLIC_NAME}/"),
    SsrfCase("url-confusion-path-query-at-loopback", _LOOPBACK, CASE_PORT, "authority_syntax", "denied", _LOOPBACK,
             "'/?@public' after the authority", raw_authority="127.0.0.1:80", family="url-confusion",
             source=_ORANGE, forms=("absolute",), suffix=f"/?@{_PUBLIC_NAME}/"),
    SsrfCase("url-confusion-path-at-private", "10.0.0.1", CASE_PORT, "authority_syntax", "denied", "10.0.0.1",
             "'/@public' in the path", raw_authority="10.0.0.1:80", family="url-confusion", source=_ORANGE,
             forms=("absolute",), suffix=f"/@{_PUBLIC_NAME}/"),
    SsrfCase("url-confusion-mapped-query-at", "[::ffff:169.254.169.254]", CASE_PORT, "authority_syntax", "denied",
             _METADATA, "'?@public' after an IPv4-mapped metadata literal", raw_authority="[::ffff:169.254.169.254]:80",
             family="url-confusion", source=_ORANGE, forms=("absolute",), suffix=f"?@{_PUBLIC_NAME}/"),
    SsrfCase("url-confusion-fragment-at-metadata", _METADATA, CASE_PORT, "authority_syntax", "malformed", _METADATA,
             "'#@public': a fragment never belongs in a request-target (RFC 9112 §3.2)",
             raw_authority="169.254.169.254:80", family="url-confusion", source=f"{_ORANGE} (http://google.com#@evil.com/)",
             forms=("absolute",), suffix=f"#@{_PUBLIC_NAME}/"),
    SsrfCase("url-confusion-fragment-backslash-at-loopback", _LOOPBACK, CASE_PORT, "authority_syntax", "malformed",
             _LOOPBACK, "'#\\@public' after the port", raw_authority="127.0.0.1:80", family="url-confusion",
             source=f"{_PATT} (weak parser: http://127.1.1.1:80#\\@127.2.2.2:80/)", forms=("absolute",),
             suffix=f"#\\@{_PUBLIC_NAME}/"),
    # Scheme case: RFC 3986 §3.1 says schemes compare case-insensitively, so HTTP:// is http://.
    SsrfCase("scheme-case-upper-loopback", _LOOPBACK, CASE_PORT, "authority_syntax", "denied", _LOOPBACK,
             "HTTP:// in capitals", family="scheme-case", source=FAMILIES["scheme-case"], forms=("absolute",),
             scheme="HTTP"),
    SsrfCase("scheme-case-mixed-metadata", _METADATA, CASE_PORT, "authority_syntax", "denied", _METADATA,
             "Http:// mixed case", family="scheme-case", source="RFC 3986 §3.1", forms=("absolute",), scheme="Http"),
    SsrfCase("scheme-case-mixed-private", "10.0.0.1", CASE_PORT, "authority_syntax", "denied", "10.0.0.1",
             "hTTp:// mixed case", family="scheme-case", source="RFC 3986 §3.1", forms=("absolute",), scheme="hTTp"),
    SsrfCase("scheme-case-upper-ipv6-loopback", "[::1]", CASE_PORT, "authority_syntax", "denied", "::1",
             "HTTP:// with an IPv6 literal", family="scheme-case", source="RFC 3986 §3.1", forms=("absolute",),
             scheme="HTTP"),
)
# fmt: on


# Other schemes in an absolute-form target. Every case above is written http:// (in any case); a proxy that runs its
# destination check in its http:// path and hands any other scheme to another one (an https:// URL it originates TLS
# for, a ws:// upgrade, a URL library that speaks gopher:// or dict:// -- the classic way into Redis or memcached)
# dials a special-use address for them. The reference refuses every scheme but http (400; OpenShell answers https://
# with "use CONNECT", network.md §4); any refusal passes, a dial fails. https, wss and ws use their default port
# (443, 443, 80); the others name port 80, which the bundled policies admit: on their own default port (21, 22, 389,
# 70, 2628) the port allowlist would refuse them before any destination check, and a proxy without one would pass.
_OTHER_SCHEMES: tuple[tuple[str, str], ...] = (
    ("https", ""), ("wss", ""), ("ws", ""), ("ftp", ":80"), ("sftp", ":80"), ("ldap", ":80"), ("gopher", ":80"),
    ("dict", ":80"))
_OTHER_SCHEME_DESTINATIONS: tuple[tuple[str, str, str], ...] = (
    ("loopback", _LOOPBACK, _LOOPBACK), ("private", "10.0.0.1", "10.0.0.1"), ("metadata", _METADATA, _METADATA))


def _other_scheme_cases() -> tuple[SsrfCase, ...]:
    """Each of :data:`_OTHER_SCHEMES` to each of :data:`_OTHER_SCHEME_DESTINATIONS`, absolute-form only, and
    https:// to the IPv6 loopback."""
    destinations = [*_OTHER_SCHEME_DESTINATIONS, ("ipv6-loopback", "[::1]", "::1")]
    return tuple(
        SsrfCase(f"other-scheme-{scheme}-{slug}", host, 443 if scheme in ("https", "wss") and not port else 80,
                 "authority_syntax", "malformed", canary, f"{scheme}:// to {host}{port or ' (its default port)'}",
                 raw_authority=host + port, family="other-scheme", source=FAMILIES["other-scheme"],
                 forms=("absolute",), scheme=scheme)
        for scheme, port in _OTHER_SCHEMES for slug, host, canary in destinations
        if slug != "ipv6-loopback" or scheme == "https")


def _hand_written() -> list[SsrfCase]:
    cases = []
    for case in _ENCODING_CASES:
        family = _family_of(case)
        cases.append(dataclasses.replace(case, family=family, source=FAMILIES[family]))
    # Names last (the catalogue ends with the cases that need the lab's stub resolver).
    return sorted([*cases, *_CORPUS_CASES, *_other_scheme_cases()], key=lambda case: case.kind == "name")


# --------------------------------------------------------------------------------------------
# IPv4-carrying IPv6 forms, generated (network.md section 1.4)
# --------------------------------------------------------------------------------------------

# A public IPv4 (the lab's public origin) for the wrapper cases: each wrapper but IPv4-mapped is denied
# even when what it carries is public, because it reaches IPv4 through a translator or relay the sandbox
# does not control.  (wrapper slug, prefix, how the IPv4 is placed, source)
_PUBLIC_IPV4 = IPv4Address("11.0.0.10")
_TEREDO_SERVER = IPv4Address("65.54.227.120")  # the server in RFC 4380 section 4's example, 4136:e378


def _in_low_32(prefix: str) -> Callable[[IPv4Address], IPv6Address]:
    return lambda ipv4: IPv6Address(int(IPv6Address(prefix)) | int(ipv4))


def _nat64_local_48(ipv4: IPv4Address) -> IPv6Address:
    # RFC 6052 section 2.2, /48 prefix: IPv4 bits 0-15 in bits 48-63, bits 64-71 (u) zero, bits 16-31 in 72-87.
    value = int(ipv4)
    return IPv6Address(int(IPv6Address("64:ff9b:1::")) | (value >> 16) << 64 | (value & 0xFFFF) << 40)


def _sixtofour(ipv4: IPv4Address) -> IPv6Address:
    return IPv6Address(0x2002 << 112 | int(ipv4) << 80)  # RFC 3056 section 2: 2002:V4ADDR::/48


def _teredo_client(ipv4: IPv4Address) -> IPv6Address:
    # RFC 4380 section 4: 2001:0:SERVER:FLAGS:PORT:CLIENT, port and client obfuscated (bitwise NOT).
    return IPv6Address(0x2001_0000 << 96 | int(_TEREDO_SERVER) << 64 | 0x8000_63BF << 32 | (~int(ipv4) & 0xFFFF_FFFF))


_WRAPPERS: tuple[tuple[str, Callable[[IPv4Address], IPv6Address], str], ...] = (
    ("ipv4-compatible", _in_low_32("::"), "RFC 4291 §2.5.5.1 (deprecated IPv4-compatible ::/96)"),
    ("siit", _in_low_32("::ffff:0:0:0"), "RFC 2765 / RFC 6145 (SIIT IPv4-translated ::ffff:0:0:0/96)"),
    ("nat64", _in_low_32("64:ff9b::"), "RFC 6052 §2.1 (well-known NAT64 prefix 64:ff9b::/96)"),
    ("nat64-local-use", _nat64_local_48, "RFC 8215 and RFC 6052 §2.2 (local-use NAT64 64:ff9b:1::/48, /48 layout)"),
    ("6to4", _sixtofour, "RFC 3056 §2 (6to4 2002:V4ADDR::/48)"),
    ("teredo-client", _teredo_client, "RFC 4380 §4 (Teredo 2001::/32, client obfuscated)"),
)


def _embedding_cases(table: tuple[SpecialUseRange, ...], taken: set[IPv4Address | IPv6Address]) -> list[SsrfCase]:
    """IPv4-mapped forms of one address of every special-use IPv4 row (a dual-stack socket dials the
    IPv4 itself, so the unwrapped address must be judged by the whole IPv4 table, not a short list), and
    every other wrapper carrying a public IPv4 (denied anyway).  Addresses in ``taken`` are skipped."""
    cases: list[SsrfCase] = []
    for row in table:
        if not isinstance(row.network, IPv4Network):
            continue
        positions = dict(sample_addresses(row, table))
        ipv4 = positions.get("inner", positions.get("only"))
        assert isinstance(ipv4, IPv4Address)
        mapped = IPv6Address(int(_IPV4_MAPPED.network_address) | int(ipv4))
        if mapped in taken:
            continue
        taken.add(mapped)
        cases.append(SsrfCase(
            f"enc6-ipv4-mapped-{_slug(row)}-{ipv4}", _host_text(mapped), CASE_PORT, "ipv6_form", "denied",
            _canary_for(mapped), f"IPv4-mapped {ipv4} ({row.label}): unwrapped, judged by the IPv4 table",
            family="ipv6-form", source=f"RFC 4291 §2.5.5.2; network.md §1.4; {row.label} ({row.cidr})",
            forms=RANGE_FORMS))
    for slug, wrap, source in _WRAPPERS:
        address = wrap(_PUBLIC_IPV4)
        if address in taken:
            continue
        taken.add(address)
        # No translator in the lab: a careless proxy dials the IPv6 literal itself, the canary.
        cases.append(SsrfCase(
            f"enc6-{slug}-of-public-{_PUBLIC_IPV4}", _host_text(address), CASE_PORT, "ipv6_form", "denied",
            str(address), f"{slug} carrying the public {_PUBLIC_IPV4}: the wrapper range is denied anyway",
            family="ipv6-form", source=f"{source}; network.md §1.4 (deny the wrapper range anyway)",
            forms=RANGE_FORMS))
    return cases


def _literal(case: SsrfCase) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(case.target_host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


@functools.cache
def ssrf_cases() -> tuple[SsrfCase, ...]:
    """Every case: range cases, then positive controls, then IPv6 embeddings, then encodings, then the
    corpus families."""
    table = load_special_use_table()
    ranges, controls, hand_written = _range_cases(table), _control_cases(table), _hand_written()
    taken = {ip for case in (*ranges, *controls, *hand_written) if (ip := _literal(case)) is not None}
    catalogue = (*ranges, *controls, *_embedding_cases(table, taken), *hand_written)
    return (*catalogue, *_request_line_cases(catalogue))


SSRF_CASES: tuple[SsrfCase, ...] = ssrf_cases()


def canary_addresses() -> tuple[str, ...]:
    """Every distinct canary the catalogue needs, in first-use order (one listener each)."""
    return tuple(dict.fromkeys(case.canary for case in SSRF_CASES if case.canary is not None))
