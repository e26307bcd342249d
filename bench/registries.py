"""The four registries and the table of built-in plugins (registered lazily: nothing heavy is imported)."""

from __future__ import annotations

from .plugins import Defense, ImageAttack, Metric, ModelAttack
from .registry import Registry

defenses: Registry = Registry("defense", Defense, "bench.defenses")
image_attacks: Registry = Registry("image attack", ImageAttack, "bench.attacks",
                                   accept=lambda c: issubclass(c, ImageAttack))
model_attacks: Registry = Registry("model attack", ModelAttack, "bench.attacks")
metrics: Registry = Registry("metric", Metric, "bench.metrics")

# The entry-point group bench.attacks holds both kinds of attack: each lands in the registry its base class fits.
_attack_group_loaded = False


def _load_attack_entry_points() -> None:
    global _attack_group_loaded
    if _attack_group_loaded:
        return
    _attack_group_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="bench.attacks"):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
        cls = ep.load()
        target = image_attacks if isinstance(cls, type) and issubclass(cls, ImageAttack) else model_attacks
        if ep.name not in target._entries:
            target.register(ep.name, cls, origin=origin)


for _r in (image_attacks, model_attacks):
    _r._entry_points_loaded = True  # handled jointly by _load_attack_entry_points
    _r._load_entry_points = _load_attack_entry_points  # type: ignore[method-assign]

BUILTIN_DEFENSES = {
    "none": "defenses.none:NoWatermark",
    "dwtdct": "defenses.invisible:DwtDct",
    "dwtdctsvd": "defenses.invisible:DwtDctSvd",
    "sleepermark": "defenses.sleepermark:SleeperMark",
    "hidden": "defenses.hidden:HiDDeN",
    "stable_signature": "defenses.stable_signature:StableSignature",
    "aqualora": "defenses.aqualora:AquaLoRA",
    "wdm": "defenses.wdm:WDM",
}
BUILTIN_IMAGE_ATTACKS = {
    "none": "attacks.image.identity:Identity",
    "jpeg": "attacks.image.jpeg:JPEG",
    "gaussian_blur": "attacks.image.blur:GaussianBlur",
    "gaussian_noise": "attacks.image.noise:GaussianNoise",
    "salt_pepper": "attacks.image.salt_pepper:SaltPepper",
    "median_filter": "attacks.image.median:MedianFilter",
    "resize": "attacks.image.resize:Resize",
    "crop": "attacks.image.crop:Crop",
    "rotation": "attacks.image.rotation:Rotation",
    "brightness": "attacks.image.color:Brightness",
    "contrast": "attacks.image.color:Contrast",
    "saturation": "attacks.image.color:Saturation",
    "sharpen": "attacks.image.sharpen:Sharpen",
    "combination": "attacks.image.combination:Combination",
}
BUILTIN_MODEL_ATTACKS = {
    "none": "attacks.model.identity:NoModelAttack",
    "finetune": "attacks.model.finetune:FineTune",
    "lora": "attacks.model.lora:LoRAFineTune",
    "dreambooth": "attacks.model.dreambooth:DreamBooth",
    "vae_decoder": "attacks.model.vae_decoder:VAEDecoderFineTune",
    "text_encoder": "attacks.model.text_encoder:TextEncoderFineTune",
    "prune": "attacks.model.prune:Prune",
    "quantize": "attacks.model.quantize:Quantize",
    "weight_noise": "attacks.model.weight_noise:WeightNoise",
    "merge": "attacks.model.merge:Merge",
}
BUILTIN_METRICS = {
    "bit_accuracy": "bench.measures.detection:BitAccuracy",
    "tpr": "bench.measures.detection:TPRAtFPR",
    "pvalue": "bench.measures.detection:PValue",
    "auc": "bench.measures.detection:ROCAUC",
    "psnr": "bench.measures.quality:PSNR",
    "ssim": "bench.measures.quality:SSIM",
    "fid": "bench.measures.fid:FID",
    "kid": "bench.measures.fid:KID",
    "clip_score": "bench.measures.clip_score:CLIPScore",
    "keyless": "bench.measures.keyless:KeylessDetectability",
    "attacker_utility": "bench.measures.utility:AttackerUtility",
}

for _reg, _table in ((defenses, BUILTIN_DEFENSES), (image_attacks, BUILTIN_IMAGE_ATTACKS),
                     (model_attacks, BUILTIN_MODEL_ATTACKS), (metrics, BUILTIN_METRICS)):
    for _name, _target in _table.items():
        _reg.register_lazy(_name, _target)

REGISTRIES = {"defenses": defenses, "image_attacks": image_attacks, "model_attacks": model_attacks,
              "metrics": metrics}
