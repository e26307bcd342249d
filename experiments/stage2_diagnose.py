"""Why does SleeperMark's stage 2 write nothing at the invisible operating point? (issue 23)

Re-runs stage 2 (``SleeperMark.stage2_loss``, the defence's own loss) from the base UNet on one embedding's stage 1
(its cached ``embed`` entry: decoder, ``delta_z*``, message) and logs, besides the images' bits, what the loss asks
for and what the UNet does:

* the three loss terms and the gradient norm before the clip (running means over ``--log-every`` steps);
* the *written fraction* ``a(t) = <s, dz> / |dz|^2`` of the clean-latent shift ``s = -sqrt((1 - abar_t) / abar_t)
  (eps(z_t, t, c) - eps_0(z_t, t, c))`` the fine-tuned UNet makes, on a fixed batch of training latents and noise,
  for the triggered prompt, the plain prompt and the empty prompt (classifier-free guidance's other branch), at
  several timesteps; and ``r(t)``, the rms of the shift's part orthogonal to ``dz`` over ``rms(dz)`` (drift).
  The loss's per-timestep optimum in the trigger branch is ``a(t) = w1 / (w1 + w2)``, ``r(t) = 0``; in the plain
  branch ``a = r = 0``.
* at ``--every`` steps: bit accuracy of images for ``--n`` held-out captions with and without the trigger (20 DDIM
  steps, guidance 7.5, verification path) and their PSNR / SSIM to the clean base's images for the same triggered
  prompts and seeds (the right twin); once, the ceiling (twin latents plus the whole ``dz``).

    python -m experiments.stage2_diagnose --entry RUN/cache/xx/KEY --pool POOL.pt --steps 600 --every 300 \\
        --eta 1 --out experiments/results/stage2_diagnose/NAME.json

``--trainable`` picks the UNet parameters trained (``TRAINABLE_SETS`` of the defence: the paper's up-block
attention by default, or wider sets: is the module set what limits stage 2?); ``--only-wm`` trains the watermark
term alone (a capacity test, not the method).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

PROBE_T = (1, 11, 51, 101, 201, 301, 501)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entry", type=Path, required=True, help="the embed cache entry (folder with tensors.safetensors)")
    p.add_argument("--pool", type=Path, required=True, help="training latents (experiments.capacity_curve's cache)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=300, help="image checkpoints every this many steps (0: end only)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1e-5, help="gradient-norm clip (the defence's default 1e-5)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--uncond-prob", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trigger-position", choices=("suffix", "prefix"), default="suffix",
                   help="where the trigger goes (the embedding's stage 1 does not depend on it)")
    p.add_argument("--trigger", help="the trigger string (default: the defence's, the paper's `*[Z]& `)")
    p.add_argument("--only-wm", action="store_true", help="capacity test, not the method: train the watermark term "
                   "alone (no preservation terms): can the trainable modules write the shift at all?")
    p.add_argument("--trainable", default="up_attention", help="the parameter set stage 2 trains (markbench."
                   "defenses.sleepermark.TRAINABLE_SETS; up_attention: the paper's)")
    p.add_argument("--save-unet", type=Path, help="save the trained parameters here at the end")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)

    import copy

    import torch
    from safetensors.torch import load_file, save_file
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from markbench.defenses.sleepermark import (TRAINABLE_SETS, SleeperMark, sleeper_weights,
                                                  trainable_parameter_names, watermark_target)
    from markbench.generation import generate_images
    from markbench.latent_nets import LatentDecoder
    from markbench.latents import from_latent, to_latent
    from markbench.measures.keyless import laplacian_energy
    from markbench.models import load_pipeline_folder
    from markbench.noise import quantize8
    from markbench.plugins import GenerationRequest
    from markbench.prompts import read_prompts
    from markbench.training import drop_to_empty, prompt_embeds
    from markbench.world import worlds

    t0 = time.perf_counter()
    tensors = load_file(str(a.entry / "tensors.safetensors"))
    # Deliberate copy of experiments/stage2_steps.py's setup (stage 1 entry, decoder, pipeline, captions, image and
    # read helpers), with the trigger position and clip as options: each probe stays standalone, so that the figures
    # it produced in docs/operating_point.md are reproduced by the script as it was run.
    message = tensors["secret.message"].bool()
    delta_z = tensors["secret.delta_z"].float()
    bits = int(message.numel())
    given = {"trigger": a.trigger} if a.trigger else {}
    sm = SleeperMark(bits=bits, trigger_position=a.trigger_position, eta=a.eta, stage2_lr=a.lr,
                     stage2_batch_size=a.batch, stage2_grad_clip=a.clip, uncond_prob=a.uncond_prob, **given,
                     secret_res=0, decoder_channels=[32, 64], decoder_hidden=256, decoder_mlp_layers=3)
    decoder = LatentDecoder(bits, 4, (16, 16), [32, 64], 256, 3, 0.1)  # the config's decoder
    decoder.load_state_dict({k[len("secret.decoder."):]: v for k, v in tensors.items()
                             if k.startswith("secret.decoder.")})
    decoder.eval()
    pipe = load_pipeline_folder(worlds.get("tiny")().model_folder("tiny-sd-rt"))
    pipe.set_progress_bar_config(disable=True)
    (mean, std), _ = torch.load(a.pool, weights_only=True)  # tensors only: nothing unpickled runs
    train_caps = list(read_prompts("tiny:train", "stage2_diagnose"))
    chosen = [train_caps[i % len(train_caps)] for i in range(mean.shape[0])]
    held = list(read_prompts("tiny:heldout", "stage2_diagnose"))[: a.n]
    seeds = tuple(30_000 + i for i in range(a.n))

    def images(prompts):
        req = GenerationRequest(prompts=tuple(prompts), seeds=seeds, height=64, width=64, num_inference_steps=20,
                                guidance_scale=7.5, batch_size=16)
        return quantize8(generate_images(pipe, req))

    def read(imgs):
        with torch.no_grad():
            return float(((decoder(to_latent(pipe.vae, imgs)[0]) > 0) == message).float().mean())

    trig = [sm.triggered(c) for c in held]
    twin = images(trig) if a.every >= 0 else None
    with torch.no_grad():
        ceiling = read(quantize8(from_latent(pipe.vae, to_latent(pipe.vae, twin)[0] + delta_z)))
        emb = prompt_embeds(pipe, chosen, "cpu")
        emb_trig = prompt_embeds(pipe, [sm.triggered(c) for c in chosen], "cpu")
        emb_empty = prompt_embeds(pipe, [""], "cpu")
    unet = pipe.unet
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    if a.trainable not in TRAINABLE_SETS:
        p.error(f"--trainable {a.trainable!r}: allowed: {', '.join(TRAINABLE_SETS)}")
    names = set(trainable_parameter_names(unet, a.trainable))
    unet.requires_grad_(False)
    params = [q for n, q in unet.named_parameters() if n in names]
    for q in params:
        q.requires_grad_(True)
    n_trainable = sum(q.numel() for q in params)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=sm.stage2_weight_decay, eps=sm.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    ac = pipe.scheduler.alphas_cumprod.float()
    gen = torch.Generator().manual_seed(a.seed)

    # fixed probe batch: 8 training latents (posterior means), fixed noise, each probe timestep
    pg = torch.Generator().manual_seed(12345)
    pidx = torch.randint(0, mean.shape[0], (8,), generator=pg)
    pz0, pnoise = mean[pidx], torch.randn(mean[pidx].shape, generator=pg)
    dz_sq = float((delta_z ** 2).sum())
    dz_rms = float(delta_z.pow(2).mean().sqrt())
    branches = {"trigger": emb_trig[pidx], "plain": emb[pidx], "empty": emb_empty.expand(8, -1, -1)}

    def probe():
        out = {}
        with torch.no_grad():
            for t_val in PROBE_T:
                t = torch.full((8,), t_val, dtype=torch.long)
                abar = ac[t].view(-1, 1, 1, 1)
                z_t = abar.sqrt() * pz0 + (1 - abar).sqrt() * pnoise
                for name, c in branches.items():
                    d = unet(z_t, t, c, return_dict=False)[0] - frozen(z_t, t, c, return_dict=False)[0]
                    s = -((1 - abar) / abar).sqrt() * d
                    coef = (s * delta_z).flatten(1).sum(1) / dz_sq
                    orth = s - coef.view(-1, 1, 1, 1) * delta_z
                    out[f"{name}@{t_val}"] = {"a": round(float(coef.mean()), 4),
                                              "r": round(float(orth.pow(2).mean().sqrt()) / dz_rms, 4)}
        return out

    rows, logs = [], []

    def result():
        w1, w2 = sleeper_weights(torch.tensor(PROBE_T), a.eta, sm.tau, sm.beta)
        return {"entry": a.entry.name, "bits": bits, "residual_rms": dz_rms, "ceiling_twin_plus_delta": ceiling,
                "eta": a.eta, "lr": a.lr, "clip": a.clip, "batch": a.batch, "steps": a.steps,
                "uncond_prob": a.uncond_prob, "only_wm": a.only_wm,
                "trigger_position": a.trigger_position, "trigger": sm.trigger, "n": a.n, "stage2_seed": a.seed,
                "trainable": a.trainable,
                "trainable_params": n_trainable,
                "optimum_a": {str(t): round(float(x / (x + y)), 4) for t, x, y in zip(PROBE_T, w1, w2)},
                "torch_threads": torch.get_num_threads(), "rows": rows, "log": logs}

    def keyless(x, ref):  # folded AUC of the Laplacian energy, marked against the twin (as stage2_oracle's)
        pos, neg = laplacian_energy(x), laplacian_energy(ref)
        gt = sum(float(u > v) + 0.5 * float(u == v) for u in pos for v in neg) / (len(pos) * len(neg))
        return max(gt, 1 - gt)

    def checkpoint(step):
        unet.eval()
        marked = images(trig)
        plain = images(held)
        row = {"step": step, "bit_accuracy_trigger": read(marked), "bit_accuracy_no_trigger": read(plain),
               "psnr_to_twin": float(sum(float(peak_signal_noise_ratio(marked[i:i + 1], twin[i:i + 1], data_range=1.0))
                                         for i in range(a.n)) / a.n),
               "ssim_to_twin": float(structural_similarity_index_measure(marked, twin, data_range=1.0)),
               "keyless_laplacian_auc": keyless(marked, twin),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        unet.train()
        save()

    def save():
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result(), indent=1) + "\n")

    acc = {"wm": 0.0, "keep_trigger": 0.0, "keep_plain": 0.0, "grad_norm": 0.0}
    logs.append({"step": 0, "probe": probe(), "seconds": round(time.perf_counter() - t0, 1)})
    if a.every > 0:
        checkpoint(0)
    unet.train()
    t_train = time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, mean.shape[0], (a.batch,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, int(ac.shape[0]), (a.batch,), generator=gen)
        plain = drop_to_empty(emb[idx], emb_empty, a.uncond_prob, gen)
        if not a.only_wm:
            loss, parts = sm.stage2_loss(unet, frozen, z0, noise, t, plain, emb_trig[idx], delta_z, ac)
        else:  # the same watermark term, alone (the triggered half only; nothing above draws from gen)
            abar = ac[t].view(-1, 1, 1, 1)
            z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
            with torch.no_grad():
                ref = frozen(z_t, t, emb_trig[idx], return_dict=False)[0]
            w1, _ = sleeper_weights(t, a.eta, sm.tau, sm.beta)
            pred = unet(z_t, t, emb_trig[idx], return_dict=False)[0]
            loss = (w1.view(-1, 1, 1, 1) * (pred - watermark_target(ref, abar, delta_z)) ** 2).mean()
            parts = {"wm": float(loss.detach()), "keep_trigger": 0.0, "keep_plain": 0.0}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, a.clip if a.clip > 0 else float("inf")))
        opt.step()
        sched.step()
        for k, v in parts.items():
            acc[k] += v / a.log_every
        acc["grad_norm"] += gn / a.log_every
        if step % a.log_every == 0:
            secs = time.perf_counter() - t_train
            logs.append({"step": step, **{k: round(v, 6) for k, v in acc.items()}, "probe": probe(),
                         "train_s_per_step": round(secs / step, 3), "seconds": round(time.perf_counter() - t0, 1)})
            pr = logs[-1]["probe"]
            print(json.dumps({"step": step, **{k: round(v, 5) for k, v in acc.items()},
                              "a_trig@1": pr["trigger@1"]["a"], "a_trig@51": pr["trigger@51"]["a"],
                              "a_trig@201": pr["trigger@201"]["a"], "a_plain@51": pr["plain@51"]["a"],
                              "a_empty@51": pr["empty@51"]["a"], "r_trig@51": pr["trigger@51"]["r"],
                              "s/step": logs[-1]["train_s_per_step"]}), flush=True)
            acc = dict.fromkeys(acc, 0.0)
            save()
        if a.every > 0 and step % a.every == 0:
            checkpoint(step)
    if a.every == 0:
        checkpoint(a.steps)
    if a.save_unet:
        save_file({n: q.detach().contiguous() for n, q in unet.named_parameters() if n in names}, str(a.save_unet))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
