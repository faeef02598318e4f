"""The SSRF campaign's retry: an exchange the proxy left unanswered, with no hit, is sent once more and judged
on the retry's answer and the hits of both sends.

On a loaded machine an exchange sometimes gets no answer before its deadline; judged on that alone it is
INDETERMINATE (a denial) or BROKEN (a control) on a healthy proxy. The stalling proxy
(``tests/broken_proxies/stalling.py``) is silent to every request the first time it sees it: behind it the
reference proxy's answers must earn every pass on the retry, a proxy silent forever none, and a proxy that
dials on the retry, or dials the first send's destination late and refuses the retry, must fail every denial
it dialled for. The pure pieces (who is sent again, the budget, what a retried exchange is judged on, where a
late hit goes) are checked without a lab; the network tests run only in a lab namespace of their own.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from broken_proxies.stalling import StallingProxy, request_identity

from pytest_sandbox.fixtures.network import start_lab
from pytest_sandbox.http.responses import ParsedResponse, parse_head
from pytest_sandbox.network.harness import start_proxy
from pytest_sandbox.network.lab.attribution import AttemptWindow, CatchAllHit
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.probes import campaign, smuggling
from pytest_sandbox.probes.campaign import (
    RETRY_BUDGET,
    RETRY_CONCURRENCY,
    RETRY_SUFFIX,
    Campaign,
    ExchangeContext,
    ExchangeResult,
    audit_lab,
    plan_retries,
    retry_candidates,
    retry_evidence,
    settle_late_hits,
)
from pytest_sandbox.probes.ssrf import build_attempts
from pytest_sandbox.probes.ssrf_exchanges import (
    UNMARKED_SUFFIX,
    AttemptExchange,
    SsrfVerdict,
    _MixedObservation,
    retry_note,
    run_ssrf_campaign,
    went_unanswered,
)
from pytest_sandbox.verdicts.judgement import Verdict
from pytest_sandbox.verdicts.ssrf import ProxyReply

# --------------------------------------------------------------------------------------------------
# Pure: who is sent again, and what a retried exchange is judged on
# --------------------------------------------------------------------------------------------------

SILENT = ProxyReply(ParsedResponse(None, (), b""), None, closed=False, timed_out=True)
REFUSED = ProxyReply(parse_head(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"), None, closed=True,
                     timed_out=False)


def _window(key: str, begin: float = 0.0, end: float = 1.0) -> AttemptWindow:
    return AttemptWindow(key, "sbx-0000000000000000", frozenset({"10.0.0.1"}), begin, end)


def _hit(index: int, at: float = 1.2, address: str = "10.0.0.1", received: bytes = b"") -> CatchAllHit:
    return CatchAllHit(index, at, address, 80, received)


def _result(key: str, observation: Any = SILENT, **evidence: Any) -> ExchangeResult:
    return ExchangeResult(key, observation, _window(key), **{"hits": (), **evidence})


def test_an_unanswered_exchange_without_a_hit_is_a_retry_candidate():
    assert retry_candidates([_result("a")], went_unanswered) == ["a"]


def test_an_answered_exchange_is_never_a_retry_candidate():
    assert retry_candidates([_result("a", REFUSED)], went_unanswered) == []


def test_an_unanswered_exchange_with_its_own_hit_is_never_a_retry_candidate():
    assert retry_candidates([_result("a", hits=(_hit(0),), delays=(0.2,))], went_unanswered) == []


def test_an_unanswered_exchange_with_a_shared_hit_is_never_a_retry_candidate():
    shared = _result("a", shared=(_hit(0),), shared_with=("b",))
    assert retry_candidates([shared, _result("b")], went_unanswered) == ["b"]


def test_retry_candidates_keep_campaign_order():
    results = [_result(key, REFUSED if key == "c" else SILENT) for key in "dcab"]
    assert retry_candidates(results, went_unanswered) == ["d", "a", "b"]


def test_no_more_than_the_budget_is_sent_again_and_the_rest_keep_their_first_result():
    candidates = [f"x{n}" for n in range(RETRY_BUDGET + 6)]
    again, kept = plan_retries(candidates)
    assert again == candidates[:RETRY_BUDGET] and kept == candidates[RETRY_BUDGET:]
    assert plan_retries(["a", "b"]) == (["a", "b"], [])
    assert plan_retries(["a", "b", "c"], budget=1) == (["a"], ["b", "c"])


def test_a_retried_exchange_is_judged_on_the_retrys_answer_and_the_hits_of_both_sends():
    late_first = _hit(0, at=2.5, received=b"GET /sandbox-probe/sbx-1 HTTP/1.1\r\n")
    first = _result("a", hits=(late_first,), delays=(1.5,), shared=(_hit(1),), shared_with=("b",))
    retry = ExchangeResult("a", REFUSED, _window("a" + RETRY_SUFFIX, 3.0, 3.1), hits=(_hit(2, at=3.3),),
                           delays=(0.2,), shared=(_hit(3),), shared_with=("c#retry",))
    merged = retry_evidence(first, retry)
    assert merged.observation is REFUSED and merged.window == retry.window
    assert merged.hits == (late_first, _hit(2, at=3.3)) and merged.delays == (1.5, 0.2)
    assert merged.shared == (_hit(1), _hit(3)) and merged.shared_with == ("b", "c#retry")
    assert merged.first_send is first and merged.blamed == merged.hits
    assert merged.describe_hits().startswith("first send: 10.0.0.1:80 1.500 s after it ended")
    assert "retry: 10.0.0.1:80 0.200 s after it ended" in merged.describe_hits()


def test_a_retry_without_hits_leaves_the_first_sends_hits_standing():
    first = _result("a", hits=(_hit(0),), delays=(0.4,))
    merged = retry_evidence(first, ExchangeResult("a", REFUSED, _window("a#retry"), ()))
    assert merged.blamed == (_hit(0),)


def test_a_late_hit_of_one_exchanges_two_sends_is_its_own_and_goes_on_the_retry():
    ends = {"c/a": 1.0, "c/a#retry": 3.0}
    blame = settle_late_hits([_hit(0, at=3.2)], {0: frozenset({"c/a", "c/a#retry"})}, ends)
    assert list(blame) == ["c/a#retry"] and blame["c/a#retry"].hits == [_hit(0, at=3.2)]
    assert blame["c/a#retry"].delays == [pytest.approx(0.2)]


def test_a_late_hit_carrying_the_first_sends_nonce_goes_on_the_first_send():
    blame = settle_late_hits([_hit(0, at=3.2)], {0: frozenset({"c/a"})}, {"c/a": 1.0, "c/a#retry": 3.0})
    assert list(blame) == ["c/a"] and blame["c/a"].delays == [pytest.approx(2.2)]


def test_a_late_hit_of_several_exchanges_is_shared_by_every_one_of_their_sends():
    owners = {0: frozenset({"c/a#retry", "c/b#retry", "c/b#alone1"})}
    blame = settle_late_hits([_hit(0)], owners, {"c/a": 0.5, "c/a#retry": 1.0, "c/b": 0.5, "c/b#retry": 1.0})
    assert set(blame) == {"c/a#retry", "c/b#retry"}
    assert blame["c/a#retry"].shared == [_hit(0)] and blame["c/a#retry"].hits == []
    assert blame["c/a#retry"].shared_with == {"c/b#retry", "c/b#alone1"}
    assert blame["c/b#retry"].shared_with == {"c/a#retry"}


def test_a_late_hit_of_no_send_of_this_campaign_is_left_to_the_audit():
    blame = settle_late_hits([_hit(0), _hit(1)], {0: frozenset({"c0/z"}), 1: frozenset()}, {"c/a": 1.0})
    assert blame == {}


def test_only_an_observation_without_any_http_answer_went_unanswered():
    assert went_unanswered(_result("a", SILENT))
    assert not went_unanswered(_result("a", REFUSED))
    assert not went_unanswered(_result("a", object()))  # an observation that cannot say: answered


def test_a_mixed_answers_exchange_that_dialled_a_public_answer_is_never_sent_again():
    assert not went_unanswered(_result("a", _MixedObservation(SILENT, (("11.0.0.10", 1),))))
    assert went_unanswered(_result("a", _MixedObservation(SILENT, (("11.0.0.10", 0),))))


def test_the_smuggling_campaign_retries_with_the_shared_retry_concurrency():
    assert smuggling.RETRY_CONCURRENCY is campaign.RETRY_CONCURRENCY == 4
    assert smuggling.RETRY_SUFFIX is campaign.RETRY_SUFFIX
    source = inspect.getsource(smuggling)
    assert "RETRY_CONCURRENCY =" not in source and "min(concurrency, RETRY_CONCURRENCY)" in source


def test_a_first_send_and_its_retry_are_one_request_to_the_stalling_proxy():
    head = (b"GET http://10.0.0.1/sandbox-probe/sbx-0123456789abcdef HTTP/1.1\r\n"
            b"X-Sandbox-Probe: sbx-0123456789abcdef\r\n\r\n")
    again = head.replace(b"0123456789abcdef", b"fedcba9876543210")
    twin = b"GET http://10.0.0.1/3f2b8c1e-5d4a-4b6c-9e7f-0a1b2c3d4e5f HTTP/1.1\r\nUser-Agent: curl/8.5.0\r\n\r\n"
    assert request_identity(head) == request_identity(again) != request_identity(twin)


# --------------------------------------------------------------------------------------------------
# The campaign's retry phase, on an in-memory lab (no sockets)
# --------------------------------------------------------------------------------------------------


class InMemoryLab:
    """What a Campaign asks of a lab: the catch-all's hit log, the ledger of windows and the accounting."""

    def __init__(self) -> None:
        self.log: list[CatchAllHit] = []
        self.windows: list[AttemptWindow] = []
        self.accounted: dict[int, str] = {}
        self._lock = threading.Lock()

    def dial(self, address: str, received: bytes = b"") -> None:
        with self._lock:
            self.log.append(CatchAllHit(len(self.log), time.monotonic(), address, 80, received))

    def hit_mark(self) -> int:
        return len(self.log)

    def hits(self, since: int = 0) -> list[CatchAllHit]:
        return self.log[since:]

    def register_attempts(self, windows: Any) -> None:
        self.windows.extend(windows)

    def attempt_windows(self) -> list[AttemptWindow]:
        return list(self.windows)

    def account(self, indices: Any, by: str) -> None:
        for index in indices:
            self.accounted.setdefault(index, by)

    def unaccounted_hits(self) -> list[CatchAllHit]:
        return [hit for hit in self.log if hit.index not in self.accounted]


