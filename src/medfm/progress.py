"""One progress-bar helper for the long loops (3D propagation, evaluation, training), so they look alike."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[..., None]


@contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Advance]:
    """Yield ``advance(status=None)``: moves a transient rich progress bar by one and, when given,
    shows ``status`` (e.g. the current loss and speed) after it; does nothing when disabled."""
    if not enabled:
        yield lambda status=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(status: str | None = None) -> None:
            bar.update(task, advance=1, **({} if status is None else {"status": status}))

        yield advance
