"""The runner: plan -> execute stages (cached) -> measure cells -> store results.

Order: cells are taken one after another and each cell's missing stages are computed depth-first, so results
arrive early and an interrupted run keeps every finished cell. A stage that raises fails the cells that need it
(error and traceback stored); every other cell goes on. Re-running the same command resumes: finished cells are
skipped, cached stages are not recomputed.
"""

from __future__ import annotations

import time
import traceback as tb
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import ArtifactStore, CorruptArtifact, shipped_stores
from .config import BenchConfig
from .errors import BenchError, PluginError, UserError
from .executor import Executor, InProcessExecutor
from .plan import Cell, Plan, build_plan, stage_seed
from .plugins import DetectionKind, MeasureContext, Measurement, threat_scope
from .progress import Progress
from .provenance import git_hash, package_versions
from .stages import StageEnv, run_stage
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


class _Healed(Exception):
    """A damaged cache entry was quarantined: the cell is tried again (its stages recompute the entry)."""


#: how often one cell is retried after healing damaged entries it read
_HEAL_ATTEMPTS = 3


class Runner:
    def __init__(self, cfg: BenchConfig, *, executor: Executor | None = None, progress: Progress | None = None,
                 log=None, warn=None):
        self.cfg = cfg
        self.plan: Plan = build_plan(cfg)
        self.executor = executor or InProcessExecutor()
        self.progress = progress or Progress(enabled=False)
        self.artifacts = ArtifactStore(cfg.cache_dir, fallbacks=shipped_stores())
        self.log = log or (lambda msg: None)
        self.warn = warn or self.log  # one line per healed cache entry, shown even under progress bars
        self._seen_cached: set[str] = set()
        self._checked: set[str] = set()  # cached entries checked (sizes) in this run
        self._shared: dict[str, Any] = {}  # metrics' per-run state (e.g. FID reference statistics)

    def run(self, only: str | None = None, rerun_failed: bool = False, command: str = "bench run") -> RunSummary:
        cfg = self.cfg
        cells = self.plan.select(only)
        store = ResultStore(cfg.output / "results.sqlite")
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        summary = RunSummary(run_id, cells_total=len(cells))
        store.start_run(run_id, command, cfg.path, cfg.to_dict(), package_versions(), git_hash())
        status = store.cell_status()
        env = StageEnv(cfg, self.plan, self.artifacts, self.progress)
        failures: dict[str, _Failure] = {}
        t_start = time.perf_counter()
        outcome = "interrupted"
        try:
            with self.progress.live():
                bar = self.progress.add("cells", len(cells))
                for cell in cells:
                    prev = status.get(cell.key)
                    if prev == "ok" or (prev == "failed" and not rerun_failed):
                        summary.cells_skipped += 1
                        if prev == "failed":
                            summary.cells_failed.append((cell.label, "failed in an earlier run "
                                                         "(use --rerun-failed to retry)"))
                        self.progress.advance(bar)
                        continue
                    self.progress.advance(bar, 0, description=f"cells: {cell.label}")
                    timings: dict[str, float] = {}
                    costs: dict[str, Any] = {}
                    failure, measurements = self._attempt(cell, env, failures, summary, timings, costs)
                    threat = self.threat(cell)
                    if failure is None:
                        store.write_cell(run_id, cell, "ok", measurements, n_images=cfg.run.num_images,
                                         negatives=cfg.run.negatives, timings=timings, costs=costs, threat=threat)
                        summary.cells_ok += 1
                        self.log(f"[ok] {cell.label}")
                    else:
                        store.write_cell(run_id, cell, "failed", (), n_images=cfg.run.num_images,
                                         negatives=cfg.run.negatives, error=failure.message,
                                         traceback=failure.traceback, timings=timings, costs=costs,
                                         threat=threat)
                        summary.cells_failed.append((cell.label, failure.message))
                        self.log(f"[failed] {cell.label}: {failure.message}")
                    self.progress.advance(bar)
            outcome = "ok" if summary.ok else "failed"
        except UserError:
            outcome = "failed"
            raise
        finally:
            summary.seconds = time.perf_counter() - t_start
            store.finish_run(run_id, outcome, summary.as_dict())
            store.close()
        return summary

    def _attempt(self, cell: Cell, env: StageEnv, failures: dict[str, _Failure], summary: RunSummary,
                 timings: dict[str, float], costs: dict[str, Any]) -> tuple[_Failure | None, list[Measurement]]:
        """Compute and measure one cell; a damaged cache entry met on the way is healed and the cell tried again."""
        for _ in range(_HEAL_ATTEMPTS):
            try:
                failure = self._ensure(cell, env, failures, summary, timings, costs)
                if failure is not None:
                    return failure, []
                try:
                    t0 = time.perf_counter()
                    measurements = self.measure(cell, env)
                    timings["measure"] = time.perf_counter() - t0
                    return None, measurements
                except (KeyboardInterrupt, UserError):
                    raise
                except CorruptArtifact as exc:
                    if exc.readonly:
                        return _Failure(_shipped_damaged(exc), tb.format_exc()), []
                    self._heal(exc, summary)
                except Exception as exc:
                    return _Failure(f"measuring failed: {_one_line(exc)}", tb.format_exc()), []
            except _Healed:
                continue
        return _Failure(f"cache entries kept failing their checks after {_HEAL_ATTEMPTS} repairs (is the disk "
                        f"failing?); see {self.artifacts.root / 'quarantine'}", ""), []

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

    # -- stages ---------------------------------------------------------------------------------------------
    def _ensure(self, cell: Cell, env: StageEnv, failures: dict[str, _Failure], summary: RunSummary,
                timings: dict[str, float], costs: dict[str, Any]) -> _Failure | None:
        """Compute the cell's missing stages in dependency order; return the first failure that blocks it."""
        for stage in self.plan.closure([cell]):
            blocked = next((failures[k] for k in stage.inputs if k in failures), None)
            if blocked is not None:
                failures[stage.key] = blocked
                continue
            if stage.key in failures:
                continue
            try:
                cached = stage.kind != "base" and self._cached(stage.key, summary)
            except CorruptArtifact as exc:
                failures[stage.key] = _Failure(_shipped_damaged(exc), "")
                continue
            if cached:
                meta = self.artifacts.meta(stage.key)
                if stage.kind in ("embed", "model_attack") and meta.get("costs"):
                    costs[stage.kind] = meta["costs"] | {"seconds": meta.get("seconds")}
                if stage.key not in self._seen_cached:
                    self._seen_cached.add(stage.key)
                    summary.stages_cached += 1
                continue
            if stage.kind == "base":  # loaded lazily by the first stage that needs a pipeline
                continue
            fut = self.executor.submit(run_stage, stage, env)
            try:
                meta = fut.result()
            except (KeyboardInterrupt, UserError):  # a user error (the model cannot load) stops the run
                raise
            except CorruptArtifact as exc:  # an input of this stage is damaged
                if exc.readonly:
                    failures[stage.key] = _Failure(_shipped_damaged(exc), "")
                    continue
                self._heal(exc, summary)
                raise _Healed() from None
            except BaseException as exc:
                who = stage.plugin.label if stage.plugin else stage.kind
                failures[stage.key] = _Failure(f"{stage.kind} stage of '{who}' failed: {_one_line(exc)}",
                                               "".join(tb.format_exception(exc)))
                continue
            summary.stages_run[stage.kind] = summary.stages_run.get(stage.kind, 0) + 1
            timings[stage.kind] = timings.get(stage.kind, 0.0) + meta["seconds"]
            if stage.kind in ("embed", "model_attack") and meta.get("costs"):
                costs[stage.kind] = meta["costs"] | {"seconds": meta["seconds"]}
        for key in cell.stage_keys():
            if key in failures:
                return failures[key]
        return None

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
            model_attack=env.plugin(cell.model_attack),
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
