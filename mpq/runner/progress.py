"""Progress bars that behave in a terminal and in a log.

On a terminal: tqdm as usual. Elsewhere (CI logs, ``> file``, pipes): tqdm
redraws with carriage returns, so a 200-step bar becomes one very long line;
there, a bar prints a plain line at most every ``log_interval`` seconds and
once at the end.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


class _LogBar(tqdm):  # type: ignore[misc]
    """tqdm that writes whole lines (no carriage returns), rate-limited by ``mininterval``."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line: nothing to clear in a log
            return False
        self.fp.write((msg if msg is not None else self.__str__()) + "\n")
        self.fp.flush()
        return True

    def close(self) -> None:
        if not self.disable and self.last_print_n != self.n:
            self.display()  # the final count, once
        self.leave = False  # tqdm's own close would rewrite the line with a carriage return
        super().close()


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on a terminal, a line-per-interval logger elsewhere; in a torchrun job, rank 0's
    only."""
    from mpq.runner import distributed

    if not distributed.current().is_main:
        kwargs["disable"] = True
    stream = kwargs.get("file") or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, **kwargs)
    kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.0)), LOG_INTERVAL_S)
    kwargs["leave"] = True
    kwargs.setdefault("dynamic_ncols", False)
    return _LogBar(iterable, ascii=True, ncols=100, **kwargs)
