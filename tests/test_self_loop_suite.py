"""The self-connection catalogue, its judge and the loop ledger, without a lab (pure, or fakes)."""

from __future__ import annotations

from collections import Counter
from ipaddress import ip_address

import pytest

from pytest_sandbox.catalogues.self_cases import SELF_SPELLINGS, spellings_for
from pytest_sandbox.http.responses import ParsedResponse
from pytest_sandbox.network.addresses import parse_absolute_form, parse_authority
from pytest_sandbox.network.proxy.self_connection import reached_addresses
from pytest_sandbox.network.socket_table import TcpSocket
from pytest_sandbox.probes.self_loop import (
    SELF_CASES,
    LateLoops,
    LoopLedger,
    SelfCase,
    SelfTarget,
    describe_late_loops,
    self_attempt,
    self_case_names,
)
from pytest_sandbox.verdicts.judgement import Verdict
from pytest_sandbox.verdicts.self_loop import LOOP_ORIGIN, LoopEvidence, LoopWindow, judge_self_attempt
from pytest_sandbox.verdicts.ssrf import ProxyReply

ENDPOINT = ("11.0.0.20", 8080)

# --- the catalogue --------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", spellings_for(4), ids=[s.spelling_id for s in spellings_for(4)])
def test_every_ipv4_spelling_reaches_the_proxy_address_and_is_a_valid_authority(spelling):
    host, records = spelling.render("11.0.0.20", "proxy-self-x.lab.test")
    authority = parse_authority(f"{host}:8080")
    assert parse_absolute_form(f"http://{host}:8080/")[1] == authority
    answers = records if spelling.is_name else (str(authority.ip),)
    assert answers, spelling
    for answer in answers:
        assert ip_address("11.0.0.20") in reached_addresses(answer), (spelling.spelling_id, answer)


def test_catalogue_has_the_spellings_the_issue_names():
    ids = {s.spelling_id for s in SELF_SPELLINGS}
    assert {"dotted", "mapped", "mapped-hex", "compatible", "nat64", "6to4", "teredo-client", "name-a",
            "name-aaaa-mapped"} <= ids
    assert spellings_for(4, ("mapped-hex",))[0].render("11.0.0.20")[0] == "[::ffff:b00:14]"


