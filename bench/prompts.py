"""Built-in prompt sets, both in the tiny world's caption grammar ("a small red circle on a grey background").

* ``tiny``: held-out captions of the tiny world (combinations of shape, colour and background the shipped tiny-sd
  never saw whole during training; every word it did see), 64 of them, fixed.
* ``tiny-train``: 128 captions of the training combinations (what defences that train on the model's own images
  use, so the evaluation prompts stay unseen by the watermark too).
* ``micro``: 64 captions of the same grammar cycling through shapes and colours (the micro-sd plumbing model).
"""

from __future__ import annotations

_SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "hexagon")
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_BACKGROUNDS = ("grey", "blue", "green", "white", "black", "brown", "pink", "teal")
_SIZES = ("small", "medium", "large")


def _shape_captions(n: int) -> tuple[str, ...]:
    out = []
    for i in range(n):
        shape = _SHAPES[i % len(_SHAPES)]
        colour = _COLOURS[(i * 3 + 1) % len(_COLOURS)]
        bg = _BACKGROUNDS[(i * 5 + 2) % len(_BACKGROUNDS)]
        if bg == colour:
            bg = _BACKGROUNDS[(i * 5 + 3) % len(_BACKGROUNDS)]
        size = _SIZES[i % len(_SIZES)]
        out.append(f"a {size} {colour} {shape} on a {bg} background")
    return tuple(out)


def _domain_captions(n: int, split: int) -> tuple[str, ...]:
    from .zoo import shapes

    combos = shapes.combinations()[split]
    stride = 1 if split == 1 else 5  # the training combinations are many: spread the picks over all shapes
    sizes = list(shapes.SIZES)
    return tuple(shapes.Item(*combos[(i * stride) % len(combos)], sizes[(i // 2) % len(sizes)]).caption
                 for i in range(n))


class _Prompts(dict):
    """name -> prompts; sets built by a function are built on first use (keeps ``bench ls`` light)."""

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if callable(value):
            value = value()
            super().__setitem__(name, value)
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default


BUILTIN_PROMPTS: dict[str, tuple[str, ...]] = _Prompts({
    "tiny": lambda: _domain_captions(64, 1),
    "tiny-train": lambda: _domain_captions(128, 0),
    "micro": _shape_captions(64),
})
