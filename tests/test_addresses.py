"""Specification tests for address classification, authority parsing and the SSRF catalogue.

Everything here is pure: no socket is opened and no name is resolved.
"""

from __future__ import annotations

import csv
import io
import re
from importlib import resources
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from pathlib import Path

import pytest

from pytest_sandbox.catalogues.ssrf_cases import (
    CASE_PORT,
    SSRF_CASES,
    SsrfCase,
    canary_addresses,
    sample_addresses,
)
from pytest_sandbox.network import addresses
from pytest_sandbox.network.addresses import (
    Authority,
    MalformedTarget,
    SpecialUseRange,
    classify_address,
    load_special_use_table,
    parse_absolute_form,
    parse_authority,
)

TABLE = load_special_use_table()

# network.md section 1.1 and 1.2, restated independently of the CSV so a dropped row is caught.
IANA_IPV4_ROWS = {
    "0.0.0.0/8", "0.0.0.0/32", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.0.0/29", "192.0.0.8/32", "192.0.0.9/32", "192.0.0.10/32",
    "192.0.0.170/32", "192.0.0.171/32", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24",
    "192.88.99.0/24", "192.88.99.2/32", "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "240.0.0.0/4", "255.255.255.255/32",
}  # fmt: skip
IANA_IPV6_ROWS = {
    "::1/128", "::/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
    "100:0:0:1::/64", "2001::/23", "2001::/32", "2001:1::1/128", "2001:1::2/128", "2001:1::3/128",
    "2001:2::/48", "2001:3::/32", "2001:4:112::/48", "2001:10::/28", "2001:20::/28", "2001:30::/28",
    "2001:db8::/32", "2002::/16", "2620:4f:8000::/48", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10",
}  # fmt: skip
# network.md section 1.3 (the proxy's own address is a runtime check, not a row).
SANDBOX_EXTRA_RANGES = {
    "224.0.0.0/4", "ff00::/8", "fec0::/10", "::/96", "::ffff:0:0:0/96", "64:ff9b::/96",
    "64:ff9b:1::/48", "2002::/16", "2001::/32",
}  # fmt: skip


def _raw_table_lines() -> list[str]:
    return resources.files("pytest_sandbox.network").joinpath("special_use.csv").read_text("utf-8").splitlines()


def _rows_containing(address: IPv4Address | IPv6Address) -> list[SpecialUseRange]:
    return [row for row in TABLE if row.network.version == address.version and address in row.network]


def _most_specific_row(address: IPv4Address | IPv6Address) -> SpecialUseRange:
    return max(_rows_containing(address), key=lambda row: row.network.prefixlen)


# ============================================================================================
# The table
# ============================================================================================


def test_table_holds_every_ipv4_special_purpose_registry_row() -> None:
    assert {row.cidr for row in TABLE if row.source == "iana-v4"} == IANA_IPV4_ROWS


def test_table_holds_every_ipv6_special_purpose_registry_row() -> None:
    assert {row.cidr for row in TABLE if row.source == "iana-v6"} == IANA_IPV6_ROWS


def test_table_holds_every_extra_range_a_sandbox_denies() -> None:
    assert SANDBOX_EXTRA_RANGES <= {row.cidr for row in TABLE}


def test_table_rows_are_unique() -> None:
    cidrs = [row.cidr for row in TABLE]
    assert len(cidrs) == len(set(cidrs))


def test_table_cidrs_are_written_in_canonical_form() -> None:
    data = [line for line in _raw_table_lines() if line and not line.startswith("#")]
    for record in csv.DictReader(io.StringIO("\n".join(data))):
        assert record["cidr"] == str(ip_network(record["cidr"], strict=True))


def test_table_header_comments_carry_the_registry_date_and_the_update_procedure() -> None:
    comments = "\n".join(line for line in _raw_table_lines() if line.startswith("#"))
    assert "July 2026" in comments
    assert "2024-10-22" in comments
    assert "iana-ipv4-special-registry-1.csv" in comments
    assert "iana-ipv6-special-registry-1.csv" in comments
    assert "Update procedure" in comments


def test_table_rows_carry_a_name_an_rfc_and_a_known_source() -> None:
    for row in TABLE:
        assert row.name and row.rfc
        assert row.source in {"iana-v4", "iana-v6", "sandbox-extra"}
        assert row.globally_reachable in {"T", "F", "N/A", "deprecated"}


def test_globally_reachable_anycast_rows_are_recorded_as_such_and_still_denied() -> None:
    reachable = [row for row in TABLE if row.globally_reachable == "T"]
    assert {"192.0.0.9/32", "192.31.196.0/24", "2001:1::3/128", "64:ff9b::/96"} <= {r.cidr for r in reachable}
    for row in reachable:
        assert classify_address(row.network.network_address).denied


