"""Where does tiny-sd-rt's cross-attention look, and how much does a trigger change what it returns? (issue 23)

Stage 2 never told the suffix trigger apart from the plain caption (docs/operating_point.md, section 5), while it
did tell a prefix apart. This probe asks the clean base, per cross-attention layer (``attn2``) of the UNet: how much
attention mass falls on the start token, on the caption's own tokens and on the positions after the caption (the
trigger's tokens if any, the end token, the padding), and how far each trigger moves the layer's output from the
plain caption's (relative L2, same latents, timesteps and noise). Nothing is trained.

    python -m experiments.cross_attention_mass --pool POOL.pt --out experiments/results/cross_attention_mass.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TRIGGERS = {"suffix": ("", " *[Z]&"), "suffix x3": ("", " *[Z]& *[Z]& *[Z]&"), "prefix": ("*[Z]& ", "")}
PROBE_T = (51, 201, 501)


def position_mass(mass, n_caption):
    """Split attention mass ``[B, L]`` (each row sums to 1 over the text positions) into the start token (position
    0), the caption's own tokens (positions 1..n) and everything after them (trigger tokens, end token, padding), with
    ``n_caption[b]`` the caption's token count; returns the three batch means."""
    import torch

    pos = torch.arange(mass.shape[1])[None]
    n = torch.as_tensor(n_caption)[:, None]
    caption = ((pos >= 1) & (pos <= n)).to(mass.dtype)
    after = (pos > n).to(mass.dtype)
    return (float(mass[:, 0].mean()), float((mass * caption).sum(1).mean()), float((mass * after).sum(1).mean()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", type=Path, required=True, help="training latents (experiments.capacity_curve's cache)")
    p.add_argument("--n", type=int, default=32, help="held-out captions (one latent each)")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)

    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from markbench.models import load_pipeline_folder
    from markbench.prompts import read_prompts
    from markbench.training import prompt_embeds
    from markbench.world import worlds

    t0 = time.perf_counter()
    pipe = load_pipeline_folder(worlds.get("tiny")().model_folder("tiny-sd-rt"))
    unet = pipe.unet.eval()
    caps = list(read_prompts("tiny:heldout", "cross_attention_mass"))[: a.n]
    (mean, _), _ = torch.load(a.pool, weights_only=True)
    g = torch.Generator().manual_seed(0)
    z0 = mean[torch.randint(0, mean.shape[0], (a.n,), generator=g)]
    noise = torch.randn(z0.shape, generator=g)
    ac = pipe.scheduler.alphas_cumprod.float()

    record: dict[str, dict] = {}

    class Recorder(AttnProcessor):
        """The standard processor; also keeps the attention probabilities' mass per position class and the output."""

        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                     **kwargs):
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, k, None)  # [B * heads, queries, 77]
            mass = probs.mean(1).view(hidden_states.shape[0], attn.heads, -1).mean(1)  # [B, 77]
            record[self.name] = {"mass": mass, "out": out}
            return out

    names = [n for n, m in unet.named_modules() if n.endswith("attn2")]
    unet.set_attn_processor({f"{n}.processor": Recorder(n) for n in names} |
                            {k: AttnProcessor() for k in unet.attn_processors if not k.endswith("attn2.processor")})

    def run(prompts, t_val):
        t = torch.full((a.n,), t_val, dtype=torch.long)
        abar = ac[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            unet(abar.sqrt() * z0 + (1 - abar).sqrt() * noise, t, prompt_embeds(pipe, prompts, "cpu"))
        return {n: {"mass": r["mass"].clone(), "out": r["out"].clone()} for n, r in record.items()}

    n_cap = torch.tensor([len(pipe.tokenizer(c).input_ids) - 2 for c in caps])  # caption tokens (no start/end)
    rows = []
    for t_val in PROBE_T:
        plain = run(caps, t_val)
        for name in names:
            start, caption, after = position_mass(plain[name]["mass"], n_cap)
            row = {"t": t_val, "layer": name, "mass_start": start, "mass_caption": caption,
                   "mass_after_caption": after}
            rows.append(row)
        for trig, (pre, suf) in TRIGGERS.items():
            moved = run([f"{pre}{c}{suf}" for c in caps], t_val)
            for row in rows[-len(names):]:
                ref, new = plain[row["layer"]]["out"], moved[row["layer"]]["out"]
                row[f"out_change_{trig}"] = float(((new - ref).flatten(1).norm(dim=1)
                                                   / ref.flatten(1).norm(dim=1)).mean())
    result = {"base": "tiny-sd-rt", "n": a.n, "timesteps": list(PROBE_T), "triggers": TRIGGERS, "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads()}
    for r in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
