"""How stages are executed. The runner only submits stages and waits for futures; it never assumes one process
or one device.

An executor has a ``capacity`` (how many stages may be in flight) and three calls:

* ``submit_stage(stage, env, deps, resources) -> Future``: compute one stage (:func:`bench.stages.run_stage`);
  ``deps`` are the futures of its parents still in flight (the executor must not start it before they finish), and
  ``resources`` what it needs on a worker (:mod:`bench.resources`). The future's result is the stage's small
  metadata (``seconds``, ``costs``); its exception is the stage's own exception.
* ``wait(futures, timeout)``: block until at least one of ``futures`` is done (or the timeout passes).
* ``shutdown()``.

:class:`InProcessExecutor` (the default, capacity 1) runs each stage at once in this process, so its futures are
done when ``submit_stage`` returns and the runner keeps its one-cell-at-a-time order. :class:`bench.ray_executor.
RayExecutor` (``run.executor = "ray"``; imported only when asked for) runs each stage as a Ray task on workers that
share the artifact folder.
"""

from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import Future
from typing import Any, Callable, Sequence

#: ``run.executor`` values.
EXECUTORS = ("local", "ray")


class Executor:
    """``submit_stage`` / ``wait`` / ``shutdown`` and ``capacity`` (how many stages may be in flight)."""

    capacity: int = 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        raise NotImplementedError

    def submit_stage(self, stage, env, deps: Sequence[Future] = (), resources: dict[str, float] | None = None
                     ) -> Future:
        from .stages import run_stage

        return self.submit(run_stage, stage, env)

    def wait(self, futures: Sequence[Future], timeout: float | None = None) -> None:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        wait_futures(futures, timeout=timeout, return_when=FIRST_COMPLETED)

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


def executor_available(name: str) -> str:
    """Empty if the executor ``name`` can be used here, else why not (the end of a sentence)."""
    if name == "ray":
        try:
            found = sys.modules["ray"] is not None if "ray" in sys.modules else \
                importlib.util.find_spec("ray") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return ("needs the Python package 'ray', which is not installed; install it with: "
                    "pip install 'markbench[ray]'")
    return ""


def make_executor(cfg) -> Executor:
    """The executor ``cfg.run.executor`` names (the config has checked that it is available)."""
    if cfg.run.executor == "ray":
        try:
            from .ray_executor import RayExecutor
        except ImportError as exc:  # installed but broken (a version mismatch, a shadowing ray.py): one sentence
            from .errors import UserError

            raise UserError(f"{cfg.path}: run.executor = 'ray' needs the Python package 'ray', which is installed "
                            f"but cannot be imported ({type(exc).__name__}: {str(exc)[:160]}); reinstall it with: "
                            "pip install 'markbench[ray]'") from None

        return RayExecutor(address=cfg.run.address or None, max_retries=cfg.run.max_retries)
    return InProcessExecutor()
