"""The random-string control of a prompt trigger (bench/triggers.py, the ``trigger_specificity`` metric).

Values, not smoke: the strings have the trigger's token length under the real CLIP tokenizer; the probe puts each
one where the trigger goes; the metric tells a planted *specific* backdoor (only the trigger wakes it) from a
*non-specific* one (any prefix wakes it), with Clopper-Pearson intervals checked against scipy's beta quantiles and a
partly specific backdoor's share checked against a direct count of the strings it answers to.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch
from scipy import stats as st

from markbench import Defense, Detection, Embedding, MarkLocation, Secret
from markbench.config import load_config, load_prompts
from markbench.models import clip_tokenizer
from markbench.plan import build_plan
from markbench.plugins import DetectionKind, GenerationRequest, MeasureContext, Trigger
from markbench.registries import defenses, metrics
from markbench.triggers import probe_request, random_strings, token_length, trigger_text, with_string

from .conftest import MICRO_TOML, write_config

TRIGGER = "*[Z]& "  # SleeperMark's trigger (the paper's), a prefix
K = 48


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def _request(n: int = 8) -> GenerationRequest:
    return GenerationRequest(prompts=tuple(f"a red circle on blue number {i}" for i in range(n)),
                             seeds=tuple(100 + i for i in range(n)), height=64, width=64, num_inference_steps=2,
                             guidance_scale=7.5, batch_size=4)


def test_random_strings_have_the_triggers_token_length_are_distinct_and_reproducible(tok):
    n = token_length(tok, TRIGGER.strip())
    assert n == 5  # '*', '[', 'z', ']', '&' in CLIP's BPE
    a = random_strings(tok, n, 16, torch.Generator().manual_seed(1), exclude=(TRIGGER,))
    b = random_strings(tok, n, 16, torch.Generator().manual_seed(1), exclude=(TRIGGER,))
    c = random_strings(tok, n, 16, torch.Generator().manual_seed(2), exclude=(TRIGGER,))
    assert a == b and a != c
    assert len(set(a)) == 16 and TRIGGER.strip() not in a
    assert [len(tok(s, add_special_tokens=False).input_ids) for s in a] == [5] * 16
    assert all(i not in tok.all_special_ids for s in a for i in tok(s, add_special_tokens=False).input_ids)
    assert all(s.isprintable() and "\ufffd" not in s for s in a)  # text anyone can type


def test_probe_request_puts_each_string_where_the_trigger_goes_with_the_runs_prompts_and_seeds():
    req = _request(4)
    pre = probe_request(req, Trigger(prompt_prefix=TRIGGER), ["ab cd", "ef"], per_string=3)
    assert pre.prompts == ("ab cd " + req.prompts[0], "ab cd " + req.prompts[1], "ab cd " + req.prompts[2],
                           "ef " + req.prompts[3], "ef " + req.prompts[0], "ef " + req.prompts[1])
    assert pre.seeds == (100, 101, 102, 103, 100, 101)
    suf = probe_request(req, Trigger(prompt_suffix="sks"), ["ab cd"], per_string=2)
    assert suf.prompts == (req.prompts[0] + " ab cd", req.prompts[1] + " ab cd")
    assert trigger_text(Trigger(prompt_prefix=TRIGGER)) == "*[Z]&"
    assert with_string(Trigger(prompt_prefix="xyz"), "ab").prompt_prefix == "ab "  # a prefix stays separated
    with pytest.raises(ValueError, match="not text in the prompt"):
        probe_request(req, Trigger(latent=torch.zeros(1)), ["ab"], 1)


# --- planted toy backdoors: a "model" that maps a prompt to the bits its image would carry ------------------------
MESSAGE = torch.tensor([i % 3 == 0 for i in range(K)])


def _bits(prompts, caption_of, wakes, gen) -> torch.Tensor:
    rows = []
    for p in prompts:
        if wakes(p, caption_of(p)):
            rows.append(MESSAGE.clone())
        else:
            rows.append(torch.rand(K, generator=gen) < 0.5)
    return torch.stack(rows)


def _context(spec_metric, probe_bits, strings_per) -> tuple[MeasureContext, list]:
    gen = torch.Generator().manual_seed(0)
    pos = MESSAGE[None].repeat(8, 1)  # the true trigger wakes every image
    neg = torch.rand(8, K, generator=gen) < 0.5
    ctx = MeasureContext(defense=defenses.get("sleepermark")(), detection=Detection(bits=pos),
                         negatives=Detection(bits=neg), message=MESSAGE, target_fprs=(1e-6,), generator=gen,
                         detections={"random_trigger": lambda: Detection(bits=probe_bits)})
    return ctx, spec_metric.compute(ctx)


@pytest.mark.parametrize("kind", ["specific", "non_specific", "partly"])
def test_trigger_specificity_tells_a_specific_planted_backdoor_from_a_non_specific_one(tok, kind):
    req = _request(8)
    strings = random_strings(tok, 5, 16, torch.Generator().manual_seed(3), exclude=(TRIGGER,))
    probe = probe_request(req, Trigger(prompt_prefix=TRIGGER), strings, per_string=2)
    captions = {p: c for s in strings for p, c in ((with_string(Trigger(prompt_prefix=TRIGGER), s).apply(c), c)
                                                   for c in req.prompts)}
    wakes = {"specific": lambda p, c: p == TRIGGER + c,  # only the trigger
             "non_specific": lambda p, c: p != c,  # any prefix
             # a prefix whose first character is a letter: its share is counted directly from the strings below
             "partly": lambda p, c: p[:1].isalpha()}[kind]
    bits = _bits(probe.prompts, captions.__getitem__, wakes, torch.Generator().manual_seed(4))
    metric = metrics.get("trigger_specificity")(strings=16, per_string=2)
    _, out = _context(metric, bits, 2)
    got = {m.name: m for m in out}
    wake = got["random_trigger_wake@1e-06"]
    k = {"specific": 0, "non_specific": 16, "partly": sum(s[:1].isalpha() for s in strings)}[kind]
    if kind == "partly":
        assert 0 < k < 16  # the draw has both kinds of string (else the case tests nothing)
    assert wake.n == 16 and wake.value == pytest.approx(k / 16)
    low = 0.0 if k == 0 else st.beta.ppf(0.025, k, 16 - k + 1)
    high = 1.0 if k == 16 else st.beta.ppf(0.975, k + 1, 16 - k)
    assert wake.low == pytest.approx(low, abs=1e-9) and wake.high == pytest.approx(high, abs=1e-9)
    acc = got["random_trigger_bit_accuracy"]
    expected = float((bits == MESSAGE[None]).double().mean())
    assert acc.value == pytest.approx(expected) and acc.n == 32
    if kind == "specific":
        assert acc.value < 0.6
    if kind == "non_specific":
        assert acc.value == 1.0


def test_trigger_specificity_reads_nothing_without_a_probe_and_rejects_a_ragged_probe():
    from markbench.measures.specificity import wake_per_string

    metric = metrics.get("trigger_specificity")()
    ctx = MeasureContext(defense=defenses.get("sleepermark")(), detection=Detection(bits=MESSAGE[None]),
                         negatives=Detection(bits=MESSAGE[None]), message=MESSAGE, target_fprs=(1e-6,),
                         generator=torch.Generator())
    assert metric.compute(ctx) == []
    assert wake_per_string(np.array([1, 0, 0, 0, 1, 1]), 2).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="whole number"):
        wake_per_string(np.array([1, 0, 1]), 2)


SPEC_TOML = MICRO_TOML.replace('metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]',
                               'metrics = ["bit_accuracy", "tpr"{extra}]').replace(
    '[[defenses]]\nname = "dwtdctsvd"\n', '[[defenses]]\nname = "sleepermark"\n\n[[defenses]]\nname = "wdm"\n')


def test_the_probe_adds_stages_only_to_the_trigger_row_of_a_prompt_trigger_defence_and_changes_no_stage_key(
        tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = build_plan(load_config(write_config(tmp_path / "a", SPEC_TOML.replace("{extra}", ""))))
    probed = build_plan(load_config(write_config(tmp_path / "b",
                                                 SPEC_TOML.replace("{extra}", ', "trigger_specificity"'))))
    assert set(plain.stages) <= set(probed.stages)  # no existing stage key changes
    new = [probed.stages[k] for k in set(probed.stages) - set(plain.stages)]
    gens = [s for s in new if s.kind == "generate"]
    dets = [s for s in new if s.kind == "detect"]
    assert len(new) == 2 and len(gens) == 1 and len(dets) == 1
    assert gens[0].plugin.name == "sleepermark" and gens[0].extra_dict["probe"] == {"random_trigger": 16,
                                                                                     "per_string": 1}
    assert dets[0].inputs[1] == gens[0].key
    with_probe = {c.label for c in probed.cells if c.extra_detections}
    assert with_probe == {c.label for c in probed.cells if c.defense_label == "sleepermark"}
    assert all(dict(c.extra_detections)["random_trigger"] == dets[0].key for c in probed.cells if c.extra_detections)


if "_test_prompt_trigger" not in defenses:
    @defenses.register("_test_prompt_trigger")
    class PromptTrigger(Defense):
        """A toy prompt-trigger defence for the probe's plumbing: the trigger is a prefix; detection reads one bit
        per image from its mean brightness (so the stored bits are a function of the probe's own images)."""

        version = "1"
        location = MarkLocation.MODEL_WEIGHTS
        detection = DetectionKind.BITS
        variants = ("", "no_trigger")
        prompt_trigger = True

        def embed(self, pipe, ctx):
            return Embedding(Secret({"message": torch.ones(4, dtype=torch.bool)}, {"trigger": "zq xv "}))

        def known_trigger(self, secret):
            return Trigger(prompt_prefix=secret.meta["trigger"])

        def generate(self, pipe, secret, request, ctx):
            return ctx.generate(pipe, request, prompt_prefix=secret.meta["trigger"] if ctx.variant == "" else "")

        def detect(self, secret, images, ctx):
            return Detection(bits=(images.mean((1, 2, 3)) > 0.45)[:, None].repeat(1, 4))


@pytest.mark.slow  # about 17 s on the shared 2-core CPU
def test_a_run_generates_the_probe_with_strings_of_the_triggers_length_and_measures_it(tmp_path):
    from markbench.runner import Runner

    text = MICRO_TOML.replace('metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]',
                              'metrics = ["bit_accuracy", "tpr", {{ name = "trigger_specificity", strings = 3 }}]'
                              ).replace('name = "dwtdctsvd"', 'name = "_test_prompt_trigger"').replace(
        'quality = [90, 50]', 'quality = [90]')
    cfg = load_config(write_config(tmp_path, text))
    Runner(cfg).run(only="_test_prompt_trigger/none/*")
    plan = build_plan(cfg)
    probe = next(s for s in plan.stages.values() if s.extra_dict.get("probe"))
    det = next(s for s in plan.stages.values() if s.kind == "detect" and s.inputs[1] == probe.key)
    from markbench.cache import ArtifactStore

    store = ArtifactStore(cfg.output / "cache")
    strings = store.meta(probe.key)["probe_strings"]
    tok = clip_tokenizer()
    n = token_length(tok, "zq xv")
    assert len(strings) == 3 and all(token_length(tok, s) == n for s in strings)
    # the strings reached the sampled prompts, each in the trigger's place of a run prompt (not the plain captions)
    prompts = store.meta(probe.key)["probe_prompts"]
    assert len(prompts) == 3 and all(s in p for s, p in zip(strings, prompts))
    assert not set(prompts) & set(load_prompts(cfg.prompts))
    assert store.images(probe.key).shape == (3, 3, 64, 64)
    bits = store.tensors(det.key)["bits"]
    expected = float(bits.all(dim=1).double().mean())  # at FPR 0.1 a 4-bit image is detected iff all 4 match
    db = sqlite3.connect(cfg.output / "results.sqlite")
    rows = dict(db.execute("select r.metric, r.value from results r join cells c using (cell_id) where "
                           "c.defense_label = '_test_prompt_trigger' and c.model_attack_label = 'none'"))
    # 4 bits cannot reach FPR 1e-6 (nothing is detected there); at FPR 0.1 all 4 must match (P = 1/16 <= 0.1)
    assert rows["random_trigger_wake@1e-06"] == 0.0
    assert rows["random_trigger_wake@0.1"] == pytest.approx(expected)
    assert rows["random_trigger_bit_accuracy"] == pytest.approx(float(bits.double().mean()))
