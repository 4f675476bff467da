"""The method interface and the registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from dass.core.patterns import Orientation, Pattern
from dass.core.stats import FeatureStats
from dass.errors import UserValueError


class MethodError(UserValueError):
    """Unknown method name or bad method options."""


@dataclass
class MatrixResult:
    """What a method decided for one matrix."""

    mask: torch.Tensor  # bool, True = kept
    orientation: Orientation | None  # N:M group direction; None for unstructured
    weight: torch.Tensor | None = None  # updated weight (reconstructing methods), else None
    info: dict[str, Any] = field(default_factory=dict)


def parse_bool(value: object, name: str) -> bool:
    """A boolean method option given as a bool or as text ("true"/"1"/"yes"/"on" or
    "false"/"0"/"no"/"off": options also arrive as strings from configs such as
    ``dass:alpha=auto,alpha_rescaled=true``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise MethodError(f"{name} must be true or false, got {value!r}")


def parse_rescale(rescale: object, rescale_target: object) -> tuple[str, str]:
    """Validated ``(scope, target)`` of a method's ``rescale``/``rescale_target`` options."""
    from dass.core.rescale import SCOPES, TARGETS

    if rescale not in SCOPES:
        raise MethodError(f"rescale must be one of {', '.join(SCOPES)}, got {rescale!r}")
    if rescale_target not in TARGETS:
        raise MethodError(f"rescale_target must be one of {', '.join(TARGETS)}, got {rescale_target!r}")
    if rescale == "none" and rescale_target != "block":
        raise MethodError("rescale_target only applies with rescale='down' or 'all'")
    return str(rescale), str(rescale_target)


def rescaled_glu_results(
    results: tuple["MatrixResult", "MatrixResult", "MatrixResult"],
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    x_stats: FeatureStats | None,
    act: Callable[[torch.Tensor], torch.Tensor] | None,
    scope: str,
    target: str,
    normalise: bool = False,
) -> tuple["MatrixResult", "MatrixResult", "MatrixResult"]:
    """A GLU block's results with the masked weights times their least-squares row factors
    (:func:`dass.core.rescale.rescale_glu`) on the kept calibration input rows; masks unchanged.
    Shared by every method that offers ``rescale`` (DaSS, Wanda). ``normalise``: the block's
    output is RMS-normalised before the residual (fit on per-token unit outputs)."""
    from dass.core.rescale import rescale_glu

    if scope == "none":
        return results
    x = x_stats.sample() if x_stats is not None else None
    if x is None or x.shape[0] == 0:
        for r in results:
            r.info["rescale"] = "no kept input rows; not rescaled"
        return results
    masks = tuple(r.mask.to(gate.device) for r in results)
    *weights, scales = rescale_glu(gate, up, down, masks, x.to(gate.device), act, scope=scope, target=target,  # type: ignore[arg-type]
                                   normalise=normalise)
    for r, w, name, ref in zip(results, weights, ("gate", "up", "down"), (gate, up, down)):
        if name in scales:
            s = scales[name]
            r.weight = w.to(ref.dtype)
            r.info["rescale"] = {"mean": float(s.mean()), "min": float(s.min()), "max": float(s.max())}
    return results


class PruningMethod:
    """Base class: scores each matrix independently; GLU-aware methods override
    :meth:`prune_glu`."""

    name: ClassVar[str] = ""
    needs_hessian: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True
    requires_glu: ClassVar[bool] = False
    sample_tokens: ClassVar[int] = 0  # rows of the block input to keep (for candidate search)

    def options(self) -> dict[str, Any]:
        """The method's settings, for the report and the manifest."""
        return {}

    def orientation(self, role: str) -> Orientation:
        """Direction of N:M groups for a matrix of ``role`` (gate, up, down, attn, linear)."""
        return "input"

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        raise NotImplementedError

    def prune_glu(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        x_stats: FeatureStats | None,
        h_stats: FeatureStats | None,
        pattern: Pattern,
        act: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[MatrixResult, MatrixResult, MatrixResult]:
        """Masks for one GLU block. ``x_stats`` describe the block's input (gate/up inputs),
        ``h_stats`` the intermediate activations (down's input); ``act`` is the block's
        activation (SiLU, GELU-tanh), for methods that evaluate the block's output."""
        return (
            self.prune_linear(gate, x_stats, pattern),
            self.prune_linear(up, x_stats, pattern),
            self.prune_linear(down, h_stats, pattern),
        )


_REGISTRY: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise MethodError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str | PruningMethod, **options: Any) -> PruningMethod:
    """Instantiate the method registered as ``name`` with its options (e.g. ``alpha``)."""
    if isinstance(name, PruningMethod):
        return name
    try:
        cls = _REGISTRY[name.lower()]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise MethodError(f"bad options for method {name!r}: {exc}") from None
