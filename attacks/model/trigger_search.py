"""Keyless trigger search: find the input that wakes a trigger-activated watermark, then unlearn it."""

from __future__ import annotations

import copy
import math
import time

import torch

from markbench import DefenseKnowledge, ModelAttack, ThreatTier, Trigger, model_attacks, param
from markbench.rng import sub_generator
from markbench.training import encode_images

_ROUNDTRIP_TRIES = 4  # re-draws of a candidate whose text does not tokenise back to its tokens


@model_attacks.register("trigger_search")
class TriggerSearch(ModelAttack):
    """Trigger search (method known, trigger unknown): search the tokenizer's vocabulary for a token string that
    changes the model's output in a caption-*independent*, consistent way, decide whether it is a trigger, and, if
    it is, unlearn it exactly as the ``trigger_known`` tier's ``unlearn`` attack unlearns the true trigger.

    The attacker has the released weights and some clean image-caption pairs (``dataset``); no clean base model, no
    key, no decoder, no trigger. Three steps:

    1. **Detection statistic** (after T2IShield, Wang et al., ECCV 2024, arXiv 2407.04215). T2IShield's observation
       is that a backdoor trigger *assimilates*: whatever the rest of the prompt, the trigger imposes the same
       structure (there, on the cross-attention maps; its FTT statistic is the mean Frobenius distance of the
       prompt's token maps to their mean, small for backdoor samples). A trigger-activated watermark is trained the
       other way round: its trigger must leave the content (and so the attention layout) alone and add one fixed
       residual ``delta_z*`` to the late, low-noise denoising steps (SleeperMark, Wang et al., CVPR 2025: the
       weight ``w1(t) = sigmoid(-(t - tau)/beta)``, tau 250). The variant that fits a model attack therefore
       measures the assimilation on the *output*: for a candidate string ``s`` inserted where the method puts its
       trigger (``position``), the change of the model's clean-latent estimate
       ``D(s; c, t) = x0(z_t, t, text(s + c)) - x0(z_t, t, text(c))`` over the attacker's captions ``c`` and
       low-noise timesteps ``t < max_timestep``, at the attacker's own noised latents ``z_t``. The search maximises
       the *shared residual energy* ``S(s) = mean_pixels (mean_{c,t} D)^2`` (the caption-independent part); its
       *consistency* ``rho(s) = S(s) / mean_{c,t,pixels} D^2`` is 1 for a fixed residual and small for a change
       that depends on the caption (an ordinary word).
    2. **Search**: greedy coordinate gradient over ``num_tokens`` token slots (GCG, Zou et al. 2023,
       arXiv 2307.15043): per round, the gradient of ``S`` with respect to each slot's one-hot token gives the
       ``top_k`` most promising tokens per slot; ``candidates`` single-token swaps drawn from them are scored
       exactly and the best is kept. A candidate is a *text*: its tokens must decode to a string that tokenises back
       to the same tokens (otherwise it is re-drawn), so what is found is a prompt anyone can type. Then the found
       string is *localised* (T2IShield's localisation: the part of a prompt that still triggers is the trigger):
       tokens are dropped one at a time while ``S`` keeps at least ``localise_keep`` of its value.
    3. **Decision and follow-up**: the search claims a trigger when ``rho >= min_consistency`` and ``S`` is at
       least ``min_gain`` times the median ``S`` of ``null_samples`` random token strings of the same length (an
       outlier test as in Neural Cleanse, Wang et al., S&P 2019, on a ratio instead of a MAD index because ``S`` is
       heavy-tailed). A claimed trigger is handed, as the attacker's own knowledge, to the ``unlearn`` attack
       (``followup = "unlearn"``, its parameters ``unlearn_*``: the trigger-known tier's recipe, so a cell of this
       attack against a cell of ``unlearn`` shows whether tier 1 + search equals tier 2); nothing claimed leaves the
       weights unchanged.

    Costs recorded: seconds of the search, UNet and text-encoder evaluations (one image or prompt each), the found
    string and its tokens, ``S``, ``rho``, the null median and whether a trigger was claimed. Whether the found
    string *is* the true trigger, and whether it wakes the mark, only the harness can say (it holds the key):
    ``experiments/trigger_search_probe.py``. A trigger that is not text (WDM's input-shift latent) is outside a
    text search: it finds nothing there. Defaults: GCG's ``top_k`` (256) and ``candidates`` (512) are for a 7B
    language model on a GPU; here 64 and 32 per round; ``num_tokens = 5`` is the CLIP length of SleeperMark's
    published trigger (``*[Z]&``), ``max_timestep`` its tau (the method is known).
    """

    version = "1"
    tier = ThreatTier.METHOD_KNOWN
    attacker_has = ("the released watermarked weights, how the method works (a text trigger where it puts it, the "
                    "low-noise steps it marks; not its trigger, key or decoder) and some clean image-caption pairs")
    uses_data = True
    dataset: str = param("tiny:train", "the attacker's clean images and captions (probe and unlearning)")
    num_images: int = param(8, "probe captions and images the statistic averages over", low=2, high=1024)
    num_tokens: int = param(5, "token slots of the searched string", low=1, high=16)
    position: str = param("prefix", "where the string goes in the prompt (the method's trigger position)",
                          choices=("prefix", "suffix"))
    steps: int = param(20, "greedy coordinate gradient rounds", low=0, high=100_000)
    candidates: int = param(32, "single-token swaps scored exactly per round", low=1, high=100_000)
    top_k: int = param(64, "most promising tokens per slot (by the gradient) the swaps are drawn from",
                       low=1, high=100_000)
    max_timestep: int = param(250, "probe timesteps lie below this (SleeperMark's tau)", low=1, high=100_000)
    num_timesteps: int = param(2, "probe timesteps, evenly spaced in [0, max_timestep)", low=1, high=1000)
    null_samples: int = param(16, "random token strings whose median S is the null reference", low=1,
                              high=100_000)
    min_consistency: float = param(0.6, "smallest consistency rho of a claimed trigger", low=0.0, high=1.0)
    min_gain: float = param(2.0, "smallest S of a claimed trigger, in units of the null median S", low=0.0,
                            high=1e9)
    localise_keep: float = param(0.8, "a token is dropped when S keeps at least this share without it "
                                 "(0: no localisation)", low=0.0, high=1.0)
    followup: str = param("unlearn", "what the attacker does with a claimed trigger", choices=("unlearn", "none"))
    unlearn_steps: int = param(200, "unlearn's steps", low=0, high=1_000_000)
    unlearn_lr: float = param(1e-5, "unlearn's AdamW learning rate", low=0.0, high=1.0)
    unlearn_batch_size: int = param(4, "unlearn's images per step", low=1, high=4096)
    unlearn_num_images: int = param(64, "unlearn's dataset images", low=1, high=1_000_000)
    smoke_params = {"num_images": 2, "num_tokens": 2, "steps": 1, "candidates": 2, "top_k": 4, "num_timesteps": 1,
                    "null_samples": 2, "unlearn_steps": 1, "unlearn_num_images": 2, "unlearn_batch_size": 2}

    def apply(self, pipe, ctx):
        t0 = time.perf_counter()
        found = self.search(pipe, ctx)
        seconds = time.perf_counter() - t0
        costs = {f"search_{k}": v for k, v in found.items() if k != "trigger"}
        costs["search_seconds"] = round(seconds, 3)
        if not found["claimed"] or self.followup == "none":
            ctx.record_cost(steps=0, **costs, followup="none")
            return pipe
        # the attacker's own knowledge now: the string it found, as the trigger-known tier's attack takes it
        follow = copy.copy(ctx)
        follow.costs = {}
        follow.generator = sub_generator(ctx.generator)
        follow.knowledge = DefenseKnowledge(ThreatTier.TRIGGER_KNOWN, method=ctx.knowledge.method,
                                            trigger=found["trigger"])
        model_attacks.get("unlearn")(dataset=self.dataset, num_images=self.unlearn_num_images,
                                     steps=self.unlearn_steps, lr=self.unlearn_lr,
                                     batch_size=self.unlearn_batch_size).apply(pipe, follow)
        ctx.record_cost(**costs, followup="unlearn", **{f"unlearn_{k}": v for k, v in follow.costs.items()},
                        steps=follow.costs.get("steps", 0))
        return pipe

    # ------------------------------------------------------------------------------------------------------------
    def search(self, pipe, ctx) -> dict:
        """Run the search on ``pipe`` (unchanged); returns the found string, its statistics, the decision and the
        cost (a :class:`Trigger` under ``"trigger"`` when one is claimed)."""
        probe = _Probe(pipe, self, ctx)
        gen = sub_generator(ctx.generator)
        tokens = probe.start  # GCG's initial string: "! ! ! ..."
        best_tokens, best = tokens, probe.score([tokens])[0]
        current, current_S = best_tokens, best["S"]
        for _ in ctx.progress(range(self.steps), total=self.steps, description="trigger search"):
            top = probe.promising(current, self.top_k, current_S)
            cands = []
            for _ in range(self.candidates):
                for _ in range(_ROUNDTRIP_TRIES):
                    slot = int(torch.randint(0, len(current), (1,), generator=gen))
                    tok = int(top[slot, int(torch.randint(0, top.shape[1], (1,), generator=gen))])
                    cand = probe.canonical(current[:slot] + [tok] + current[slot + 1:])
                    if cand is not None and cand != current and cand not in cands:
                        cands.append(cand)
                        break
            if not cands:
                break
            scores = probe.score(cands)
            i = int(torch.tensor([s["S"] for s in scores]).argmax())
            # GCG keeps the round's best swap, even when it is worse than the last round's
            current, current_S = cands[i], scores[i]["S"]
            if scores[i]["S"] > best["S"]:
                best_tokens, best = cands[i], scores[i]
        if self.localise_keep > 0:
            best_tokens, best = probe.localise(best_tokens, best, self.localise_keep)
        null = probe.score([probe.random_tokens(self.num_tokens, gen) for _ in range(self.null_samples)])
        null_s = float(torch.tensor([s["S"] for s in null]).median())
        claimed = bool(best["rho"] >= self.min_consistency and best["S"] >= self.min_gain * null_s)
        text = probe.text(best_tokens)
        out = {"found": text, "tokens": list(best_tokens), "S": best["S"], "rho": best["rho"], "null_S": null_s,
               "null_rho": float(torch.tensor([s["rho"] for s in null]).median()),
               "gain": best["S"] / null_s if null_s > 0 else None, "claimed": claimed,
               "unet_evaluations": probe.unet_evals, "text_evaluations": probe.text_evals}
        out["trigger"] = (Trigger(prompt_prefix=text + " ") if self.position == "prefix"
                          else Trigger(prompt_suffix=text)) if claimed else None
        return out


