"""How many message bits can AquaLoRA's prior-preserving fine-tuning (PPFT) carry into the sampled latents?

A probe of stage 2 alone (docs/aqualora.md, "How many bits can PPFT carry?"). Stage 1 and the image decoder are
replaced by a fixed linear code ``delta(m) = a * sum_i (2 m_i - 1) P_i / sqrt(n)`` with ``P_i`` fixed random smooth
latent patterns (``--pattern-res`` square, bilinear up to the latent side, unit norm) and ``a`` chosen so that the RMS
of ``delta`` is ``--ratio`` times the training latents'. PPFT then trains the plugin's message-scaled LoRA and mapper
(``AquaLoRA.train_stage2``, unchanged) on the model's own generated training latents. Afterwards the LoRA model
(diagonal ``s(m) x lora_scale`` for ``--messages`` random messages) and the base model sample the same captions with
the same seeds, and the bits are read from the final latents' shift by least squares on the ``P_i``: an oracle
readout that needs no trained decoder. Printed per run:

* ``oracle``: bit accuracy of that readout on the raw shift (base model as the reference);
* ``centred``: the same after subtracting the shift averaged over the messages (the message-independent change);
* ``carried``: the mean projection of the shift on ``delta(m)`` (1 = all of it);
* ``shift/delta``: how much the samples moved, relative to ``delta``.

Examples (one thread each, tiny-sd-rt; about 4 minutes per 1,000 steps at batch 8)::

    python experiments/aqualora_ppft_bits.py --bits 4            # 0.98: a few bits come through
    python experiments/aqualora_ppft_bits.py --bits 48 --rank 96 --steps 4000
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from markbench.config import ModelConfig  # noqa: E402
from markbench.generation import initial_latents  # noqa: E402
from markbench.models import load_pipeline  # noqa: E402
from markbench.plugins import StageContext  # noqa: E402
from markbench.defenses.aqualora import AquaLoRA, Mapper, MessageLoRAModel  # noqa: E402
from markbench.rng import seeded  # noqa: E402
from markbench.training import prompt_embeds  # noqa: E402


class LinearCode(torch.nn.Module):
    """``m -> delta(m) / scaling_factor`` (the plugin's stage-2 loop multiplies an encoder's output by it)."""

    def __init__(self, patterns: torch.Tensor, amplitude: float, scaling_factor: float):
        super().__init__()
        self.register_buffer("patterns", patterns)
        self.amplitude, self.sf = float(amplitude), float(scaling_factor)

    def delta(self, m: torch.Tensor) -> torch.Tensor:
        n = self.patterns.shape[0]
        m = m.to(self.patterns.device).float()
        return self.amplitude * torch.einsum("bn,nchw->bchw", 2 * m - 1, self.patterns) / math.sqrt(n)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.delta(m) / self.sf

    def coefficients(self, shift: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients of flattened latent shifts ``[N, D]`` on the patterns: ``[N, n]`` (CPU)."""
        flat = self.patterns.flatten(1).float()
        shift = shift.to(flat.device).float()
        return torch.linalg.solve(flat @ flat.T, flat @ shift.T).T.cpu()


