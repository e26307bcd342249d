"""The held-out downstream loss of attacker utility: planned for downstream fine-tunes only, stored per image, equal
to an independent computation (UNet + scheduler.add_noise written out here), cached (a second run computes
nothing), and keyed apart from every existing stage."""

from __future__ import annotations

import pytest
import torch

from markbench.config import load_config
from markbench.plan import build_plan
from markbench.runner import Runner

from .conftest import MICRO_TOML, write_config

#: a one-step LoRA on tiny:style and pruning, on the micro model, with the attacker-utility metric (no FID, random
#: CLIP: the test is about the loss)
CONFIG = MICRO_TOML.replace('metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]\n', "").replace(
    "quality = [90, 50]", "quality = [90]") + """
[[metrics]]
name = "tpr"

[[metrics]]
name = "attacker_utility"
fid = false
clip_pretrained = "random"

[[model_attacks]]
name = "lora"
steps = 1

[[model_attacks]]
name = "prune"
"""


def _config(tmp_path):
    return load_config(write_config(tmp_path, CONFIG), {})


def test_the_planner_adds_heldout_losses_for_downstream_fine_tunes_only(tmp_path):
    cfg = _config(tmp_path)
    plan = build_plan(cfg)
    base = next(k for k, s in plan.stages.items() if s.kind == "base")
    for cell in plan.cells:
        values = dict(cell.extra_values)
        if cell.model_attack.name != "lora":
            assert values == {}
            continue
        assert set(values) == {"heldout_loss_marked", "heldout_loss_clean", "heldout_loss_base", "heldout_loss_start"}
        # the starting point: the unattacked watermarked model (the embedding, or the base for a post-hoc mark)
        start = plan.stages[values["heldout_loss_start"]].inputs[0]
        assert plan.stages[start].kind in ("embed", "base")
        assert plan.stages[start].kind == "base" or plan.stages[start].plugin.name == cell.defense.name
        assert set(values.values()) <= {s.key for s in plan.closure([cell])}
        assert plan.stages[values["heldout_loss_base"]].inputs == (base,)
        clean = plan.stages[values["heldout_loss_clean"]].inputs[0]
        assert plan.stages[clean].kind == "model_attack"
        proto = plan.stages[values["heldout_loss_base"]].extra_dict["protocol"]
        assert (proto["dataset"], proto["n"], proto["data_seed"]) == ("tiny:style", 4, 1)


