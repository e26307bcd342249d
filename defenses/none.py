"""The control: no watermark at all."""

from __future__ import annotations

import hashlib

import torch

from markbench import Defense, Detection, DetectionKind, Embedding, MarkLocation, param, Secret, ThreatSetting
from markbench.registries import defenses


@defenses.register("none")
class NoWatermark(Defense):
    """No watermark (the control row): its detection must sit at chance.

    ``embed`` leaves the model untouched and draws a random ``bits``-bit message. ``detect`` is a *null verifier*:
    it reads bits from each image as a SHA-256 hash of its 8-bit pixels (keyed by the message), a deterministic
    function of the image that carries no information about the message and is independent across distinct
    images. Bit accuracy should therefore be about 0.5 and TPR at any FPR about that FPR; anything else flags a bug
    in the statistics or in the pairing of images. (A projection-based null verifier is not at chance: shared image
    structure, such as the black corners a rotation leaves, correlates its bits across images.)
    """

    version = "1"
    location = MarkLocation.NONE
    threat = ThreatSetting.API
    detection = DetectionKind.BITS
    bits: int = param(48, "length of the (unused) random message", low=1, high=4096)

    def embed(self, pipe, ctx) -> Embedding:
        message = torch.randint(0, 2, (self.bits,), generator=ctx.generator).bool()
        return Embedding(Secret({"message": message}))

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        n_bits = int(secret.tensors["message"].numel())
        key = bytes(secret.tensors["message"].to(torch.uint8).tolist())
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        rows = [_hash_bits(key + img.tobytes(), n_bits) for img in pixels]
        return Detection(bits=torch.tensor(rows, dtype=torch.bool))


def _hash_bits(data: bytes, n_bits: int) -> list[bool]:
    """``n_bits`` pseudo-random bits from SHA-256 in counter mode: a deterministic function of the image bytes."""
    out: list[bool] = []
    counter = 0
    while len(out) < n_bits:
        digest = hashlib.sha256(counter.to_bytes(4, "little") + data).digest()
        out.extend(bool(byte >> i & 1) for byte in digest for i in range(8))
        counter += 1
    return out[:n_bits]
