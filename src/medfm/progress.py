"""One progress helper for the long loops (3D propagation, evaluation, training), so they look alike.

Progress goes to stderr, so stdout stays the command's result: a live bar on a terminal, and
plain lines (at most one every `PLAIN_INTERVAL` seconds, and the last) when stderr is a file or
a pipe, so that a batch job's log still shows the work moving.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[..., None]

#: Seconds between two plain progress lines off a terminal.
PLAIN_INTERVAL = 10.0


@contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Advance]:
    """Yield ``advance(status=None)``: moves the progress by one and, when given, shows ``status``
    (e.g. the current loss and speed) after it; does nothing when disabled."""
    if not enabled:
        yield lambda status=None: None
        return
    if not sys.stderr.isatty():
        yield _plain_lines(total, description)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(status: str | None = None) -> None:
            bar.update(task, advance=1, **({} if status is None else {"status": status}))

        yield advance


def _plain_lines(total: int, description: str) -> Advance:
    started = last = time.monotonic()
    done = 0

    def advance(status: str | None = None) -> None:
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if now - last >= PLAIN_INTERVAL or done == total:
            last = now
            print(f"{description}: {done}/{total} ({now - started:.0f} s){f' {status}' if status else ''}",
                  file=sys.stderr, flush=True)

    return advance
