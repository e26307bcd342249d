"""Gaussian Shading: message bits in the signs of the sampler's initial noise, encrypted with a stream cipher.

Yang, Zeng, Zhang, Ma, Yu, Qian, "Gaussian Shading: Provable Performance-Lossless Image Watermarking for Diffusion
Models", CVPR 2024, arXiv 2404.04956 (official code: bsmhmmlf/Gaussian-Shading; read for facts only).

* Message: ``k`` bits laid out as a ``[C / channel_copies, h / hw_copies, w / hw_copies]`` block and repeated
  ``channel_copies`` times over channels and ``hw_copies x hw_copies`` times over space, so the copies tile the whole
  latent ``[C, h, w]``. The block size, hence ``k``, is *derived from the pipeline's latent shape* (the official code
  assumes 4x64x64): at Stable Diffusion's 4x64x64 with the paper's factors (1 and 8) ``k = 4 * 8 * 8 = 256``.
* Encryption: the repeated bits are XOR-ed with a ChaCha20 keystream (``cryptography`` package; 256-bit key and
  nonce drawn per deployment), so every latent element's bit is uniform and independent of the message.
* Sampling: element ``i`` of the initial noise is drawn from the half of N(0, 1) its encrypted bit selects
  (``z_i = Phi^-1((u_i + b_i) / 2)`` with ``u_i`` uniform). Here ``u_i`` comes from the image seed's standard noise
  ``n_i``: ``z_i = |n_i|`` for a 1 and ``-|n_i|`` for a 0, exactly the same distribution, so the marked noise is
  still N(0, I) (the paper's "performance-lossless" claim) and image ``i`` keeps its seed.
* Detection: invert the image (:mod:`bench.inversion`), take the signs, decrypt with the same keystream, and take
  the majority vote over the copies of each bit. Bit accuracy and TPR at a binomial threshold at the target FPR
  (the harness's statistics). One key and message per run seed: a deployment, not a fresh key per image as the
  official script does.

Paper defaults: ``channel_copies = 1``, ``hw_copies = 8`` (256 bits at 4x64x64), FPR 1e-6, 50 DDIM steps. On a
smaller latent the same factors leave fewer bits (4x16x16: 16 bits, too few to reach FPR 1e-6 at all); the
tiny-world config scales ``hw_copies`` and says why.
"""

from __future__ import annotations

import torch

from markbench import Defense, Detection, DetectionKind, Embedding, MarkLocation, param, Secret
from markbench.registries import defenses
from markbench.errors import require
from markbench.generation import initial_latents
from markbench.inversion import INVERSION_METHODS, invert_images, latent_shape
from markbench.plugins import QualityMeasure, ThreatSetting


def block_shape(shape: tuple[int, int, int], channel_copies: int, hw_copies: int) -> tuple[int, int, int]:
    """The message block ``[C / channel_copies, h / hw_copies, w / hw_copies]`` for a latent ``[C, h, w]``."""
    c, h, w = shape
    if c % channel_copies or h % hw_copies or w % hw_copies:
        raise ValueError(f"gaussian_shading: the latent {c}x{h}x{w} is not divisible by channel_copies "
                         f"{channel_copies} and hw_copies {hw_copies}")
    return c // channel_copies, h // hw_copies, w // hw_copies


def repeat_bits(block: torch.Tensor, channel_copies: int, hw_copies: int) -> torch.Tensor:
    """Tile a message block ``[c, h', w']`` to the latent: channel copies x spatial copies."""
    return block.repeat(channel_copies, hw_copies, hw_copies)


def majority_vote(bits: torch.Tensor, block: tuple[int, int, int], channel_copies: int, hw_copies: int
                  ) -> torch.Tensor:
    """``[N, C, h, w]`` bits -> ``[N, k]`` bits by majority over the copies (ties count as 1, as ``>= 0.5``)."""
    n = bits.shape[0]
    c, hh, ww = block
    x = bits.float().reshape(n, channel_copies, c, hw_copies, hh, hw_copies, ww)
    return x.mean(dim=(1, 3, 5)).reshape(n, -1) >= 0.5