class _Probe:
    """The statistic of one model: fixed probe captions, latents, timesteps and noise; the trigger-free baseline
    computed once; a candidate string scored by the change it makes (``D``, ``S``, ``rho``)."""

    def __init__(self, pipe, attack: TriggerSearch, ctx):
        self.pipe, self.attack = pipe, attack
        self.tok, self.te, self.unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
        self.unet_evals = self.text_evals = 0
        images, captions = ctx.data.dataset(attack.dataset, attack.num_images)
        gen = sub_generator(ctx.generator)
        z0 = encode_images(pipe, images)
        n = len(captions)
        T = pipe.scheduler.config.num_train_timesteps
        tmax = min(attack.max_timestep, T)
        ts = [min(tmax - 1, int((k + 0.5) * tmax / attack.num_timesteps)) for k in range(attack.num_timesteps)]
        self.t = torch.tensor(ts).repeat_interleave(n).to(z0.device)  # [R] rows: (timestep, caption)
        abar = pipe.scheduler.alphas_cumprod.to(z0.device)[self.t].float()
        self.scale = (-(1 - abar).sqrt() / abar.sqrt())[:, None, None, None]  # x0 change per eps change
        noise = torch.randn((len(ts),) + tuple(z0.shape), generator=gen).to(z0).flatten(0, 1)
        z = z0.repeat(len(ts), 1, 1, 1)
        self.zt = pipe.scheduler.add_noise(z, noise, self.t)
        self.rows = len(self.t)
        self.max_len = self.tok.model_max_length
        body = self.tok(list(captions), add_special_tokens=False, truncation=True,
                        max_length=self.max_len - 2 - attack.num_tokens).input_ids
        self.body = [list(b) for b in body] * len(ts)
        self.bos, self.eos = self.tok.bos_token_id, self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        specials = {i for i in (self.bos, self.eos, self.pad) if i is not None}
        self.excluded = sorted(specials | set(getattr(self.tok, "all_special_ids", [])))
        self.vocab = self.te.get_input_embeddings().weight.shape[0]
        self.start = list(self.tok(" ".join(["!"] * attack.num_tokens), add_special_tokens=False).input_ids)
        with torch.no_grad():
            self.eps0 = self._eps(self._cond(self._ids([]))).detach()

    # -- building prompts ----------------------------------------------------------------------------------------
    def _ids(self, tokens: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Token ids [R, L] of every probe row with ``tokens`` inserted, and the inserted tokens' first position."""
        rows, starts = [], []
        for body in self.body:
            if self.attack.position == "prefix":
                seq, start = [self.bos] + tokens + body, 1
            else:
                seq, start = [self.bos] + body + tokens, 1 + len(body)
            seq = (seq + [self.eos])[:self.max_len]
            rows.append(seq + [self.pad] * (self.max_len - len(seq)))
            starts.append(start)
        return torch.tensor(rows, device=self.te.device), starts

    def _cond(self, ids_starts, onehot: torch.Tensor | None = None) -> torch.Tensor:
        ids, starts = ids_starts
        self.text_evals += ids.shape[0]
        if onehot is None:
            return self.te(ids)[0]
        emb = self.te.get_input_embeddings()
        n = onehot.shape[0]

        def swap(_module, _args, out):  # the slots' embeddings as one-hot @ table: differentiable in the one-hot
            soft = (onehot.to(out.dtype) @ emb.weight)[None]
            out = out.clone()
            for r, s in enumerate(starts):
                out[r, s:s + n] = soft[0]
            return out

        handle = emb.register_forward_hook(swap)
        try:
            return self.te(ids)[0]
        finally:
            handle.remove()

    def _eps(self, cond: torch.Tensor) -> torch.Tensor:
        self.unet_evals += self.rows
        return self.unet(self.zt, self.t, encoder_hidden_states=cond.to(self.unet.dtype)).sample.float()

    def _stats(self, eps: torch.Tensor) -> dict:
        d = (self.scale * (eps - self.eps0)).flatten(1)  # [R, P]: change of the clean-latent estimate
        shared = d.mean(0).pow(2).mean()
        total = d.pow(2).mean()
        return {"S": shared, "rho": shared / total.clamp_min(1e-20)}

    # -- candidates ----------------------------------------------------------------------------------------------
    def score(self, candidates: list[list[int]]) -> list[dict]:
        out = []
        with torch.no_grad():
            for tokens in candidates:
                s = self._stats(self._eps(self._cond(self._ids(tokens))))
                out.append({"S": float(s["S"]), "rho": float(s["rho"])})
        return out

    def promising(self, tokens: list[int], k: int, S: float) -> torch.Tensor:
        """The ``k`` tokens per slot ``[n, k]`` whose swap promises the largest ``S``. ``S`` is a squared norm of
        the mean change ``m``, locally linear in the one-hot (``m' = m + J d``), so after a swap
        ``S' = S + lin + |J d|^2`` with ``lin = grad . d`` (GCG's estimate). Both ``S + lin`` and, when
        ``|lin| > 2 S``, ``(|lin| / (2 sqrt S) - sqrt S)^2`` (from ``|J d| >= |lin| / (2 |m|)``) are lower bounds of
        ``S'``; tokens are ranked by the larger. The second catches a swap whose effect is large but not yet
        aligned with ``m`` (GCG's ascent ranking alone would miss it)."""
        grad = self.gradient(tokens)  # [n, V]
        lin = grad - grad.gather(1, torch.tensor(tokens)[:, None])
        root = math.sqrt(max(S, 1e-30))
        bound = torch.maximum(S + lin, (lin.abs() / (2 * root) - root).clamp_min(0).pow(2))
        bound[:, self.excluded] = -math.inf
        return bound.topk(min(k, bound.shape[1] - len(self.excluded)), dim=1).indices

    def gradient(self, tokens: list[int]) -> torch.Tensor:
        """d S / d one-hot of each slot ``[n, V]`` (GCG's first-order estimate of every single-token swap)."""
        onehot = torch.zeros(len(tokens), self.vocab, device=self.te.device)
        onehot[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
        onehot.requires_grad_(True)
        with torch.enable_grad():
            s = self._stats(self._eps(self._cond(self._ids(tokens), onehot)))["S"]
            (grad,) = torch.autograd.grad(s, onehot)
        return grad.detach().float().cpu()

    def localise(self, tokens: list[int], best: dict, keep: float) -> tuple[list[int], dict]:
        """Drop tokens one at a time while ``S`` keeps at least ``keep`` of the found string's (T2IShield's
        localisation: the part that still triggers is the trigger)."""
        target = keep * best["S"]
        while len(tokens) > 1:
            shorter = [c for c in (self.canonical(tokens[:i] + tokens[i + 1:]) for i in range(len(tokens)))
                       if c is not None and len(c) < len(tokens)]
            if not shorter:
                break
            scores = self.score(shorter)
            i = int(torch.tensor([s["S"] for s in scores]).argmax())
            if scores[i]["S"] < target:
                break
            tokens, best = shorter[i], scores[i]
        return tokens, best

    def text(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

    def canonical(self, tokens: list[int]) -> list[int] | None:
        """The tokens a prompt made of their decoded text holds (None if that text is empty or longer than the
        slots): a candidate is a string anyone can type."""
        text = self.text(tokens)
        if not text:
            return None
        ids = list(self.tok(text, add_special_tokens=False).input_ids)
        return ids if 1 <= len(ids) <= self.attack.num_tokens else None

    def random_tokens(self, n: int, gen: torch.Generator) -> list[int]:
        excluded = set(self.excluded)
        while True:
            toks = [int(x) for x in torch.randint(0, self.vocab, (n,), generator=gen) if int(x) not in excluded]
            cand = self.canonical(toks) if toks else None
            if cand:
                return cand
