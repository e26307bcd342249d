"""The attacker's own models (issue 27): the independent VAE the tiny world ships (``tiny-vae-ind``), how the
regeneration attacks and ``adv_embedding`` select a model other than the base (``regen_vae.vae``,
``regen_diffusion.model`` / ``rinse.model``, ``adv_embedding.encoder``), and black-box ``adv_embedding`` checked with
values against references computed here (diffusers' own encode, the CLIP scorer's own no-grad embedding)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from markbench import ConfigError, image_attacks
from markbench.config import PluginSpec
from markbench.models import load_attacker_pipeline, load_vae, pipeline_source, vae_source
from markbench.testing import contract_cases, run_attack
from markbench.worlds.tiny import MANIFEST, TINY_CLIP, TINY_SD, TINY_SD_IND, TINY_VAE_IND

from .attack_models import gen, model_fixtures, tiny_or_micro
from .conftest import MICRO_TOML, write_config

shipped = pytest.mark.skipif(not (TINY_VAE_IND / "vae" / "config.json").exists() or
                             not (TINY_SD / "model_index.json").exists() or not TINY_CLIP.exists(),
                             reason="the tiny world's models (tiny-sd, tiny-clip, tiny-vae-ind) are not built")
shipped_ind = pytest.mark.skipif(not (TINY_SD_IND / "unet" / "config.json").exists() or
                                 not (TINY_VAE_IND / "vae" / "config.json").exists() or
                                 not (TINY_SD / "model_index.json").exists() or not TINY_CLIP.exists(),
                                 reason="the tiny world's independent pipeline (tiny-sd-ind) is not built")


_gen = gen
pipe, images = model_fixtures()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory, pipe):
    """A VAE folder of the base VAE's architecture with other (random, seeded) weights: an attacker VAE that needs
    no shipped artifact."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        vae = AutoencoderKL(**{k: v for k, v in pipe.vae.config.items() if not k.startswith("_")})
    folder = tmp_path_factory.mktemp("attacker-vae") / "vae"
    vae.save_pretrained(folder)
    return folder


def _latent(vae, x: torch.Tensor) -> torch.Tensor:
    """Reference embedding of a VAE: diffusers' posterior mean of ``2x - 1``, times the scaling factor."""
    with torch.no_grad():
        return vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


# ---------------------------------------------------------------------------------------------------------------
# Naming an attacker model
# ---------------------------------------------------------------------------------------------------------------
def test_vae_source_tells_base_autoencoders_models_and_folders_apart_and_refuses_the_rest(vae_folder, tmp_path):
    assert vae_source("base") == ("base", None)
    assert vae_source("micro-sd") == ("model", None)
    assert vae_source(str(vae_folder)) == ("folder", vae_folder)
    assert vae_source(str(vae_folder.parent)) == ("folder", vae_folder)  # a folder with a vae/ subfolder
    with pytest.raises(ConfigError, match=r"^regen_vae\.vae = '.*nowhere' is neither 'base', a shipped autoencoder"):
        vae_source(str(tmp_path / "nowhere"), "regen_vae.vae")
    if (TINY_VAE_IND / "vae" / "config.json").exists():
        assert vae_source("tiny-vae-ind") == ("autoencoder", TINY_VAE_IND / "vae")


def test_a_diffusion_regeneration_refuses_a_bare_autoencoder_and_names_the_pipelines(tmp_path):
    assert pipeline_source("base") == ("base", None) and pipeline_source("micro-sd") == ("model", None)
    with pytest.raises(ConfigError, match=r"regen_diffusion\.model = 'tiny-vae-ind' is a standalone autoencoder, not a "
                                          r"pipeline.*built-in model \(.*tiny-sd-ind"):
        image_attacks.get("regen_diffusion")(model="tiny-vae-ind")
    with pytest.raises(ConfigError, match="rinse.model = .* nor a diffusers pipeline folder"):
        image_attacks.get("rinse")(model=str(tmp_path))


def test_the_independent_diffusion_model_is_accepted_by_name_where_it_was_refused():
    """The tiny world's independent attacker pipeline is a built-in model: both diffusion regenerations take it."""
    assert pipeline_source("tiny-sd-ind") == ("model", None)
    for name in ("regen_diffusion", "rinse"):
        assert image_attacks.get(name)(model="tiny-sd-ind").model == "tiny-sd-ind"


