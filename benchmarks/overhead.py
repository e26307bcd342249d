"""Harness overhead of image generation: the generate stage vs a direct diffusers call (target ratio <= 1.05).

Both sides use the same pipeline object, prompts, per-image seeds, batch size and sampler settings. The harness
side runs the real stage function (bench.stages.run_stage): generation, output checks, 8-bit quantisation and the
atomic PNG write to the artifact cache. Runs alternate (ABAB...) to cancel drift; the ratio of the fastest runs
(the estimator least disturbed by other load) is printed, medians beside it.

    python benchmarks/overhead.py [--images 32] [--repeats 10] [--threads 1] [--clock cpu|wall] [--config F]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench.toml")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a small shared machine one thread times far more steadily)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="the clock the verdict uses (default: cpu with one thread, wall otherwise)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.clock = args.clock or ("cpu" if args.threads == 1 else "wall")

    from markbench.cache import ArtifactStore
    from markbench.config import load_config
    from markbench.plan import build_plan
    from markbench.stages import StageEnv, run_stage

    tmp = tempfile.mkdtemp(prefix="markbench-overhead-")
    cfg = load_config(args.config, {"run.num_images": args.images, "run.output": tmp})
    plan = build_plan(cfg)
    stage = next(s for s in plan.stages.values() if s.kind == "generate" and s.plugin is None)
    request = plan.requests[stage.extra_dict["run_seed"]]
    store = ArtifactStore(cfg.cache_dir)
    env = StageEnv(cfg, plan, store)
    pipe = env.base_pipeline()

    def direct() -> None:
        out = []
        for i in range(0, len(request.prompts), request.batch_size):
            seeds = request.seeds[i:i + request.batch_size]
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            with torch.inference_mode():
                r = pipe(prompt=list(request.prompts[i:i + request.batch_size]), height=request.height,
                         width=request.width, num_inference_steps=request.num_inference_steps,
                         guidance_scale=request.guidance_scale, generator=gens, output_type="pt")
            out.append(r.images)
        torch.cat(out)

    def harness() -> None:
        shutil.rmtree(store.path(stage.key), ignore_errors=True)
        run_stage(stage, env)

    direct(), harness()  # warm-up
    wall: dict[str, list[float]] = {"direct": [], "harness": []}
    cpu: dict[str, list[float]] = {"direct": [], "harness": []}
    for _ in range(args.repeats):
        for name, fn in (("direct", direct), ("harness", harness)):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    print(f"images={args.images} batch={request.batch_size} steps={request.num_inference_steps} "
          f"size={request.height}x{request.width} repeats={args.repeats} threads={torch.get_num_threads()}")
    # min is the estimator least disturbed by other load (as timeit recommends); medians shown too. With one thread
    # the process's CPU time is the steadier clock on a shared machine (another process's load barely moves it);
    # on an idle machine the two clocks agree.
    ratios = {}
    for clock, t in (("wall", wall), ("cpu", cpu)):
        md, mh = min(t["direct"]), min(t["harness"])
        ratios[clock] = mh / md
        print(f"[{clock:4s}] direct diffusers call:  min {md:.3f} s, median {statistics.median(t['direct']):.3f} s")
        print(f"[{clock:4s}] harness generate stage: min {mh:.3f} s, median {statistics.median(t['harness']):.3f} s")
    primary = args.clock
    r = ratios[primary]
    print(f"ratio harness/direct = {r:.3f} ({primary} time; {'cpu' if primary == 'wall' else 'wall'}: "
          f"{ratios['cpu' if primary == 'wall' else 'wall']:.3f})  (target <= 1.05: {'PASS' if r <= 1.05 else 'FAIL'})")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
