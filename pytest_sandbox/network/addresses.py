"""Destination-address classification and authority canonicalisation, with no I/O.

Two pure questions an egress proxy must answer before it dials anything:

* ``parse_authority`` / ``parse_absolute_form``: is this CONNECT authority or absolute-form URL
  unambiguous?  Anything two parsers could read differently (userinfo, backslashes, zone ids,
  non-ASCII, inet_aton number forms, odd ports) is refused with ``MalformedTarget`` (a 400).
* ``classify_address``: may the proxy connect to this resolved address?  Judged against the dated
  special-use table in ``network/special_use.csv`` (network.md section 1), unwrapping every IPv6 form
  that carries an IPv4 address (section 1.4).

Python's ``is_global``/``is_private``/``is_loopback``... are deliberately never used: on 3.11 they
call multicast, 6to4-of-loopback, NAT64, 3fff::/20 and more "global", and scoped or IPv4-mapped
forms slip past them (network.md section 2, CVE-2024-4032).  ``ipaddress`` is used only to parse a
strict literal and to test ``address in network`` within one family.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

__all__ = [
    "AddressVerdict",
    "Authority",
    "MalformedTarget",
    "SpecialUseRange",
    "classify_address",
    "embedded_ipv4",
    "load_special_use_table",
    "parse_absolute_form",
    "parse_authority",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


# --------------------------------------------------------------------------------------------
# The special-use table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialUseRange:
    """One row of ``network/special_use.csv``: a range the sandbox never lets a request reach."""

    network: IPNetwork
    name: str
    rfc: str
    globally_reachable: str
    source: str

    @property
    def cidr(self) -> str:
        return str(self.network)

    @property
    def label(self) -> str:
        """The human-readable denial reason for this row, e.g. ``169.254.0.0/16 Link Local (RFC 3927)``."""
        return f"{self.cidr} {self.name} (RFC {self.rfc})"


_TABLE_COLUMNS = ("cidr", "name", "rfc", "globally_reachable", "source")
_TABLE_SOURCES = frozenset({"iana-v4", "iana-v6", "sandbox-extra"})


@functools.cache
def load_special_use_table() -> tuple[SpecialUseRange, ...]:
    """Read the bundled special-use table, in file order. Cached; the file is package data."""
    text = resources.files("pytest_sandbox.network").joinpath("special_use.csv").read_text("utf-8")
    data_lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(data_lines)))
    if tuple(reader.fieldnames or ()) != _TABLE_COLUMNS:
        raise ValueError(f"special_use.csv: header must be {','.join(_TABLE_COLUMNS)}")
    rows = []
    for record in reader:
        if record["source"] not in _TABLE_SOURCES:
            raise ValueError(f"special_use.csv: unknown source {record['source']!r} for {record['cidr']}")
        rows.append(
            SpecialUseRange(
                network=ip_network(record["cidr"], strict=True),
                name=record["name"],
                rfc=record["rfc"],
                globally_reachable=record["globally_reachable"],
                source=record["source"],
            )
        )
    return tuple(rows)


@functools.cache
def _rows_most_specific_first() -> tuple[SpecialUseRange, ...]:
    # Longest prefix first, so a /32 inside a /24 names the /32, and ::1/128 wins over the
    # IPv4-compatible ::/96 and the "outside 2000::/3" ::/3 rows that also contain it.
    return tuple(sorted(load_special_use_table(), key=lambda row: -row.network.prefixlen))


def _most_specific_row(address: IPAddress) -> SpecialUseRange | None:
    for row in _rows_most_specific_first():
        # Same-family check first: cross-family containment is always False (network.md section 2).
        if row.network.version == address.version and address in row.network:
            return row
    return None


# --------------------------------------------------------------------------------------------
# IPv6 forms that carry an IPv4 address (network.md section 1.4)
# --------------------------------------------------------------------------------------------

_LOW_32_BITS = 0xFFFF_FFFF


def _low_32_bits(value: int) -> tuple[tuple[str, IPv4Address], ...]:
    return (("", IPv4Address(value & _LOW_32_BITS)),)


def _sixtofour_bits(value: int) -> tuple[tuple[str, IPv4Address], ...]:
    # RFC 3056 section 2: 2002:V4ADDR::/48, the IPv4 address is bits 16-47.
    return (("", IPv4Address((value >> 80) & _LOW_32_BITS)),)


def _teredo_bits(value: int) -> tuple[tuple[str, IPv4Address], ...]:
    # RFC 4380 section 4: server IPv4 in bits 32-63; client IPv4 is the bitwise NOT of bits 96-127.
    return (
        ("server", IPv4Address((value >> 64) & _LOW_32_BITS)),
        ("client", IPv4Address(~value & _LOW_32_BITS)),
    )


@dataclass(frozen=True)
class _Embedding:
    label: str
    network: IPv6Network
    extract: Callable[[int], tuple[tuple[str, IPv4Address], ...]]
    # IPv4-mapped is the same destination as its IPv4 address; every other wrapper reaches IPv4
    # through a translator or relay the sandbox does not control, so it is denied even when public.
    wrapper_denied: bool


_EMBEDDINGS = (
    # RFC 4291 section 2.5.5.2: a dual-stack socket dials the embedded IPv4 itself.
    _Embedding("IPv4-mapped", IPv6Network("::ffff:0:0/96"), _low_32_bits, wrapper_denied=False),
    # RFC 4291 section 2.5.5.1: deprecated, routed unpredictably.
    _Embedding("IPv4-compatible", IPv6Network("::/96"), _low_32_bits, wrapper_denied=True),
    # RFC 2765 / RFC 6145 SIIT: a translator turns it into IPv4.
    _Embedding("SIIT IPv4-translated", IPv6Network("::ffff:0:0:0/96"), _low_32_bits, wrapper_denied=True),
    # RFC 6052 section 2.1 well-known prefix: a NAT64 gateway dials the embedded IPv4.
    _Embedding("NAT64", IPv6Network("64:ff9b::/96"), _low_32_bits, wrapper_denied=True),
    _Embedding("6to4", IPv6Network("2002::/16"), _sixtofour_bits, wrapper_denied=True),
    _Embedding("Teredo", IPv6Network("2001::/32"), _teredo_bits, wrapper_denied=True),
    # 64:ff9b:1::/48 (RFC 8215) is deliberately absent: where the IPv4 sits depends on the prefix
    # length each deployment picks (RFC 6052 section 2.2), so it is denied outright as a plain row.
)
_EMBEDDING_BY_CIDR = {str(embedding.network): embedding for embedding in _EMBEDDINGS}


def embedded_ipv4(addr: str | IPv4Address | IPv6Address) -> tuple[IPv4Address, ...]:
    """Every IPv4 address an IPv6 form carries, unwrapped by the same table ``classify_address``
    uses (network.md section 1.4): IPv4-mapped, IPv4-compatible, SIIT, NAT64, 6to4, and both Teredo
    addresses.  ``()`` for an IPv4 address or an IPv6 address that embeds none.

    ``::`` and ``::1`` sit in the IPv4-compatible ::/96 and so yield 0.0.0.0 and 0.0.0.1: harmless
    for a caller asking "could this reach X?", which is the question this answers.
    """
    address = _strict_address(addr)
    if isinstance(address, IPv4Address):
        return ()
    unscoped = IPv6Address(int(address))
    found = [
        ipv4
        for embedding in _EMBEDDINGS
        if unscoped in embedding.network
        for _role, ipv4 in embedding.extract(int(unscoped))
    ]
    return tuple(dict.fromkeys(found))


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddressVerdict:
    """Whether a resolved address may be dialled, and why not.

    ``range`` is the CIDR that caused the denial: for an IPv6 form whose embedded IPv4 is special,
    the embedded IPv4 range (the destination actually reached); otherwise the matching table row.
    """

    address: str
    denied: bool
    reason: str
    range: str | None


class MalformedTarget(ValueError):
    """A request target or authority the proxy must refuse with 400 before any lookup.

    ``reason`` is a short machine code (``userinfo``, ``nul_or_ctl``, ``non_ascii``, ``zone_id``,
    ``bad_port``, ``non_canonical_ipv4``, ``bad_authority``, ``backslash``, ``fragment``,
    ``https_absolute_form``, ``bad_scheme``, ``not_an_ip_literal``); ``str(error)`` is the sentence
    to show a human.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def classify_address(addr: str | IPv4Address | IPv6Address) -> AddressVerdict:
    """Judge one address, smokescreen style: the first matching step decides.

    1. A scoped IPv6 address (``fe80::1%lo``) is denied: the zone selects an interface, and
       scoped addresses compare unequal to their unscoped form (network.md section 2).
    2. The most specific special-use row containing the address is found.
    3. If that row is an IPv4-carrying IPv6 form, the embedded IPv4 is judged; the wrapper is denied
       anyway unless it is IPv4-mapped.
    4. Any other row denies.  No row: ``public``.

    ``addr`` as text must be a strict address literal; resolver-style forms (``127.1``,
    ``0x7f000001``) raise ``MalformedTarget``.  Canonicalise authorities with ``parse_authority``.
    """
    address = _strict_address(addr)
    if isinstance(address, IPv6Address) and address.scope_id is not None:
        unscoped = _classify_unscoped(IPv6Address(int(address)))
        detail = unscoped.reason if unscoped.denied else f"{unscoped.address} itself is public"
        return AddressVerdict(
            address=str(address),
            denied=True,
            reason=(
                f"scoped address {address}: a zone id selects an interface (RFC 4007 section 11) "
                f"and is never dialled; {detail}"
            ),
            range=unscoped.range,
        )
    return _classify_unscoped(address)


