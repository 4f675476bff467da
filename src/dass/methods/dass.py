"""DaSS: dependency-aware semi-structured sparsity for GLU MLPs (Guo et al., 2024).

Gate and up rows are scored by ``|W| * a_i ** alpha`` where ``a_i`` is the calibration
norm of intermediate neuron ``i``; comparison group = each input column (unstructured) or
M consecutive output rows of one column (N:M, "output" orientation). Down and attention
projections are scored like Wanda. No weight is updated.

``alpha`` is a number (the paper's method, default 0.5) or ``"auto"``: for every GLU block
the exponent is chosen from a small candidate set by the reconstruction error of the
block's MLP output on kept calibration input rows, averaged per token by default
(``alpha_criterion``, :mod:`dass.core.alpha`); the chosen value and the candidates' errors
are recorded in the gate/up results' ``info``.

``rescale`` ("none", "down" or "all"; "down" by default with ``alpha="auto"``, "none" with a
fixed alpha) multiplies each masked row by its least-squares factor on the kept calibration
input rows (:mod:`dass.core.rescale`): W_down's rows against the dense block output ("block"
target, default) or the layer-local output ("layer"); with "all" also W_gate's and W_up's
rows against their own dense outputs. The masks do not change (still exactly N:M). With
``alpha="auto"`` and ``alpha_rescaled``, the candidates are compared after the rescale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dass.core.alpha import (
    CRITERIA,
    DEFAULT_ALPHA,
    DEFAULT_CANDIDATES,
    GUARDS,
    MEASURES,
    SELECTIONS,
    BlockView,
    candidate_row_errors,
    select_alpha,
)
from dass.core.glu import dass_glu_mask, dass_glu_masks
from dass.core.patterns import Orientation
from dass.methods.base import MatrixResult, PruningMethod, register
from dass.methods.options import as_bool, as_float_list, as_nonneg_float, as_nonneg_int, one_of, option
from dass.methods.rescale_options import RescaleOptions, rescaled_glu_results
from dass.methods.wanda import wanda_mask

#: alpha used by ``alpha="auto"`` when a block has no kept input rows to compare on, and
#: whenever the evidence for another candidate is weak (:func:`dass.core.alpha.decide_alpha`).
AUTO_FALLBACK_ALPHA = DEFAULT_ALPHA


def as_neuron_cap(value: Any) -> int | None:
    """A number of neurons, or all/none/0 for every neuron (None)."""
    if isinstance(value, str) and value.strip().lower() in ("all", "none"):
        return None
    return as_nonneg_int(value) or None


def as_alpha(value: Any) -> float | str:
    """A non-negative number or ``"auto"``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return as_nonneg_float(value)
    except ValueError:
        raise ValueError(f"must be a number >= 0 or 'auto', got {value!r}") from None


def _auto(o: "DaSSOptions") -> bool:
    return o.alpha == "auto"


@dataclass(frozen=True)
class DaSSOptions(RescaleOptions):
    method = "dass"
    default_texts = {"rescale": "down with alpha=auto, else none"}
    alpha: float | str = option(0.5, "exponent of the neuron norm in |W| * a^alpha (the paper: 0.5), or auto", as_alpha)
    alpha_candidates: tuple[float, ...] | None = option(
        None, "with alpha=auto: the exponents tried per block", as_float_list, when=_auto,
        default_text="/".join(f"{a:g}" for a in DEFAULT_CANDIDATES),
    )
    alpha_criterion: str | None = option(
        None, "with alpha=auto: how candidates' block errors are compared (token: per-token relative; total)",
        one_of(*CRITERIA), when=_auto, default_text=CRITERIA[0],
    )
    max_neurons: int | None = option(
        None, "with alpha=auto: neurons (whole N:M groups) the candidates are compared on (0 or all: every one)",
        as_neuron_cap, when=_auto, default_text="all",
    )
    alpha_select: str | None = option(
        None, "with alpha=auto: safe (leave the paper's 0.5 only on evidence from two halves of the rows) or min "
        "(the lowest error)", one_of(*SELECTIONS), when=_auto, default_text=SELECTIONS[0],
    )
    alpha_guard: str | None = option(
        None, "with alpha=auto, safe: the reduction a winner must not be worse than 0.5 by (total, token, none)",
        one_of(*GUARDS), when=_auto, default_text=GUARDS[0],
    )
    alpha_measure: str | None = option(
        None, "with alpha=auto: where errors are measured, next (the next layer's input) or mlp (the MLP output)",
        one_of(*MEASURES), when=_auto, default_text=MEASURES[0],
    )
    alpha_rescaled: bool | None = option(
        None, "with alpha=auto and a rescale: compare the candidates after the rescale", as_bool,
        when=lambda o: _auto(o) and o.rescale_scope != "none", default_text="false",
    )

    @property
    def default_rescale(self) -> str:
        # auto rescales W_down by default (docs/ablation.md); a fixed alpha never does
        return "down" if _auto(self) else "none"

    @property
    def uses_rows(self) -> bool:
        return _auto(self) or self.rescale_scope != "none"

    def resolve(self) -> None:
        super().resolve()
        if _auto(self):
            if self.alpha_candidates is None:
                self._set("alpha_candidates", DEFAULT_CANDIDATES)
            if self.alpha_criterion is None:
                self._set("alpha_criterion", CRITERIA[0])
            for name, allowed in (("alpha_select", SELECTIONS), ("alpha_guard", GUARDS), ("alpha_measure", MEASURES)):
                if getattr(self, name) is None:
                    self._set(name, allowed[0])
            if self.rescale != "none" and self.alpha_rescaled is None:
                self._set("alpha_rescaled", False)


