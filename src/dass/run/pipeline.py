"""The sequential pipeline: walk a model layer by layer, observe, prune, propagate.

The only module that knows about devices, hooks and transformers' calling conventions.
Flow: capture what enters decoder layer 0 and the keyword arguments the model passes to
*each* layer -> for each layer: move it to the compute device, run it on the calibration
activations with hooks that accumulate statistics -> the method turns statistics into
masks (and weights) -> apply -> produce the next layer's inputs.

:func:`process_layer` is that per-layer step; :func:`prune` (a model in memory) and
:func:`dass.run.streaming.prune_checkpoint` (a checkpoint on disk, one layer at a time) both
run it. Two things keep it cheap on a GPU:

- the statistics pass stops as soon as the last observed input has been seen (a dense
  GLU layer's ``down_proj``): the layer's output there is never used;
- under scope ``mlp`` only the MLP changes, so a layer's attention output is the same
  before and after pruning: the statistics pass keeps the residual stream entering the
  MLP branch (``h``) and the next layer's input is ``h + post(mlp(pre(h)))`` with the
  pruned MLP (:class:`MLPResidual`), instead of a second pass through the whole layer.
  The form is known per decoder-layer class and checked numerically on the first layer;
  anything else falls back to running the whole pruned layer again.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dass.arch import MLP_NAMES, ExpertsCapture, LayerPlan, MatrixRef, decoder_layers, plan_model
from dass.core.alpha import BlockView
from dass.core.alpha_report import alpha_summary
from dass.core.graphs import clear_graphs
from dass.core.patterns import Pattern, nm_violations, parse_pattern, sparsity_of
from dass.core.sparsegpt import accumulate_xtx
from dass.core.stats import FeatureStats
from dass.errors import UserValueError
from dass.methods import MatrixResult, PruningMethod, get_method
from dass.run import distributed
from dass.run.memory import choose_store, to_store

try:  # progress bars are a nicety, never a requirement
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it=None, **_: Any):  # type: ignore[no-redef]
        return it


class CalibrationError(UserValueError):
    """Calibration data missing or unusable."""


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


@dataclass
class MatrixReport:
    key: str
    name: str
    role: str
    shape: tuple[int, int]
    pattern: str
    orientation: str | None
    sparsity: float
    method: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MatrixReport":
        """Inverse of ``__dict__`` (after a JSON round trip: tuples come back as lists)."""
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["rows"] = tuple(d["rows"]) if d.get("rows") is not None else None
        return cls(**d)


@dataclass
class PruneReport:
    """What :func:`prune` did: per-matrix sparsity and orientation, fallbacks, timings."""

    method: str
    options: dict[str, Any]
    pattern: str
    scope: str
    nsamples: int
    seqlen: int
    matrices: list[MatrixReport] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    total_seconds: float = 0.0
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned matrices."""
        total = sum(m.shape[0] * m.shape[1] for m in self.matrices)
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.matrices)
        return zeros / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": self.options,
            "pattern": self.pattern,
            "scope": self.scope,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "sparsity": self.sparsity,
            "capture_seconds": self.capture_seconds,
            "total_seconds": self.total_seconds,
            "layer_seconds": self.layer_seconds,
            "fallbacks": self.fallbacks,
            "notes": self.notes,
            "matrices": [m.__dict__ for m in self.matrices],
        }

    def summary(self) -> str:
        head = (
            f"{self.method} {self.pattern} ({self.scope}): {len(self.matrices)} matrices, "
            f"sparsity {self.sparsity:.4f}, {self.total_seconds:.1f} s"
            + (f", {len(self.fallbacks)} fallback(s)" if self.fallbacks else "")
        )
        # issue 15: what --alpha auto chose per block, and its warnings
        extra = alpha_summary([m.info for m in self.matrices if m.role == "gate"])
        return "\n".join([head, *extra])


# --------------------------------------------------------------------------------------
# Moving nested arguments
# --------------------------------------------------------------------------------------


def _move_module(module: nn.Module, device: torch.device | str) -> None:
    """``module.to(device)`` that leaves parameters on the ``meta`` device where they are
    (a streaming skeleton keeps its decoder layers there)."""
    module._apply(lambda t: t if t.is_meta else t.to(device))


