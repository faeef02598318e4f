"""The reference proxy's allow/deny decision as pure functions over parsed values (no I/O, no clock).

The server parses a request, calls :func:`decide_destination`, resolves a name only when asked
(:class:`NeedsResolution`) and calls it again with the answers; it dials only a :class:`Route`'s
addresses. Kept apart so that every branch of the rule (network.md §3) has a table test.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pytest_sandbox.http.framing import FramingViolation
from pytest_sandbox.network.addresses import (
    AddressVerdict,
    Authority,
    MalformedTarget,
    parse_absolute_form,
    parse_authority,
)

__all__ = [
    "NeedsResolution",
    "Refusal",
    "ResolutionFailed",
    "Route",
    "Rules",
    "decide_destination",
    "refusal_for_framing",
    "refusal_for_target",
    "split_target",
]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the proxy answers itself (JSON body, connection closed), and the decision it records."""

    status: int  # 400 | 403 | 431 | 501 | 502 | 504 ...
    reason: str  # policy_denied, ssrf_denied, malformed_target, malformed_host, https_absolute_form,
    detail: str  # resolution_failed, header_too_large, framing:<case>, upstream_unreachable, ...
    addresses: tuple[str, ...] = ()

    @property
    def action(self) -> str:
        """``error`` for the proxy's own failures (5xx but 501), ``deny`` for refusals."""
        return "error" if self.status >= 500 and self.status != 501 else "deny"


@dataclass(frozen=True, slots=True)
class Route:
    """Allowed: dial the first of ``addresses`` that connects (canonical, each checked, resolver order)."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NeedsResolution:
    """The policy admits the authority and it is a name: resolve ``host`` once, then decide again."""

    host: str


@dataclass(frozen=True, slots=True)
class ResolutionFailed:
    """What the server passes as the answers when its resolver raised (``detail`` is kept verbatim)."""

    detail: str  # f"{type(error).__name__}: {error}"


@dataclass(frozen=True, slots=True)
class Rules:
    """What a decision reads besides the request; built once per proxy. The callables are the server's
    cached wrappers (the host allowlist match, the address classifier) and its self-connection check."""

    allowed_ports: frozenset[int]
    host_allowed: Callable[[str], bool]  # the canonical (lowercase) host against the allowlist patterns
    classify: Callable[[str], AddressVerdict]  # raises ValueError for a string that is not an address
    self_connection: Callable[[str, int], str | None]  # why (address, port) is this proxy, or None


def refusal_for_framing(violation: FramingViolation) -> Refusal:
    """A request the strict framing refused (network.md §5): its status, ``framing:<case>``."""
    reason = "header_too_large" if violation.case == "head-too-large" else f"framing:{violation.case}"
    return Refusal(violation.status, reason, violation.detail)


def refusal_for_target(error: MalformedTarget) -> Refusal:
    """A request-target or authority refused before any lookup: 400."""
    reason = "https_absolute_form" if error.reason == "https_absolute_form" else "malformed_target"
    return Refusal(400, reason, f"{error} ({error.reason})")


# Pure, and keep-alive clients repeat the same targets: cache the answers (Authority is frozen).
@functools.lru_cache(maxsize=1024)
def split_target(method: str, target: str) -> tuple[Authority, str] | Refusal:
    """The canonical authority and the origin-form path to send upstream ("" for CONNECT's
    authority-form, RFC 9112 §3.2.3; absolute-form otherwise, §3.2.2), or the 400 refusal.

    Every other form is refused: origin-form (``GET /`` with a Host, §3.2.1) and asterisk-form
    (``OPTIONS *``, §3.2.4) are for an origin server, authority-form is for CONNECT only. The target's
    characters and the Host field lines are checked before this, by the framing layer
    (``http/framing.py``: RFC 3986 §2, RFC 9110 §7.2), where a weakened proxy's lax family lives; the
    target alone decides where the request goes.
    """
    try:
        if method == "CONNECT":
            return parse_authority(target), ""
        _, authority, path = parse_absolute_form(target)
    except MalformedTarget as error:
        return refusal_for_target(error)
    return authority, path


def decide_destination(
    authority: Authority, answers: Sequence[str] | ResolutionFailed | None, rules: Rules,
) -> Route | Refusal | NeedsResolution:
    """The whole allow/deny decision for one request, in this order:

    1. the port is not allowed -> 403 ``policy_denied``; 2. no host pattern matches -> 403 ``policy_denied``;
    3. a name with no ``answers`` yet -> :class:`NeedsResolution` (an IP literal is never resolved: its
    own address is the only answer, whatever ``answers`` says); 4. the resolver failed or returned nothing
    -> 502 ``resolution_failed``; 5. each answer in order: not an address literal, special-use, or this
    proxy itself -> 403 ``ssrf_denied`` (one bad answer denies the request); 6. :class:`Route`.
    """
    host, port = authority.host, authority.port
    if port not in rules.allowed_ports:
        return Refusal(403, "policy_denied", f"port {port} of {host} not permitted by policy")
    if not rules.host_allowed(host):
        return Refusal(403, "policy_denied", f"host {host} not permitted by policy")
    if authority.ip is not None:
        answers = (str(authority.ip),)
    elif answers is None:
        return NeedsResolution(host)
    elif isinstance(answers, ResolutionFailed):
        return Refusal(502, "resolution_failed", f"{host}:{port}: resolving failed: {answers.detail}")
    elif not answers:
        return Refusal(502, "resolution_failed", f"{host}:{port}: the resolver returned no address")
    checked: list[str] = []
    for answer in answers:
        try:
            verdict = rules.classify(answer)
        except ValueError:
            return Refusal(403, "ssrf_denied", f"{host}:{port} blocked: resolver answer {answer!r} is not an "
                           "address literal", tuple(answers))
        if verdict.denied:
            return Refusal(403, "ssrf_denied", f"{host}:{port} blocked: {answer} is {verdict.reason}", tuple(answers))
        looped = rules.self_connection(verdict.address, port)
        if looped is not None:
            return Refusal(403, "ssrf_denied", f"{host}:{port} blocked: self connection: {looped}", tuple(answers))
        checked.append(verdict.address)
    return Route(tuple(checked))