@pytest.mark.parametrize("attack, key, bad", [("regen_vae", "vae", "tiny-vae-x"),
                                              ("adv_embedding", "encoder", "tiny-vea-ind"),
                                              ("regen_diffusion", "model", "tiny-sd-xx")])
def test_an_unknown_attacker_model_is_one_sentence_exit_2(tmp_path, capsys, attack, key, bad):
    from markbench.cli import main

    text = MICRO_TOML.replace('name = "jpeg"\nquality = [90, 50]', f'name = "{attack}"\n{key} = "{bad}"')
    path = write_config(tmp_path, text)
    rc = main(["validate", str(path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(path) in err and f"{attack}.{key} = {bad!r}" in err and "'base'" in err


def test_the_new_parameters_leave_existing_stage_keys_alone_at_their_defaults():
    """``vae`` / ``model`` / ``encoder`` / ``clip_model`` were added after attacks-tiny's stages were computed: at
    their defaults they are not in the key (so those stages stand); another value is."""
    for name, key, other in (("regen_vae", "vae", "micro-sd"), ("regen_diffusion", "model", "micro-sd"),
                             ("rinse", "model", "micro-sd"), ("adv_embedding", "encoder", "clip"),
                             ("adv_embedding", "clip_model", "sd-world")):
        cls = image_attacks.get(name)
        default = cls().params

        def spec(params):
            return PluginSpec("image_attacks", name, tuple(sorted(params.items())), cls.version)

        assert key not in spec(default).identity()["params"]
        assert spec({**default, key: other}).identity()["params"][key] == other


def _attack_stage_extras(tmp_path, attack: str) -> list[dict]:
    from markbench.config import load_config
    from markbench.plan import build_plan

    text = MICRO_TOML.replace('name = "jpeg"\nquality = [90, 50]', attack)
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_config(tmp_path, text, output=str(tmp_path / "out")), check_output=False)
    return [s.extra_dict for s in build_plan(cfg).stages.values() if s.kind in ("image_attack", "model_attack")]


def test_an_attack_through_a_named_folder_is_keyed_by_its_weights_not_its_path(vae_folder, tmp_path):
    """The stage key holds a fingerprint of the weights a parameter names (``Param.names_model``): the same path with
    changed weights is another stage (before, a rebuilt attacker model reused the old model's cached attacks)."""
    import shutil

    folder = tmp_path / "attacker"
    shutil.copytree(vae_folder, folder / "vae")
    attack = f'name = "regen_vae"\nvae = "{folder}"'
    first = _attack_stage_extras(tmp_path / "a", attack)
    assert first and all(set(e["attacker_models"]) == {"vae"} for e in first)
    assert first == _attack_stage_extras(tmp_path / "b", attack)  # deterministic: same weights, same key
    weights = next(f for f in (folder / "vae").iterdir() if f.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes() + b"\0")  # rebuilt weights at the same path
    changed = _attack_stage_extras(tmp_path / "c", attack)
    assert [e["attacker_models"]["vae"] for e in changed] != [e["attacker_models"]["vae"] for e in first]
    # the base model is keyed by the base's own fingerprint; naming it adds nothing
    assert all("attacker_models" not in e for e in _attack_stage_extras(tmp_path / "d", 'name = "regen_vae"'))


@pytest.mark.parametrize("attack, param, kind", [
    ('name = "regen_vae"\nvae = "micro-sd"', "vae", "vae"),
    ('name = "regen_diffusion"\nmodel = "micro-sd"', "model", "pipeline"),
    ('name = "rinse"\nmodel = "micro-sd"', "model", "pipeline"),
    ('name = "adv_embedding"\nencoder = "micro-sd"', "encoder", "vae"),
    ('name = "adv_embedding"\nencoder = "clip"\nclip_model = "tiny-world"', "clip_model", "clip"),
])
def test_every_attacker_model_parameter_puts_that_models_fingerprint_in_the_key(tmp_path, attack, param, kind):
    from markbench.models import named_model_identity

    extras = [e for e in _attack_stage_extras(tmp_path, attack) if "attacker_models" in e]
    value = attack.rsplit("= ", 1)[1].strip('"')
    assert extras and all(e["attacker_models"] == {param: named_model_identity(kind, value)} for e in extras)


def test_the_clip_scorer_is_keyed_only_when_the_encoder_is_clip():
    cls = image_attacks.get("adv_embedding")
    assert cls(encoder="clip").named_models() == {"clip_model": ("clip", "tiny-world")}
    assert cls(encoder="micro-sd").named_models() == {"encoder": ("vae", "micro-sd")}
    assert cls().named_models() == {}  # the base model's encoder, keyed by the base's fingerprint


def test_a_rebuilt_shipped_attacker_model_changes_its_fingerprint(monkeypatch):
    """A shipped model is identified by its rows of the world's manifest (tiny world: ``fingerprint(name)``): a
    rebuild that changes them changes the identity of every attacker model built on it."""
    import markbench.worlds.tiny as tiny
    from markbench.models import named_model_identity

    before = {(k, v): named_model_identity(k, v) for k, v in (("vae", "tiny-vae-ind"), ("pipeline", "tiny-sd-ind"),
                                                             ("clip", "tiny-world"))}
    real = tiny.fingerprint
    for rebuilt, affected in (("tiny-vae-ind", {("vae", "tiny-vae-ind"), ("pipeline", "tiny-sd-ind")}),
                              ("tiny-sd-ind", {("pipeline", "tiny-sd-ind")}), ("tiny-clip", {("clip", "tiny-world")})):
        monkeypatch.setattr(tiny, "fingerprint", lambda m="tiny-sd", r=rebuilt: "rebuilt" if m == r else real(m))
        after = {k: named_model_identity(*k) for k in before}
        assert {k for k in before if after[k] != before[k]} == affected, rebuilt
    assert named_model_identity("vae", "base") == ""


def test_a_pipeline_folder_with_linked_components_is_keyed_by_the_linked_weights(vae_folder, tmp_path):
    """A variant pipeline folder links its components in (bench.models.variant_folder): the fingerprint follows the
    links, so changed weights behind a link change it."""
    import shutil

    from markbench.models import named_model_identity

    shutil.copytree(vae_folder, tmp_path / "real-vae")
    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    (pipe_dir / "model_index.json").write_text("{}")
    (pipe_dir / "vae").symlink_to(tmp_path / "real-vae", target_is_directory=True)
    before = named_model_identity("pipeline", str(pipe_dir))
    weights = next(f for f in (tmp_path / "real-vae").iterdir() if f.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert named_model_identity("pipeline", str(pipe_dir)) != before


def test_a_defences_pretrained_extractor_file_keys_its_embedding(tmp_path):
    """Stable Signature's ``extractor_path`` names a weights file: the embed stage holds its fingerprint, so a new file
    at the same path is a new embedding; without one (the default: train it in embed) the key is unchanged."""
    from markbench.config import load_config
    from markbench.plan import build_plan

    extractor = tmp_path / "extractor.safetensors"
    extractor.write_bytes(b"weights-1")

    def embeds(text_extra: str, sub: str) -> list[dict]:
        text = MICRO_TOML.replace('name = "dwtdctsvd"', 'name = "stable_signature"' + text_extra, 1)
        (tmp_path / sub).mkdir()
        cfg = load_config(write_config(tmp_path / sub, text, output=str(tmp_path / sub / "out")), check_output=False)
        return [s.extra_dict for s in build_plan(cfg).stages.values()
                if s.kind == "embed" and s.plugin.name == "stable_signature"]

    first = embeds(f'\nextractor_path = "{extractor}"', "a")
    assert first and all(set(e["named_models"]) == {"extractor_path"} for e in first)
    extractor.write_bytes(b"weights-22")  # another file at the same path
    assert [e["named_models"] for e in embeds(f'\nextractor_path = "{extractor}"', "b")] != \
        [e["named_models"] for e in first]
    assert all("named_models" not in e for e in embeds("", "c"))


def test_adv_embedding_refuses_a_clip_it_cannot_have():
    with pytest.raises(ConfigError, match=r"adv_embedding\.clip_model = 'RN50' is neither a world's CLIP scorer"):
        image_attacks.get("adv_embedding")(encoder="clip", clip_model="RN50")
    assert image_attacks.get("adv_embedding")(encoder="clip", clip_model="tiny-world").clip_model == "tiny-world"


def test_a_parameter_can_name_only_a_known_kind_of_model():
    from markbench import ImageAttack, PluginValidationError, param

    with pytest.raises(PluginValidationError, match="names_model='unet'.*vae, pipeline, clip"):
        class Bad(ImageAttack):  # noqa: F841
            other: str = param("base", "a model", names_model="unet")


# ---------------------------------------------------------------------------------------------------------------
# regen_vae and regen_diffusion through the attacker's model
# ---------------------------------------------------------------------------------------------------------------
def test_regen_vae_through_another_vae_equals_that_vaes_round_trip(pipe, images, vae_folder):
    from diffusers import AutoencoderKL

    theirs = AutoencoderKL.from_pretrained(str(vae_folder), local_files_only=True)
    out = run_attack(image_attacks.get("regen_vae")(vae=str(vae_folder)), images, _gen(), model=pipe)
    with torch.no_grad():
        ref = ((theirs.decode(theirs.encode(images * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    base = run_attack(image_attacks.get("regen_vae")(), images, _gen(), model=pipe)
    assert float((out - base).abs().mean()) > 0.01  # another VAE, another reconstruction


@pytest.mark.slow
def test_regen_diffusion_regenerates_with_the_pipeline_it_names(pipe):
    attack = image_attacks.get("regen_diffusion")(model="micro-sd")
    from markbench import AttackContext

    theirs = attack.attacker_pipeline(AttackContext(model=pipe))
    assert theirs is not pipe and theirs is attack.attacker_pipeline(AttackContext(model=pipe))  # loaded once
    assert theirs.unet.config.block_out_channels == image_attacks.get("regen_diffusion")().attacker_pipeline(
        AttackContext(model=theirs)).unet.config.block_out_channels
    assert image_attacks.get("rinse")().attacker_pipeline(AttackContext(model=pipe)) is pipe


# ---------------------------------------------------------------------------------------------------------------
# adv_embedding: grey-box and black-box encoders
# ---------------------------------------------------------------------------------------------------------------
class AdvEmbeddingIndependentVAE(image_attacks.get("adv_embedding")):
    """adv_embedding, black-box: the encoder of the tiny world's independent VAE (the contract's settings)."""
    name = "adv_embedding[tiny-vae-ind]"
    smoke_params = {"steps": 3, "encoder": "tiny-vae-ind"}


class AdvEmbeddingClip(image_attacks.get("adv_embedding")):
    """adv_embedding, black-box: the tiny CLIP's image tower (the contract's settings)."""
    name = "adv_embedding[clip]"
    smoke_params = {"steps": 3, "encoder": "clip"}


@shipped
@pytest.mark.parametrize("plugin, check", contract_cases(AdvEmbeddingIndependentVAE, AdvEmbeddingClip,
                                                         model=tiny_or_micro))
def test_black_box_adv_embedding_contract(plugin, check):
    check(plugin)


def _clip_embedding(x: torch.Tensor) -> torch.Tensor:
    from markbench.measures.clip_score import scorer

    return scorer("tiny-world").image_features(x).float()  # no-grad, float64-normalised: independent of the attack


ENCODERS = ("base", "tiny-vae-ind", "clip")


@pytest.fixture(scope="module")
def attacked(pipe, images) -> dict[str, torch.Tensor]:
    """adv_embedding at eps 8/255, 20 PGD steps, through each encoder."""
    return {e: run_attack(image_attacks.get("adv_embedding")(strength=1.0, steps=20, encoder=e), images, _gen(3),
                          pipe) for e in ENCODERS}


@shipped
@pytest.mark.parametrize("encoder", ENCODERS)
def test_adv_embedding_moves_the_chosen_embedding_within_its_budget(pipe, images, attacked, encoder):
    """At eps = 8/255 (20 PGD steps) the chosen encoder's embedding moves more than twice as far as under a random
    +-eps sign pattern, and further than the other encoders' attacks move it; L-inf <= eps on the 8-bit grid.
    The figures: ``python -m experiments.adv_embedding_shift``."""
    if encoder == "base":
        def emb(x):
            return _latent(pipe.vae, x)
    elif encoder == "tiny-vae-ind":
        ind = load_vae("tiny-vae-ind")

        def emb(x):
            return _latent(ind, x)
    else:
        emb = _clip_embedding
    eps = 8 / 255
    outs = attacked
    out = outs[encoder]
    assert float((out - images).abs().max()) <= eps + 1e-6
    assert torch.allclose(out, (out * 255).round() / 255, atol=1e-6)
    sign = torch.randint(0, 2, images.shape, generator=_gen(8)).float() * 2 - 1
    rand = (images + eps * sign).clamp(0, 1)
    moved, random_moved = _rms(emb(out), emb(images)), _rms(emb(rand), emb(images))
    assert moved > 2 * random_moved, (moved, random_moved)
    for other, o in outs.items():
        if other != encoder:
            assert moved > _rms(emb(o), emb(images)), (encoder, other)


# ---------------------------------------------------------------------------------------------------------------
# The shipped independent VAE
# ---------------------------------------------------------------------------------------------------------------
@shipped
def test_the_independent_vae_has_tiny_sds_architecture_but_weights_of_its_own():
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    ind = load_vae("tiny-vae-ind")
    own = AutoencoderKL.from_pretrained(str(TINY_SD / "vae"), local_files_only=True)
    skip = ("_", "scaling_factor")
    assert {k: v for k, v in ind.config.items() if not k.startswith(skip)} == \
        {k: v for k, v in own.config.items() if not k.startswith(skip)}
    assert next(ind.parameters()).dtype == torch.float32  # shipped as float16, loaded as float32
    stored = load_file(str(TINY_VAE_IND / "vae" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    theirs, mine = ind.state_dict(), own.state_dict()
    assert theirs.keys() == mine.keys()
    assert all(not torch.allclose(theirs[k], mine[k]) for k in theirs if theirs[k].numel() > 16)
    # the manifest lists it (size, checksum, training) without changing what identifies tiny-sd
    m = json.loads(MANIFEST.read_text())
    assert sorted(m["files"]["tiny-vae-ind"]) == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert m["training"]["vae-ind"]["seed"] != m["training"]["vae"]["seed"]


@shipped
def test_the_independent_vaes_held_out_psnr_is_what_the_manifest_records():
    from markbench.worlds.tiny import shapes
    from markbench.worlds.tiny.train_vae import psnr_round_trip

    rec = json.loads(MANIFEST.read_text())["training"]["vae-ind"]["heldout_psnr"]
    images, _, _ = shapes.make_dataset("heldout", 32, 1)  # the first 32 of the recorded 256
    psnr = psnr_round_trip(load_vae("tiny-vae-ind"), images)
    assert math.isfinite(psnr) and abs(psnr - rec["heldout"]) < 1.5, (psnr, rec)
    assert 20.0 < rec["heldout"] < 40.0


# ---------------------------------------------------------------------------------------------------------------
# The shipped independent diffusion model (tiny-sd-ind)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def independent():
    return load_attacker_pipeline("tiny-sd-ind")


@shipped_ind
def test_the_independent_pipeline_is_the_attackers_vae_and_unet_with_the_public_text_encoder(independent):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from markbench.models import load_pipeline_folder

    own = load_pipeline_folder(TINY_SD)
    assert isinstance(independent, StableDiffusionPipeline)
    # tiny-sd's UNet family: block types, latent shape, text conditioning, epsilon prediction; fewer channels
    same = ("down_block_types", "up_block_types", "in_channels", "out_channels", "sample_size", "cross_attention_dim",
            "addition_embed_type", "layers_per_block", "attention_head_dim")
    assert {k: independent.unet.config[k] for k in same} == {k: own.unet.config[k] for k in same}
    assert tuple(independent.unet.config.block_out_channels) == (16, 32, 48)
    n_ind, n_own = (sum(p.numel() for p in u.parameters()) for u in (independent.unet, own.unet))
    assert n_ind < n_own / 5, (n_ind, n_own)
    assert dict(independent.scheduler.config) == dict(own.scheduler.config)
    assert independent.scheduler.config.prediction_type == "epsilon"
    # the VAE is the shipped attacker VAE, weight for weight; the text encoder is tiny-sd's (the public CLIP's tower)
    vae = load_vae("tiny-vae-ind")
    assert all(torch.equal(a, b) for a, b in zip(independent.vae.state_dict().values(), vae.state_dict().values()))
    te, own_te = independent.text_encoder.state_dict(), own.text_encoder.state_dict()
    assert te.keys() == own_te.keys() and all(torch.equal(te[k], own_te[k]) for k in te)
    # stored in float16, loaded as float32
    assert next(independent.unet.parameters()).dtype == torch.float32
    stored = load_file(str(TINY_SD_IND / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}


@shipped_ind
def test_regeneration_through_the_independent_pipeline_is_stock_img2img_on_it(pipe, images, independent):
    """regen_diffusion(model="tiny-sd-ind") returns images of the input's shape, equal to diffusers' img2img run on
    the independent pipeline's components with the same generator, and unlike the base model's regeneration."""
    from diffusers import StableDiffusionImg2ImgPipeline

    attack = image_attacks.get("regen_diffusion")(model="tiny-sd-ind", noise_step=200, num_inference_steps=20)
    out = run_attack(attack, images, _gen(4), model=pipe)
    assert out.shape == images.shape and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    ref_pipe = StableDiffusionImg2ImgPipeline(
        vae=independent.vae, text_encoder=independent.text_encoder, tokenizer=independent.tokenizer,
        unet=independent.unet, scheduler=type(independent.scheduler).from_config(independent.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(prompt=[""] * len(images), image=images, strength=0.2, num_inference_steps=20,
                       guidance_scale=1.0, generator=_gen(4), output_type="pt").images.float().clamp(0, 1)
    assert torch.allclose(out, (ref * 255).round() / 255, atol=1.5 / 255)
    base = run_attack(image_attacks.get("regen_diffusion")(noise_step=200, num_inference_steps=20), images, _gen(4),
                      model=pipe)
    assert float((out - base).abs().mean()) > 0.01  # another model, another regeneration
    assert float((out - images).abs().mean()) > 0.005


@shipped_ind
def test_the_independent_unet_was_trained_apart_from_the_defenders_models():
    """Its seed (weights, batches, images) is the attacker's, not tiny-sd's; its images are the training split drawn
    from that seed (another stream than tiny-sd's: the first images differ), whose captions are all training
    combinations, so no evaluation caption (the held-out combinations) was ever trained on; its latents are the
    attacker VAE's."""
    from markbench.worlds.tiny import shapes

    m = json.loads(MANIFEST.read_text())
    rec, theirs = m["training"]["unet-ind"], m["training"]["unet"]
    assert rec["seed"] == m["training"]["vae-ind"]["seed"] != theirs["seed"]
    assert rec["data"]["image_seed"] == rec["seed"] and rec["data"]["split"] == "train"
    assert "tiny-vae-ind" in rec["data"]["latents"]
    n = 64
    mine, my_caps, _ = shapes.make_dataset("train", n, rec["data"]["image_seed"])
    defender, _, _ = shapes.make_dataset("train", n, theirs["seed"])
    differ = (mine.reshape(n, -1) != defender.reshape(n, -1)).any(axis=1)
    assert differ.mean() > 0.9, differ.mean()
    train_combos, held_combos = (set(c) for c in shapes.combinations())
    parsed = [shapes.parse_caption(c) for c in my_caps]
    assert all((p["shape"], p["colour"], p["background"]) in train_combos for p in parsed)
    assert not any((p["shape"], p["colour"], p["background"]) in held_combos for p in parsed)
    assert sorted(m["files"]["tiny-sd-ind"]) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


@shipped_ind
@pytest.mark.slow  # 56 images at guidance 5 through the small pipeline: about 30 s on the shared 2-core CPU
def test_the_independent_pipeline_draws_the_worlds_content_as_the_manifest_records():
    """Its images for held-out captions are read by the tiny CLIP with the colour and shape asked for well above
    chance (1/8 colours, 1/7 shapes), near what the manifest records for the shipped weights (the first 56 of its
    168 captions and seeds; the record is n = 168)."""
    from markbench.models import builtin_folder, load_pipeline_folder
    from markbench.worlds.tiny import clip_model
    from markbench.worlds.tiny.train_unet import evaluate_pipeline

    rec = json.loads(MANIFEST.read_text())["training"]["unet-ind"]["quality"]["ldm_heldout_accuracy"]["cfg5"]
    pipe = load_pipeline_folder(builtin_folder("tiny-sd-ind"))
    res = evaluate_pipeline(pipe, clip_model.ZeroShot(clip_model.load()), n=56, guidances=(5.0,), steps=20)["cfg5"]
    assert res["colour"] >= 0.25 and res["shape"] >= 0.25, res  # twice chance; recorded: 0.46 and 0.42 (n = 168)
    for k in ("colour", "shape", "shape_and_colour"):
        assert abs(res[k] - rec[k]) < 0.15, (k, res[k], rec[k])
