"""Model attacks: each does what its docstring says, checked on the micro pipeline against direct computations."""

from __future__ import annotations

import copy

import pytest
import torch

from markbench import model_attacks
from markbench.config import ModelConfig
from markbench.models import diff_pipeline, load_pipeline
from markbench.plugins import StageContext
from markbench.testing import Resources, copy_pipeline
from markbench.weights import layer_weights


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(ModelConfig(builtin="micro-sd"))


def _apply(name, pipe, seed=0, **params):
    ctx = StageContext(torch.Generator().manual_seed(seed), data=Resources(lambda: pipe, 64, 64))
    out = model_attacks.get(name)(**params).apply(copy_pipeline(pipe), ctx)
    return out, ctx


def _changed_components(base, new):
    return {k.split(".", 1)[0] for k in diff_pipeline(base, new)}


@pytest.mark.parametrize("method", ["global_magnitude", "layer_magnitude", "random", "structured"])
def test_prune_reaches_the_sparsity(pipe, method):
    out, ctx = _apply("prune", pipe, method=method, sparsity=0.4)
    ws = [w for _, _, w in layer_weights(out, "unet")]
    base_zero = sum(int((w == 0).sum()) for _, _, w in layer_weights(pipe, "unet"))
    zero = sum(int((w == 0).sum()) for w in ws)
    total = sum(w.numel() for w in ws)
    assert ctx.costs["achieved_sparsity"] == pytest.approx(zero / total)
    assert zero / total == pytest.approx(0.4, abs=0.02) or (zero - base_zero) / total >= 0.38
    assert _changed_components(pipe, out) == {"unet"}


def test_global_magnitude_keeps_the_largest_weights(pipe):
    out, _ = _apply("prune", pipe, method="global_magnitude", sparsity=0.5)
    before = torch.cat([w.detach().abs().flatten() for _, _, w in layer_weights(pipe, "unet")])
    after = torch.cat([w.detach().flatten() for _, _, w in layer_weights(out, "unet")])
    threshold = before.kthvalue(int(0.5 * before.numel())).values
    kept = after != 0
    assert before[kept].min() >= threshold - 1e-12 and before[~kept].max() <= threshold + 1e-12


def test_structured_prune_zeroes_whole_channels(pipe):
    out, _ = _apply("prune", pipe, method="structured", sparsity=0.25)
    for _, _, w in layer_weights(out, "unet"):
        rows = w.reshape(w.shape[0], -1)
        zero_rows = int((rows.abs().sum(1) == 0).sum())
        assert zero_rows == round(0.25 * w.shape[0])
        assert int((rows == 0).sum()) == zero_rows * rows.shape[1] or zero_rows == 0


def test_random_prune_is_seeded(pipe):
    a, _ = _apply("prune", pipe, seed=1, method="random", sparsity=0.3)
    b, _ = _apply("prune", pipe, seed=1, method="random", sparsity=0.3)
    c, _ = _apply("prune", pipe, seed=2, method="random", sparsity=0.3)
    wa, wb, wc = (next(iter(layer_weights(p, "unet")))[2] for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_quantization_levels_and_error(pipe, bits):
    out, _ = _apply("quantize", pipe, method="rtn", bits=bits)
    qmax = 2 ** (bits - 1) - 1
    for (_, _, w0), (_, _, w) in zip(layer_weights(pipe, "unet"), layer_weights(out, "unet")):
        rows0 = w0.detach().reshape(w0.shape[0], -1)
        rows = w.detach().reshape(w.shape[0], -1)
        scale = rows0.abs().amax(1, keepdim=True) / qmax
        assert ((rows - rows0).abs() <= scale / 2 + 1e-6).all()  # round-to-nearest error bound
        levels = (rows / scale).round()
        assert torch.allclose(rows, levels * scale, atol=1e-6) and levels.abs().max() <= qmax


def test_half_precision_casts(pipe):
    out, _ = _apply("quantize", pipe, method="fp16")
    (_, _, w0), (_, _, w) = next(iter(layer_weights(pipe, "unet"))), next(iter(layer_weights(out, "unet")))
    assert torch.equal(w, w0.half().float())
    out, _ = _apply("quantize", pipe, method="bf16")
    w = next(iter(layer_weights(out, "unet")))[2]
    assert torch.equal(w, w0.bfloat16().float())


def test_dynamic_int8_matches_torch_per_tensor_quantization(pipe):
    out, _ = _apply("quantize", pipe, method="dynamic_int8")
    lin0 = next(m for _, m, _ in layer_weights(pipe, "unet") if isinstance(m, torch.nn.Linear))
    lin = next(m for _, m, _ in layer_weights(out, "unet") if isinstance(m, torch.nn.Linear))
    w0 = lin0.weight.detach()
    scale = (w0.max() - w0.min()) / 255  # torch's MinMax observer for qint8 weights, per tensor
    assert 0 < (lin.weight - w0).abs().max() <= scale


def test_weight_noise_is_relative(pipe):
    out, _ = _apply("weight_noise", pipe, sigma=0.1)
    ratios = []
    for (_, _, w0), (_, _, w) in zip(layer_weights(pipe, "unet"), layer_weights(out, "unet")):
        if w0.numel() > 2000:
            ratios.append(float((w - w0).std() / w0.std()))
    assert ratios and all(0.08 < r < 0.12 for r in ratios)


def test_merge_with_base_interpolates(pipe):
    marked, _ = _apply("weight_noise", pipe, sigma=1.0)
    ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: pipe, 64, 64))
    merged = model_attacks.get("merge")(alpha=0.25).apply(copy_pipeline(marked), ctx)
    for key, w in merged.unet.state_dict().items():
        expected = 0.75 * marked.unet.state_dict()[key] + 0.25 * pipe.unet.state_dict()[key]
        assert torch.allclose(w, expected, atol=1e-6)


