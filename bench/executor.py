"""How stages are executed. The runner only submits stages and waits for futures; it never assumes one process
or one device. :class:`InProcessExecutor` (the default) runs each stage at once in this process; a cluster executor
(Ray) implements the same two methods and runs :func:`bench.stages.run_stage` on workers that share the artifact
folder."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable


class Executor:
    """``submit(fn, *args) -> Future`` and ``capacity`` (how many stages may be in flight)."""

    capacity: int = 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class InProcessExecutor(Executor):
    capacity = 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the stage failed: its cell fails, the run goes on
            fut.set_exception(exc)
        return fut
