"""The attacks that remove watermarks (regeneration, adversarial embedding, averaging) and the harness hook that
hands an image attack the model it declares (``needs_model``), checked with values against independent references.

The registry-wide contract (tests/test_image_attacks.py) exercises the same attacks generically.
"""

from __future__ import annotations

import math

import pytest
import torch

from markbench import AttackContext, ImageAttack, Param, PluginValidationError, image_attacks
from markbench.config import load_config
from markbench.plan import build_plan
from markbench.testing import run_attack, sample_images

from .attack_models import gen, model_fixtures
from .conftest import MICRO_TOML, write_config


_gen = gen
pipe, images = model_fixtures()


# ---------------------------------------------------------------------------------------------------------------
# The hook
# ---------------------------------------------------------------------------------------------------------------
def test_an_attack_declaring_a_model_must_take_ctx_and_name_a_known_model():
    class NoCtx(ImageAttack):
        """Needs a model but cannot receive it."""
        version = "1"
        needs_model = "base"

        @classmethod
        def from_strength(cls, s):
            return {}

        def apply(self, images, generator):
            return images

    class Unknown(NoCtx):
        """Names a model the harness does not offer."""
        needs_model = "independent"

        def apply(self, images, generator, ctx):
            return images

    with pytest.raises(PluginValidationError, match="must take a 'ctx' argument"):
        NoCtx.validate_class("nc")
    with pytest.raises(PluginValidationError, match="needs_model is 'independent'"):
        Unknown.validate_class("u")


def test_the_harness_hands_ctx_only_to_attacks_that_declare_a_model(images):
    seen = {}

    class Plain(ImageAttack):
        """A classic two-argument attack."""
        version = "1"

        @classmethod
        def from_strength(cls, s):
            return {}

        def apply(self, images, generator):
            return images * 0.5

    class WithModel(Plain):
        """An attack that reads the model."""
        needs_model = "base"

        def apply(self, images, generator, ctx):
            seen["model"] = ctx.model
            return images

    assert torch.equal(run_attack(Plain(), images, _gen()), images * 0.5)
    marker = object()
    run_attack(WithModel(), images, _gen(), model=marker)
    assert seen["model"] is marker


def _plan(tmp_path, attacks: str, model: str = "micro-sd"):
    text = MICRO_TOML.replace('name = "jpeg"\nquality = [90, 50]', attacks).replace('"micro-sd"', f'"{model}"')
    return build_plan(load_config(write_config(tmp_path, text, output=str(tmp_path / "out")), check_output=False))


def test_the_attack_stage_key_holds_the_base_models_fingerprint_and_other_attacks_keep_theirs(tmp_path):
    from markbench.models import model_fingerprint

    plan = _plan(tmp_path, 'name = "regen_vae"\n\n[[image_attacks]]\nname = "jpeg"\nquality = 50')
    stages = [s for s in plan.stages.values() if s.kind == "image_attack"]
    regen = [s for s in stages if s.plugin.name == "regen_vae"]
    jpeg = [s for s in stages if s.plugin.name == "jpeg"]
    cfg = load_config(tmp_path / "bench.toml", check_output=False)
    assert regen and all(s.extra_dict["attack_model"] == {"needs": "base",
                                                          "fingerprint": model_fingerprint(cfg.model)} for s in regen)
    assert jpeg and all("attack_model" not in s.extra_dict for s in jpeg)
    # the same attack on the same input images with another base model's fingerprint is another stage
    from markbench.plan import _Builder

    b = _Builder(cfg)
    spec = regen[0].plugin
    key = b.add("image_attack", regen[0].inputs, spec, regen[0].seed, label=regen[0].label,
                attack_model={"needs": "base", "fingerprint": "another-model"})
    assert key != regen[0].key


