"""The runner: plan -> execute stages (cached) -> measure cells -> store results.

Order: with the in-process executor (the default) cells are taken one after another and each cell's missing stages
are computed depth-first, so results arrive early and an interrupted run keeps every finished cell. An executor with
capacity > 1 (Ray) gets every missing stage at once, each with its parents' futures, and cells are measured as they
complete. A stage that raises fails the cells that need it (error and traceback stored); every other cell goes on.
Re-running the same command resumes: finished cells are skipped, cached stages are not recomputed. This process is
the only writer of ``results.sqlite``; stages write only the artifact cache.
"""

from __future__ import annotations

import time
import traceback as tb
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import ArtifactStore, CorruptArtifact, FeatureCache, shipped_stores
from .config import BenchConfig
from .errors import BenchError, PluginError, UserError
from .executor import Executor, make_executor
from .plan import Cell, Plan, Stage, build_plan, stage_seed
from .plugins import DetectionKind, MeasureContext, Measurement, threat_scope
from .progress import Progress
from .resources import stage_resources
from .provenance import git_hash, package_versions
from .stages import StageEnv, generation_settings, run_generate_group
from .store import ResultStore


@dataclass
class RunSummary:
    run_id: str
    cells_total: int = 0
    cells_ok: int = 0
    cells_skipped: int = 0
    cells_failed: list[tuple[str, str]] = field(default_factory=list)  # (label, error)
    stages_run: dict[str, int] = field(default_factory=dict)
    stages_cached: int = 0
    healed: list[str] = field(default_factory=list)  # cache entries found damaged, quarantined and recomputed
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.cells_failed

    def as_dict(self) -> dict[str, Any]:
        return {"cells_total": self.cells_total, "cells_ok": self.cells_ok, "cells_skipped": self.cells_skipped,
                "cells_failed": self.cells_failed, "stages_run": self.stages_run,
                "stages_cached": self.stages_cached, "healed": self.healed, "seconds": round(self.seconds, 3)}


@dataclass
class _Failure:
    message: str
    traceback: str


@dataclass
class _Pending:
    """A cell whose stages are submitted and not yet all finished."""

    cell: Cell
    stages: list  # its closure, in dependency order
    index: int  # its position among the run's submitted cells
    timings: dict[str, float] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1  # a cell is tried again (up to _HEAL_ATTEMPTS) after a damaged cache entry it read is healed


#: stage kinds whose recorded cost is stored with the cell
_COSTED = ("embed", "model_attack", "image_attack", "forge", "surrogate")
_CELL_ATTACK = ("image_attack", "forge")

#: how often one cell is tried after healing damaged entries it read
_HEAL_ATTEMPTS = 3