@register
class DaSS(PruningMethod):
    name = "dass"
    summary = "DaSS: gate/up weights scored by |W| x (intermediate neuron norm)^alpha, N:M along outputs"
    Options = DaSSOptions

    @property
    def requires_glu(self) -> bool:
        return True

    @property
    def sample_tokens(self) -> int:
        # the pipeline keeps block input rows only when alpha is chosen from data or the
        # pruned rows are rescaled
        return self.opts.sample_tokens or 0

    @property
    def auto(self) -> bool:
        return _auto(self.opts)

    def orientation(self, role: str) -> Orientation:
        return "output" if role in ("gate", "up") else "input"

    def prune_linear(self, weight, stats, pattern) -> MatrixResult:
        assert stats is not None
        return wanda_mask(weight, stats, pattern)

    #: the pipeline passes ``view`` (a :class:`dass.core.alpha.BlockView`) to methods that say so
    uses_block_view = True

    def prune_glu(self, gate, up, down, x_stats, h_stats, pattern, act=None, view: BlockView | None = None):
        assert h_stats is not None
        o = self.opts
        down_res = wanda_mask(down, h_stats, pattern)
        orient = "output" if pattern.is_nm else None
        norm = h_stats.norm.to(gate.device)
        info: dict[str, Any] = {}
        if not self.auto:
            alpha = float(o.alpha)  # type: ignore[arg-type]
            masks = dass_glu_mask(gate, norm, pattern, alpha), dass_glu_mask(up, norm, pattern, alpha)
        else:
            x = x_stats.sample() if x_stats is not None else None
            if x is None or x.shape[0] == 0:
                alpha = AUTO_FALLBACK_ALPHA
                info = {"alpha": alpha, "alpha_auto": "no kept input rows; default used"}
            else:
                x = x.to(gate.device)
                cands = o.alpha_candidates
                if o.alpha_select == "safe" and AUTO_FALLBACK_ALPHA not in cands:  # the fallback is always judged
                    cands = (AUTO_FALLBACK_ALPHA, *cands)
                rows = candidate_row_errors(gate, up, down, down_res.mask, norm, x, pattern, cands, act,
                                            max_neurons=o.max_neurons,
                                            view=view if o.alpha_measure == "next" else None,
                                            rescale=o.rescale if o.alpha_rescaled else "none",
                                            rescale_target=o.rescale_target or "block")
                alpha, info = select_alpha(rows, o.alpha_select, o.alpha_criterion, o.alpha_guard, AUTO_FALLBACK_ALPHA)
                info["alpha_rows"] = int(x.shape[0])
            masks = dass_glu_masks(gate, up, norm, pattern, alpha)
            down_res.info = {"alpha": alpha}
        results = MatrixResult(masks[0], orient, info=dict(info)), MatrixResult(masks[1], orient, info=dict(info)), down_res
        # fitted on per-token unit outputs when the block's output is RMS-normalised before the residual
        normalise = view is not None and view.post is not None
        return rescaled_glu_results(results, gate, up, down, x_stats, act, o, normalise=normalise)