def test_a_run_hands_regen_vae_the_base_pipeline_it_already_holds(tmp_path):
    from markbench.cache import ArtifactStore
    from markbench.stages import StageEnv

    plan = _plan(tmp_path, 'name = "regen_vae"')
    cfg = load_config(tmp_path / "bench.toml", check_output=False)
    env = StageEnv(cfg, plan, ArtifactStore(tmp_path / "store"))
    stage = next(s for s in plan.stages.values() if s.kind == "image_attack")
    ctx = env.attack_context(stage)
    assert isinstance(ctx, AttackContext) and ctx.model is env.base_pipeline()
    assert ctx.model is env.attack_context(stage).model  # loaded once
    jpeg_like = next(s for s in plan.stages.values() if s.kind == "generate")
    assert env.attack_context(jpeg_like).model is None  # no model: only a place to record the cost


# ---------------------------------------------------------------------------------------------------------------
# regen_vae
# ---------------------------------------------------------------------------------------------------------------
def test_regen_vae_equals_decode_of_the_posterior_mean(pipe, images):
    """Independent reference: diffusers' own encode -> posterior mean -> decode, unscaled (the scaling cancels)."""
    out = run_attack(image_attacks.get("regen_vae")(), images, _gen(), model=pipe)
    with torch.no_grad():
        mean = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        ref = ((pipe.vae.decode(mean).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert image_attacks.get("regen_vae")(strength=0.5).latent_noise == 0.0
    assert image_attacks.get("regen_vae")(strength=1.0).latent_noise == 0.5


def test_regen_vae_latent_noise_comes_from_the_generator_and_adds_distortion(pipe, images):
    attack = image_attacks.get("regen_vae")(latent_noise=0.5)
    a, b = run_attack(attack, images, _gen(1), pipe), run_attack(attack, images, _gen(1), pipe)
    c = run_attack(attack, images, _gen(2), pipe)
    plain = run_attack(image_attacks.get("regen_vae")(), images, _gen(1), pipe)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a - images).abs().mean()) > float((plain - images).abs().mean())


# ---------------------------------------------------------------------------------------------------------------
# regen_diffusion and rinse
# ---------------------------------------------------------------------------------------------------------------
def _manual_regeneration(pipe, images, generator, noise_step: int, steps: int) -> torch.Tensor:
    """Independent reference of one img2img regeneration: sample the VAE posterior, noise it with the scheduler to
    the first kept timestep, DDIM-denoise with the empty prompt's embedding, decode."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    keep = min(int(steps * noise_step / 1000), steps)
    timesteps = sched.timesteps[steps - keep:]
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        z = pipe.vae.encode(images * 2 - 1).latent_dist.sample(generator) * scale
        noise = torch.randn(z.shape, generator=generator)
        z = sched.add_noise(z, noise, timesteps[:1].repeat(z.shape[0]))
        ids = pipe.tokenizer([""] * images.shape[0], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
        for t in timesteps:
            eps = pipe.unet(z, t, encoder_hidden_states=text).sample
            z = sched.step(eps, t, z).prev_sample
        return (pipe.vae.decode(z / scale).sample / 2 + 0.5).clamp(0, 1)


def test_regen_diffusion_equals_a_hand_written_img2img_regeneration(pipe, images):
    attack = image_attacks.get("regen_diffusion")(noise_step=200, num_inference_steps=10)
    out = run_attack(attack, images, _gen(4), pipe)
    ref = _manual_regeneration(pipe, images, _gen(4), 200, 10)
    assert torch.allclose(out, ref, atol=2e-4), float((out - ref).abs().max())
    assert [image_attacks.get("regen_diffusion")(strength=s).noise_step for s in (0, 0.5, 1)] == [40, 120, 200]


def test_rinse_with_one_pass_is_regen_diffusion_and_two_passes_distort_more(pipe, images):
    regen = image_attacks.get("regen_diffusion")(noise_step=100, num_inference_steps=10)
    once = image_attacks.get("rinse")(passes=1, total_noise_step=100, num_inference_steps=10)
    twice = image_attacks.get("rinse")(passes=2, total_noise_step=200, num_inference_steps=10)
    a = run_attack(regen, images, _gen(7), pipe)
    assert torch.equal(a, run_attack(once, images, _gen(7), pipe))
    b = run_attack(twice, images, _gen(7), pipe)
    assert twice.noise_step_per_pass == 100
    assert float((b - images).abs().mean()) > float((a - images).abs().mean())
    assert image_attacks.get("rinse")(passes=4, strength=1.0).noise_step_per_pass == 50


# ---------------------------------------------------------------------------------------------------------------
# adv_embedding
# ---------------------------------------------------------------------------------------------------------------
def _latent_shift(pipe, a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS distance of the posterior means (scaled latent) of two image batches."""
    from markbench.latents import to_latent

    with torch.no_grad():
        za, zb = to_latent(pipe.vae, a)[0], to_latent(pipe.vae, b)[0]
    return float(((za - zb) ** 2).mean().sqrt())