def test_merge_with_a_finetuned_model_interpolates_with_that_finetune_not_the_base(pipe):
    marked, _ = _apply("weight_noise", pipe, sigma=1.0)
    ft = {"steps": 2, "num_images": 4, "batch_size": 2, "lr": 1e-3}
    ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: pipe, 64, 64))
    merged = model_attacks.get("merge")(other="finetuned", alpha=0.5, **ft).apply(copy_pipeline(marked), ctx)
    # the independent fine-tune: the finetune attack with the same settings and the same random stream
    other, _ = _apply("finetune", pipe, seed=0, **ft)
    assert diff_pipeline(pipe, other)  # the fine-tune moved away from the base
    for key, w in merged.unet.state_dict().items():
        if w.is_floating_point():
            expected = 0.5 * marked.unet.state_dict()[key] + 0.5 * other.unet.state_dict()[key]
            assert torch.allclose(w, expected, atol=1e-5), key


@pytest.mark.parametrize("name, params, components", [
    ("finetune", {"steps": 3, "num_images": 4, "batch_size": 2}, {"unet"}),
    ("lora", {"steps": 3, "num_images": 4, "batch_size": 2, "rank": 2}, {"unet"}),
    ("vae_decoder", {"steps": 3, "num_images": 4, "batch_size": 2}, {"vae"}),
    ("text_encoder", {"steps": 3, "num_images": 4, "batch_size": 2, "lr": 1e-3}, {"text_encoder"}),
    ("dreambooth", {"steps": 3, "num_instance_images": 2, "num_class_images": 2, "num_inference_steps": 2},
     {"unet"}),
    ("distill", {"steps": 3, "num_images": 4, "batch_size": 2}, {"unet"}),
])
def test_training_attacks_change_only_their_component(pipe, name, params, components):
    out, ctx = _apply(name, pipe, **params)
    diff = diff_pipeline(pipe, out)
    assert {k.split(".", 1)[0] for k in diff} == components
    assert ctx.costs["steps"] == 3 and ctx.costs["trainable_params"] > 0
    if name == "vae_decoder":
        assert not any(k.startswith("vae.encoder") for k in diff)
    if name == "lora":
        assert not any("lora" in k for k in out.unet.state_dict())  # merged: a plain UNet
        changed = {k.rsplit(".", 1)[0] for k in diff}
        assert changed and all(k.split(".")[-1] in ("to_q", "to_k", "to_v") or k.endswith("to_out.0")
                               for k in changed), changed


def test_finetune_learns(pipe):
    """The denoising loss on the training data goes down (the attack really trains)."""
    from markbench.training import diffusion_loss, encode_images, encode_prompts

    ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: pipe, 64, 64))
    images, captions = ctx.data.dataset("tiny:style", 8)
    lat, cond = encode_images(pipe, images), encode_prompts(pipe, captions)

    def loss(p):
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return float(sum(diffusion_loss(p.unet, p.scheduler, lat, cond, g) for _ in range(4)))

    out, _ = _apply("finetune", pipe, steps=30, num_images=8, batch_size=4, lr=1e-3)
    assert loss(out) < loss(pipe)


