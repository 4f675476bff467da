"""Reconstruction: after a layer's masks are applied, refit the kept weights of each pruned
block (the MLP; under scope ``all`` the attention too) to the dense block's output.

During the statistics pass :class:`BlockRecorder` keeps, for every calibration batch, what
enters each block and what the *dense* block returns (the targets). After pruning,
:func:`reconstruct_blocks` fits the kept weights with :func:`dass.core.reconstruct.fit`
(fp32 masters, autocast in the model's half precision on a GPU, masks fixed so N:M stays
exact) on rows sampled from all calibration batches, then writes the weights back; the
propagation that follows sees the refitted block.

The rows are numbered globally over the whole calibration set and sampled from one seeded
generator, so under torch.distributed every rank draws the same rows, evaluates the ones it
holds, and the gradients are summed: K processes fit what one process fits, up to the
order in which floating-point sums are taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from dass.arch import Block, LayerPlan, MatrixRef
from dass.core.reconstruct import MaskedParams, fit, sample_rows
from dass.methods.base import MatrixResult
from dass.methods.options import (
    MethodOptions,
    as_bool,
    as_nonneg_int,
    as_positive_float,
    as_positive_int,
    one_of,
    option,
)
from dass.run import distributed
from dass.run.capture import first_output, map_tensors, to_device
from dass.run.memory import to_store


@dataclass(frozen=True)
class ReconstructOptions(MethodOptions):
    """How each pruned block is refitted (``--reconstruct key=value,...``)."""

    method = "reconstruct"
    steps: int = option(500, "Adam steps per block (0: measure the block error only)", as_nonneg_int)
    lr: float = option(0.01, "learning rate, times each matrix's RMS with lr_scale=rms", as_positive_float)
    batch_tokens: int = option(4096, "calibration tokens per step", as_positive_int)
    schedule: str = option("cosine", "learning-rate schedule after the warm-up: cosine (to zero) or constant",
                           one_of("cosine", "constant"))
    warmup: int = option(0, "linear warm-up steps", as_nonneg_int)
    lr_scale: str = option("rms", "rms (lr relative to each matrix's RMS) or absolute", one_of("rms", "absolute"))
    attention: bool = option(True, "under --scope all, refit the attention block too", as_bool)
    precision: str = option("auto", "block forward: auto (on a GPU bf16 autocast, fp16 for fp16 models; on a CPU "
                            "the model's dtype) or model (the model's dtype everywhere); the fitted fp32 masters and "
                            "the loss are fp32 either way", one_of("auto", "model"))
    eval_tokens: int = option(4096, "calibration tokens the block error before/after is measured on",
                              as_positive_int)
    seed: int = option(0, "seed of the row sampling", as_nonneg_int)
    target: str = option("block", "what each block is fitted to: block (the dense block's output on the pruned "
                         "model's inputs) or model (the dense model's own block output, so the fit also corrects "
                         "the error of the layers before; one more forward pass and one more set of activations)",
                         one_of("block", "model"))

    @property
    def dense_stream(self) -> bool:
        """Whether the run carries the dense model's activations beside the pruned ones."""
        return self.target == "model"


def reconstruct_options(value: Any) -> ReconstructOptions | None:
    """``None``/``False`` (off), ``True`` or ``""`` (defaults), a spec ``"steps=200,lr=0.02"``,
    a mapping, or an options object."""
    if value is None or value is False:
        return None
    if isinstance(value, ReconstructOptions):
        return value
    if value is True:
        return ReconstructOptions()
    if isinstance(value, str):
        from dass.methods.options import split_spec

        _, values = split_spec("reconstruct:" + value.strip().removeprefix("reconstruct:"))
        return ReconstructOptions.parse(values)
    if isinstance(value, dict):
        return ReconstructOptions.parse(value)
    raise TypeError(f"reconstruct must be a bool, a spec string, a dict or ReconstructOptions, got {value!r}")


