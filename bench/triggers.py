"""Random stand-ins for a prompt trigger: the control that says whether a trigger is *specific*.

A trigger-activated watermark (SleeperMark) claims that only its secret trigger wakes the mark. Whether that holds is
read by putting random strings of the trigger's token length where the trigger goes and asking the verifier how
often the mark wakes anyway (the ``trigger_specificity`` metric, :mod:`bench.measures.specificity`). Without this
control, "an attacker's search found a string that wakes the mark" cannot be told from "almost any string wakes it".

This is an evaluation on the defender's side: the harness reads the trigger (:meth:`bench.Defense.known_trigger`) to
know its token length and position, and the verifier reads the bits with the key; no attack sees either.

* :func:`token_length`: how many tokens the trigger text is (the pipeline's tokenizer, no special tokens).
* :func:`random_strings`: ``count`` strings whose text tokenizes to exactly ``n_tokens`` tokens, drawn uniformly from
  the vocabulary (special tokens excluded) with an explicit generator; the trigger itself is never drawn.
* :func:`probe_request`: the run's request with string ``i`` in the trigger's place for images ``i * per_string``
  to ``(i + 1) * per_string - 1``, which keep the run's prompts and seeds in order (image ``j`` of the probe pairs
  with image ``j`` of the cell while there are enough of them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .plugins import GenerationRequest, Trigger


def trigger_text(trigger: Trigger) -> str:
    """The trigger's text as typed (a prefix or a suffix), without its separating spaces."""
    return (trigger.prompt_prefix or trigger.prompt_suffix).strip()


def token_length(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` (no begin / end tokens)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")}
    ids |= set(getattr(tokenizer, "all_special_ids", []) or [])
    return {int(i) for i in ids if i is not None}


def random_strings(tokenizer: Any, n_tokens: int, count: int, generator: torch.Generator,
                   exclude: tuple[str, ...] = (), max_tries: int = 10_000) -> list[str]:
    """``count`` distinct strings of exactly ``n_tokens`` tokens: token ids drawn uniformly from the vocabulary
    (special tokens excluded), decoded, kept when the text is printable (no partial UTF-8 byte), tokenizes back to
    ``n_tokens`` tokens (a string anyone can type) and is none of ``exclude`` (the trigger). Deterministic given the
    generator."""
    if n_tokens < 1 or count < 1:
        raise ValueError(f"random_strings: n_tokens ({n_tokens}) and count ({count}) must be at least 1")
    vocab = len(tokenizer)
    special = _special_ids(tokenizer)
    skip = {" ".join(e.split()) for e in exclude}
    out: list[str] = []
    for _ in range(max_tries):
        ids = [int(x) for x in torch.randint(0, vocab, (n_tokens,), generator=generator)]
        if any(i in special for i in ids):
            continue
        text = " ".join(tokenizer.decode(ids, skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False).split())
        if (not text or not text.isprintable() or "\ufffd" in text or text in skip or text in out
                or token_length(tokenizer, text) != n_tokens):
            continue
        out.append(text)
        if len(out) == count:
            return out
    raise RuntimeError(f"random_strings: found only {len(out)} of {count} strings of {n_tokens} tokens in "
                       f"{max_tries} draws")


def with_string(trigger: Trigger, text: str) -> Trigger:
    """``trigger`` with its text replaced by ``text`` at the same place (a prefix keeps its trailing space)."""
    if trigger.prompt_prefix:
        tail = trigger.prompt_prefix[len(trigger.prompt_prefix.rstrip()):]
        return dataclasses.replace(trigger, prompt_prefix=text + (tail or " "))
    return dataclasses.replace(trigger, prompt_suffix=text)


def probe_request(request: GenerationRequest, trigger: Trigger, strings: list[str],
                  per_string: int) -> GenerationRequest:
    """The run's request with each of ``strings`` in the trigger's place, ``per_string`` images each, the run's
    prompts and seeds taken in order (cycled when there are more images than prompts)."""
    if not trigger.in_prompt:
        raise ValueError("probe_request: the trigger is not text in the prompt")
    n = len(request.prompts)
    prompts, seeds = [], []
    for i, s in enumerate(strings):
        t = with_string(trigger, s)
        for j in range(per_string):
            k = (i * per_string + j) % n
            prompts.append(t.apply(request.prompts[k]))
            seeds.append(request.seeds[k])
    return dataclasses.replace(request, prompts=tuple(prompts), seeds=tuple(seeds))