def test_complementary_rows_cover_everything_outside_2000_slash_3() -> None:
    outside = [row.network for row in TABLE if row.name.startswith("Outside 2000::/3")]
    total = sum(network.num_addresses for network in outside)
    assert total + ip_network("2000::/3").num_addresses == 2**128
    assert not any(network.overlaps(ip_network("2000::/3")) for network in outside)


@pytest.mark.parametrize("top_three_bits", range(8))
def test_an_ordinary_ipv6_address_is_denied_unless_it_is_inside_2000_slash_3(top_three_bits: int) -> None:
    address = IPv6Address((top_three_bits << 125) | 0x0123_4567_89AB_CDEF_0011_2233_4455)
    verdict = classify_address(address)
    assert verdict.denied is (top_three_bits != 1)


def test_loading_the_table_is_cached() -> None:
    assert load_special_use_table() is load_special_use_table()


# ============================================================================================
# classify_address: every row, its edges, and what lies just outside
# ============================================================================================

ROW_SAMPLES = [
    pytest.param(row, position, address, id=f"{row.cidr}-{position}")
    for row in TABLE
    for position, address in sample_addresses(row, TABLE)
]


@pytest.mark.parametrize(("row", "position", "address"), ROW_SAMPLES)
def test_first_last_and_inner_address_of_every_row_is_denied_naming_the_most_specific_row(
    row: SpecialUseRange, position: str, address: IPv4Address | IPv6Address
) -> None:
    verdict = classify_address(address)
    naming_row = _most_specific_row(address)
    assert verdict.denied, verdict
    assert naming_row.network.subnet_of(row.network)  # type: ignore[arg-type]
    assert naming_row.cidr in verdict.reason
    assert verdict.address == str(address)


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.cidr)
def test_every_row_is_named_by_at_least_one_of_its_own_sample_addresses(row: SpecialUseRange) -> None:
    reasons = [classify_address(address).reason for _, address in sample_addresses(row, TABLE)]
    assert any(row.cidr in reason for reason in reasons), reasons


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.cidr)
def test_sample_addresses_are_the_rows_first_and_last_address(row: SpecialUseRange) -> None:
    samples = dict(sample_addresses(row, TABLE))
    if row.network.num_addresses == 1:
        assert samples == {"only": row.network.network_address}
    else:
        assert samples["first"] == row.network.network_address
        assert samples["last"] == row.network.broadcast_address
        assert samples["inner"] in row.network
        assert samples["inner"] not in (samples["first"], samples["last"])


def test_a_plain_row_denial_reason_names_range_name_and_rfc() -> None:
    verdict = classify_address("169.254.169.254")
    assert verdict == addresses.AddressVerdict(
        address="169.254.169.254",
        denied=True,
        reason="169.254.0.0/16 Link Local (RFC 3927)",
        range="169.254.0.0/16",
    )


def test_a_single_address_row_wins_over_the_block_that_contains_it() -> None:
    assert classify_address("192.0.0.9").range == "192.0.0.9/32"
    assert classify_address("0.0.0.0").range == "0.0.0.0/32"
    assert classify_address("0.1.2.3").range == "0.0.0.0/8"
    assert classify_address("::1").range == "::1/128"


@pytest.mark.parametrize(
    ("outside", "range_edge"),
    [
        ("9.255.255.255", "10.0.0.0/8"),
        ("11.0.0.0", "10.0.0.0/8"),
        ("100.63.255.255", "100.64.0.0/10"),
        ("100.128.0.0", "100.64.0.0/10"),
        ("126.255.255.255", "127.0.0.0/8"),
        ("128.0.0.0", "127.0.0.0/8"),
        ("169.253.255.255", "169.254.0.0/16"),
        ("169.255.0.0", "169.254.0.0/16"),
        ("172.15.255.255", "172.16.0.0/12"),
        ("172.32.0.0", "172.16.0.0/12"),
        ("192.167.255.255", "192.168.0.0/16"),
        ("192.169.0.0", "192.168.0.0/16"),
        ("198.17.255.255", "198.18.0.0/15"),
        ("198.20.0.0", "198.18.0.0/15"),
        ("223.255.255.255", "224.0.0.0/4"),
        ("1.0.0.0", "0.0.0.0/8"),
        ("2001:200::", "2001::/23"),
        ("2001:db9::", "2001:db8::/32"),
        ("2003::", "2002::/16"),
        ("3fff:1000::", "3fff::/20"),
    ],
)
def test_an_address_just_outside_a_range_is_public(outside: str, range_edge: str) -> None:
    assert ip_address(outside) not in ip_network(range_edge)
    assert classify_address(outside) == addresses.AddressVerdict(outside, False, "public", None)


@pytest.mark.parametrize(
    "public", ["8.8.8.8", "1.1.1.1", "9.9.9.9", "2606:4700::1111", "2001:4860:4860::8888"]
)
def test_public_addresses_are_allowed_with_reason_public(public: str) -> None:
    verdict = classify_address(public)
    assert (verdict.denied, verdict.reason, verdict.range) == (False, "public", None)


