"""Training of the tiny-world latent diffusion UNet, and assembly of the ``tiny-sd`` Stable Diffusion pipeline.

The pipeline is Stable Diffusion 1.x in miniature, with SD's component and key names:

* ``vae``: the tiny-world ``AutoencoderKL`` (64x64x3 <-> 4x16x16; :mod:`worlds.tiny.train_vae`);
* ``text_encoder``: a ``transformers.CLIPTextModel`` that *is* the tiny CLIP's text tower (converted weight for
  weight, frozen), as SD's text encoder is OpenAI CLIP's; ``tokenizer``: the real CLIP BPE (49,408 tokens, 77);
* ``unet``: ``UNet2DConditionModel`` with ``CrossAttnDownBlock2D``/``CrossAttnUpBlock2D`` blocks (cross-attention
  at the 8x8 and 4x4 levels and in the mid block: ``up_blocks.0`` and ``up_blocks.1`` have ``attentions``, so
  "up-block attention" defences apply), plus ``addition_embed_type="text"`` (DeepFloyd IF's pooled-text embedding
  added to the time embedding: every ResNet block sees the caption, which makes shape learnable in CPU hours);
* ``scheduler``: ``DDIMScheduler`` (SD's betas, ``steps_offset=1``).

What makes it learn quickly per CPU second: latents and text states computed once (encoder and text tower are
frozen), min-SNR-5 loss weighting (Hang et al. 2023), a high constant learning rate after warm-up with an EMA of
the weights (what ships), and 10 % of captions dropped to "" for classifier-free guidance.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import clip_model, shapes
from .common import Logger, NullBar, cached_dataset, load_checkpoint, save_checkpoint, step_generator, step_rng

UNET_CONFIG = dict(
    sample_size=shapes.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    addition_embed_type="text", addition_embed_type_num_heads=4,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


@dataclass
class UnetSettings:
    steps: int = 6000  # the shipped UNet: quality targets met at 6000 (95 % shape+colour at guidance 5)
    batch_size: int = 32
    lr: float = 6e-4
    warmup: int = 500
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cfg_drop: float = 0.1
    min_snr_gamma: float = 5.0
    n_train: int = 20000
    eval_every: int = 1000
    eval_n: int = 56
    eval_steps: int = 20
    eval_guidance: float = 5.0
    checkpoint_seconds: float = 180.0


def build_unet(seed: int = 0, config: dict | None = None):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**(UNET_CONFIG if config is None else config))


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae, text_encoder, unet):
    from diffusers import StableDiffusionPipeline

    from markbench.models import clip_tokenizer

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def eval_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` held-out captions, cycling through the held-out combinations (sizes drawn from ``seed``)."""
    _, held = shapes.combinations()
    rng = np.random.default_rng([seed, 77])
    sizes = list(shapes.SIZES)
    return [shapes.Item(*held[i % len(held)], sizes[int(rng.integers(len(sizes)))]).caption for i in range(n)]


