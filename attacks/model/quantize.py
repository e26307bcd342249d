"""Weight quantization: round-to-nearest at b bits, torch dynamic int8, and half-precision casts."""

from __future__ import annotations

import torch

from markbench import model_attacks, ModelAttack, param
from markbench.weights import SCOPES, layer_weights


@model_attacks.register("quantize")
class Quantize(ModelAttack):
    """Quantize the Linear/Conv weights of ``scope`` and store them dequantized (what a quantized release computes).

    * ``rtn``: symmetric round-to-nearest at ``bits`` bits, per output channel (``per_channel=true``) or per tensor:
      ``s = max|w| / (2^(b-1) - 1)``, ``w_q = clamp(round(w / s), -(2^(b-1)-1), 2^(b-1)-1) * s`` (the baseline of
      GPTQ, Frantar et al. ICLR 2023, and of Q-Diffusion, Li et al. ICCV 2023). An independent report finds
      SleeperMark keeps 99.3 % bit accuracy at 4 bits.
    * ``dynamic_int8``: torch's ``quantize_dynamic`` on Linear layers (per-tensor affine int8 weights); the int8
      weights are stored dequantized. The *activation* quantization that dynamic quantization also does at run time
      cannot live in stored weights and is not simulated: this is the weight half of that attack.
    * ``fp16`` / ``bf16``: cast to half precision and back (the rounding a half-precision release applies).

    ``compensation_rank > 0``: low-rank compensation of the quantization error (LoRC, Yao et al., "ZeroQuant-V2",
    arXiv 2303.08302): each quantized weight, reshaped to ``[out, in * k * k]``, gets back the best rank-r
    approximation of its error ``W - Q(W)`` (truncated SVD), stored beside the quantized weight as a low-rank adapter
    in a real release and added here: ``W' = Q(W) + U_r S_r V_r^T``. It recovers part of what rounding removed, at
    ``r (out + in k k)`` extra numbers per layer: the "low-rank-compensated quantisation" of issue 29's suite.
    """

    version = "1"
    goal = "compression"
    attacker_has = "the released watermarked weights only"
    resources = {"num_gpus": 0}  # a one-pass weight edit: a CPU worker is enough
    method: str = param("rtn", "quantizer", choices=("rtn", "dynamic_int8", "fp16", "bf16"))
    bits: int = param(8, "bits per weight for rtn", low=2, high=16)
    per_channel: bool = param(True, "rtn: one scale per output channel (else per tensor)")
    scope: str = param("unet", "which component", choices=SCOPES)
    compensation_rank: int = param(0, "rank of the low-rank compensation of each layer's quantization error (LoRC; "
                                   "0: none)", low=0, high=4096, keyed_at_default=False)

    def apply(self, pipe, ctx):
        layers = list(layer_weights(pipe, self.scope))
        err = 0.0
        with torch.no_grad():
            for _, module, w in layers:
                q = compensate(w.detach().float(), self._quantize(module, w.detach()).float(), self.compensation_rank)
                err += float((q - w).float().pow(2).sum())
                w.copy_(q.to(w.dtype))
        n = sum(w.numel() for _, _, w in layers)
        ctx.record_cost(steps=0, weights_quantized=n, rms_error=(err / max(1, n)) ** 0.5)
        return pipe

    def _quantize(self, module: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
        if self.method == "fp16":
            return w.half().to(w.dtype)
        if self.method == "bf16":
            return w.bfloat16().to(w.dtype)
        if self.method == "dynamic_int8":
            if not isinstance(module, torch.nn.Linear):
                return w  # torch's dynamic quantization covers Linear layers only
            return _dynamic_int8(module)
        qmax = 2 ** (self.bits - 1) - 1
        wf = w.float()
        if self.per_channel:
            scale = wf.reshape(wf.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12) / qmax
            scale = scale.view(-1, *([1] * (wf.ndim - 1)))
        else:
            scale = wf.abs().amax().clamp_min(1e-12) / qmax
        return (wf / scale).round().clamp(-qmax, qmax) * scale


def compensate(w: torch.Tensor, q: torch.Tensor, rank: int) -> torch.Tensor:
    """``q`` plus the best rank-``rank`` approximation (Eckart-Young: truncated SVD) of the error ``w - q``, with
    both reshaped to ``[out, rest]``; ``rank`` 0 returns ``q`` unchanged."""
    if rank <= 0 or w.ndim < 2:
        return q
    err = (w - q).reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(err, full_matrices=False)
    r = min(rank, s.numel())
    low = (u[:, :r] * s[:r]) @ vh[:r]
    return q + low.to(q.dtype).reshape(q.shape)


def _dynamic_int8(linear: torch.nn.Linear) -> torch.Tensor:
    import warnings

    from torch.ao.quantization import quantize_dynamic

    holder = torch.nn.Sequential(torch.nn.Linear(linear.in_features, linear.out_features,
                                                 bias=linear.bias is not None))
    holder[0].weight.data.copy_(linear.weight.detach().float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(holder, {torch.nn.Linear}, dtype=torch.qint8)
    return q[0].weight().dequantize().to(linear.weight.device)  # quantize_dynamic runs on the CPU