def test_reinitialise_draws_every_weight_afresh_at_the_kaiming_bound():
    """Independent reference: Kaiming-uniform with a = sqrt(5) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
    default init of nn.Linear); norms go to (1, 0), biases to 0; the same generator seed gives the same student."""
    from markbench.attacks.model.distill import reinitialise

    net = torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.GroupNorm(3, 300), torch.nn.Linear(300, 8))
    with torch.no_grad():
        for q in net.parameters():
            q.fill_(7.0)
    reinitialise(net, torch.Generator().manual_seed(0))
    w = net[0].weight.detach()
    bound = 1 / 400 ** 0.5
    assert float(w.abs().max()) <= bound and float(w.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.02)
    assert float(net[0].bias.abs().max()) == 0.0
    assert torch.equal(net[1].weight, torch.ones(300)) and torch.equal(net[1].bias, torch.zeros(300))
    again = copy.deepcopy(net)
    reinitialise(again, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))
    reinitialise(again, torch.Generator().manual_seed(1))
    assert not torch.equal(net[0].weight, again[0].weight)


@pytest.mark.slow
def test_distill_student_moves_towards_the_teacher(pipe):
    """A fresh student starts far from the teacher's predictions and gets closer with training (held-out inputs: the
    other captions, noise and timesteps than the attack's); the teacher's weights are no part of it."""
    from markbench.training import add_noise, encode_images, prompt_embeds

    ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: pipe, 64, 64))
    images, captions = ctx.data.dataset("tiny:heldout", 8)
    lat, cond = encode_images(pipe, images), prompt_embeds(pipe, captions, "cpu")

    def gap(p):
        g = torch.Generator().manual_seed(123)
        noisy, _, t = add_noise(pipe.scheduler, lat, g)
        with torch.no_grad():
            a = p.unet(noisy, t, encoder_hidden_states=cond).sample
            b = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        return float(torch.nn.functional.mse_loss(a, b))

    fresh, _ = _apply("distill", pipe, steps=0, num_images=8, batch_size=4)
    trained, ctx = _apply("distill", pipe, steps=40, num_images=8, batch_size=4, lr=1e-3)
    shared = [k for k, v in fresh.unet.state_dict().items() if v.dim() > 1
              and torch.equal(v, pipe.unet.state_dict()[k])]
    assert shared == []  # nothing of the teacher's weights in the student
    assert gap(trained) < 0.7 * gap(fresh)
    assert ctx.costs["teacher_queries"] == 160
    same, _ = _apply("distill", pipe, steps=0, init="teacher")
    assert gap(same) == 0.0


def test_vae_swap_to_the_base_restores_the_base_decoder_and_keeps_the_encoder(pipe):
    """A decoder changed by the owner (a Stable-Signature-like release) is exchanged for the public base's: the
    decoder side equals the base's again, the encoder side and every other component are the released model's."""
    released = copy_pipeline(pipe)
    with torch.no_grad():
        for name, p in released.vae.named_parameters():
            if name.startswith(("decoder.", "encoder.conv_in")):
                p.add_(0.01)
    ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: pipe, 64, 64))
    out = model_attacks.get("vae_swap")().apply(released, ctx)
    changed = set(diff_pipeline(pipe, out))
    assert changed and all(k.startswith("vae.encoder.conv_in") for k in changed)  # only the encoder edit is left
    assert ctx.costs["swapped_params"] == sum(p.numel() for n, p in pipe.vae.named_parameters()
                                              if n.startswith(("decoder.", "post_quant_conv")))


def test_vae_swap_takes_another_builtin_models_decoder():
    """tiny-sd with tiny-sd-rt's decoder (the same encoder, a decoder trained for round trips): decoder side equal
    to tiny-sd-rt's, encoder side to tiny-sd's, checked against both models loaded independently."""
    tiny = load_pipeline(ModelConfig(builtin="tiny-sd"))
    rt = load_pipeline(ModelConfig(builtin="tiny-sd-rt"))
    ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: tiny, 64, 64))
    out = model_attacks.get("vae_swap")(source="tiny-sd-rt").apply(copy_pipeline(tiny), ctx)
    got, want_dec, want_enc = out.vae.state_dict(), rt.vae.state_dict(), tiny.vae.state_dict()
    for k, v in got.items():
        ref = want_dec if k.startswith(("decoder.", "post_quant_conv")) else want_enc
        assert torch.equal(v, ref[k]), k
    assert any(not torch.equal(want_dec[k], want_enc[k]) for k in got if k.startswith("decoder."))  # a real change