def generate(pipe, captions: list[str], seed: int = 0, guidance: float = 5.0, steps: int = 20,
             batch_size: int = 32) -> np.ndarray:
    """uint8 images for ``captions``; image ``i`` uses ``torch.Generator().manual_seed(seed + i)``."""
    import torch

    out = []
    for i in range(0, len(captions), batch_size):
        caps = captions[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(caps))]
        with torch.no_grad():
            im = pipe(caps, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      height=shapes.IMAGE_SIZE, width=shapes.IMAGE_SIZE, output_type="np").images
        out.append((np.clip(im, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def evaluate_pipeline(pipe, zero_shot, n: int = 56, guidances=(1.0, 5.0), steps: int = 20, seed: int = 0
                      ) -> dict:
    """Held-out captions -> images -> zero-shot CLIP: accuracy per guidance scale."""
    caps = eval_captions(n, seed)
    res = {}
    for g in guidances:
        imgs = generate(pipe, caps, seed=seed, guidance=g, steps=steps)
        res[f"cfg{g:g}"] = zero_shot.accuracy(imgs, caps)
    return res


def prepare(work: Path, vae, text_encoder, seed: int, n_train: int, log: Logger) -> dict:
    """Latents (and their mirror images) of the training pool (cached in ``work``), and every caption's text states."""
    import torch

    from markbench.models import clip_tokenizer

    images, captions = cached_dataset(work, "train", n_train, seed, log)
    path = work / "unet" / f"latents-n{n_train}-s{seed}.pt"
    cached = torch.load(path, weights_only=True) if path.exists() else None
    if cached is None or cached["scaling_factor"] != vae.config.scaling_factor:
        log(f"unet: encoding {2 * len(images)} latents")
        zs = []
        with torch.no_grad():
            for flip in (False, True):
                for i in range(0, len(images), 256):
                    x = shapes.to_tensor(images[i:i + 256])
                    if flip:
                        x = x.flip(-1)
                    zs.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
        cached = {"latents": torch.cat(zs), "scaling_factor": vae.config.scaling_factor}
        save_checkpoint(path, cached)
    uniq = [""] + sorted(set(captions))
    tok = clip_tokenizer()
    with torch.no_grad():
        ids = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        states = torch.cat([text_encoder(ids[i:i + 256])[0] for i in range(0, len(ids), 256)])
    index = {c: i for i, c in enumerate(uniq)}
    cap_index = torch.tensor([index[c] for c in captions] * 2)
    return {"latents": cached["latents"], "cap_index": cap_index, "states": states, "captions": uniq}


def train_unet(work: Path, out: Path, vae_dir: Path, clip_dir: Path, seed: int = 0,
               settings: UnetSettings | None = None, resume: bool = True, bar: NullBar | None = None,
               log: Logger | None = None, final_vae_dir: Path | None = None, config: dict | None = None,
               text_encoder_dir: Path | None = None) -> dict:
    """Train (or resume) the UNet on latents from ``vae_dir``'s encoder; save the whole pipeline to ``out``.

    ``final_vae_dir``: the VAE that ships (same encoder, decoder fine-tuned); used for evaluation and the saved
    pipeline when it exists, else ``vae_dir``'s. ``config``: the UNet's diffusers config (default
    :data:`UNET_CONFIG`, tiny-sd's). ``text_encoder_dir``: a saved ``CLIPTextModel`` to condition on (default: the
    text tower of the CLIP in ``clip_dir``, converted; the CLIP still scores the evaluation images).
    """
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler

    s = settings or UnetSettings()
    bar = bar or NullBar()
    log = log or Logger()
    work = Path(work)
    ckpt_path = work / "unet" / "checkpoint.pt"
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).float().eval().requires_grad_(False)
    clip = clip_model.load(clip_dir)
    if text_encoder_dir is not None:
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(str(text_encoder_dir), local_files_only=True).float().eval()
        text_encoder.requires_grad_(False)
    else:
        text_encoder = clip_model.to_hf_text_encoder(clip).requires_grad_(False)
    prep = prepare(work, vae, text_encoder, seed, s.n_train, log)
    latents, cap_index, states = prep["latents"], prep["cap_index"], prep["states"]

    config = UNET_CONFIG if config is None else config
    unet = build_unet(seed, config)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas_cumprod = noise_sched.alphas_cumprod
    step, history, cpu_seconds = 0, [], 0.0
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, history, cpu_seconds = state["step"], state["history"], state.get("cpu_seconds", 0.0)
        log(f"unet: resumed at step {step}")

    def checkpoint():
        save_checkpoint(ckpt_path, {"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                    "step": step, "history": history, "cpu_seconds": cpu_seconds,
                                    "settings": asdict(s)})

    def shipped_vae():
        if final_vae_dir is not None and (Path(final_vae_dir) / "config.json").exists():
            return AutoencoderKL.from_pretrained(str(final_vae_dir), local_files_only=True).eval()
        return vae

    zero_shot = None

    def evaluate():
        nonlocal zero_shot
        zero_shot = zero_shot or clip_model.ZeroShot(clip)
        pipe = assemble_pipeline(shipped_vae(), text_encoder, ema)
        res = evaluate_pipeline(pipe, zero_shot, n=s.eval_n, guidances=(1.0, s.eval_guidance), steps=s.eval_steps)
        return res

    bar.start("unet", s.steps, step)
    last_ckpt = time.time()
    unet.train()
    while step < s.steps:
        t0 = time.process_time()
        rng = step_rng(seed, step)
        gen = step_generator(seed, step)
        idx = torch.from_numpy(rng.integers(len(latents), size=s.batch_size))
        z0 = latents[idx]
        cond = cap_index[idx].clone()
        cond[torch.from_numpy(rng.random(s.batch_size) < s.cfg_drop)] = 0  # "" for classifier-free guidance
        ehs = states[cond]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (s.batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        lr = s.lr * min(1.0, (step + 1) / s.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        pred = unet(zt, t, ehs).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = snr.clamp(max=s.min_snr_gamma) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), s.grad_clip)
        opt.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        cpu_seconds += time.process_time() - t0
        bar.advance("unet", step, f"loss {loss.item():.4f}")
        if step % 50 == 0:
            log(f"unet step {step}/{s.steps} loss {loss.item():.5f} lr {lr:.2e} cpu {cpu_seconds:.0f}s")
        if s.eval_every and step % s.eval_every == 0:
            checkpoint()
            last_ckpt = time.time()
            res = evaluate()
            history.append({"step": step, "cpu_seconds": round(cpu_seconds, 1), **res})
            log(f"unet eval step {step}: " + "; ".join(
                f"{k}: shape+colour {v['shape_and_colour']:.3f} shape {v['shape']:.3f} colour {v['colour']:.3f}"
                for k, v in res.items()))
        if time.time() - last_ckpt > s.checkpoint_seconds:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    bar.stop("unet")
    pipe = assemble_pipeline(shipped_vae(), text_encoder, ema)
    pipe.save_pretrained(out)
    return {"settings": asdict(s), "config": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in config.items()},
            "seed": seed, "steps": step, "cpu_seconds": round(cpu_seconds, 1), "history": history}


def export_checkpoint(work: Path, out: Path, vae_dir: Path, clip_dir: Path) -> int:
    """Write the pipeline of the latest checkpoint's EMA weights to ``out``; return its step."""
    from diffusers import AutoencoderKL

    state = load_checkpoint(Path(work) / "unet" / "checkpoint.pt")
    if state is None:
        raise FileNotFoundError(f"no UNet checkpoint in {work}/unet")
    unet = build_unet()
    unet.load_state_dict(state["ema"])
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
    text_encoder = clip_model.to_hf_text_encoder(clip_model.load(clip_dir))
    assemble_pipeline(vae, text_encoder, unet.eval()).save_pretrained(out)
    return int(state["step"])


#: The independent attacker UNet (``tiny-sd-ind``'s): tiny-sd's block types, latent shape (4 x 16 x 16), text
#: conditioning (cross-attention on the tiny CLIP text tower's 64-d states, the pooled-text addition embedding) and
#: scheduler, with fewer channels (16/32/48 instead of 32/64/128, norm groups 8): 0.72 M parameters instead of 4.15 M,
#: 1.44 MB in float16, what the tiny world's 60 MB budget leaves room for beside the other shipped artifacts.
ATTACKER_UNET_CONFIG = dict(UNET_CONFIG, block_out_channels=(16, 32, 48), norm_num_groups=8)


def attacker_unet_settings() -> UnetSettings:
    """The attacker UNet's schedule: tiny-sd's recipe (batch 32, AdamW 6e-4 constant after warm-up, min-SNR-5, EMA
    0.999, 10 % caption drop for classifier-free guidance) for 2,500 steps instead of 6,000 on a model a sixth the
    size (about 0.24 CPU s a step on one thread: about a sixth of tiny-sd's 3,401 CPU s; an attacker with less
    compute, and what one working session of the shared 2-core CPU allowed), on 6,000 training images of the
    attacker's own seed (the attacker VAE's pool). The learning rate is constant after warm-up, so a longer run
    continues the same trajectory."""
    return UnetSettings(steps=2500, warmup=300, n_train=6000, eval_every=1000, eval_n=56, checkpoint_seconds=120.0)


def attacker_pipeline(vae_dir: Path, unet_dir: Path, text_encoder_dir: Path):
    """The attacker's pipeline in memory, float32: its VAE, its UNet, the public text encoder, tiny-sd's scheduler and
    tokenizer (what the tiny world's ``tiny-sd-ind`` folder holds)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True, torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), local_files_only=True, torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(str(text_encoder_dir), local_files_only=True)
    return assemble_pipeline(vae.float().eval(), text_encoder.float().eval(), unet.float().eval())


def train_attacker_unet(work: Path, out: Path, vae_dir: Path, clip_dir: Path, text_encoder_dir: Path, seed: int = 0,
                        settings: UnetSettings | None = None, resume: bool = True, bar: NullBar | None = None,
                        log: Logger | None = None, measure_n: int = 168) -> dict:
    """Train the independent attacker UNet (:data:`ATTACKER_UNET_CONFIG`, seed ``seed + ATTACKER_SEED_OFFSET``) in
    ``work`` on latents of the attacker VAE ``vae_dir`` (the shipped ``tiny-vae-ind``) of training-split images
    rendered from the attacker's seed (the same pool as the attacker VAE's: none of tiny-sd's training images nor of
    the evaluation sets), conditioned on the public text encoder ``text_encoder_dir`` (tiny-sd's, the tiny CLIP's text
    tower); ship its EMA weights in float16 to ``out/unet/``. Returns the training record with ``quality``: the tiny
    CLIP's zero-shot accuracy on images of the shipped float16 weights for ``measure_n`` held-out captions at guidance
    1, 3 and 5 (DDIM 20 steps; the same captions and seeds as tiny-sd's ``ldm_heldout_accuracy``)."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from . import clip_model
    from .train_vae import ATTACKER_SEED_OFFSET

    work, out = Path(work), Path(out)
    s = settings or attacker_unet_settings()
    log = log or Logger()
    res = train_unet(work, work / "pipeline", vae_dir, clip_dir, seed + ATTACKER_SEED_OFFSET, s, resume=resume,
                     bar=bar, log=log, config=ATTACKER_UNET_CONFIG, text_encoder_dir=text_encoder_dir)
    unet = UNet2DConditionModel.from_pretrained(str(work / "pipeline" / "unet"), local_files_only=True)
    if out.exists():
        shutil.rmtree(out)
    unet.to(torch.float16).save_pretrained(out / "unet")
    res["dtype"] = "float16"
    res["parameters"] = sum(p.numel() for p in unet.parameters())
    res["data"] = {"split": "train", "n_images": s.n_train, "image_seed": seed + ATTACKER_SEED_OFFSET,
                   "latents": "posterior mean of the attacker VAE (tiny-vae-ind), images and their mirror images",
                   "text_encoder": "tiny-sd's text_encoder (the tiny CLIP's text tower, public)"}
    if measure_n:
        pipe = attacker_pipeline(vae_dir, out / "unet", text_encoder_dir)
        zs = clip_model.ZeroShot(clip_model.load(clip_dir))
        q = evaluate_pipeline(pipe, zs, n=measure_n, guidances=(1.0, 3.0, 5.0), steps=20, seed=0)
        q["num_inference_steps"] = 20
        q["note"] = "shipped float16 weights loaded as float32; the captions and seeds of tiny-sd's ldm_heldout_accuracy"
        res["quality"] = {"ldm_heldout_accuracy": q}
        log("attacker UNet (float16) held-out accuracy: " + "; ".join(
            f"{k}: shape+colour {v['shape_and_colour']:.3f} shape {v['shape']:.3f} colour {v['colour']:.3f}"
            for k, v in q.items() if isinstance(v, dict)))
    return res


def main(argv=None) -> int:  # python -m worlds.tiny.train_unet WORK OUT VAE_DIR CLIP_DIR [--steps N]
    import argparse
    import json

    import torch

    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("vae_dir")
    p.add_argument("clip_dir")
    p.add_argument("--final-vae", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=UnetSettings.steps)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    log = Logger(work / "unet" / "train.log", quiet=True)
    res = train_unet(work, Path(a.out), Path(a.vae_dir), Path(a.clip_dir), a.seed, UnetSettings(steps=a.steps),
                     log=log, final_vae_dir=Path(a.final_vae) if a.final_vae else None)
    (work / "unet" / "result.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
