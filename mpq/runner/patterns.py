"""User regular expressions over layer names (``--layers``, ``re:`` patterns in ``groups.content`` and
``sensitivity.layers``): compiled with a one-line error, and matched under a deadline, so a pattern that backtracks
exponentially (nested repetition like ``(a+)+``) is refused instead of hanging the command."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from mpq.errors import MpqError

DEADLINE_S = 5.0


class _Timeout(Exception):
    pass


def compile_pattern(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise MpqError(f"{what} {pattern!r} is not a regular expression ({err})") from None


@contextmanager
def deadline(what: str, seconds: float = DEADLINE_S) -> Iterator[None]:
    """Raise a one-line error if the block (regex matching) runs past ``seconds``; a no-op off the main thread or
    where the platform has no interval timer."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Timeout:
        raise MpqError(
            f"{what} took over {seconds:g} s to match the layer names (nested repetition like (a+)+ backtracks "
            "exponentially); simplify the pattern"
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def search_names(pattern: str, names: Iterable[str], what: str, seconds: float = DEADLINE_S) -> list[str]:
    """The names ``pattern`` finds (``re.search``), in order."""
    compiled = compile_pattern(pattern, what)
    with deadline(f"{what} {pattern!r}", seconds):
        return [n for n in names if compiled.search(n)]