def _independent_loss(pipe, images, captions, seed=1234, repeats=4):
    """The protocol written out: posterior-mean latents, text states, per repeat t ~ U{0..T-1} then noise, both from
    one generator seeded once, z_t = scheduler.add_noise(z, noise, t), per-image MSE to the noise, mean over repeats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
        total = torch.zeros(len(captions))
        for _ in range(repeats):
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(captions),), generator=g)
            noise = torch.randn(z.shape, generator=g)
            pred = pipe.unet(pipe.scheduler.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
            total += ((pred - noise) ** 2).mean((1, 2, 3))
    return total / repeats


def test_the_stored_heldout_loss_equals_an_independent_computation_and_is_cached(tmp_path):
    from markbench.data import load_image_captions

    cfg = _config(tmp_path)
    runner = Runner(cfg)
    summary = runner.run(only="none/lora*")
    assert summary.cells_failed == []
    assert summary.stages_run.get("downstream_loss") == 2  # the none defence: marked = clean model
    plan = build_plan(cfg)
    cell = next(c for c in plan.cells if c.model_attack.name == "lora" and c.defense.name == "none")
    values = dict(cell.extra_values)
    images, captions = load_image_captions("tiny:style", 4, 64, 64, seed=1)
    from markbench.modelcheck import load_base
    from markbench.models import apply_overrides

    base = load_base(cfg)
    attacked = runner.artifacts.tensors(plan.stages[values["heldout_loss_clean"]].inputs[0])
    attacked = apply_overrides(base, {k[len("model."):]: v for k, v in attacked.items() if k.startswith("model.")})
    for role, pipe in (("heldout_loss_base", base), ("heldout_loss_clean", attacked)):
        stored = runner.artifacts.tensors(values[role])["loss"]
        expected = _independent_loss(pipe, images, captions)
        assert stored.shape == (4,)
        torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-6)
    # the attacked model's loss differs from the base's (the LoRA step changed the UNet), and is stored per image
    assert not torch.equal(runner.artifacts.tensors(values["heldout_loss_clean"])["loss"],
                           runner.artifacts.tensors(values["heldout_loss_base"])["loss"])
    # the metric reports them, lower is better, with their per-image values
    from markbench.store import ResultStore

    df = ResultStore(cfg.output / "results.sqlite").dataframe()
    row = df[(df["metric"] == "utility_heldout_loss_clean") & (df["cell_id"] == cell.key)].iloc[0]
    clean = runner.artifacts.tensors(values["heldout_loss_clean"])["loss"]
    assert abs(row["value"] - float(clean.double().mean())) < 1e-6 and row["n"] == 4
    assert row["higher_is_better"] == 0
    # a second run computes nothing
    again = Runner(cfg).run(only="none/lora*")
    assert again.stages_run == {} and again.cells_failed == []


def test_a_folder_datasets_heldout_split_is_the_images_after_those_the_attack_trains_on(tmp_path):
    import numpy as np
    from PIL import Image

    from markbench.downstream import heldout_data

    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    images, captions = heldout_data(str(tmp_path), 4, 8, 8, skip=3)
    assert captions == ["caption 3", "caption 4"]  # the attack (num_images = 3) trains on 0, 1, 2
    assert torch.allclose(images[:, 0, 0, 0], torch.tensor([120 / 255, 160 / 255]))
    assert heldout_data(str(tmp_path), 4, 8, 8, skip=5) is None  # nothing held out: no loss


def test_a_non_finite_heldout_loss_is_reported_as_no_number_with_a_note_not_a_crash():
    from markbench.plugins import Detection, MeasureContext
    from markbench.registries import metrics, model_attacks

    from .test_utility import _Bits

    values = {"heldout_loss_marked": lambda: torch.tensor([0.02, float("nan")]),
              "heldout_loss_clean": lambda: torch.tensor([0.02, 0.04]),
              "heldout_loss_base": lambda: torch.tensor([0.03, 0.05])}
    ctx = MeasureContext(defense=_Bits(), detection=Detection(), negatives=Detection(), message=None,
                         target_fprs=(), generator=torch.Generator().manual_seed(0), values=values,
                         model_attack=model_attacks.get("lora")(dataset="tiny:subject"))
    out = {m.name: m for m in metrics.get("attacker_utility")(fid=False).compute(ctx)}
    assert out["utility_heldout_loss"].value != out["utility_heldout_loss"].value  # NaN
    assert "1 of 2 images give a non-finite loss" in out["utility_heldout_loss"].note
    assert out["utility_heldout_loss_clean"].value == pytest.approx(0.03)
    assert out["utility_heldout_loss_clean"].samples == pytest.approx((0.02, 0.04))
    assert not out["utility_heldout_loss_base"].higher_is_better


def test_a_dataset_without_heldout_images_is_reported_as_no_number_with_a_note():
    from markbench.plugins import Detection, MeasureContext
    from markbench.registries import metrics, model_attacks

    from .test_utility import _Bits

    empty = lambda: torch.zeros(0)  # noqa: E731 - what the stage stores for a folder with no held-out images
    values = {"heldout_loss_marked": empty, "heldout_loss_clean": empty, "heldout_loss_base": empty}
    ctx = MeasureContext(defense=_Bits(), detection=Detection(), negatives=Detection(), message=None,
                         target_fprs=(), generator=torch.Generator().manual_seed(0), values=values,
                         model_attack=model_attacks.get("lora")(dataset="tiny:subject"))
    out = {m.name: m for m in metrics.get("attacker_utility")(fid=False).compute(ctx)}
    assert out["utility_heldout_loss"].value != out["utility_heldout_loss"].value  # NaN: no number
    assert out["utility_heldout_loss"].n == 0 and "has no held-out images" in out["utility_heldout_loss"].note
