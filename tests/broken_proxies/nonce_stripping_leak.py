"""Deliberately broken proxies that leak one smuggling row with the attribution nonce stripped.

They exist to prove the smuggling campaign's isolation reruns (``probes/smuggling.py``, ``_isolate``):
bytes without a nonce that reach upstream while sixteen attempts are in flight are first blamed on
every attempt whose window holds them; the reruns must narrow that to the row that really leaks, and
a leak that does not come back on a rerun must stay blamed on every suspect.

* :class:`StrippingLeakFront` / :class:`StrippingLeakInterceptor`: the one-row leaker
  (``one_row_leak.py``) that also deletes the ``X-Sandbox-Probe`` field and every nonce from the
  leaked bytes (as a proxy that rebuilds heads from a field allowlist would).
* ``once=True``: only the first marked connection on each path is leaked; later ones are served by
  the reference (a leak that depends on timing or state, which a rerun does not reproduce).

In-process, with the lab's sockets only.
"""

from __future__ import annotations

import re
import threading

from broken_proxies.one_row_leak import OneRowLeakFront, OneRowLeakInterceptor

_NONCE_FIELD = re.compile(rb"(?im)^x-sandbox-probe:[^\n]*\n")
_NONCE = re.compile(rb"sbx-[0-9a-f]{16}")


def strip_nonces(data: bytes) -> bytes:
    """``data`` without the nonce field, and any other nonce overwritten in place (a body keeps its
    length). Pure."""
    return _NONCE.sub(b"sbx-xxxxxxxxxxxxxxxx", _NONCE_FIELD.sub(b"", data))


class _Once:
    def __init__(self, once: bool) -> None:
        self.once, self.used, self.lock = once, False, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            first = not self.used
            self.used = True
            return first or not self.once


class StrippingLeakInterceptor(OneRowLeakInterceptor):
    """The one-row leaking interceptor, forwarding the leaked tunnel without any nonce."""

    def __init__(self, *args: object, once: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._once = _Once(once)

    def leaks(self) -> bool:
        return self._once.take()

    def rewrite(self, first: bytes) -> bytes:
        return strip_nonces(first)


class StrippingLeakFront(OneRowLeakFront):
    """The one-row leaking front relay, forwarding the leaked row without any nonce."""

    def __init__(self, *args: object, once: bool = False, **kwargs: object) -> None:
        self._once = _Once(once)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def leaks(self) -> bool:
        return self._once.take()

    def rewrite(self, first: bytes) -> bytes:
        return strip_nonces(first)