@dataclass(eq=False)
class Scripted:
    """An exchange whose every send does what ``script(lab, nonce, send_number, nonces)`` says (send 0: the first)."""

    key: str
    script: Callable[[InMemoryLab, str, int, list[str]], Any]
    address: str = "10.0.0.1"

    def __post_init__(self) -> None:
        self.nonces: list[str] = []

    def destinations(self) -> frozenset[str]:
        return frozenset({self.address})

    def control(self) -> str | None:
        return None

    def perform(self, context: ExchangeContext, nonce: str) -> Any:
        self.nonces.append(nonce)
        return self.script(context.lab, nonce, len(self.nonces) - 1, self.nonces)


def _campaign(lab: InMemoryLab, grace: float = 0.05) -> Campaign:
    return Campaign(ExchangeContext(lab, lambda: None), grace=grace, concurrency=16)


def _silent_then_refused(_lab: InMemoryLab, _nonce: str, send: int, _nonces: list[str]) -> ProxyReply:
    return SILENT if send == 0 else REFUSED


def test_the_campaign_sends_again_at_most_the_budget_and_at_most_retry_concurrency_at_once():
    lab = InMemoryLab()
    flight = {"now": 0, "most": 0}
    guard = threading.Lock()

    def silent(_lab: InMemoryLab, _nonce: str, send: int, _nonces: list[str]) -> ProxyReply:
        with guard:
            flight["now"] += 1
            if send:
                flight["most"] = max(flight["most"], flight["now"])
        time.sleep(0.01)
        with guard:
            flight["now"] -= 1
        return SILENT

    exchanges = [Scripted(f"x{n:03}", silent) for n in range(RETRY_BUDGET + 6)]
    results = _campaign(lab, grace=0.0).run(exchanges, retry=went_unanswered)
    retried = [key for key, result in results.items() if result.first_send is not None]
    assert retried == [exchange.key for exchange in exchanges[:RETRY_BUDGET]]
    assert [len(exchange.nonces) for exchange in exchanges] == [2] * RETRY_BUDGET + [1] * 6
    assert all(results[exchange.key].retry_skipped for exchange in exchanges[RETRY_BUDGET:])
    assert "retries were spent" in retry_note(results[exchanges[-1].key])
    assert "sent again after no answer" in retry_note(results[exchanges[0].key])
    assert sum(window.key.endswith(RETRY_SUFFIX) for window in lab.windows) == RETRY_BUDGET
    assert 1 < flight["most"] <= RETRY_CONCURRENCY


