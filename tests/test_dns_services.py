"""The lab stub answers the corpora's wildcard DNS services by rule, as the real services do.

``service_answers`` is pure and table-tested here; the zone falls back to it for names it holds no
row for (a rebinding rule steps per query type); every catalogue name under such a service resolves
by rule to exactly the canary its case names, so the rows the lab seeds and the rules agree.
"""

from __future__ import annotations

import pytest

from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES
from pytest_sandbox.network.dns_stub import (
    DnsZone,
    QueryType,
    ResponseCode,
    answer_query,
    encode_query,
    parse_response,
    service_answers,
)


@pytest.mark.parametrize(("name", "answers"), [
    # nip.io: dotted, dashed and hex forms, anything in front (https://nip.io)
    ("127.0.0.1.nip.io", (("127.0.0.1",),)),
    ("customer1.app.localhost.my.company.127.0.0.1.nip.io", (("127.0.0.1",),)),
    ("app-10-0-0-1.nip.io", (("10.0.0.1",),)),
    ("magic.7f000001.nip.io", (("127.0.0.1",),)),
    ("magic-a9fea9fe.nip.io", (("169.254.169.254",),)),
    ("Magic.7F000001.NIP.IO.", (("127.0.0.1",),)),  # case-insensitive, root dot (RFC 4343, RFC 1034)
    # sslip.io: the same, plus dashed IPv6 (https://sslip.io)
    ("169-254-169-254.sslip.io", (("169.254.169.254",),)),
    ("www.192.168.0.1.sslip.io", (("192.168.0.1",),)),
    ("--1.sslip.io", (("::1",),)),
    ("fe80--1.sslip.io", (("fe80::1",),)),
    ("fd00-ec2--254.sslip.io", (("fd00:ec2::254",),)),
    # xip.io: dotted quads only
    ("10.0.0.1.xip.io", (("10.0.0.1",),)),
    ("foo.169.254.169.254.xip.io", (("169.254.169.254",),)),
    # localtest.me and everything under it
    ("localtest.me", (("127.0.0.1",),)),
    ("a.b.localtest.me", (("127.0.0.1",),)),
    # 1u.ms: an address, or one address then another (DNS rebinding)
    ("make-169.254.169.254-rr.1u.ms", (("169.254.169.254",),)),
    ("make-1.2.3.4-rebind-169.254.169.254-rr.1u.ms", (("1.2.3.4",), ("169.254.169.254",))),
    ("make-11-0-0-10-rbnd-127-0-0-1-rr.1u.ms", (("11.0.0.10",), ("127.0.0.1",))),
    # no rule: the bare domains, names without an address, out-of-range octets, other domains
    ("nip.io", None), ("www.nip.io", None), ("300.1.1.1.nip.io", None), ("foo.10-0-0-1.xip.io", None),
    ("x.1u.ms", None), ("make-nothing-rr.1u.ms", None), ("127.0.0.1.example.com", None),
    ("notlocaltest.me", None),
])
def test_service_answers_what_the_real_service_would(name, answers):
    assert service_answers(name) == answers


def _ask(zone: DnsZone, name: str, qtype: int = QueryType.A):
    return parse_response(answer_query(zone, encode_query(name, qtype, 7)))


def test_the_zone_answers_by_rule_where_it_has_no_row_and_its_rows_win():
    zone = DnsZone({"127.0.0.1.nip.io": ["10.0.0.1"]})
    assert _ask(zone, "127.0.0.1.nip.io").addresses == ["10.0.0.1"]  # an explicit row wins
    assert _ask(zone, "app.169.254.169.254.nip.io").addresses == ["169.254.169.254"]
    assert _ask(zone, "app.169.254.169.254.nip.io", QueryType.AAAA).addresses == []  # NODATA, not NXDOMAIN
    assert _ask(zone, "app.169.254.169.254.nip.io", QueryType.AAAA).rcode == ResponseCode.NOERROR
    assert _ask(zone, "www.nip.io").rcode == ResponseCode.NXDOMAIN
    assert _ask(DnsZone(services=False), "localtest.me").rcode == ResponseCode.NXDOMAIN


def test_a_1u_ms_rebinding_name_alternates_per_query_type():
    zone = DnsZone()
    name = "make-11.0.0.10-rebind-169.254.169.254-rr.1u.ms"
    seen = [_ask(zone, name).addresses for _ in range(4)]
    assert seen == [["11.0.0.10"], ["169.254.169.254"], ["11.0.0.10"], ["169.254.169.254"]]
    assert _ask(zone, name, QueryType.AAAA).addresses == []  # its own counter: A's steps are not consumed


def test_every_catalogue_name_under_a_service_resolves_by_rule_to_its_canary():
    covered = [case for case in SSRF_CASES if case.kind == "name" and service_answers(case.target_host)]
    assert {case.case_id for case in covered} >= {
        "name-localtest.me", "name-nip.io-loopback", "name-nip.io-embedded-label", "name-nip.io-metadata",
        "name-nip.io-hex", "name-sslip.io-dashed-metadata", "name-sslip.io-private", "name-1u.ms-metadata"}
    for case in covered:
        assert service_answers(case.target_host) == ((case.canary,),), case.case_id


def test_the_lab_stub_answers_a_service_name_no_case_seeded(_network_lab):
    assert _network_lab.lookup("never-seeded.10-0-0-1.nip.io") == ["10.0.0.1"]
    assert _network_lab.lookup("sub.never-seeded.localtest.me") == ["127.0.0.1"]
