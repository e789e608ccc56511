"""Progress bars that stay readable in a log: tqdm on a terminal, one line per refresh elsewhere."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 2.0  # least time between two progress lines in a non-TTY log


class _LineStream:
    """A stream for tqdm that turns each carriage-return refresh into a line of its own."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: float, desc: str, *, disable: bool = False, unit: str = "B", **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr: redrawn in place on a terminal, one line per refresh
    (at most every ``LOG_INTERVAL_S``) when stderr is a file or pipe."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=disable, dynamic_ncols=True,
                    file=stream, **kwargs)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=disable, ncols=100,
                mininterval=LOG_INTERVAL_S, file=_LineStream(stream), **kwargs)