def test_adv_embedding_keeps_its_budget_exactly_and_moves_the_embedding_more_than_random_noise(pipe, images):
    eps = 8 / 255
    attack = image_attacks.get("adv_embedding")(strength=1.0, steps=20)
    assert math.isclose(attack.eps, eps)
    out = run_attack(attack, images, _gen(3), pipe)
    linf = float((out - images).abs().max())
    assert linf <= eps + 1e-6
    assert torch.equal((out * 255).round() / 255, out.clamp(0, 1)) or torch.allclose(out, (out * 255).round() / 255,
                                                                                        atol=1e-6)
    # the same L-inf budget spent at random (a sign pattern at +-eps) moves the latent much less
    sign = torch.randint(0, 2, images.shape, generator=_gen(8)).float() * 2 - 1
    rand = (images + eps * sign).clamp(0, 1)
    moved, random_moved = _latent_shift(pipe, out, images), _latent_shift(pipe, rand, images)
    assert moved > 2 * random_moved, (moved, random_moved)
    assert [round(image_attacks.get("adv_embedding")(strength=s).eps * 255, 6) for s in (0, 0.5, 1)] == [2, 5, 8]


# ---------------------------------------------------------------------------------------------------------------
# averaging
# ---------------------------------------------------------------------------------------------------------------
def test_averaging_subtracts_the_mean_high_pass_residual_computed_with_torchvision():
    from torchvision.transforms.functional import gaussian_blur

    x = sample_images(8, 32, seed=5)
    attack = image_attacks.get("averaging")(images=5, blur_sigma=1.5)
    k = 2 * math.ceil(3 * 1.5) + 1
    pattern = (x[:5] - gaussian_blur(x[:5], [k, k], [1.5, 1.5])).mean(0, keepdim=True)
    assert torch.allclose(attack.apply(x, _gen()), (x - pattern).clamp(0, 1), atol=1e-5)


def test_averaging_recovers_a_fixed_mark_better_with_more_images():
    clean = sample_images(64, 32, seed=9)
    mark = (torch.randint(0, 2, (1, 3, 32, 32), generator=_gen(10)).float() * 2 - 1) * (4 / 255)
    marked = (clean + mark).clamp(0, 1)

    def corr(n: int) -> float:
        p = image_attacks.get("averaging")(images=n).pattern(marked)
        return float(torch.nn.functional.cosine_similarity(p.flatten(), mark.flatten(), dim=0))

    c2, c64 = corr(2), corr(64)
    assert c64 > 0.8 and c64 > c2 + 0.2, (c2, c64)
    out = image_attacks.get("averaging")(images=64).apply(marked, _gen())
    assert float(((out - clean) ** 2).mean()) < 0.5 * float(((marked - clean) ** 2).mean())
    assert [image_attacks.get("averaging")(strength=s).images for s in (0, 0.5, 1)] == [2, 11, 64]


