"""Progress bars that stay quiet in logs: one place for every stage's tqdm.

On a terminal a bar redraws in place; written to a file or a pipe (a batch job's log) every
redraw is another line, so a long run floods its log. Without a TTY the bar refreshes at most
every NO_TTY_INTERVAL_S seconds (and at the end), which reads as a few plain progress lines.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm

NO_TTY_INTERVAL_S = 30.0


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class tqdm(_tqdm):  # noqa: N801 - a drop-in for tqdm.auto.tqdm
    """tqdm.auto.tqdm with a 30 s refresh interval when stderr is not a terminal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not stderr_is_tty() and kwargs.get("file") in (None, sys.stderr):
            kwargs.setdefault("mininterval", NO_TTY_INTERVAL_S)
            kwargs.setdefault("maxinterval", NO_TTY_INTERVAL_S)
        super().__init__(*args, **kwargs)
