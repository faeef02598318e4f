"""The proxy's own address, in every spelling that reaches it: the self-connection catalogue, as data.

A proxy that dials its own listening socket loops (network.md section 1.3; smokescreen checks "self
connection" before anything else). Each :class:`SelfSpelling` writes the proxy's own address one
way; the harness fills in the address it started the proxy on (or a local address of a wildcard
listener) and the proxy's port, and attempts it as a CONNECT authority and as an absolute-form URL.

Templates use ``{v4}`` (dotted quad), ``{hi}``/``{lo}`` (the two 16-bit halves in hex), ``{nhi}``/
``{nlo}`` (the same, bits inverted: Teredo's client field), ``{HI}``/``{LO}`` (uppercase), ``{v6}``
(an IPv6 address) and ``{name}`` (a lab DNS name the harness registers with ``records``).

Only IPv4-mapped spellings survive the address classifier for a public address (the other wrappers
are denied whatever they carry, network.md section 1.4); they are here anyway, so that a proxy whose
classifier lets a wrapper through is still caught by its self check.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

__all__ = ["SELF_SPELLINGS", "WILDCARD_SPELLINGS", "SelfSpelling", "spellings_for"]


@dataclass(frozen=True)
class SelfSpelling:
    """One way to write the proxy's own address. ``records`` is non-empty for a name: its answers."""

    spelling_id: str
    version: int  # the family of the proxy's address this spelling applies to
    host: str  # authority host template (IPv6 literals bracketed)
    note: str
    records: tuple[str, ...] = ()

    @property
    def is_name(self) -> bool:
        return bool(self.records)

    def render(self, address: str, name: str = "") -> tuple[str, tuple[str, ...]]:
        """(authority host, DNS answers for ``name``) for the proxy address ``address``."""
        values = _template_values(address, name)
        return self.host.format(**values), tuple(record.format(**values) for record in self.records)


def _template_values(address: str, name: str) -> dict[str, str]:
    parsed = ip_address(address)
    values = {"name": name, "v4": "", "v6": "", "hi": "", "lo": "", "nhi": "", "nlo": "", "HI": "", "LO": ""}
    if isinstance(parsed, IPv4Address):
        value = int(parsed)
        hi, lo = value >> 16, value & 0xFFFF
        values.update(v4=str(parsed), hi=f"{hi:x}", lo=f"{lo:x}", HI=f"{hi:X}", LO=f"{lo:X}",
                      nhi=f"{hi ^ 0xFFFF:x}", nlo=f"{lo ^ 0xFFFF:x}")
    else:
        values["v6"] = str(IPv6Address(int(parsed)))
    return values


SELF_SPELLINGS: tuple[SelfSpelling, ...] = (
    SelfSpelling("dotted", 4, "{v4}", "the proxy's own address as a dotted quad"),
    SelfSpelling("mapped", 4, "[::ffff:{v4}]",
                 "IPv4-mapped, dotted tail: a dual-stack socket dials the IPv4 address itself (RFC 4291 §2.5.5.2)"),
    SelfSpelling("mapped-hex", 4, "[::ffff:{hi}:{lo}]", "IPv4-mapped in hex words (RFC 4291 §2.5.5.2)"),
    SelfSpelling("mapped-expanded", 4, "[0:0:0:0:0:FFFF:{HI}:{LO}]",
                 "IPv4-mapped, every zero written, uppercase (RFC 4291 §2.2 allows both)"),
    SelfSpelling("compatible", 4, "[::{v4}]", "IPv4-compatible, deprecated (RFC 4291 §2.5.5.1)"),
    SelfSpelling("siit", 4, "[::ffff:0:{v4}]", "SIIT IPv4-translated (RFC 6145)"),
    SelfSpelling("nat64", 4, "[64:ff9b::{v4}]", "NAT64 well-known prefix (RFC 6052 §2.1)"),
    SelfSpelling("6to4", 4, "[2002:{hi}:{lo}::1]", "6to4 embeds the address in bits 16-47 (RFC 3056 §2)"),
    SelfSpelling("teredo-server", 4, "[2001:0:{hi}:{lo}::]", "Teredo server field (RFC 4380 §4)"),
    SelfSpelling("teredo-client", 4, "[2001:0:4136:e378:8000:63bf:{nhi}:{nlo}]",
                 "Teredo client field, bits inverted (RFC 4380 §4)"),
    SelfSpelling("name-a", 4, "{name}", "a lab DNS name whose A record is the proxy's own address",
                 records=("{v4}",)),
    SelfSpelling("name-aaaa-mapped", 4, "{name}",
                 "a lab DNS name whose only answer is an AAAA record: the proxy's address IPv4-mapped",
                 records=("::ffff:{v4}",)),
    SelfSpelling("literal", 6, "[{v6}]", "the proxy's own IPv6 address"),
    SelfSpelling("name-aaaa", 6, "{name}", "a lab DNS name whose AAAA record is the proxy's own address",
                 records=("{v6}",)),
)

# For a wildcard listener the point is *which* local address, not how it is spelled: a few spellings
# for each local address the harness picks.
WILDCARD_SPELLINGS: tuple[str, ...] = ("dotted", "mapped", "name-a")


def spellings_for(version: int, only: tuple[str, ...] | None = None) -> tuple[SelfSpelling, ...]:
    """The spellings that apply to an address of IP ``version`` (optionally only the ids in ``only``)."""
    return tuple(s for s in SELF_SPELLINGS
                 if s.version == version and (only is None or s.spelling_id in only))
