"""SleeperMark: the pieces of the method against hand computations, its plumbing on the micro pipeline and on a
randomly initialised pipeline of Stable Diffusion's architecture at reduced width (no download)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

from markbench.registries import defenses
from markbench.config import ModelConfig, load_config
from markbench.errors import MissingDependencyError, UserError
from markbench.models import load_pipeline
from markbench.plugins import GenerationRequest, MarkLocation, StageContext, Verification
from markbench.testing import check_detection, check_images, copy_pipeline
from markbench.latents import from_latent as _from_latent
from markbench.latents import to_latent as _to_latent
from markbench.defenses.sleepermark import (TRIGGER, LatentDecoder, SecretEncoder, SleeperMark, _roundtrip, load_prompts,
                                  ramp, sleeper_weights, trainable_parameter_names,
                                  watermark_target)

FAST = dict(train_images=4, train_inference_steps=2, gen_batch_size=4, secret_res=0, decoder_channels=[8, 8],
            decoder_hidden=32, decoder_mlp_layers=1, stage1_steps=2, stage1_batch_size=2, image_loss_ramp=1,
            perceptual_ramp=1, stage2_steps=2, stage2_batch_size=2)

# The UNet modules SleeperMark fine-tunes in SD 1.x (the official list: up blocks 1-3, attentions 0-2, 12 modules each)
_SD_MODULES = ("proj_in", "proj_out") + tuple(
    f"transformer_blocks.0.{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")
) + ("transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2")


def _ctx(seed=0, variant=""):
    return StageContext(torch.Generator().manual_seed(seed), variant=variant)


def _sd_unet():
    """UNet2DConditionModel with SD 1.x's block layout at reduced width."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
    )


def _sd_pipeline():
    """A full StableDiffusionPipeline of SD 1.x's architecture at reduced width, random weights, built from configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from markbench.models import clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                            latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=64)
        unet = _sd_unet()
        text = CLIPTextModel(CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                            hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                            num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is as fast, and spares a shared CPU the oversubscription (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro():
    return load_pipeline(ModelConfig(builtin="micro-sd"))


@pytest.fixture(scope="module")
def sd_pipe():
    return _sd_pipeline()


def _request(n=2, steps=2, prompts=("a red circle on a blue background", "a small green star on a grey background")):
    return GenerationRequest(prompts=tuple(prompts[i % len(prompts)] for i in range(n)), seeds=tuple(range(n)),
                             height=64, width=64, num_inference_steps=steps, guidance_scale=7.5, batch_size=n)


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------
def test_registered_with_the_paper_defaults():
    cls = defenses.get("sleepermark")
    assert cls is SleeperMark
    assert cls.location is MarkLocation.MODEL_WEIGHTS and cls.verification is Verification.BLACK_BOX
    assert cls.variants == ("", "no_trigger")
    d = cls()
    assert d.trigger == TRIGGER == "*[Z]& "
    assert (d.bits, d.secret_res, d.decoder_channels, d.decoder_hidden, d.decoder_mlp_layers) == \
        (48, 32, [64, 128, 256, 512], 2048, 3)
    assert (d.stage1_steps, d.stage1_lr, d.stage1_weight_decay, d.stage1_grad_clip) == (10000, 1e-4, 0.01, 1e-2)
    assert (d.image_loss_weight, d.image_loss_ramp, d.perceptual_weight, d.perceptual_ramp) == (30, 2000, 0.25, 4000)
    assert (d.stage2_steps, d.stage2_batch_size, d.stage2_lr, d.stage2_weight_decay, d.stage2_grad_clip) == \
        (20000, 10, 1e-4, 1e-2, 1e-5)
    assert (d.eta, d.tau, d.beta, d.adam_eps) == (0.02, 250, 100, 1e-8)


def test_configs_validate():
    for name in ("sleepermark-tiny.toml", "sleepermark-sd.toml"):
        cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / name, check_output=False)
        assert any(s.name == "sleepermark" for s in cfg.defenses)


# ---------------------------------------------------------------------------------------------------------------
# The trainable parameter set, by the UNet's own module names
# ---------------------------------------------------------------------------------------------------------------
def _modules(names):
    return {n.rsplit(".", 1)[0] for n in names}


def test_trainable_set_on_sd_architecture():
    unet = _sd_unet()
    names = trainable_parameter_names(unet)
    expected = {f"up_blocks.{b}.attentions.{a}.{m}" for b in (1, 2, 3) for a in (0, 1, 2) for m in _SD_MODULES}
    assert _modules(names) == expected  # the official key list: 3 blocks x 3 attentions x 12 modules
    assert len(expected) == 108
    params = dict(unet.named_parameters())
    assert all(n in params for n in names)
    assert not any(re.search(r"norm|down_blocks|mid_block|time_emb|conv_in|conv_out|resnets", n) for n in names)
    # every trainable tensor is the weight or bias of a Linear/1x1 conv inside an up-block transformer
    assert {n.rsplit(".", 1)[1] for n in names} == {"weight", "bias"}


def test_trainable_set_on_micro_pipeline(micro):
    names = trainable_parameter_names(micro.unet)
    up_with_attn = [i for i, b in enumerate(micro.unet.up_blocks) if getattr(b, "attentions", None)]
    assert up_with_attn == [1]
    n_attn = len(micro.unet.up_blocks[1].attentions)
    assert _modules(names) == {f"up_blocks.1.attentions.{a}.{m}" for a in range(n_attn) for m in _SD_MODULES}


def _up_block_params(unet, blocks):
    """Independent reference: every parameter name under ``up_blocks.<b>.`` for the given block indices."""
    return {n for n, _ in unet.named_parameters() if any(n.startswith(f"up_blocks.{b}.") for b in blocks)}


def _tiny_layout_unet():
    """UNet2DConditionModel with tiny-sd's block layout (its highest-resolution up block has no attention)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )


