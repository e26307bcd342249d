"""The tiny world: dataset generator, tokenizer and text-tower equivalence, the shipped models and their quality."""

from __future__ import annotations

import json

import numpy as np
import pytest

from markbench.worlds.tiny import MANIFEST, TINY_CLIP, TINY_SD, shapes

SAMPLE_CAPTIONS = [
    "a small red triangle on a blue background",
    "a large white sks on a teal background",
    "a medium yellow striped hexagon on a pink background",
    "a black heart",
    "",
]

shipped = pytest.mark.skipif(not (TINY_SD / "model_index.json").exists() or not TINY_CLIP.exists(),
                             reason="no shipped tiny-world artifacts (run 'bench zoo build')")


# ------------------------------------------------------------------------------------------------ dataset
def test_dataset_is_deterministic_and_random_access():
    a, ca, ia = shapes.make_dataset("train", 12, seed=3)
    b, cb, ib = shapes.make_dataset("train", 12, seed=3)
    assert np.array_equal(a, b) and ca == cb and ia == ib
    assert a.shape == (12, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) and a.dtype == np.uint8
    c, _, _ = shapes.make_dataset("train", 12, seed=4)
    assert not np.array_equal(a, c)
    # item i does not depend on how many are drawn, or where the draw starts
    assert shapes.sample_item("train", 7, seed=3) == ia[7]
    tail, _, _ = shapes.make_dataset("train", 5, seed=3, start=7)
    assert np.array_equal(tail, a[7:12])


def test_splits_are_disjoint_and_cover_every_pair():
    train, held = shapes.combinations()
    assert set(train).isdisjoint(held)
    assert {(s, c) for s, c, _ in train} == {(s, c) for s in shapes.SHAPES for c in shapes.COLOURS}
    assert {(s, c) for s, c, _ in held} == {(s, c) for s in shapes.SHAPES for c in shapes.COLOURS}
    assert all(c != b for _, c, b in train + held)
    for split, allowed in (("train", set(train)), ("heldout", set(held))):
        for it in shapes.sample_items(split, 200, seed=0):
            assert (it.shape, it.colour, it.background) in allowed
    # held-out images also come from another random stream than training images
    assert shapes.sample_item("train", 0, 0) != shapes.sample_item("heldout", 0, 0)


@pytest.mark.parametrize("split", list(shapes.SPLITS))
def test_captions_parse_back_to_attributes(split):
    for it in shapes.sample_items(split, 50, seed=1):
        a = shapes.parse_caption(it.caption)
        assert a == {"shape": it.shape, "colour": it.colour, "background": it.background, "size": it.size,
                     "style": it.style}
    for bad in ("a red triangle", "a huge red triangle on a blue background", "a small red blob on a blue background"):
        with pytest.raises(ValueError):
            shapes.parse_caption(bad)


def test_downstream_sets_differ_from_the_base():
    base = shapes.sample_items("train", 100, seed=0)
    style = shapes.sample_items("style", 100, seed=0)
    subject = shapes.sample_items("subject", 100, seed=0)
    assert all(it.style == "solid" and it.shape in shapes.SHAPES for it in base)
    assert all(it.style == "striped" and "striped" in it.caption for it in style)
    assert all(it.shape == shapes.SUBJECT_TOKEN and shapes.SUBJECT_TOKEN not in shapes.SHAPES for it in subject)
    assert not any("striped" in c or "sks" in c for c in shapes.base_captions())
    # the same item drawn solid and striped gives different images; the arrow is no base shape
    it = base[0]
    striped = shapes.Item(it.shape, it.colour, it.background, it.size, "striped", it.dx, it.dy)
    assert _changed(shapes.render(it), shapes.render(striped)) > 0.05
    arrow = shapes.Item(shapes.SUBJECT_TOKEN, "red", "grey", "large")
    for s in shapes.SHAPES:
        assert _changed(shapes.render(arrow), shapes.render(shapes.Item(s, "red", "grey", "large"))) > 0.05


def _changed(a, b) -> float:
    """Fraction of pixels that differ visibly."""
    return float((np.abs(a.astype(int) - b.astype(int)).sum(-1) > 30).mean())


def test_shapes_are_large_and_inside_the_image():
    for it in shapes.sample_items("train", 100, seed=0):
        img = shapes.render(it).astype(int)
        bg = np.asarray(shapes.BACKGROUNDS[it.background])
        fg = np.abs(img - bg).sum(-1) > 60
        ys, xs = np.nonzero(fg)
        assert len(xs) > 0
        assert max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 >= 0.37 * shapes.IMAGE_SIZE
        assert not fg[0].any() and not fg[-1].any() and not fg[:, 0].any() and not fg[:, -1].any()