def test_strength_clashes_only_with_the_parameters_it_sets(tmp_path):
    from markbench import ConfigError

    plan = _plan(tmp_path, 'name = "rinse"\npasses = 4\nstrength = 1.0')
    spec = next(s for s in plan.stages.values() if s.kind == "image_attack").plugin
    params = dict(spec.params)
    assert params["passes"] == 4 and params["total_noise_step"] == 200
    with pytest.raises(ConfigError, match="set either 'strength' or the natural parameter"):
        _plan(tmp_path, 'name = "rinse"\ntotal_noise_step = 100\nstrength = 1.0')


def test_the_stable_diffusion_attack_config_names_every_tiny_attack_at_the_published_budgets_and_plans(tmp_path):
    """configs/attacks-sd.toml (issue 27: every attack has a Stable Diffusion configuration): it reads, is at 512 px
    and 50 steps, names every image attack of configs/attacks-tiny.toml, sets the budgets the papers fix (WAVES'
    noise steps 40 / 120 / 200 and Rinse 2x / 4x, its PGD budgets 2/255 and 8/255, UnMarker's 2000 + 500 steps and
    SSIM budgets at its mid strength, the surrogate's 7,500 images per class, both forgeries), and plans on the
    SD-architecture micro pipeline with its model swapped in (no weights here)."""
    import tomllib
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    sd = load_config(configs / "attacks-sd.toml", check_output=False)
    tiny = load_config(configs / "attacks-tiny.toml", check_output=False)
    assert (sd.model.height, sd.model.width, sd.model.num_inference_steps) == (512, 512, 50)
    assert {s.name for s in tiny.image_attacks} <= {s.name for s in sd.image_attacks}
    entries = tomllib.loads((configs / "attacks-sd.toml").read_text())["image_attacks"]

    strengths = {tuple(e["strength"]) if isinstance(e["strength"], list) else (e["strength"],)
                 for e in entries if e["name"] == "regen_diffusion" and "model" not in e}
    assert strengths == {(0.0, 0.5, 1.0)}  # noise steps 40 / 120 / 200
    regen = image_attacks.get("regen_diffusion")
    assert [regen.from_strength(s)["noise_step"] for s in (0.0, 0.5, 1.0)] == [40, 120, 200]
    assert any(e["name"] == "rinse" and e.get("passes") == [2, 4] and e.get("strength") == 1.0 for e in entries)
    adv = image_attacks.get("adv_embedding")
    assert [round(adv.from_strength(s)["eps"] * 255, 6) for s in (0.0, 1.0)] == [2.0, 8.0]
    assert any(e["name"] == "adv_embedding" and e.get("strength") == [0.0, 1.0] and "encoder" not in e for e in entries)
    unmarker = next(e for e in entries if e["name"] == "unmarker")
    assert set(unmarker) == {"name"}  # the plugin's defaults: the paper's steps and the mid budgets
    u = image_attacks.get("unmarker")()
    assert (u.stage1_steps, u.stage2_steps, u.stage1_budget, u.stage2_budget) == (2000, 500, 0.011, 0.0275)
    surrogate = next(e for e in entries if e["name"] == "adv_surrogate")
    assert surrogate["train_images"] == 7500 and surrogate["mode"] == ["remove", "forge"]
    assert any(e["name"] == "averaging" and e.get("mode") == "forge" for e in entries)
    text = (configs / "attacks-sd.toml").read_text()
    text = text.replace('hub_id = "stabilityai/stable-diffusion-2-1-base"', 'builtin = "micro-sd"')
    text = text.replace("height = 512", "height = 64").replace("width = 512", "width = 64")
    text = text.replace('from = "tree-ring-sd.toml"', f'from = "{configs / "tree-ring-sd.toml"}"')
    text = text.replace('from = "gaussian-shading-sd.toml"', f'from = "{configs / "gaussian-shading-sd.toml"}"')
    plan = build_plan(load_config(write_config(tmp_path, text, output=str(tmp_path / "out")),
                                  {"run.num_images": 2, "run.device": "cpu"}, check_output=False))
    attacked = {s.plugin.name for s in plan.stages.values() if s.kind == "image_attack"}
    assert attacked == {s.name for s in sd.image_attacks} - {"none"}
