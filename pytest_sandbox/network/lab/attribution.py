"""Who caused a catch-all hit: attempt windows, nonces and attribution. Pure (no sockets, no clock).

The lab's catch-all canary (:mod:`pytest_sandbox.network.lab.lab`) records every connection that reached no real
listener as a :class:`CatchAllHit`: when it was accepted, the original destination and the first
bytes. Every attempt the harness sends through a proxy is an :class:`AttemptWindow`: when it began
and ended, its nonce and the addresses a careless proxy could dial for it.

Attribution (:func:`attribute`) is sound first and exact where it can be:

1. A hit whose bytes carry a known nonce (the harness puts one in the path and a header of every
   absolute-form request and of every request it sends through a tunnel) belongs to that attempt. An
   unmarked twin carries its nonce as :func:`twin_nonce` spells it (a UUID4, what clients put in
   ``X-Request-ID`` and paths), which is read back to the nonce it was derived from; any other UUID
   (a proxy's own request id) names nothing.
2. A hit without one (a CONNECT the proxy dialled but never used, a late dial of a refused case)
   belongs to every attempt that could have caused it: first those whose plausible destinations
   include the hit's address and whose window, extended by the grace period, contains the hit; else
   those with that destination that began before it (a dial later than the grace period); else every
   attempt whose graced window contains it (a destination the catalogue did not predict). A hit that
   no attempt can explain stays unattributed, and the session-end audit reports it.

A hit is never attributed to an attempt that began after it: a connection cannot precede its cause
(the lab stamps a hit when it accepts it, which is after the dial).
"""

from __future__ import annotations

import functools
import hmac
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "NONCE_HEADER",
    "NONCE_PATH_PREFIX",
    "AttemptWindow",
    "Attribution",
    "CatchAllHit",
    "attribute",
    "candidates_at",
    "candidates_for",
    "describe_hit",
    "find_nonce",
    "new_nonce",
    "nonce_positions",
    "twin_nonce",
]

# The nonce rides in the request-target path and in a header: a proxy that forwards the request
# forwards at least one of them (RFC 9110 §7.6: end-to-end fields are forwarded).
NONCE_HEADER = "X-Sandbox-Probe"
NONCE_PATH_PREFIX = "/sandbox-probe/"
# A nonce as the harness's marked requests carry it, or (second alternative) a lowercase UUID4 as RFC 9562
# §5.4 spells it, which is how an unmarked twin carries its nonce (twin_nonce).
_NONCE_PATTERN = re.compile(rb"sbx-[0-9a-f]{16}|[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_SBX = b"sbx-"
# The key twin_nonce derives with: per process, so nobody outside it can tell a twin's UUID from a random one.
_TWIN_KEY = secrets.token_bytes(32)
# Twin spelling -> the nonce it was derived from, for every twin_nonce issued in this process (attribution
# reads a UUID back only through this: exact, a foreign UUID is never mistaken for a twin).
_TWINS: dict[str, str] = {}


def new_nonce() -> str:
    """A fresh attempt nonce: ``sbx-`` and 64 random bits in hex (never guessed, never repeated)."""
    return f"sbx-{secrets.token_hex(8)}"


@functools.lru_cache(maxsize=1 << 14)
def twin_nonce(nonce: str) -> str:
    """How an unmarked twin carries ``nonce``: a version 4 UUID (RFC 9562 §5.4) keyed-hashed from it (HMAC-SHA256
    under a per-process key), so it looks like any client's random request id and has no ``sbx-`` text, yet
    :func:`find_nonce` and :func:`nonce_positions` read it back to ``nonce``. The same nonce always gives the
    same UUID in one process."""
    digest = hmac.new(_TWIN_KEY, nonce.encode("ascii"), "sha256").digest()
    text = str(uuid.UUID(bytes=digest[:16], version=4))
    _TWINS[text] = nonce  # one dict store: atomic under the GIL, campaign threads call this concurrently
    return text


def _read_back(token: bytes) -> str | None:
    """The nonce a nonce-shaped token names: itself, or for a twin's UUID the nonce it was derived from."""
    text = token.decode("ascii")
    return text if token.startswith(_SBX) else _TWINS.get(text)


def find_nonce(received: bytes, known: Iterable[str] | None = None) -> str | None:
    """The first nonce in ``received`` (one of ``known``, if given), or None. A twin's UUID counts as the
    nonce it was derived from (:func:`twin_nonce`)."""
    wanted = None if known is None else set(known)
    for match in _NONCE_PATTERN.finditer(received):
        text = _read_back(match.group(0))
        if text is not None and (wanted is None or text in wanted):
            return text
    return None


def nonce_positions(received: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, str]]:
    """Every nonce in ``received[start:end]``: (offset in ``received``, nonce), in order; a twin's UUID is
    given as the nonce it was derived from, any other UUID is left out."""
    stop = len(received) if end is None else min(end, len(received))
    found = ((match.start(), _read_back(match.group(0))) for match in _NONCE_PATTERN.finditer(received, start, stop))
    return [(offset, text) for offset, text in found if text is not None]


