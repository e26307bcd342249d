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
        check_model(cfg)  # first: for a config written for another machine, the missing model is the news
        check_device(cfg)
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
    if db.exists() or db.is_symlink():
        from .store import ResultStore

        ResultStore(db).close()


def check_device(cfg) -> None:
    """``run.device`` names a device this machine has (``bench validate --no-model`` skips it, as it skips the model:
    a GPU config may be checked on a CPU box). With ``run.executor = "ray"`` the stages run on the cluster's machines,
    not this one, so it is not checked here."""
    device = cfg.run.device
    if device == "cpu" or cfg.run.executor != "local":  # with Ray the stages run on the cluster's machines
        return
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (index and int(index) >= count):
            have = f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise UserError(f"{cfg.path}: run.device = {device!r} is not available here ({have}); use 'cpu' "
                            f"(--set run.device=cpu), or bench validate --no-model to check the rest")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{cfg.path}: run.device = 'mps' is not available here (no Apple GPU); use 'cpu' "
                        f"(--set run.device=cpu), or bench validate --no-model to check the rest")
