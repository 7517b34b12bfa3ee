"""A SIGTERM while a Ray Data job runs (a pod or machine going away, `ray job stop`): the job ends at once, keeping
what it marked finished, and says so in one line; the same command then redoes only what was not finished."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """Raised in the main thread by a SIGTERM (a BaseException, like KeyboardInterrupt, so no `except Exception` on
    the way swallows it)."""


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Inside, a SIGTERM raises `Terminated` in the main thread; outside, the previous handler is back. Only on the
    main thread (elsewhere Python cannot install a handler, and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
