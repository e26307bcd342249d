"""What a downstream fine-tune was for: did the model learn the new style or subject? (attacker utility)

A fine-tuning attack on ``tiny:style`` teaches the tiny world a style it never saw (striped shapes), one on
``tiny:subject`` a new subject bound to the rare token ``sks`` (DreamBooth). Its utility to the attacker is how often
the fine-tuned model's images show it, judged zero-shot by the tiny world's CLIP (:mod:`worlds.tiny.clip_model`) on
held-out captions of that split (:func:`eval_captions`: drawn with seed 1; the attacks train on seed 0's draws):

* ``style``: an image counts if the CLIP finds it closer to its caption ("a large red striped circle on a grey
  background") than to the same caption without the word "striped", AND it shows the caption's content: the CLIP's
  zero-shot classifier (:class:`worlds.tiny.clip_model.ZeroShot`) reads the caption's shape and colour;
* ``subject``: an image counts if, among its caption with the token and with each of the 7 base shapes in the
  token's place, the CLIP picks the token, AND the zero-shot classifier reads the caption's colour.

The content gate is what makes a broken model score low: without it uniform noise and a flat grey image both read
"striped" in 32 of 32 held-out captions (1.00), and noise reads ``sks`` 0.53 of the time; with it they read 0.016 and
0.05. Rendered images of the world read 0.72 (style: the classifier's shape-and-colour accuracy on striped shapes is
the ceiling) and 0.98 (subject). ``tests/test_utility.py`` checks these bounds.

The tiny world answers :meth:`bench.world.World.downstream_task` with these (``None`` for its other splits); the
core reaches them only through :mod:`bench.downstream`, the ``attacker_utility`` metric
(:mod:`bench.measures.utility`) and ``benchmarks/downstream.py`` through it.
"""

from __future__ import annotations

import numpy as np
import torch

from markbench.downstream import DownstreamTask

EVAL_SEED = 1  # held-out captions: the attacks' datasets are drawn with seed 0


def task_for(split: str, token: str | None = None) -> DownstreamTask | None:
    """The recognisable task of one of the tiny world's splits (``style``, ``subject``), else None."""
    if split not in ("style", "subject"):
        return None
    from . import shapes

    def captions(n: int, split: str = split) -> list[str]:
        """``n`` held-out captions of the split (seed :data:`EVAL_SEED`), the same for every call."""
        return [it.caption for it in shapes.sample_items(split, n, seed=EVAL_SEED)]

    kind = split
    token = (token or shapes.SUBJECT_TOKEN) if kind == "subject" else ""
    task = DownstreamTask(f"tiny:{split}", kind, token, captions=captions,
                          hits=lambda images, caps: Recogniser.shared().hits(task, images, caps))
    return task


class Recogniser:
    """Zero-shot yes/no questions to the tiny CLIP with in-grammar captions (loaded once per process)."""

    _instance: "Recogniser | None" = None

    def __init__(self, pretrained: str | None = None):
        from . import clip_model

        self.model = clip_model.load(pretrained) if pretrained else clip_model.load()
        self.model.eval().requires_grad_(False)
        self.tok = clip_model.tokenizer()
        self.preprocess = clip_model.preprocess

    @classmethod
    def shared(cls) -> "Recogniser":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    @torch.no_grad()
    def _text(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tok(captions), normalize=True)

    @torch.no_grad()
    def _image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.preprocess(images.float().clamp(0, 1) * 2 - 1), normalize=True)

    @property
    def zero_shot(self):
        """The world's zero-shot shape / colour / background / size classifier on the same CLIP (built once)."""
        if getattr(self, "_zero_shot", None) is None:
            from .clip_model import ZeroShot

            self._zero_shot = ZeroShot(self.model)
        return self._zero_shot

    def same_content(self, images: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
        """Per image: the zero-shot classifier reads the same shape and colour in ``images[i]`` as in
        ``reference[i]`` (bool ``[N]``): the content an attack must keep."""
        if images.shape[0] != reference.shape[0]:
            raise ValueError(f"same_content: {images.shape[0]} images against {reference.shape[0]} references")
        a = self.zero_shot.predict(images.float().clamp(0, 1) * 2 - 1)
        b = self.zero_shot.predict(reference.float().clamp(0, 1) * 2 - 1)
        return np.array([a["shape"][i] == b["shape"][i] and a["colour"][i] == b["colour"][i]
                         for i in range(images.shape[0])], dtype=bool)

    def content_hits(self, images: torch.Tensor, captions: list[str], shape: bool = True) -> np.ndarray:
        """Per image: the zero-shot classifier reads the caption's colour (and shape, if ``shape``) (bool ``[N]``)."""
        from . import shapes

        pred = self.zero_shot.predict(images.float().clamp(0, 1) * 2 - 1)
        truth = [shapes.parse_caption(c) for c in captions]
        return np.array([pred["colour"][i] == t["colour"] and (not shape or pred["shape"][i] == t["shape"])
                         for i, t in enumerate(truth)], dtype=bool)

    def striped_hits(self, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        """Per image: closer to its striped caption than to the same caption without 'striped', and the caption's
        shape and colour read by the zero-shot classifier (bool ``[N]``)."""
        f = self._image(images)
        with_s = self._text(captions)
        without = self._text([c.replace("striped ", "") for c in captions])
        striped = ((f * with_s).sum(1) > (f * without).sum(1)).numpy()
        return striped & self.content_hits(images, captions, shape=True)

    def subject_hits(self, images: torch.Tensor, captions: list[str], token: str) -> np.ndarray:
        """Per image: its best caption, over the token and the 7 base shapes in the token's place, names the token,
        and the caption's colour is read by the zero-shot classifier (bool ``[N]``)."""
        from . import shapes

        f = self._image(images)
        words = [token, *shapes.SHAPES]
        sims = torch.stack([(f * self._text([c.replace(token, w) for c in captions])).sum(1) for w in words], 1)
        return (sims.argmax(1) == 0).numpy() & self.content_hits(images, captions, shape=False)

    def striped(self, images: torch.Tensor, captions: list[str]) -> float:
        return float(self.striped_hits(images, captions).mean())

    def subject(self, images: torch.Tensor, captions: list[str], token: str) -> float:
        return float(self.subject_hits(images, captions, token).mean())

    def hits(self, task: DownstreamTask, images: torch.Tensor, captions: list[str]) -> np.ndarray:
        """Per-image recognition of the task's style or subject (bool ``[N]``)."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"downstream recognition: {images.shape[0]} images but {len(captions)} captions")
        if task.kind == "style":
            return self.striped_hits(images, captions)
        return self.subject_hits(images, captions, task.token)