def _to(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, non_blocking) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, non_blocking) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, non_blocking) for k, v in obj.items()}
    return obj


_DROP_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past")


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """No KV cache through calibration: it would grow across samples."""
    out = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
    if "use_cache" in out:
        out["use_cache"] = False
    if "output_attentions" in out:
        out["output_attentions"] = False
    return out


def _first(output: Any) -> torch.Tensor:
    """A decoder layer returns a tensor (transformers >= 4.56) or a tuple (older)."""
    return output[0] if isinstance(output, (tuple, list)) else output


# --------------------------------------------------------------------------------------
# Capture of layer inputs
# --------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Calibration activations entering the current layer, one tensor per batch, plus the
    per-layer call arguments (keyed by batch size: they depend only on the shape)."""

    hidden: list[torch.Tensor]
    args: list[dict[int, tuple[tuple, dict[str, Any]]]]  # per layer: batch size -> (args, kwargs)

    def call_args(self, layer: int, batch: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        return self.args[layer][batch.shape[0]]


class _Catcher(nn.Module):
    """Stands in for a decoder layer during capture: records what it is called with."""

    def __init__(self, original: nn.Module, index: int, sink: dict, last: bool, returns_tuple: bool) -> None:
        super().__init__()
        self.__dict__["_original"] = original  # not a submodule: model.to() must not move it
        self.index, self.sink, self.last, self.returns_tuple = index, sink, last, returns_tuple

    def __getattr__(self, name: str) -> Any:  # e.g. ``attention_type`` read by the model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        hidden = _first(hidden)
        if self.index == 0:
            self.sink["hidden"] = hidden
        self.sink.setdefault("args", {})[self.index] = (rest, _clean_kwargs(kwargs))
        if self.last:
            raise _Stop
        return (hidden,) if self.returns_tuple else hidden


def _returns_tuple(layer: nn.Module) -> bool:
    ann = inspect.signature(layer.forward).return_annotation
    return "tuple" in str(ann).lower()


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    device: torch.device,
    store_device: torch.device,
    progress: bool = True,
    restore: bool = True,
) -> LayerInputs:
    """Run the model's own forward with every decoder layer replaced by a catcher.

    The model computes masks, positions and rotary embeddings exactly as in inference, for
    every layer (Gemma 2/3 alternate sliding-window and global masks); nothing of the
    decoder layers runs, and only the non-layer modules are moved to ``device`` (and back
    afterwards when ``restore``). Parameters on the ``meta`` device are left alone.
    """
    path, layers = decoder_layers(model)
    originals = list(layers)
    tuple_out = _returns_tuple(originals[0])
    model_device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    per_layer: list[dict[int, tuple[tuple, dict]]] = [dict() for _ in originals]
    hidden: list[torch.Tensor] = []
    sink: dict = {}
    try:
        for i, orig in enumerate(originals):
            layers[i] = _Catcher(orig, i, sink, i == len(originals) - 1, tuple_out)
        _move_module(model, device)
        for batch in tqdm(batches, desc="capture", disable=not progress, leave=False):
            sink.clear()
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
            else:  # pragma: no cover - a model that skips layers
                raise RuntimeError("the model returned without calling its last decoder layer")
            hidden.append(to_store(sink["hidden"].detach(), store_device))
            bs = batch.shape[0]
            for i, call in sink["args"].items():
                if bs not in per_layer[i]:
                    per_layer[i][bs] = call
    finally:
        for i, orig in enumerate(originals):
            layers[i] = orig
        if restore:
            _move_module(model, model_device)
    return LayerInputs(hidden, per_layer)


# --------------------------------------------------------------------------------------
# Statistics hooks
# --------------------------------------------------------------------------------------


def observe(acc: FeatureStats, x: torch.Tensor) -> None:
    """``acc.add(x)``, with SparseGPT's ``X^T X`` taken by one half-precision matrix
    product with fp32 output on a GPU (products of bf16/fp16 values are exact in fp32 and
    the sum is accumulated in fp32: the same sum as upcasting first, without an fp32 GEMM,
    which is about ten times slower)."""
    if acc.xtx is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        acc.add(x)
        return
    xtx, acc.xtx = acc.xtx, None
    try:
        acc.add(x)  # sums of squares, token count, kept samples
    finally:
        acc.xtx = xtx
    accumulate_xtx(xtx, x.reshape(-1, x.shape[-1]))


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _experts_hook(cap: ExpertsCapture, stats: dict[str, FeatureStats]):
    """Per-expert statistics from a fused-experts call ``(hidden, top_k_index, weights)``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs["hidden_states"]
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hs = hs.reshape(-1, hs.shape[-1])
        idx = idx.reshape(hs.shape[0], -1)
        gate_up = module.gate_up_proj
        for e in range(cap.num_experts):
            tokens = (idx == e).any(-1).nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            x = hs[tokens]
            gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
            observe(stats[cap.x_key(e)], x)
            observe(stats[cap.h_key(e)], cap.act_fn(gate) * up)

    return hook


