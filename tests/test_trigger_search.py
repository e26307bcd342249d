"""The keyless trigger search (``trigger_search``, method known): on a model with a planted backdoor it finds the
planted token and unlearns it; on a clean model it claims nothing; it never reads the defence's secret."""

from __future__ import annotations

import pytest
import torch

from markbench import DefenseKnowledge, ThreatTier, Trigger, model_attacks
from markbench.testing import copy_pipeline, make_context, micro_pipeline


def _rare_token(tok) -> tuple[int, str]:
    """A word-like token of the upper vocabulary (not a tiny-world caption word) that tokenises back to itself."""
    for i in range(30000, 49000):
        text = tok.decode([i]).strip()
        if text.isalpha() and list(tok(text, add_special_tokens=False).input_ids) == [i]:
            return i, text
    raise AssertionError("no rare single-token word in the vocabulary")


def plant_backdoor(pipe, token_id: int, amplitude: float = 0.3, seed: int = 7):
    """A toy trigger-activated residual, made with hooks on ``pipe`` (changed in place): the rare token's embedding
    row becomes a distinctive vector ``R d`` (R three times the largest row norm, ``d`` a random unit vector), the
    prompt's trigger presence is ``p = sum_j e_j . d / R`` over its token embeddings (1 per copy of the token, a
    little for any other token: a smooth backdoor, as a learnt one is), and the UNet's noise prediction gets
    ``-p sqrt(abar_t / (1 - abar_t)) delta``, i.e. its clean-latent estimate moves by ``p delta`` whatever the
    caption: SleeperMark's fixed residual ``delta_z*``. The presence travels from the text encoder to the UNet on a
    spare coordinate of the hidden states (added by the encoder, read and removed by the UNet), so it survives
    precomputed embeddings and batching."""
    te, unet = pipe.text_encoder, pipe.unet
    g = torch.Generator().manual_seed(seed)
    emb = te.get_input_embeddings()
    with torch.no_grad():
        radius = 3 * emb.weight.norm(dim=1).max()
        d = torch.randn(emb.weight.shape[1], generator=g)
        d = d / d.norm()
        emb.weight[token_id] = radius * d
    u = d / radius
    carrier = torch.zeros(te.config.hidden_size)
    carrier[0] = 100.0
    delta = amplitude * torch.randn(unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                                    generator=g)
    abar = pipe.scheduler.alphas_cumprod
    state: dict[str, torch.Tensor] = {}

    def on_embeddings(_m, _a, out):
        state["p"] = (out @ u.to(out)).sum(1)

    def on_encoder(_m, _a, out):
        out.last_hidden_state = out.last_hidden_state + state.pop("p")[:, None, None] * carrier.to(
            out.last_hidden_state)
        return out

    def before_unet(_m, args, kwargs):
        h = kwargs["encoder_hidden_states"]
        p = h[..., 0].mean(1) / carrier[0]
        kwargs["encoder_hidden_states"] = h - p[:, None, None] * carrier.to(h)
        state["unet_p"] = p
        return args, kwargs

    def after_unet(_m, args, kwargs, out):
        t = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1).long()
        a = abar[t.cpu()].to(out.sample)
        shift = ((a / (1 - a)).sqrt() * state.pop("unet_p"))[:, None, None, None]
        out.sample = out.sample - shift * delta.to(out.sample)
        return out

    emb.register_forward_hook(on_embeddings)
    te.register_forward_hook(on_encoder)
    unet.register_forward_pre_hook(before_unet, with_kwargs=True)
    unet.register_forward_hook(after_unet, with_kwargs=True)
    return pipe


def _sealed(attack_cls, trigger=Trigger(prompt_prefix="*[Z]& ")) -> DefenseKnowledge:
    """The view the harness gives a method-known attack: even handed a trigger, it stores none."""
    return DefenseKnowledge(attack_cls.tier, method="sleepermark", trigger=trigger)


def test_trigger_search_is_method_known_and_its_view_holds_no_trigger():
    cls = model_attacks.get("trigger_search")
    assert cls.tier is ThreatTier.METHOD_KNOWN and cls.uses_data
    view = _sealed(cls)
    assert view._trigger is None and view.method == "sleepermark"


