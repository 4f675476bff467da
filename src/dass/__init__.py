"""dass: one-shot pruning of GLU language models.

``dass.prune(model, method="dass", pattern="2:4", calibration=...)`` walks a loaded
transformers model layer by layer and sparsifies it with DaSS, Wanda, SparseGPT or
magnitude, returning a :class:`PruneReport`.
"""

from dass.arch import ArchitectureError
from dass.core.patterns import Pattern, PatternError, parse_pattern
from dass.io import hf_registry as _hf_registry  # noqa: F401  from_pretrained loads compressed checkpoints
from dass.methods import available_methods, get_method, register
from dass.run.pipeline import CalibrationError, PruneReport, prune

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError",
    "CalibrationError",
    "Pattern",
    "PatternError",
    "PruneReport",
    "available_methods",
    "get_method",
    "parse_pattern",
    "prune",
    "register",
]