def _register_hooks(plan: LayerPlan, stats: dict[str, FeatureStats]) -> list:
    """Forward pre-hooks that accumulate each observed module's input (pre-hooks, so that
    a later hook on the same module can stop the layer right after)."""
    handles = []
    for cap in plan.inputs:
        acc = stats[cap.key]
        handles.append(
            cap.module.register_forward_pre_hook(
                lambda m, args, kwargs, acc=acc: observe(acc, _first_input(args, kwargs)), with_kwargs=True
            )
        )
    for ecap in plan.experts:
        handles.append(ecap.module.register_forward_pre_hook(_experts_hook(ecap, stats), with_kwargs=True))
    return handles


def _raise_stop(module: nn.Module, args: tuple) -> None:
    raise _Stop


def last_observed(plan: LayerPlan) -> nn.Module | None:
    """The module whose input is the last statistic a layer pass gathers, if it is known:
    the ``down_proj`` of a layer with one dense GLU block (attention projections, when
    observed, come before it). None for MoE layers and plain MLPs."""
    if len(plan.glu) != 1 or plan.experts or plan.glu[0].expert is not None:
        return None
    down = plan.glu[0].down.module
    return down if isinstance(down, nn.Linear) else None


# --------------------------------------------------------------------------------------
# Propagation without re-running attention (scope mlp)
# --------------------------------------------------------------------------------------

# Decoder-layer class -> (norm applied to h before the MLP or None, norm applied to the
# MLP output or None). The layer computes ``h + post(mlp(pre(h)))`` where ``h`` is the
# residual stream after attention. Read off each class's forward in transformers 5.x;
# checked against a full layer pass on the first layer of every run.
MLP_FORMS: dict[str, tuple[str | None, str | None]] = {
    "LlamaDecoderLayer": ("post_attention_layernorm", None),
    "MistralDecoderLayer": ("post_attention_layernorm", None),
    "Qwen2DecoderLayer": ("post_attention_layernorm", None),
    "Qwen3DecoderLayer": ("post_attention_layernorm", None),
    "GemmaDecoderLayer": ("post_attention_layernorm", None),
    "Phi3DecoderLayer": ("post_attention_layernorm", None),  # + resid_mlp_dropout (identity in eval)
    "MixtralDecoderLayer": ("post_attention_layernorm", None),
    "Gemma2DecoderLayer": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "Gemma3DecoderLayer": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "Olmo2DecoderLayer": (None, "post_feedforward_layernorm"),
}

FAST_MLP = True  # tests switch this off to compare with full re-runs


@dataclass
class MLPResidual:
    """A decoder layer's MLP branch: ``h -> h + post(mlp(pre(h)))``; ``entry`` is the
    first module that sees ``h`` (where a pre-hook captures it)."""

    entry: nn.Module
    pre: nn.Module | None
    mlp: nn.Module
    post: nn.Module | None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = self.pre(h) if self.pre is not None else h
        y = _first(self.mlp(x))
        if self.post is not None:
            y = self.post(y)
        return h + y


