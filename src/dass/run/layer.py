"""One decoder layer: observe, prune, (reconstruct), propagate.

:class:`LayerStep` is the per-layer step that :func:`dass.prune` (a model in memory) and
:func:`dass.run.streaming.prune_checkpoint` (a checkpoint on disk, one layer at a time) both
run. Two things keep it cheap on a GPU:

- the statistics pass stops as soon as the last observed input has been seen (a dense
  GLU layer's down projection): the layer's output there is never used (unless the blocks
  are reconstructed, which needs the dense MLP's output as the target);
- under scope ``mlp`` the next layer's input is computed from the MLP branch alone
  (:mod:`dass.run.propagate`).

With reconstruction to the dense *model* (``--reconstruct target=model``) the step also
carries the dense model's own activations from layer to layer (:attr:`LayerStep.dense`):
before pruning, the still-dense layer runs on them once, which gives each block's target
and the dense activations entering the next layer.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from dass.arch import LayerPlan, MatrixRef
from dass.core.alpha import BlockView
from dass.core.patterns import Pattern, nm_violations, sparsity_of
from dass.core.stats import FeatureStats
from dass.methods import MatrixResult, PruningMethod
from dass.methods.magnitude import Magnitude
from dass.run import distributed
from dass.run.capture import Stop, first_output
from dass.run.hooks import last_observed, raise_stop, register_stat_hooks
from dass.run.memory import to_store
from dass.run.progress import Progress
from dass.run.propagate import FastPath
from dass.run.reconstruct import BatchLayout, BlockRecorder, ReconstructOptions, reconstruct_blocks
from dass.run.report import MatrixReport, PruneReport

Job = tuple[MatrixRef, MatrixResult, str]


def _mark(device: torch.device) -> Any:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


PHASES = ("observe", "prune", "reconstruct", "propagate")


def profile_summary(profile: list) -> dict[str, float]:
    """Seconds spent in each phase of :class:`LayerStep` over the layers it recorded
    (CUDA events on a GPU, so recording adds no synchronisation)."""
    out = dict.fromkeys(PHASES, 0.0)
    for marks in profile:
        if isinstance(marks[0], torch.cuda.Event):
            marks[-1].synchronize()
            spans = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
        else:
            spans = [b - a for a, b in zip(marks, marks[1:])]
        for key, span in zip(PHASES, spans):
            out[key] += span
    return out


def _apply(ref: MatrixRef, result: MatrixResult) -> None:
    with torch.no_grad():
        view = ref.get()
        if result.weight is not None:
            view.copy_(result.weight.to(view.device, view.dtype))
        view.masked_fill_(~result.mask.to(view.device), 0)  # +0.0: no -0.0 signs to store


def block_view(x: FeatureStats | None, residual: list[torch.Tensor] | None, post: nn.Module | None) -> BlockView | None:
    """The residual stream entering a GLU block's MLP branch at the block's kept input rows
    (``residual``: one tensor per calibration batch, in the order the statistics saw them)
    and the branch's output transform; None when the rows cannot be matched (no kept rows,
    or an expert that saw only some tokens)."""
    if x is None or residual is None or not x.sample_index:
        return None
    rows = [h.reshape(-1, h.shape[-1]) for h in residual]
    if x.tokens != sum(r.shape[0] for r in rows):
        return None
    idx, out, start = torch.cat(x.sample_index), [], 0
    for r in rows:
        local = idx[(idx >= start) & (idx < start + r.shape[0])] - start
        out.append(r[local.to(r.device)].to(x.sqsum.device))
        start += r.shape[0]
    fn = None
    if post is not None:
        dtype = next(post.parameters(), torch.empty(0)).dtype
        fn = lambda y: post(y.to(dtype)).float()  # noqa: E731
    return BlockView(torch.cat(out).float(), fn)


def prune_layer(
    plan: LayerPlan,
    stats: dict[str, FeatureStats],
    method: PruningMethod,
    pattern: Pattern,
    report: PruneReport,
    residual: list[torch.Tensor] | None = None,
    post: nn.Module | None = None,
) -> list[tuple[MatrixRef, MatrixResult]]:
    """Turn one layer's statistics into masks (and weights), apply them in place, record
    them in ``report``; returns each matrix with its result. ``residual``/``post``: the
    MLP-entry residual of every calibration batch and the MLP branch's output transform,
    for methods that read a :class:`~dass.core.alpha.BlockView` (``dass --alpha auto``)."""
    fallback = Magnitude()
    jobs: list[Job] = []
    for block in plan.glu:
        x, h = stats.get(block.x_key), stats.get(block.h_key)
        use = method
        if method.needs_calibration and (x is None or x.tokens == 0):
            use = fallback
            report.fallbacks.append(
                f"{block.gate.key}: expert received no calibration token; pruned by magnitude"
            )
        extra = {"view": block_view(x, residual, post)} if getattr(use, "uses_block_view", False) else {}
        results = use.prune_glu(block.gate.get(), block.up.get(), block.down.get(), x, h, pattern, act=block.act,
                                **extra)
        jobs += [(ref, res, use.name) for ref, res in zip((block.gate, block.up, block.down), results)]
    for target in plan.linears:
        x = stats.get(target.x_key)
        use = method if (x is not None and x.tokens) or not method.needs_calibration else fallback
        jobs.append((target.ref, use.prune_linear(target.ref.get(), x, pattern), use.name))
    for ref, res, used in jobs:
        _apply(ref, res)
        view = ref.get()
        if pattern.is_nm and res.orientation and nm_violations(view, pattern.n, pattern.m, res.orientation):
            raise AssertionError(f"{ref.key}: N:M pattern violated after pruning")  # an internal bug
        report.matrices.append(
            MatrixReport(
                key=ref.key,
                name=ref.name,
                role=ref.role,
                shape=tuple(view.shape),
                pattern=str(pattern),
                orientation=res.orientation,
                sparsity=sparsity_of(view),
                method=used,
                expert=ref.expert,
                rows=ref.rows,
                info=res.info,
            )
        )
        if res.info.get("cholesky_retries"):
            report.notes.append(f"{ref.key}: Cholesky failed, dampening raised to {res.info['damp']:g}")
    return [(ref, res) for ref, res, _ in jobs]


class LayerStep:
    """The per-layer step with the run's state: the propagation shortcut (checked once),
    the reconstruction settings, the progress line and an optional profile.

    ``profile``: a list that receives, for every layer, timestamps at the start and after
    each phase of :data:`PHASES` (see :func:`profile_summary`).
    """

    def __init__(
        self,
        method: PruningMethod,
        pattern: Pattern,
        report: PruneReport,
        device: torch.device,
        store: torch.device,
        layout: BatchLayout | None = None,
        reconstruct: ReconstructOptions | None = None,
        progress: Progress | None = None,
        fast_mlp: bool = True,
        profile: list | None = None,
    ) -> None:
        self.method, self.pattern, self.report = method, pattern, report
        self.device, self.store = device, store
        self.layout, self.reconstruct = layout, reconstruct
        self.progress = progress
        self.fast = FastPath(report, fast_mlp)
        self.profile = profile
        #: the dense model's activations entering the next layer, one per batch (target=model)
        self.dense: list[torch.Tensor] | None = None

    @property
    def keeps_dense(self) -> bool:
        """Whether the step carries the dense model's activations (``target=model``)."""
        return self.reconstruct is not None and self.reconstruct.dense_stream

    def activations(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """What a resumable run saves between layers: ``hidden``, then the dense model's
        activations when the step carries them."""
        return hidden + (self.dense or []) if self.keeps_dense else hidden

    def restore(self, saved: list[torch.Tensor], batches: int) -> list[torch.Tensor] | None:
        """The inverse of :meth:`activations`: the pruned model's activations (None when
        ``saved`` does not hold what this step saves for ``batches`` batches)."""
        if len(saved) != batches * (2 if self.keeps_dense else 1):
            return None
        if self.keeps_dense:
            self.dense = saved[batches:]
        return saved[:batches]

    @staticmethod
    def units(batches: int, reconstruct: ReconstructOptions | None, blocks: int) -> int:
        """Progress units of one layer: each batch twice (statistics, propagation), once
        more for the dense model's pass (``target=model``), plus the reconstruction steps."""
        if reconstruct is None:
            return 2 * batches
        return (3 if reconstruct.dense_stream else 2) * batches + reconstruct.steps * blocks

    def _tick(self, units: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(units)

    def _phase(self, plan: LayerPlan, phase: str) -> None:
        if self.progress is not None:
            self.progress.phase(plan.index, phase)

    def _dense_pass(self, plan: LayerPlan, hidden: list[torch.Tensor], calls: dict, blocks: list) -> dict:
        """Run the still-dense layer on the dense model's activations (first layer: the
        calibration activations themselves): returns each block's outputs, the targets of
        ``target=model``, and moves :attr:`dense` on to the next layer."""
        if self.dense is None:
            self.dense = [h.clone() for h in hidden]
        recorder = BlockRecorder(blocks, self.store, inputs=False)
        handles = recorder.register()
        self._phase(plan, "dense model")
        try:
            for j, h in enumerate(self.dense):
                args, kwargs = calls[h.shape[0]]
                out = first_output(plan.layer(h.to(self.device, non_blocking=True), *args, **kwargs))
                self.dense[j] = to_store(out, self.store, h)
                self._tick()
        finally:
            for handle in handles:
                handle.remove()
        return recorder.outputs

    @torch.no_grad()
    def __call__(self, plan: LayerPlan, hidden: list[torch.Tensor], calls: dict[int, tuple[tuple, dict[str, Any]]]) -> None:
        """Observe, prune, reconstruct and propagate one layer that is already on the device.

        ``hidden`` holds the calibration activations entering the layer, one tensor per batch
        (on the store device); they are replaced in place by the activations entering the
        next layer. ``calls`` maps a batch size to the layer's positional and keyword
        arguments, on the device.
        """
        dev, store, method = self.device, self.store, self.method
        layer = plan.layer
        marks = [_mark(dev)] if self.profile is not None else None
        branch = self.fast.get(plan, hidden[0], calls[hidden[0].shape[0]], dev)
        stats = {
            key: FeatureStats(n, dev, with_hessian=method.needs_hessian, max_samples=method.sample_tokens)
            for key, n in plan.feature_sizes().items()
        }
        blocks = [] if self.reconstruct is None else [
            b for b in plan.blocks if b.name != "attention" or self.reconstruct.attention]
        targets = self._dense_pass(plan, hidden, calls, blocks) if self.keeps_dense else None
        handles = register_stat_hooks(plan, stats)
        recorder = None
        if self.reconstruct is not None:
            recorder = BlockRecorder(blocks, store, targets=targets)
            handles += recorder.register()
        mid: dict[str, torch.Tensor] = {}
        if branch is not None:
            handles.append(branch.entry.register_forward_pre_hook(lambda m, a: mid.__setitem__("h", a[0])))
        stop = last_observed(plan) if recorder is None else None
        if stop is not None:  # registered after the statistics hook: runs after it
            handles.append(stop.register_forward_pre_hook(raise_stop))
        self._phase(plan, "statistics")
        try:
            for j, h in enumerate(hidden):
                args, kwargs = calls[h.shape[0]]
                try:
                    layer(h.to(dev, non_blocking=True), *args, **kwargs)
                except Stop:
                    pass
                if branch is not None:  # the input is not needed again: keep h instead
                    hidden[j] = to_store(mid.pop("h"), store, h)
                self._tick()
        finally:
            for handle in handles:
                handle.remove()
        distributed.current().all_reduce_stats(stats)  # no-op in a single process
        if marks is not None:
            marks.append(_mark(dev))
        self._phase(plan, "pruning")
        view = {}  # the MLP-entry residual (kept in `hidden` by the fast path), for dass --alpha auto
        if branch is not None and distributed.current().world == 1:
            view = {"residual": hidden, "post": branch.post}
        jobs = prune_layer(plan, stats, method, self.pattern, self.report, **view)
        del stats
        if marks is not None:
            marks.append(_mark(dev))
        if recorder is not None:
            self._phase(plan, "reconstruction")
            assert self.layout is not None and self.reconstruct is not None
            self.report.blocks += reconstruct_blocks(plan, jobs, recorder, self.layout, self.reconstruct, dev,
                                                     on_step=lambda s: self._tick())
            del recorder
        if marks is not None:
            marks.append(_mark(dev))
        self._phase(plan, "propagation")
        for j, h in enumerate(hidden):
            x = h.to(dev, non_blocking=True)
            if branch is not None:
                out = branch(x)
            else:
                args, kwargs = calls[h.shape[0]]
                out = first_output(layer(x, *args, **kwargs))
            hidden[j] = to_store(out, store, h)
            self._tick()
        if marks is not None and self.profile is not None:
            marks.append(_mark(dev))
            self.profile.append(marks)
