"""Training of the tiny-world VAE (diffusers ``AutoencoderKL``, Stable Diffusion's component and key names).

64x64x3 images <-> 4x16x16 latents (a x4 VAE: three encoder levels, two downsamplings). Why x4: at x8 a shape
would be 4 to 6 latent pixels wide and the decoder would have to invent its edges (PSNR suffers, and the UNet must
learn shape from very few positions); at x4 a shape spans 7 to 12 latent pixels and the UNet still runs on only
256 positions.

Trained on every style the world will ever show (base, striped style, the arrow subject) so that fine-tuning
attacks do not fail in the VAE. Three stages:

1. encoder + decoder: L1 + MSE reconstruction with a tiny KL weight (SD uses 1e-6), on the mixture of styles;
2. decoder only, encoder frozen: keeps the latent space (which the UNet is trained on) fixed while the decoder
   sharpens edges and stripes; SD's "ft-MSE" VAE decoder was made the same way;
3. round trip, decoder side only (``post_quant_conv`` + decoder), encoder frozen: the same reconstruction loss plus
   a round-trip term on perturbed latents, ``|Enc(Dec(z + d)) - z - d|^2`` with ``d ~ N(0, s^2)`` per image and
   ``s ~ U(0, roundtrip_sigma)`` (scaled latent units), normalised by the mean of ``s^2``. Why: a VAE trained on flat
   coloured shapes alone learns a decoder that renders only the few latent directions the data varies along (19 of
   1,024 keep 90 % of a residual through decode -> encode, measured with ``python -m experiments.geometry``), whereas
   Stable Diffusion's VAE, trained on textured natural images, carries latent residuals through the round trip;
   every latent-residual watermark (SleeperMark, AquaLoRA, Tree-Ring, Gaussian Shading) relies on that. The stage
   gives the tiny VAE that property without moving its latent space (the encoder is frozen: the UNet's latents are
   unchanged). ``roundtrip_steps = 0`` builds the two-stage VAE. docs/tiny_world.md has the figures.

After stage 1 ``scaling_factor`` is set to 1/std of the training latents (SD's 0.18215 was found the same way).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import shapes
from .common import Logger, NullBar, cached_dataset, load_checkpoint, lr_at, save_checkpoint, step_rng

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), latent_channels=4,
    layers_per_block=1, norm_num_groups=16, sample_size=shapes.IMAGE_SIZE, act_fn="silu",
)


@dataclass
class VaeSettings:
    steps: int = 1200  # stage 1: encoder + decoder
    decoder_steps: int = 6000  # stage 2: decoder only
    batch_size: int = 16
    lr: float = 1e-3
    decoder_lr: float = 5e-4
    roundtrip_steps: int = 1500  # stage 3: decoder side, round-trip term (0: off)
    roundtrip_lr: float = 2e-4
    roundtrip_sigma: float = 0.5  # largest per-image std of the latent perturbation, scaled latent units
    roundtrip_weight: float = 1.0
    warmup: int = 200
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    l1_weight: float = 1.0
    mix: tuple[float, float, float] = (0.6, 0.25, 0.15)  # base, style, subject
    n_train: int = 20000
    n_style: int = 3000
    n_subject: int = 3000
    n_eval: int = 256
    eval_every: int = 500
    checkpoint_seconds: float = 120.0


def build_vae(seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def psnr_round_trip(vae, images: np.ndarray, batch_size: int = 64) -> float:
    """Mean per-image PSNR (dB) of uint8 images against their uint8 round trip encode(mean) -> decode."""
    import torch

    vals = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = shapes.to_tensor(images[i:i + batch_size])
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            y8 = ((y.clamp(-1, 1) + 1) * 127.5).round()
            x8 = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float()
            mse = ((y8 - x8) ** 2).flatten(1).mean(1).clamp_min(1e-10)
            vals.append(10 * torch.log10(255.0 ** 2 / mse))
    return float(torch.cat(vals).mean())


def latent_std(vae, images: np.ndarray, batch_size: int = 128) -> tuple[float, float]:
    import torch

    zs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            zs.append(vae.encode(shapes.to_tensor(images[i:i + batch_size])).latent_dist.mode())
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


def roundtrip_loss(vae, z: torch.Tensor, sigma: float, generator) -> torch.Tensor:
    """Round-trip term of stage 3: each latent ``z`` (unscaled, posterior mean) gets ``d ~ N(0, s^2)`` with
    ``s ~ U(0, sigma)`` per image in *scaled* latent units; returns ``|Enc(Dec(z + d)) - z - d|^2`` (posterior mean of
    the clamped decoding) divided by ``E[s^2] = sigma^2 / 3``: 1 means nothing of ``d`` comes back, 0 all of it."""
    import torch
    import torch.nn.functional as F

    sf = float(vae.config.scaling_factor)
    s = sigma * torch.rand(z.shape[0], 1, 1, 1, generator=generator)
    d = s * torch.randn(z.shape, generator=generator) / sf
    back = vae.encode(vae.decode(z + d).sample.clamp(-1, 1)).latent_dist.mean
    return F.mse_loss((back - z) * sf, d * sf) / (sigma ** 2 / 3)


def train_vae(work: Path, out: Path, seed: int = 0, settings: VaeSettings | None = None, resume: bool = True,
              bar: NullBar | None = None, log: Logger | None = None, stage1_out: Path | None = None,
              roundtrip_out: Path | None = None) -> dict:
    """Train (or resume) the VAE; save the two-stage VAE (``tiny-sd``'s) with ``save_pretrained`` to ``out`` and,
    when ``settings.roundtrip_steps`` > 0, the stage-3 VAE (``tiny-sd-rt``'s) to ``roundtrip_out`` (default: ``out``
    with ``-roundtrip`` appended); return their PSNR figures.

    ``stage1_out``: where to also save the VAE after stage 1 (its encoder is final: the UNet can start from it).
    """
    import torch
    import torch.nn.functional as F

    s = settings or VaeSettings()
    bar = bar or NullBar()
    log = log or Logger()
    work, out = Path(work), Path(out)
    roundtrip_out = Path(roundtrip_out) if roundtrip_out is not None else out.with_name(out.name + "-roundtrip")
    ckpt_path = work / "vae" / "checkpoint.pt"
    two_stage_json = work / "vae" / "two_stage_psnr.json"
    vae = build_vae(seed)
    total = s.steps + s.decoder_steps + s.roundtrip_steps
    step, history, cpu_seconds = 0, [], 0.0

    def stage_of(k: int) -> int:  # without a stage 3, the end of training is still stage 2 (its optimiser)
        return 1 if k < s.steps else 2 if k < s.steps + s.decoder_steps or not s.roundtrip_steps else 3

    def make_opt(stage: int):
        if stage == 1:
            params, lr = vae.parameters(), s.lr
        elif stage == 2:
            params, lr = vae.decoder.parameters(), s.decoder_lr
        else:
            params, lr = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters()), s.roundtrip_lr
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def freeze_encoder():
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)

    opt = make_opt(1)
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        vae.load_state_dict(state["model"])
        step, history, cpu_seconds = state["step"], state["history"], state.get("cpu_seconds", 0.0)
        vae.register_to_config(scaling_factor=state["scaling_factor"])
        if step >= s.steps:
            opt = make_opt(stage_of(step))
            freeze_encoder()
        if state.get("stage") == stage_of(step):
            opt.load_state_dict(state["opt"])
        log(f"vae: resumed at step {step}")

    pools = [cached_dataset(work, "train", s.n_train, seed, log), cached_dataset(work, "style", s.n_style, seed, log),
             cached_dataset(work, "subject", s.n_subject, seed, log)]
    evals = {"heldout": cached_dataset(work, "heldout", s.n_eval, seed + 1, log)[0],
             "style": cached_dataset(work, "style", s.n_eval, seed + 1, log)[0],
             "subject": cached_dataset(work, "subject", s.n_eval, seed + 1, log)[0]}
    mix = np.asarray(s.mix) / np.sum(s.mix)

    def checkpoint():
        save_checkpoint(ckpt_path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                                    "stage": stage_of(step), "history": history,
                                    "scaling_factor": vae.config.scaling_factor,
                                    "cpu_seconds": cpu_seconds, "settings": asdict(s)})

    def evaluate(n: int | None = None) -> dict:
        vae.eval()
        res = {k: round(psnr_round_trip(vae, v[:n]), 2) for k, v in evals.items()}
        vae.train()
        return res

    def finish_stage1():
        nonlocal opt
        mean, std = latent_std(vae, pools[0][0][:2048])
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        log(f"vae stage 1 done at step {step}: latent mean {mean:.3f} std {std:.3f} -> scaling_factor "
            f"{vae.config.scaling_factor}")
        if stage1_out is not None:
            vae.save_pretrained(stage1_out)
        opt = make_opt(2)
        freeze_encoder()

    def finish_two_stage():
        """End of stage 2: save the two-stage VAE (the one the UNet is trained with) and its figures."""
        res = evaluate()
        log(f"vae two-stage PSNR (n={s.n_eval} each): " + " ".join(f"{k} {v:.2f}" for k, v in res.items()))
        vae.save_pretrained(out)
        two_stage_json.write_text(json.dumps(res))

    if step == s.steps and stage1_out is not None and not (Path(stage1_out) / "config.json").exists():
        finish_stage1()
    if (s.roundtrip_steps and step == s.steps + s.decoder_steps
            and not (two_stage_json.exists() and (out / "config.json").exists())):
        finish_two_stage()
    bar.start("vae", total, step)
    last_ckpt = time.time()
    vae.train()
    while step < total:
        t0 = time.process_time()
        stage = stage_of(step)
        rng = step_rng(seed, step)
        which = rng.choice(3, size=s.batch_size, p=mix)
        batch = np.stack([pools[w][0][rng.integers(len(pools[w][0]))] for w in which])
        x = shapes.to_tensor(batch)
        flip = torch.from_numpy(rng.random(s.batch_size) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if stage == 1:
            lr = lr_at(step, s.lr, s.warmup, s.steps)
        elif stage == 2:
            lr = lr_at(step - s.steps, s.decoder_lr, s.warmup, s.decoder_steps)
        else:
            lr = lr_at(step - s.steps - s.decoder_steps, s.roundtrip_lr, 0, s.roundtrip_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        y = vae.decode(z).sample
        loss = s.l1_weight * F.l1_loss(y, x) + s.mse_weight * F.mse_loss(y, x)
        if stage == 1:
            loss = loss + s.kl_weight * post.kl().mean()
        if stage == 3:
            loss = loss + s.roundtrip_weight * roundtrip_loss(vae, post.mean.detach(), s.roundtrip_sigma, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        cpu_seconds += time.process_time() - t0
        bar.advance("vae", step, f"stage {stage} loss {loss.item():.4f}")
        if step % 50 == 0:
            log(f"vae step {step}/{total} stage {stage} loss {loss.item():.5f} lr {lr:.2e} cpu {cpu_seconds:.0f}s")
        if step % s.eval_every == 0:
            res = evaluate(64)
            history.append({"step": step, "cpu_seconds": round(cpu_seconds, 1), **res})
            log(f"vae eval step {step}: PSNR " + " ".join(f"{k} {v:.2f}" for k, v in res.items()))
        if step == s.steps:
            finish_stage1()
            checkpoint()
            last_ckpt = time.time()
        if step == s.steps + s.decoder_steps and s.roundtrip_steps:
            finish_two_stage()
            opt = make_opt(3)
            checkpoint()
            last_ckpt = time.time()
        if time.time() - last_ckpt > s.checkpoint_seconds:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    bar.stop("vae")
    vae.eval()
    res = evaluate()
    log(f"vae final PSNR (n={s.n_eval} each): " + " ".join(f"{k} {v:.2f}" for k, v in res.items()))
    result = {"settings": asdict(s), "config": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in VAE_CONFIG.items()},
              "seed": seed, "steps": step, "cpu_seconds": round(cpu_seconds, 1), "psnr": res, "n": s.n_eval,
              "scaling_factor": vae.config.scaling_factor, "history": history}
    if s.roundtrip_steps:
        vae.save_pretrained(roundtrip_out)
        result["psnr"] = json.loads(two_stage_json.read_text())
        result["roundtrip_psnr"] = res
    else:
        vae.save_pretrained(out)
    return result


#: The independent attacker VAE is trained from ``seed + ATTACKER_SEED_OFFSET``: its initial weights, its batches and
#: its training images (rendered from that seed: other instances of the domain than the defender's VAE saw, and none
#: of the evaluation sets, which use seeds 1 and ``seed + 1``).
ATTACKER_SEED_OFFSET = 1000


def attacker_vae_settings() -> VaeSettings:
    """The attacker VAE's schedule: tiny-sd's two stages (encoder + decoder, then decoder only) on the same mixture of
    styles, but 900 + 700 steps instead of 1,200 + 6,000 and no round-trip stage (an attacker with about a quarter of
    the defender's compute: 888 CPU s on one thread against 3,583 for tiny-sd's VAE), and smaller rendered pools."""
    return VaeSettings(steps=900, decoder_steps=700, roundtrip_steps=0, warmup=100, n_train=6000, n_style=1500,
                       n_subject=1000, eval_every=400)


def train_attacker_vae(work: Path, out: Path, seed: int = 0, settings: VaeSettings | None = None,
                       resume: bool = True, bar: NullBar | None = None, log: Logger | None = None) -> dict:
    """Train the independent attacker VAE (tiny-sd's VAE architecture, seed ``seed + ATTACKER_SEED_OFFSET``) in
    ``work`` and ship it to ``out/vae/`` with float16 weights (half the bytes; it is loaded as float32, and every
    figure here is measured on the shipped float16 weights). Returns the training record with ``heldout_psnr``: the
    round-trip PSNR of the shipped weights on the evaluation sets of tiny-sd's own VAE (n = 256 per split, seed 1,
    :func:`worlds.tiny.evaluate.measure_vae`), so the two are compared on the same images."""
    import shutil

    import torch
    from diffusers import AutoencoderKL

    from .evaluate import measure_vae

    work, out = Path(work), Path(out)
    s = settings or attacker_vae_settings()
    if s.roundtrip_steps:
        raise ValueError("the attacker VAE has no round-trip stage (roundtrip_steps must be 0)")
    res = train_vae(work, work / "final", seed + ATTACKER_SEED_OFFSET, s, resume=resume, bar=bar, log=log)
    vae = AutoencoderKL.from_pretrained(str(work / "final"), local_files_only=True, torch_dtype=torch.float16)
    if out.exists():
        shutil.rmtree(out)
    vae.save_pretrained(out / "vae")
    res["dtype"] = "float16"
    res["heldout_psnr"] = measure_vae(out, n=256, seed=0)
    res["heldout_psnr"]["note"] = "shipped float16 weights loaded as float32; the images of tiny-sd's vae_psnr_db"
    (log or Logger())(f"attacker VAE (float16) round-trip PSNR: {res['heldout_psnr']}")
    return res


def main(argv=None) -> int:  # python -m worlds.tiny.train_vae WORK OUT [--seed N]
    import argparse
    import json

    import torch

    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=VaeSettings.steps)
    p.add_argument("--decoder-steps", type=int, default=VaeSettings.decoder_steps)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    log = Logger(work / "vae" / "train.log", quiet=True)
    res = train_vae(work, Path(a.out), a.seed, VaeSettings(steps=a.steps, decoder_steps=a.decoder_steps), log=log,
                    stage1_out=work / "vae" / "stage1")
    (work / "vae" / "result.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
