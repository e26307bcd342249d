"""Contrastive training of the tiny-world CLIP (``TinyWorld-RN``), resumable from checkpoints.

Data: rendered pools of the base world (training combinations) plus the downstream style and subject sets, so the
CLIP can also score the images that fine-tuning attacks produce. 30 % of the texts name a random subset of the
attributes ("a red triangle"); identical texts in a batch are all positives (soft targets), so repeated captions are
not pushed apart. Images are flipped left-right at random (every shape of the world is mirror-symmetric).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import clip_model, shapes
from .common import Logger, NullBar, cached_dataset, load_checkpoint, lr_at, save_checkpoint, step_generator, step_rng


@dataclass
class ClipSettings:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    partial_caption_rate: float = 0.3
    n_train: int = 20000
    n_style: int = 3000
    n_subject: int = 3000
    n_eval: int = 1000
    eval_every: int = 250
    checkpoint_seconds: float = 120.0


def _texts(captions: list[str], idx: np.ndarray, rng: np.random.Generator, rate: float) -> list[str]:
    out = []
    for i in idx:
        cap = captions[i]
        if rng.random() < rate:
            a = shapes.parse_caption(cap)
            item = shapes.Item(a["shape"], a["colour"], a["background"], a["size"], a["style"])
            cap = shapes.partial_caption(item, rng)
        out.append(cap)
    return out


def evaluate(model, images: np.ndarray, captions: list[str]) -> dict:
    return clip_model.ZeroShot(model).accuracy(images, captions)


def train_clip(work: Path, out: Path, seed: int = 0, settings: ClipSettings | None = None, resume: bool = True,
               bar: NullBar | None = None, log: Logger | None = None) -> dict:
    """Train (or resume) the CLIP; write it to ``out`` (open_clip local-dir); return its held-out figures."""
    import torch
    import torch.nn.functional as F

    s = settings or ClipSettings()
    bar = bar or NullBar()
    log = log or Logger()
    work = Path(work)
    ckpt_path = work / "clip" / "checkpoint.pt"
    torch.manual_seed(seed)  # initial weights only; every step is seeded by (seed, step) below
    model = clip_model.create()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.98))
    step, history, cpu_seconds = 0, [], 0.0
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, history, cpu_seconds = state["step"], state["history"], state.get("cpu_seconds", 0.0)
        log(f"clip: resumed at step {step}")

    pools = [cached_dataset(work, "train", s.n_train, seed, log), cached_dataset(work, "style", s.n_style, seed, log),
             cached_dataset(work, "subject", s.n_subject, seed, log)]
    images = np.concatenate([p[0] for p in pools])
    captions = sum((p[1] for p in pools), [])
    ev_images, ev_captions = cached_dataset(work, "heldout", s.n_eval, seed + 1, log)
    tok = clip_model.tokenizer()

    def checkpoint():
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                                    "history": history, "cpu_seconds": cpu_seconds, "settings": asdict(s)})

    bar.start("clip", s.steps, step)
    last_ckpt = time.time()
    model.train()
    while step < s.steps:
        t0 = time.process_time()
        rng = step_rng(seed, step)
        idx = rng.integers(len(images), size=s.batch_size)
        x = shapes.to_tensor(images[idx])
        flip = torch.from_numpy(rng.random(s.batch_size) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        texts = _texts(captions, idx, rng, s.partial_caption_rate)
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.lr, s.warmup, s.steps)
        fi = model.encode_image(clip_model.preprocess(x), normalize=True)
        ft = model.encode_text(tok(texts), normalize=True)
        logits = model.logit_scale.exp() * fi @ ft.T
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        step += 1
        cpu_seconds += time.process_time() - t0
        bar.advance("clip", step, f"loss {loss.item():.3f}")
        if step % 50 == 0:
            log(f"clip step {step}/{s.steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"cpu {cpu_seconds:.0f}s")
        if step % s.eval_every == 0 or step == s.steps:
            model.eval()
            acc = evaluate(model, ev_images[:500], ev_captions[:500])
            model.train()
            history.append({"step": step, "cpu_seconds": round(cpu_seconds, 1), **acc})
            log(f"clip eval step {step}: shape {acc['shape']:.3f} colour {acc['colour']:.3f} "
                f"background {acc['background']:.3f} size {acc['size']:.3f}")
        if time.time() - last_ckpt > s.checkpoint_seconds:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    bar.stop("clip")
    model.eval()
    acc = evaluate(model, ev_images, ev_captions)
    log(f"clip final (held-out n={acc['n']}): shape {acc['shape']:.4f} colour {acc['colour']:.4f}")
    clip_model.save(model, Path(out))
    return {"settings": asdict(s), "seed": seed, "steps": step, "cpu_seconds": round(cpu_seconds, 1),
            "heldout": acc, "history": history}


def main(argv=None) -> int:  # python -m worlds.tiny.train_clip WORK OUT [--seed N] [--steps N]
    import argparse
    import json

    import torch

    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=ClipSettings.steps)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    log = Logger(Path(a.work) / "clip" / "train.log", quiet=True)
    res = train_clip(Path(a.work), Path(a.out), a.seed, ClipSettings(steps=a.steps), log=log)
    (Path(a.work) / "clip" / "result.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