def keystream_bits(key: bytes, nonce: bytes, n_bits: int) -> torch.Tensor:
    """``n_bits`` bits of the ChaCha20 keystream (``cryptography``'s ChaCha20; 16-byte counter+nonce)."""
    ciphers = require("cryptography.hazmat.primitives.ciphers", "crypto")
    enc = ciphers.Cipher(ciphers.algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    stream = enc.update(bytes((n_bits + 7) // 8))
    raw = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    bits = (raw[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:n_bits].bool()


@defenses.register("gaussian_shading")
class GaussianShading(Defense):
    """Gaussian Shading (Yang et al., CVPR 2024, arXiv 2404.04956): message bits, repeated over channels and space
    and encrypted with ChaCha20, choose the sign half of each initial-noise element; detection by DDIM inversion,
    decryption and majority vote (multi-bit: bit accuracy, TPR at a binomial threshold).

    Paper defaults: 1 channel copy, 8x8 spatial copies (256 bits at a 4x64x64 latent; the bit count follows the
    pipeline's latent shape), 50 inversion steps. Protects a model served behind an API (the provider samples).
    """

    version = "1"
    location = MarkLocation.INITIAL_NOISE
    detection = DetectionKind.BITS
    threat = ThreatSetting.API
    quality_measures = (QualityMeasure.DISTRIBUTION,)
    uses_data = True  # the message length is the latent's block size, read from the pipeline at the run's size
    channel_copies: int = param(1, "copies of the message block over the latent channels", low=1, high=64)
    hw_copies: int = param(8, "copies per spatial side (hw_copies^2 spatial copies)", low=1, high=128)
    inversion: str = param("ddim", "inversion: plain DDIM or exact (fixed-point)", choices=INVERSION_METHODS,
                           verifier=True)
    inversion_steps: int = param(0, "DDIM inversion steps; 0 = the run's sampler steps (paper: 50 and 50)", low=0,
            high=1000, verifier=True)
    fixed_point_iters: int = param(3, "fixed-point iterations per step of the exact inversion", low=1, high=50,
                                   verifier=True)
    decoder_inversion_steps: int = param(0, "gradient steps of decoder inversion before the DDIM inversion (Hong et al. "
                                         "2024); 0 = the encoder's posterior mean alone (the paper's)", low=0,
                                         high=5000, keyed_at_default=False, verifier=True)
    decoder_inversion_lr: float = param(0.05, "Adam learning rate of decoder inversion (cosine to 0)", low=1e-5,
                                        high=1.0, keyed_at_default=False, verifier=True)
    smoke_params = {"hw_copies": 2, "inversion_steps": 2}

    def _layout(self, shape) -> tuple[int, int, int]:
        return block_shape(tuple(int(s) for s in shape), self.channel_copies, self.hw_copies)

    def embed(self, pipe, ctx) -> Embedding:
        shape = latent_shape(pipe, ctx.data.height, ctx.data.width)
        block = self._layout(shape)
        g = ctx.generator
        message = torch.randint(0, 2, block, generator=g).bool().reshape(-1)
        key = torch.randint(0, 256, (32,), generator=g, dtype=torch.int64).to(torch.uint8)
        nonce = torch.randint(0, 256, (16,), generator=g, dtype=torch.int64).to(torch.uint8)
        return Embedding(Secret({"message": message, "key": key, "nonce": nonce},
                                {"latent_shape": list(shape), "block": list(block), "cipher": "ChaCha20"}))

    def _stream(self, secret: Secret, shape) -> torch.Tensor:
        n = int(torch.Size(shape).numel())
        stream = keystream_bits(bytes(secret.tensors["key"].tolist()), bytes(secret.tensors["nonce"].tolist()), n)
        return stream.reshape(tuple(shape))

    def encrypted_bits(self, secret: Secret, shape) -> torch.Tensor:
        """The latent-shaped bits that choose each element's sign half: repeated message XOR keystream."""
        block = self._layout(shape)
        message = secret.tensors["message"].bool()
        if message.numel() != block[0] * block[1] * block[2]:
            raise ValueError(f"gaussian_shading: the message has {message.numel()} bits, a {tuple(shape)} latent "
                             f"holds {block[0] * block[1] * block[2]} at these copy factors")
        tiled = repeat_bits(message.reshape(block), self.channel_copies, self.hw_copies)
        return tiled ^ self._stream(secret, shape)

    def generate(self, pipe, secret: Secret, request, ctx) -> torch.Tensor:
        noise = initial_latents(pipe, request.seeds, request.height, request.width)
        bits = self.encrypted_bits(secret, noise.shape[1:])
        latents = torch.where(bits[None], noise.abs(), -noise.abs())
        return ctx.generate(pipe, request, latents=latents)

    def decode(self, secret: Secret, latents: torch.Tensor) -> torch.Tensor:
        """Inverted latents ``[N, C, h, w]`` -> message bits ``[N, k]`` (signs, decryption, majority vote)."""
        shape = latents.shape[1:]
        signs = latents > 0
        plain = signs ^ self._stream(secret, shape)[None]
        return majority_vote(plain, self._layout(shape), self.channel_copies, self.hw_copies)

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        steps = self.inversion_steps or getattr(ctx.data, "num_inference_steps", None) or 50
        z = invert_images(ctx.data.verifier_pipeline(), images, steps, method=self.inversion,
                          fixed_point_iters=self.fixed_point_iters, decoder_steps=self.decoder_inversion_steps,
                          decoder_lr=self.decoder_inversion_lr, progress=ctx.progress)
        return Detection(bits=self.decode(secret, z))
