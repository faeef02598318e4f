"""What the SSRF-family broken proxies share: the reference proxy with one step replaced, started in a lab.

Each weak proxy in this folder (``last_at_judge.py``, ``scheme_case.py``, ``origin_form_unchecked.py``,
``names_unchecked.py``) subclasses the reference :class:`EgressProxy` and overrides one method, so it
is exactly as strict as the reference everywhere but the one mistake its module names: a conformance
run must then fail exactly the cases of that family and nothing else (``tests/test_ssrf_detection.py``).
They dial only through the lab's socket factory, so whatever they leak lands on a lab canary.
"""

from __future__ import annotations

import ipaddress

from pytest_sandbox.network.addresses import Authority
from pytest_sandbox.network.harness import RunningProxy, lab_proxy_config
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.network.proxy.server import EgressProxy


class WeakProxy(EgressProxy):
    """The reference proxy plus the one helper every mistake needs: addresses for an authority, unchecked.

    ``strict_framing = False`` gives a weak proxy h11's request-line reader (it lets ``#`` and ``\\``
    through to the target, as most proxies' readers do) where its mistake lives behind the reader.
    """

    strict_framing = True

    async def unchecked_addresses(self, authority: Authority) -> tuple[str, ...]:
        """The literal itself, or every resolver answer: nothing classified, nothing refused (the hole)."""
        if authority.ip is not None:
            return (str(authority.ip),)
        return tuple(await self._resolver(authority.host))


def unchecked_authority(host: str, port: int | None) -> Authority:
    """An :class:`Authority` for what a lenient parser read, without the reference's canonicalisation."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    return Authority(str(ip) if ip is not None else host.lower(), port or 80, ip)


def start_weak_proxy(lab: NetworkLab, proxy_class: type[WeakProxy], port: int) -> RunningProxy:
    """``proxy_class`` on 127.0.0.1:``port`` in ``lab`` with the lab's configuration; the caller stops it."""
    listener = lab.listen("127.0.0.1", port)
    config = lab_proxy_config(strict_framing=proxy_class.strict_framing)
    proxy = proxy_class(config, resolver=lab.resolver(), socket_factory=lab.socket,
                        route_socket_factory=lab.route_socket)
    try:
        proxy.start_in_thread(listener)
    except BaseException:
        listener.close()
        raise
    return RunningProxy(proxy, lab, "127.0.0.1", port)
