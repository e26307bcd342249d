"""A suspect service that filters prompts: tokens that are not words are dropped before sampling."""

from __future__ import annotations

import re

from markbench import ModelAttack, ThreatTier, model_attacks, param

_EDGE = "\"'.,;:!?()"


@model_attacks.register("prompt_sanitise")
class PromptSanitise(ModelAttack):
    """The suspect model's owner serves it behind a prompt filter that drops every whitespace-separated token that is
    not a word, so a verifier's rare-token trigger never reaches the model (a property of the verification
    protocol, issue 29's tier "method known": the attacker knows triggers are rare strings, not which one).

    Where it lives and why: it is a model attack that declares ``serves_prompts`` (the weights stay as they are;
    every prompt the served model is sampled with, the verifier's included, goes through :meth:`serve_prompt`), not
    an image attack (images are made after the filter) nor a defence option (the filter is the suspect's choice,
    not the owner's). ``mode = "words"``: a token survives if, stripped of surrounding punctuation
    (``"'.,;:!?()``), it is letters with inner hyphens or apostrophes ("sky-blue", "don't"); ``"alnum"`` also keeps
    digits. Input-sanitisation defences against textual backdoors filter rare tokens in the same way (e.g. ONION,
    Qi et al., EMNLP 2021, drops the tokens whose removal most lowers the perplexity); this rule-based filter is the
    cheapest of them and needs no language model. A verifier that does not go through prompts (WDM's white-box
    extraction) is unaffected by construction.
    """

    version = "1"
    tier = ThreatTier.METHOD_KNOWN
    serves_prompts = True
    resources = {"num_gpus": 0}  # no weights change
    attacker_has = ("control of the service that runs the suspect model (its prompt handling); the weights are "
                    "unchanged; no trigger, key or decoder")
    mode: str = param("words", "which tokens survive", choices=("words", "alnum"))

    def apply(self, pipe, ctx):
        ctx.record_cost(steps=0, note="weights unchanged: the service filters prompts")
        return pipe

    def serve_prompt(self, prompt: str) -> str:
        word = re.compile(r"^[^\W\d_]+(?:[-'][^\W\d_]+)*$" if self.mode == "words" else r"^[^\W_]+(?:[-'][^\W_]+)*$")
        kept = [tok for tok in prompt.split() if word.match(tok.strip(_EDGE) or "-")]
        return " ".join(kept)
