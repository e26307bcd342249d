"""Cost per image of the removal attacks (issue 27) against the JPEG attack, measured in the same run.

    python benchmarks/attack_cost.py [--model tiny-sd] [--images 16] [--size 64] [--threads 1] [--repeats 3]
    python benchmarks/attack_cost.py --attacks 'jpeg,regen_diffusion,regen_diffusion[model=tiny-sd-ind]'

An entry of ``--attacks`` may set parameters in brackets, ``name[key=value,...]`` (values read as TOML scalars,
strings bare), e.g. regeneration through the attacker's own pipeline instead of the base's.

Each attack is applied to the same batch of images exactly as the harness's image-attack stage calls it (with the
base pipeline for attacks that declare ``needs_model``; defaults, i.e. strength 0.5, except :data:`PARAMS`),
``--repeats`` times; the
median CPU time of the process (``time.process_time``: on a shared machine another job's load moves wall time far
more than the effect; ``--clock wall`` for an idle machine) divided by the number of images is the cost per image,
printed with its ratio to JPEG's. An attack that trains a surrogate (``adv_surrogate``) is timed without its
training, which is printed on a line of its own (per attacker image: the surrogate stage runs once per defence and
is cached, whatever the number of images attacked).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# this file's name would shadow the built-in plugin package ``attacks`` (run as a script, its folder is sys.path[0])
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ATTACKS = ("jpeg", "regen_vae", "regen_diffusion", "rinse", "adv_embedding", "averaging", "unmarker", "adv_surrogate")
#: settings other than the defaults, as configs/attacks-tiny.toml runs them (unmarker's paper defaults, 2000 + 500
#: optimisation steps, cost about 12x the 200 + 50 here: its cost is linear in the steps)
PARAMS = {"unmarker": {"stage1_steps": 200, "stage2_steps": 50}}


def _entries(spec: str) -> list[tuple[str, dict]]:
    """``"a,b[k=v,k2=v2]"`` -> ``[("a", {}), ("b[k=v,k2=v2]", {"k": v, "k2": v2})]`` (commas inside brackets kept)."""
    import re
    import tomllib

    out = []
    for m in re.finditer(r"([^,\[]+)(\[[^\]]*\])?", spec):
        name, bracket = m.group(1).strip(), m.group(2)
        given = {}
        for kv in (bracket[1:-1].split(",") if bracket else []):
            key, value = kv.split("=", 1)
            try:
                given[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                given[key.strip()] = value.strip()
        out.append((name + (bracket or ""), given))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd", help="a built-in model (tiny-sd, micro-sd)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from markbench import image_attacks
    from markbench.config import ModelConfig
    from markbench.models import load_pipeline
    from markbench.testing import run_attack, sample_images

    pipe = load_pipeline(ModelConfig(builtin=args.model))
    images = sample_images(args.images, args.size, seed=0)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"model {args.model}, {args.images} images at {args.size} px, {args.threads} thread(s), "
          f"median of {args.repeats} ({args.clock} time)")
    per_image: dict[str, float] = {}
    labels: dict[str, str] = {}
    for name, given in _entries(args.attacks):
        attack = image_attacks.get(name.split("[")[0])(**{**PARAMS.get(name, {}), **given})
        labels[name] = attack.describe()
        model = pipe if attack.needs_model else None
        if type(attack).trains_surrogate:
            from markbench import AttackContext

            marked = (images + (torch.randint(0, 2, images.shape[1:]) * 2 - 1) * 6 / 255).clamp(0, 1)
            t0 = clock()
            tensors = attack.train_surrogate(marked, images, torch.Generator().manual_seed(0), AttackContext())
            train = clock() - t0
            labels[name + " (training)"] = f"{name} surrogate training"
            per_image[name + " (training)"] = train / (2 * args.images)

            def call(x, g, attack=attack, tensors=tensors):
                return attack.apply(x, g, AttackContext(surrogate=tensors))
        else:
            def call(x, g, attack=attack, model=model):
                return run_attack(attack, x, g, model)
        call(images[:2], torch.Generator().manual_seed(0))  # warm-up (first-call setup)
        times = []
        for r in range(args.repeats):
            t0 = clock()
            call(images, torch.Generator().manual_seed(r))
            times.append(clock() - t0)
        per_image[name] = statistics.median(times) / args.images
    ref = per_image.get("jpeg")
    for name, cost in per_image.items():
        ratio = f"{cost / ref:10.1f} x jpeg" if ref else ""
        print(f"{labels[name]:24s} {cost * 1000:10.2f} ms/image {ratio}")


if __name__ == "__main__":
    main()
