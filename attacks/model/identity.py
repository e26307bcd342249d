"""The unattacked model (identity)."""

from __future__ import annotations

from markbench import ModelAttack, model_attacks


@model_attacks.register("none")
class NoModelAttack(ModelAttack):
    """No model attack: the model as the defence left it. The planner adds no stage for an identity attack."""

    version = "1"
    identity = True
    attacker_has = "nothing (no attack)"

    def apply(self, pipe, ctx):
        return pipe