def mlp_residual(plan: LayerPlan) -> MLPResidual | None:
    """The MLP branch of ``plan.layer`` if its form is known and only the MLP is pruned."""
    if not FAST_MLP or plan.attention_pruned:
        return None
    form = MLP_FORMS.get(type(plan.layer).__name__)
    if form is None:
        return None
    mlp = next((m for n in MLP_NAMES if isinstance(m := getattr(plan.layer, n, None), nn.Module)), None)
    mods = [getattr(plan.layer, n, None) if n else None for n in form]
    if mlp is None or any(n and not isinstance(m, nn.Module) for n, m in zip(form, mods)):
        return None
    pre, post = mods
    return MLPResidual(pre if pre is not None else mlp, pre, mlp, post)


class FastPath:
    """Per-run state of the MLP-only propagation: checked once, on the first layer, by
    comparing ``h + post(mlp(pre(h)))`` with the layer's own output on one batch."""

    def __init__(self, report: "PruneReport") -> None:
        self.report = report
        self.checked = False
        self.ok = True

    def get(self, plan: LayerPlan, hidden: torch.Tensor, call: tuple[tuple, dict], dev: torch.device) -> MLPResidual | None:
        branch = mlp_residual(plan) if self.ok else None
        if branch is None or self.checked:
            return branch
        self.checked = True
        seen: dict[str, torch.Tensor] = {}
        handle = branch.entry.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
        try:
            x = hidden.to(dev)
            want = _first(plan.layer(x, *call[0], **call[1]))
        finally:
            handle.remove()
        got = branch(seen["h"]) if "h" in seen else None
        if got is not None and got.shape == want.shape:
            diff = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
            if float(diff) <= 1e-3:
                self._note(f"propagation: MLP branch only ({type(plan.layer).__name__}: attention outputs reused)")
                return branch
        self.ok = False
        self._note(
            f"propagation: {type(plan.layer).__name__} did not match h + post(mlp(pre(h))); "
            "every pruned layer is run again in full"
        )
        return None

    def _note(self, text: str) -> None:
        if text not in self.report.notes:
            self.report.notes.append(text)


# --------------------------------------------------------------------------------------
# One layer: observe, prune, propagate
# --------------------------------------------------------------------------------------

PROFILE: list | None = None
"""Set to a list to record, for every processed layer, timestamps (CUDA events on a GPU,
so no synchronisation is added) at the start, after the statistics pass, after pruning
and after propagation; :func:`profile_summary` turns them into seconds per phase."""


def _mark(device: torch.device) -> Any:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def profile_summary(profile: list) -> dict[str, float]:
    """Seconds spent in each phase of :func:`process_layer` over the recorded layers."""
    out = {"observe": 0.0, "prune": 0.0, "propagate": 0.0}
    for marks in profile:
        if isinstance(marks[0], torch.cuda.Event):
            marks[-1].synchronize()
            spans = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
        else:
            spans = [b - a for a, b in zip(marks, marks[1:])]
        for key, span in zip(out, spans):
            out[key] += span
    return out



