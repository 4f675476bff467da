"""The public verb: prune a model in memory, one decoder layer at a time.

Flow: capture what enters decoder layer 0 and the arguments the model passes to each layer
(:mod:`dass.run.capture`) -> for each layer: move it to the compute device, run the
per-layer step (:class:`dass.run.layer.LayerStep`: statistics, masks, optional
reconstruction, the next layer's inputs) -> move it back. For a checkpoint too large for
memory, :func:`dass.run.streaming.prune_checkpoint` runs the same step on layers read from
disk.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from dass.core.graphs import clear_graphs
from dass.core.patterns import Pattern
from dass.methods import PruningMethod
from dass.run.calibration import calibration_batches
from dass.run.capture import capture_inputs, to_device
from dass.run.layer import prune_layer
from dass.run.report import PruneReport
from dass.run.spec import RunSpec


def prune(
    model: nn.Module,
    method: "str | PruningMethod | RunSpec" = "dass",
    pattern: "str | float | Pattern" = "2:4",
    scope: str = "mlp",
    calibration: Any = "default",
    tokenizer: Any = None,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    batch_size: int = 8,
    device: "str | torch.device | None" = None,
    activations: str = "auto",
    reconstruct: Any = None,
    progress: bool = True,
    profile: list | None = None,
    fast_mlp: bool = True,
    **method_options: Any,
) -> PruneReport:
    """Prune ``model`` in place, one decoder layer at a time, and return a report.

    ``method``: a registered name (``dass``, ``dass-obs``, ``wanda``, ``sparsegpt``,
    ``magnitude``), a spec string (``"dass:alpha=auto,rescale=down"``), a method object
    (``DaSS(alpha=1.0)``) or a whole :class:`~dass.run.spec.RunSpec` (then the other run
    arguments must be left at their defaults); ``method_options`` go to the method's
    options (e.g. ``alpha=0.5``). ``calibration``: token ids ``[N, L]``, a list of token
    tensors, or a text source (``default``, a .txt/.jsonl path, ``c4``, ``wikitext2``)
    sampled with ``tokenizer``, ``nsamples``, ``seqlen`` and ``seed``. ``device``: where
    each layer is computed (default: CUDA if available, else the model's device); the rest
    of the model stays where it is. ``activations``: ``auto`` | ``device`` | ``cpu``: where
    calibration activations live between layers. ``reconstruct``: refit the kept weights of
    every pruned block to the dense block's output after its masks are applied (``True``,
    a spec such as ``"steps=200,lr=0.05"``, or
    :class:`~dass.run.reconstruct.ReconstructOptions`). ``profile``: a list that receives
    per-layer phase timestamps (:func:`dass.run.layer.profile_summary`). ``fast_mlp=False``
    always propagates through the whole layer (for comparisons).
    """
    t0 = time.perf_counter()
    if isinstance(method, RunSpec):
        spec = method
    else:
        spec = RunSpec.create(method, pattern, scope, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                              batch_size=batch_size, device=device, activations=activations,
                              reconstruct=reconstruct, **method_options)
    plans = spec.plan(model)
    ids = spec.calibration_ids(tokenizer)
    report = spec.new_report(ids)
    dev = spec.compute_device(model)
    was_training = model.training
    model.eval()
    try:
        if ids is None:  # magnitude without calibration: nothing to observe
            for plan in plans:
                ts = time.perf_counter()
                prune_layer(plan, {}, spec.method, spec.pattern, report)
                report.layer_seconds.append(time.perf_counter() - ts)
        else:
            _walk_in_memory(spec, model, plans, ids, report, dev, progress, profile, fast_mlp)
    finally:
        model.train(was_training)
    report.total_seconds = time.perf_counter() - t0
    return report


@torch.no_grad()
def _walk_in_memory(
    spec: RunSpec,
    model: nn.Module,
    plans: list,
    ids: torch.Tensor,
    report: PruneReport,
    dev: torch.device,
    progress: bool,
    profile: list | None,
    fast_mlp: bool,
) -> None:
    t_cap = time.perf_counter()
    batches = calibration_batches(ids, spec.batch_size)
    dtype = next(model.parameters()).dtype
    hidden_size = getattr(model.config, "hidden_size", None) or 0
    store = spec.store(dev, ids, hidden_size, dtype)
    step = spec.layer_step(report, dev, store, ids, plans, progress=progress, fast_mlp=fast_mlp, profile=profile)
    try:
        inputs = capture_inputs(model, batches, dev, store, progress=False)
        report.capture_seconds = time.perf_counter() - t_cap
        if store != dev:
            report.notes.append(f"calibration activations offloaded to {store}")
        for plan in plans:
            ts = time.perf_counter()
            layer = plan.layer
            home = next(layer.parameters()).device
            layer.to(dev)
            calls = {bs: to_device(a, dev) for bs, a in inputs.args[plan.index].items()}
            step(plan, inputs.hidden, calls)
            layer.to(home)
            report.layer_seconds.append(time.perf_counter() - ts)
    finally:
        if step.progress is not None:
            step.progress.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        clear_graphs()