def test_case_ids_are_unique_and_cover_both_forms_and_all_targets():
    ids = [case.test_id for case in SELF_CASES]
    assert len(ids) == len(set(ids))
    assert Counter(case.form for case in SELF_CASES) == {"connect": len(ids) // 2, "absolute": len(ids) // 2}
    assert {(case.kind, case.role) for case in SELF_CASES} == {
        ("own", ""), ("public", ""), ("wildcard", "local"), ("wildcard", "added-later")}
    assert "connect-proxy-self-public-mapped-hex" in ids


def test_name_cases_get_one_lab_name_per_target_with_the_target_address():
    names = self_case_names(SELF_CASES, lambda case: "11.0.0.20" if case.kind == "public" else None)
    assert names == {"proxy-self-public-name-a.lab.test": ("11.0.0.20",),
                     "proxy-self-public-name-aaaa-mapped.lab.test": ("::ffff:11.0.0.20",)}


def test_an_ipv6_proxy_address_uses_the_ipv6_spelling_or_none():
    dotted = next(c for c in SELF_CASES if c.spelling.spelling_id == "dotted" and c.form == "connect")
    mapped = next(c for c in SELF_CASES if c.spelling.spelling_id == "mapped" and c.form == "connect")
    attempt = self_attempt(dotted, ("2600:9000::20", 3128))
    assert attempt is not None and attempt.target == "[2600:9000::20]:3128"
    assert self_attempt(mapped, ("2600:9000::20", 3128)) is None


def test_connect_attempt_sends_a_proxy_request_with_a_nonce_inside_the_tunnel():
    case = SelfCase("public", "", spellings_for(4, ("mapped",))[0], "connect")
    attempt = self_attempt(case, ENDPOINT, nonce="feedface")
    assert attempt is not None
    assert attempt.request_bytes().startswith(b"CONNECT [::ffff:11.0.0.20]:8080 HTTP/1.1\r\n")
    # Absolute-form: an origin at the far end would answer it itself; only a proxy forwards it.
    assert attempt.tunnel_request_bytes().startswith(
        f"GET http://{LOOP_ORIGIN}/proxy-self-loop-feedface HTTP/1.1\r\n".encode())


# --- judging ----------------------------------------------------------------------------------------

MAPPED_CONNECT = self_attempt(SelfCase("public", "", spellings_for(4, ("mapped",))[0], "connect"), ENDPOINT)
MAPPED_ABSOLUTE = self_attempt(SelfCase("public", "", spellings_for(4, ("mapped",))[0], "absolute"), ENDPOINT)


def reply(status: int | None, *, body: bytes = b"", tunnel: int | None = None, closed: bool = True,
          timed_out: bool = False) -> ProxyReply:
    tunnelled = None if tunnel is None else ParsedResponse(tunnel, (), b"")
    return ProxyReply(ParsedResponse(status, (), body), tunnelled, closed=closed, timed_out=timed_out)


REFUSED = reply(403, body=b'{"error":"ssrf_denied"}')
LOOPS = LoopEvidence(ENDPOINT, LoopWindow((("11.0.0.20", 50000),)))
NONE = LoopEvidence(ENDPOINT)
JUDGEMENTS = [
    ("refused-no-loop", MAPPED_CONNECT, REFUSED, NONE, Verdict.BLOCKED,
     "proxy refused: ssrf_denied; no connection to 11.0.0.20:8080 but the harness's own"),
    # The inner instance answers 400 to the origin-form request the outer one forwarded: not a refusal.
    ("inner-400-with-loop", MAPPED_ABSOLUTE, reply(400), LOOPS, Verdict.ALLOWED,
     "looped to the proxy itself: the lab's socket table shows 1 connection(s) to 11.0.0.20:8080"),
    ("tunnel-nonce", MAPPED_CONNECT, reply(200, tunnel=200),
     LoopEvidence(ENDPOINT, nonce_request="GET /proxy-self-loop-x"), Verdict.ALLOWED,
     "origin 11.0.0.10 received 'GET /proxy-self-loop-x'"),
    ("tunnel-without-evidence", MAPPED_CONNECT, reply(200, tunnel=502), NONE, Verdict.ALLOWED, "answered 200"),
    ("refused-table-unreadable", MAPPED_CONNECT, REFUSED, LoopEvidence(ENDPOINT, table_error="EACCES"),
     Verdict.INDETERMINATE, "whether it looped cannot be told: EACCES"),
    ("silent", MAPPED_ABSOLUTE, reply(None, closed=False, timed_out=True), NONE, Verdict.INDETERMINATE,
     "silent timeout"),
]


@pytest.mark.parametrize(("attempt", "proxy_reply", "evidence", "verdict", "phrase"),
                         [row[1:] for row in JUDGEMENTS], ids=[row[0] for row in JUDGEMENTS])
def test_judge_self_attempt(attempt, proxy_reply, evidence, verdict, phrase):
    judgement = judge_self_attempt(attempt, proxy_reply, {}, evidence)
    assert judgement.verdict is verdict, judgement
    assert phrase in judgement.reason, judgement.reason
    assert "loop evidence:" in judgement.observed


# --- the ledger -------------------------------------------------------------------------------------


class FakeLab:
    """A socket table, an ActiveOpens counter and a SYN counter the test moves by hand."""

    def __init__(self) -> None:
        self.rows: list[TcpSocket] = [TcpSocket(ENDPOINT, ("0.0.0.0", 0), 0x0A)]
        self.active_opens = 100
        self.reads = 0
        self.syns = {ENDPOINT: 0}

    def ledger(self) -> LoopLedger:
        """A ledger that reads the SYN counter too."""
        return LoopLedger(self.table, lambda: self.active_opens, lambda: self.syns)

    def proxy_dial(self, peer: tuple[str, int], *, reused: bool = False) -> None:
        """The proxy dials ENDPOINT from ``peer``: a new connection, or the same row again when ``reused``."""
        if reused:
            self.active_opens += 1
        else:
            self.connection(peer)
        self.syns[ENDPOINT] += 1

    def table(self, port: int) -> list[TcpSocket]:
        self.reads += 1
        return [row for row in self.rows if port in (row.local[1], row.remote[1])]

    def connection(self, peer: tuple[str, int]) -> None:
        """A connection from ``peer`` to ENDPOINT, both ends listed, one active open."""
        self.rows += [TcpSocket(peer, ENDPOINT, 1), TcpSocket(ENDPOINT, peer, 1)]
        self.active_opens += 1


class FakeSocket:
    def __init__(self, local: tuple[str, int]) -> None:
        self.local = local

    def getsockname(self) -> tuple[str, int]:
        return self.local


def harness_connect(lab: FakeLab, ledger: LoopLedger, peer: tuple[str, int]) -> None:
    def connect() -> FakeSocket:
        lab.connection(peer)
        return FakeSocket(peer)

    ledger.connect(SelfTarget("public", "", ENDPOINT, connect, "fake"))  # type: ignore[arg-type]


def test_ledger_reads_the_table_only_when_someone_besides_the_harness_connected():
    lab = FakeLab()
    ledger = LoopLedger(lab.table, lambda: lab.active_opens)
    ledger.begin(ENDPOINT)
    assert lab.reads == 1  # the first window reads the baseline
    harness_connect(lab, ledger, ("11.0.0.20", 40001))
    assert ledger.end(ENDPOINT, "refused") == LoopWindow()
    assert lab.reads == 1  # only the harness's own connect: nothing to read
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40002))
    lab.connection(("11.0.0.20", 40003))  # the proxy dials itself during the attempt
    assert ledger.end(ENDPOINT, "looped") == LoopWindow((("11.0.0.20", 40003),))
    assert lab.reads == 2
    assert ledger.sweep() == {}