def test_vae_swap_names_a_source_it_cannot_use_when_the_config_is_read(tmp_path):
    from markbench.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^vae_swap\.source = '.*nowhere' is neither 'base', a shipped autoencoder"):
        model_attacks.get("vae_swap")(source=str(tmp_path / "nowhere"))


def test_vae_swap_takes_a_bare_vae_folder_as_the_regeneration_attacks_do(pipe, tmp_path):
    """A diffusers VAE folder without a vae/ subfolder (what regen_vae and adv_embedding accept) is swapped in: the
    decoder side equals the folder's weights, the encoder side stays the released model's."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        other = AutoencoderKL(**{k: v for k, v in pipe.vae.config.items() if not k.startswith("_")})
    other.save_pretrained(tmp_path / "bare")
    ctx = StageContext(torch.Generator().manual_seed(0), data=Resources(lambda: pipe, 64, 64))
    out = model_attacks.get("vae_swap")(source=str(tmp_path / "bare")).apply(copy_pipeline(pipe), ctx)
    got, theirs, mine = out.vae.state_dict(), other.state_dict(), pipe.vae.state_dict()
    for k, v in got.items():
        assert torch.equal(v, (theirs if k.startswith(("decoder.", "post_quant_conv")) else mine)[k]), k


def test_low_rank_compensation_adds_the_truncated_svd_of_the_quantization_error(pipe):
    """LoRC (ZeroQuant-V2): W' = Q(W) + best rank-r approximation of W - Q(W); checked per layer against numpy's SVD,
    and the residual's Frobenius norm must be Eckart-Young's sqrt(sum of the dropped squared singular values)."""
    import numpy as np

    plain, plain_ctx = _apply("quantize", pipe, method="rtn", bits=4)
    comp, comp_ctx = _apply("quantize", pipe, method="rtn", bits=4, compensation_rank=2)
    checked = 0
    for (_, _, w0), (_, _, q), (_, _, wc) in zip(layer_weights(pipe, "unet"), layer_weights(plain, "unet"),
                                                 layer_weights(comp, "unet")):
        if w0.ndim < 2:
            continue
        err = (w0.detach() - q.detach()).reshape(w0.shape[0], -1).double().numpy()
        u, s, vh = np.linalg.svd(err, full_matrices=False)
        want = q.detach().reshape(w0.shape[0], -1).double().numpy() + (u[:, :2] * s[:2]) @ vh[:2]
        got = wc.detach().reshape(w0.shape[0], -1).double().numpy()
        assert np.allclose(got, want, atol=1e-5)
        resid = np.linalg.norm(w0.detach().reshape(w0.shape[0], -1).double().numpy() - got)
        assert resid == pytest.approx(float(np.sqrt((s[2:] ** 2).sum())), rel=1e-3, abs=1e-5)
        checked += 1
    assert checked > 3
    assert comp_ctx.costs["rms_error"] < plain_ctx.costs["rms_error"]


def test_low_rank_compensation_at_full_rank_gives_the_weights_back(pipe):
    comp, ctx = _apply("quantize", pipe, method="rtn", bits=2, compensation_rank=4096)
    for (_, _, w0), (_, _, w) in zip(layer_weights(pipe, "unet"), layer_weights(comp, "unet")):
        if w0.ndim >= 2:
            assert torch.allclose(w, w0, atol=1e-5)
    assert ctx.costs["rms_error"] < 1e-5


def test_layer_finetune_trains_only_the_named_layers_and_declares_the_method_known_tier(pipe):
    from markbench import ThreatTier

    cls = model_attacks.get("layer_finetune")
    assert cls.tier == ThreatTier.METHOD_KNOWN and model_attacks.get("finetune").tier != ThreatTier.METHOD_KNOWN
    out, ctx = _apply("layer_finetune", pipe, steps=2, num_images=4, batch_size=2, lr=1e-2)
    before = dict(pipe.unet.named_parameters())
    changed = {n for n, p in out.unet.named_parameters() if not torch.equal(p, before[n])}
    inside = {n for n in before if n.startswith("up_blocks.") and ".attentions." in n}
    assert changed and changed <= inside  # nothing outside the up-block transformers moved
    assert len(changed) > len(inside) // 2  # and most of them did
    assert ctx.costs["trainable_params"] == sum(before[n].numel() for n in inside)
    assert _changed_components(pipe, out) == {"unet"}