@torch.no_grad()
def process_layer(
    plan: LayerPlan,
    hidden: list[torch.Tensor],
    calls: dict[int, tuple[tuple, dict[str, Any]]],
    method: PruningMethod,
    pattern: Pattern,
    report: "PruneReport",
    device: torch.device,
    store: torch.device,
    fast: FastPath | None = None,
) -> None:
    """Observe, prune and propagate one decoder layer that is already on ``device``.

    ``hidden`` holds the calibration activations entering the layer, one tensor per batch
    (on ``store``); they are replaced in place by the activations entering the next layer.
    ``calls`` maps a batch size to the layer's positional and keyword arguments, on
    ``device``.
    """
    layer = plan.layer
    marks = [_mark(device)] if PROFILE is not None else None
    branch = fast.get(plan, hidden[0], calls[hidden[0].shape[0]], device) if fast is not None else None
    stats = {
        key: FeatureStats(n, device, with_hessian=method.needs_hessian, max_samples=method.sample_tokens)
        for key, n in plan.feature_sizes().items()
    }
    handles = _register_hooks(plan, stats)
    mid: dict[str, torch.Tensor] = {}
    if branch is not None:
        handles.append(branch.entry.register_forward_pre_hook(lambda m, a: mid.__setitem__("h", a[0])))
    stop = last_observed(plan)
    if stop is not None:  # registered after the statistics hook: runs after it
        handles.append(stop.register_forward_pre_hook(_raise_stop))
    try:
        for j, h in enumerate(hidden):
            args, kwargs = calls[h.shape[0]]
            try:
                layer(h.to(device, non_blocking=True), *args, **kwargs)
            except _Stop:
                pass
            if branch is not None:  # the input is not needed again: keep h instead
                hidden[j] = to_store(mid.pop("h"), store, h)
    finally:
        for handle in handles:
            handle.remove()
    distributed.current().all_reduce_stats(stats)  # no-op in a single process
    if marks is not None:
        marks.append(_mark(device))
    view = {}  # issue 15: the MLP-entry residual (kept in `hidden` by the fast path) for dass --alpha auto
    if branch is not None and distributed.current().world == 1:
        view = {"residual": hidden, "post": branch.post}
    prune_layer(plan, stats, method, pattern, report, **view)
    del stats
    if marks is not None:
        marks.append(_mark(device))
    for j, h in enumerate(hidden):
        x = h.to(device, non_blocking=True)
        if branch is not None:
            out = branch(x)
        else:
            args, kwargs = calls[h.shape[0]]
            out = _first(layer(x, *args, **kwargs))
        hidden[j] = to_store(out, store, h)
    if marks is not None and PROFILE is not None:
        marks.append(_mark(device))
        PROFILE.append(marks)


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
) -> None:
    """Turn one layer's statistics into masks (and weights) and apply them in place.
    ``residual``/``post``: the MLP-entry residual of every calibration batch and the MLP
    branch's output transform, for methods that read a :class:`BlockView`."""
    fallback = get_method("magnitude")
    jobs: list[tuple[MatrixRef, MatrixResult, str]] = []
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


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


def as_calibration_tensor(
    calibration: Any,
    tokenizer: Any = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids ``[N, L]`` from a tensor, a list of token tensors, or a text source."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration if calibration.dim() == 2 else calibration.reshape(1, -1)
    elif isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], torch.Tensor):
        rows = [c.reshape(-1) for c in calibration]
        if len({r.numel() for r in rows}) != 1:
            raise CalibrationError("calibration sequences must all have the same length")
        ids = torch.stack(rows)
    elif isinstance(calibration, str):
        if tokenizer is None:
            raise CalibrationError("a text calibration source needs a tokenizer")
        from dass.io.data import sample_calibration

        ids = sample_calibration(tokenizer, calibration, nsamples=nsamples, seqlen=seqlen, seed=seed)
    else:
        raise CalibrationError(
            "calibration must be token ids (tensor [N, L] or a list of tensors) or a text source "
            "('default', a .txt or .jsonl file, 'c4', 'wikitext2')"
        )
    if ids.numel() == 0:
        raise CalibrationError("calibration data is empty")
    return ids.long()