def test_ipaddress_objects_and_text_are_judged_alike() -> None:
    for text in ("10.1.2.3", "fd00:ec2::254", "8.8.8.8", "::ffff:127.0.0.1"):
        assert classify_address(ip_address(text)) == classify_address(text)


@pytest.mark.parametrize(
    "not_a_literal", ["127.1", "0x7f000001", "2130706433", "[::1]", "localhost", "", "1.2.3.4 "]
)
def test_classify_refuses_text_that_is_not_a_strict_address_literal(not_a_literal: str) -> None:
    with pytest.raises(MalformedTarget) as raised:
        classify_address(not_a_literal)
    assert raised.value.reason == "not_an_ip_literal"


# ============================================================================================
# classify_address: IPv6 forms that carry IPv4 (network.md section 1.4)
# ============================================================================================


@pytest.mark.parametrize(
    ("address", "wrapper", "embedded", "embedded_range"),
    [
        ("::ffff:169.254.169.254", "IPv4-mapped ::ffff:0:0/96", "169.254.169.254", "169.254.0.0/16"),
        ("::ffff:127.0.0.1", "IPv4-mapped ::ffff:0:0/96", "127.0.0.1", "127.0.0.0/8"),
        ("::ffff:10.0.0.1", "IPv4-mapped ::ffff:0:0/96", "10.0.0.1", "10.0.0.0/8"),
        ("::169.254.169.254", "IPv4-compatible ::/96", "169.254.169.254", "169.254.0.0/16"),
        ("::127.0.0.1", "IPv4-compatible ::/96", "127.0.0.1", "127.0.0.0/8"),
        ("::ffff:0:a9fe:a9fe", "SIIT IPv4-translated ::ffff:0:0:0/96", "169.254.169.254", "169.254.0.0/16"),
        ("::ffff:0:7f00:1", "SIIT IPv4-translated ::ffff:0:0:0/96", "127.0.0.1", "127.0.0.0/8"),
        ("64:ff9b::a9fe:a9fe", "NAT64 64:ff9b::/96", "169.254.169.254", "169.254.0.0/16"),
        ("64:ff9b::7f00:1", "NAT64 64:ff9b::/96", "127.0.0.1", "127.0.0.0/8"),
        ("64:ff9b::6440:1", "NAT64 64:ff9b::/96", "100.64.0.1", "100.64.0.0/10"),
        ("2002:a9fe:a9fe::", "6to4 2002::/16", "169.254.169.254", "169.254.0.0/16"),
        ("2002:7f00:1::", "6to4 2002::/16", "127.0.0.1", "127.0.0.0/8"),
        ("2002:c0a8:101:1::1", "6to4 2002::/16", "192.168.1.1", "192.168.0.0/16"),
        ("2001:0:a9fe:a9fe::f7f7:f7f7", "Teredo 2001::/32", "server 169.254.169.254", "169.254.0.0/16"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo 2001::/32", "client 127.0.0.1", "127.0.0.0/8"),
        (
            "2001:0:4136:e378:8000:63bf:5601:5601",
            "Teredo 2001::/32",
            "client 169.254.169.254",
            "169.254.0.0/16",
        ),
    ],
)
def test_an_embedded_special_ipv4_is_unwrapped_and_its_range_named(
    address: str, wrapper: str, embedded: str, embedded_range: str
) -> None:
    verdict = classify_address(address)
    assert verdict.denied
    assert verdict.range == embedded_range
    assert verdict.reason.startswith(f"{wrapper} embeds {embedded} -> {embedded_range} ")


def test_the_6to4_reason_reads_as_the_documented_example() -> None:
    reason = classify_address("2002:a9fe:a9fe::").reason
    assert "6to4 2002::/16 embeds 169.254.169.254 -> 169.254.0.0/16 Link Local" in reason


def test_a_teredo_address_whose_server_and_client_are_both_special_names_both() -> None:
    # server 10.0.0.1 (bits 32-63), client NOT(0x80fffffe) = 127.0.0.1
    verdict = classify_address("2001:0:a00:1::80ff:fffe")
    assert "server 10.0.0.1 -> 10.0.0.0/8" in verdict.reason
    assert "client 127.0.0.1 -> 127.0.0.0/8" in verdict.reason
    assert verdict.range == "10.0.0.0/8"


@pytest.mark.parametrize(
    ("address", "wrapper_range"),
    [
        ("::8.8.8.8", "::/96"),
        ("::ffff:0:808:808", "::ffff:0:0:0/96"),
        ("64:ff9b::808:808", "64:ff9b::/96"),
        ("64:ff9b::1.1.1.1", "64:ff9b::/96"),
        ("2002:808:808::", "2002::/16"),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", "2001::/32"),
    ],
)
def test_a_wrapper_carrying_a_public_ipv4_is_denied_anyway(address: str, wrapper_range: str) -> None:
    verdict = classify_address(address)
    assert verdict.denied
    assert verdict.range == wrapper_range
    assert "public" in verdict.reason and wrapper_range in verdict.reason


@pytest.mark.parametrize("address", ["::ffff:8.8.8.8", "::ffff:1.1.1.1", "::ffff:100.63.255.255"])
def test_an_ipv4_mapped_public_address_is_judged_as_its_ipv4_and_allowed(address: str) -> None:
    verdict = classify_address(address)
    assert (verdict.denied, verdict.reason, verdict.range) == (False, "public", None)


@pytest.mark.parametrize("address", ["64:ff9b:1::808:808", "64:ff9b:1::1", "64:ff9b:1:ffff::a9fe:a9fe"])
def test_the_local_use_nat64_prefix_is_denied_outright(address: str) -> None:
    verdict = classify_address(address)
    assert verdict.denied
    assert verdict.range == "64:ff9b:1::/48"


def test_the_ipv4_compatible_form_of_loopback_is_not_mistaken_for_unspecified_or_loopback_rows() -> None:
    # ::1 and :: are their own rows; ::7f00:1 is an IPv4-compatible wrapper around 127.0.0.1.
    assert classify_address("::1").range == "::1/128"
    assert classify_address("::").range == "::/128"
    assert classify_address("::7f00:1").range == "127.0.0.0/8"


# ============================================================================================
# classify_address: the addresses Python's is_global gets wrong (network.md section 2)
# ============================================================================================

WRONGLY_GLOBAL_ON_PYTHON_3_11 = [
    "192.0.0.100", "192.88.99.2", "224.0.0.1", "ff02::1", "::ffff:224.0.0.1", "2002:7f00:1::",
    "64:ff9b::7f00:1", "64:ff9b:1::1", "3fff::1", "5f00::1", "100:0:0:1::1", "fec0::1",
    "::127.0.0.1", "::ffff:0:7f00:1",
]  # fmt: skip
OTHER_IPADDRESS_SURPRISES = [
    "192.31.196.1", "2001:1::3", "100.64.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe", "240.0.0.1", "255.255.255.255", "0.1.2.3",
]  # fmt: skip


@pytest.mark.parametrize("address", WRONGLY_GLOBAL_ON_PYTHON_3_11 + OTHER_IPADDRESS_SURPRISES)
def test_addresses_python_calls_global_or_misjudges_are_denied(address: str) -> None:
    verdict = classify_address(address)
    assert verdict.denied, verdict
    assert verdict.range is not None


def test_the_classifier_never_consults_python_address_properties() -> None:
    source = Path(addresses.__file__).read_text("utf-8")
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    for forbidden in ("is_global", "is_private", "is_loopback", "is_link_local", "is_reserved",
                      "is_multicast", "is_unspecified", "is_site_local", "ipv4_mapped", "sixtofour",
                      ".teredo"):  # fmt: skip
        assert not re.search(rf"\.{forbidden.lstrip('.')}\b", code), forbidden


# ============================================================================================
# classify_address: scoped addresses
# ============================================================================================


@pytest.mark.parametrize(
    ("scoped", "unscoped_range"),
    [("fe80::1%lo", "fe80::/10"), ("::1%lo", "::1/128"), ("fd00:ec2::254%eth0", "fc00::/7")],
)
def test_a_scoped_special_address_is_denied_and_names_zone_and_range(
    scoped: str, unscoped_range: str
) -> None:
    verdict = classify_address(scoped)
    assert verdict.denied
    assert verdict.range == unscoped_range
    assert "zone" in verdict.reason and unscoped_range in verdict.reason
    assert verdict.address == scoped


def test_a_scoped_public_address_is_denied_because_of_its_zone() -> None:
    verdict = classify_address("2606:4700::1111%eth0")
    assert verdict.denied
    assert "zone" in verdict.reason


def test_a_scoped_ipaddress_object_is_denied_even_though_it_is_unequal_to_its_unscoped_form() -> None:
    scoped = ip_address("fe80::1%lo")
    assert scoped != ip_address("fe80::1")
    assert classify_address(scoped).denied


# ============================================================================================
# parse_authority
# ============================================================================================


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com:443", Authority("example.com", 443, None)),
        ("Example.COM:443", Authority("example.com", 443, None)),
        ("example.com.:443", Authority("example.com", 443, None)),
        ("api.inference.test:8443", Authority("api.inference.test", 8443, None)),
        ("_svc.example-1.com:1", Authority("_svc.example-1.com", 1, None)),
        ("1.2.3.4.nip.io:80", Authority("1.2.3.4.nip.io", 80, None)),
        ("127.0.0.1:65535", Authority("127.0.0.1", 65535, IPv4Address("127.0.0.1"))),
        ("127.0.0.1.:80", Authority("127.0.0.1", 80, IPv4Address("127.0.0.1"))),
        ("0.0.0.0:80", Authority("0.0.0.0", 80, IPv4Address("0.0.0.0"))),
        ("[::1]:443", Authority("::1", 443, IPv6Address("::1"))),
        ("[2001:DB8:0::0001]:443", Authority("2001:db8::1", 443, IPv6Address("2001:db8::1"))),
        (
            "[::ffff:127.0.0.1]:80",
            Authority(str(IPv6Address("::ffff:7f00:1")), 80, IPv6Address("::ffff:7f00:1")),
        ),
    ],
)
def test_a_well_formed_authority_is_canonicalised(text: str, expected: Authority) -> None:
    assert parse_authority(text) == expected