def _strict_address(addr: str | IPv4Address | IPv6Address) -> IPAddress:
    if isinstance(addr, IPv4Address | IPv6Address):
        return addr
    try:
        return ip_address(addr)
    except ValueError:
        raise MalformedTarget(
            "not_an_ip_literal",
            f"{addr!r} is not a strict IPv4 or IPv6 address literal; canonicalise it with parse_authority",
        ) from None


def _classify_unscoped(address: IPAddress) -> AddressVerdict:
    row = _most_specific_row(address)
    if row is None:
        return AddressVerdict(address=str(address), denied=False, reason="public", range=None)
    if isinstance(address, IPv6Address):
        embedding = _EMBEDDING_BY_CIDR.get(row.cidr)
        if embedding is not None:
            return _judge_embedding(address, row, embedding)
    return AddressVerdict(address=str(address), denied=True, reason=row.label, range=row.cidr)


def _judge_embedding(address: IPv6Address, row: SpecialUseRange, embedding: _Embedding) -> AddressVerdict:
    embedded = [(role, ipv4, _classify_unscoped(ipv4)) for role, ipv4 in embedding.extract(int(address))]
    special = [(role, ipv4, verdict) for role, ipv4, verdict in embedded if verdict.denied]
    if special:
        described = "; ".join(
            f"{role + ' ' if role else ''}{ipv4} -> {verdict.reason}" for role, ipv4, verdict in special
        )
        return AddressVerdict(
            address=str(address),
            denied=True,
            reason=f"{embedding.label} {row.cidr} embeds {described}",
            range=special[0][2].range,
        )
    if not embedding.wrapper_denied:
        return AddressVerdict(address=str(address), denied=False, reason="public", range=None)
    public = " and ".join(f"{role + ' ' if role else ''}{ipv4}" for role, ipv4, _ in embedded)
    return AddressVerdict(
        address=str(address),
        denied=True,
        reason=(
            f"{embedding.label} {row.cidr} (RFC {row.rfc}) embeds public {public}; "
            "the whole wrapper range is denied because it reaches IPv4 through a translator or relay"
        ),
        range=row.cidr,
    )


