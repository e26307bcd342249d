"""AquaLoRA: the message-scaled LoRA against hand computations (and merged == unmerged), the pieces of the method,
one step of every stage on a randomly initialised pipeline of Stable Diffusion's architecture at reduced width, and
embed -> generate -> detect on the micro pipeline (no download)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from markbench.registries import defenses
from markbench.config import ModelConfig, load_config
from markbench.errors import MissingDependencyError, UserError
from markbench.generation import generate_images
from markbench.models import load_pipeline
from markbench.plugins import GenerationRequest, MarkLocation, Secret, StageContext, Verification
from markbench.testing import Resources, check_detection, check_images, copy_pipeline
from markbench.defenses.aqualora import (DISTORTIONS, PRETRAIN, ROBUST, AquaLoRA, AquaSecretEncoder, DiagState, ImageDecoder,
                               Mapper, MessageLoRA, MessageLoRAModel, corner_shift, cosine_lr_end, distort,
                               message_loss, pick_distortion, prvl_loss, step_lr, target_modules, to_epsilon)
from tests.conftest import load_benchmark
from tests.test_sleepermark import _sd_pipeline, _sd_unet

FAST = dict(train_images=4, train_inference_steps=2, gen_batch_size=4, secret_res=0, decoder="conv",
            decoder_input_size=0, conv_channels=[8, 8], conv_hidden=16, stage1_steps=2, stage1_batch_size=2,
            perceptual_start=1, full_loss_start=1, distortion_start=1, prvl_window=8, lora_rank=4, stage2_steps=2,
            stage2_batch_size=2, robust_steps=1, robust_batch_size=2, robust_inference_steps=2,
            robust_size_factors=[1.0])

# The 12 modules of every transformer that the official key list (utils/unet_keys.json) puts a LoRA on
_PER_TRANSFORMER = ("proj_in", "proj_out") + tuple(
    f"transformer_blocks.0.{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")
) + ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2")


def _ctx(seed=0, data=None):
    return StageContext(torch.Generator().manual_seed(seed), data=data)


@pytest.fixture(scope="module")
def micro():
    return load_pipeline(ModelConfig(builtin="micro-sd"))


@pytest.fixture(scope="module")
def sd_pipe():
    return _sd_pipeline()


def _request(n=2, steps=2, size=64):
    prompts = ("a red circle on a blue background", "a small green star on a grey background")
    return GenerationRequest(prompts=tuple(prompts[i % 2] for i in range(n)), seeds=tuple(range(n)), height=size,
                             width=size, num_inference_steps=steps, guidance_scale=7.5, batch_size=n)


# ---------------------------------------------------------------------------------------------------------------
# Registration and configs
# ---------------------------------------------------------------------------------------------------------------
def test_registered_with_the_paper_defaults():
    cls = defenses.get("aqualora")
    assert cls is AquaLoRA
    assert cls.location is MarkLocation.MODEL_WEIGHTS and cls.verification is Verification.BLACK_BOX
    d = cls()
    assert (d.bits, d.lora_rank, d.secret_res, d.decoder, d.decoder_input_size) == (48, 320, 32, "efficientnet_b1",
                                                                                    512)
    assert (d.stage1_steps, d.stage1_batch_size, d.stage1_lr, d.stage1_weight_decay, d.stage1_lr_step,
            d.stage1_lr_gamma) == (80000, 5, 1e-3, 1e-4, 4000, 0.8)
    assert (d.warmup, d.warmup_scale, d.warmup_loss, d.warmup_max_steps, d.corner_prob) == (True, 0.03, 0.1, 0, 0.25)
    assert (d.perceptual_start, d.full_loss_start, d.distortion_start) == (14000, 22000, 26000)  # epochs 7, 11, 13
    assert (d.perceptual_weight_early, d.perceptual_weight, d.prvl_weight, d.prvl_window) == (1.0, 5.0, 1.5, 32)
    assert d.distortions_early == [0.6, 0.0, 0.4, 0.0, 0.0, 0.0]
    assert d.distortions == [0.4, 0.1, 0.2, 0.05, 0.1, 0.15]
    assert (d.stage2_steps, d.stage2_batch_size, d.stage2_lr, d.stage2_weight_decay, d.stage2_lr_end,
            d.stage2_grad_clip, d.adam_eps) == (25000, 12, 1e-4, 1e-2, 0.01, 1.0, 1e-8)
    assert (d.mapper_std, d.lora_scale) == (1.0, 1.03)
    assert (d.robust_steps, d.robust_batch_size, d.robust_lr, d.robust_lr_end, d.robust_inference_steps) == \
        (6250, 16, 5e-6, 0.1, 20)
    assert d.robust_size_factors == [512 / 512, 576 / 512, 640 / 512, 704 / 512, 768 / 512]
    assert d.robust_distortions == [0.6, 0.0, 0.15, 0.05, 0.1, 0.1]
    assert DISTORTIONS == ("identity", "jpeg", "crop", "blur", "noise", "jitter")


def test_configs_validate():
    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("aqualora-tiny.toml", "aqualora-sd.toml"):
        cfg = load_config(root / name, check_output=False)
        specs = [s for s in cfg.defenses if s.name == "aqualora"]
        assert specs
        for s in specs:
            s.instantiate()  # the values are accepted by the plugin itself too


@pytest.mark.parametrize("bad", [dict(distortions=[1.0, 0.0]), dict(distortions_early=[0.0] * 6),
                                 dict(robust_distortions=[-1.0, 1, 1, 1, 1, 1]), dict(conv_channels=[]),
                                 dict(robust_size_factors=[0.0])])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(UserError, match="aqualora"):
        AquaLoRA(**bad)


# ---------------------------------------------------------------------------------------------------------------
# The message-scaled LoRA layer
# ---------------------------------------------------------------------------------------------------------------
def _layers(state, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lin = nn.Linear(5, 7)
        conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        out = MessageLoRA(lin, rank, state, scale=0.7), MessageLoRA(conv, rank, state, scale=0.7)
    for layer in out:
        with torch.no_grad():
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=g))
    return out


def test_lora_starts_as_the_base_and_is_the_base_when_off():
    state = DiagState()
    torch.manual_seed(0)  # the layers draw their initial weights from the global generator
    wide = MessageLoRA(nn.Linear(600, 7), 3, state)  # 1,800 draws: the sample std is within a few per cent
    assert wide.down.weight.std().item() == pytest.approx(1 / 3, rel=0.1)  # N(0, 1/rank)
    lin = nn.Linear(5, 7)
    layer = MessageLoRA(lin, 3, state)
    assert torch.count_nonzero(layer.up.weight) == 0 and layer.down.weight.std() > 0
    x = torch.randn(2, 4, 5)
    with state.use(torch.randn(3)):
        assert torch.equal(layer(x), lin(x))  # zero up weights: exactly the base, whatever the diagonal
    lin_lora, conv_lora = _layers(state)
    assert state.diag is None  # use() restores
    assert torch.equal(lin_lora(x), lin_lora.base(x))  # diag None: LoRA off
    xc = torch.randn(2, 4, 9, 9)
    assert torch.equal(conv_lora(xc), conv_lora.base(xc))
    assert lin_lora.weight is lin_lora.base.weight and lin_lora.bias is lin_lora.base.bias


def test_lora_against_hand_computation():
    state = DiagState()
    lin, conv = _layers(state)
    g = torch.Generator().manual_seed(1)
    d = torch.randn(3, generator=g)
    x = torch.randn(2, 4, 5, generator=g)
    with state.use(d):
        got = lin(x)
    want = x @ lin.base.weight.T + lin.base.bias + 0.7 * ((x @ lin.down.weight.T) * d) @ lin.up.weight.T
    assert torch.allclose(got, want, atol=1e-5)
    xc = torch.randn(2, 4, 9, 9, generator=g)
    with state.use(d):
        got = conv(xc)
    h = F.conv2d(xc, conv.down.weight, stride=2, padding=1) * d.view(1, 3, 1, 1)
    want = conv.base(xc) + 0.7 * F.conv2d(h, conv.up.weight)
    assert got.shape == (2, 6, 5, 5) and torch.allclose(got, want, atol=1e-5)
    # one diagonal per sample == each sample with its own diagonal; a batch twice as large (classifier-free
    # guidance) reuses the diagonals in order
    per = torch.randn(2, 3, generator=g)
    with state.use(per):
        batched, doubled = conv(xc), conv(torch.cat([xc, xc]))
    for i in range(2):
        with state.use(per[i]):
            assert torch.allclose(batched[i:i + 1], conv(xc[i:i + 1]), atol=1e-5)
    assert torch.allclose(doubled, torch.cat([batched, batched]), atol=1e-5)
    with state.use(per):
        lin_batched = lin(x)
    with state.use(per[1]):
        assert torch.allclose(lin_batched[1:], lin(x[1:]), atol=1e-5)


def test_merged_lora_gives_the_unmerged_outputs():
    state = DiagState()
    lin, conv = _layers(state)
    d = torch.randn(3, generator=torch.Generator().manual_seed(2))
    x, xc = torch.randn(3, 5), torch.randn(2, 4, 9, 9)
    with state.use(d):
        want_lin, want_conv = lin(x), conv(xc)
    merged_lin = nn.Linear(5, 7)
    merged_lin.load_state_dict({"weight": lin.base.weight + lin.delta_weight(d), "bias": lin.base.bias})
    assert torch.allclose(merged_lin(x), want_lin, atol=1e-5)
    w = conv.base.weight + conv.delta_weight(d)
    assert w.shape == conv.base.weight.shape
    assert torch.allclose(F.conv2d(xc, w, conv.base.bias, stride=2, padding=1), want_conv, atol=1e-5)
    # hand form of the linear delta: scale * up diag(d) down
    assert torch.allclose(lin.delta_weight(d), 0.7 * lin.up.weight @ torch.diag(d) @ lin.down.weight, atol=1e-6)


def test_merged_unet_equals_the_lora_unet_for_the_baked_message():
    unet = _sd_unet().eval().requires_grad_(False)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        ref = unet(x, t, c).sample
    lora = MessageLoRAModel(unet, rank=4, scale=1.0)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        assert torch.equal(unet(x, t, c).sample, ref)  # LoRA off = the frozen base
        diag = Mapper(48, 4)(torch.randint(0, 2, (1, 48), generator=g))[0] * 1.03
        with lora.state.use(diag):
            want = unet(x, t, c).sample
    assert (want - ref).abs().max() > 1e-3  # the LoRA does something
    lora.merge(diag)
    assert not any(isinstance(m, MessageLoRA) for m in unet.modules())
    state = unet.state_dict()
    assert set(state) == set(base_state)  # a plain UNet again, same keys
    changed = {k for k in state if not torch.equal(state[k], base_state[k])}
    assert changed == {f"{n}.weight" for n in target_modules(unet)}
    with torch.no_grad():
        assert torch.allclose(unet(x, t, c).sample, want, atol=1e-4)


def test_mapper_against_hand_computation():
    mapper = Mapper(6, 10, std=2.0)
    e = mapper.embedding.detach()
    assert torch.allclose(e.std(dim=1), torch.full((6,), 2.0), atol=1e-5)
    gram = e @ e.T
    assert torch.allclose(gram - torch.diag(torch.diag(gram)), torch.zeros(6, 6), atol=1e-4)  # orthogonal rows
    m = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    s = mapper(m)
    assert torch.allclose(s[0], (e[0] + e[2] + e[3]) / math.sqrt(6) + 1, atol=1e-6)
    assert torch.equal(s[1], torch.ones(10))  # the zero message gives the identity diagonal


# ---------------------------------------------------------------------------------------------------------------
# The target modules, by the UNet's own module names
# ---------------------------------------------------------------------------------------------------------------
def test_target_modules_on_sd_architecture():
    unet = _sd_unet()
    names = target_modules(unet)
    blocks = [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)] + \
        ["mid_block.attentions.0"] + [f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in range(3)]
    assert set(names) == {f"{b}.{m}" for b in blocks for m in _PER_TRANSFORMER}
    assert len(names) == 192  # the official key list: 16 transformers x 12 modules
    mods = dict(unet.named_modules())
    assert all(isinstance(mods[n], (nn.Linear, nn.Conv2d)) for n in names)
    assert not any("norm" in n or "resnets" in n or "time_emb" in n for n in names)


def test_target_modules_on_micro_pipeline(micro):
    names = target_modules(micro.unet)
    blocks = ["down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0",
              "up_blocks.1.attentions.1"]
    assert set(names) == {f"{b}.{m}" for b in blocks for m in _PER_TRANSFORMER}


# ---------------------------------------------------------------------------------------------------------------
# Stage-1 pieces
# ---------------------------------------------------------------------------------------------------------------
def test_networks_have_the_paper_shapes():
    enc = AquaSecretEncoder(48, 4, (64, 64), 32)
    linears = [m for m in enc.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 1024)]  # one linear layer (official)
    assert isinstance(enc.mlp[-1], nn.SiLU)
    assert torch.count_nonzero(enc(torch.ones(2, 48))) == 0 and enc(torch.ones(2, 48)).shape == (2, 4, 64, 64)
    dec = ImageDecoder(48)  # EfficientNet-B1, random weights, 96 = 48 x 2 logits
    assert dec.input_size == 512 and dec.net.classifier[1].in_features == 1280
    assert dec.net.classifier[1].out_features == 96
    assert 6.5e6 < sum(p.numel() for p in dec.parameters()) < 6.7e6  # the B1 backbone (6.5 M) + a 96-way head
    dec.input_size = 64  # (a small forward: the shape logic, not 512 px on a CPU)
    with torch.no_grad():
        assert dec.eval()(torch.rand(2, 3, 40, 40)).shape == (2, 48, 2)
    conv = ImageDecoder(16, "conv", 32, (8, 16), 32, 1)
    assert conv(torch.rand(3, 3, 48, 48)).shape == (3, 16, 2)  # resized to 32 first
    with pytest.raises(UserError, match="input size"):
        ImageDecoder(16, "conv", 0)


def test_message_loss_and_bit_logits():
    logits = torch.tensor([[[0.0, 3.0], [2.0, -1.0]]])
    m = torch.tensor([[1, 0]])
    want = F.binary_cross_entropy_with_logits(logits, torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]))
    assert message_loss(logits, m).item() == pytest.approx(want.item())
    dec = ImageDecoder(2, "conv", 8, (4,), 8, 1)
    x = torch.rand(1, 3, 8, 8)
    out = dec(x)
    assert torch.allclose(dec.bit_logits(x), out[..., 1] - out[..., 0])


def test_prvl_against_hand_computation():
    clean = torch.zeros(1, 3, 32, 32)
    patch = clean.clone()
    patch[0, 0, 4:12, 10:18] = 1.0  # an 8 x 8 patch in one channel: channel mean 1/3 over a full window
    assert prvl_loss(clean, patch, 8).item() == pytest.approx(1 / 3, rel=1e-6)
    pixel = clean.clone()
    pixel[0, :, 20, 20] = 0.5  # one pixel in every channel: 0.5 / 64 per window
    assert prvl_loss(clean, pixel, 8).item() == pytest.approx(0.5 / 64, rel=1e-6)
    batch = torch.cat([pixel, patch])
    assert prvl_loss(torch.cat([clean, clean]), batch, 8).item() == pytest.approx(1 / 3, rel=1e-6)  # batch max


def test_corner_shift():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    assert torch.equal(corner_shift(delta, 1.0, 1.0), delta)
    out = corner_shift(delta, 2.0, 2.0)
    # canvas 8 x 8 with the 2 x 2 quadrants in its corners; halving averages 2 x 2 cells
    assert torch.allclose(out[..., 0, 0], delta[..., :2, :2].mean((-2, -1)), atol=1e-6)
    assert torch.allclose(out[..., 3, 3], delta[..., 2:, 2:].mean((-2, -1)), atol=1e-6)
    assert torch.count_nonzero(out[..., 1:3, :]) == 0 and torch.count_nonzero(out[..., :, 1:3]) == 0
    out.sum().backward()
    assert delta.grad is not None and torch.count_nonzero(delta.grad) > 0


@pytest.mark.parametrize("kind", DISTORTIONS)
@pytest.mark.parametrize("spec", [PRETRAIN, ROBUST], ids=["pretrain", "robust"])
def test_distortions_keep_the_size_are_seeded_and_differentiable(kind, spec):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    a = distort(x, kind, spec, torch.Generator().manual_seed(1))
    b = distort(x, kind, spec, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.isfinite(a).all() and torch.equal(a, b)
    if kind == "identity":
        assert a is x
    else:
        assert not torch.equal(a, x)
        a.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_distortion_strengths():
    flat = torch.full((1, 3, 32, 32), 0.25)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # crop-and-resize and blur keep a flat image flat
        assert torch.allclose(distort(flat, "crop", PRETRAIN, g), flat, atol=1e-6)
        assert torch.allclose(distort(flat, "blur", PRETRAIN, g), flat, atol=1e-5)
    big = torch.full((1, 3, 128, 128), 0.5)
    stds = [float((distort(big, "noise", PRETRAIN, g) - big).std()) for _ in range(20)]
    assert max(stds) <= 0.1 + 5e-3 and min(stds) < 0.1  # per-batch std drawn from U(0, 0.1)
    assert float((distort(big, "noise", ROBUST, g) - big).std()) == pytest.approx(0.1, rel=0.05)
    counts = {k: 0 for k in DISTORTIONS}
    for _ in range(400):
        counts[pick_distortion([0.6, 0.0, 0.4, 0.0, 0.0, 0.0], g)] += 1
    assert counts["jpeg"] == counts["blur"] == counts["noise"] == counts["jitter"] == 0
    assert 0.5 < counts["identity"] / 400 < 0.7


def test_schedules_and_v_prediction():
    assert [step_lr(s, 4000, 0.8) for s in (0, 3999, 4000, 8000)] == [1.0, 1.0, 0.8, pytest.approx(0.64)]
    assert cosine_lr_end(0, 100, 0.01) == 1.0
    assert cosine_lr_end(50, 100, 0.01) == pytest.approx(0.5)
    assert cosine_lr_end(100, 100, 0.01) == 0.01 and cosine_lr_end(99, 100, 0.1) == 0.1
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.1]).view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    assert torch.allclose(to_epsilon(v, x_t, abar, "v_prediction"), eps, atol=1e-5)
    assert to_epsilon(eps, x_t, abar, "epsilon") is eps
    with pytest.raises(UserError, match="prediction_type"):
        to_epsilon(eps, x_t, abar, "sample")


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
class _LinearVAE(nn.Module):
    """A stand-in VAE decoder for a fast learning test: a fixed random 1x1 convolution from the latent to RGB,
    nearest-upsampled x8 (the micro VAE's forward and backward cost 0.2 s per batch of 8 on one thread)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.proj = nn.Conv2d(4, 3, 1)
        self.config = SimpleNamespace(scaling_factor=0.5, block_out_channels=(8, 8, 8, 8))
        self.requires_grad_(False)

    @property
    def dtype(self):
        return torch.float32

    def decode(self, z):
        return SimpleNamespace(sample=F.interpolate(self.proj(z), scale_factor=8, mode="nearest"))


def test_stage1_learns_a_short_message_on_random_latents():
    """Random 4 x 8 x 8 latents through a (linear) image decoder: 8 bits are read back after 200 steps."""
    d = AquaLoRA(secret_res=0, decoder="conv", decoder_input_size=0, conv_channels=[8, 8], conv_hidden=64,
                 stage1_steps=200, stage1_batch_size=16, stage1_lr=3e-3, warmup=False, corner_prob=0.0,
                 perceptual="none", perceptual_start=10**6, full_loss_start=10**6, distortions_early=[1, 0, 0, 0, 0, 0])
    vae = _LinearVAE()
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(64, 4, 8, 8, generator=g), torch.zeros(64, 4, 8, 8)
    enc, dec, stats = d.train_stage1(vae, mean, std, 8, _ctx(), torch.Generator().manual_seed(1), 64)
    assert stats["stage1_warmup_end_step"] == 0
    m = torch.randint(0, 2, (256, 8), generator=g)
    z = torch.randn(256, 4, 8, 8, generator=g)
    with torch.no_grad():
        images = vae.decode((z + 0.5 * enc(m.float())) / 0.5).sample / 2 + 0.5
        acc = ((dec.bit_logits(images) > 0) == (m > 0)).float().mean().item()
        chance = ((dec.bit_logits(vae.decode(z / 0.5).sample / 2 + 0.5) > 0) == (m > 0)).float().mean().item()
    assert acc > 0.9, acc
    assert abs(chance - 0.5) < 0.1, chance  # without the residual the decoder reads nothing


def test_mse_image_term_shrinks_the_stage1_residual():
    """``perceptual = "mse"`` (the non-saturating image term) is applied: with a large weight the learnt residual
    ends far smaller than with no image term, from the same draws."""
    common = dict(secret_res=0, decoder="conv", decoder_input_size=0, conv_channels=[8, 8], conv_hidden=16,
                  stage1_steps=40, stage1_batch_size=8, stage1_lr=3e-3, warmup=False, corner_prob=0.0,
                  perceptual_start=0, full_loss_start=0, prvl_weight=0.0, distortions_early=[1, 0, 0, 0, 0, 0],
                  distortions=[1, 0, 0, 0, 0, 0])
    vae = _LinearVAE()
    mean = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    std = torch.zeros_like(mean)
    m = torch.randint(0, 2, (32, 8), generator=torch.Generator().manual_seed(2)).float()

    def residual(**kw):
        enc, _, _ = AquaLoRA(**common, **kw).train_stage1(vae, mean, std, 8, _ctx(), torch.Generator().manual_seed(1),
                                                          64)
        with torch.no_grad():
            return float(enc(m).pow(2).mean().sqrt())

    free = residual(perceptual="none")
    held = residual(perceptual="mse", perceptual_weight=1e4)
    assert held < 0.5 * free, (held, free)


def test_warmup_ends_by_loss_or_by_cap(micro):
    common = dict(FAST, stage1_steps=4, perceptual_start=100, full_loss_start=100, distortion_start=100)
    mean, std = torch.randn(4, 4, 8, 8), torch.zeros(4, 4, 8, 8)
    _, _, stats = AquaLoRA(**common, warmup_max_steps=3).train_stage1(
        micro.vae, mean, std, 8, _ctx(), torch.Generator().manual_seed(0), 64)
    assert stats["stage1_warmup_end_step"] == 3
    _, _, stats = AquaLoRA(**common).train_stage1(micro.vae, mean, std, 8, _ctx(), torch.Generator().manual_seed(0),
                                                  64)
    assert stats["stage1_warmup_end_step"] == -1  # 4 steps: not yet 10 losses, still warming up (as official)


def test_stage1_probe_reports_the_residuals_visibility_and_size(micro):
    """No residual: PSNR at the 100 dB floor, size 0; a residual the size of the latents: a finite PSNR, size 1."""
    from markbench.latents import from_latent as _from_latent
    from markbench.noise import quantize8

    dec = ImageDecoder(8, "conv", 64, (8, 16), 32, 1).eval()
    mean = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    message = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    sf = float(micro.vae.config.scaling_factor)
    d = AquaLoRA(**FAST)
    zero = d._stage1_probe(micro.vae, lambda m: torch.zeros(1, 4, 8, 8), dec, mean, message)
    assert zero["stage1_residual_psnr"] == pytest.approx(100.0) and zero["stage1_residual_rms"] == 0.0
    assert zero["stage1_bit_accuracy_mstar"] == zero["stage1_bit_accuracy_clean"]
    same = d._stage1_probe(micro.vae, lambda m: mean[:1] / sf, dec, mean, message)
    assert same["stage1_residual_rms"] == pytest.approx(float(mean[0].pow(2).mean().sqrt() / mean.pow(2).mean().sqrt()),
                                                        rel=1e-5)
    with torch.no_grad():
        a = quantize8(_from_latent(micro.vae, mean + mean[:1]).float())
        b = quantize8(_from_latent(micro.vae, mean).float())
    want = (-10 * torch.log10((a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10))).mean()
    assert same["stage1_residual_psnr"] == pytest.approx(float(want), rel=1e-5)


def test_ppft_loss_is_zero_without_watermark_and_positive_with_it(micro):
    unet = copy_pipeline(micro).unet.eval().requires_grad_(False)
    lora = MessageLoRAModel(unet, rank=2)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, cond = torch.tensor([5, 700]), torch.randn(2, 6, 32, generator=g)
    acp = micro.scheduler.alphas_cumprod.float()
    diag = torch.ones(2, 2)
    d = AquaLoRA(**FAST)
    assert d.ppft_loss(unet, lora, z0, torch.zeros_like(z0), diag, noise, t, cond, acp).item() == 0.0
    delta = 0.5 * torch.randn(1, 4, 8, 8, generator=g)
    loss = d.ppft_loss(unet, lora, z0, delta, diag, noise, t, cond, acp)
    assert loss.item() > 0
    loss.backward()
    assert all(layer.up.weight.grad is not None for layer in lora.layers.values())


def test_lpips_fails_clearly_when_missing(micro):
    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("lpips is installed here")
    with pytest.raises(MissingDependencyError, match="aqualora.*lpips"):
        AquaLoRA(**FAST, perceptual="lpips").train_stage1(micro.vae, torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8),
                                                         8, _ctx(), torch.Generator().manual_seed(0), 64)


