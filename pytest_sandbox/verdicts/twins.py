"""Folding a denial's *bare twin* into its verdict: one rule for the SSRF and smuggling categories. Pure.

A bare twin is the denied request as a client sends it, with no token of the harness's at all (no marker, no
nonce, no request id), sent alone so that what it reached needs no nonce to be named. Every other send of a
denial carries its nonce somewhere (a UUID in a path, a query or ``X-Request-ID``), so a proxy that judges only
requests holding such a token, and forwards the rest unchecked, refuses every probe and every twin
(``UuidKeyedProxy`` in tests/broken_proxies/marker_keyed.py passed every absolute-form SSRF test and every
smuggling policy row). A bare twin let through is therefore a leak for every client: ALLOWED, whatever the other
sends got. Anything else it got (a refusal, no answer, not judged) leaves the verdict as it was, noted.
"""

from __future__ import annotations

from pytest_sandbox.verdicts.judgement import Judgement, Verdict

TOKEN_HOLE = "refused only requests carrying a token (the harness's marker, a nonce or a request id)"


def fold_bare_twin(judgement: Judgement, bare: Judgement, bare_observed: str, *, sent: str = "request",
                   case_prefix: str = "") -> Judgement:
    """``judgement`` (the marked send's, with its unmarked twin already folded in) with the ``bare`` twin's
    verdict folded in. ``bare_observed`` is what the bare twin got, ``sent`` names what was sent (``request``
    or ``bytes``) and ``case_prefix`` starts a new reason (smuggling reasons begin ``<case id>: ``)."""
    observed = f"{judgement.observed}; the same {sent} with no token at all, sent alone: {bare_observed}"
    if bare.verdict is not Verdict.ALLOWED:
        return Judgement(judgement.verdict, judgement.reason, judgement.expected, observed)
    if judgement.verdict is Verdict.ALLOWED:
        return Judgement(Verdict.ALLOWED, f"{judgement.reason}; with no token at all too: {bare.reason}",
                         judgement.expected, observed)
    pronoun = "them" if sent == "bytes" else "it"
    return Judgement(Verdict.ALLOWED, f"{case_prefix}{TOKEN_HOLE}; the same {sent} with none, as a client sends "
                     f"{pronoun}: {bare.reason}", judgement.expected, observed)
