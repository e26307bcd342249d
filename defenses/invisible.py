"""Post-hoc frequency-domain watermarks from the ``invisible-watermark`` package (the one Stable Diffusion's
reference scripts ship): DWT-DCT and DWT-DCT-SVD.

The package refuses images smaller than 256x256. Smaller images are therefore upsampled (bicubic) to
``min_size`` before embedding, then downsampled (area) back to their own size, and upsampled again before decoding.
That resampling is part of what is measured: at 64x64 DWT-DCT loses part of its mark to it, DWT-DCT-SVD does not.
"""

from __future__ import annotations

import numpy as np
import torch

from markbench import Defense, Detection, DetectionKind, Embedding, MarkLocation, param, Secret, ThreatSetting
from markbench.registries import defenses
from markbench.errors import require


class _InvisibleWatermark(Defense):
    location = MarkLocation.POST_HOC
    threat = ThreatSetting.API
    detection = DetectionKind.BITS
    method = ""
    bits: int = param(48, "message length in bits", low=1, high=256)
    min_size: int = param(256, "images are resized to at least this side for the codec (it refuses <256)", low=256,
            high=2048)

    def embed(self, pipe, ctx) -> Embedding:
        message = torch.randint(0, 2, (self.bits,), generator=ctx.generator).bool()
        return Embedding(Secret({"message": message}, {"method": self.method}))

    def _sizes(self, h: int, w: int) -> tuple[int, int]:
        scale = max(1.0, self.min_size / min(h, w))
        return int(round(h * scale)), int(round(w * scale))

    def mark(self, images: torch.Tensor, secret: Secret, ctx) -> torch.Tensor:
        cv2 = require("cv2", "invisible")
        imwatermark = require("imwatermark", "invisible")
        encoder = imwatermark.WatermarkEncoder()
        encoder.set_watermark("bits", [int(b) for b in secret.tensors["message"].tolist()])
        out = []
        for img in _to_bgr(images):
            h, w = img.shape[:2]
            uh, uw = self._sizes(h, w)
            big = cv2.resize(img, (uw, uh), interpolation=cv2.INTER_CUBIC) if (uh, uw) != (h, w) else img
            marked = encoder.encode(big, self.method)
            if (uh, uw) != (h, w):
                marked = cv2.resize(marked, (w, h), interpolation=cv2.INTER_AREA)
            out.append(marked)
        return _from_bgr(out)

    def detect(self, secret: Secret, images: torch.Tensor, ctx) -> Detection:
        cv2 = require("cv2", "invisible")
        imwatermark = require("imwatermark", "invisible")
        n_bits = int(secret.tensors["message"].numel())
        decoder = imwatermark.WatermarkDecoder("bits", n_bits)
        rows = []
        for img in _to_bgr(images):
            h, w = img.shape[:2]
            uh, uw = self._sizes(h, w)
            big = cv2.resize(img, (uw, uh), interpolation=cv2.INTER_CUBIC) if (uh, uw) != (h, w) else img
            rows.append([bool(b) for b in decoder.decode(big, self.method)])
        return Detection(bits=torch.tensor(rows, dtype=torch.bool))


def _to_bgr(images: torch.Tensor) -> list[np.ndarray]:
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [np.ascontiguousarray(a[:, :, ::-1]) for a in arr]


def _from_bgr(arrays: list[np.ndarray]) -> torch.Tensor:
    arr = np.stack([a[:, :, ::-1] for a in arrays]).astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


@defenses.register("dwtdct")
class DwtDct(_InvisibleWatermark):
    """DWT-DCT post-hoc watermark (invisible-watermark ``dwtDct``; Cox et al. 2007, "Digital Watermarking and
    Steganography", the frequency-domain embedding used by Stable Diffusion's release scripts).

    Bits are embedded in the DCT of 4x4 blocks of a DWT sub-band of the YUV image. Images under 256 px are resized
    around the codec (see the module docstring)."""

    version = "1"
    method = "dwtDct"


@defenses.register("dwtdctsvd")
class DwtDctSvd(_InvisibleWatermark):
    """DWT-DCT-SVD post-hoc watermark (invisible-watermark ``dwtDctSvd``; Navas et al. 2008, "DWT-DCT-SVD based
    watermarking"): like DWT-DCT, but each bit modulates the largest singular value of a block's DCT, which
    survives resampling better. Images under 256 px are resized around the codec (see the module docstring)."""

    version = "1"
    method = "dwtDctSvd"