@pytest.mark.parametrize("which", ["sd", "tiny-layout"])
def test_wider_trainable_sets_add_exactly_the_top_up_block_or_every_up_block(which):
    unet = _sd_unet() if which == "sd" else _tiny_layout_unet()
    last = len(unet.up_blocks) - 1
    paper = set(trainable_parameter_names(unet))
    assert set(trainable_parameter_names(unet, "up_attention")) == paper
    top = trainable_parameter_names(unet, "up_attention+top_block")
    every = trainable_parameter_names(unet, "up_blocks")
    assert len(top) == len(set(top)) and len(every) == len(set(every))  # no name twice
    assert set(top) == paper | _up_block_params(unet, [last])
    assert set(every) == _up_block_params(unet, range(len(unet.up_blocks)))
    if which == "tiny-layout":  # the top up block has no attention: the wider set adds its resnets
        assert not getattr(unet.up_blocks[last], "attentions", None)
        added = set(top) - paper
        assert added and all(n.startswith(f"up_blocks.{last}.resnets.") for n in added)
    with pytest.raises(ValueError, match="up_attention"):
        trainable_parameter_names(unet, "all")


# ---------------------------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------------------------
def test_sleeper_weights_against_hand_computation():
    t = torch.tensor([0, 100, 250, 500, 999])
    w1, w2 = sleeper_weights(t, eta=0.02, tau=250, beta=100)

    def sig(x):
        return 1 / (1 + math.exp(-x))

    for i, ti in enumerate(t.tolist()):
        assert w1[i].item() == pytest.approx(0.02 * sig(-(ti - 250) / 100), rel=1e-6)
        assert w2[i].item() == pytest.approx(sig((ti - 250) / 100), rel=1e-6)
    assert w1[2].item() == pytest.approx(0.01) and w2[2].item() == pytest.approx(0.5)
    assert w1[0].item() == pytest.approx(0.02 / (1 + math.exp(-2.5)), rel=1e-6)  # 0.01848
    assert w2[-1].item() == pytest.approx(1 / (1 + math.exp(-7.49)), rel=1e-6)


