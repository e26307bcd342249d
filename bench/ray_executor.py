"""Stages as Ray tasks (``bench run --executor ray``; imported only then).

One Ray task per stage. The runner submits a cell's missing stages in dependency order, each with its parents'
object refs as arguments, so Ray itself starts a stage once its parents are done and never starts one whose parent
failed. What crosses the object store is small: the run's description (config + plan, put once), the stage (a frozen
dataclass of keys and plugin parameters) and, back, the stage's metadata (seconds, costs, node). Tensors, images and
pipelines never do: a worker reads its inputs from the artifact cache and writes its output there, atomically
(:class:`bench.cache.ArtifactStore`), so a retried or duplicated task is harmless. On a cluster the cache must be a
path every node sees (a shared filesystem); the driver alone writes ``results.sqlite``.

Failures: a stage that raises fails like in-process (the original exception, with the worker's traceback, reaches
the runner; plugin exceptions are not retried); a worker that dies (killed, out of memory, node lost) is retried up to
``run.max_retries`` times by Ray.

Numbers do not depend on placement: a worker runs its CPU kernels with the driver's torch thread count (a matrix
product can round differently with another count), whatever Ray's one-thread-per-CPU default would give.

Workers keep what is expensive between tasks: per worker process, the loaded base pipeline (keyed by the base stage's
key, i.e. the model fingerprint, and the device) and the stage environment of the run, with its last model pipelines.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Sequence

import ray

from .cache import stable_hash
from .executor import Executor


@dataclass(frozen=True)
class _RunSpec:
    """What a worker needs to build its stage environment (sent once per run through the object store)."""

    cfg: Any
    plan: Any
    cache_root: str
    fallbacks: tuple[str, ...]
    plugin_modules: tuple[tuple[str, str, str], ...]  # (registry kind, name, module) of plugins registered at run time
    home: str
    threads: int  # the driver's torch CPU threads: CPU kernels can round differently with another count


# Per worker process: the run's description, its stage environments (by run token and device) and loaded base
# pipelines.
_SPECS: dict[str, _RunSpec] = {}
_ENVS: dict[tuple[str, str], Any] = {}
_BASES: dict[tuple[str, str], Any] = {}


def _stage_task(token: str, spec_box: list, stage, *parents: dict) -> dict[str, Any]:
    """The Ray task: compute one stage on this worker; ``parents`` (their metadata) only order it after them."""
    from .stages import run_stage

    spec = _spec(token, spec_box)
    device = spec.cfg.run.device
    if device.startswith("cuda"):  # Ray made the granted GPU the only visible one; a CPU-only task runs on the CPU
        device = "cuda" if ray.get_gpu_ids() else "cpu"
    env = _worker_env(token, spec, device)
    if spec.threads:  # the same CPU arithmetic as in-process, so a number never depends on where it was computed
        import torch

        torch.set_num_threads(spec.threads)
    ctx = ray.get_runtime_context()
    env.placement = {"node_id": ctx.get_node_id(), "worker_pid": os.getpid()}
    try:
        meta = run_stage(stage, env)
    finally:
        if env._base is not None:
            key = (_base_key(env.plan), device)
            _BASES.pop(key, None)
            _BASES[key] = env._base
            while len(_BASES) > 2:  # a long-lived worker keeps the two models it used last
                del _BASES[next(iter(_BASES))]
    return {"key": stage.key, "seconds": meta["seconds"], "costs": meta.get("costs") or {}, **env.placement}


def _spec(token: str, spec_box: list) -> _RunSpec:
    if token not in _SPECS:
        _SPECS.clear()
        _SPECS[token] = ray.get(spec_box[0])
    return _SPECS[token]


def _worker_env(token: str, spec: _RunSpec, device: str):
    from .cache import ArtifactStore
    from .registries import REGISTRIES
    from .stages import StageEnv

    env = _ENVS.get((token, device))
    if env is not None:
        return env
    if spec.home and "MARKBENCH_HOME" not in os.environ:  # built-in models live where the driver keeps them
        os.environ["MARKBENCH_HOME"] = spec.home
    for kind, name, module in spec.plugin_modules:  # plugins the driver registered at run time (not built-in)
        if name not in REGISTRIES[kind]:
            __import__(module)
    cfg = spec.cfg if spec.cfg.run.device == device else replace(spec.cfg, run=replace(spec.cfg.run, device=device))
    env = StageEnv(cfg, spec.plan, ArtifactStore(spec.cache_root, fallbacks=spec.fallbacks))
    env._base = _BASES.get((_base_key(spec.plan), device))
    for key in [k for k in _ENVS if k[0] != token]:  # one run at a time per worker: drop older runs' pipelines
        del _ENVS[key]
    _ENVS[(token, device)] = env
    return env


def _base_key(plan) -> str:
    return next(k for k, s in plan.stages.items() if s.kind == "base")


def _runtime_plugins(cfg) -> tuple[tuple[str, str, str], ...]:
    """Where each configured plugin's class lives: a worker imports the module of any it does not know (one that
    the driver registered at run time rather than through the built-in table or an entry point)."""
    from .registries import REGISTRIES

    out = []
    for spec in (*cfg.defenses, *cfg.model_attacks, *cfg.image_attacks, *cfg.metrics):
        module = REGISTRIES[spec.kind].get(spec.name).__module__
        if module != "__main__":
            out.append((spec.kind, spec.name, module))
    return tuple(out)


def _torch_threads() -> int:
    import sys

    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0


class _RayFuture(Future):
    ref: Any = None


class RayExecutor(Executor):
    """Runs stages as Ray tasks. Joins the cluster at ``address`` (``"auto"``, ``"ray://head:10001"``), or starts a
    local Ray if none is given and none is running; shuts down only a Ray it started itself."""

    def __init__(self, address: str | None = None, max_retries: int = 3, **init_kwargs: Any):
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **init_kwargs)
            self._started = True
        self.max_retries = max_retries
        self.capacity = max(2, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(_stage_task)
        self._outstanding: dict[Any, _RayFuture] = {}
        self._runs: dict[int, tuple[str, list]] = {}

    def _run_of(self, env) -> tuple[str, list]:
        if id(env) not in self._runs:
            spec = _RunSpec(env.cfg, env.plan, str(env.store.root), tuple(str(f) for f in env.store.fallbacks),
                            _runtime_plugins(env.cfg), os.environ.get("MARKBENCH_HOME", ""), _torch_threads())
            token = stable_hash([env.cfg.to_dict(), str(env.store.root), _base_key(env.plan), os.getpid(), id(env)])
            self._runs[id(env)] = (token, [ray.put(spec)])  # in a list: a worker fetches it only once per run
        return self._runs[id(env)]

    def submit_stage(self, stage, env, deps: Sequence[Future] = (), resources: dict[str, float] | None = None
                     ) -> Future:
        res = dict(resources or {"num_cpus": 1})
        options: dict[str, Any] = {"num_cpus": res.pop("num_cpus", 1), "max_retries": self.max_retries}
        if res.get("num_gpus"):
            options["num_gpus"] = res.pop("num_gpus")
        res.pop("num_gpus", None)
        if res.get("memory"):
            options["memory"] = int(res.pop("memory"))
        res.pop("memory", None)
        if res:
            options["resources"] = res
        token, box = self._run_of(env)
        parents = [d.ref for d in deps if isinstance(d, _RayFuture)]
        fut = _RayFuture()
        fut.ref = self._task.options(name=f"{stage.kind}:{stage.key[:12]}", **options).remote(token, box, stage,
                                                                                             *parents)
        self._outstanding[fut.ref] = fut
        return fut

    def wait(self, futures: Sequence[Future], timeout: float | None = None) -> None:
        refs = list(self._outstanding)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # settle everything that is ready, so a failed parent is known with its children
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            self._settle(ref)

    def _settle(self, ref) -> None:
        fut = self._outstanding.pop(ref)
        try:
            fut.set_result(ray.get(ref))
        except ray.exceptions.RayTaskError as err:  # the stage raised: hand on its own exception
            cause = getattr(err, "cause", None)
            exc = cause if isinstance(cause, BaseException) else err
            try:
                exc.remote_traceback = str(err)
            except AttributeError:  # pragma: no cover - an exception type with __slots__
                pass
            fut.set_exception(exc)
        except ray.exceptions.RayError as err:  # worker or node lost beyond max_retries, or the task cancelled
            fut.set_exception(err)

    def shutdown(self) -> None:
        for ref in list(self._outstanding):  # an interrupted run: stop what is still queued or running
            try:
                ray.cancel(ref, force=True)
            except Exception:  # pragma: no cover - already finished or gone
                pass
        self._outstanding.clear()
        self._runs.clear()
        if self._started and ray.is_initialized():
            ray.shutdown()