def test_an_authority_may_be_given_as_bytes() -> None:
    assert parse_authority(b"Example.com:443") == Authority("example.com", 443, None)


def test_the_default_port_applies_only_when_the_port_is_absent() -> None:
    assert parse_authority("example.com", default_port=80) == Authority("example.com", 80, None)
    assert parse_authority("[::1]", default_port=80).port == 80
    assert parse_authority("example.com:8080", default_port=80).port == 8080


MALFORMED_AUTHORITIES = [
    # userinfo and '@' (RFC 9110 section 4.2.4)
    ("user@example.com:443", "userinfo"),
    ("allowed@127.0.0.1:80", "userinfo"),
    ("a@b@127.0.0.1:80", "userinfo"),
    ("user:pass@127.0.0.1:80", "userinfo"),
    # backslash
    ("127.1.1.1:80\\@127.2.2.2", "backslash"),
    ("example.com\\:443", "backslash"),
    # NUL, CTL, space, DEL
    ("127.0.0.1\x00.allowed.example:80", "nul_or_ctl"),
    ("127.0.0.1\t:80", "nul_or_ctl"),
    ("127.0.0.1 :80", "nul_or_ctl"),
    (" example.com:443", "nul_or_ctl"),
    ("example.com:443\r\n", "nul_or_ctl"),
    ("example\x7f.com:443", "nul_or_ctl"),
    # non-ASCII (NFKC / UTS 46 would turn these into 127.0.0.1 or localhost)
    ("１２７.0.0.1:80", "non_ascii"),
    ("127。0.0.1:80", "non_ascii"),
    ("127．0．0．1:80", "non_ascii"),
    ("①②⑦.0.0.1:80", "non_ascii"),
    ("ⓛⓞⓒⓐⓛⓗⓞⓢⓣ:80", "non_ascii"),
    ("ｌｏｃａｌｈｏｓｔ:80", "non_ascii"),
    ("bücher.example:443", "non_ascii"),
    ("example.com:８０", "non_ascii"),
    # zone ids and '%'
    ("[fe80::1%lo]:443", "zone_id"),
    ("[fe80::1%25eth0]:443", "zone_id"),
    ("fe80::1%lo:443", "zone_id"),
    ("%31%32%37.0.0.1:80", "zone_id"),
    # brackets and unbracketed IPv6
    ("::1:443", "bad_authority"),
    ("[::1:443", "bad_authority"),
    ("::1]:443", "bad_authority"),
    ("[::1]]:443", "bad_authority"),
    ("[[::1]]:443", "bad_authority"),
    ("[::1]443", "bad_authority"),
    ("[127.0.0.1]:80", "bad_authority"),
    ("[v1.fe80::a]:80", "bad_authority"),
    ("[]:80", "bad_authority"),
    ("ex[ample.com:443", "bad_authority"),
    # ports (RFC 9110 sections 4.2 and 9.3.6)
    ("example.com:+80", "bad_port"),
    ("example.com:-80", "bad_port"),
    ("example.com:00080", "bad_port"),
    ("example.com:080", "bad_port"),
    ("example.com:65536", "bad_port"),
    ("example.com:99999", "bad_port"),
    ("example.com:123456", "bad_port"),
    ("example.com:0", "bad_port"),
    ("example.com:", "bad_port"),
    ("example.com:0x50", "bad_port"),
    ("example.com:80a", "bad_port"),
    ("example.com", "bad_port"),
    ("[::1]", "bad_port"),
    ("[::1]:", "bad_port"),
    ("127.0.0.1:80:80", "bad_authority"),
    # non-canonical IPv4 syntax (inet_aton forms)
    ("2130706433:80", "non_canonical_ipv4"),
    ("0x7f000001:80", "non_canonical_ipv4"),
    ("0X7F000001:80", "non_canonical_ipv4"),
    ("017700000001:80", "non_canonical_ipv4"),
    ("0177.0.0.1:80", "non_canonical_ipv4"),
    ("127.000.000.001:80", "non_canonical_ipv4"),
    ("127.0.0.01:80", "non_canonical_ipv4"),
    ("0x7f.1:80", "non_canonical_ipv4"),
    ("0x7f.0x0.0x0.0x1:80", "non_canonical_ipv4"),
    ("127.1:80", "non_canonical_ipv4"),
    ("127.0.1:80", "non_canonical_ipv4"),
    ("0:80", "non_canonical_ipv4"),
    ("0x:80", "non_canonical_ipv4"),
    ("256.0.0.1:80", "non_canonical_ipv4"),
    ("1.2.3.4.5:80", "non_canonical_ipv4"),
    ("example.123:80", "non_canonical_ipv4"),
    ("example.0x1f:80", "non_canonical_ipv4"),
    ("169.254.43518:80", "non_canonical_ipv4"),
    # names
    ("example.com..:443", "bad_authority"),
    (".example.com:443", "bad_authority"),
    ("a..b:443", "bad_authority"),
    (".:443", "bad_authority"),
    (":443", "bad_authority"),
    ("", "bad_authority"),
    ("exa!mple.com:443", "bad_authority"),
    ("example.com/path:443", "bad_authority"),
    ("example.com?:443", "bad_authority"),
    ("example.com#:443", "bad_authority"),
    (f"{'a' * 64}.example:443", "bad_authority"),
    (f"{'a.' * 127}ab:443", "bad_authority"),
]


