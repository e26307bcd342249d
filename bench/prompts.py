"""Built-in prompt sets. ``micro`` fits the coloured-shapes world the built-in models are made for."""

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


BUILTIN_PROMPTS: dict[str, tuple[str, ...]] = {
    "micro": _shape_captions(64),
}