@dataclass(frozen=True)
class CatchAllHit:
    """One connection the catch-all accepted: to ``address``:``port``, which no listener held."""

    index: int  # position in the lab's hit log, from 0
    at: float  # time.monotonic() when the lab accepted it (never before the dial)
    address: str  # the original destination, canonical text (IPv4-mapped unwrapped)
    port: int
    received: bytes  # the first 4 KiB the dialler sent, as far as it arrived

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class AttemptWindow:
    """One attempt as the attribution sees it.

    ``destinations`` are the addresses a proxy could dial for it (any interpretation of its
    target); ``control`` is the address a positive control must reach (its hits there are expected).
    """

    key: str
    nonce: str
    destinations: frozenset[str]
    begin: float
    end: float
    control: str | None = None

    def contains(self, moment: float, grace: float) -> bool:
        return self.begin <= moment <= self.end + grace


@dataclass(frozen=True)
class Attribution:
    """For each hit index, the keys of the attempts it is attributed to (empty: unattributed)."""

    owners: Mapping[int, frozenset[str]]
    exact: frozenset[int]  # hits attributed by nonce

    def hits_of(self, key: str, hits: Iterable[CatchAllHit]) -> list[CatchAllHit]:
        return [hit for hit in hits if key in self.owners.get(hit.index, frozenset())]

    def ambiguous(self, hits: Iterable[CatchAllHit]) -> list[CatchAllHit]:
        return [hit for hit in hits if len(self.owners.get(hit.index, frozenset())) > 1]

    def unattributed(self, hits: Iterable[CatchAllHit]) -> list[CatchAllHit]:
        return [hit for hit in hits if not self.owners.get(hit.index)]


def candidates_for(hit: CatchAllHit, windows: Sequence[AttemptWindow], grace: float) -> frozenset[str]:
    """The attempts a hit without a known nonce can have come from (see the module docstring)."""
    return candidates_at(hit.at, hit.address, windows, grace)


def candidates_at(at: float, address: str, windows: Sequence[AttemptWindow], grace: float, *,
                  graced_only: bool = False) -> frozenset[str]:
    """The attempts bytes without a known nonce that reached ``address`` at ``at`` can have come from.

    The tiers of the module docstring; ``graced_only`` stops after the first (only attempts whose
    window, extended by the grace period, contains ``at``).
    """
    began = [window for window in windows if window.begin <= at]
    plausible = [window for window in began if address in window.destinations]
    tiers = [[window for window in plausible if window.contains(at, grace)]]
    if not graced_only:
        tiers += [plausible, [window for window in began if window.contains(at, grace)]]
    for tier in tiers:
        if tier:
            return frozenset(window.key for window in tier)
    return frozenset()


def attribute(hits: Sequence[CatchAllHit], windows: Sequence[AttemptWindow], grace: float) -> Attribution:
    """Attribute every hit to the attempt(s) that can have caused it."""
    by_nonce = {window.nonce: window.key for window in windows}
    owners: dict[int, frozenset[str]] = {}
    exact: set[int] = set()
    for hit in hits:
        nonce = find_nonce(hit.received, by_nonce)
        if nonce is not None:
            owners[hit.index] = frozenset({by_nonce[nonce]})
            exact.add(hit.index)
        else:
            owners[hit.index] = candidates_for(hit, windows, grace)
    return Attribution(owners, frozenset(exact))


def describe_hit(hit: CatchAllHit, origin: float | None = None) -> str:
    """``169.254.169.254:80 (+1.234 s, no bytes)``: what a report names."""
    when = "" if origin is None else f"+{hit.at - origin:.3f} s, "
    if hit.received:
        first_line = hit.received.split(b"\r\n", 1)[0][:80].decode("latin-1")
        what = f"{len(hit.received)} bytes: {first_line!r}"
    else:
        what = "no bytes"
    return f"{hit.endpoint} ({when}{what})"
