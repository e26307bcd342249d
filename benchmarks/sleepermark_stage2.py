"""One SleeperMark stage-2 step at Stable Diffusion 1.5 scale, against a plain fine-tuning step of the same UNet.

The UNet is SD 1.5's architecture (UNet2DConditionModel: 320-640-1280-1280, two layers per block, cross-attention
768, 8 heads) with random weights built from its config (nothing is downloaded; timing does not depend on the
weights). Both sides get the same latents, timesteps and text embeddings (random [B, 77, 768]: the frozen text encoder
is outside the step):

* **stage 2**: `SleeperMark.stage2_loss` (the frozen reference UNet on plain + trigger prompts, the trainable UNet on
  both, the three-term loss with the sigmoid weights), backward, gradient clip, AdamW on the up-block attention
  parameters only (the paper's trainable set, found by `trainable_parameter_names`);
* **reference**: a plain text-to-image fine-tuning step (eps-prediction MSE on the plain prompts, backward, AdamW on
  the same parameters).

The ratio says what the sleeper objective costs over ordinary fine-tuning (it runs both UNets on 2 x B inputs).

    python benchmarks/sleepermark_stage2.py                     # SD 1.5 scale: 512 px, batch 10 (the paper)
    python benchmarks/sleepermark_stage2.py --device cuda --dtype float32
    python benchmarks/sleepermark_stage2.py --width 0.25 --resolution 128 --batch 2   # a CPU-sized check
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def sd15_unet(width: float = 1.0, cross_attention_dim: int = 768):
    """SD 1.5's UNet architecture from its config; ``width`` scales the channels (1.0 = SD 1.5)."""
    from diffusers import UNet2DConditionModel

    channels = tuple(max(32, int(round(c * width / 32)) * 32) for c in (320, 640, 1280, 1280))
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=512, help="image side in px (latent side = /8; paper 512)")
    ap.add_argument("--batch", type=int, default=10, help="stage-2 batch (paper 10)")
    ap.add_argument("--width", type=float, default=1.0, help="channel scale of the UNet (1.0 = SD 1.5)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step each)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="float32 is the paper's (SleeperMark trains in fp32)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDPMScheduler

    from markbench.defenses.sleepermark import SleeperMark, trainable_parameter_names

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    unet = sd15_unet(args.width).to(dev)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    names = set(trainable_parameter_names(unet))
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    unet.train()
    defence = SleeperMark()  # the paper's eta / tau / beta, clip 1e-5, AdamW 1e-4, wd 1e-2, eps 1e-8
    opt = torch.optim.AdamW(params, lr=float(defence.stage2_lr), weight_decay=float(defence.stage2_weight_decay),
                            eps=float(defence.adam_eps))
    side = args.resolution // 8
    b = args.batch
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn((b, 4, side, side), generator=g).to(dev, dtype)
    noise = torch.randn((b, 4, side, side), generator=g).to(dev, dtype)
    t = torch.randint(0, 1000, (b,), generator=g).to(dev)
    cond = torch.randn((b, 77, unet.config.cross_attention_dim), generator=g).to(dev, dtype)
    cond_trigger = torch.randn((b, 77, unet.config.cross_attention_dim), generator=g).to(dev, dtype)
    delta_z = (0.1 * torch.randn((1, 4, side, side), generator=g)).to(dev, dtype)
    alphas_cumprod = DDPMScheduler(beta_start=0.00085, beta_end=0.012,  # SD's training schedule
                                   beta_schedule="scaled_linear").alphas_cumprod.to(dev)

    def stage2_step():
        loss, _ = defence.stage2_loss(unet, frozen, z0, noise, t, cond, cond_trigger, delta_z, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(defence.stage2_grad_clip))
        opt.step()

    def reference_step():
        abar = alphas_cumprod[t].view(-1, 1, 1, 1).to(dtype)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(z_t, t, cond, return_dict=False)[0].float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {"stage2": [], "reference": []}
    for fn in (stage2_step, reference_step):
        fn()  # warm-up (allocations, kernels)
        _sync(dev)
    for _ in range(args.steps):  # alternate the sides to cancel drift
        for name, fn in (("stage2", stage2_step), ("reference", reference_step)):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_train = sum(p.numel() for p in params)
    print(f"UNet {n_unet / 1e6:.1f} M parameters (width x{args.width}), trainable {n_train / 1e6:.1f} M; "
          f"{args.resolution} px (latent {side}), batch {b}, {args.dtype} on {dev}")
    if dev.startswith("cuda"):
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB ({torch.cuda.get_device_name()})")
    for name in ("stage2", "reference"):
        v = times[name]
        print(f"{name:9s} step: min {min(v):.3f} s, median {statistics.median(v):.3f} s over {len(v)}")
    print(f"ratio stage2 / reference (fastest steps): {min(times['stage2']) / min(times['reference']):.2f}")


if __name__ == "__main__":
    main()
