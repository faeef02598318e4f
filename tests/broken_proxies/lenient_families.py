"""Deliberately weak proxies with exactly one framing family read the lenient way (issue #9).

Each is the reference proxy with ``ProxyConfig.lax_framing = {family}``: the strict reader's checks of
that one family (:data:`pytest_sandbox.http.framing.FRAMING_FAMILIES`) are replaced by what a real
lenient parser does, and nothing else changes. The mistakes, one per proxy:

* ``request-line``: splits the request-line on any whitespace run (VT and FF included), takes any
  ``HTTP/x`` version in any case (``HTTP/ 1.1`` too; none at all as 1.0), does not check the target's
  characters (``%zz``, ``|{}^`` forwarded);
* ``target-form``: builds an absolute URL from Host for authority-form and asterisk-form targets on
  any method, ``http:`` + ``//host/path``, and a CONNECT authority from an absolute URL or from Host;
* ``host-value``: any Host value, none, or several;
* ``header-name``: strips ASCII whitespace (VT, FF too) around names, takes non-token bytes in a name,
  skips lines without a name, and forwards ``Transfer_Encoding`` / ``Transfer-%45ncoding`` as opaque fields;
* ``content-length``: C ``strtoul`` into 32 bits on the first value (``5x`` -> 5, 2^32+5 -> 5);
* ``transfer-encoding``: chunked whenever ``chunked`` appears in any Transfer-Encoding value (UTF-8,
  bad bytes dropped, case-folded), otherwise the field is ignored; it wins over Content-Length;
* ``trailer``: accepts any trailer field;
* ``h2c``: forwards h2c upgrades and HTTP2-Settings;
* ``routing-override``: forwards X-Original-URL, X-HTTP-Method-Override, X-Forwarded-Host, Forwarded ...;
* ``connect-body``: reads a CONNECT's body the RFC 7230 way (Transfer-Encoding over Content-Length), drops it and
  opens the tunnel;
* ``chunked-body``: reads a chunk size like C ``strtoul(line, 16)``, ignores extensions, ends lines at a bare LF or
  CR, and skips the two bytes after chunk data unchecked.

The conformance suite must fail each on exactly the catalogue rows of its family
(``verdicts.smuggling.cases_failed_by("lenient-<family>", "absolute")``).
"""

from __future__ import annotations

from pytest_sandbox.network.harness import RunningProxy, interception_of, lab_proxy_config, start_proxy
from pytest_sandbox.network.lab.lab import NetworkLab

# One listening port per family, so that the proxies never share a listener with the session's.
LENIENT_PROXY_PORTS = {
    "request-line": 3170,
    "target-form": 3171,
    "host-value": 3172,
    "header-name": 3173,
    "content-length": 3174,
    "transfer-encoding": 3175,
    "trailer": 3176,
    "h2c": 3177,
    "routing-override": 3178,
    "connect-body": 3179,
    "chunked-body": 3169,
}


def start_lenient_proxy(lab: NetworkLab, family: str) -> RunningProxy:
    """The reference proxy reading ``family`` leniently, on its own port in ``lab``; the caller stops it."""
    return start_proxy(lab, lab_proxy_config(lax_framing=frozenset({family})), port=LENIENT_PROXY_PORTS[family],
                       interception=interception_of(lab))
