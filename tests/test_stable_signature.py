"""Stable Signature (defenses/stable_signature.py): whitening, the perceptual term, the VAE-decoder fine-tuning on the
micro pipeline (only the decoder changes, its images carry the key), detection, the secret, and the known attack."""

from __future__ import annotations

import json

import pytest
import torch

from markbench import Secret
from markbench.config import ModelConfig
from markbench.generation import generate_images
from markbench.models import diff_pipeline, load_pipeline
from markbench.plugins import GenerationRequest, StageContext
from markbench.prompts import BUILTIN_PROMPTS
from markbench.testing import Resources, copy_pipeline, quantize
from markbench.defenses import hidden as H
from markbench.defenses import stable_signature as S

from .conftest import load_benchmark

PROMPTS = list(BUILTIN_PROMPTS["micro"])

# Tiny settings: a briefly trained extractor, a short fine-tune on the pipeline's own images (see the config).
TINY = dict(
    bits=16, train_source="generated", gen_inference_steps=4, extractor_image_size=32, extractor_train_images=256,
    extractor_steps=800, extractor_batch_size=32, extractor_optimizer="adam", extractor_lr=1e-3, extractor_warmup=0,
    extractor_encoder_blocks=2, extractor_encoder_channels=16, extractor_decoder_blocks=3,
    extractor_decoder_channels=16, whiten_images=256, image_size=0, steps=150, batch_size=4, lr=5e-4, warmup=20,
    loss_temperature=1.0, perceptual="ssim", perceptual_weight=0.2,
)


def _ctx(seed, pipe):
    return StageContext(torch.Generator().manual_seed(seed), data=Resources(lambda: pipe, 64, 64, lambda: PROMPTS))


def _bit_acc(bits, key):
    return float((bits == key[None]).float().mean())


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(ModelConfig(builtin="micro-sd"))


@pytest.fixture(scope="module")
def request_():
    return GenerationRequest(prompts=tuple(PROMPTS[:12]), seeds=tuple(range(1000, 1012)), height=64, width=64,
                             num_inference_steps=4, guidance_scale=7.5, batch_size=12)


@pytest.fixture(scope="module")
def embedded(pipe):
    d = S.StableSignature(**TINY)
    state = torch.random.get_rng_state()
    emb = d.embed(copy_pipeline(pipe), _ctx(0, pipe))
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing global drawn or seeded
    return d, emb