# --------------------------------------------------------------------------------------------
# Authority canonicalisation (network.md section 3, RFC 9112 section 3.2.3, RFC 9110 section 4.2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    """A canonical ``host:port``: ``host`` lowercased, IP literals in canonical text without
    brackets; ``ip`` is the literal's address, or None when ``host`` is a name to resolve."""

    host: str
    port: int
    ip: IPv4Address | IPv6Address | None


# RFC 9110 section 4.2 / 9.3.6: a port is decimal digits; leading zeros, signs and 0 are refused
# because port parsers disagree about them (network.md section 3).
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_MAX_PORT = 65535
# Canonical dotted quad only: inet_aton also takes 127.1, 0x7f.1, 0177.0.0.1, 2130706433 ...
_DECIMAL_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")
# WHATWG URL "ends in a number": a host whose last label is decimal or 0x-hex is parsed as IPv4 by
# browsers and by inet_aton, so it can never be treated as a DNS name.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
# Host names: letters, digits, hyphen and underscore (RFC 1123 section 2.1 plus the underscore
# real DNS uses); RFC 1035 section 2.3.4 length limits.
_NAME_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_MAX_NAME_LENGTH = 253


def parse_authority(text: str | bytes, *, default_port: int | None = None) -> Authority:
    """Canonicalise a CONNECT authority-form (``host:port``) or the authority of an absolute URL.

    With ``default_port=None`` the port is mandatory (RFC 9112 section 3.2.3).  Everything that
    parsers, resolvers or allowlists could read differently raises ``MalformedTarget``.
    """
    authority = _ascii_text(text, what="authority")
    _refuse_ambiguous_characters(authority, what="authority")
    if "@" in authority:
        # "allowed@127.0.0.1", "a@b@127.0.0.1": parsers disagree on which '@' ends the userinfo.
        raise MalformedTarget(
            "userinfo", f"authority {authority!r} carries userinfo (RFC 9110 section 4.2.4)"
        )
    if "%" in authority:
        # RFC 6874 zone ids ("[fe80::1%25eth0]") select an interface; percent-encoding has no place
        # in a host either.
        raise MalformedTarget(
            "zone_id", f"authority {authority!r} contains '%' (zone id or percent-encoding)"
        )
    if not authority:
        raise MalformedTarget("bad_authority", "empty authority")
    if "/" in authority or "?" in authority or "#" in authority:
        raise MalformedTarget("bad_authority", f"authority {authority!r} contains a path, query or fragment")
    host_text, port_text = _split_host_port(authority)
    port = _parse_port(port_text, authority, default_port)
    if host_text.startswith("["):
        ip: IPAddress | None = _parse_bracketed_ipv6(host_text, authority)
    else:
        ip = None
    if ip is not None:
        return Authority(host=str(ip), port=port, ip=ip)
    return _parse_host(host_text.lower(), authority, port)


