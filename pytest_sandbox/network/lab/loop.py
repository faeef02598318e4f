"""The lab's event loop in its own thread, and the one way other threads run code on it.

Every lab socket is read and written on this loop; query methods hand it a function and wait for the
result (bounded), so the lab's state is touched by one thread only. Stdlib only (the netns helper and
unprivileged runs import the lab with nothing but h11 on the path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["LOOP_CALL_TIMEOUT_SECONDS", "LoopThread"]

LOOP_CALL_TIMEOUT_SECONDS = 10.0
T = TypeVar("T")


class LoopThread:
    """An asyncio loop running forever in a daemon thread named ``name``, until :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the loop thread (directly when already on it) and return its result.

        Raises what ``function`` raised, or TimeoutError after :data:`LOOP_CALL_TIMEOUT_SECONDS`.
        """
        if threading.get_ident() == self.thread.ident:
            return function()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout=LOOP_CALL_TIMEOUT_SECONDS)

    def stop(self, last: Callable[[], None]) -> bool:
        """Run ``last`` on the loop, stop the loop, join the thread (bounded) and close the loop.

        Returns False, running nothing, when the thread was not running.
        """
        running = self.thread.is_alive()
        if running:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self.call(last)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=LOOP_CALL_TIMEOUT_SECONDS)
        if not self.thread.is_alive():
            self.loop.close()
        return running
