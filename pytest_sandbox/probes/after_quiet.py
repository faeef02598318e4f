"""Denials sent after the proxy under test has been left alone: the SSRF refusals, once the suite went quiet.

The conformance suite reaches the proxy in bursts whose pauses are short (the campaigns send hundreds of
requests in a second or two). A proxy that refuses special-use destinations only while requests keep coming,
and lets the first one through after some seconds of silence, passes every burst. So the suite ends its proxy
traffic with the SSRF campaign and puts the modules that send nothing through the proxy after it
(``fixtures/run_order.py:SESSION_TAIL``: the SSRF verdicts being reported, the loaded-filter evaluation, the
syscall verdicts), then sends :data:`DENIALS` (each with its unmarked twin, as the campaign does) and
:data:`CONTROLS` from the last test of the session: by then the lab has carried no traffic for as long as that
tail took (about 4 s on an idle 2-core machine), and never less than :data:`MIN_QUIET_SECONDS` (the test
waits out the difference, bounded, when a selection or an xdist worker gave it less).

"No traffic" is observed, not assumed: :class:`QuietWatch` samples the lab namespace's TCP counters
(``/proc/<pid>/net/snmp``, the per-namespace TCP MIB of RFC 4022: ``InSegs``/``OutSegs`` count every segment
of every TCP socket in the namespace, IPv4 and IPv6) from the moment the proxy under test starts. Every
request to the proxy, every answer and every dial it makes is a segment there, so the quiet measured (from
the sample that saw the last change) is a lower bound on how long the proxy has seen no request. A proxy whose
threshold is longer than the quiet reached still passes: the check costs wall time it does not have.

The denials go first and together (one connection each, all in flight at once, marked and unmarked); the
positive controls start only when a denial's exchange has finished, so the request that ends the silence is
always a denial, whichever one arrives first.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pytest_sandbox.catalogues.ssrf_cases import SSRF_CASES
from pytest_sandbox.network.lab.lab import NetworkLab
from pytest_sandbox.probes.campaign import GRACE_SECONDS
from pytest_sandbox.probes.ssrf import Attempt, build_attempts
from pytest_sandbox.probes.ssrf_exchanges import AttemptExchange, SsrfVerdict, run_ssrf_campaign
from pytest_sandbox.verdicts.after_quiet import judge_after_quiet
from pytest_sandbox.verdicts.judgement import Judgement

__all__ = [
    "CONTROLS",
    "DENIALS",
    "MIN_QUIET_SECONDS",
    "AfterQuietRun",
    "QuietWatch",
    "QuietWatchError",
    "after_quiet_key",
    "run_after_quiet",
    "snmp_path_of",
    "tcp_segments",
]

# The least quiet the exchanges are sent after: the suite's own tail gives more when the whole suite runs
# (~4 s idle); a smaller selection, or an xdist worker whose last tests used the proxy, waits the rest.
MIN_QUIET_SECONDS = 3.0
# How often the lab's TCP counters are read: the quiet measured is short of the real one by at most this.
POLL_SECONDS = 0.05
# How long the test waits for that quiet at most, in multiples of it (traffic that never stops: INDETERMINATE).
WAIT_LIMIT_FACTOR = 4

def _attempt(case_id: str, form: str) -> Attempt:
    case = next(case for case in SSRF_CASES if case.case_id == case_id)
    return next(attempt for attempt in build_attempts((case,), forms=(form,)))


# Special-use destinations an SSRF reaches for, in both request forms, a literal and names: metadata (IPv4 and
# the IPv6 IMDS address), RFC 1918 private, a name the stub resolves to the metadata address.
DENIALS: tuple[Attempt, ...] = (
    _attempt("meta-imds-169.254.169.254", "absolute"),
    _attempt("meta-imds-169.254.169.254", "connect"),
    _attempt("v4-private-10-inner-10.0.0.1", "absolute"),
    _attempt("meta-aws-imds-ipv6-fd00:ec2::254", "connect"),
    _attempt("name-metadata-google-internal", "absolute"),
)
# A public destination just outside 10/8, in both forms: the proxy is up and forwards after the quiet.
CONTROLS: tuple[Attempt, ...] = (
    _attempt("ctl-v4-private-10-above-11.0.0.0", "absolute"),
    _attempt("ctl-v4-private-10-above-11.0.0.0", "connect"),
)


def tcp_segments(snmp_text: str) -> tuple[int, int]:
    """``(InSegs, OutSegs)`` from the text of a ``/proc/<pid>/net/snmp`` (a ``Tcp:`` header line of field
    names, then a ``Tcp:`` line of values). Raises ValueError when they are missing. Pure."""
    rows = [line.split()[1:] for line in snmp_text.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2 or len(rows[0]) != len(rows[1]):
        raise ValueError("no Tcp: counters")
    fields = dict(zip(rows[0], rows[1], strict=True))
    try:
        return int(fields["InSegs"]), int(fields["OutSegs"])
    except (KeyError, ValueError):
        raise ValueError("no InSegs/OutSegs among the Tcp: counters") from None


_NETNS_PATH = re.compile(r"/proc/(\d+)/ns/net")


def snmp_path_of(netns_path: str) -> str:
    """The counters file of the namespace ``netns_path`` (``/proc/<pid>/ns/net``) names. Pure."""
    match = _NETNS_PATH.fullmatch(netns_path)
    if match is None:
        raise QuietWatchError(f"the lab's namespace {netns_path!r} is not a /proc/<pid>/ns/net path")
    return f"/proc/{match.group(1)}/net/snmp"


class QuietWatchError(Exception):
    """The lab's TCP counters cannot be read: the after-quiet exchanges cannot be judged."""