def activation_bytes(ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of the calibration activations of one layer boundary."""
    return ids.numel() * hidden_size * dtype.itemsize


# --------------------------------------------------------------------------------------
# The public verb
# --------------------------------------------------------------------------------------


def calibration_batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """This process's calibration batches: all of them, or under torch.distributed a
    disjoint share (statistics are then all-reduced per layer)."""
    ctx = distributed.current()
    batches = list(ids.split(batch_size))
    if len(batches) < ctx.world:
        raise CalibrationError(
            f"{len(batches)} calibration batches cannot be shared by {ctx.world} processes: "
            "use more samples or a smaller --batch-size"
        )
    return ctx.shard(batches)


def validate(model: nn.Module, method: PruningMethod, pattern: Pattern, scope: str) -> list[LayerPlan]:
    """Check everything that can be checked before the model is modified."""
    plans = plan_model(model, scope=scope, require_glu=method.requires_glu)
    for plan in plans:
        for ref in plan.matrices():
            pattern.check_shape(ref.shape, method.orientation(ref.role), ref.key)
    return plans


def check_options(scope: str, activations: str, batch_size: int) -> None:
    if scope not in ("mlp", "all"):
        raise ValueError(f"unknown scope {scope!r}: use 'mlp' or 'all'")
    if activations not in ("auto", "device", "cpu"):
        raise ValueError(f"activations must be auto, device or cpu, got {activations!r}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")


def prune(
    model: nn.Module,
    method: str | PruningMethod = "dass",
    pattern: str | float | Pattern = "2:4",
    scope: str = "mlp",
    calibration: Any = "default",
    tokenizer: Any = None,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    activations: str = "auto",
    progress: bool = True,
    **method_options: Any,
) -> PruneReport:
    """Prune ``model`` in place, one decoder layer at a time, and return a report.

    ``method``: a registered name (``dass``, ``wanda``, ``sparsegpt``, ``magnitude``) or a
    method object; ``method_options`` go to its constructor (e.g. ``alpha=0.5``).
    ``calibration``: token ids ``[N, L]``, a list of token tensors, or a text source
    (``default``, a .txt/.jsonl path, ``c4``, ``wikitext2``) sampled with ``tokenizer``,
    ``nsamples``, ``seqlen`` and ``seed``. ``device``: where each layer is computed
    (default: CUDA if available, else the model's device); the rest of the model stays
    where it is. ``activations``: ``auto`` | ``device`` | ``cpu``: where calibration
    activations live between layers (``auto``: on the device when they fit in half of its
    free memory, else pinned host memory). For a checkpoint too large for memory, see
    :func:`dass.run.streaming.prune_checkpoint`.
    """
    t0 = time.perf_counter()
    meth = get_method(method, **method_options)
    pat = parse_pattern(pattern)
    check_options(scope, activations, batch_size)
    plans = validate(model, meth, pat, scope)
    ids = None
    if meth.needs_calibration or calibration is not None:
        ids = as_calibration_tensor(calibration, tokenizer, nsamples, seqlen, seed)
    report = PruneReport(
        meth.name,
        meth.options(),
        str(pat),
        scope,
        nsamples=0 if ids is None else ids.shape[0],
        seqlen=0 if ids is None else ids.shape[1],
    )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        if ids is None:  # magnitude without calibration: nothing to observe
            for plan in tqdm(plans, desc=f"{meth.name} {pat}", disable=not progress):
                ts = time.perf_counter()
                prune_layer(plan, {}, meth, pat, report)
                report.layer_seconds.append(time.perf_counter() - ts)
        else:
            _run_sequential(model, plans, ids, meth, pat, report, dev, batch_size, activations, progress)
    finally:
        model.train(was_training)
    report.total_seconds = time.perf_counter() - t0
    return report


@torch.no_grad()
def _run_sequential(
    model: nn.Module,
    plans: list[LayerPlan],
    ids: torch.Tensor,
    meth: PruningMethod,
    pat: Pattern,
    report: PruneReport,
    dev: torch.device,
    batch_size: int,
    activations: str,
    progress: bool,
) -> None:
    t_cap = time.perf_counter()
    batches = calibration_batches(ids, batch_size)
    dtype = next(model.parameters()).dtype
    hidden_size = getattr(model.config, "hidden_size", None) or 0
    store = choose_store(dev, activations, activation_bytes(ids, hidden_size, dtype))
    inputs = capture_inputs(model, batches, dev, store, progress)
    report.capture_seconds = time.perf_counter() - t_cap
    if store != dev:
        report.notes.append(f"calibration activations offloaded to {store}")
    fast = FastPath(report)
    for plan in tqdm(plans, desc=f"{meth.name} {pat}", disable=not progress):
        ts = time.perf_counter()
        layer = plan.layer
        home = next(layer.parameters()).device
        layer.to(dev)
        calls = {bs: _to(a, dev) for bs, a in inputs.args[plan.index].items()}
        process_layer(plan, inputs.hidden, calls, meth, pat, report, dev, store, fast)
        layer.to(home)
        report.layer_seconds.append(time.perf_counter() - ts)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        clear_graphs()