def test_one_step_of_each_stage_on_sd_architecture(sd_pipe):
    d = AquaLoRA(**{**FAST, "stage1_steps": 1, "stage2_steps": 1, "robust_steps": 1, "stage2_lr": 1e-3})
    base = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    vae_base = {k: v.clone() for k, v in sd_pipe.vae.state_dict().items()}
    pipe = copy_pipeline(sd_pipe)
    ctx = _ctx()
    emb = d.embed(pipe, ctx)
    assert emb.pipeline is pipe
    assert (ctx.costs["stage1_steps"], ctx.costs["stage2_steps"], ctx.costs["robust_steps"]) == (1, 1, 1)
    assert ctx.costs["lora_modules"] == 192
    # trainable: down (rank x in) + up (out x rank) per module (x kernel area for convolutions) + the mapper
    mods = dict(sd_pipe.unet.named_modules())
    want = 48 * 4
    for n in target_modules(sd_pipe.unet):
        w = mods[n].weight
        want += 4 * w[0].numel() + 4 * w.shape[0]
    assert ctx.costs["trainable_params"] == want
    assert not any(isinstance(m, MessageLoRA) for m in pipe.unet.modules())  # merged and unwrapped
    state = pipe.unet.state_dict()
    changed = {k for k in state if not torch.equal(state[k], base[k])}
    targets = {f"{n}.weight" for n in target_modules(pipe.unet)}
    assert changed <= targets  # only the weights that carry a LoRA moved (their biases did not)
    # all of them, except where the gradient vanishes: at this latent size the mid block's self-attention sees one
    # token, whose softmax is 1 whatever the query and key
    assert targets - changed <= {f"mid_block.attentions.0.transformer_blocks.0.attn1.{m}.weight" for m in ("to_q",
                                                                                                           "to_k")}
    assert all(torch.equal(v, vae_base[k]) for k, v in pipe.vae.state_dict().items())
    assert all(not p.requires_grad for p in pipe.unet.parameters())
    s = emb.secret
    assert s.tensors["message"].dtype == torch.bool and s.tensors["message"].numel() == 48
    assert s.tensors["lora_diag"].shape == (4,)
    assert s.meta["latent_shape"] == [4, 8, 8] and s.meta["resolution"] == 64 and s.meta["decoder"] == "conv"
    assert {"stage1_bit_accuracy_mstar", "stage1_residual_psnr", "stage1_residual_rms", "stage2_loss",
            "robust_train_bit_accuracy"} <= set(s.meta)
    json.dumps(s.meta)
    images = d.generate(pipe, s, _request(), _ctx(1))
    det = check_detection(d.detect(s, check_images(images, "aqualora", (2, 3, 64, 64)), _ctx(2)), "aq", 2,
                          d.detection, 48)
    assert det.bits.shape == (2, 48)


