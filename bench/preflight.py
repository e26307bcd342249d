"""Checks run by ``bench validate`` and by ``bench run`` before any model loads, beyond the config file's own
(:mod:`bench.config`): the model (:func:`bench.modelcheck.check_model`), every configured plugin constructed once
(plugins check their parameters against each other there), and an existing results database's schema. Anything a
run would reject as the user's input is rejected here, in one sentence, exit code 2."""

from __future__ import annotations

from .errors import UserError


def preflight(cfg, model: bool = True) -> None:
    """``model=False`` skips the model's availability (``bench validate --no-model``: a config written for another
    machine, e.g. a Stable Diffusion config on a CPU box without the weights); everything else is still checked."""
    from .modelcheck import check_model

    if model:
        check_model(cfg)
    for kind in ("defenses", "model_attacks", "image_attacks", "metrics"):
        for spec in getattr(cfg, kind):
            try:
                spec.instantiate()
            except UserError as exc:
                text = str(exc)
                raise type(exc)(text if text.startswith(str(cfg.path)) else f"{cfg.path}: {kind}: {text}") from None
            except Exception:  # a plugin that breaks on construction fails its own cells, not the run
                pass
    db = cfg.output / "results.sqlite"
    if db.is_file():
        from .store import ResultStore

        ResultStore(db).close()
