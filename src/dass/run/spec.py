"""The run spec: everything that defines a pruning run, validated once.

``dass.prune`` (a model in memory), ``prune_checkpoint`` (a checkpoint streamed from disk)
and the distributed path all start from one :class:`RunSpec`: the method (built from its
options object or spec string), the pattern, the scope, the calibration, the batch size,
the device, where activations live and how blocks are reconstructed. :meth:`RunSpec.plan`
plans the model once and checks every matrix against the pattern there (the only
divisibility check a run makes before any work); :meth:`RunSpec.layer_step` builds the
per-layer step both walks run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dass.arch import LayerPlan, plan_model
from dass.core.patterns import Pattern, parse_pattern
from dass.errors import UserValueError
from dass.methods import PruningMethod, get_method
from dass.run import distributed
from dass.run.calibration import activation_bytes, as_calibration_tensor
from dass.run.layer import LayerStep
from dass.run.memory import ACTIVATION_PLACES, choose_store
from dass.run.progress import Progress
from dass.run.reconstruct import BatchLayout, ReconstructOptions, reconstruct_options
from dass.run.report import PruneReport

SCOPES = ("mlp", "all")


class RunError(UserValueError):
    """Run settings that cannot work (scope, batch size, where activations live)."""


@dataclass(frozen=True)
class RunSpec:
    """A validated pruning run (the model and its tokenizer aside)."""

    method: PruningMethod
    pattern: Pattern
    scope: str = "mlp"
    calibration: Any = "default"  # a text source, or token ids [N, L] / a list of token tensors
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    device: str | None = None  # None: CUDA if available, else where the model is
    activations: str = "auto"
    reconstruct: ReconstructOptions | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise RunError(f"unknown scope {self.scope!r}: use 'mlp' or 'all'")
        if self.activations not in ACTIVATION_PLACES:
            raise RunError(f"activations must be one of {', '.join(ACTIVATION_PLACES)}, got {self.activations!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RunError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if isinstance(self.calibration, str) and (self.nsamples < 1 or self.seqlen < 1):
            raise RunError(f"nsamples and seqlen must be >= 1, got {self.nsamples} and {self.seqlen}")

    @classmethod
    def create(
        cls,
        method: "str | PruningMethod" = "dass",
        pattern: "str | float | Pattern" = "2:4",
        scope: str = "mlp",
        calibration: Any = "default",
        *,
        nsamples: int = 128,
        seqlen: int = 2048,
        seed: int = 0,
        batch_size: int = 8,
        device: "str | torch.device | None" = None,
        activations: str = "auto",
        reconstruct: Any = None,
        **method_options: Any,
    ) -> "RunSpec":
        """A spec from the loose forms users write: a method name, spec string
        (``"dass:alpha=auto"``) or object with option values, a pattern string or ratio,
        ``reconstruct=True`` or a spec string (``"steps=200"``)."""
        return cls(
            method=get_method(method, **method_options),
            pattern=parse_pattern(pattern),
            scope=scope,
            calibration=calibration,
            nsamples=nsamples,
            seqlen=seqlen,
            seed=seed,
            batch_size=batch_size,
            device=None if device is None else str(device),
            activations=activations,
            reconstruct=reconstruct_options(reconstruct),
        )

    # ------------------------------------------------------------------ checks and plans

    def plan(self, model: nn.Module) -> list[LayerPlan]:
        """Plans of every decoder layer, each matrix checked against the pattern: everything
        that can be checked before the model is modified (works on meta tensors too)."""
        plans = plan_model(model, scope=self.scope, require_glu=self.method.requires_glu)
        for plan in plans:
            for ref in plan.matrices():
                self.pattern.check_shape(ref.shape, self.method.orientation(ref.role), ref.key)
        return plans

    def calibration_ids(self, tokenizer: Any = None) -> torch.Tensor | None:
        """The calibration token ids ``[N, L]`` (None for a method without calibration when
        none was given)."""
        if not self.method.needs_calibration and self.calibration is None:
            return None
        return as_calibration_tensor(self.calibration, tokenizer, self.nsamples, self.seqlen, self.seed)

    def compute_device(self, model: nn.Module | None = None) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if torch.cuda.is_available():
            return torch.device("cuda")
        if model is not None:
            return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        return torch.device("cpu")

    # ------------------------------------------------------------------ the run's pieces

    def new_report(self, ids: torch.Tensor | None) -> PruneReport:
        report = PruneReport(
            self.method.name,
            self.method.options(),
            str(self.pattern),
            self.scope,
            nsamples=0 if ids is None else ids.shape[0],
            seqlen=0 if ids is None else ids.shape[1],
        )
        if self.reconstruct is not None:
            report.reconstruct = self.reconstruct.record()
        return report

    def record(self) -> dict[str, Any]:
        """What identifies the run's result (for resuming and for the manifest)."""
        return {
            "method": self.method.name,
            "options": self.method.options(),
            "pattern": str(self.pattern),
            "scope": self.scope,
            "batch_size": self.batch_size,
            "reconstruct": None if self.reconstruct is None else self.reconstruct.record(),
        }

    def store(self, device: torch.device, ids: torch.Tensor, hidden_size: int, dtype: torch.dtype,
              reserve: int = 0) -> torch.device:
        """Where the calibration activations live: reconstruction keeps two more sets (each
        block's inputs and dense outputs), so it counts three; four when the dense model's
        own activations travel beside the pruned model's (``target=model``)."""
        sets = 1 if self.reconstruct is None else 4 if self.reconstruct.dense_stream else 3
        return choose_store(device, self.activations, sets * activation_bytes(ids, hidden_size, dtype), reserve)

    def layout(self, ids: torch.Tensor) -> BatchLayout:
        ctx = distributed.current()
        return BatchLayout(ids.shape[0], ids.shape[1], self.batch_size, ctx.rank, ctx.world)

    def layer_step(
        self,
        report: PruneReport,
        device: torch.device,
        store: torch.device,
        ids: torch.Tensor,
        plans: list[LayerPlan],
        *,
        progress: bool = True,
        label: str | None = None,
        start: int = 0,
        fast_mlp: bool = True,
        profile: list | None = None,
    ) -> LayerStep:
        """The per-layer step of this run, with a progress line over the layers from ``start``."""
        layout = self.layout(ids)
        local_batches = len(range(layout.rank, -(-layout.nsamples // self.batch_size), layout.world))
        blocks = max((len(p.blocks) for p in plans), default=1) if self.reconstruct is not None else 0
        if self.reconstruct is not None and not self.reconstruct.attention:
            blocks = 1
        units = LayerStep.units(local_batches, self.reconstruct, blocks)
        bar = Progress(label or f"{self.method.name} {self.pattern}", len(plans), units,
                       enabled=progress and distributed.current().is_main, start_layer=start)
        return LayerStep(self.method, self.pattern, report, device, store, layout=layout,
                         reconstruct=self.reconstruct, progress=bar, fast_mlp=fast_mlp, profile=profile)