# ---------------------------------------------------------------------------------------------------------------
# End to end on the micro pipeline
# ---------------------------------------------------------------------------------------------------------------
def test_end_to_end_on_micro_pipeline(micro):
    d = AquaLoRA(**FAST)
    emb = d.embed(copy_pipeline(micro), _ctx())
    images = check_images(d.generate(emb.pipeline, emb.secret, _request(), _ctx(1)), "aqualora", (2, 3, 64, 64))
    det = check_detection(d.detect(emb.secret, images, _ctx(2)), "aqualora", 2, d.detection, 48)
    assert det.bits.dtype == torch.bool and det.bits.shape == (2, 48)
    assert torch.equal(det.bits, d.detect(emb.secret, images, _ctx(3)).bits)  # deterministic
    logits = d.logits(emb.secret, images)
    assert logits.shape == (2, 48) and torch.equal(logits > 0, det.bits)
    # the verifier rebuilt from the stored secret alone (a fresh instance) reads the same bits
    stored = Secret({k: v.clone() for k, v in emb.secret.tensors.items()}, json.loads(json.dumps(emb.secret.meta)))
    assert torch.equal(AquaLoRA(**FAST).detect(stored, images, _ctx()).bits, det.bits)
    assert AquaLoRA(**FAST).detect(stored, torch.rand(3, 3, 48, 48), _ctx()).bits.shape == (3, 48)  # any size
    # same stage generator -> same secret and weights; another -> another message
    again = d.embed(copy_pipeline(micro), _ctx())
    assert torch.equal(again.secret.tensors["message"], emb.secret.tensors["message"])
    assert all(torch.equal(again.secret.tensors[k], v) for k, v in emb.secret.tensors.items())
    assert all(torch.equal(a, b) for a, b in zip(again.pipeline.unet.parameters(), emb.pipeline.unet.parameters()))
    other = d.embed(copy_pipeline(micro), _ctx(5))
    assert not torch.equal(other.secret.tensors["message"], emb.secret.tensors["message"])