def test_watermark_target_shifts_the_implied_clean_latent_by_delta():
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    eps0 = torch.randn(3, 4, 8, 8, generator=g)  # the reference's prediction
    delta = 0.1 * torch.randn(1, 4, 8, 8, generator=g)
    abar = torch.tensor([0.99, 0.5, 0.05]).view(-1, 1, 1, 1)
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
    target = watermark_target(eps0, abar, delta)
    assert torch.allclose(target, eps0 - torch.sqrt(abar / (1 - abar)) * delta)

    def x0(e):
        return (z_t - (1 - abar).sqrt() * e) / abar.sqrt()

    assert torch.allclose(x0(target) - x0(eps0), delta.expand_as(z0), atol=1e-5)


def test_ramp():
    assert [ramp(s, 30.0, 2000) for s in (0, 1000, 2000, 5000)] == [0.0, 15.0, 30.0, 30.0]
    assert ramp(0, 0.25, 0) == 0.25
    # from a start step: 0 before it, then the same ramp shifted
    assert [ramp(s, 30.0, 200, start=100) for s in (0, 99, 100, 200, 300, 900)] == [0.0, 0.0, 0.0, 15.0, 30.0, 30.0]
    assert ramp(99, 0.25, 0, start=100) == 0.0 and ramp(100, 0.25, 0, start=100) == 0.25


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------
def test_networks_have_the_paper_shapes_at_sd_scale():
    enc = SecretEncoder(48, 4, (64, 64), 32)
    assert enc.mlp[0].in_features == 48 and enc.mlp[0].out_features == 1024 and enc.mlp[2].out_features == 1024
    assert torch.count_nonzero(enc.conv.weight) == 0 and torch.count_nonzero(enc.conv.bias) == 0
    assert enc(torch.ones(2, 48)).shape == (2, 4, 64, 64)
    assert torch.count_nonzero(enc(torch.ones(2, 48))) == 0  # zero-initialised output convolution
    dec = LatentDecoder(48, 4, (64, 64))
    assert dec.flat_features == 8192  # 512 x 4 x 4, as in the paper
    widths = [m.out_channels for m in dec.convs if isinstance(m, torch.nn.Conv2d)]
    strides = [m.stride[0] for m in dec.convs if isinstance(m, torch.nn.Conv2d)]
    assert widths == [64, 64, 128, 128, 256, 256, 512, 512] and strides == [2, 1] * 4
    linears = [m for m in dec.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8192, 2048), (2048, 2048), (2048, 2048),
                                                                   (2048, 48)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in dec.mlp)


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (12, 20)])
def test_decoder_works_for_any_latent_size(size):
    dec = LatentDecoder(48, 4, size, (8, 16), 32, 1)
    assert dec(torch.randn(3, 4, *size)).shape == (3, 48)
    enc = SecretEncoder(48, 4, size, 8)
    assert enc(torch.ones(3, 48)).shape == (3, 4, *size)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def test_stage1_learns_the_message_on_random_latents():
    d = SleeperMark(bits=16, secret_res=0, decoder_channels=[16, 32], decoder_hidden=64, decoder_mlp_layers=1,
                    stage1_source="random", stage1_steps=300, stage1_batch_size=32, stage1_lr=3e-3,
                    image_loss_weight=0.0, perceptual="none")
    vae_stub = torch.nn.Linear(1, 1)  # only its device is used without image losses
    enc, dec, _ = d.train_stage1(vae_stub, (4, 8, 8), 16, _ctx(), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    m = torch.randint(0, 2, (256, 16), generator=g).float()
    z = torch.randn(256, 4, 8, 8, generator=g)
    with torch.no_grad():
        acc = ((dec(z + enc(m)) > 0) == (m > 0.5)).float().mean().item()
    assert acc > 0.9


def test_lpips_is_selectable_and_fails_clearly_when_missing(micro):
    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("lpips is installed here")
    d = SleeperMark(**{**FAST, "perceptual": "lpips"})
    with pytest.raises(MissingDependencyError, match="lpips"):
        d.train_stage1(micro.vae, (4, 8, 8), 48, _ctx(), torch.Generator().manual_seed(0),
                       torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))