def test_without_retry_an_unanswered_exchange_keeps_its_one_send():
    lab = InMemoryLab()
    exchange = Scripted("a", _silent_then_refused)
    result = _campaign(lab).run([exchange])["a"]
    assert result.observation is SILENT and result.first_send is None and len(exchange.nonces) == 1


def test_an_exchange_that_answers_on_the_retry_is_judged_on_that_answer():
    lab = InMemoryLab()
    result = _campaign(lab).run([Scripted("a", _silent_then_refused)], retry=went_unanswered)["a"]
    assert result.observation is REFUSED and result.first_send is not None and result.first_send.observation is SILENT
    assert result.blamed == ()


def test_an_exchange_whose_first_send_dialled_is_never_sent_again():
    lab = InMemoryLab()

    def dial_and_stay_silent(lab: InMemoryLab, nonce: str, send: int, _nonces: list[str]) -> ProxyReply:
        lab.dial("10.0.0.1", f"GET /sandbox-probe/{nonce} HTTP/1.1\r\n".encode())
        return SILENT

    exchange = Scripted("a", dial_and_stay_silent)
    result = _campaign(lab).run([exchange], retry=went_unanswered)["a"]
    assert len(exchange.nonces) == 1 and result.first_send is None and len(result.hits) == 1


def test_a_hit_for_the_first_sends_nonce_that_lands_during_the_retry_counts_against_the_exchange():
    lab = InMemoryLab()

    def late_first_dial(lab: InMemoryLab, _nonce: str, send: int, nonces: list[str]) -> ProxyReply:
        if send == 0:
            return SILENT
        lab.dial("10.0.0.1", f"GET /sandbox-probe/{nonces[0]} HTTP/1.1\r\n".encode())
        return REFUSED

    result = _campaign(lab).run([Scripted("a", late_first_dial)], retry=went_unanswered)["a"]
    assert result.observation is REFUSED and len(result.hits) == 1
    assert result.first_send is not None and result.first_send.hits == result.hits  # the first send's, by its nonce
    assert result.describe_hits().startswith("first send: 10.0.0.1:80")
    assert lab.unaccounted_hits() == []


