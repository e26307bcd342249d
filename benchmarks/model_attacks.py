"""Cost of the model attacks on the configured model (issue targets on the 2-core CPU, tiny world: LoRA and full
fine-tuning at 200 steps <= 2 minutes each; pruning and quantization seconds).

    python benchmarks/model_attacks.py [--config bench.toml] [--attacks lora,finetune,prune,quantize]

Each attack runs once on a private copy of the base model, exactly as the harness's model-attack stage calls it
(dataset loading and encoding included). Prints wall time, trainable parameters and the time per step, and the
ratio to the target.
"""

from __future__ import annotations

import argparse
import time

import torch

TARGETS_S = {"lora": 120.0, "finetune": 120.0, "prune": 10.0, "quantize": 10.0, "weight_noise": 10.0,
             "merge": 10.0}
DEFAULTS = {"lora": {"steps": 200}, "finetune": {"steps": 200}, "prune": {"sparsity": 0.3},
            "quantize": {"bits": 4}, "weight_noise": {}, "merge": {}, "dreambooth": {"steps": 200},
            "vae_decoder": {"steps": 200}, "text_encoder": {"steps": 200}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="bench.toml")
    ap.add_argument("--attacks", default="lora,finetune,prune,quantize,weight_noise,merge")
    args = ap.parse_args()

    from markbench import model_attacks
    from markbench.config import load_config
    from markbench.models import load_pipeline
    from markbench.plugins import StageContext
    from markbench.testing import Resources, copy_pipeline

    cfg = load_config(args.config, check_output=False)
    base = load_pipeline(cfg.model)
    print(f"model: {cfg.model.source} at {cfg.model.height}x{cfg.model.width}; torch threads {torch.get_num_threads()}")
    for name in args.attacks.split(","):
        params = DEFAULTS.get(name, {})
        attack = model_attacks.get(name)(**params)
        ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: base, cfg.model.height,
                                                                          cfg.model.width))
        pipe = copy_pipeline(base)
        t0 = time.perf_counter()
        attack.apply(pipe, ctx)
        dt = time.perf_counter() - t0
        steps = ctx.costs.get("steps") or 0
        target = TARGETS_S.get(name)
        ratio = f"; ratio to target {dt / target:.2f} ({'PASS' if dt <= target else 'FAIL'} vs {target:.0f} s)" \
            if target else ""
        per = f", {dt / steps:.3f} s/step" if steps else ""
        print(f"{attack.describe():40s} {dt:7.1f} s{per}; trainable {ctx.costs.get('trainable_params', '-')}"
              f"{ratio}")


if __name__ == "__main__":
    main()