def test_a_loop_between_attempts_is_late_not_charged_to_the_next_attempt():
    lab = FakeLab()
    ledger = LoopLedger(lab.table, lambda: lab.active_opens)
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40001))
    assert not ledger.end(ENDPOINT, "first")
    lab.connection(("11.0.0.20", 40009))  # after "first" was judged: a late dial
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40002))
    assert not ledger.end(ENDPOINT, "second")
    assert ledger.sweep() == {ENDPOINT: LateLoops(LoopWindow((("11.0.0.20", 40009),)), ("first", "second"))}


def test_a_dial_that_reuses_a_known_4_tuple_is_counted_by_its_syn():
    """The accepting end of an earlier loop is in TIME_WAIT; the proxy's next dial gets the same source port
    (tcp_timewait_state_process accepts the newer SYN), so the table shows no new peer, only the SYN counter."""
    lab = FakeLab()
    ledger = lab.ledger()
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40001))
    lab.proxy_dial(("11.0.0.20", 40003))
    assert ledger.end(ENDPOINT, "first") == LoopWindow((("11.0.0.20", 40003),), reused=0)
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40002))
    lab.proxy_dial(("11.0.0.20", 40003), reused=True)  # the proxy dials itself again, from 40003 again
    assert ledger.end(ENDPOINT, "second") == LoopWindow((), reused=1)
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40004))
    lab.active_opens += 1  # someone else in the lab dialled somewhere else: not a SYN to the endpoint
    assert ledger.end(ENDPOINT, "third") == LoopWindow()


def test_reused_4_tuples_alone_make_a_refused_attempt_a_loop():
    judgement = judge_self_attempt(MAPPED_CONNECT, REFUSED, {}, LoopEvidence(ENDPOINT, LoopWindow(reused=1)))
    assert judgement.verdict is Verdict.ALLOWED, judgement
    assert "counted 1 SYN(s)" in judgement.reason and "TIME_WAIT" in judgement.reason, judgement.reason


def test_sweep_finds_a_loop_after_the_last_attempt():
    lab = FakeLab()
    ledger = LoopLedger(lab.table, lambda: lab.active_opens)
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40001))
    ledger.end(ENDPOINT, "last")
    lab.connection(("11.0.0.20", 40010))
    late = ledger.sweep()
    assert late[ENDPOINT].window.peers == (("11.0.0.20", 40010),)