@pytest.fixture(scope="module")
def images(pipe, embedded, request_):
    _, emb = embedded
    return quantize(generate_images(emb.pipeline, request_)), quantize(generate_images(pipe, request_))


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------
def test_whitening_decorrelates_the_extractor_outputs_on_the_training_set():
    # textured covers: an untrained decoder's outputs on the tiny world's flat images are nearly rank-deficient
    x = torch.rand((300, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    dec = H.seeded(torch.Generator().manual_seed(0), lambda: H.HiddenDecoder(12, 2, 32, "gelu")).eval()
    y = S.extractor_outputs(dec, x)
    assert (torch.cov(y.T, correction=0) - torch.eye(12)).abs().max() > 0.1  # not white to begin with
    ext = S.Extractor(dec).eval()
    w, b = S.whitening(y)
    with torch.no_grad():
        ext.whiten.weight.copy_(w)
        ext.whiten.bias.copy_(b)
    z = S.extractor_outputs(ext, x)
    assert z.mean(0).abs().max() < 1e-3
    assert (torch.cov(z.T, correction=0) - torch.eye(12)).abs().max() < 1e-2


def test_watson_dct_distance():
    from markbench.data import load_image_captions

    x, _ = load_image_captions("tiny:heldout", 4, 64, 64)
    g = torch.Generator().manual_seed(0)
    small = (x + torch.randn(x.shape, generator=g) / 255).clamp(0, 1)
    large = (x + 8 * torch.randn(x.shape, generator=g) / 255).clamp(0, 1)
    d0, d1, d2 = (float(S.watson_dct(y, x)) for y in (x, small, large))
    assert d0 < 0.1 < d1 < d2
    y = x.clone().requires_grad_(True)
    S.watson_dct(y, x).backward()  # differentiable at equality (the first fine-tuning step)
    assert torch.isfinite(y.grad).all()


def test_paper_defaults():
    d = S.StableSignature()
    assert (d.bits, d.steps, d.lr, d.batch_size, d.perceptual_weight, d.loss_temperature) == \
        (48, 100, 5e-4, 4, 0.2, 10.0)
    cfg = d.extractor_config()
    assert (cfg.decoder_blocks, cfg.decoder_channels, cfg.activation, cfg.message_loss) == (8, 64, "gelu", "bce")
    assert cfg.noise.jpeg_mode == "ste" and cfg.noise.jpeg_quality == (50, 80)


def test_extractor_file_round_trip(tmp_path):
    cfg = H.HiddenConfig(bits=6, decoder_blocks=1, decoder_channels=4)
    dec = H.seeded(torch.Generator().manual_seed(0), cfg.build_decoder).eval()
    S.save_extractor(tmp_path / "e.safetensors", dec, cfg)
    back, cfg2 = S.load_extractor(tmp_path / "e.safetensors")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert cfg2.arch() == cfg.arch() and torch.equal(back(x), dec(x))


# ---------------------------------------------------------------------------------------------------------------
# The defence on the micro pipeline
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_only_the_vae_decoder_changes(pipe, embedded):
    _, emb = embedded
    changed = diff_pipeline(pipe, emb.pipeline)
    assert changed
    assert all(k.startswith(("vae.decoder.", "vae.post_quant_conv.")) for k in changed), sorted(changed)[:5]


@pytest.mark.slow
def test_generated_images_carry_the_key(embedded, images):
    d, emb = embedded
    marked, clean = images
    key = d.message(emb.secret)
    acc_marked = _bit_acc(d.detect(emb.secret, marked, None).bits, key)
    acc_clean = _bit_acc(d.detect(emb.secret, clean, None).bits, key)
    assert acc_marked > 0.7, (acc_marked, acc_clean)
    assert acc_marked > acc_clean + 0.15, (acc_marked, acc_clean)


@pytest.mark.slow
def test_detection_is_deterministic_and_the_secret_round_trips(tmp_path, embedded, images):
    from safetensors.torch import load_file, save_file

    d, emb = embedded
    marked, _ = images
    bits = d.detect(emb.secret, marked, None).bits
    assert bits.dtype == torch.bool and bits.shape == (marked.shape[0], 16)
    assert torch.equal(bits, d.detect(emb.secret, marked, None).bits)
    save_file(emb.secret.tensors, str(tmp_path / "secret.safetensors"))
    back = Secret(load_file(str(tmp_path / "secret.safetensors")), json.loads(json.dumps(emb.secret.meta)))
    fresh = S.StableSignature(**TINY)
    assert torch.equal(fresh.detect(back, marked, None).bits, bits)
    assert torch.equal(fresh.logits(back, marked), d.logits(emb.secret, marked))


@pytest.mark.slow
def test_vae_decoder_finetuning_attack_lowers_the_bit_accuracy(pipe, embedded, images, request_):
    """The reported weakness (Fernandez et al., Sec. 6): fine-tuning the decoder on clean images removes the mark.
    Numbers measured on the micro pipeline are in docs/stable_signature.md."""
    from markbench.attacks.model.vae_decoder import VAEDecoderFineTune

    d, emb = embedded
    key = d.message(emb.secret)
    before = _bit_acc(d.detect(emb.secret, images[0], None).bits, key)
    attacked = VAEDecoderFineTune(steps=100, num_images=32).apply(copy_pipeline(emb.pipeline), _ctx(7, pipe))
    after = _bit_acc(d.detect(emb.secret, quantize(generate_images(attacked, request_)), None).bits, key)
    assert after < before - 0.1, (before, after)


def test_image_terms_share_the_training_module():
    """Stable Signature's image term extends the shared one (bench.training.PerceptualLoss) with Watson-DCT."""
    import torch.nn.functional as F

    from markbench.training import PerceptualLoss
    from markbench.defenses.stable_signature import Perceptual, watson_dct

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(Perceptual("mse")(a, b), F.mse_loss(a, b))
    assert torch.allclose(Perceptual("ssim")(a, b), PerceptualLoss("ssim")(b, a))
    assert float(Perceptual("none")(a, b)) == 0.0
    assert torch.equal(Perceptual("watson_dct")(a, b), watson_dct(a, b))
    assert float(Perceptual("watson_dct")(a, a)) < float(Perceptual("watson_dct")(a, b))


def test_extractor_script_writes_an_extractor_the_defence_loads(tmp_path):
    """experiments/stable_signature_extractor.py (the GPU-scale extractor training): a few steps on the micro model's
    covers; the file it writes is what ``extractor_path`` reads, with the requested shape; a time budget turns into a
    step count."""
    script = load_benchmark("stable_signature_extractor", "experiments")
    out = tmp_path / "ext.safetensors"
    common = ["--model", "micro-sd", "--bits", "8", "--covers", "8", "--held-out", "4", "--image-size", "16",
              "--batch", "4", "--optimizer", "adam", "--encoder", "1x4", "--decoder", "2x4",
              "--cover-cache", str(tmp_path / "covers.pt")]
    res = script.main(common + ["--steps", "3", "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert res["steps"] == 3 and res["samples"] == 12 and 0.0 <= res["heldout_bit_accuracy"] <= 1.0
    assert json.loads((tmp_path / "r.json").read_text()) == res
    decoder, cfg = S.load_extractor(out)
    assert decoder.bits == 8 and cfg.decoder_blocks == 2 and cfg.decoder_channels == 4
    assert (tmp_path / "covers.pt").exists()  # the second run reads the covers back
    timed = script.main(common + ["--steps", "0", "--seconds", "0.5"])
    assert abs(timed["steps"] - timed["calibrated_rate"] * 0.5) <= 1  # the budget over the timed rate
    with pytest.raises(SystemExit):
        script.main(common + ["--encoder", "four"])
