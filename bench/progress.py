"""Progress bars (rich): one bar over the grid with ETA, transient bars inside long stages."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator


class Progress:
    """A thin wrapper over ``rich.progress.Progress``; ``enabled=False`` makes every call a no-op."""

    def __init__(self, enabled: bool = True, console=None):
        self.enabled = enabled
        self._p = None
        self.console = console

    @contextmanager
    def live(self) -> Iterator["Progress"]:
        if not self.enabled:
            yield self
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._p = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
                               transient=False)
        with self._p:
            yield self
        self._p = None

    def add(self, description: str, total: int) -> int | None:
        if self._p is None:
            return None
        return self._p.add_task(description, total=total)

    def advance(self, task: int | None, n: int = 1, description: str | None = None) -> None:
        if self._p is not None and task is not None:
            self._p.update(task, advance=n, **({"description": description} if description else {}))

    def update(self, task: int | None, **fields) -> None:
        """Set a bar's ``total``, ``completed`` or ``description``."""
        if self._p is not None and task is not None:
            self._p.update(task, **fields)

    def track(self, iterable: Iterable, total: int | None = None, description: str = "") -> Iterable:
        """Iterate with a transient sub-bar (used by ``StageContext.progress``)."""
        if self._p is None:
            yield from iterable
            return
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        task = self._p.add_task(f"  {description}", total=total)
        try:
            for item in iterable:
                yield item
                self._p.update(task, advance=1)
        finally:
            self._p.remove_task(task)