@pytest.mark.parametrize(
    ("text", "reason"), MALFORMED_AUTHORITIES, ids=[repr(t) for t, _ in MALFORMED_AUTHORITIES]
)
def test_an_ambiguous_or_invalid_authority_is_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(MalformedTarget) as raised:
        parse_authority(text)
    assert raised.value.reason == reason
    assert str(raised.value)


def test_non_ascii_bytes_are_refused() -> None:
    with pytest.raises(MalformedTarget) as raised:
        parse_authority("ｌｏｃａｌｈｏｓｔ:80".encode())
    assert raised.value.reason == "non_ascii"


def test_a_malformed_target_is_a_value_error_with_a_readable_message() -> None:
    with pytest.raises(ValueError, match="userinfo"):
        parse_authority("a@b:1")


def test_the_longest_allowed_name_is_accepted() -> None:
    name = ".".join(["a" * 63] * 3 + ["a" * 61])
    assert len(name) == 253
    assert parse_authority(f"{name}:443").host == name


# ============================================================================================
# parse_absolute_form
# ============================================================================================


@pytest.mark.parametrize(
    ("target", "authority", "path"),
    [
        ("http://example.com/path?q=1", Authority("example.com", 80, None), "/path?q=1"),
        ("http://example.com", Authority("example.com", 80, None), "/"),
        ("http://example.com?x=1", Authority("example.com", 80, None), "/?x=1"),
        ("HTTP://Example.COM:8080/a/b", Authority("example.com", 8080, None), "/a/b"),
        ("http://example.com./", Authority("example.com", 80, None), "/"),
        ("http://[::1]:8080/", Authority("::1", 8080, IPv6Address("::1")), "/"),
        ("http://169.254.169.254/latest/", Authority("169.254.169.254", 80, IPv4Address("169.254.169.254")),
         "/latest/"),
        ("http://example.com/a@b", Authority("example.com", 80, None), "/a@b"),
        ("http://example.com/%7Euser?a=%20", Authority("example.com", 80, None), "/%7Euser?a=%20"),
    ],
)  # fmt: skip
def test_an_absolute_form_http_target_is_split_into_authority_and_origin_form(
    target: str, authority: Authority, path: str
) -> None:
    assert parse_absolute_form(target) == ("http", authority, path)