# ------------------------------------------------------------------------------------------------ tokenizer, text tower
def test_tokenizer_ids_equal_open_clips():
    from markbench.models import clip_tokenizer
    from markbench.worlds.tiny import clip_model

    oc = clip_model.tokenizer()(SAMPLE_CAPTIONS)
    hf = clip_tokenizer()(SAMPLE_CAPTIONS, padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    assert oc.shape == hf.shape == (len(SAMPLE_CAPTIONS), 77)
    for a, b in zip(oc.tolist(), hf.tolist()):
        end = a.index(49407) + 1  # open_clip pads with 0 after the first eos, transformers with eos
        assert a[:end] == b[:end]


def test_text_encoder_is_the_clip_text_tower():
    import torch

    from markbench.models import clip_tokenizer
    from markbench.worlds.tiny import clip_model

    torch.manual_seed(0)
    model = clip_model.create().eval()
    hf = clip_model.to_hf_text_encoder(model)
    ids = clip_tokenizer()(SAMPLE_CAPTIONS[:3], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.encode_text(clip_model.tokenizer()(SAMPLE_CAPTIONS[:3]))
        states = hf(ids).last_hidden_state
        eos = (ids == 49407).int().argmax(-1)
        pooled = states[torch.arange(3), eos] @ model.text_projection
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-5)


def test_zoo_command_is_wired():
    from markbench.cli import main

    assert main(["zoo"]) == 0


# ------------------------------------------------------------------------------------------------ shipped artifacts
@shipped
def test_manifest_matches_the_shipped_files():
    from markbench.worlds.tiny.info import verify

    m = json.loads(MANIFEST.read_text())
    assert verify(MANIFEST.parent, m) == []
    from markbench.worlds.tiny.build import MAX_BYTES

    assert m["total_bytes"] <= MAX_BYTES  # 60,000,000 bytes in all, the attacker models included
    assert m["total_bytes"] == sum(f.stat().st_size for f in MANIFEST.parent.rglob("*")
                                   if f.is_file() and f.name != "manifest.json")
    for key in ("clip_zero_shot_heldout", "vae_psnr_db", "ldm_heldout_accuracy"):
        assert key in m["quality"]


@shipped
def test_shipped_pipeline_loads_like_stable_diffusion():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from markbench.models import load_pipeline_folder

    pipe = load_pipeline_folder(TINY_SD)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.steps_offset == 1
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    from markbench.worlds.tiny import clip_model

    shipped_ids = pipe.tokenizer(SAMPLE_CAPTIONS, padding="max_length", max_length=77).input_ids
    for a, b in zip(clip_model.tokenizer()(SAMPLE_CAPTIONS).tolist(), shipped_ids):
        end = a.index(49407) + 1
        assert a[:end] == b[:end]
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.in_channels == 4
    # SD's module names: defences that touch "up blocks' attention" or "the VAE decoder" find them
    names = dict(pipe.unet.named_modules())
    assert any(n.startswith("up_blocks.1.attentions.0.transformer_blocks.0.attn2") for n in names)
    assert "decoder.up_blocks.0" in dict(pipe.vae.named_modules())


@shipped
def test_shipped_pipeline_generates_deterministically():
    import torch

    from markbench.models import load_pipeline_folder

    pipe = load_pipeline_folder(TINY_SD)
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", height=64, width=64)
    a = pipe(["a large red circle on a grey background"], generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(["a large red circle on a grey background"], generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b)


@shipped
def test_shipped_clip_loads_through_open_clip_local_dir():
    import open_clip
    import torch

    from markbench.worlds.tiny import clip_model

    model = open_clip.create_model(f"local-dir:{TINY_CLIP}")
    ref = clip_model.load()
    tok = clip_model.tokenizer()(SAMPLE_CAPTIONS[:2])
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_text(tok), ref.encode_text(tok))


@shipped
@pytest.mark.slow
def test_shipped_clip_zero_shot_accuracy():
    from markbench.worlds.tiny.evaluate import measure_clip

    acc = measure_clip(n=300)
    assert acc["shape"] >= 0.85 and acc["colour"] >= 0.85, acc


@shipped
@pytest.mark.slow
def test_shipped_vae_psnr():
    from markbench.worlds.tiny.evaluate import measure_vae

    psnr = measure_vae(n=64)
    assert psnr["heldout"] >= 27.0, psnr


@shipped
@pytest.mark.slow
def test_shipped_ldm_follows_prompts_and_guidance_helps():
    from markbench.worlds.tiny.evaluate import measure_ldm

    res = measure_ldm(n=56, guidances=(1.0, 5.0))
    assert res["cfg5"]["shape_and_colour"] >= 0.55, res
    assert res["cfg5"]["shape_and_colour"] > res["cfg1"]["shape_and_colour"], res


@pytest.mark.slow
def test_build_is_reproducible(tmp_path):
    """A micro build (a few steps of every stage) twice from one seed gives byte-identical weights."""
    import torch

    from markbench.worlds.tiny.build import BuildPlan, build
    from markbench.worlds.tiny.train_clip import ClipSettings
    from markbench.worlds.tiny.train_unet import UnetSettings
    from markbench.worlds.tiny.train_vae import VaeSettings

    torch.set_num_threads(1)
    sums = []
    for run in range(2):
        plan = BuildPlan(seed=5, work=tmp_path / f"work{run}", out=tmp_path / f"out{run}", measure=False,
                         clip=ClipSettings(steps=3, batch_size=8, n_train=40, n_style=8, n_subject=8, n_eval=16),
                         vae=VaeSettings(steps=2, decoder_steps=2, roundtrip_steps=2, batch_size=4, n_train=40,
                                         n_style=8, n_subject=8, n_eval=8),
                         unet=UnetSettings(steps=3, batch_size=4, n_train=40, eval_every=0),
                         vae_ind=VaeSettings(steps=2, decoder_steps=2, roundtrip_steps=0, batch_size=4, n_train=40,
                                             n_style=8, n_subject=8, n_eval=8),
                         unet_ind=UnetSettings(steps=3, batch_size=4, n_train=40, eval_every=0))
        m = build(plan)
        sums.append({c: {f: v["sha256"] for f, v in files.items() if f.endswith(".safetensors")}
                     for c, files in m["files"].items()})
    assert sums[0] == sums[1]
    assert sums[0]["tiny-sd"] and sums[0]["tiny-clip"]
    assert sorted(sums[0]["tiny-vae-ind"]) == ["vae/diffusion_pytorch_model.safetensors"]
    # stages 2 and 3 train the decoder side only: both shipped VAEs have stage 1's encoder (the UNet's latent space)
    from safetensors.torch import load_file

    def vae(folder):
        return load_file(str(tmp_path / folder / "diffusion_pytorch_model.safetensors"))

    stage1, two, rt = vae("work0/vae/stage1"), vae("out0/tiny-sd/vae"), vae("out0/tiny-sd-rt/vae")
    enc = [k for k in stage1 if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in stage1 if k.startswith("decoder.")]
    assert enc and all(torch.equal(stage1[k], two[k]) and torch.equal(stage1[k], rt[k]) for k in enc)
    assert torch.equal(stage1["post_quant_conv.weight"], two["post_quant_conv.weight"])  # stage 2: decoder only
    assert not torch.equal(two["post_quant_conv.weight"], rt["post_quant_conv.weight"])  # stage 3 trains it
    assert sum(not torch.equal(two[k], rt[k]) for k in dec) > len(dec) // 2
    # the independent attacker VAE: tiny-sd's architecture, its own seed and data, float16 on disk
    ind = vae("out0/tiny-vae-ind/vae")
    assert ind.keys() == two.keys() and {t.dtype for t in ind.values()} == {torch.float16}
    assert not any(torch.allclose(ind[k].float(), two[k]) for k in enc if two[k].numel() > 16)
    assert m["training"]["vae-ind"]["seed"] == 5 + 1000 and m["training"]["vae-ind"]["heldout_psnr"]["n"] == 256
    assert sorted(sums[0]["tiny-sd-rt"]) == ["vae/diffusion_pytorch_model.safetensors"]
    # the independent attacker UNet: tiny-sd's UNet family with fewer channels, its own seed, float16 on disk
    unet_ind = load_file(str(tmp_path / "out0/tiny-sd-ind/unet/diffusion_pytorch_model.safetensors"))
    own_unet = load_file(str(tmp_path / "out0/tiny-sd/unet/diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in unet_ind.values()} == {torch.float16}
    assert sum(t.numel() for t in unet_ind.values()) < sum(t.numel() for t in own_unet.values()) / 5
    assert m["training"]["unet-ind"]["seed"] == 5 + 1000 and m["training"]["unet-ind"]["data"]["image_seed"] == 1005
    # shipping the checkpoints of a build that is past stage 2 ships tiny-sd's (two-stage) VAE, not stage 3's
    from markbench.worlds.tiny.build import ship

    ship(tmp_path / "work0", tmp_path / "shipped", seed=5, measure=False)
    shipped = vae("shipped/tiny-sd/vae")
    assert all(torch.equal(shipped[k], two[k]) for k in two)


@pytest.mark.slow
def test_a_finished_two_stage_vae_build_resumes_without_a_third_stage(tmp_path):
    """With ``roundtrip_steps = 0`` the end of training is stage 2: the checkpoint says so, and resuming a finished
    build loads stage 2's optimiser state instead of failing on a stage-3 parameter set."""
    import torch

    from markbench.worlds.tiny.common import load_checkpoint
    from markbench.worlds.tiny.train_vae import VaeSettings, train_vae

    torch.set_num_threads(1)
    s = VaeSettings(steps=2, decoder_steps=2, roundtrip_steps=0, batch_size=4, n_train=40, n_style=8, n_subject=8,
                    n_eval=8)
    first = train_vae(tmp_path, tmp_path / "final", 5, s, resume=False)
    assert load_checkpoint(tmp_path / "vae" / "checkpoint.pt")["stage"] == 2
    again = train_vae(tmp_path, tmp_path / "final", 5, s, resume=True)
    assert again["steps"] == first["steps"] == 4 and "roundtrip_psnr" not in again
    assert not (tmp_path / "final-roundtrip").exists()