# ------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class BatchLayout:
    """How the calibration set is split into batches and, under torch.distributed, which
    batches this process holds (batches ``rank, rank + world, ...``)."""

    nsamples: int
    seqlen: int
    batch_size: int
    rank: int = 0
    world: int = 1

    @property
    def rows(self) -> int:
        return self.nsamples * self.seqlen

    def locate(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For global sequence numbers: which of them this process holds, and their
        position among its own sequences (its batches concatenated in order)."""
        batch = torch.div(seqs, self.batch_size, rounding_mode="floor")
        mine = batch % self.world == self.rank
        local = torch.div(batch, self.world, rounding_mode="floor") * self.batch_size + seqs % self.batch_size
        return mine, local


# ------------------------------------------------------------------------------ recording


class BlockRecorder:
    """Hooks for the statistics pass: each block's call (inputs) and dense output, per batch.

    ``inputs``: record the calls. ``targets``: outputs recorded elsewhere, used instead of
    recording this pass's (with ``target=model`` the calls come from the pruned model's
    statistics pass and the outputs from a pass of the dense layer over the dense model's
    own activations)."""

    def __init__(self, blocks: list[Block], store: torch.device, inputs: bool = True,
                 targets: dict[str, list[torch.Tensor]] | None = None) -> None:
        self.blocks = blocks
        self.store = store
        self.inputs, self.record_outputs = inputs, targets is None
        self.calls: dict[str, list[tuple[tuple, dict]]] = {b.name: [] for b in blocks}
        self.outputs: dict[str, list[torch.Tensor]] = targets if targets is not None else {b.name: [] for b in blocks}

    def register(self) -> list:
        handles = []
        for b in self.blocks:
            def pre(module: nn.Module, args: tuple, kwargs: dict, name: str = b.name, token_wise: bool = b.token_wise):
                if token_wise:  # only the input rows are needed, and they can leave the device
                    x = args[0] if args else next(iter(kwargs.values()))
                    self.calls[name].append(((to_store(x.detach(), self.store),), {}))
                else:
                    self.calls[name].append((args, kwargs))

            def post(module: nn.Module, args: tuple, output: Any, name: str = b.name):
                self.outputs[name].append(to_store(first_output(output).detach(), self.store))

            if self.inputs:
                handles.append(b.module.register_forward_pre_hook(pre, with_kwargs=True))
            if self.record_outputs:
                handles.append(b.module.register_forward_hook(post))
        return handles


# ------------------------------------------------------------------------------ fitting


def _trainable(block: Block, jobs: list[tuple[MatrixRef, MatrixResult]]) -> tuple[dict, dict]:
    """The block's pruned parameters by name (relative to the block) and their trainable
    masks (the kept positions of every pruned matrix inside each parameter)."""
    names = {id(p): n for n, p in block.module.named_parameters()}
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for ref, res in jobs:
        param = ref.parameter()
        name = names.get(id(param))
        if name is None:
            continue  # a matrix of another block
        if name not in masks:
            weights[name] = param
            masks[name] = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        ref.view_of(masks[name])[...] |= res.mask.to(param.device)
    return weights, masks


def _select(obj: Any, batch: int, idx: torch.Tensor) -> Any:
    """Sequences ``idx`` of every tensor in a call's arguments whose first dimension is the
    batch (``batch`` sequences); other values (broadcast masks, None) as they are."""
    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, idx.to(t.device)) if t.dim() and t.shape[0] == batch and batch > 1 else t

    return map_tensors(pick, obj)


def _autocast(device: torch.device, dtype: torch.dtype, precision: str) -> torch.dtype | None:
    """The autocast dtype of block forwards: half precision on a GPU (the model's half
    dtype; bf16 for an fp32 model), none on the CPU or with ``precision="model"``."""
    if device.type != "cuda" or precision == "model":
        return None
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


class _BlockData:
    """One block's recorded calls and targets, and the loss on chosen global rows."""

    def __init__(self, block: Block, recorder: BlockRecorder, layout: BatchLayout, device: torch.device,
                 dtype: torch.dtype, precision: str) -> None:
        self.block, self.layout, self.device, self.dtype = block, layout, device, dtype
        self.amp = _autocast(device, dtype, precision)
        calls, outs = recorder.calls[block.name], recorder.outputs[block.name]
        if block.token_wise:
            x = torch.cat([c[0][0] for c in calls])
            self.x = x.reshape(-1, x.shape[-1])
            y = torch.cat(outs)
            self.y = y.reshape(-1, y.shape[-1])
            self.total = layout.rows
            del x, y
        else:
            self.calls, self.outs = calls, outs
            self.total = layout.nsamples
        # the dense output's mean squared norm per row (over every process's rows)
        # (per token row for an MLP, per sequence for attention)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for o in outs:
            sums[0] += o.to(device).float().pow(2).sum(dtype=torch.float64)
            sums[1] += o.shape[0] * (o.shape[1] if block.token_wise and o.dim() == 3 else 1)
        distributed.current().all_reduce_tensors([sums])
        self.norm = float(sums[0] / sums[1].clamp_min(1))

    def _call(self, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        """The block with ``weights``: under autocast, or with the weights cast to the
        module's dtype (the cast is differentiable, so the fp32 masters still learn)."""
        if self.amp is None:
            weights = {k: w.to(self.dtype) for k, w in weights.items()}
            return first_output(functional_call(self.block.module, weights, args, kwargs))
        with torch.autocast(self.device.type, dtype=self.amp):
            return first_output(functional_call(self.block.module, weights, args, kwargs))

    def loss(self, weights: dict[str, torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Sum of squared errors of the block's output on the global ``rows`` this process
        holds (token rows for an MLP, sequences for attention)."""
        L = self.layout.seqlen
        if self.block.token_wise:
            mine, local_seq = self.layout.locate(torch.div(rows, L, rounding_mode="floor"))
            idx = (local_seq * L + rows % L)[mine]
            if idx.numel() == 0:
                return torch.zeros((), device=self.device), 0
            x = self.x.index_select(0, idx.to(self.x.device)).to(self.device, non_blocking=True)
            y = self.y.index_select(0, idx.to(self.y.device)).to(self.device, non_blocking=True)
            out = self._call(weights, (x.unsqueeze(0),), {})
            return (out.float().reshape(y.shape) - y.float()).pow(2).sum(), int(idx.numel())
        mine, local_seq = self.layout.locate(rows)
        err = torch.zeros((), device=self.device)
        n = 0
        local = local_seq[mine]
        bs = self.layout.batch_size
        for j in torch.unique(torch.div(local, bs, rounding_mode="floor")).tolist():
            sel = (local[torch.div(local, bs, rounding_mode="floor") == j] % bs).cpu()
            args, kwargs = self.calls[j]
            batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
            a = to_device(_select(args, batch, sel), self.device)
            kw = to_device(_select(kwargs, batch, sel), self.device)
            y = self.outs[j].index_select(0, sel.to(self.outs[j].device)).to(self.device)
            out = self._call(weights, a, kw)
            err = err + (out.float() - y.float()).pow(2).sum()
            n += int(sel.numel())
        return err, n


def reconstruct_blocks(
    plan: LayerPlan,
    jobs: list[tuple[MatrixRef, MatrixResult]],
    recorder: BlockRecorder,
    layout: BatchLayout,
    options: ReconstructOptions,
    device: torch.device,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Refit every recorded block of ``plan`` in place; one record per block."""
    records = []
    ctx = distributed.current()
    for bi, block in enumerate(recorder.blocks):
        weights, masks = _trainable(block, jobs)
        if not weights:
            continue
        dtype = next(iter(weights.values())).dtype
        data = _BlockData(block, recorder, layout, device, dtype, options.precision)
        gen = torch.Generator().manual_seed(options.seed * 1_000_003 + plan.index * 101 + bi)
        per_step = options.batch_tokens if block.token_wise else max(1, options.batch_tokens // layout.seqlen)
        n_eval = options.eval_tokens if block.token_wise else max(1, options.eval_tokens // layout.seqlen)
        eval_rows = sample_rows(torch.Generator().manual_seed(options.seed + 7919 * (plan.index + 1) + bi),
                                data.total, n_eval)
        params = MaskedParams.from_weights({k: w.to(device) for k, w in weights.items()}, masks)
        with torch.enable_grad():
            res = fit(params, data.loss, data.total, data.norm, steps=options.steps, lr=options.lr,
                      batch_rows=per_step, generator=gen, eval_rows=eval_rows, schedule=options.schedule,
                      warmup=options.warmup, lr_scale=options.lr_scale, reduce=ctx.all_reduce_tensors,
                      on_step=on_step)
        with torch.no_grad():
            for k, w in params.result().items():
                weights[k].copy_(w.to(weights[k].device))
        records.append({"layer": plan.index, "block": block.prefix, "loss_before": res.loss_before,
                        "loss_after": res.loss_after, "steps": res.steps})
    return records