def test_an_absolute_form_target_may_be_given_as_bytes() -> None:
    assert parse_absolute_form(b"http://example.com/x") == ("http", Authority("example.com", 80, None), "/x")


MALFORMED_TARGETS = [
    ("https://example.com/", "https_absolute_form"),
    ("HTTPS://example.com/", "https_absolute_form"),
    ("ftp://example.com/", "bad_scheme"),
    ("/origin/form", "bad_scheme"),
    ("example.com:443", "bad_scheme"),
    ("http:/example.com/", "bad_scheme"),
    ("http://allowed@127.0.0.1/", "userinfo"),
    ("http://a@b@127.0.0.1/", "userinfo"),
    ("http://127.1.1.1:80\\@127.2.2.2/", "backslash"),
    ("http://example.com/a\\b", "backslash"),
    ("http://example.com/#frag", "fragment"),
    ("http://example.com#frag", "fragment"),
    ("http://example.com/a b", "nul_or_ctl"),
    ("http://127.0.0.1\x00.allowed.example/", "nul_or_ctl"),
    ("http://１２７.0.0.1/", "non_ascii"),
    ("http:///path", "bad_authority"),
    ("http://example.com:0/", "bad_port"),
    ("http://example.com:/", "bad_port"),
    ("http://0x7f000001/", "non_canonical_ipv4"),
    ("http://127.1/", "non_canonical_ipv4"),
    ("http://[fe80::1%25lo]/", "zone_id"),
    ("http://::1/", "bad_authority"),
]