class QuietWatch:
    """A thread reading the lab namespace's TCP counters every :data:`POLL_SECONDS`; :meth:`quiet_for` is how
    long ago the last change was seen (from the start of the watch, at the latest). :meth:`stop` joins it."""

    def __init__(self, snmp_path: str, *, poll: float = POLL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = snmp_path
        self.poll = poll
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counters = self._read()  # raises QuietWatchError now, not in the thread
        self._changed = clock()
        self._thread = threading.Thread(target=self._run, name="after-quiet-watch", daemon=True)
        self._thread.start()

    @classmethod
    def of_lab(cls, lab: NetworkLab) -> QuietWatch:
        return cls(snmp_path_of(lab.netns_path))

    def _read(self) -> tuple[int, int]:
        try:
            with open(self.path, encoding="ascii") as counters:
                return tcp_segments(counters.read())
        except (OSError, ValueError) as error:
            raise QuietWatchError(f"cannot read the lab's TCP counters {self.path}: {error}") from None

    def sample(self) -> None:
        """Read the counters now; a change since the last read restarts the quiet."""
        counters = self._read()
        with self._lock:
            if counters != self._counters:
                self._counters = counters
                self._changed = self._clock()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.sample()
            except QuietWatchError:
                with self._lock:
                    self._changed = self._clock()  # unreadable: assume traffic (never overstate the quiet)

    def quiet_for(self) -> float:
        """Seconds since the last change seen, after a fresh read."""
        self.sample()
        with self._lock:
            return self._clock() - self._changed

    def wait_quiet(self, seconds: float) -> float:
        """Wait until the lab has been quiet for ``seconds`` (at most ``WAIT_LIMIT_FACTOR * seconds``): the
        quiet reached, which is less only if traffic kept coming until the limit."""
        deadline = self._clock() + WAIT_LIMIT_FACTOR * seconds
        quiet = self.quiet_for()
        while quiet < seconds and (left := deadline - self._clock()) > 0:
            time.sleep(max(self.poll, min(seconds - quiet, left)))
            quiet = self.quiet_for()
        return quiet

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


@dataclass(frozen=True)
class AfterQuietRun:
    """What the session-end exchanges found: the quiet they were sent after, each exchange's own verdict
    (by :func:`after_quiet_key`) and the set's judgement (``verdicts/after_quiet.py``)."""

    quiet: float
    verdicts: dict[str, SsrfVerdict]
    judgement: Judgement
    attempted: str


# Each exchange's verdict is keyed by its SSRF test id behind this prefix.
AFTER_QUIET_PREFIX = "after-quiet-"


def after_quiet_key(attempt: Attempt) -> str:
    return f"{AFTER_QUIET_PREFIX}{attempt.test_id}"


def run_after_quiet(lab: NetworkLab, connect_to_proxy: Callable[[], socket.socket], watch: QuietWatch,
                    *, minimum: float = MIN_QUIET_SECONDS, grace: float = GRACE_SECONDS) -> AfterQuietRun:
    """Wait until the lab has been quiet ``minimum`` s (no wait when the suite already gave that), then send
    :data:`DENIALS` and their unmarked twins all at once and :data:`CONTROLS` after them, as one campaign
    (grace period, attribution, isolation); judge each, then the set."""
    quiet = watch.wait_quiet(minimum)
    # The denials and their twins all in flight at once, the controls queued behind them: a control starts
    # only when a denial's exchange has ended, so the request that ends the quiet is a denial.
    # No retry: a proxy that stays silent to the first request after the quiet is what this check judges, and a
    # second send would no longer come after a quiet. No bare twins: they run alone, after the quiet's requests,
    # so they too would no longer come after a quiet (the SSRF campaign sends them).
    judged = run_ssrf_campaign(lab, connect_to_proxy, [AttemptExchange(attempt) for attempt in DENIALS],
                               grace=grace, concurrency=None,
                               then=[AttemptExchange(attempt) for attempt in CONTROLS], retry=False, bare=())
    verdicts = {f"{AFTER_QUIET_PREFIX}{key}": verdict for key, verdict in judged.items()}
    judgement = judge_after_quiet([(key, verdict.judgement) for key, verdict in verdicts.items()], quiet, minimum)
    attempted = (f"{len(DENIALS)} special-use destinations (marked and unmarked) and {len(CONTROLS)} controls, "
                 f"sent once the lab had carried no traffic for at least {minimum:.1f} s")
    return AfterQuietRun(quiet, verdicts, judgement, attempted)