def ppft_rate(aq: AquaLoRA, pipe, code, emb, mean, std, index, args, steps: int = 30) -> float:
    """PPFT steps per second, timed on a throw-away LoRA after a short warm-up (the model is left as it was)."""
    saved = aq.stage2_steps
    for n in (5, steps):
        g = torch.Generator().manual_seed(11)
        lora = seeded(g, lambda: MessageLoRAModel(pipe.unet, args.rank))
        mapper = seeded(g, lambda: Mapper(args.bits, args.rank, args.mapper_std)).to(args.device)
        aq.stage2_steps = n
        try:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            aq.train_stage2(pipe, lora, mapper, code, emb, mean, std, args.bits, StageContext(g), g, index)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t
        finally:
            lora.remove()
            aq.stage2_steps = saved
    return steps / elapsed


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Example: python experiments/aqualora_ppft_bits.py --bits 16 --steps 4000")
    ap.add_argument("--model", default="tiny-sd-rt", help="built-in model (default tiny-sd-rt)")
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (tiny config 32, paper 320)")
    ap.add_argument("--steps", type=int, default=1000, help="PPFT steps (tiny config 1000, paper 25000)")
    ap.add_argument("--batch", type=int, default=8, help="PPFT batch (tiny config 8, paper 12)")
    ap.add_argument("--lr", type=float, default=1e-3, help="PPFT learning rate (tiny config 1e-3, paper 1e-4)")
    ap.add_argument("--mapper-std", type=float, default=1.0)
    ap.add_argument("--ratio", type=float, default=0.25, help="RMS of delta over the RMS of the latents")
    ap.add_argument("--pattern-res", type=int, default=4, help="side of the random patterns before upsampling")
    ap.add_argument("--train-images", type=int, default=128)
    ap.add_argument("--eval-captions", type=int, default=16)
    ap.add_argument("--messages", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="e.g. cuda: the paper's PPFT length (--steps 25000 --batch 12)")
    ap.add_argument("--pool-cache", default="", help="a .pt file to keep the encoded training pool in")
    ap.add_argument("--seconds", type=float, default=0.0, help="a time budget for PPFT: at most --steps, fewer "
                    "if a timed calibration says they would not fit (the cosine schedule then still completes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.messages < 2:
        ap.error("--messages must be at least 2 (the centred readout averages over messages)")

    pipe = load_pipeline(ModelConfig(builtin=args.model), device=args.device)
    aq = AquaLoRA(train_images=args.train_images, train_inference_steps=20, gen_batch_size=16,
                  prompts="builtin:tiny-train", bits=args.bits, lora_rank=args.rank, stage2_steps=args.steps,
                  stage2_batch_size=args.batch, stage2_lr=args.lr, mapper_std=args.mapper_std)
    side = aq._resolution(pipe)  # the model's native image side
    cache = Path(args.pool_cache) if args.pool_cache else None
    if cache is not None and cache.exists():
        captions, mean, std = torch.load(cache, weights_only=True)
    else:
        captions, mean, std = aq.training_pool(pipe, StageContext(torch.Generator().manual_seed(0)),
                                               torch.Generator().manual_seed(1), side)
        if cache is not None:
            torch.save((captions, mean, std), cache)

    sf = float(pipe.vae.config.scaling_factor)
    g = torch.Generator().manual_seed(123)
    c, h, w = mean.shape[1:]
    patterns = torch.randn(args.bits, c, args.pattern_res, args.pattern_res, generator=g)
    patterns = F.interpolate(patterns, size=(h, w), mode="bilinear", align_corners=False)
    patterns = patterns / patterns.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    code = LinearCode(patterns, 1.0, sf)
    probe = code.delta(torch.randint(0, 2, (256, args.bits), generator=g))
    code.amplitude = float(args.ratio * mean.pow(2).mean().sqrt() / probe.pow(2).mean().sqrt())
    code.to(args.device)

    unique = list(dict.fromkeys(captions))
    index = torch.tensor([unique.index(cap) for cap in captions])
    with torch.no_grad():
        emb = prompt_embeds(pipe, unique, args.device)
    if args.seconds > 0:
        aq.stage2_steps = min(args.steps, max(1, int(ppft_rate(aq, pipe, code, emb, mean, std, index, args)
                                                     * args.seconds)))
    g2 = torch.Generator().manual_seed(7)
    lora = seeded(g2, lambda: MessageLoRAModel(pipe.unet, args.rank))
    mapper = seeded(g2, lambda: Mapper(args.bits, args.rank, args.mapper_std)).to(args.device)
    t0 = time.perf_counter()
    stats = aq.train_stage2(pipe, lora, mapper, code, emb, mean, std, args.bits, StageContext(g2), g2, index)
    train_s = time.perf_counter() - t0

    prompts = unique[:args.eval_captions]
    start = initial_latents(pipe, range(1000, 1000 + len(prompts)), side, side)

    def sample(diag):
        with torch.no_grad(), lora.state.use(diag):
            return pipe(prompt=prompts, height=side, width=side, num_inference_steps=20, guidance_scale=7.5,
                        latents=start.clone().to(args.device), output_type="latent").images.float().cpu()

    base = sample(None)
    gm = torch.Generator().manual_seed(99)
    messages = torch.randint(0, 2, (args.messages, args.bits), generator=gm).float()
    shifts = []
    for m in messages:
        with torch.no_grad():
            diag = mapper(m[None].to(args.device))[0] * float(aq.lora_scale)
            shifts.append((sample(diag) - base).flatten(1))
    shifts_t = torch.stack(shifts)  # [messages, N, D]
    centred = shifts_t - shifts_t.mean(0, keepdim=True)

    def read(shift: torch.Tensor, m: torch.Tensor) -> float:
        coef = code.coefficients(shift)
        return float(((coef > 0).float() == m).float().mean())

    rows = []
    for k, m in enumerate(messages):
        target = code.delta(m[None]).cpu().flatten(1)
        rows.append({"oracle": read(shifts_t[k], m), "centred": read(centred[k], m),
                     "carried": float(((shifts_t[k] * target).sum(1) / target.pow(2).sum()).mean()),
                     "shift/delta": float(shifts_t[k].norm(dim=1).mean() / target.norm())})
        print(f"message {k}: " + ", ".join(f"{a} {b:.3f}" for a, b in rows[-1].items()), flush=True)
    out = {"bits": args.bits, "rank": args.rank, "steps": int(aq.stage2_steps), "batch": args.batch, "lr": args.lr,
           "mapper_std": args.mapper_std, "ratio": args.ratio, "ppft_loss": stats["stage2_loss"],
           "ppft_seconds": round(train_s, 1)}
    out.update({key: sum(r[key] for r in rows) / len(rows) for key in rows[0]})
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