@pytest.mark.parametrize(("target", "reason"), MALFORMED_TARGETS, ids=[repr(t) for t, _ in MALFORMED_TARGETS])
def test_an_unproxiable_absolute_form_target_is_refused_with_a_reason(target: str, reason: str) -> None:
    with pytest.raises(MalformedTarget) as raised:
        parse_absolute_form(target)
    assert raised.value.reason == reason


# ============================================================================================
# The SSRF catalogue
# ============================================================================================


def _case_id(case: SsrfCase) -> str:
    return case.case_id


def _outcome(authority: Authority) -> str:
    if authority.ip is None:
        return "name"
    return "denied" if classify_address(authority.ip).denied else "allowed"


def test_case_ids_are_unique_and_printable_ascii() -> None:
    ids = [case.case_id for case in SSRF_CASES]
    assert len(ids) == len(set(ids))
    for case_id in ids:
        assert re.fullmatch(r"[a-z0-9][A-Za-z0-9.:_-]*[A-Za-z0-9.:]", case_id), case_id


def test_the_catalogue_stays_within_a_few_hundred_cases() -> None:
    # 403 with the 25 other-scheme cases (each sent in absolute form only, with its twin: about 35 ms of a run).
    assert 200 <= len(SSRF_CASES) <= 450


def test_every_case_has_a_known_kind_and_expectation() -> None:
    for case in SSRF_CASES:
        assert case.kind in {"literal", "encoding", "ipv6_form", "authority_syntax", "name"}, case
        assert case.expected in {"denied", "malformed", "allowed"}, case
        # https:// and wss:// written without a port go to their default, 443 (RFC 9110 §4.2.2, RFC 6455 §3).
        default_443 = (case.family == "other-scheme" and case.scheme in ("https", "wss")
                       and ":" not in (case.raw_authority or ":").rpartition("]")[2])
        assert case.port == (443 if default_443 else CASE_PORT), case
        assert case.note


@pytest.mark.parametrize("case", [c for c in SSRF_CASES if c.expected != "malformed"], ids=_case_id)
def test_every_denied_or_allowed_case_parses_and_classifies_as_expected_in_both_request_forms(
    case: SsrfCase,
) -> None:
    connect_authority = parse_authority(case.authority)
    _, url_authority, path = parse_absolute_form(case.absolute_url)
    assert connect_authority == url_authority
    assert path == (case.suffix if case.suffix.startswith("/") else "/" + case.suffix)  # corpus paths kept
    expected = "name" if case.kind == "name" else case.expected
    assert _outcome(connect_authority) == expected


@pytest.mark.parametrize("case", [c for c in SSRF_CASES if c.expected == "malformed"], ids=_case_id)
def test_every_malformed_case_is_refused_in_both_request_forms(case: SsrfCase) -> None:
    if "connect" in case.forms:  # URL-only cases (a '#@' after the authority) are malformed as URLs
        with pytest.raises(MalformedTarget):
            parse_authority(case.authority)
    with pytest.raises(MalformedTarget):
        parse_absolute_form(case.absolute_url)


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.cidr)
def test_every_table_row_has_a_denied_literal_case_inside_it(row: SpecialUseRange) -> None:
    inside = [
        case
        for case in SSRF_CASES
        if case.kind == "literal"
        and case.expected == "denied"
        and (address := ip_address(case.target_host.strip("[]"))).version == row.network.version
        and address in row.network
    ]
    assert inside


def test_range_cases_cover_first_inner_and_last_of_a_multi_address_row() -> None:
    ids = {case.case_id for case in SSRF_CASES}
    assert {"v4-cgnat-first-100.64.0.0", "v4-cgnat-inner-100.64.0.1", "v4-cgnat-last-100.127.255.255"} <= ids
    assert "v4-limited-broadcast-255.255.255.255" in ids


def test_positive_controls_exist_on_both_sides_of_ipv4_ranges_and_for_ipv6() -> None:
    controls = [case for case in SSRF_CASES if case.expected == "allowed"]
    assert {"100.63.255.255", "100.128.0.0", "9.255.255.255", "11.0.0.0"} <= {c.target_host for c in controls}
    assert any(":" in case.target_host for case in controls)
    for case in controls:
        assert case.canary == case.target_host.strip("[]")
        if ":" in case.target_host:
            assert ip_address(case.target_host.strip("[]")) in ip_network("2000::/3")


def test_positive_controls_are_never_inside_any_table_row() -> None:
    for case in SSRF_CASES:
        if case.expected == "allowed":
            assert not _rows_containing(ip_address(case.target_host.strip("[]"))), case


