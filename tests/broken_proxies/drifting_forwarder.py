"""A deliberately broken proxy: the reference's refusal, then the refused bytes forwarded late, without a
nonce, later on every try after the first (a late forwarder whose lateness drifts).

It exists to prove the smuggling campaign's isolation reruns (``probes/smuggling.py``, ``_isolate``) against
the shape of the flake seen under load: the campaign pass blames the nonce-less forward on every attempt in
flight; when the leaking row is rerun alone its forward comes later than its round waits, lands in the next
round and is attributed there to that round's rerun. Isolation that trusts one rerun then takes the leak
off the row that leaked (BLOCKED: a false pass) and puts it on an innocent neighbour.

:class:`DriftingForwarder`: a front relay on its own lab port. Every connection is relayed to the inner
reference proxy. When the first bytes of a connection hold ``marker`` and the reference refused them, the
client connection is closed and ``delay`` seconds later (plus ``slowdown`` on every forward after the
first) the client's bytes, every nonce stripped (``nonce_stripping_leak.strip_nonces``), are written to the
request's authority (``raw_relay.destination``: a lab public origin).

In-process, with the lab's sockets only: every address it can dial is a lab listener.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from broken_proxies.late_forwarder import refused
from broken_proxies.nonce_stripping_leak import strip_nonces
from broken_proxies.one_row_leak import IDLE_SECONDS, READ_SIZE, OneRowLeakFront
from broken_proxies.raw_relay import destination, pipe

DELAY_SECONDS = 0.1
# A rerun's forward comes DELAY + SLOWDOWN (0.75 s) after it ended: later than an isolation round's grace period
# (0.5 s), so it lands in the next round, and well within ROUND_WAIT_LIMIT_GRACES grace periods (2 s).
SLOWDOWN_SECONDS = 0.65


class DriftingForwarder(OneRowLeakFront):
    """The front relay (see the module doc); ``forwarded`` holds when each late forward was written
    (``time.monotonic()``)."""

    def __init__(self, *args: object, delay: float = DELAY_SECONDS, slowdown: float = SLOWDOWN_SECONDS,
                 **kwargs: object) -> None:
        self.delay, self.slowdown = delay, slowdown
        self.forwarded: list[float] = []
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        super().stop()
        for timer in self._timers:
            timer.join(IDLE_SECONDS * 2)

    def _serve(self, client: socket.socket) -> None:
        sent = b""
        answers = bytearray()
        with client:
            client.settimeout(IDLE_SECONDS)
            try:
                sent = client.recv(READ_SIZE)
                if not sent:
                    return
                upstream = self.lab.connect(*self.inner, timeout=IDLE_SECONDS)
            except OSError:
                return
            with upstream:
                with contextlib.suppress(OSError):
                    upstream.sendall(sent)
                    if self.marker not in sent:
                        upstream.settimeout(None)
                        client.settimeout(None)
                        pipe(client, upstream)
                        return
                    # The marked row: the reference's answers until it closes, then the client is closed too.
                    while data := upstream.recv(READ_SIZE):
                        answers += data
                        client.sendall(data)
        if refused(bytes(answers)):
            with self._lock:
                delay = self.delay + (self.slowdown if self._timers else 0.0)
                timer = threading.Timer(delay, self._forward, args=(sent,))
                timer.daemon = True
                self._timers.append(timer)
            timer.start()

    def _forward(self, sent: bytes) -> None:
        host, port, _is_connect = destination(sent, self.default)
        with contextlib.suppress(OSError):
            with self.lab.dial(host, port, IDLE_SECONDS) as upstream:
                upstream.sendall(strip_nonces(sent))
                with self._lock:
                    self.forwarded.append(time.monotonic())
                upstream.settimeout(1.0)
                with contextlib.suppress(OSError):
                    upstream.recv(READ_SIZE)