def test_a_byte_less_dial_during_the_retry_counts_against_the_retry():
    lab = InMemoryLab()

    def dial_on_retry(lab: InMemoryLab, _nonce: str, send: int, _nonces: list[str]) -> ProxyReply:
        if send:
            lab.dial("10.0.0.1")
        return SILENT if send == 0 else REFUSED

    result = _campaign(lab).run([Scripted("a", dial_on_retry)], retry=went_unanswered)["a"]
    assert len(result.hits) == 1 and result.first_send is not None and result.first_send.hits == ()
    assert result.describe_hits().startswith("retry: 10.0.0.1:80")
    assert lab.unaccounted_hits() == []


def test_a_byte_less_dial_two_retries_can_have_caused_is_blamed_on_both():
    lab = InMemoryLab()
    both_sent = threading.Barrier(2, timeout=5)  # both retries are in flight when the dial comes

    def quiet_retry(lab: InMemoryLab, _nonce: str, send: int, _nonces: list[str]) -> ProxyReply:
        if send:
            both_sent.wait()
            time.sleep(0.02)
        return SILENT if send == 0 else REFUSED

    def dial_on_retry(lab: InMemoryLab, _nonce: str, send: int, _nonces: list[str]) -> ProxyReply:
        if send:
            both_sent.wait()
            lab.dial("10.0.0.1")
            time.sleep(0.02)
        return SILENT if send == 0 else REFUSED

    results = _campaign(lab).run([Scripted("a", quiet_retry), Scripted("b", dial_on_retry)],
                                 retry=went_unanswered)
    for key, other in (("a", "b"), ("b", "a")):
        assert results[key].hits == () and len(results[key].shared) == 1
        assert results[key].shared_with == (f"{other}{RETRY_SUFFIX}",)
    assert lab.unaccounted_hits() == []