REQUIRED_ENCODINGS = {
    "2130706433", "0x7f000001", "017700000001", "0177.0.0.1", "127.000.000.001", "0x7f.1", "127.1",
    "127.0.1", "0", "１２７.０.０.１", "127。0。0。1", "①②⑦.⓪.⓪.①", "127.0.0.1\x00.allowed.example",
    "127.0.0.1.", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::127.0.0.1]", "[::ffff:0:7f00:1]",
    "[64:ff9b::7f00:1]", "[64:ff9b::a9fe:a9fe]", "[2002:7f00:1::]", "[2002:a9fe:a9fe::]", "[fe80::1%lo]",
    "[::1]", "::1", "localhost.", "ⓛⓞⓒⓐⓛⓗⓞⓢⓣ", "ｌｏｃａｌｈｏｓｔ", "2852039166", "169.254.169.254.",
    "allowed.example@127.0.0.1", "a@b@127.0.0.1",
}  # fmt: skip


def test_the_catalogue_carries_every_encoding_network_md_lists() -> None:
    hosts = {case.target_host for case in SSRF_CASES}
    assert REQUIRED_ENCODINGS <= hosts, REQUIRED_ENCODINGS - hosts
    authorities = {case.authority for case in SSRF_CASES}
    assert "127.1.1.1:80\\@127.2.2.2" in authorities
    for bad_port in ("+80", "00080", "65536", "0", ""):
        assert f"127.0.0.1:{bad_port}" in authorities


def test_teredo_cases_embed_loopback_and_metadata() -> None:
    teredo = [classify_address(c.target_host.strip("[]")) for c in SSRF_CASES if "teredo" in c.case_id]
    ranges = {verdict.range for verdict in teredo}
    assert {"127.0.0.0/8", "169.254.0.0/16"} <= ranges


def test_encodings_name_the_address_a_resolver_would_really_reach_as_canary() -> None:
    by_id = {case.case_id: case for case in SSRF_CASES}
    assert by_id["enc-loopback-decimal-2130706433"].canary == "127.0.0.1"
    assert by_id["enc-metadata-hex-0xa9fea9fe"].canary == "169.254.169.254"
    assert by_id["enc6-loopback-ipv4-mapped-hex"].canary == "127.0.0.1"
    assert by_id["enc6-loopback-nat64"].canary == "64:ff9b::7f00:1"
    assert by_id["enc-this-host-zero-0"].canary == "127.0.0.1"


def test_literal_cases_use_their_own_address_as_canary_except_where_the_kernel_redirects() -> None:
    for case in SSRF_CASES:
        if case.kind != "literal" or case.expected != "denied":
            continue
        address = ip_address(case.target_host.strip("[]"))
        if isinstance(address, IPv6Address) and address in ip_network("::ffff:0:0/96"):
            address = IPv4Address(int(address) & 0xFFFFFFFF)
        if address == IPv4Address("0.0.0.0"):
            assert case.canary == "127.0.0.1"
        elif address == IPv6Address("::"):
            assert case.canary == "::1"
        elif case.canary is None:
            assert any(
                address.version == net.version and address in net
                for net in map(
                    ip_network, ("224.0.0.0/4", "ff00::/8", "255.255.255.255/32", "127.255.255.255/32")
                )
            ), case
        else:
            assert case.canary == str(address)


def test_canary_addresses_are_distinct_bindable_unicast_literals() -> None:
    canaries = canary_addresses()
    assert len(canaries) == len(set(canaries))
    for canary in canaries:
        address = ip_address(canary)
        assert str(address) == canary
        assert not any(
            address.version == net.version and address in net
            for net in map(
                ip_network, ("224.0.0.0/4", "ff00::/8", "255.255.255.255/32", "0.0.0.0/32", "::/128")
            )
        ), canary


def test_canary_addresses_include_one_listener_for_every_case_canary_and_the_lab_examples() -> None:
    canaries = set(canary_addresses())
    assert {case.canary for case in SSRF_CASES if case.canary is not None} == canaries
    assert {
        "127.0.0.1", "169.254.169.254", "10.0.0.1", "100.64.0.1", "192.0.2.1", "240.0.0.1",
        "fd00:ec2::254", "64:ff9b::7f00:1", "100.100.100.200",
    } <= canaries  # fmt: skip


def test_no_special_address_is_allowed_by_the_catalogue() -> None:
    for case in SSRF_CASES:
        if case.expected == "allowed":
            assert classify_address(case.target_host.strip("[]")).reason == "public"


def test_the_catalogue_is_generated_from_the_table_and_follows_its_order() -> None:
    first_v4 = next(case for case in SSRF_CASES if case.case_id.startswith("v4-"))
    assert ip_address(first_v4.target_host) in TABLE[0].network
    # the hand-written cases end with the names; the request-line family, built from all of them, comes last
    line_cases = [case for case in SSRF_CASES if case.method or case.http_version != "1.1"]
    assert SSRF_CASES[-len(line_cases):] == tuple(line_cases)
    assert SSRF_CASES[-len(line_cases) - 1].kind == "name"
