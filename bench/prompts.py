"""Named prompt sets come from the worlds (:mod:`bench.world`), spelled ``"<world>:<set>"``.

``tiny:heldout`` (64 held-out captions of the tiny world), ``tiny:train`` (128 training captions), ``micro:shapes``
(64 captions of the same grammar, for the micro-sd plumbing model); any dataset name of a world also gives its
captions (``tiny:style``). :data:`BUILTIN_PROMPTS` maps the legacy names (``tiny``, ``tiny-train``, ``micro``: the
``builtin:<name>`` spelling) to the same sets, for configs and cache keys written before worlds existed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

from .errors import UserError
from .world import all_worlds, is_prompt_spec, load_prompt_set, prompt_set_specs


def read_prompts(spec: str, owner: str = "") -> list[str]:
    """Prompts from a world's set (``"<world>:<set>"``, or the legacy ``"builtin:<name>"``) or a text file with one
    prompt per line (blank lines and ``#`` comments skipped). ``owner`` prefixes error messages (``"sleepermark:
    prompts"``)."""
    where = f"{owner} = {spec!r}" if owner else f"prompts {spec!r}"
    if is_prompt_spec(spec) and not Path(spec).expanduser().is_file():
        try:
            return load_prompt_set(spec)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"{where}: no such file (give a prompt set such as {', '.join(prompt_set_specs()[:3])}, or a "
                        f"text file with one prompt per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: {path} is not UTF-8 text (one prompt per line)") from None
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise UserError(f"{where} holds no prompts")
    return lines


class _LegacyPrompts(Mapping):
    """Legacy name -> prompts, built on first use from the world that declares the name."""

    def _names(self) -> dict[str, str]:
        return {legacy: f"{w.name}:{name}" for w in all_worlds() for legacy, name in w.legacy_prompt_sets.items()}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        names = self._names()
        if name not in names:
            raise KeyError(name)
        return tuple(load_prompt_set(names[name]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


BUILTIN_PROMPTS: Mapping[str, tuple[str, ...]] = _LegacyPrompts()

__all__ = ["BUILTIN_PROMPTS", "load_prompt_set", "prompt_set_specs", "read_prompts"]
