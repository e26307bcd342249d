"""Generation throughput: the harness's sampler (bench.generation.generate_images, with its speed-ups) against raw
diffusers on the same model, prompts, seeds, batch and sampler settings, in one process; prints img/s for both and
the ratio (issue 30's target on a GPU: >= 1.5x raw diffusers).

Raw diffusers is the plain call (``pipe(prompt=[...], generator=[...])``) on a pipeline loaded as diffusers loads it.
The harness side is a second copy of the same pipeline with ``bench.generation.accelerate``: channels-last UNet and
VAE, fused SDPA attention, and ``torch.compile`` of the UNet with ``--compile``. Runs alternate (ABAB...) after a
warm-up each (a compiled UNet's first call compiles); the best and the median time of each are printed.

    python benchmarks/gpu/generation.py                          # CPU: tiny-sd, 32 images, batch 16, 20 steps
    python benchmarks/gpu/generation.py --device cuda --dtype float16 --set model.path=/models/sd-v1-5 \
        --set model.height=512 --set model.width=512 --set model.num_inference_steps=50 --images 64 --batch 32 --compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "bench.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the config's model.dtype)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--compile", action="store_true", help="torch.compile the harness's UNet (default off)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import tempfile

    from markbench.config import load_config, parse_override
    from markbench.generation import accelerate, generate_images
    from markbench.models import load_pipeline
    from markbench.plan import generation_request

    overrides = dict(parse_override(o) for o in args.overrides)
    overrides |= {"run.num_images": args.images, "run.batch_size": args.batch, "run.device": args.device,
                  "run.output": tempfile.mkdtemp(prefix="mb-gen-")}
    if args.dtype:
        overrides["model.dtype"] = args.dtype
    cfg = load_config(args.config, overrides)
    request = generation_request(cfg, 0)
    raw = load_pipeline(cfg.model, device=args.device)
    harness = load_pipeline(cfg.model, device=args.device)
    accelerate(harness, channels_last=args.channels_last, compile=args.compile)
    cuda = args.device.startswith("cuda")

    def run_raw() -> torch.Tensor:
        out = []
        for i in range(0, len(request.prompts), request.batch_size):
            gens = [torch.Generator().manual_seed(s) for s in request.seeds[i:i + request.batch_size]]
            with torch.inference_mode():
                r = raw(prompt=list(request.prompts[i:i + request.batch_size]), height=request.height,
                        width=request.width, num_inference_steps=request.num_inference_steps,
                        guidance_scale=request.guidance_scale, generator=gens, output_type="pt")
            out.append(r.images.float().cpu())
        return torch.cat(out)

    def run_harness() -> torch.Tensor:
        return generate_images(harness, request, device=args.device)

    def timed(fn) -> tuple[float, torch.Tensor]:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        images = fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, images

    print(f"model {cfg.model.source}, {args.device} {cfg.model.dtype}, {args.images} images of "
          f"{request.height}x{request.width}, batch {args.batch}, {request.num_inference_steps} steps, CFG "
          f"{request.guidance_scale}; harness: channels_last={args.channels_last} compile={args.compile} sdpa=True; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    _, a = timed(run_raw)  # warm-up (and the compile of a compiled UNet)
    _, b = timed(run_harness)
    diff = (a - b).abs().max().item()
    times: dict[str, list[float]] = {"raw diffusers": [], "harness": []}
    for _ in range(args.repeats):
        times["raw diffusers"].append(timed(run_raw)[0])
        times["harness"].append(timed(run_harness)[0])
    for name, ts in times.items():
        print(f"  {name:14s} best {args.images / min(ts):7.2f} img/s, median {args.images / statistics.median(ts):7.2f}"
              f" img/s ({', '.join(f'{t:.2f}' for t in ts)} s)")
    ratio = min(times["raw diffusers"]) / min(times["harness"])
    print(f"harness / raw diffusers throughput: {ratio:.2f}x (best runs; median "
          f"{statistics.median(times['raw diffusers']) / statistics.median(times['harness']):.2f}x); "
          f"largest pixel difference between the two outputs {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
