"""A deliberately broken proxy: the reference's refusal, then the refused bytes forwarded late, without a
nonce, later on every try after the first (a late forwarder whose lateness drifts).

It exists to prove the smuggling campaign's isolation reruns (``probes/smuggling.py``, ``_isolate``) against
the shape of the flake seen under load: the campaign pass blames the nonce-less forward on every attempt in
flight; when the leaking row is rerun alone its forward comes later than its round waits, lands in the next
round and is attributed there to that round's rerun. Isolation that trusts one rerun then takes the leak
off the row that leaked (BLOCKED: a false pass) and puts it on an innocent neighbour.

:class:`DriftingForwarder`: a front relay on its own lab port. Every connection is relayed to the inner
reference proxy. When the first bytes of a connection hold ``marker`` and the reference refused them, the
client connection is closed and the client's bytes, every nonce stripped (``nonce_stripping_leak.strip_nonces``),
are written to the request's authority (``raw_relay.destination``: a lab public origin): the first time
``delay`` seconds later; every later time held back until the front's next connection arrives (the next
rerun's, whenever the machine lets the campaign get to it: the forward lands in that rerun's round however long
the rounds take), or ``fallback`` seconds if none arrives (a rerun with no next one: its forward still lands
within the longest wait of a confirmation round).

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
# Later than an isolation round's grace period (0.5 s) and within ROUND_WAIT_LIMIT_GRACES grace periods (2 s), the
# wait of a confirmation round: a held forward that no next connection releases lands after its own round when that
# waited only the grace period, and inside it when it waited the longest.
FALLBACK_SECONDS = 1.5


class DriftingForwarder(OneRowLeakFront):
    """The front relay (see the module doc); ``forwarded`` holds when each late forward was written
    (``time.monotonic()``)."""

    def __init__(self, *args: object, delay: float = DELAY_SECONDS, fallback: float = FALLBACK_SECONDS,
                 **kwargs: object) -> None:
        self.delay, self.fallback = delay, fallback
        self.forwarded: list[float] = []
        self._lock = threading.Lock()
        self._forwards: list[threading.Thread] = []
        self._held: list[threading.Event] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        super().stop()
        for thread in self._forwards:
            thread.join(IDLE_SECONDS * 2)

    def _release_held(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for release in held:
            release.set()

    def _serve(self, client: socket.socket) -> None:
        self._release_held()  # a new connection: the next rerun's, in the next round (module doc)
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
                first = not self._forwards
                release = threading.Event()  # never set for the first forward: it comes after ``delay``
                if not first:
                    self._held.append(release)
                forward = threading.Thread(target=self._forward_when, args=(sent, release,
                                           self.delay if first else self.fallback), daemon=True)
                self._forwards.append(forward)
            forward.start()

    def _forward_when(self, sent: bytes, release: threading.Event, wait: float) -> None:
        release.wait(wait)
        self._forward(sent)

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
