"""What would a perfectly trained SleeperMark stage 2 put into the images? An oracle UNet (issue 23).

Stage 2's loss has a per-timestep optimum: in the trigger branch the UNet's noise prediction moves to
``eps_0 - a(t) sqrt(abar_t / (1 - abar_t)) dz`` with ``a(t) = w1 / (w1 + w2)`` (``w1 = eta sigmoid(-(t - tau) /
beta)``, ``w2 = sigmoid((t - tau) / beta)``), i.e. its clean-latent estimate moves by ``a(t) dz``; the plain
branch stays at ``eps_0``. This probe samples the clean base with exactly that shift added to the conditional
(triggered) branch, nothing learnt, and reads the images as verification does, for several ``eta``. It shows what
the sampler (20 DDIM steps, classifier-free guidance 7.5: the guided prediction is ``u + g (c - u)``, so a shift
of the conditional branch alone is multiplied by ``g``) makes of the loss's target, and so which ``eta`` asks for
an invisible mark. ``--branch both`` shifts the unconditional (empty-prompt) branch as well (a prompt-independent
shift: guidance then passes it on once).

    python -m experiments.stage2_oracle --entry RUN/cache/xx/KEY --eta 0.02 0.1 0.2 1 5 \\
        --out experiments/results/stage2_oracle.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def eps_shift(t: int, eta: float, tau: float, beta: float, alphas_cumprod, delta_z):
    """The loss's per-timestep optimum in the trigger branch, as a change of the noise prediction:
    ``-a(t) sqrt(abar_t / (1 - abar_t)) dz`` with ``a(t) = w1 / (w1 + w2)`` (its clean-latent estimate then moves
    by ``a(t) dz``)."""
    import torch

    from markbench.defenses.sleepermark import sleeper_weights

    w1, w2 = sleeper_weights(torch.tensor(float(t)), eta, tau, beta)
    abar = alphas_cumprod[int(t)]
    return -(w1 / (w1 + w2)) * torch.sqrt(abar / (1 - abar)) * delta_z


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entry", type=Path, required=True)
    p.add_argument("--eta", type=float, nargs="+", default=[0.02, 0.1, 0.2, 1.0, 5.0])
    p.add_argument("--branch", choices=("cond", "both"), nargs="+", default=["cond", "both"])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from markbench.defenses.sleepermark import SleeperMark, sleeper_weights
    from markbench.generation import generate_images
    from markbench.latent_nets import LatentDecoder
    from markbench.latents import from_latent, to_latent
    from markbench.measures.keyless import laplacian_energy
    from markbench.models import load_pipeline_folder
    from markbench.noise import quantize8
    from markbench.plugins import GenerationRequest
    from markbench.prompts import read_prompts
    from markbench.world import worlds

    t0 = time.perf_counter()
    tensors = load_file(str(a.entry / "tensors.safetensors"))
    message = tensors["secret.message"].bool()
    delta_z = tensors["secret.delta_z"].float()
    bits = int(message.numel())
    sm = SleeperMark(bits=bits, trigger_position="suffix")
    decoder = LatentDecoder(bits, 4, (16, 16), [32, 64], 256, 3, 0.1)
    decoder.load_state_dict({k[len("secret.decoder."):]: v for k, v in tensors.items()
                             if k.startswith("secret.decoder.")})
    decoder.eval()
    pipe = load_pipeline_folder(worlds.get("tiny")().model_folder("tiny-sd-rt"))
    pipe.set_progress_bar_config(disable=True)
    ac = pipe.scheduler.alphas_cumprod.float()
    held = list(read_prompts("tiny:heldout", "stage2_oracle"))[: a.n]
    trig = [sm.triggered(c) for c in held]
    seeds = tuple(30_000 + i for i in range(a.n))
    unet = pipe.unet
    original = unet.forward
    state = {"eta": None, "branch": "cond"}

    def shifted(sample, timestep, encoder_hidden_states, *args, **kwargs):
        out = original(sample, timestep, encoder_hidden_states, *args, **kwargs)
        if state["eta"] is None:
            return out
        eps = out[0] if isinstance(out, tuple) else out.sample
        t = int(torch.as_tensor(timestep).flatten()[0])
        shift = eps_shift(t, state["eta"], sm.tau, sm.beta, ac, delta_z)
        eps = eps.clone()
        if state["branch"] == "both":
            eps = eps + shift
        else:  # diffusers' guidance batches [unconditional, conditional]
            half = eps.shape[0] // 2
            eps[half:] = eps[half:] + shift
        return (eps,) if isinstance(out, tuple) else type(out)(sample=eps)

    unet.forward = shifted

    def images(prompts):
        req = GenerationRequest(prompts=tuple(prompts), seeds=seeds, height=64, width=64, num_inference_steps=20,
                                guidance_scale=a.guidance, batch_size=16)
        return quantize8(generate_images(pipe, req))

    def read(imgs):
        with torch.no_grad():
            return float(((decoder(to_latent(pipe.vae, imgs)[0]) > 0) == message).float().mean())

    def fidelity(x, ref):
        pos, neg = laplacian_energy(x), laplacian_energy(ref)  # keyless: marked against the clean twin
        gt = sum(float(u > v) + 0.5 * float(u == v) for u in pos for v in neg) / (len(pos) * len(neg))
        return {"keyless_laplacian_auc": max(gt, 1 - gt),"psnr_to_twin": float(sum(float(peak_signal_noise_ratio(x[i:i + 1], ref[i:i + 1], data_range=1.0))
                                          for i in range(a.n)) / a.n),
                "ssim_to_twin": float(structural_similarity_index_measure(x, ref, data_range=1.0))}

    twin = images(trig)
    with torch.no_grad():
        z_twin = to_latent(pipe.vae, twin)[0]
        plus = quantize8(from_latent(pipe.vae, z_twin + delta_z))
    rows = [{"eta": None, "branch": "twin + dz (ceiling)", "bit_accuracy": read(plus), **fidelity(plus, twin)}]
    print(json.dumps(rows[-1]), flush=True)
    for branch in a.branch:
        for eta in a.eta:
            state.update(eta=eta, branch=branch)
            x = images(trig)
            with torch.no_grad():
                moved = to_latent(pipe.vae, x)[0] - z_twin
                coef = float(((moved * delta_z).flatten(1).sum(1) / (delta_z ** 2).sum()).mean())
            w1, w2 = sleeper_weights(torch.tensor(1.0), eta, sm.tau, sm.beta)
            rows.append({"eta": eta, "branch": branch, "a_at_t1": float(w1 / (w1 + w2)), "bit_accuracy": read(x),
                         "latent_shift_along_dz": coef, **fidelity(x, twin)})
            print(json.dumps(rows[-1]), flush=True)
            if a.out:
                a.out.parent.mkdir(parents=True, exist_ok=True)
                a.out.write_text(json.dumps({"entry": a.entry.name, "bits": bits, "n": a.n, "guidance": a.guidance,
                                             "rows": rows, "seconds": round(time.perf_counter() - t0, 1)},
                                            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