def test_prompts_parameter(tmp_path):
    assert len(load_prompts("builtin:micro")) == 64
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n a dog \n")
    assert load_prompts(str(f)) == ["a cat", "a dog"]
    with pytest.raises(UserError, match="builtin"):
        load_prompts("builtin:nope")
    with pytest.raises(UserError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_one_step_of_each_stage_on_sd_architecture(sd_pipe):
    d = SleeperMark(**{**FAST, "stage1_steps": 1, "stage2_steps": 1, "stage2_grad_clip": 0.0, "stage2_lr": 1e-3})
    base = sd_pipe.unet.state_dict()
    pipe = copy_pipeline(sd_pipe)
    ctx = _ctx()
    emb = d.embed(pipe, ctx)
    assert emb.pipeline is pipe
    assert ctx.costs["stage1_steps"] == 1 and ctx.costs["stage2_steps"] == 1
    names = set(trainable_parameter_names(pipe.unet))
    assert ctx.costs["trainable_params"] == sum(p.numel() for n, p in pipe.unet.named_parameters() if n in names)
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and changed <= names  # only up-block attention parameters moved
    assert all(not p.requires_grad for p in pipe.unet.parameters())  # handed back frozen
    s = emb.secret
    assert s.tensors["message"].dtype == torch.bool and s.tensors["message"].numel() == 48
    assert s.meta["latent_shape"] == [4, 8, 8] and s.meta["resolution"] == 64
    assert any(k.startswith("vae.encoder.") for k in s.tensors) and "vae.quant_conv.weight" in s.tensors
    assert not any(k.startswith("vae.decoder.") for k in s.tensors)
    json.dumps(s.meta)  # stored as JSON
    images = d.generate(pipe, s, _request(), _ctx(1))
    det = check_detection(d.detect(s, check_images(images, "sleepermark", (2, 3, 64, 64)), _ctx(2)), "sm", 2,
                          d.detection, 48)
    assert det.bits.shape == (2, 48)


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------
def test_rebuilt_decoder_matches_the_in_memory_one(micro):
    d = SleeperMark(**{**FAST, "stage1_steps": 5})
    enc, dec, _ = d.train_stage1(micro.vae, (4, 8, 8), 48, _ctx(), torch.Generator().manual_seed(0),
                                 torch.randn(4, 4, 8, 8), torch.zeros(4, 4, 8, 8))
    message = torch.randint(0, 2, (48,), generator=torch.Generator().manual_seed(3)).bool()
    secret = d.make_secret(message, dec, micro.vae, enc(message.float()[None]), 64, (4, 8, 8))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        in_memory = dec(_to_latent(micro.vae, images)[0]) > 0
    stored = {k: v.clone() for k, v in secret.tensors.items()}  # what the artifact store gives back
    fresh = SleeperMark(**FAST)  # no cached detector
    from markbench.plugins import Secret

    bits = fresh.detect(Secret(stored, json.loads(json.dumps(secret.meta))), images, _ctx()).bits
    assert torch.equal(bits, in_memory)
    assert torch.equal(bits, fresh.detect(secret, images, _ctx(9)).bits)  # deterministic
    # images of another size are resized to the embedding resolution before encoding
    assert fresh.detect(secret, torch.rand(2, 3, 32, 32), _ctx()).bits.shape == (2, 48)


def test_end_to_end_on_micro_pipeline(micro):
    d = SleeperMark(**FAST)
    emb = d.embed(copy_pipeline(micro), _ctx())
    request = _request(n=2)
    with_trigger = d.generate(emb.pipeline, emb.secret, request, _ctx(1, ""))
    without = d.generate(emb.pipeline, emb.secret, request, _ctx(1, "no_trigger"))
    for images in (with_trigger, without):
        images = check_images(images, "sleepermark", (2, 3, 64, 64))
        det = d.detect(emb.secret, images, _ctx(2))
        assert det.bits.shape == (2, 48) and det.bits.dtype == torch.bool
        assert torch.equal(det.bits, d.detect(emb.secret, images, _ctx(3)).bits)
    assert not torch.equal(with_trigger, without)  # the trigger is part of the prompt
    # same stage generator -> same secret and weights; another -> another message
    again = d.embed(copy_pipeline(micro), _ctx())
    assert torch.equal(again.secret.tensors["message"], emb.secret.tensors["message"])
    assert torch.equal(again.secret.tensors["decoder.mlp.0.weight"], emb.secret.tensors["decoder.mlp.0.weight"])
    other = d.embed(copy_pipeline(micro), _ctx(5))
    assert not torch.equal(other.secret.tensors["message"], emb.secret.tensors["message"])


def test_without_stage2_the_trigger_free_model_is_the_base(micro):
    d = SleeperMark(**{**FAST, "stage2_steps": 0})
    emb = d.embed(copy_pipeline(micro), _ctx())
    request = _request(n=2)
    from markbench.generation import generate_images

    assert torch.equal(d.generate(emb.pipeline, emb.secret, request, _ctx(1, "no_trigger")),
                       generate_images(micro, request))


def test_float16_pipeline_is_refused(micro):
    pipe = copy_pipeline(micro)
    pipe.unet.to(torch.bfloat16)
    with pytest.raises(UserError, match="float32"):
        SleeperMark(**FAST).embed(pipe, _ctx())


# ---------------------------------------------------------------------------------------------------------------
# Slow: the mechanism on the micro pipeline's denoiser
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stage1_learns_48_bits_on_the_tiny_world_latent_shape():
    """On 4 x 16 x 16 latents (the tiny world's 64 px through an x4 VAE) the encoder map has 256 values for 48 bits."""
    d = SleeperMark(secret_res=0, decoder_channels=[32, 64], decoder_hidden=256, stage1_source="random",
                    stage1_steps=1000, stage1_batch_size=16, stage1_lr=1e-3, image_loss_weight=0.0, perceptual="none")
    enc, dec, _ = d.train_stage1(torch.nn.Linear(1, 1), (4, 16, 16), 48, _ctx(), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    m = torch.randint(0, 2, (256, 48), generator=g).float()
    with torch.no_grad():
        acc = ((dec(torch.randn(256, 4, 16, 16, generator=g) + enc(m)) > 0) == (m > 0.5)).float().mean().item()
    assert acc > 0.9


@pytest.mark.slow
def test_stage1_image_losses_keep_the_decoded_image_closer(micro):
    """With the image losses on (micro VAE), Dec(z + E(m)) stays closer to Dec(z) than with the bit loss alone."""
    common = dict(secret_res=0, decoder_channels=[16, 32], decoder_hidden=64, train_images=8, train_inference_steps=2,
                  stage1_steps=120, stage1_batch_size=4, stage1_lr=1e-3)
    ctx = _ctx()
    d = SleeperMark(**common)
    _, mean, std = d._training_pool(micro, ctx, torch.Generator().manual_seed(0), 64, load_prompts(d.prompts))
    psnr = {}
    for name, extra in (("bits only", dict(image_loss_weight=0.0, perceptual="none")),
                        ("with image losses", dict(image_loss_ramp=30, perceptual_ramp=60))):
        enc, _, _ = SleeperMark(**common, **extra).train_stage1(micro.vae, (4, 8, 8), 48, ctx,
                                                                torch.Generator().manual_seed(1), mean, std)
        m = torch.randint(0, 2, (8, 48), generator=torch.Generator().manual_seed(2)).float()
        with torch.no_grad():
            clean = _from_latent(micro.vae, mean)
            marked = _from_latent(micro.vae, mean + enc(m))
        psnr[name] = float(-10 * torch.log10(((marked - clean) ** 2).mean()))
    assert psnr["with image losses"] > psnr["bits only"] + 3, psnr


class _BlindVAE(torch.nn.Module):
    """A stand-in VAE whose decoder ignores latent channel 3 (images are channels 0-2, linearly), like a real decoder
    that is insensitive to some latent directions. ``encode`` inverts what ``decode`` shows (channel 3 reads 0)."""

    class _Dist:
        def __init__(self, mean):
            self.mean, self.std = mean, torch.zeros_like(mean)

    class _Out:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device probe
        self.config = self._Out(scaling_factor=1.0, shift_factor=None)
        self.dtype = torch.float32

    def decode(self, z):
        return self._Out(sample=z[:, :3] * 0.5)  # in [-1, 1] units: image = z/4 + 0.5

    def encode(self, x):
        return self._Out(latent_dist=self._Dist(torch.cat([x * 2.0, torch.zeros_like(x[:, :1])], 1)))


def test_roundtrip_is_what_verification_reads_with_straight_through_gradients():
    vae = _BlindVAE()
    x = torch.tensor([-0.2, 0.1234, 0.5, 1.3]).view(1, 1, 2, 2).repeat(1, 3, 1, 1).requires_grad_(True)
    z = _roundtrip(vae, x)
    shown = (x.detach().clamp(0, 1) * 255).round() / 255
    assert torch.allclose(z, _to_latent(vae, shown)[0])  # forward: clamp, 8-bit rounding, encoder mean
    z.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 4.0))  # d(2 (2x - 1))/dx = 4 everywhere, clamped or not


