"""Harness overhead of image generation: the generate stage vs a direct diffusers call (target ratio <= 1.05).

Both sides use the same pipeline object, prompts, per-image seeds, batch size and sampler settings. The harness
side runs the real stage function (bench.stages.run_stage): generation, output checks, 8-bit quantisation and the
atomic PNG write to the artifact cache. Runs alternate (ABAB...) to cancel drift; the ratio of the fastest runs
(the estimator least disturbed by other load) is printed, medians beside it.

    python benchmarks/overhead.py [--images 32] [--repeats 10] [--threads 1] [--config bench.toml]
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench.cache import ArtifactStore
    from bench.config import load_config
    from bench.plan import build_plan
    from bench.stages import StageEnv, run_stage

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
    t_direct, t_harness = [], []
    for _ in range(args.repeats):
        for fn, acc in ((direct, t_direct), (harness, t_harness)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    # min is the estimator least disturbed by other load on the machine (as timeit recommends); medians shown too
    md, mh = min(t_direct), min(t_harness)
    print(f"images={args.images} batch={request.batch_size} steps={request.num_inference_steps} "
          f"size={request.height}x{request.width} repeats={args.repeats} threads={torch.get_num_threads()}")
    print(f"direct diffusers call:  min {md:.3f} s, median {statistics.median(t_direct):.3f} s")
    print(f"harness generate stage: min {mh:.3f} s, median {statistics.median(t_harness):.3f} s")
    print(f"ratio harness/direct = {mh / md:.3f}  (target <= 1.05: {'PASS' if mh / md <= 1.05 else 'FAIL'})")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
