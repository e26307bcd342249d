"""WDM: the WDP input, the loss and the trigger-fed sampler against hand computations (mock UNets), one fine-tuning
step on a randomly initialised pipeline of Stable Diffusion's architecture at reduced width, and the whole method on
the micro pipeline (embed -> extract -> score; a short training moves the extraction towards the watermark)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from markbench.registries import defenses
from markbench.worlds import tiny as zoo
from markbench.config import ModelConfig, load_config
from markbench.errors import UserError
from markbench.generation import generate_images
from markbench.models import load_pipeline
from markbench.plugins import DetectionKind, GenerationRequest, MarkLocation, Secret, StageContext, Verification
from markbench.testing import Resources, check_detection, check_images, copy_pipeline
from markbench.defenses.wdm import (WDM, _EMA, extraction_timesteps, q_sample, similarity_scores, wdm_loss, wdm_loss_terms,
                          wdp_input, wdp_sample)
from tests.test_sleepermark import _sd_pipeline

PROMPTS = ["a red circle on a blue background", "a small green star on a grey background"]
# a few seconds on one CPU thread: a handful of task images, two steps, a 3-step extraction
FAST = dict(train_images=4, train_inference_steps=2, gen_batch_size=4, steps=2, batch_size=2, wm_batch_size=2,
            ema_rate=0.0, extract_steps=3, calibration_samples=3)


def _ctx(seed=0, pipe=None, variant=""):
    data = Resources(lambda: pipe, 64, 64, lambda: PROMPTS) if pipe is not None else None
    return StageContext(torch.Generator().manual_seed(seed), data=data, variant=variant)


def _request(n=2, seeds=None):
    return GenerationRequest(prompts=tuple(PROMPTS[i % 2] for i in range(n)), seeds=tuple(seeds or range(n)),
                             height=64, width=64, num_inference_steps=2, guidance_scale=7.5, batch_size=n)


@pytest.fixture(scope="module")
def micro():
    return load_pipeline(ModelConfig(builtin="micro-sd"))


class RecordingUNet:
    """A stand-in UNet: records its inputs and returns ``fn(x, t)`` (default: zeros)."""

    def __init__(self, fn=None):
        self.calls = []
        self.fn = fn or (lambda x, t: torch.zeros_like(x))

    def __call__(self, x, t, encoder_hidden_states=None):
        self.calls.append((x.clone(), t.clone(), encoder_hidden_states.clone()))
        return SimpleNamespace(sample=self.fn(x, t))


# ---------------------------------------------------------------------------------------------------------------
# Registration and config
# ---------------------------------------------------------------------------------------------------------------
def test_registered_with_the_paper_defaults():
    cls = defenses.get("wdm")
    assert cls is WDM
    assert cls.location is MarkLocation.MODEL_WEIGHTS and cls.verification is Verification.WHITE_BOX
    assert cls.detection is DetectionKind.SCORE and cls.variants == ("", "no_trigger")
    d = cls()
    assert (d.gamma1, d.gamma2) == (0.8, 0.1)
    assert (d.lr, d.weight_decay, d.ema_rate, d.batch_size, d.wm_batch_size) == (1e-4, 0.0, 0.999, 32, 32)
    assert (d.extract_steps, d.extract_variance, d.wdp_prompt, d.task_uncond_prob) == (1000, "fixed_large",
                                                                                       "a watermark", 0.1)
    assert (d.trigger_source, d.watermark_source, d.distance, d.task_data) == ("latent", "pattern", "mse",
                                                                               "generated")
    with pytest.raises(UserError, match="watermark_file"):
        cls(watermark_source="file")


def test_config_validates():
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "wdm-tiny.toml", check_output=False)
    spec = next(s for s in cfg.defenses if s.name == "wdm")
    d = spec.instantiate()
    assert isinstance(d, WDM) and (d.gamma1, d.gamma2) == (0.8, 0.1)
    assert any(s.name == "none" for s in cfg.defenses)


# ---------------------------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------------------------
def test_wdp_input_against_hand_computation():
    ac = torch.tensor([0.9, 0.5, 0.1])
    x0 = torch.tensor([[2.0], [2.0], [-1.0]])
    noise = torch.tensor([[1.0], [1.0], [0.5]])
    t = torch.tensor([1, 0, 2])
    q = q_sample(ac, x0, t, noise)
    assert q[:, 0].tolist() == pytest.approx([math.sqrt(0.5) * 2 + math.sqrt(0.5),
                                              math.sqrt(0.9) * 2 + math.sqrt(0.1),
                                              -math.sqrt(0.1) + math.sqrt(0.9) * 0.5], rel=1e-6)
    trigger = torch.tensor([-1.0])
    x = wdp_input(q, trigger, 0.8)
    assert x[0, 0].item() == pytest.approx(0.8 * 2.1213203 - 0.2, rel=1e-6)  # 1.4970563
    assert x[0, 0].item() == pytest.approx(1.4970563, abs=1e-6)
    assert torch.equal(wdp_input(q, trigger, 1.0), q)  # gamma1 = 1: no trigger at all


def test_loss_is_task_plus_gamma2_wdp():
    g = torch.Generator().manual_seed(0)
    x_t, target, x_w, target_w = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(4))
    t, t_w = torch.tensor([1, 2, 3]), torch.tensor([7, 8, 9])
    cond, cond_w = torch.randn(3, 5, 6, generator=g), torch.randn(1, 5, 6, generator=g)
    unet = RecordingUNet(lambda x, t: 2 * x)
    loss, parts = wdm_loss_terms(unet, x_t, t, cond, target, x_w, t_w, cond_w, target_w, gamma2=0.1)
    task = ((2 * x_t - target) ** 2).mean()
    wdp = ((2 * x_w - target_w) ** 2).mean()
    assert loss.item() == pytest.approx((task + 0.1 * wdp).item(), rel=1e-6)
    assert parts == pytest.approx({"task": task.item(), "wdp": wdp.item()}, rel=1e-6)
    (x_in, t_in, c_in), = unet.calls  # one batch of 2 x 3: task half, then WDP half with the broadcast condition
    assert torch.equal(x_in, torch.cat([x_t, x_w])) and torch.equal(t_in, torch.cat([t, t_w]))
    assert torch.equal(c_in, torch.cat([cond, cond_w.expand(3, -1, -1)]))


def test_wdm_loss_draws_separate_timesteps_and_builds_the_wdp_input():
    ac = torch.linspace(0.999, 0.01, 1000)
    g = torch.Generator().manual_seed(3)
    z0, z_wm = torch.randn(8, 4, 2, 2, generator=g), torch.randn(8, 4, 2, 2, generator=g)
    trigger, cond, cond_w = torch.randn(1, 4, 2, 2, generator=g), torch.randn(8, 5, 6), torch.zeros(1, 5, 6)
    unet = RecordingUNet()
    loss, parts = wdm_loss(unet, ac, z0, cond, z_wm, trigger, cond_w, 0.8, 0.1, torch.Generator().manual_seed(1))
    replay = torch.Generator().manual_seed(1)  # the draws in their order: t, t', eps, eps'
    t, t_w = torch.randint(0, 1000, (8,), generator=replay), torch.randint(0, 1000, (8,), generator=replay)
    eps, eps_w = torch.randn(z0.shape, generator=replay), torch.randn(z_wm.shape, generator=replay)
    assert not torch.equal(t, t_w)  # separate timesteps for the two terms
    x_in, t_in, _ = unet.calls[0]
    assert torch.equal(t_in, torch.cat([t, t_w]))
    abar, abar_w = ac[t].view(-1, 1, 1, 1), ac[t_w].view(-1, 1, 1, 1)
    assert torch.allclose(x_in[:8], abar.sqrt() * z0 + (1 - abar).sqrt() * eps, atol=1e-6)
    expected_w = 0.8 * (abar_w.sqrt() * z_wm + (1 - abar_w).sqrt() * eps_w) + 0.2 * trigger
    assert torch.allclose(x_in[8:], expected_w, atol=1e-6)
    # the mock predicts 0: each term is the mean square of its target noise
    assert parts["task"] == pytest.approx((eps ** 2).mean().item(), rel=1e-5)
    assert parts["wdp"] == pytest.approx((eps_w ** 2).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["task"] + 0.1 * parts["wdp"], rel=1e-5)


def test_extraction_timesteps():
    assert extraction_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert extraction_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert extraction_timesteps(1000, 5000) == list(range(999, -1, -1))
    assert extraction_timesteps(10, 1) == [0]


def test_sampler_feeds_the_trigger_at_every_step():
    ac = torch.tensor([0.99, 0.9, 0.6, 0.3])
    g = torch.Generator().manual_seed(0)
    x_T, trigger = torch.randn(2, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    cond = torch.randn(1, 5, 6, generator=g)
    unet = RecordingUNet()  # eps = 0
    out = wdp_sample(unet, ac, x_T, trigger, 0.8, cond, [3, 1, 0], [torch.Generator().manual_seed(s) for s in (7, 8)])
    assert [int(c[1][0]) for c in unet.calls] == [3, 1, 0]
    assert all(torch.equal(c[2], cond.expand(2, -1, -1)) for c in unet.calls)
    # by hand: eps = 0 -> x0 = x / sqrt(abar_t); posterior mean on the unshifted x; fixed-large variance beta
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    x = x_T.clone()
    for i, (t, prev) in enumerate(((3, 1), (1, 0), (0, -1))):
        assert torch.allclose(unet.calls[i][0], 0.8 * x + 0.2 * trigger, atol=1e-6)  # what the UNet saw
        a_t, a_p = ac[t].item(), (ac[prev].item() if prev >= 0 else 1.0)
        x0 = x / math.sqrt(a_t)
        beta = 1 - a_t / a_p
        mean = math.sqrt(a_p) * beta / (1 - a_t) * x0 + math.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t) * x
        if prev < 0:
            x = mean
        else:
            x = mean + math.sqrt(beta) * torch.stack([torch.randn(4, 3, 3, generator=gg) for gg in gens])
    assert torch.allclose(out, x, atol=1e-5)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_an_ideal_wdp_denoiser_yields_the_watermark(variance):
    """A UNet that predicts exactly the noise of x_t around z_wm (undoing the trigger feed) gives back z_wm."""
    ac = torch.linspace(0.999, 0.02, 50)
    g = torch.Generator().manual_seed(1)
    z_wm, trigger = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)

    def oracle(x_in, t):
        x = (x_in - 0.2 * trigger) / 0.8
        a = ac[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * z_wm) / (1 - a).sqrt()

    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    out = wdp_sample(RecordingUNet(oracle), ac, torch.randn(3, 4, 3, 3, generator=g), trigger, 0.8,
                     torch.zeros(1, 2, 2), extraction_timesteps(50, 10), gens, variance)
    assert torch.allclose(out, z_wm.expand(3, -1, -1, -1), atol=1e-4)


def test_similarity_scores():
    ref = torch.full((3, 8, 8), 0.5)
    images = torch.stack([ref, ref + 0.1, ref + 0.01])
    psnr = similarity_scores(images, ref, "mse")
    assert psnr[0].item() == pytest.approx(100.0)  # MSE floored at 1e-10
    assert psnr[1:].tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    ssim = similarity_scores(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), ref.repeat(1, 2, 2),
                             "ssim")
    assert ssim.shape == (2,) and (ssim < 0.5).all()
    assert similarity_scores(ref.repeat(1, 2, 2)[None], ref.repeat(1, 2, 2), "ssim").item() == pytest.approx(1.0)
    assert similarity_scores(torch.full((1, 3, 16, 16), 0.6), ref, "mse").item() == pytest.approx(20.0, abs=1e-3)


def test_nc_is_the_pearson_correlation_of_grey_levels():
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(3, 8, 8, generator=g)
    images = torch.rand(4, 3, 8, 8, generator=g)
    images[1] = 0.5 * ref + 0.2  # same structure, other contrast and brightness: NC 1
    images[2] = 1 - ref  # inverted: NC -1
    nc = similarity_scores(images, ref, "nc")
    w = np.full(3, 1 / 3)
    y_ref = np.tensordot(w, ref.numpy(), axes=1).ravel()
    expected = [np.corrcoef(np.tensordot(w, im.numpy(), axes=1).ravel(), y_ref)[0, 1] for im in images]
    assert nc.tolist() == pytest.approx(expected, abs=1e-5)
    assert nc[1].item() == pytest.approx(1.0, abs=1e-5) and nc[2].item() == pytest.approx(-1.0, abs=1e-5)
    # a colour change that keeps the grey-level structure keeps NC
    tinted = ref.clone()
    tinted[2] = ref[2] * 0.2
    assert similarity_scores(tinted[None], ref, "nc").item() > 0.8
    assert similarity_scores(torch.full((1, 3, 8, 8), 0.4), ref, "nc").item() == pytest.approx(0.0, abs=1e-6)


def test_ema():
    p = [torch.nn.Parameter(torch.zeros(3))]
    ema = _EMA(p, 0.9)
    with torch.no_grad():
        p[0].fill_(1.0)
    ema.update(p)
    ema.update(p)
    ema.copy_to(p)
    assert p[0].tolist() == pytest.approx([1 - 0.81] * 3)


# ---------------------------------------------------------------------------------------------------------------
# On pipelines
# ---------------------------------------------------------------------------------------------------------------
def test_one_training_step_on_sd_architecture():
    pipe = _sd_pipeline()
    base = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "vae",
                                                                                          "text_encoder")}
    d = WDM(**{**FAST, "steps": 1, "calibration_samples": 0, "lr": 1e-3})
    ctx = _ctx(0, pipe)
    emb = d.embed(pipe, ctx)
    assert emb.pipeline is pipe
    unet_params = dict(pipe.unet.named_parameters())
    assert ctx.costs["steps"] == 1 and ctx.costs["trainable_params"] == sum(p.numel() for p in unet_params.values())
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base["unet"][k])]
    assert len(changed) > 0.9 * len(unet_params)  # the whole UNet trains
    for comp in ("vae", "text_encoder"):  # frozen
        assert all(torch.equal(v, base[comp][k]) for k, v in getattr(pipe, comp).state_dict().items())
    assert all(not p.requires_grad for p in pipe.unet.parameters())
    s = emb.secret
    assert s.tensors["trigger"].shape == s.tensors["watermark_latent"].shape == (4, 8, 8)
    assert s.tensors["watermark_image"].shape == (3, 64, 64)
    assert s.meta["latent_shape"] == [4, 8, 8] and s.meta["gamma1"] == 0.8
    assert math.isfinite(s.meta["final_wdp_loss"]) and math.isfinite(s.meta["final_task_loss"])
    json.dumps(s.meta)
    images = check_images(d.generate(pipe, s, _request(), _ctx(1)), "wdm", (2, 3, 64, 64))
    det = check_detection(d.detect(s, images, _ctx(2)), "wdm", 2, d.detection, None)
    assert det.scores.shape == (2,)


def test_end_to_end_on_micro_pipeline(micro):
    d = WDM(**FAST)
    emb = d.embed(copy_pipeline(micro), _ctx(0, micro))
    s = emb.secret
    assert len(s.meta["null_scores"]["mse"]) == 3 and len(s.meta["embedded_scores"]["ssim"]) == 3
    request = _request(2, seeds=(11, 12))
    extracted = check_images(d.generate(emb.pipeline, s, request, _ctx(1)), "wdm", (2, 3, 64, 64))
    plain = check_images(d.generate(emb.pipeline, s, request, _ctx(1, variant="no_trigger")), "wdm", (2, 3, 64, 64))
    assert not torch.equal(extracted, plain)
    det = check_detection(d.detect(s, extracted, _ctx(2)), "wdm", 2, d.detection, None)
    assert torch.equal(det.scores, d.detect(s, extracted, _ctx(3)).scores)  # deterministic
    # the extraction depends only on the seeds; the white-box hook gives the harness path's scores
    again = check_images(d.generate(emb.pipeline, s, _request(2, seeds=(11, 12)), _ctx(9)), "wdm", None)
    assert torch.equal(again, extracted)
    assert torch.allclose(d.detect_model(s, emb.pipeline, (11, 12)).scores, det.scores, atol=1e-4)
    # the secret survives the store (safetensors + JSON) and drives detection alone
    stored = Secret({k: v.clone() for k, v in s.tensors.items()}, json.loads(json.dumps(s.meta)))
    assert torch.equal(WDM(**FAST).detect(stored, extracted, _ctx()).scores, det.scores)
    assert math.isfinite(WDM.threshold(stored, 0.01)) and WDM.threshold(stored, 1e-6) > WDM.threshold(stored, 0.1)
    # same stage generator -> same secret; another -> another trigger and watermark
    same = d.embed(copy_pipeline(micro), _ctx(0, micro)).secret
    other = d.embed(copy_pipeline(micro), _ctx(5, micro)).secret
    assert torch.equal(same.tensors["trigger"], s.tensors["trigger"])
    assert not torch.equal(other.tensors["trigger"], s.tensors["trigger"])
    assert not torch.equal(other.tensors["watermark_image"], s.tensors["watermark_image"])


def test_without_training_the_task_model_is_the_base(micro):
    d = WDM(**{**FAST, "steps": 0, "calibration_samples": 2})
    emb = d.embed(copy_pipeline(micro), _ctx(0, micro))
    assert emb.secret.meta["null_scores"] == emb.secret.meta["embedded_scores"]
    request = _request(2)
    assert torch.equal(d.generate(emb.pipeline, emb.secret, request, _ctx(1, variant="no_trigger")),
                       generate_images(micro, request))


def test_ema_weights_are_released(micro):
    """One step with EMA rate r: the released weights are r * initial + (1 - r) * the raw trained weights."""
    init = {k: v.clone() for k, v in micro.unet.state_dict().items()}
    common = {**FAST, "steps": 1, "calibration_samples": 0, "lr": 1e-3}
    raw = WDM(**common).embed(copy_pipeline(micro), _ctx(0, micro)).pipeline.unet.state_dict()
    released = WDM(**{**common, "ema_rate": 0.75}).embed(copy_pipeline(micro), _ctx(0, micro)).pipeline.unet
    key = "up_blocks.1.attentions.0.proj_in.weight"
    assert not torch.equal(raw[key], init[key])
    assert torch.allclose(released.state_dict()[key], 0.75 * init[key] + 0.25 * raw[key], atol=1e-6)


def test_trigger_and_watermark_sources(micro, tmp_path):
    from PIL import Image

    shape, g = (4, 8, 8), torch.Generator().manual_seed(0)
    assert WDM(trigger_source="image").make_trigger(micro, shape, 64, g).shape == shape
    latent = WDM(watermark_source="latent", watermark_grid=2).make_watermark(micro, shape, 64, g)
    assert set(latent.unique().tolist()) <= {-1.0, 1.0} and latent.shape == shape
    assert torch.equal(latent[:, :4, :4], latent[:, :4, :4][:, :1, :1].expand(-1, 4, 4))  # 4 x 4 blocks
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "logo.png")
    z = WDM(watermark_source="file", watermark_file=str(tmp_path / "logo.png")).make_watermark(micro, shape, 64, g)
    with torch.no_grad():
        from markbench.training import encode_images

        red = torch.zeros(1, 3, 64, 64)
        red[:, 0] = 1.0
        assert torch.allclose(z, encode_images(micro, red)[0], atol=1e-5)
    with pytest.raises(UserError, match="no such file"):
        WDM(watermark_source="file", watermark_file=str(tmp_path / "nope.png")).make_watermark(micro, shape, 64, g)


def test_unsupported_pipelines_are_refused(micro):
    from diffusers import DDIMScheduler

    pipe = copy_pipeline(micro)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(UserError, match="epsilon"):
        WDM(**FAST).embed(pipe, _ctx(0, micro))
    pipe = copy_pipeline(micro)
    pipe.unet.to(torch.bfloat16)
    with pytest.raises(UserError, match="float32"):
        WDM(**FAST).embed(pipe, _ctx(0, micro))


def test_short_training_moves_the_extraction_towards_the_watermark(micro):
    """200 steps on the micro pipeline (gamma2 = 1 and lr 3e-3 to learn fast): the extraction from the fine-tuned
    model points towards the watermark latent and its decoded image is closer to the watermark image, both against
    the same fine-tuning without the WDP term (gamma2 = 0: the control) and against the clean model (the null)."""
    common = dict(train_images=8, train_inference_steps=2, gen_batch_size=8, steps=200, batch_size=4, wm_batch_size=4,
                  lr=3e-3, ema_rate=0.0, watermark_source="latent", extract_steps=20, calibration_samples=4,
                  task_uncond_prob=0.0)  # the WDP term alone against the control
    psnr, cosine = {}, {}
    for name, gamma2 in (("wdm", 1.0), ("control", 0.0), ("clean", None)):
        d = WDM(**common, gamma2=gamma2 or 0.0)
        if gamma2 is None:  # the clean model, with the secret of the runs above
            pipe = micro
        else:
            emb = d.embed(copy_pipeline(micro), _ctx(0, micro))
            pipe, secret = emb.pipeline, emb.secret
            psnr[name] = sum(secret.meta["embedded_scores"]["mse"]) / 4
            psnr["clean"] = sum(secret.meta["null_scores"]["mse"]) / 4  # the same for both: same secret and seeds
        meta = secret.meta
        z = d.extract(pipe, secret.tensors["trigger"], 0.8, meta["wdp_prompt"], meta["calibration_seeds"], 4)
        z_wm = secret.tensors["watermark_latent"].flatten()[None]
        cosine[name] = torch.nn.functional.cosine_similarity(z.flatten(1), z_wm).mean().item()
    assert psnr["wdm"] > psnr["control"] + 1.5 and psnr["wdm"] > psnr["clean"] + 1.5, psnr  # dB
    assert cosine["wdm"] > 0.25 and abs(cosine["control"]) < 0.15 and abs(cosine["clean"]) < 0.15, cosine


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_caption_dropout_replaces_task_conditions_with_the_empty_prompt(monkeypatch, p):
    """task_uncond_prob: that share of task samples is conditioned on the empty prompt (the branch classifier-free
    guidance subtracts), the rest on their captions; 0 never touches the empty prompt."""
    import types

    import markbench.defenses.wdm as wdm_mod

    seen = []

    def fake_loss(unet, alphas_cumprod, latents, cond, *rest):
        seen.append(cond.clone())
        return (unet.weight * 0).sum() + latents.new_ones(()), {"task": 1.0, "wdp": 0.0}

    monkeypatch.setattr(wdm_mod, "wdm_loss", fake_loss)
    unet = torch.nn.Linear(1, 1)
    unet.device = torch.device("cpu")
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(alphas_cumprod=torch.ones(10)))
    table = torch.stack([torch.full((3, 2), float(i + 1)) for i in range(4)])  # captions: rows of 1s, 2s, 3s, 4s
    empty = torch.zeros(1, 3, 2)
    d = WDM(task_uncond_prob=p, steps=400, batch_size=8, wm_batch_size=2, ema_rate=0.0)
    d.train(pipe, torch.zeros(16, 1, 2, 2), table, torch.arange(16) % 4, torch.zeros(1, 2, 2), torch.zeros(1, 2, 2),
            torch.zeros(1, 3, 2), _ctx(0), torch.Generator().manual_seed(0), empty)
    conds = torch.cat(seen)
    assert conds.shape == (400 * 8, 3, 2)
    is_empty = (conds == 0).flatten(1).all(1)
    # every condition is either a caption row, whole, or the empty prompt
    assert bool(((conds == conds[:, :1, :1]).flatten(1).all(1)).all())
    share = float(is_empty.float().mean())
    if p == 0:
        assert share == 0.0
    else:
        # binomial(3200, 0.5): 5 standard deviations are 0.044
        assert abs(share - p) < 0.045, share
    with pytest.raises(ValueError, match="cond_empty"):
        WDM(task_uncond_prob=0.1, steps=1).train(pipe, torch.zeros(4, 1, 2, 2), table, torch.arange(4),
                                                 torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 3, 2),
                                                 _ctx(0), torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.skipif(not (zoo.TINY_SD / "model_index.json").exists(), reason="tiny world not built")
def test_tiny_config_embeds_a_watermark_detected_against_the_clean_model(tmp_path):
    """The issue's target, end to end: `configs/wdm-tiny.toml`'s embedding (trained here, about 8 minutes on one
    thread: WDM changes the whole UNet, too large to ship) is told apart from the clean model's extractions, AUC >=
    0.99 (N = 32 measured 1.000, docs/wdm.md) and detected above the maximum of the 16 clean extractions, and its ordinary images carry no watermark (AUC near chance). One
    torch thread, as measured: another thread count changes the float order and so the whole training."""
    from tests.test_prebuilt import _bench_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        value, embedded = _bench_run(tmp_path, "configs/wdm-tiny.toml", "wdm*/none/none/*", n=16)
    finally:
        torch.set_num_threads(threads)
    assert embedded
    assert value("wdm", "auc") >= 0.99
    assert value("wdm", "tpr@fpr<=1/16") >= 0.9  # empirical: the FPR 16 negatives resolve, not 1e-6
    assert value("wdm[no_trigger]", "auc") <= 0.75
