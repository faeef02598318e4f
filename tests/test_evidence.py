"""Attribution of catch-all hits to attempts, without sockets: nonces first, then destination and time."""

from __future__ import annotations

from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES, SsrfCase
from pytest_sandbox.network.lab.attribution import (
    NONCE_HEADER,
    AttemptWindow,
    CatchAllHit,
    attribute,
    candidates_for,
    describe_hit,
    find_nonce,
    new_nonce,
)
from pytest_sandbox.probes.campaign import isolation_rounds, match_hits
from pytest_sandbox.probes.ssrf import Attempt, plausible_destinations

GRACE = 0.5
NONCE_A, NONCE_B, NONCE_C = "sbx-" + "a" * 16, "sbx-" + "b" * 16, "sbx-" + "c" * 16


def window(key: str, nonce: str, destinations: set[str], begin: float, end: float,
           control: str | None = None) -> AttemptWindow:
    return AttemptWindow(key, nonce, frozenset(destinations), begin, end, control)


def hit(index: int, at: float, address: str, received: bytes = b"", port: int = 80) -> CatchAllHit:
    return CatchAllHit(index, at, address, port, received)


WINDOWS = (
    window("metadata-1", NONCE_A, {"169.254.169.254"}, 10.0, 10.01),
    window("control", NONCE_B, {"11.0.0.0"}, 10.02, 10.03, control="11.0.0.0"),
    window("metadata-2", NONCE_C, {"169.254.169.254"}, 10.04, 10.05),
)


def test_nonces_are_fresh_and_found_only_when_known():
    assert new_nonce() != new_nonce()
    data = f"GET /sandbox-probe/{NONCE_A} HTTP/1.1\r\n{NONCE_HEADER}: {NONCE_A}\r\n\r\n".encode()
    assert find_nonce(data) == NONCE_A
    assert find_nonce(data, {NONCE_B}) is None
    assert find_nonce(b"no nonce here") is None


def test_a_hit_carrying_a_nonce_belongs_to_that_attempt_whatever_its_time_or_destination():
    late = hit(0, 99.0, "10.9.9.9", f"GET /x HTTP/1.1\r\n{NONCE_HEADER}: {NONCE_B}\r\n\r\n".encode())
    attribution = attribute([late], WINDOWS, GRACE)
    assert attribution.owners[0] == {"control"} and 0 in attribution.exact


def test_a_late_dial_without_bytes_is_blamed_on_its_destination_not_on_the_control_running_then():
    # metadata-1 ended at 10.01; the dial 200 ms later falls in the control's and metadata-2's windows.
    late = hit(0, 10.21, "169.254.169.254")
    assert candidates_for(late, WINDOWS, GRACE) == {"metadata-1", "metadata-2"}
    assert attribute([late], WINDOWS, GRACE).ambiguous([late]) == [late]


def test_a_hit_is_never_blamed_on_an_attempt_that_began_after_it():
    early = hit(0, 10.035, "169.254.169.254")
    assert candidates_for(early, WINDOWS, GRACE) == {"metadata-1"}


def test_a_dial_later_than_the_grace_period_is_still_blamed_on_its_destination():
    very_late = hit(0, 30.0, "169.254.169.254")
    assert candidates_for(very_late, WINDOWS, GRACE) == {"metadata-1", "metadata-2"}


def test_a_destination_nobody_predicted_is_blamed_on_every_attempt_running_then():
    stray = hit(0, 10.3, "10.0.0.1")
    assert candidates_for(stray, WINDOWS, GRACE) == {"metadata-1", "control", "metadata-2"}


def test_a_hit_no_attempt_can_explain_stays_unattributed():
    before = hit(0, 1.0, "169.254.169.254")
    stray_late = hit(1, 50.0, "10.0.0.1")
    attribution = attribute([before, stray_late], WINDOWS, GRACE)
    assert attribution.unattributed([before, stray_late]) == [before, stray_late]


def test_describe_hit_names_destination_time_and_first_line():
    assert describe_hit(hit(0, 10.5, "fd00:ec2::254"), 10.0) == "[fd00:ec2::254]:80 (+0.500 s, no bytes)"
    assert describe_hit(hit(0, 10.5, "10.0.0.1", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")) == (
        "10.0.0.1:80 (27 bytes: 'GET / HTTP/1.1')")


def test_isolation_rounds_share_a_round_only_between_disjoint_destinations():
    destinations = {"a": frozenset({"1.1.1.1"}), "b": frozenset({"1.1.1.1"}), "c": frozenset({"2.2.2.2"}),
                    "d": frozenset(), "e": frozenset({"2.2.2.2", "3.3.3.3"})}
    assert isolation_rounds(["a", "b", "c", "d", "e"], destinations) == [["a", "c"], ["b", "e"], ["d"]]


def _case(case_id: str) -> SsrfCase:
    return next(case for case in SSRF_CASES if case.case_id == case_id)


def test_match_hits_explains_as_many_hits_as_a_matching_allows_not_just_the_nearest_first():
    # Hit 1 is nearest to a, but a is hit 2's only slot: a greedy nearest-first pass leaves hit 2 unexplained.
    edges = {1: [(0.01, "a"), (0.03, "b")], 2: [(0.02, "a")]}
    assert match_hits(edges, {"a": 1, "b": 1}) == {1: "b", 2: "a"}


def test_match_hits_never_places_more_hits_on_a_slot_than_its_capacity():
    edges = {1: [(0.0, "a")], 2: [(0.1, "a")], 3: [(0.2, "a")]}
    assert match_hits(edges, {"a": 2}) == {1: "a", 2: "a"}  # the third stays unexplained (blamed on all)
    assert match_hits(edges, {}) == {}
    assert match_hits({1: []}, {"a": 1}) == {}


def test_plausible_destinations_cover_every_reading_of_the_target():
    assert plausible_destinations(_case("meta-imds-169.254.169.254")) == {"169.254.169.254"}
    assert plausible_destinations(_case("auth-backslash-at-loopback")) == {"127.1.1.1", "127.2.2.2"}
    assert plausible_destinations(_case("name-localhost")) == {"127.0.0.1", "::1"}
    assert "127.0.0.1" in plausible_destinations(_case("enc6-loopback-6to4"))
    assert "169.254.169.254" in plausible_destinations(_case("enc6-metadata-nat64"))
    assert plausible_destinations(_case("enc6-link-local-zone-id")) == {"fe80::1"}
    assert "127.0.0.1" in plausible_destinations(_case("v4-this-host-0.0.0.0"))


def test_every_attempt_carries_its_nonce_where_a_forwarding_proxy_keeps_it():
    case = _case("meta-imds-169.254.169.254")
    absolute = Attempt(case, "absolute").request_bytes(NONCE_A)
    assert absolute.startswith(f"GET http://169.254.169.254:80/sandbox-probe/{NONCE_A} HTTP/1.1\r\n".encode())
    assert f"{NONCE_HEADER}: {NONCE_A}\r\n".encode() in absolute
    connect = Attempt(case, "connect")
    assert connect.request_bytes(NONCE_A).startswith(b"CONNECT 169.254.169.254:80 HTTP/1.1\r\n")
    assert NONCE_A.encode() in connect.tunnel_request_bytes(NONCE_A)