def parse_absolute_form(target: str | bytes) -> tuple[str, Authority, str]:
    """Split an absolute-form request-target (RFC 9112 section 3.2.2) into scheme, authority and the
    origin-form path (with query) to send upstream.  Only ``http`` is proxied this way; HTTPS must
    use CONNECT, as OpenShell answers (network.md section 4)."""
    url = _ascii_text(target, what="request-target")
    _refuse_ambiguous_characters(url, what="request-target")
    if "#" in url:
        # RFC 9112 section 3.2: a request-target never carries a fragment.
        raise MalformedTarget("fragment", f"request-target {url!r} contains a fragment ('#')")
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?]*)(.*)", url)
    if match is None:
        raise MalformedTarget("bad_scheme", f"request-target {url!r} is not an absolute-form http:// URL")
    scheme, authority_text, rest = match.group(1).lower(), match.group(2), match.group(3)
    if scheme == "https":
        raise MalformedTarget(
            "https_absolute_form", "use CONNECT for HTTPS URLs, not an absolute-form https:// target"
        )
    if scheme != "http":
        raise MalformedTarget(
            "bad_scheme", f"scheme {scheme!r} is not proxied; only http:// absolute-form is"
        )
    if "@" in authority_text:
        raise MalformedTarget(
            "userinfo", f"URL authority {authority_text!r} carries userinfo (RFC 9110 section 4.2.4)"
        )
    authority = parse_authority(authority_text, default_port=80)
    path = rest if rest.startswith("/") else "/" + rest
    return scheme, authority, path


