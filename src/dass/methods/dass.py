"""DaSS: dependency-aware semi-structured sparsity for GLU MLPs (Guo et al., 2024).

Gate and up rows are scored by ``|W| * a_i ** alpha`` where ``a_i`` is the calibration
norm of intermediate neuron ``i``; comparison group = each input column (unstructured) or
M consecutive output rows of one column (N:M, "output" orientation). Down and attention
projections are scored like Wanda. No weight is updated.

``alpha`` is a number (the paper's method, default 0.5) or ``"auto"``: for every GLU block
the exponent is chosen from a small candidate set by the error each candidate causes on
kept calibration input rows, measured at the next layer's input when the pipeline passes a
:class:`dass.core.alpha.BlockView` (``alpha_measure="next"``; else at the MLP output),
averaged per token (``alpha_criterion``). With ``alpha_select="safe"`` (the default) a
candidate replaces the paper's 0.5 only on evidence: better on two disjoint halves of the
rows by more than they disagree, and not worse by the summed error (``alpha_guard``);
``alpha_select="min"`` takes the lowest error (the first ``auto``). The chosen value, the
candidates' errors and the reason are recorded in the gate/up results' ``info``
(:mod:`dass.core.alpha`).

``rescale`` ("none", "down" or "all"; "down" by default with ``alpha="auto"``, "none" with a
fixed alpha) multiplies each masked row by its
least-squares factor on the kept calibration input rows (:mod:`dass.core.rescale`): W_down's rows
against the dense block output ("block" target, default) or the layer-local output
("layer"); with "all" also W_gate's and W_up's rows against their own dense outputs. The
masks do not change (still exactly N:M). With ``alpha="auto"`` and ``alpha_rescaled``, the
candidates are compared after the rescale.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dass.core.alpha import (
    CRITERIA,
    DEFAULT_ALPHA,
    DEFAULT_CANDIDATES,
    DEFAULT_MAX_NEURONS,
    DEFAULT_SAMPLE_TOKENS,
    GUARDS,
    MEASURES,
    SELECTIONS,
    BlockView,
    candidate_row_errors,
    dass_glu_masks,
    select_alpha,
)
from dass.core.patterns import Orientation, Pattern, select_mask
from dass.core.scores import dass_glu_score
from dass.core.stats import FeatureStats
from dass.methods.base import (
    MatrixResult,
    MethodError,
    PruningMethod,
    parse_bool,
    parse_rescale,
    register,
    rescaled_glu_results,
)
from dass.methods.wanda import wanda_mask

#: ``rescale`` of ``alpha="auto"`` unless given: W_down's rows against the dense block output
#: (2:4 perplexity at the issue-7 protocol 49.2 against 74.6 without it, Wanda 82.5; grid 4:8
#: 35.4 against 43.3, Wanda 44.3; docs/ablation.md).
AUTO_RESCALE = "down"
#: alpha used by ``alpha="auto"`` when a block has no kept input rows to compare on, and
#: whenever the evidence for another candidate is weak (:func:`dass.core.alpha.decide_alpha`).
AUTO_FALLBACK_ALPHA = DEFAULT_ALPHA


def dass_glu_mask(weight: torch.Tensor, h_stats: FeatureStats, pattern: Pattern, alpha: float) -> MatrixResult:
    """DaSS mask of one gate or up matrix ``[D, d]`` from the intermediate activations."""
    score = dass_glu_score(weight, h_stats.norm, alpha)
    mask = select_mask(score, pattern, group="column", orientation="output")
    return MatrixResult(mask, "output" if pattern.is_nm else None)


def _choice(value: object, allowed: tuple[str, ...], name: str) -> str:
    """``value`` if it is one of ``allowed`` (the first, the default, when None)."""
    if value is None:
        return allowed[0]
    if value not in allowed:
        raise MethodError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _parse_alpha(alpha: object) -> float | str:
    if isinstance(alpha, str) and alpha.strip().lower() == "auto":
        return "auto"
    try:
        value = float(alpha)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise MethodError(f"alpha must be a number or 'auto', got {alpha!r}") from None
    if not value >= 0:
        raise MethodError(f"alpha must be >= 0, got {alpha!r}")
    return value


@register
class DaSS(PruningMethod):
    name = "dass"
    requires_glu = True

    def __init__(
        self,
        alpha: float | str = 0.5,
        alpha_candidates: Sequence[float] | str | None = None,
        sample_tokens: int | None = None,
        max_neurons: int | None = None,
        alpha_criterion: str | None = None,
        rescale: str | None = None,
        rescale_target: str = "block",
        alpha_rescaled: bool | int | str | None = None,
        alpha_select: str | None = None,
        alpha_guard: str | None = None,
        alpha_measure: str | None = None,
    ) -> None:
        self.alpha = _parse_alpha(alpha)
        self.auto = self.alpha == "auto"
        if isinstance(alpha_candidates, str):
            alpha_candidates = [c for c in alpha_candidates.replace(",", " ").split() if c]
        cands = DEFAULT_CANDIDATES if alpha_candidates is None else alpha_candidates
        parsed = [_parse_alpha(c) for c in cands]
        if not parsed or any(isinstance(c, str) for c in parsed):
            raise MethodError(f"alpha_candidates must be non-negative numbers, got {alpha_candidates!r}")
        self.alpha_candidates = tuple(float(c) for c in parsed)  # type: ignore[arg-type]
        if rescale is None:  # auto rescales W_down by default (docs/ablation.md); a fixed alpha never does
            rescale = AUTO_RESCALE if self.auto else "none"
        self.rescale, self.rescale_target = parse_rescale(rescale, rescale_target)
        uses_rows = self.auto or self.rescale != "none"
        if alpha_rescaled is not None and not (self.auto and self.rescale != "none"):
            raise MethodError("alpha_rescaled only applies to alpha='auto' with a rescale")
        self.alpha_rescaled = parse_bool(alpha_rescaled, "alpha_rescaled") if alpha_rescaled is not None else False
        auto_only = (alpha_candidates, max_neurons, alpha_criterion, alpha_select, alpha_guard, alpha_measure)
        if not self.auto and any(v is not None for v in auto_only):
            raise MethodError("alpha_candidates, alpha_criterion, alpha_select, alpha_guard, alpha_measure and "
                              "max_neurons only apply to alpha='auto'")
        # issue 15: a safe choice by default (falls back to the paper's alpha on weak evidence)
        self.alpha_select = _choice(alpha_select, SELECTIONS, "alpha_select")
        self.alpha_guard = _choice(alpha_guard, GUARDS, "alpha_guard")
        self.alpha_measure = _choice(alpha_measure, MEASURES, "alpha_measure")
        if not uses_rows and sample_tokens is not None:
            raise MethodError("sample_tokens only applies to alpha='auto' or a rescale")
        self.alpha_criterion = CRITERIA[0] if alpha_criterion is None else str(alpha_criterion)
        if self.alpha_criterion not in CRITERIA:
            raise MethodError(f"alpha_criterion must be one of {', '.join(CRITERIA)}, got {alpha_criterion!r}")
        self.max_neurons = DEFAULT_MAX_NEURONS if max_neurons in (None, "none", "all") else int(max_neurons)
        k = DEFAULT_SAMPLE_TOKENS if sample_tokens is None else int(sample_tokens)
        if uses_rows and k < 1:
            raise MethodError(f"sample_tokens must be >= 1, got {sample_tokens!r}")
        # the pipeline keeps this many block input rows only when alpha is chosen from data
        # or the pruned rows are rescaled
        self.sample_tokens = k if uses_rows else 0

    def options(self) -> dict:
        opts: dict = {"alpha": self.alpha}
        if self.auto:
            opts.update({"alpha_candidates": list(self.alpha_candidates), "alpha_criterion": self.alpha_criterion,
                         "max_neurons": self.max_neurons, "alpha_select": self.alpha_select,
                         "alpha_guard": self.alpha_guard, "alpha_measure": self.alpha_measure})
        if self.rescale != "none":
            opts.update({"rescale": self.rescale, "rescale_target": self.rescale_target})
            if self.auto:
                opts["alpha_rescaled"] = self.alpha_rescaled
        if self.sample_tokens:
            opts["sample_tokens"] = self.sample_tokens
        return opts

    def orientation(self, role: str) -> Orientation:
        return "output" if role in ("gate", "up") else "input"

    def prune_linear(self, weight: torch.Tensor, stats: FeatureStats | None, pattern: Pattern) -> MatrixResult:
        assert stats is not None
        return wanda_mask(weight, stats, pattern)

    #: the pipeline passes ``view`` (a :class:`dass.core.alpha.BlockView`) to methods that say so
    uses_block_view = True

    def prune_glu(self, gate, up, down, x_stats, h_stats, pattern, act=None, view: BlockView | None = None):
        assert h_stats is not None
        down_res = wanda_mask(down, h_stats, pattern)
        orient = "output" if pattern.is_nm else None
        if not self.auto:
            results = (
                dass_glu_mask(gate, h_stats, pattern, self.alpha),  # type: ignore[arg-type]
                dass_glu_mask(up, h_stats, pattern, self.alpha),  # type: ignore[arg-type]
                down_res,
            )
            return self._rescaled(results, gate, up, down, x_stats, act, view)
        x = x_stats.sample() if x_stats is not None else None
        if x is None or x.shape[0] == 0:
            alpha, info = AUTO_FALLBACK_ALPHA, {"alpha": AUTO_FALLBACK_ALPHA, "alpha_auto": "no kept input rows; default used"}
            mg, mu = dass_glu_masks(gate, up, h_stats.norm, pattern, alpha)
        else:
            x = x.to(gate.device)
            use_view = view if self.alpha_measure == "next" and view is not None else None
            cands = self.alpha_candidates
            if self.alpha_select == "safe" and AUTO_FALLBACK_ALPHA not in cands:  # the fallback is always judged
                cands = (AUTO_FALLBACK_ALPHA, *cands)
            rows = candidate_row_errors(gate, up, down, down_res.mask, h_stats.norm.to(gate.device), x, pattern,
                                        cands, act, max_neurons=self.max_neurons, view=use_view,
                                        rescale=self.rescale if self.alpha_rescaled else "none",
                                        rescale_target=self.rescale_target)
            alpha, info = select_alpha(rows, self.alpha_select, self.alpha_criterion, self.alpha_guard,
                                       AUTO_FALLBACK_ALPHA)
            info["alpha_rows"] = int(x.shape[0])
            mg, mu = dass_glu_masks(gate, up, h_stats.norm.to(gate.device), pattern, alpha)
        down_res.info = {"alpha": alpha}
        results = MatrixResult(mg, orient, info=dict(info)), MatrixResult(mu, orient, info=dict(info)), down_res
        return self._rescaled(results, gate, up, down, x_stats, act, view)

    def _rescaled(self, results, gate, up, down, x_stats, act, view=None):
        """With ``rescale``: the masked weights times their least-squares row factors on the
        kept calibration input rows; masks unchanged. Fitted on per-token unit outputs when
        the block's output is RMS-normalised before the residual (``view.post``, issue 15)."""
        normalise = view is not None and view.post is not None
        return rescaled_glu_results(results, gate, up, down, x_stats, act, self.rescale, self.rescale_target,
                                    normalise=normalise)
