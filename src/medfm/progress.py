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
        advance, finish = _plain_lines(total, description)
        yield advance
        finish()
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


def _plain_lines(total: int, description: str) -> tuple[Advance, Callable[[], None]]:
    """``advance`` prints a line when `PLAIN_INTERVAL` has passed; ``finish`` prints the last one
    (work may end before ``total``, e.g. a propagation that stops where the mask vanishes)."""
    started = last = time.monotonic()
    done, shown, latest = 0, 0, ""

    def show() -> None:
        nonlocal last, shown
        last, shown = time.monotonic(), done
        print(f"{description}: {done}/{total} ({last - started:.0f} s){f' {latest}' if latest else ''}",
              file=sys.stderr, flush=True)

    def advance(status: str | None = None) -> None:
        nonlocal done, latest
        done, latest = done + 1, status or latest
        if time.monotonic() - last >= PLAIN_INTERVAL:
            show()

    def finish() -> None:
        if done != shown:
            show()

    return advance, finish
