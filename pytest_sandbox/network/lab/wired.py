"""A namespace the harness made, wired into the lab: whatever runs there reaches every lab address, and nothing else.

The egress category starts a third party's launcher (``--sandbox-exec``) in such a namespace, which stands in for
the host: a launcher that isolates nothing leaves its process there, where a direct connection to any address
reaches the lab's catch-all (or its UDP sockets) and no packet can leave the machine (the lab has no way out,
network.md §7). The tests use the same wiring for their deliberately broken launchers.

One veth pair: ``<link>-own`` in the namespace, ``<link>-lab`` in the lab. The namespace gets default routes
through it; both ends' neighbours are fixed (``nud permanent``), so no ARP or neighbour discovery is waited for.
The lab routes every address to itself (``local 0.0.0.0/0`` and ``local ::/0`` in its local table, see
``netns._CATCH_ALL_ROUTES``), so its replies to the namespace's own addresses need more specific routes in that same
table (the longest prefix wins inside a table); those addresses are ones no SSRF case dials
(``tests/test_egress_third_party.py`` checks), so while the pair exists no probe of the lab's is diverted by them.
The routes go with the link: :func:`unwire_from_lab` deletes it at once (closing the namespace would, later).
"""

from __future__ import annotations

from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.netns import NetnsHolder

__all__ = ["WIRED_ADDRESSES", "unwire_from_lab", "wire_into_lab"]

# The namespace's own addresses: RFC 5737 TEST-NET-1 and the RFC 3849 documentation prefix; the gateways are
# next hops only (their addresses never appear in a packet).
WIRED_V4, WIRED_V4_GATEWAY = "192.0.2.2", "192.0.2.1"
WIRED_V6, WIRED_V6_GATEWAY = "2001:db8:e::2", "fe80::1"
WIRED_ADDRESSES = (WIRED_V4, WIRED_V6)
WIRE_COMMAND_TIMEOUT_SECONDS = 30.0


def _inside(holder: NetnsHolder, *argv: str) -> str:
    try:
        done = holder.run(list(argv), capture_output=True, text=True, timeout=WIRE_COMMAND_TIMEOUT_SECONDS,
                          check=False)
    except FileNotFoundError as exc:
        raise OSError(f"wiring a namespace into the lab needs `{argv[0]}` (iproute2, procps): {exc}") from None
    if done.returncode != 0:
        raise OSError(f"wiring a namespace into the lab: {' '.join(argv)} failed: {done.stderr.strip()}")
    return str(done.stdout)


def _link_address(holder: NetnsHolder, link: str) -> str:
    words = _inside(holder, "ip", "-o", "link", "show", link).split()
    return words[words.index("link/ether") + 1]


def wire_into_lab(holder: NetnsHolder, lab: NetworkLab, *, link: str = "wired") -> None:
    """Give ``holder``'s namespace a veth pair into ``lab`` and default routes through it (both families).

    ``link`` names the pair (at most 10 characters: interface names are 15). Raises OSError with the command
    that failed."""
    if not 0 < len(link) <= 10:
        raise ValueError(f"link name {link!r}: 1 to 10 characters")
    own, lab_side, lab_holder = f"{link}-own", f"{link}-lab", lab.holder
    # A namespace is destroyed asynchronously after its last process exits (cleanup_net runs from a workqueue), so a
    # pair of the same name wired before may still be in the lab, with its routes: deleting one end deletes both.
    unwire_from_lab(lab, link=link)
    _inside(holder, "ip", "link", "add", own, "type", "veth", "peer", "name", lab_side, "netns", str(lab_holder.pid))
    # The lab counts its every address as its own; accept_local lets it take packets from the namespace's sources
    # before the routes below exist, and rp_filter would drop them for arriving on a link with no route back.
    _inside(lab_holder, "sysctl", "-q", "-w", f"net.ipv4.conf.{lab_side}.accept_local=1",
            f"net.ipv4.conf.{lab_side}.rp_filter=0")
    _inside(lab_holder, "ip", "link", "set", lab_side, "up")
    _inside(holder, "ip", "link", "set", own, "up")
    _inside(holder, "ip", "address", "add", f"{WIRED_V4}/24", "dev", own)
    _inside(holder, "ip", "-6", "address", "add", f"{WIRED_V6}/64", "dev", own, "nodad")
    lab_mac, own_mac = _link_address(lab_holder, lab_side), _link_address(holder, own)
    for gateway in (WIRED_V4_GATEWAY, WIRED_V6_GATEWAY):
        _inside(holder, "ip", "neigh", "replace", gateway, "lladdr", lab_mac, "dev", own, "nud", "permanent")
    _inside(holder, "ip", "route", "add", "default", "via", WIRED_V4_GATEWAY, "dev", own)
    _inside(holder, "ip", "-6", "route", "add", "default", "via", WIRED_V6_GATEWAY, "dev", own)
    for address, prefix in ((WIRED_V4, "32"), (WIRED_V6, "128")):
        _inside(lab_holder, "ip", "neigh", "replace", address, "lladdr", own_mac, "dev", lab_side, "nud", "permanent")
        _inside(lab_holder, "ip", "route", "replace", f"{address}/{prefix}", "dev", lab_side, "table", "local")


def unwire_from_lab(lab: NetworkLab, *, link: str = "wired") -> None:
    """Delete the pair :func:`wire_into_lab` made (and with it the lab's routes to the namespace), now rather than
    whenever the namespace is destroyed. Quiet when it is already gone."""
    lab.holder.run(["ip", "link", "delete", f"{link}-lab"], capture_output=True, timeout=WIRE_COMMAND_TIMEOUT_SECONDS,
                   check=False)
