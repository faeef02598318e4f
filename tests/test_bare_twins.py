"""A denial sent with no token of any kind: the bare twin (the last thing a proxy could key its checks on).

Every request the SSRF campaign sent carried its nonce: the marked probe in ``X-Sandbox-Probe`` and a
``/sandbox-probe/`` path, the unmarked twin as a UUID in its path or ``X-Request-ID``. So a proxy that applied
its policy only to requests holding a UUID and dialled everything else unchecked (``UuidKeyedProxy``) refused
every probe and every twin of the absolute form and passed every absolute-form SSRF test of
``conformance/test_ssrf.py`` (113 of 1244 failed, all CONNECT twins without ``X-Request-ID``), while any client's
``GET http://169.254.169.254/`` went through. Now a sample of the denials (``BARE_TWIN_SAMPLE``, drawn at random
per campaign) also send a bare twin: the request exactly as curl sends it, run alone so that a canary hit in its
window needs no nonce to be its own. Any proxy that keys on a token leaks every bare twin.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from broken_proxies.marker_keyed import UuidKeyedProxy, command
from broken_proxies.weak_ssrf import start_weak_proxy
from ssrf_selection import failed_params
from test_marker_keyed import FORWARDED, METADATA, REFUSED, SLICE

from pytest_sandbox.network.harness import start_proxy
from pytest_sandbox.network.netns import host_can_create_netns
from pytest_sandbox.probes.ssrf import ALL_FORMS, ATTEMPT_FORMS, build_attempts
from pytest_sandbox.probes.ssrf_exchanges import (
    BARE_SUFFIX,
    BARE_TWIN_SAMPLE,
    AttemptExchange,
    BareTwin,
    bare_twin_sample,
    run_ssrf_campaign,
)
from pytest_sandbox.verdicts.judgement import Judgement, Verdict
from pytest_sandbox.verdicts.ssrf import judge_attempt, judge_with_bare_twin, judge_with_unmarked_twin

ROOT = Path(__file__).resolve().parent.parent
NETNS_OK, NETNS_REASON = host_can_create_netns()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"cannot create network namespaces: {NETNS_REASON}")
TOKEN_HOLE = "refused only requests carrying a token"
# Anything a proxy could key on: the harness's marks, a UUID (any version), a long hex or base64-ish run.
TOKEN = re.compile(rb"sbx-|sandbox-probe|X-Request-ID|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-|[0-9a-fA-F]{16}|[A-Za-z0-9_-]{22}")
CATALOGUE = tuple(AttemptExchange(a) for a in build_attempts(forms=ALL_FORMS))
SERVED_DENIALS = [e for e in CATALOGUE if e.attempt.case.expected == "denied" and e.attempt.form in ATTEMPT_FORMS]


# --- what a bare twin sends (pure) ----------------------------------------------------------------------


def test_a_bare_twin_sends_what_curl_sends_and_no_token_at_all():
    for exchange in SERVED_DENIALS:
        attempt = exchange.attempt
        sent = attempt.request_bytes(None, marked=False)
        if attempt.form == "connect":
            sent += attempt.tunnel_request_bytes(None)
        assert TOKEN.search(sent) is None, sent
        assert b"\r\nUser-Agent: curl/" in sent and b"\r\nAccept: */*\r\n" in sent, sent
        assert sent.startswith(f"{attempt.method} ".encode()), sent


def test_a_bare_twin_runs_alone_and_has_a_key_of_its_own():
    bare = BareTwin(METADATA)
    assert bare.sequential and bare.key == METADATA.test_id + BARE_SUFFIX
    assert bare.unmarked_twin() is None and bare.destinations() == AttemptExchange(METADATA).destinations()


# --- which denials send one (pure) ----------------------------------------------------------------------


def test_the_sample_is_drawn_from_the_served_denials_only_and_never_repeats():
    sample = bare_twin_sample(CATALOGUE, BARE_TWIN_SAMPLE)
    assert len(sample) == BARE_TWIN_SAMPLE
    served = {e.key for e in SERVED_DENIALS}
    assert set(sample) <= served, set(sample) - served
    assert all(twin.key == key + BARE_SUFFIX and twin.attempt.test_id == key for key, twin in sample.items())
    # Not the same every campaign: a proxy cannot know in advance which denials go out bare.
    draws = {frozenset(bare_twin_sample(CATALOGUE, BARE_TWIN_SAMPLE)) for _ in range(5)}
    assert len(draws) > 1


def test_the_sample_never_takes_a_control_a_twin_or_a_malformed_form_and_keys_can_be_given():
    controls = [e for e in CATALOGUE if e.attempt.case.expected == "allowed"]
    malformed = [e for e in CATALOGUE if e.attempt.form not in ATTEMPT_FORMS]
    twins = [e.unmarked_twin() for e in SERVED_DENIALS[:5]]
    assert bare_twin_sample([*controls, *malformed, *twins], 50) == {}
    keys = {SERVED_DENIALS[0].key, SERVED_DENIALS[-1].key, controls[0].key}
    assert set(bare_twin_sample(CATALOGUE, keys)) == keys - {controls[0].key}
    seeded = bare_twin_sample(CATALOGUE, 3, random.Random(7))
    assert seeded == bare_twin_sample(CATALOGUE, 3, random.Random(7)) and len(seeded) == 3
    assert bare_twin_sample(SERVED_DENIALS[:2], BARE_TWIN_SAMPLE).keys() == {e.key for e in SERVED_DENIALS[:2]}


# --- the judge (pure) -----------------------------------------------------------------------------------


def _blocked() -> Judgement:
    return judge_with_unmarked_twin(METADATA, REFUSED, REFUSED, {})


def test_a_denial_whose_bare_twin_was_let_through_is_allowed_and_names_the_token():
    assert _blocked().verdict is Verdict.BLOCKED
    judgement = judge_with_bare_twin(METADATA, _blocked(), FORWARDED, {("169.254.169.254", 80): 1})
    assert judgement.verdict is Verdict.ALLOWED, judgement
    assert TOKEN_HOLE in judgement.reason and "reached canary 169.254.169.254:80" in judgement.reason, judgement
    assert "no token at all, sent alone: 200" in judgement.observed, judgement


def test_a_bare_twin_that_dialled_without_answering_fails_the_denial_too():
    held = REFUSED.__class__(REFUSED.proxy.__class__(None, (), b""), None, closed=False, timed_out=True)
    judgement = judge_with_bare_twin(METADATA, _blocked(), held, {("169.254.169.254", 80): 1})
    assert judgement.verdict is Verdict.ALLOWED and TOKEN_HOLE in judgement.reason, judgement


def test_a_refused_or_unanswered_bare_twin_leaves_the_verdict_as_it_was_and_says_so():
    for bare in (REFUSED, REFUSED.__class__(REFUSED.proxy.__class__(None, (), b""), None, closed=False,
                                            timed_out=True)):
        judgement = judge_with_bare_twin(METADATA, _blocked(), bare, {})
        assert (judgement.verdict, judgement.reason) == (Verdict.BLOCKED, _blocked().reason), judgement
        assert "no token at all, sent alone" in judgement.observed


def test_a_marked_leak_keeps_its_reason_when_the_bare_twin_leaks_too():
    leaked = judge_with_unmarked_twin(METADATA, FORWARDED, FORWARDED, {("169.254.169.254", 80): 2})
    judgement = judge_with_bare_twin(METADATA, leaked, FORWARDED, {("169.254.169.254", 80): 1})
    assert judgement.verdict is Verdict.ALLOWED and judgement.reason.startswith(leaked.reason), judgement
    assert "with no token at all too" in judgement.reason and TOKEN_HOLE not in judgement.reason


def test_a_control_is_never_judged_on_a_bare_twin():
    control = next(a for a in SLICE if a.case.expected == "allowed" and a.form == "absolute")
    judgement = judge_attempt(control, FORWARDED, {})
    assert judge_with_bare_twin(control, judgement, REFUSED, {}) is judgement


# --- against the proxies, in process --------------------------------------------------------------------

# Absolute-form policy denials of the slice: each marked probe holds the marker and each twin a UUID in its path,
# so UuidKeyedProxy refuses both and dials the bare twin.
UUID_BLIND = [AttemptExchange(a) for a in SLICE if a.form == "absolute" and a.case.expected == "denied"
              and (a.case.family == "dns-name" or a.case.case_id.startswith("meta-imds"))]


@needs_netns
def test_a_proxy_that_judges_only_requests_holding_a_uuid_passes_them_without_bare_twins_and_fails_with(_network_lab):
    keys = {e.key for e in UUID_BLIND}
    assert len(keys) >= 3, keys
    running = start_weak_proxy(_network_lab, UuidKeyedProxy, 3266)
    try:
        without = run_ssrf_campaign(_network_lab, running.connect, UUID_BLIND, bare=())
        bare = run_ssrf_campaign(_network_lab, running.connect, UUID_BLIND, bare=keys)
    finally:
        running.stop()
    # The hole the bare twin closes: refusing every probe and every twin is not refusing clients.
    assert all(v.judgement.verdict is Verdict.BLOCKED for v in without.values()), \
        {k: v.judgement for k, v in without.items() if v.judgement.verdict is not Verdict.BLOCKED}
    assert set(bare) == keys
    for key, verdict in bare.items():
        assert verdict.judgement.verdict is Verdict.ALLOWED and TOKEN_HOLE in verdict.judgement.reason, (key, verdict)


@needs_netns
def test_the_reference_refuses_every_bare_twin_and_the_verdict_says_it_was_sent(_network_lab):
    reference = start_proxy(_network_lab, port=3267)
    try:
        verdicts = run_ssrf_campaign(_network_lab, reference.connect, UUID_BLIND, bare={e.key for e in UUID_BLIND})
    finally:
        reference.stop()
    for key, verdict in verdicts.items():
        assert verdict.judgement.verdict is Verdict.BLOCKED, (key, verdict.judgement)
        assert "no token at all, sent alone: 403" in verdict.judgement.observed, (key, verdict.judgement)


# --- as a third party, through the conformance module ---------------------------------------------------

SELECTION = ("absolute-meta-imds-169.254.169.254", "absolute-name-localhost", "absolute-meta-aws-ecs-169.254.170.2")


@needs_netns
def test_conformance_run_against_a_uuid_keyed_proxy_fails_the_denials_its_bare_twins_leak():
    """Three absolute-form denials (the sample takes all three: fewer than BARE_TWIN_SAMPLE were selected)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly", "-rf", "--sandbox",
         "--sandbox-proxy-cmd", command("uuid"), str(ROOT / "conformance" / "test_ssrf.py"),
         "-k", " or ".join(f"{name}]" for name in SELECTION)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    failed = failed_params(output)
    assert failed == set(SELECTION), output
    assert TOKEN_HOLE in output, output