def test_without_ppft_the_merged_model_is_the_base(micro):
    """Zero PPFT steps leave the LoRA's up weights at zero: merging is then an exact no-op."""
    d = AquaLoRA(**{**FAST, "stage2_steps": 0, "robust_steps": 0})
    emb = d.embed(copy_pipeline(micro), _ctx())
    base = micro.unet.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in emb.pipeline.unet.state_dict().items())
    assert torch.equal(d.generate(emb.pipeline, emb.secret, _request(), _ctx(1)), generate_images(micro, _request()))


def test_dataset_source_uses_the_dataset_captions(micro):
    d = AquaLoRA(**{**FAST, "train_source": "dataset", "dataset": "tiny:train"})
    data = Resources(lambda: micro, 64, 64)
    captions, mean, std = d.training_pool(micro, _ctx(data=data), torch.Generator().manual_seed(0), 64)
    _, want = data.dataset("tiny:train", 4)
    assert captions == want and mean.shape == std.shape == (4, 4, 8, 8)
    with pytest.raises(UserError, match="ctx.data"):
        d.training_pool(micro, _ctx(), torch.Generator().manual_seed(0), 64)


def test_float16_pipeline_is_refused(micro):
    pipe = copy_pipeline(micro)
    pipe.unet.to(torch.bfloat16)
    with pytest.raises(UserError, match="float32"):
        AquaLoRA(**FAST).embed(pipe, _ctx())


