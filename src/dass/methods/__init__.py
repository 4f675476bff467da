"""Pruning methods, registered by name.

A method turns one matrix's (or one GLU block's) statistics into masks and, for methods
that reconstruct, updated weights. It never sees a model: the pipeline gathers the
statistics and applies the results. Adding a method means one new module here with one
options class (a frozen :class:`~dass.methods.options.MethodOptions`) and one method class
decorated with :func:`register`; its options are then reachable from the CLI
(``--method name:key=value``), listed by ``dass prune --help`` and recorded in the manifest.
"""

from __future__ import annotations

from dass.methods.base import (
    MatrixResult,
    PruningMethod,
    available_methods,
    get_method,
    method_class,
    register,
)
from dass.methods.options import MethodError, MethodOptions

# the built-in methods register themselves on import
from dass.methods import dass, dass_obs, magnitude, sparsegpt, wanda  # noqa: E402,F401  isort: skip
from dass.methods.dass import DaSS, DaSSOptions  # noqa: E402
from dass.methods.dass_obs import DaSSOBS, DaSSOBSOptions  # noqa: E402
from dass.methods.magnitude import Magnitude, MagnitudeOptions  # noqa: E402
from dass.methods.sparsegpt import SparseGPT, SparseGPTOptions  # noqa: E402
from dass.methods.wanda import Wanda, WandaOptions  # noqa: E402

__all__ = [
    "DaSS",
    "DaSSOBS",
    "DaSSOBSOptions",
    "DaSSOptions",
    "Magnitude",
    "MagnitudeOptions",
    "MatrixResult",
    "MethodError",
    "MethodOptions",
    "PruningMethod",
    "SparseGPT",
    "SparseGPTOptions",
    "Wanda",
    "WandaOptions",
    "available_methods",
    "get_method",
    "method_class",
    "register",
]