def test_a_dial_after_the_retry_was_judged_is_named_by_the_session_audit_with_the_retry():
    lab = InMemoryLab()
    _campaign(lab).run([Scripted("a", _silent_then_refused)], retry=went_unanswered)
    assert audit_lab(lab, grace=0) is None
    lab.dial("10.0.0.1")  # after every verdict: the audit must name it, and the retry among its causes
    problem = audit_lab(lab, grace=0)
    assert problem is not None and "10.0.0.1:80" in problem and f"/a{RETRY_SUFFIX}" in problem


# --------------------------------------------------------------------------------------------------
# Against the stalling proxy, in a lab of its own
# --------------------------------------------------------------------------------------------------

NETNS_OK, NETNS_REASON = host_can_create_netns()
# Exchanges are given a short deadline: every first send waits it out.
DEADLINE_SECONDS = 1.0
BY_ID = {attempt.test_id: attempt for attempt in build_attempts()}
# The CONNECT denials and the absolute-form ones go to different canaries: a dial for a CONNECT carries no nonce
# and is blamed on every retry in flight to its destination, so an absolute-form denial's hits are only its own.
DENIED = ("connect-meta-imds-169.254.169.254", "connect-v4-private-10-inner-10.0.0.1",
          "connect-v4-private-192-inner-192.168.0.1", "absolute-v4-private-172-inner-172.16.0.1",
          "absolute-v4-private-10-last-10.255.255.255", "absolute-v4-private-192-last-192.168.255.255")
CONTROLS = ("connect-ctl-v4-this-network-above-1.0.0.0", "absolute-ctl-v4-this-network-above-1.0.0.0")
EXCHANGES = [AttemptExchange(BY_ID[test_id], DEADLINE_SECONDS) for test_id in (*DENIED, *CONTROLS)]
INNER_PORT = 3260
FRONT_PORT = 3261


@pytest.fixture(scope="module")
def retry_lab() -> Iterator[NetworkLab]:
    """A lab of its own: the dialling variants put hits on the catch-all on purpose."""
    if not NETNS_OK:
        pytest.skip(f"cannot create network namespaces: {NETNS_REASON}")
    lab = start_lab(name="retry-lab")
    yield lab
    lab.close()


@contextlib.contextmanager
def stalling_proxy(lab: NetworkLab, variant: str) -> Iterator[Callable[[], Any]]:
    """The stalling proxy (``variant``) in front of a reference proxy in ``lab``, the lab's hits reset first:
    yields how to connect to it."""
    lab.reset_hits()
    inner = start_proxy(lab, port=INNER_PORT)
    proxy = StallingProxy(variant, lambda: lab.connect(inner.address, inner.port), lab.socket, lab.resolver())
    proxy.start_in_thread(lab.listen("127.0.0.1", FRONT_PORT))
    try:
        yield lambda: lab.connect("127.0.0.1", FRONT_PORT)
    finally:
        proxy.stop()
        inner.stop()


def _run(lab: NetworkLab, variant: str, *, retry: bool = True) -> dict[str, SsrfVerdict]:
    with stalling_proxy(lab, variant) as connect:
        # No bare twins (tests/test_bare_twins.py): a random sample would add retries of its own to the sets here.
        verdicts = run_ssrf_campaign(lab, connect, EXCHANGES, retry=retry, bare=())
        assert audit_lab(lab) is None  # every hit a verdict counted, the retries' included
    return verdicts


