"""The ``rescale`` options shared by the methods that offer the least-squares row rescale
(:mod:`dass.core.rescale`): declared once, validated once, applied by one helper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dass.core.rescale import SCOPES, TARGETS, rescale_glu
from dass.core.stats import FeatureStats
from dass.methods.base import MatrixResult
from dass.methods.options import MethodOptions, as_positive_int, one_of, option

#: Calibration input rows kept for the rescale unless ``sample_tokens`` says otherwise.
DEFAULT_SAMPLE_TOKENS = 1024


def _rescaled(o: "RescaleOptions") -> bool:
    return o.rescale_scope != "none"


@dataclass(frozen=True)
class RescaleOptions(MethodOptions):
    """Options of a method that can rescale the pruned rows of a GLU block."""

    rescale: str | None = option(
        None, "multiply each pruned row by its least-squares factor on calibration rows: none, down or all",
        one_of(*SCOPES), record=lambda o: "none" not in (o.rescale_scope, o.default_rescale) or o.rescale_scope != o.default_rescale,
        default_text="none",
    )
    rescale_target: str | None = option(
        None, "what W_down's rows are fitted to: block (the dense block output) or layer (with rescale only)",
        one_of(*TARGETS), when=_rescaled, default_text="block",
    )
    sample_tokens: int | None = option(
        None, "calibration input rows kept for the rescale (and alpha=auto's comparison)",
        as_positive_int, when=lambda o: o.uses_rows, default_text=str(DEFAULT_SAMPLE_TOKENS),
    )

    @property
    def default_rescale(self) -> str:
        """The rescale used when none is given (subclasses may depend on other options)."""
        return "none"

    @property
    def rescale_scope(self) -> str:
        return self.rescale if self.rescale is not None else self.default_rescale

    @property
    def uses_rows(self) -> bool:
        """Whether the method needs kept calibration input rows."""
        return self.rescale_scope != "none"

    def resolve(self) -> None:
        self._set("rescale", self.rescale_scope)
        if self.rescale != "none" and self.rescale_target is None:
            self._set("rescale_target", "block")
        if self.uses_rows and self.sample_tokens is None:
            self._set("sample_tokens", DEFAULT_SAMPLE_TOKENS)


def rescaled_glu_results(
    results: tuple[MatrixResult, MatrixResult, MatrixResult],
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    x_stats: FeatureStats | None,
    act: Callable[[torch.Tensor], torch.Tensor] | None,
    opts: RescaleOptions,
    normalise: bool = False,
) -> tuple[MatrixResult, MatrixResult, MatrixResult]:
    """A GLU block's results with the masked weights times their least-squares row factors
    (:func:`dass.core.rescale.rescale_glu`) on the kept calibration input rows; masks
    unchanged. Shared by every method that offers ``rescale`` (DaSS, Wanda). ``normalise``:
    the block's output is RMS-normalised before the residual (fit on per-token unit outputs)."""
    if opts.rescale == "none":
        return results
    x = x_stats.sample() if x_stats is not None else None
    if x is None or x.shape[0] == 0:
        for r in results:
            r.info["rescale"] = "no kept input rows; not rescaled"
        return results
    masks = tuple(r.mask.to(gate.device) for r in results)
    *weights, scales = rescale_glu(gate, up, down, masks, x.to(gate.device), act,  # type: ignore[arg-type]
                                   scope=opts.rescale, target=opts.rescale_target, normalise=normalise)
    for r, w, name, ref in zip(results, weights, ("gate", "up", "down"), (gate, up, down)):
        if name in scales:
            s = scales[name]
            r.weight = w.to(ref.dtype)
            r.info["rescale"] = {"mean": float(s.mean()), "min": float(s.min()), "max": float(s.max())}
    return results