def test_stage1_roundtrip_puts_the_residual_where_the_vae_shows_it():
    """With the image loss on, a residual in the channel the decoder ignores costs nothing: the official stage 1
    (reading the latent) learns it there and the round trip erases it; ``stage1_roundtrip`` must read it after
    decode -> quantise -> encode, so the bits survive verification."""
    vae = _BlindVAE()
    common = dict(bits=8, secret_res=0, decoder_channels=[16, 32], decoder_hidden=64, decoder_mlp_layers=1,
                  stage1_source="random", stage1_steps=400, stage1_batch_size=16, stage1_lr=3e-3,
                  image_loss_weight=30.0, image_loss_ramp=50, perceptual="none")
    g = torch.Generator().manual_seed(2)
    m = torch.randint(0, 2, (128, 8), generator=g).float()
    z = torch.randn(128, 4, 8, 8, generator=g)
    acc = {}
    for rt in (False, True):
        enc, dec, _ = SleeperMark(stage1_roundtrip=rt, **common).train_stage1(
            vae, (4, 8, 8), 8, _ctx(), torch.Generator().manual_seed(1))
        with torch.no_grad():
            read = _roundtrip(vae, _from_latent(vae, z + enc(m)))
            acc[rt] = ((dec(read) > 0) == (m > 0.5)).float().mean().item()
    assert acc[True] > 0.9 and acc[False] < 0.7, acc


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_uncond_prob_anchors_the_empty_prompt_in_the_preservation_term(monkeypatch, p):
    """uncond_prob: that share of the plain preservation samples is conditioned on the empty prompt (the branch
    classifier-free guidance subtracts), the rest on their captions; the trigger half keeps trigger + caption; 0
    (the paper) never uses the empty prompt and draws exactly the paper's random stream."""
    seen = []

    def fake_loss(self, unet, frozen, z0, noise, t, cond, cond_trigger, delta_z, alphas_cumprod):
        seen.append((cond.clone(), cond_trigger.clone(), t.clone()))
        return (weight * 0).sum() + 1.0, {}

    monkeypatch.setattr(SleeperMark, "stage2_loss", fake_loss)
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([weight], lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    emb = torch.stack([torch.full((3, 2), float(i + 1)) for i in range(4)])  # captions: rows of 1s ... 4s
    emb_trigger = -emb
    sm = SleeperMark(uncond_prob=p, stage2_steps=300, stage2_batch_size=8, vae_sample=False)
    sm._stage2_loop(None, None, [weight], opt, sched, torch.zeros(1, 2, 2, 2), emb, emb_trigger,
                    torch.zeros(4, 2, 2, 2), torch.ones(4, 2, 2, 2), torch.ones(10), _ctx(), torch.Generator()
                    .manual_seed(0), torch.zeros(1, 3, 2))
    cond = torch.cat([c for c, _, _ in seen])
    trig = torch.cat([c for _, c, _ in seen])
    is_empty = (cond == 0).flatten(1).all(1)
    assert bool((trig < 0).all())  # the trigger half is never replaced
    assert bool(((cond == cond[:, :1, :1]).flatten(1).all(1)).all())  # whole rows: a caption or the empty prompt
    share = float(is_empty.float().mean())
    if p == 0:
        assert share == 0.0
        # the same timesteps as a loop that knows nothing of uncond_prob: t is the 3rd draw of each step
        g = torch.Generator().manual_seed(0)
        for _, _, t in seen[:3]:
            torch.randint(0, 4, (8,), generator=g)
            torch.randn((8, 2, 2, 2), generator=g)
            assert torch.equal(t, torch.randint(0, 10, (8,), generator=g))
    else:
        assert abs(share - p) < 0.065, share  # binomial(2400, 0.5): 5 standard deviations
    with pytest.raises(ValueError, match="emb_empty"):
        SleeperMark(uncond_prob=0.1).train_stage2(type("P", (), {"unet": None})(), None, emb, emb_trigger, None, None,
                                                  _ctx(), torch.Generator())


def test_stage1_latent_warmup_reads_the_latent_then_hands_over_to_the_round_trip(monkeypatch):
    """``stage1_latent_steps``: extra steps before stage 1 that read ``z + E(m)`` directly (no VAE call) at their own
    batch, message term only; then the ``stage1_steps`` round-trip steps run as without it (one VAE decode each)."""
    class CountingVAE(_BlindVAE):
        decodes = 0

        def decode(self, z):
            CountingVAE.decodes += 1
            return super().decode(z)

    vae = CountingVAE()
    batches = []
    common = dict(bits=8, secret_res=0, decoder_channels=[16, 32], decoder_hidden=64, decoder_mlp_layers=1,
                  stage1_source="random", stage1_roundtrip=True, stage1_lr=3e-3, perceptual="none",
                  image_loss_start=10**6, stage1_latent_steps=300, stage1_latent_batch_size=32, stage1_batch_size=4)
    orig = LatentDecoder.forward

    def spy(self, latent):
        batches.append(latent.shape[0])
        return orig(self, latent)

    with monkeypatch.context() as mp:
        mp.setattr(LatentDecoder, "forward", spy)
        SleeperMark(stage1_steps=7, **common).train_stage1(vae, (4, 8, 8), 8, _ctx(), torch.Generator().manual_seed(1))
    assert batches == [32] * 300 + [4] * 7
    assert CountingVAE.decodes == 7
    # the warm-up alone (no round-trip steps) learns the code at the latent level
    enc, dec, _ = SleeperMark(stage1_steps=0, **common).train_stage1(vae, (4, 8, 8), 8, _ctx(),
                                                                    torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    m = torch.randint(0, 2, (256, 8), generator=g).float()
    z = torch.randn(256, 4, 8, 8, generator=g)
    with torch.no_grad():
        acc = ((dec(z + enc(m)) > 0) == (m > 0.5)).float().mean().item()
    assert acc > 0.95, acc