def test_ppft_probe_linear_code_is_read_back_by_least_squares():
    """The probe's code: delta(m) is sum_i (2 m_i - 1) P_i scaled, so least squares on the P_i recovers every bit."""
    probe = load_benchmark("aqualora_ppft_bits", "experiments")
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(6, 4, 8, 8, generator=g)
    code = probe.LinearCode(patterns, 2.0, 0.5)
    m = torch.randint(0, 2, (5, 6), generator=g).float()
    d = code.delta(m)
    assert torch.allclose(code(m), d / 0.5)
    assert torch.allclose(code.coefficients(d.flatten(1)), 2.0 * (2 * m - 1) / math.sqrt(6), atol=1e-4)


def test_ppft_probe_without_training_moves_nothing():
    """Zero PPFT steps leave the LoRA's up-projection at zero: the LoRA model samples exactly the base's latents, so
    nothing is carried and the shift is exactly zero (the probe's plumbing, end to end on the micro pipeline)."""
    probe = load_benchmark("aqualora_ppft_bits", "experiments")
    out = probe.main(["--model", "micro-sd", "--bits", "4", "--rank", "4", "--steps", "0",
                      "--train-images", "4", "--eval-captions", "2", "--messages", "2"])
    assert out["carried"] == 0.0 and out["shift/delta"] == 0.0
