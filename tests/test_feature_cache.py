"""The feature cache: FID/KID Inception features and CLIP image embeddings stored with the image sets in the artifact
store (bench.cache.FeatureCache, bench.measures.features).

Each test computes the metric without a feature cache (the reference value), then with one, then again in a new
"run" (a fresh ``ctx.shared``) on the same store, and asserts the values are equal bit for bit and that the second
run did not call the extractor. The extractors are counting stand-ins (tests/test_quality_metrics.py), except for
CLIP, where a randomly initialised tiny-world CLIP runs for real.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from markbench.cache import ArtifactStore, FeatureCache
from markbench.measures import clip_score as cs
from markbench.measures import features as feat
from markbench.registries import metrics
from tests.conftest import MICRO_TOML, write_config
from tests.test_quality_metrics import PROMPTS, Fake, by_name, make_ctx, rand_images


def _values(ms) -> dict[str, tuple]:
    return {m.name: (m.value, m.low, m.high, m.n) for m in ms}


def _with(ctx, store):
    ctx.features = store
    return ctx


@pytest.fixture
def fake(monkeypatch):
    from markbench.measures import fid

    f = Fake()
    monkeypatch.setattr(fid, "extractor", lambda *a, **k: f)
    return f


def test_fid_and_kid_from_stored_features_equal_fresh_ones_and_a_new_run_extracts_nothing(fake, tmp_path):
    x, u, ref, twin = (rand_images(6, i) for i in (1, 2, 3, 4))
    plain = {n: _values(metrics.get(n)().compute(make_ctx(x, u, ref, twins=twin))) for n in ("fid", "kid")}
    store = FeatureCache(ArtifactStore(tmp_path / "cache"))
    first = {n: _values(metrics.get(n)().compute(_with(make_ctx(x, u, ref, twins=twin, shared=s), store)))
             for n, s in (("fid", {}), ("kid", {}))}
    assert store.writes == 4  # the four distinct sets, once each: the second metric (KID) read FID's features
    assert store.reads == 4
    calls = fake.calls
    second = {n: _values(metrics.get(n)().compute(_with(make_ctx(x, u, ref, twins=twin), store)))
              for n in ("fid", "kid")}
    assert fake.calls == calls  # a new run on the same cache: no extraction at all
    assert first == plain and second == plain  # exact equality: value, interval, n
    assert all(math.isfinite(v[0]) for m in plain.values() for v in m.values())


def test_reference_dataset_and_folder_features_are_stored(fake, tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    for i, im in enumerate(rand_images(4, 9)):
        Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i}.png")
    store = FeatureCache(ArtifactStore(tmp_path / "cache"))
    x = rand_images(5, 1)
    for ref in ("tiny:heldout", str(folder)):
        fid = metrics.get("fid")(reference=ref, reference_size=6)
        plain = _values(fid.compute(make_ctx(x)))
        got = _values(fid.compute(_with(make_ctx(x), store)))
        calls = fake.calls
        again = _values(metrics.get("fid")(reference=ref, reference_size=6).compute(_with(make_ctx(x), store)))
        assert fake.calls == calls and plain == got == again


def test_a_changed_extractor_does_not_read_another_extractors_features(fake, tmp_path):
    x, ref = rand_images(5, 1), rand_images(5, 2)
    store = FeatureCache(ArtifactStore(tmp_path / "cache"))
    metrics.get("fid")().compute(_with(make_ctx(x, reference=ref), store))
    calls = fake.calls
    metrics.get("fid")(batch_size=4).compute(_with(make_ctx(x, reference=ref), store))  # another batch size
    assert fake.calls == calls + 2
    lin = torch.nn.Linear(2, 2)
    fp = feat.module_fingerprint(lin)
    lin2 = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin2.weight.copy_(lin.weight)
        lin2.bias.copy_(lin.bias)
    assert feat.module_fingerprint(lin2) == fp  # same weights, same fingerprint
    with torch.no_grad():
        lin2.bias[0] += 1e-6
    lin2.__dict__.pop("_bench_fingerprint", None)
    assert feat.module_fingerprint(lin2) != fp  # one changed weight: another extractor


def test_a_damaged_feature_entry_is_quarantined_and_recomputed(fake, tmp_path):
    x, ref = rand_images(5, 1), rand_images(5, 2)
    plain = _values(metrics.get("fid")().compute(make_ctx(x, reference=ref)))
    artifacts = ArtifactStore(tmp_path / "cache")
    store = FeatureCache(artifacts)
    metrics.get("fid")().compute(_with(make_ctx(x, reference=ref), store))
    keys = [k for k, _ in artifacts.entries()]
    assert len(keys) == 2 and all(artifacts.meta(k)["kind"] == "features" for k in keys)
    t = artifacts.path(keys[0]) / "tensors.safetensors"
    data = bytearray(t.read_bytes())
    data[-1] ^= 0x01
    t.write_bytes(bytes(data))
    calls = fake.calls
    assert _values(metrics.get("fid")().compute(_with(make_ctx(x, reference=ref), store))) == plain
    assert fake.calls == calls + 1 and len(list((tmp_path / "cache" / "quarantine").iterdir())) == 1


@pytest.fixture
def random_clip(tmp_path):
    from markbench.worlds.tiny import clip_model

    torch.manual_seed(3)
    folder = tmp_path / "clip"
    clip_model.save(clip_model.create(None), folder)
    return folder


def test_clip_scores_from_stored_embeddings_equal_fresh_ones(random_clip, tmp_path, monkeypatch):
    calls = []
    real = cs.ClipScorer.image_features

    def counted(self, images):
        calls.append(images.shape[0])
        return real(self, images)

    monkeypatch.setattr(cs.ClipScorer, "image_features", counted)
    images, reference, unattacked, twins = (rand_images(4, i) for i in (1, 2, 3, 4))
    clip = metrics.get("clip_score")(pretrained=str(random_clip))
    plain = _values(clip.compute(make_ctx(images, unattacked, reference, prompts=PROMPTS, twins=twins)))
    store = FeatureCache(ArtifactStore(tmp_path / "cache"))
    first = _values(clip.compute(_with(make_ctx(images, unattacked, reference, prompts=PROMPTS, twins=twins),
                                       store)))
    n = len(calls)
    again = metrics.get("clip_score")(pretrained=str(random_clip)).compute(
        _with(make_ctx(images, unattacked, reference, prompts=PROMPTS, twins=twins), store))
    assert len(calls) == n and store.reads == 4  # a new run: the image tower did not run
    assert plain == first == _values(again)
    assert by_name(again)["clip_score"].samples == by_name(clip.compute(
        make_ctx(images, unattacked, reference, prompts=PROMPTS, twins=twins)))["clip_score"].samples


SMALL = MICRO_TOML.replace('metrics = ["bit_accuracy", "tpr", "pvalue", "auc", "psnr", "ssim"]',
                           'metrics = ["tpr", "fid", "kid", {{name = "clip_score", pretrained = "random"}}]')
SMALL = SMALL.replace('[run]\n', '[run]\ncache = "{cache}"\n').replace("quality = [90, 50]", "quality = [50]")


def test_a_new_output_folder_on_the_same_cache_extracts_no_features(fake, tmp_path, monkeypatch):
    from markbench.config import load_config
    from markbench.runner import Runner
    from markbench.store import ResultStore

    clip_calls = []
    real = cs.ClipScorer.image_features
    monkeypatch.setattr(cs.ClipScorer, "image_features",
                        lambda self, images: clip_calls.append(1) or real(self, images))

    def run(name):
        cfg = load_config(write_config(tmp_path, SMALL, name=f"{name}.toml", output=str(tmp_path / name),
                                       cache=str(tmp_path / "cache")))
        runner = Runner(cfg)
        assert runner.run().ok
        store = ResultStore(tmp_path / name / "results.sqlite")
        try:
            df = store.dataframe()
        finally:
            store.close()
        return runner.features, {(r.cell, r.metric): (r.value, r.low, r.high) for r in df.itertuples()}

    first, a = run("a")
    calls, clip_n = fake.calls, len(clip_calls)
    assert first.writes > 0 and calls > 0 and clip_n > 0
    second, b = run("b")
    assert fake.calls == calls and len(clip_calls) == clip_n  # neither Inception nor CLIP's image tower ran
    assert second.writes == 0 and second.reads > 0
    assert {k for k in a if k[1].startswith(("fid", "kid", "clip"))} and a == b