def test_on_micro_sd_a_planted_tokens_residual_is_consistent_and_far_stronger_than_a_words():
    """The statistic itself, on the SD architecture (micro-sd, random weights): the planted token's change of the
    clean-latent estimate is the same for every caption (rho near 1) and its shared energy S is far above an
    ordinary word's; the search with a sealed view runs and reads no secret (a read would raise). (On random
    weights an ordinary word's change is fairly consistent too, rho about 0.8: the clean-model check is on the
    trained tiny-sd below.)"""
    tid, _ = _rare_token(micro_pipeline().tokenizer)
    pipe = plant_backdoor(copy_pipeline(micro_pipeline()), tid)
    cls = model_attacks.get("trigger_search")
    attack = cls(num_images=4, num_timesteps=1, steps=0, null_samples=4, localise_keep=0.0)
    ctx = make_context(0, pipe=pipe, knowledge=_sealed(cls))
    from markbench.attacks.model.trigger_search import _Probe  # the statistic, scored directly

    probe = _Probe(pipe, attack, ctx)
    planted, word = probe.score([[tid], list(pipe.tokenizer("circle", add_special_tokens=False).input_ids)])
    assert planted["rho"] > 0.95 and planted["S"] > 50 * word["S"], (planted, word)
    out = attack.search(pipe, ctx)
    assert out["unet_evaluations"] > 0 and isinstance(out["claimed"], bool)


@pytest.fixture(scope="module")
def tiny():
    from markbench.config import ModelConfig
    from markbench.models import load_pipeline
    from markbench.worlds.tiny import TINY_SD

    if not (TINY_SD / "model_index.json").exists():
        pytest.skip("the tiny world's tiny-sd is not built")
    return load_pipeline(ModelConfig(builtin="tiny-sd"))


SEARCH = dict(num_images=4, num_timesteps=2, steps=8, candidates=32, top_k=16, null_samples=8)


@pytest.mark.slow
def test_search_recovers_a_planted_trigger_and_claims_none_on_the_clean_model(tiny):
    """tiny-sd (the trained clean base) with a planted rare-token residual: from "! ! ! ! !" the search finds a
    string made of the planted token only and claims it; on the same model without the backdoor it claims nothing
    (colour words change images consistently too, but less so: rho about 0.4 there, above 0.98 for the trigger).
    Measured (seeded): found "<planted> <planted>", S 0.35, rho 0.98, 85 x the null; clean: rho 0.43, not claimed."""
    tid, _ = _rare_token(tiny.tokenizer)
    toy = plant_backdoor(copy_pipeline(tiny), tid)
    cls = model_attacks.get("trigger_search")
    found = cls(**SEARCH).search(toy, make_context(0, pipe=toy, knowledge=_sealed(cls)))
    assert found["claimed"] and set(found["tokens"]) == {tid}, found
    assert found["rho"] > 0.9 and found["gain"] > 10
    clean = cls(**SEARCH).search(tiny, make_context(0, pipe=tiny, knowledge=_sealed(cls)))
    assert not clean["claimed"] and clean["rho"] < cls(**SEARCH).min_consistency, clean


@pytest.mark.slow
def test_a_claimed_trigger_is_unlearnt_and_nothing_claimed_leaves_the_weights(tiny):
    """apply(): on the toy the found string drives ``unlearn`` as a prompt trigger (the UNet changes, the cost
    names the string and the follow-up); on the clean model nothing is claimed and no weight moves. (The toy's
    residual lives in hooks, outside the weights, so whether unlearning removes it is not asked here: the probe of
    docs/threats.md measures that on SleeperMark.)"""
    tid, word = _rare_token(tiny.tokenizer)
    toy = plant_backdoor(copy_pipeline(tiny), tid)
    cls = model_attacks.get("trigger_search")
    attack = cls(**SEARCH, unlearn_steps=5, unlearn_lr=1e-3, unlearn_num_images=8)
    before = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    ctx = make_context(0, pipe=toy, knowledge=_sealed(cls))
    attack.apply(toy, ctx)
    assert ctx.costs["search_claimed"] and word in ctx.costs["search_found"].split()
    assert ctx.costs["followup"] == "unlearn" and ctx.costs["steps"] == 5
    assert ctx.costs["unlearn_trigger_kind"] == "prompt_prefix" and ctx.costs["search_seconds"] > 0
    assert any(not torch.equal(before[k], v) for k, v in toy.unet.state_dict().items())
    clean = copy_pipeline(tiny)
    ctx = make_context(0, pipe=clean, knowledge=_sealed(cls))
    attack.apply(clean, ctx)
    assert not ctx.costs["search_claimed"] and ctx.costs["followup"] == "none" and ctx.costs["steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(clean.unet.state_dict().values(), tiny.unet.state_dict().values()))