class Runner:
    def __init__(self, cfg: BenchConfig, *, executor: Executor | None = None, progress: Progress | None = None,
                 log=None, warn=None):
        self.cfg = cfg
        self.plan: Plan = build_plan(cfg)
        self._own_executor = executor is None
        self.executor = executor
        self.progress = progress or Progress(enabled=False)
        self.artifacts = ArtifactStore(cfg.cache_dir, fallbacks=shipped_stores())
        self.log = log or (lambda msg: None)
        self.warn = warn or self.log  # one line per healed cache entry, shown even under progress bars
        self._seen_cached: set[str] = set()
        self._checked: set[str] = set()  # cached entries checked (sizes) in this run
        self._shared: dict[str, Any] = {}  # metrics' per-run state (e.g. FID reference statistics)
        self.features = FeatureCache(self.artifacts)  # metrics' extracted features, kept across runs

    def run(self, only: str | None = None, rerun_failed: bool = False, command: str = "bench run") -> RunSummary:
        """Compute and store the selected cells.

        Each cell's missing stages are submitted (in dependency order, each with the futures of its parents still
        in flight) and the cell is measured and written as soon as all of them have finished. With the in-process
        executor a stage is done when it is submitted, so cells are computed one after another, depth-first, and
        results arrive in cell order; an executor with more capacity (Ray) gets the whole missing-stage graph at
        once and the runner waits on it, measuring cells as they complete. Only this process writes the database.
        """
        cfg = self.cfg
        cells = self.plan.select(only)
        if self.executor is None:
            self.executor = make_executor(cfg)
        store = ResultStore(cfg.output / "results.sqlite")
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        summary = RunSummary(run_id, cells_total=len(cells))
        store.start_run(run_id, command, cfg.path, cfg.to_dict(), package_versions(), git_hash())
        status = store.cell_status()
        env = StageEnv(cfg, self.plan, self.artifacts, self.progress if self.executor.capacity == 1 else None)
        self._failures: dict[str, _Failure] = {}
        self._futures: dict[str, Future] = {}
        self._settings: dict[str, Any] = {}  # stage key -> its generation settings (run.batch_across_cells)
        self._owner_cells = 0
        self._owner: dict[str, int] = {}  # stage key -> index of the cell that submitted it (charged its time)
        t_start = time.perf_counter()
        outcome = "interrupted"
        try:
            with self.progress.live():
                bar = self.progress.add("cells", len(cells))
                stage_bar = self.progress.add("stages", 0) if self.executor.capacity > 1 else None
                pending: list[_Pending] = []

                def finish_ready() -> None:
                    for p in [p for p in pending if self._ready(p)]:
                        pending.remove(p)
                        again = self._finish(p, env, store, run_id, summary)
                        if again is None:
                            self.progress.advance(bar)
                        else:  # a damaged cache entry was healed: the cell's stages are computed again
                            pending.append(self._submit(p.cell, p.index, env, summary, stage_bar, again))

                for cell in cells:
                    prev = status.get(cell.key)
                    if prev == "ok" or (prev == "failed" and not rerun_failed):
                        store.relabel(cell)  # the config may name the same cell differently now
                        summary.cells_skipped += 1
                        if prev == "failed":
                            summary.cells_failed.append((cell.label, "failed in an earlier run "
                                                         "(use --rerun-failed to retry)"))
                        self.progress.advance(bar)
                        continue
                    if stage_bar is None:
                        self.progress.advance(bar, 0, description=f"cells: {cell.label}")
                    pending.append(self._submit(cell, self._owner_cells, env, summary, stage_bar))
                    self._owner_cells += 1
                    finish_ready()
                while pending:
                    waiting = [self._futures[s.key] for p in pending for s in p.stages
                               if s.key in self._futures and not self._futures[s.key].done()]
                    self.executor.wait(waiting, timeout=1.0)
                    if stage_bar is not None:
                        done = sum(f.done() for f in self._futures.values())
                        self.progress.update(stage_bar, completed=done, total=len(self._futures),
                                             description=f"stages ({len(waiting)} in flight or queued)")
                    finish_ready()
            outcome = "ok" if summary.ok else "failed"
        except UserError:
            outcome = "failed"
            raise
        finally:
            summary.seconds = time.perf_counter() - t_start
            store.finish_run(run_id, outcome, summary.as_dict())
            store.close()
            if self._own_executor:
                self.executor.shutdown()
                self.executor = None
        return summary

    # -- stages ---------------------------------------------------------------------------------------------
    def _submit(self, cell: Cell, index: int, env: StageEnv, summary: RunSummary, stage_bar,
                attempts: int = 1) -> _Pending:
        """Submit the cell's missing stages in dependency order (those not cached, failed or already submitted).
        A cached entry is reused only if it passes the cheap check (once per run); a damaged one is healed."""
        p = _Pending(cell, self.plan.closure([cell]), index, attempts=attempts)
        for stage in p.stages:
            if stage.key in self._futures or stage.key in self._failures:
                continue
            blocked = next((f for k in stage.inputs if (f := self._failure(k)) is not None), None)
            if blocked is not None:
                self._failures[stage.key] = blocked
                continue
            if stage.kind == "base":  # loaded lazily by the first stage that needs a pipeline
                continue
            try:
                cached = self._cached(stage.key, summary)
            except CorruptArtifact as exc:  # a damaged shipped (read-only) entry: never moved
                self._failures[stage.key] = _Failure(_shipped_damaged(exc), "")
                continue
            if cached:
                if stage.key not in self._seen_cached:
                    self._seen_cached.add(stage.key)
                    summary.stages_cached += 1
                continue
            group = self._generation_group(stage, env)
            if group:  # run.batch_across_cells: this generation shares its batches with other cells' (in-process)
                self._submit_group(group, env, p.index)
                if stage_bar is not None:
                    self.progress.update(stage_bar, total=len(self._futures))
                continue
            deps = [self._futures[k] for k in stage.inputs if k in self._futures]
            self._futures[stage.key] = self.executor.submit_stage(stage, env, deps, stage_resources(stage, self.cfg))
            self._owner[stage.key] = p.index
            self._log_long_stage(stage, self._futures[stage.key])
            if stage_bar is not None:
                self.progress.update(stage_bar, total=len(self._futures))
        return p

    #: a stage computed in this process that took at least this long gets a line of its own in the plain-text log
    LONG_STAGE_SECONDS = 30.0

    def _log_long_stage(self, stage: Stage, fut: Future) -> None:
        """In the plain-text log (no bars), a line for each long stage finished in this process, with its time: a
        long run in a log file says where it is between its cells' ``[ok]`` lines."""
        if not fut.done() or fut.exception() is not None:
            return
        seconds = float((fut.result() or {}).get("seconds") or 0.0)
        if seconds >= self.LONG_STAGE_SECONDS:  # a stage without a plugin (the clean model's images) has no run seed
            seed = f" (seed {stage.seed})" if stage.plugin is not None else ""
            self.log(f"  {stage.label or stage.kind}{seed}: {seconds:.0f} s")

    def _generation_group(self, stage: Stage, env: StageEnv) -> list[Stage] | None:
        """With ``run.batch_across_cells`` and the in-process executor: ``stage`` and every other plain generate
        stage of the plan, not yet computed, that samples the same model with the same settings (the model is
        ready: it is this stage's input), in plan order; None when there is no other (or the option is off)."""
        if not self.cfg.run.batch_across_cells or self.executor.capacity != 1:
            return None
        def settings(s: Stage):
            if s.key not in self._settings:
                self._settings[s.key] = generation_settings(s, env)
            return self._settings[s.key]

        mine = settings(stage)
        if mine is None:
            return None
        group = [stage] + [s for s in self.plan.stages.values()
                           if s.kind == "generate" and s.key != stage.key and s.key not in self._futures
                           and s.key not in self._failures and settings(s) == mine
                           and not self.artifacts.exists(s.key)]
        return group if len(group) > 1 else None

    def _submit_group(self, group: list[Stage], env: StageEnv, index: int) -> None:
        """Run a generation group (:func:`bench.stages.run_generate_group`) and give each member stage a future of
        its own, as if it had been submitted alone."""
        fut = self.executor.submit(run_generate_group, group, env)
        for s in group:
            member: Future = Future()
            if fut.exception() is not None:
                member.set_exception(fut.exception())
            else:
                member.set_result(fut.result()[s.key])
            self._futures[s.key] = member
            self._owner[s.key] = index

    def _ready(self, p: _Pending) -> bool:
        return all(self._futures[s.key].done() for s in p.stages if s.key in self._futures)

    def _failure(self, key: str) -> _Failure | None:
        """The failure that blocks stage ``key``: a failed input's (first), else its own exception, else None."""
        if key in self._failures:
            return self._failures[key]
        fut = self._futures.get(key)
        if fut is None or not fut.done() or fut.exception() is None:
            return None
        stage = self.plan.stages[key]
        blocked = next((f for k in stage.inputs if (f := self._failure(k)) is not None), None)
        if blocked is None:
            exc = fut.exception()
            who = stage.plugin.label if stage.plugin else stage.kind
            trace = getattr(exc, "remote_traceback", None) or "".join(tb.format_exception(exc))
            if isinstance(exc, CorruptArtifact) and exc.readonly:
                blocked = _Failure(_shipped_damaged(exc), trace)
            else:
                blocked = _Failure(f"{stage.kind} stage of '{who}' failed: {_one_line(exc)}", trace)
        self._failures[key] = blocked
        return blocked

    def _account(self, p: _Pending, summary: RunSummary) -> _Failure | None:
        """Timings and costs of the cell's stages; the first failure that blocks the cell."""
        for stage in p.stages:
            if stage.kind == "base" or self._failure(stage.key) is not None:
                continue
            if stage.key in self._futures:
                meta = self._futures[stage.key].result()
                if self._owner[stage.key] == p.index:
                    summary.stages_run[stage.kind] = summary.stages_run.get(stage.kind, 0) + 1
                    p.timings[stage.kind] = p.timings.get(stage.kind, 0.0) + meta["seconds"]
                elif stage.key not in self._seen_cached:  # computed for an earlier cell of this run
                    self._seen_cached.add(stage.key)
                    summary.stages_cached += 1
            elif stage.kind in _COSTED:
                meta = self.artifacts.meta(stage.key)
            else:
                continue
            if stage.kind == "model_attack" and "model_attack" in p.costs and not self._on_marked_model(stage):
                continue  # a model attack's cost: the attack on the cell's watermarked model, not on its clean twin
            if stage.kind in _COSTED and meta.get("costs") and (
                    stage.kind not in _CELL_ATTACK or stage.key == p.cell.images):
                # an image attack's cost: the one that made the cell's images (not the negatives' twin stage)
                p.costs[stage.kind] = meta["costs"] | {"seconds": meta.get("seconds")}
        for key in p.cell.stage_keys():
            if key in self._failures:
                return self._failures[key]
        return None

    def _on_marked_model(self, stage) -> bool:
        """Whether a model-attack stage attacks a watermarked model (its first input is an embedding), not the clean
        base; the two are one stage for a defence that leaves the weights alone."""
        first = self.plan.stages.get(stage.inputs[0]) if stage.inputs else None
        return first is not None and first.kind == "embed"

    def _finish(self, p: _Pending, env: StageEnv, store: ResultStore, run_id: str,
                summary: RunSummary) -> int | None:
        """Measure a cell whose stages have all finished and write its row (this process is the only writer).

        Returns the next attempt's number when a damaged cache entry the cell read was healed (quarantined, so the
        cell's stages are submitted again), else None. A user error met by a stage (the model cannot load) stops
        the run."""
        cfg, cell, timings = self.cfg, p.cell, p.timings
        raised = [f.exception() for s in p.stages if (f := self._futures.get(s.key)) is not None and f.done()]
        user = next((e for e in raised if isinstance(e, UserError)), None)
        if user is not None:
            raise user
        damaged = [e for e in raised if isinstance(e, CorruptArtifact) and not e.readonly]
        if damaged and p.attempts < _HEAL_ATTEMPTS:
            return self._retry(p, damaged, summary)
        failure = self._account(p, summary)
        if damaged:
            failure = self._kept_failing()
        if failure is None:
            try:
                t0 = time.perf_counter()
                measurements = self.measure(cell, env)
                timings["measure"] = time.perf_counter() - t0
            except (KeyboardInterrupt, UserError):
                raise
            except CorruptArtifact as exc:  # an image or detection the measure read is damaged
                if exc.readonly:
                    failure = _Failure(_shipped_damaged(exc), tb.format_exc())
                elif p.attempts < _HEAL_ATTEMPTS:
                    return self._retry(p, [exc], summary)
                else:
                    failure = self._kept_failing()
            except Exception as exc:
                failure = _Failure(f"measuring failed: {_one_line(exc)}", tb.format_exc())
        threat = self.threat(cell)
        if failure is None:
            store.write_cell(run_id, cell, "ok", measurements, n_images=cfg.run.num_images,
                             negatives=cfg.run.negatives, timings=timings, costs=p.costs, threat=threat)
            summary.cells_ok += 1
            self.log(f"[ok] {cell.label}")
        else:
            store.write_cell(run_id, cell, "failed", (), n_images=cfg.run.num_images,
                             negatives=cfg.run.negatives, error=failure.message,
                             traceback=failure.traceback, timings=timings, costs=p.costs, threat=threat)
            summary.cells_failed.append((cell.label, failure.message))
            self.log(f"[failed] {cell.label}: {failure.message}")
        return None

    # -- healing damaged cache entries ----------------------------------------------------------------------
    def _retry(self, p: _Pending, damaged: list[CorruptArtifact], summary: RunSummary) -> int:
        """Quarantine the damaged entries and forget the cell's failed stages, so that submitting the cell again
        recomputes them; the next attempt's number."""
        keys = {e.key for e in damaged}
        for exc in damaged:
            self._heal(exc, summary)
        for s in p.stages:
            fut = self._futures.get(s.key)
            failed = s.key in self._failures or (fut is not None and fut.done() and fut.exception() is not None)
            if failed or s.key in keys:
                self._futures.pop(s.key, None)
                self._failures.pop(s.key, None)
                self._owner.pop(s.key, None)
        return p.attempts + 1

    def _kept_failing(self) -> _Failure:
        return _Failure(f"cache entries kept failing their checks after {_HEAL_ATTEMPTS} repairs (is the disk "
                        f"failing?); see {self.artifacts.root / 'quarantine'}", "")

    def _heal(self, exc: CorruptArtifact, summary: RunSummary) -> None:
        moved = self.artifacts.quarantine(exc.key)
        self._checked.discard(exc.key)
        self._seen_cached.discard(exc.key)
        summary.healed.append(exc.key)
        self.warn(f"warning: {exc}; moved to {moved or 'quarantine (by another run)'}, recomputing it")

    def _cached(self, key: str, summary: RunSummary) -> bool:
        """Whether ``key`` can be reused from the cache: present and passing the cheap check (once per run). A
        damaged writable entry is quarantined (False: recompute it); a damaged shipped one raises."""
        if not self.artifacts.exists(key):
            return False
        if key in self._checked:
            return True
        try:
            self.artifacts.check(key)
        except CorruptArtifact as exc:
            if exc.readonly:
                raise
            self._heal(exc, summary)
            return False
        self._checked.add(key)
        self.artifacts.touch(key)
        return True

    def threat(self, cell: Cell) -> dict[str, Any]:
        from .registries import REGISTRIES

        return threat_scope(REGISTRIES["defenses"].get(cell.defense.name),
                            REGISTRIES["model_attacks"].get(cell.model_attack.name))

    # -- measuring ------------------------------------------------------------------------------------------
    def measure(self, cell: Cell, env: StageEnv) -> list[Measurement]:
        defense = env.plugin(cell.defense)
        secret = env.secret(cell.embed)
        message = defense.message(secret) if defense.detection is DetectionKind.BITS else None
        store = self.artifacts
        cache: dict[str, torch.Tensor] = {}

        def loader(key: str):
            def load() -> torch.Tensor:
                if key not in cache:
                    cache[key] = store.images(key)
                return cache[key]
            return load

        ctx = MeasureContext(
            defense=defense, detection=env.detection(cell.detect_pos), negatives=env.detection(cell.detect_neg),
            message=message, target_fprs=tuple(self.cfg.run.target_fprs),
            generator=torch.Generator().manual_seed(stage_seed(cell.seed, cell.key)),
            loaders={"images": loader(cell.images), "unattacked": loader(cell.unattacked),
                     "clean_twins": loader(cell.clean_twins), "reference": loader(cell.reference),
                     "twins": loader(cell.twins or cell.clean_twins),
                     **{role: loader(key) for role, key in cell.extra_images}},
            prompts=env.request(cell.seed).prompts, reference_key=cell.reference, shared=self._shared,
            device=self.cfg.run.device, paired_twin=type(defense).has_paired_twin(),
            model_attack=env.plugin(cell.model_attack), features=self.features, axis=cell.axis,
            image_attack=env.plugin(cell.image_attack),
            detections={role: (lambda k=key: env.detection(k)) for role, key in cell.extra_detections},
            values={role: (lambda k=key: store.tensors(k)["loss"]) for role, key in cell.extra_values},
        )
        out: list[Measurement] = []
        for spec in self.cfg.metrics:
            metric = env.plugin(spec)
            result = metric.compute(ctx)
            for m in result:
                if not isinstance(m, Measurement):
                    raise PluginError(f"metric '{spec.label}' returned {type(m).__name__}, expected bench.Measurement")
            out.extend(result)
        return out


def _shipped_damaged(exc: CorruptArtifact) -> str:
    return (f"{exc}; it is never modified here: reinstall MarkBench to restore it, or set MARKBENCH_NO_PREBUILT=1 "
            "to compute this stage instead")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, BenchError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
