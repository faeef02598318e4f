"""Deadlines on the proxy's hot path: one reusable timer per client connection, and a bounded await.

Kept apart from the server so that the relay and the server share one deadline helper and the
timer's rescheduling logic can be read (and tested) on its own.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["Watchdog", "bounded"]

_T = TypeVar("_T")

if sys.version_info >= (3, 11):

    async def bounded(awaitable: Awaitable[_T], seconds: float) -> _T:
        """Await with a deadline; ``asyncio.timeout`` costs one timer, not a task per call."""
        async with asyncio.timeout(seconds):
            return await awaitable

else:  # pragma: no cover - Python 3.10

    async def bounded(awaitable: Awaitable[_T], seconds: float) -> _T:
        return await asyncio.wait_for(awaitable, seconds)


class Watchdog:
    """One lazily rescheduled timer per client connection, so arming it costs two attribute writes
    instead of a timer (or a task) per await. When the armed deadline passes, ``action`` runs
    (it aborts a transport, which wakes the awaiting reader with EOF) and ``expired`` is set."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._deadline: float | None = None
        self._action: Callable[[], object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._scheduled_for = 0.0
        self.expired = False

    def arm(self, seconds: float, action: Callable[[], object]) -> None:
        self._deadline = deadline = self._loop.time() + seconds
        self._action = action
        self.expired = False
        if self._handle is None or deadline < self._scheduled_for:
            if self._handle is not None:
                self._handle.cancel()
            self._schedule(deadline)

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, when: float) -> None:
        self._scheduled_for = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        deadline, action = self._deadline, self._action
        if deadline is None or action is None:
            return
        if self._loop.time() >= deadline:
            self._deadline = None
            self.expired = True
            action()
        else:
            self._schedule(deadline)
