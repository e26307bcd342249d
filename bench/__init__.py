"""MarkBench: a robustness benchmark for watermarks in text-to-image diffusion models.

The repository's folders are installed under this one name: ``bench/`` is ``markbench``, ``attacks/`` is
``markbench.attacks``, ``defenses/`` ``markbench.defenses``, ``reports/`` ``markbench.reports``, ``worlds/``
``markbench.worlds``. The public API for plugins (importing it loads neither torch nor diffusers)::

    from markbench import Defense, ImageAttack, ModelAttack, Metric, Param, param, image_attacks, ...
    from markbench.registries import defenses, image_attacks, model_attacks, metrics
    from markbench.world import World, worlds

The registries of defences and worlds are not attributes of ``markbench`` itself: ``markbench.defenses`` and
``markbench.worlds`` are the packages of the built-in plugins.
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
from .registries import image_attacks, metrics, model_attacks
from .world import World

__version__ = "0.1.0"

__all__ = [
    "AttackContext", "ConfigError", "PluginError", "PluginValidationError", "UserError", "Param", "param",
    "Defense", "Detection",
    "DetectionKind", "Embedding", "GenerationRequest", "ImageAttack", "MarkLocation", "MeasureContext",
    "Measurement", "Metric", "ModelAttack", "NegativePolicy", "QualityMeasure", "Secret", "StageContext",
    "ThreatSetting", "ThreatTier", "Trigger", "DefenseKnowledge", "SecretAccessError", "Verification",
    "image_attacks", "metrics", "model_attacks", "read_prompts", "World", "__version__",
]
