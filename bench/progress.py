"""Progress bars (rich): one bar over the grid with ETA, transient bars inside long stages.

Without bars (``--no-progress``, or standard error not a terminal: a run under ``nohup``, in CI, piped to a file),
a loop that reports progress writes a plain line through ``log`` at most every ``interval`` seconds instead
(``  tree_ring: inversion: 3/8 in 612 s, about 1020 s left``), so that a long stage in a log file is not silent.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator


class Progress:
    """A thin wrapper over ``rich.progress.Progress``; ``enabled=False`` makes every call a no-op."""

    def __init__(self, enabled: bool = True, console=None, log: Callable[[str], None] | None = None,
                 interval: float = 60.0):
        self.enabled = enabled
        self._p = None
        self.console = console
        self.log = log  # without bars: where a long loop's progress lines go (None: nowhere)
        self.interval = interval

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
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        if self._p is None:
            if self.enabled or self.log is None:
                yield from iterable
            else:
                yield from self._track_text(iterable, total, description)
            return
        task = self._p.add_task(f"  {description}", total=total)
        try:
            for item in iterable:
                yield item
                self._p.update(task, advance=1)
        finally:
            self._p.remove_task(task)

    def _track_text(self, iterable: Iterable, total: int | None, description: str) -> Iterable:
        """``track`` without bars: a line through ``log`` after an item when ``interval`` seconds have passed since
        the loop started or since the last line."""
        start = last = time.monotonic()
        done = 0
        for item in iterable:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.interval:
                last = now
                self.log(progress_line(description, done, total, now - start))


def progress_line(description: str, done: int, total: int | None, elapsed: float) -> str:
    """``  <description>: <done>/<total> in <elapsed> s, about <eta> s left`` (the plain-text progress line)."""
    line = f"  {description}: {done}" + (f"/{total}" if total else "") + f" in {elapsed:.0f} s"
    if total and done < total:
        line += f", about {elapsed / done * (total - done):.0f} s left"
    return line
