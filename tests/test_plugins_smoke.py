"""The plugin contract (bench.testing) parametrized over the registries: a newly registered defence, model attack
or metric is exercised without a new test (image attacks: tests/test_image_attacks.py).

Plugins may declare ``smoke_params`` (e.g. few training steps) so this stays fast.
"""

from __future__ import annotations

import pytest
import torch

from markbench import metrics, model_attacks
from markbench.registries import defenses
from markbench.plugins import Detection, MeasureContext
from markbench.testing import PROMPT, contract_cases


def _public(registry):
    """The registry's plugins, less the deliberately broken ones of tests/plugins_for_tests (``_test*``)."""
    return [registry.get(n) for n in registry.names() if not n.startswith("_test")]


@pytest.mark.parametrize("plugin, check", contract_cases(_public(defenses)))
def test_defense_contract(plugin, check):
    check(plugin)


@pytest.mark.parametrize("plugin, check", contract_cases(_public(model_attacks)))
def test_model_attack_contract(plugin, check):
    check(plugin)


@pytest.mark.parametrize("plugin, check", contract_cases(_public(metrics)))
def test_metric_contract(plugin, check):
    check(plugin)


@pytest.mark.parametrize("name", ["bit_accuracy", "tpr"])
def test_detection_metrics_on_the_synthetic_cell(name):
    """The synthetic cell of the metric contract, with values: 45 of 48 bits right on every image."""
    g = torch.Generator().manual_seed(0)
    message = torch.randint(0, 2, (48,), generator=g).bool()
    pos = message.repeat(8, 1)
    pos[:, :3] = ~pos[:, :3]
    neg = torch.randint(0, 2, (8, 48), generator=g).bool()
    imgs = torch.rand(8, 3, 32, 32, generator=g)
    ctx = MeasureContext(defense=defenses.get("none")(), detection=Detection(bits=pos), negatives=Detection(bits=neg),
                         message=message, target_fprs=(1e-6,), generator=g,
                         loaders={"images": lambda: imgs, "unattacked": lambda: imgs, "clean_twins": lambda: imgs,
                                  "reference": lambda: imgs}, prompts=(PROMPT,) * 8)
    by = {m.name: m for m in metrics.get(name)().compute(ctx)}
    if name == "bit_accuracy":
        assert by["bit_accuracy"].value == pytest.approx(45 / 48)
    else:
        assert by["tpr@1e-06"].value == 1.0  # 45 >= 41 bits, the threshold at FPR 1e-6