def _verdicts(verdicts: dict[str, SsrfVerdict], ids: tuple[str, ...]) -> dict[str, Verdict]:
    return {test_id: verdicts[test_id].judgement.verdict for test_id in ids}


def _show(verdicts: dict[str, SsrfVerdict]) -> str:
    return "\n".join(f"{key}: {v.judgement.verdict.name} {v.judgement.reason} || {v.judgement.observed}"
                     for key, v in verdicts.items())


def test_a_proxy_silent_on_the_first_pass_then_correct_earns_every_pass_on_the_retry(retry_lab):
    verdicts = _run(retry_lab, "first-pass")
    assert _verdicts(verdicts, DENIED) == dict.fromkeys(DENIED, Verdict.BLOCKED), _show(verdicts)
    assert _verdicts(verdicts, CONTROLS) == dict.fromkeys(CONTROLS, Verdict.WORKS), _show(verdicts)
    assert all("sent again after no answer: the first send got no HTTP answer" in v.judgement.observed
               for v in verdicts.values()), _show(verdicts)
    assert all("the same request without the marker sent again" in verdicts[test_id].judgement.observed
               for test_id in DENIED)
    sent_again = {window.key.split("/", 1)[1] for window in retry_lab.attempt_windows()
                  if window.key.endswith(RETRY_SUFFIX)}
    expected = {f"{key}{RETRY_SUFFIX}" for key in (*DENIED, *CONTROLS)}
    assert sent_again == expected | {f"{key}{UNMARKED_SUFFIX}{RETRY_SUFFIX}" for key in DENIED}


def test_a_proxy_silent_on_the_first_pass_is_indeterminate_and_broken_without_the_retry(retry_lab):
    verdicts = _run(retry_lab, "first-pass", retry=False)
    assert _verdicts(verdicts, DENIED) == dict.fromkeys(DENIED, Verdict.INDETERMINATE), _show(verdicts)
    assert _verdicts(verdicts, CONTROLS) == dict.fromkeys(CONTROLS, Verdict.BROKEN), _show(verdicts)
    assert not any(window.key.endswith(RETRY_SUFFIX) for window in retry_lab.attempt_windows())


def test_a_proxy_silent_forever_earns_no_pass(retry_lab):
    verdicts = _run(retry_lab, "forever")
    assert _verdicts(verdicts, DENIED) == dict.fromkeys(DENIED, Verdict.INDETERMINATE), _show(verdicts)
    assert _verdicts(verdicts, CONTROLS) == dict.fromkeys(CONTROLS, Verdict.BROKEN), _show(verdicts)
    assert all("sent again after no answer" in v.judgement.observed for v in verdicts.values())


def test_a_proxy_that_dials_on_the_retry_fails_every_denial(retry_lab):
    verdicts = _run(retry_lab, "dial-on-retry")
    assert _verdicts(verdicts, DENIED) == dict.fromkeys(DENIED, Verdict.ALLOWED), _show(verdicts)
    assert _verdicts(verdicts, CONTROLS) == dict.fromkeys(CONTROLS, Verdict.WORKS), _show(verdicts)
    for test_id in DENIED:
        if test_id.startswith("absolute-"):  # its dial carried the retry's nonce: exactly the retry's
            assert "[retry: " in verdicts[test_id].judgement.observed, _show(verdicts)


def test_a_proxy_that_dials_the_first_sends_destination_late_and_refuses_the_retry_fails_every_denial(retry_lab):
    verdicts = _run(retry_lab, "late-first-dial")
    assert _verdicts(verdicts, DENIED) == dict.fromkeys(DENIED, Verdict.ALLOWED), _show(verdicts)
    assert _verdicts(verdicts, CONTROLS) == dict.fromkeys(CONTROLS, Verdict.WORKS), _show(verdicts)
    for test_id in DENIED:
        assert "403" in verdicts[test_id].judgement.observed  # the retry was refused...
        if test_id.startswith("absolute-"):  # ...and the dial carried the first send's nonce
            assert "[first send: " in verdicts[test_id].judgement.observed, _show(verdicts)
