"""MarkBench: a robustness benchmark for watermarks in text-to-image diffusion models.

The public API for plugins (importing it loads neither torch nor diffusers)::

    from bench import Defense, ImageAttack, ModelAttack, Metric, Param, defenses, image_attacks, ...
"""

from .errors import ConfigError, PluginError, PluginValidationError, UserError
from .params import Param, param
from .plugins import (
    AttackContext,
    Defense,
    DefenseKnowledge,
    Detection,
    DetectionKind,
    Embedding,
    GenerationRequest,
    ImageAttack,
    MarkLocation,
    MeasureContext,
    Measurement,
    Metric,
    ModelAttack,
    NegativePolicy,
    QualityMeasure,
    Secret,
    SecretAccessError,
    StageContext,
    ThreatSetting,
    ThreatTier,
    Trigger,
    Verification,
)
from .prompts import read_prompts
from .registries import defenses, image_attacks, metrics, model_attacks
from .world import World, worlds

__version__ = "0.1.0"

__all__ = [
    "AttackContext", "ConfigError", "PluginError", "PluginValidationError", "UserError", "Param", "param",
    "Defense", "Detection",
    "DetectionKind", "Embedding", "GenerationRequest", "ImageAttack", "MarkLocation", "MeasureContext",
    "Measurement", "Metric", "ModelAttack", "NegativePolicy", "QualityMeasure", "Secret", "StageContext",
    "ThreatSetting", "ThreatTier", "Trigger", "DefenseKnowledge", "SecretAccessError", "Verification", "defenses",
    "image_attacks", "metrics", "model_attacks", "read_prompts", "World", "worlds", "__version__",
]
