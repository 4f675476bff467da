"""dass: one-shot pruning of GLU language models.

``dass.prune(model, "dass:alpha=0.5", "2:4", calibration=...)`` walks a loaded transformers
model layer by layer and sparsifies it with DaSS, dass-obs, Wanda, SparseGPT or magnitude
(optionally refitting each pruned block to the dense one: ``reconstruct=True``), returning
a :class:`PruneReport`; :func:`prune_checkpoint` does the same from disk to disk for
checkpoints too large for memory.

The package's layers, each importing only from those before it: ``dass.errors``,
``dass.core`` (tensor maths), ``dass.methods``, ``dass.arch`` (the architecture adapter),
``dass.io``, ``dass.run``, ``dass.infer``, ``dass.evaluation``, ``dass.cli``.
"""

__version__ = "0.2.0"

from dass.arch import ArchitectureError  # noqa: E402
from dass.core.patterns import Pattern, PatternError, parse_pattern  # noqa: E402
from dass.errors import DassError  # noqa: E402
from dass.io import hf_registry as _hf_registry  # noqa: E402,F401  from_pretrained loads compressed checkpoints
from dass.methods import (  # noqa: E402
    DaSS,
    DaSSOBS,
    Magnitude,
    MethodError,
    PruningMethod,
    SparseGPT,
    Wanda,
    available_methods,
    get_method,
    register,
)
from dass.run.calibration import CalibrationError  # noqa: E402
from dass.run.prune import prune  # noqa: E402
from dass.run.reconstruct import ReconstructOptions  # noqa: E402
from dass.run.report import PruneReport  # noqa: E402
from dass.run.spec import RunSpec  # noqa: E402
from dass.run.streaming import prune_checkpoint  # noqa: E402

__all__ = [
    "ArchitectureError",
    "CalibrationError",
    "DaSS",
    "DaSSOBS",
    "DassError",
    "Magnitude",
    "MethodError",
    "Pattern",
    "PatternError",
    "PruneReport",
    "PruningMethod",
    "ReconstructOptions",
    "RunSpec",
    "SparseGPT",
    "Wanda",
    "available_methods",
    "get_method",
    "parse_pattern",
    "prune",
    "prune_checkpoint",
    "register",
]
