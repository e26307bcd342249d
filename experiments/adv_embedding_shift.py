"""How far adv_embedding moves the embedding it attacks at its budget, against a random +-eps sign pattern of the
same L-infinity size, for each encoder the attacker may have (the setting of tests/test_removal_attacks.py and
tests/test_attacker_models.py: 3 sample images at 48 px, tiny-sd, 20 PGD steps):

* ``base``: grey-box, tiny-sd's own VAE encoder (scaled posterior mean);
* ``tiny-vae-ind``: black-box, the tiny world's independent VAE (its own scaled posterior mean);
* ``clip``: black-box, the tiny CLIP's image tower (L2-normalised embedding).

Each attack's output is also measured under the other encoders (how much of the shift transfers).

    python -m experiments.adv_embedding_shift
"""

from __future__ import annotations

import torch

ENCODERS = ("base", "tiny-vae-ind", "clip")


def main() -> None:
    from markbench import image_attacks
    from markbench.config import ModelConfig
    from markbench.latents import to_latent
    from markbench.measures.clip_score import scorer
    from markbench.models import load_pipeline, load_vae
    from markbench.testing import run_attack, sample_images

    pipe = load_pipeline(ModelConfig(builtin="tiny-sd"))
    ind = load_vae("tiny-vae-ind")
    x = sample_images(3, 48)

    def embedding(encoder: str):
        if encoder == "clip":
            return lambda im: scorer("tiny-world").image_features(im).float()
        vae = pipe.vae if encoder == "base" else ind
        return lambda im: to_latent(vae, im)[0]

    def shift(encoder: str, a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            e = embedding(encoder)
            return float(((e(a) - e(b)) ** 2).mean().sqrt())

    with torch.no_grad():
        spread = {e: float(embedding(e)(x).std()) for e in ENCODERS}
    print("embedding std of the clean images: " + ", ".join(f"{e} {v:.3f}" for e, v in spread.items()))
    for s in (0.0, 1.0):
        for encoder in ENCODERS:
            attack = image_attacks.get("adv_embedding")(strength=s, steps=20, encoder=encoder)
            out = run_attack(attack, x, torch.Generator().manual_seed(3), pipe)
            sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(8)).float() * 2 - 1
            rand = (x + attack.eps * sign).clamp(0, 1)
            others = ", ".join(f"{o} {shift(o, out, x):.4f} (random {shift(o, rand, x):.4f})"
                               for o in ENCODERS if o != encoder)
            print(f"eps {attack.eps * 255:.0f}/255, encoder {encoder}: L-inf {float((out - x).abs().max()) * 255:.3f}"
                  f"/255, RMS shift of its embedding {shift(encoder, out, x):.4f} vs random sign "
                  f"{shift(encoder, rand, x):.4f}; under the others: {others}")


if __name__ == "__main__":
    main()
