"""Pruning methods, registered by name.

A method turns one matrix's (or one GLU block's) statistics into masks and, for methods
that reconstruct, updated weights. It never sees a model: the pipeline gathers the
statistics and applies the results. Adding a method means one new module here that calls
:func:`register`.
"""

from __future__ import annotations

from dass.methods import (  # noqa: F401  (registration side effects)
    dass,
    dass_obs,  # noqa: F401
    magnitude,
    sparsegpt,
    wanda,
)
from dass.methods.base import MatrixResult, PruningMethod, available_methods, get_method, register

__all__ = ["MatrixResult", "PruningMethod", "available_methods", "get_method", "register"]