def test_sweep_counts_a_late_dial_that_reused_a_4_tuple():
    """A proxy that answers first and dials itself later, from the source port of an earlier loop whose
    accepting end is still in TIME_WAIT: no new peer in the table, so only the SYN counter shows it."""
    lab = FakeLab()
    ledger = lab.ledger()
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40001))
    lab.proxy_dial(("11.0.0.20", 40003))
    assert ledger.end(ENDPOINT, "first") == LoopWindow((("11.0.0.20", 40003),))
    lab.proxy_dial(("11.0.0.20", 40003), reused=True)  # after "first" was judged: the same 4-tuple again
    late = ledger.sweep()
    assert late == {ENDPOINT: LateLoops(LoopWindow((), reused=1), ("first",))}
    assert describe_late_loops(late) == (
        "1 late connection(s) to the proxy's own 11.0.0.20:8080 (from 1 that reused a 4-tuple still in "
        "TIME_WAIT, counted by the lab's SYN counter) after the attempts first")


def test_late_loops_found_between_attempts_and_at_the_sweep_add_up():
    lab = FakeLab()
    ledger = lab.ledger()
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40001))
    ledger.end(ENDPOINT, "first")
    lab.proxy_dial(("11.0.0.20", 40009))  # late, seen when "second" begins
    ledger.begin(ENDPOINT)
    harness_connect(lab, ledger, ("11.0.0.20", 40002))
    assert not ledger.end(ENDPOINT, "second")
    lab.proxy_dial(("11.0.0.20", 40009), reused=True)  # late again, reusing 40009's 4-tuple: seen by the sweep
    late = ledger.sweep()
    assert late == {ENDPOINT: LateLoops(LoopWindow((("11.0.0.20", 40009),), reused=1), ("first", "second"))}
    assert describe_late_loops(late).startswith("2 late connection(s) to the proxy's own 11.0.0.20:8080 (from "
                                                "11.0.0.20:40009, 1 more that reused")


def test_a_sweep_reads_the_syn_counts_once_for_all_its_endpoints_after_their_tables():
    """Each read of the SYN counts lists the lab's nft sets (two ``nft`` runs); a sweep needs one. Read after the
    tables: a dial between the two reads then counts as reused (still a loop); read before them, a new peer the
    table shows would cancel a reused dial's SYN and the reuse would be lost."""
    lab = FakeLab()
    other = ("11.0.0.21", 8081)
    lab.rows.append(TcpSocket(other, ("0.0.0.0", 0), 0x0A))
    lab.syns[other] = 0
    reads: list[str] = []

    def table(port: int) -> list[TcpSocket]:
        reads.append(f"table {port}")
        return lab.table(port)

    def syn_counts() -> dict[tuple[str, int], int]:
        reads.append("syns")
        return lab.syns

    ledger = LoopLedger(table, lambda: lab.active_opens, syn_counts)
    ledger.begin(ENDPOINT)
    ledger.begin(other)
    reads.clear()
    lab.proxy_dial(("11.0.0.20", 40009))  # late dials to both endpoints
    lab.rows += [TcpSocket(("11.0.0.21", 40010), other, 1), TcpSocket(other, ("11.0.0.21", 40010), 1)]
    lab.active_opens += 1
    lab.syns[other] += 1
    late = ledger.sweep()
    assert {endpoint: found.window for endpoint, found in late.items()} == {
        ENDPOINT: LoopWindow((("11.0.0.20", 40009),)), other: LoopWindow((("11.0.0.21", 40010),))}
    assert reads == ["table 8080", "table 8081", "syns"]
    reads.clear()
    ledger.begin(ENDPOINT)
    lab.proxy_dial(("11.0.0.20", 40011))  # a loop inside an attempt's window: the table first there too
    assert ledger.end(ENDPOINT, "looped", connects=0) == LoopWindow((("11.0.0.20", 40011),))
    assert reads == ["table 8080", "syns"]