def _ascii_text(text: str | bytes, *, what: str) -> str:
    # Non-ASCII is refused outright: Python's idna codec applies NFKC before glibc sees a name, so
    # fullwidth digits, circled digits and the ideographic full stop become 127.0.0.1 (section 3).
    if isinstance(text, bytes):
        if not text.isascii():
            raise MalformedTarget("non_ascii", f"{what} {text!r} contains non-ASCII bytes")
        return text.decode("ascii")
    if not text.isascii():
        raise MalformedTarget("non_ascii", f"{what} {text!r} contains non-ASCII characters")
    return text


def _refuse_ambiguous_characters(text: str, *, what: str) -> None:
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in text):
        # A NUL ends the C string glibc resolves ("127.0.0.1\x00.allowed.example").
        raise MalformedTarget("nul_or_ctl", f"{what} {text!r} contains NUL, a control character or space")
    if "\\" in text:
        # urllib and WHATWG split "127.1.1.1:80\@127.2.2.2" at different places.
        raise MalformedTarget("backslash", f"{what} {text!r} contains a backslash")


def _split_host_port(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise MalformedTarget("bad_authority", f"authority {authority!r} has an unbalanced '['")
        host_text, after = authority[: close + 1], authority[close + 1 :]
        if not after:
            return host_text, None
        if not after.startswith(":"):
            raise MalformedTarget(
                "bad_authority", f"authority {authority!r} has text after ']' that is not a port"
            )
        return host_text, after[1:]
    if "[" in authority or "]" in authority:
        raise MalformedTarget("bad_authority", f"authority {authority!r} has a misplaced bracket")
    colons = authority.count(":")
    if colons > 1:
        # "::1:443" could be ::1 port 443 or ::1:443 with no port: RFC 3986 section 3.2.2 requires
        # brackets around IPv6 literals.
        raise MalformedTarget(
            "bad_authority",
            f"authority {authority!r} has more than one ':'; an IPv6 literal needs brackets",
        )
    if colons == 1:
        host_text, port_text = authority.split(":")
        return host_text, port_text
    return authority, None


def _parse_port(port_text: str | None, authority: str, default_port: int | None) -> int:
    if port_text is None:
        if default_port is None:
            raise MalformedTarget("bad_port", f"authority {authority!r} has no port; CONNECT needs host:port")
        return default_port
    if _PORT.fullmatch(port_text) is None or int(port_text) > _MAX_PORT:
        raise MalformedTarget(
            "bad_port", f"port {port_text!r} in {authority!r} is not a decimal number from 1 to 65535"
        )
    return int(port_text)


def _parse_bracketed_ipv6(host_text: str, authority: str) -> IPv6Address:
    inner = host_text[1:-1]
    try:
        return IPv6Address(inner)
    except ValueError:
        raise MalformedTarget(
            "bad_authority", f"{host_text!r} in {authority!r} is not a bracketed IPv6 literal"
        ) from None


def _parse_host(host: str, authority: str, port: int) -> Authority:
    if not host:
        raise MalformedTarget("bad_authority", f"authority {authority!r} has an empty host")
    if host.endswith("."):
        # One trailing dot is the DNS root (WHATWG and curl strip it); "127.0.0.1." must be judged
        # as 127.0.0.1, never matched as a name.  A second dot leaves an empty label below.
        host = host[:-1]
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return Authority(host=host, port=port, ip=_canonical_ipv4(host, labels, authority))
    if len(host) > _MAX_NAME_LENGTH or not all(_NAME_LABEL.fullmatch(label) for label in labels):
        raise MalformedTarget("bad_authority", f"host {host!r} in {authority!r} is not a valid host name")
    return Authority(host=host, port=port, ip=None)


def _canonical_ipv4(host: str, labels: list[str], authority: str) -> IPv4Address:
    if len(labels) == 4 and all(_DECIMAL_OCTET.fullmatch(label) and int(label) <= 255 for label in labels):
        return IPv4Address(host)
    raise MalformedTarget(
        "non_canonical_ipv4",
        f"host {host!r} in {authority!r} is IPv4 syntax but not a canonical dotted quad "
        "(resolvers read decimal, octal, hex and short forms differently)",
    )
