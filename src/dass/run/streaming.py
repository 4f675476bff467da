"""Prune a safetensors checkpoint layer by layer, from disk to disk.

:func:`prune_checkpoint` never holds the whole model: the model is built from its config
with every parameter on the ``meta`` device; the non-layer tensors that the capture needs
(embeddings, norms, rotary buffers) are loaded; then each decoder layer's tensors are read
from the shards just before it is processed, pruned by the same per-layer step as
:func:`dass.prune` (:class:`dass.run.layer.LayerStep`), written as one output shard and
dropped. Peak host memory is a few layers (the one being read ahead, the one being
written) plus the activations if they do not fit on the device.

The output is an ordinary transformers directory (one shard per layer, one per non-layer
tensor, ``model.safetensors.index.json``, the source's config and tokenizer files, and
``dass.json``) written into ``OUT.partial`` and renamed to ``OUT`` when complete. The run
is resumable: see :mod:`dass.run.resume`. Restarting the same command after a crash continues
from the last saved layer and gives byte-identical tensor files.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dass.arch import decoder_layers
from dass.core.graphs import clear_graphs
from dass.io.hashing import tensor_digest, tensors_digest
from dass.io.sharded import (  # noqa: F401  (StreamingError, parameters_on_meta: part of this module's API)
    INDEX,
    ShardedCheckpoint,
    StreamingError,
    build_skeleton,
    get_tensor,
    model_tensor_names,
    parameters_on_meta,
    set_tensor,
)
from dass.run import distributed
from dass.run.calibration import as_calibration_tensor, calibration_batches
from dass.run.capture import capture_inputs, move_module
from dass.run.claim import guarded_run
from dass.run.layer import prune_layer
from dass.run.memory import release_host_memory
from dass.run.report import MatrixReport, PruneReport, versions
from dass.run.resume import RunState, atomic_save_tensors, atomic_write_bytes, read_and_digest, source_digest
from dass.run.spec import RunSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
NOT_COPIED = (INDEX, "pytorch_model.bin.index.json", "dass.json")
SHARD_METADATA = {"format": "pt"}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _partial_dir(out: Path) -> Path:
    """Where the run writes until it is complete. Under torch.distributed every rank other
    than 0 keeps its own (its activations and resume state are its own) and discards it
    at the end; only rank 0's becomes the output."""
    rank = distributed.current().rank
    return out.parent / (out.name + (".partial" if rank == 0 else f".rank{rank}.partial"))


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = t.to(device)
    return t.to(dtype) if t.is_floating_point() else t


def _shard_name(k: int, total: int) -> str:
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


def _copy_side_files(src: Path, dst: Path, dtype: torch.dtype, src_dtype: torch.dtype) -> None:
    """Config, generation config, tokenizer and other non-weight files of ``src``."""
    for item in sorted(src.iterdir()):
        if item.name.startswith(".") or item.name in NOT_COPIED or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if item.is_dir():
            continue
        if item.name == "config.json" and dtype != src_dtype:
            cfg = json.loads(item.read_text())
            for key in ("dtype", "torch_dtype"):
                if key in cfg:
                    cfg[key] = str(dtype).replace("torch.", "")
            atomic_write_bytes(dst / item.name, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
        else:
            shutil.copyfile(item, dst / item.name)


def _report_state(report: PruneReport) -> dict[str, Any]:
    return {
        "matrices": [m.__dict__ for m in report.matrices],
        "layer_seconds": report.layer_seconds,
        "fallbacks": report.fallbacks,
        "notes": report.notes,
        "blocks": report.blocks,
    }


def _restore_report(report: PruneReport, saved: dict[str, Any], start: int, n_layers: int) -> None:
    rep = saved["report"]
    report.matrices = [MatrixReport.from_dict(m) for m in rep["matrices"]]
    report.layer_seconds, report.fallbacks = list(rep["layer_seconds"]), list(rep["fallbacks"])
    report.blocks = list(rep.get("blocks", []))
    report.notes = list(rep["notes"]) + [f"resumed at layer {start} of {n_layers}"]


def _layer_keys(ckpt: ShardedCheckpoint, model: nn.Module, src: Path) -> tuple[list[list[str]], list[str]]:
    """The checkpoint's tensor names of each decoder layer, and the others; refuses a
    checkpoint whose names are not the model's (transformers converts it on load)."""
    path, layers = decoder_layers(model)
    n_layers = len(layers)
    layer_keys: list[list[str]] = [[] for _ in range(n_layers)]
    other_keys: list[str] = []
    for k in ckpt.keys():
        if k.startswith(path + "."):
            idx = k[len(path) + 1 :].split(".", 1)[0]
            if idx.isdigit() and int(idx) < n_layers:
                layer_keys[int(idx)].append(k)
                continue
        other_keys.append(k)
    names = model_tensor_names(model)
    unknown = [k for k in ckpt.keys() if k not in names]
    for i, layer in enumerate(layers):
        expected = {f"{path}.{i}.{n}" for n, _ in layer.named_parameters()}
        missing = expected - set(layer_keys[i])
        if missing or unknown:
            raise StreamingError(
                f"{src}: checkpoint tensor names do not match {type(model).__name__}'s parameters "
                f"(e.g. missing {sorted(missing)[:2]}, unexpected {unknown[:2]}); transformers converts "
                "this checkpoint when loading it, so prune it in memory (dass.prune) instead"
            )
    return layer_keys, other_keys


@guarded_run(source="src_dir", output="out_dir")  # source and output checked, output locked
def prune_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    method: "str | RunSpec" = "dass",
    pattern: str | float = "2:4",
    scope: str = "mlp",
    calibration_ids: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int = 8,
    activations: str = "auto",
    reconstruct: Any = None,
    resume: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    checkpoint_seconds: float = 60.0,
    calibration_spec: dict | None = None,
    manifest_extra: dict | None = None,
    after_layer: Callable[[int], None] | None = None,
    **method_options: Any,
) -> PruneReport:
    """Prune the safetensors checkpoint ``src_dir`` into ``out_dir``, one layer at a time.

    Same pruning as :func:`dass.prune` on the loaded model (identical weights), with
    ``calibration_ids`` token ids ``[N, L]`` (None only for magnitude). ``method`` is a
    name, a spec string or a whole :class:`~dass.run.spec.RunSpec` (which then carries the
    pattern, scope, batch size, activations and reconstruction; the calibration is
    ``calibration_ids``). ``dtype``: the compute and output dtype (default: the
    checkpoint's). ``resume``: continue a partial run of the same settings found in
    ``OUT.partial`` (False: delete it and start over). ``checkpoint_seconds``: how often
    (at most) the activations are saved for resuming; 0 saves after every layer. Writing
    them costs one pass over the activations through the disk, so for a large model a
    resumed run redoes at most that many seconds of work. ``overwrite``: replace an
    existing ``out_dir``. ``after_layer(i)`` is called once layer ``i``'s shard is on disk,
    before the resumable state records it.
    """
    t0 = time.perf_counter()
    from dass.io.checkpoint import CheckpointError

    src, out = Path(src_dir), Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists; pass overwrite=True (--overwrite) to replace it")
    if isinstance(method, RunSpec):
        spec = method
    else:
        spec = RunSpec.create(method, pattern, scope, calibration_ids, batch_size=batch_size, device=device,
                              activations=activations, reconstruct=reconstruct, **method_options)
    ids = None
    if spec.method.needs_calibration or calibration_ids is not None:
        ids = as_calibration_tensor(calibration_ids)
    run = _StreamRun(spec, src, out, ids, dtype)
    run.open(resume)
    run.write_non_layer_tensors()
    step, inputs = run.capture(progress)
    try:
        _stream_layers(run.ckpt, run.model, run.plans, run.layer_keys, run.partial, run.total_shards, spec,
                       run.report, run.state, inputs, step, run.start, run.dev, run.dtype, checkpoint_seconds,
                       after_layer)
    finally:
        if step is not None and step.progress is not None:
            step.progress.close()
    del inputs
    clear_graphs()
    return run.finish(t0, overwrite, calibration_spec, manifest_extra)


class _StreamRun:
    """The state of one streaming run between its phases: open (skeleton, plans, resumable
    state), the non-layer tensors, the capture, the layers (:func:`_stream_layers`), finish
    (index, side files, sealed manifest, rename into place)."""

    def __init__(self, spec: RunSpec, src: Path, out: Path, ids: torch.Tensor | None,
                 dtype: torch.dtype | str | None) -> None:
        self.spec, self.src, self.out, self.ids = spec, src, out, ids
        self.ckpt = ShardedCheckpoint(src)
        self.src_dtype = self.ckpt.dtype()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype: torch.dtype = dtype or self.src_dtype
        self.dev = spec.compute_device()
        self.model = build_skeleton(src, self.dtype)
        self.plans = spec.plan(self.model)  # shapes only: works on meta tensors
        self.layer_keys, self.other_keys = _layer_keys(self.ckpt, self.model, src)
        self.n_layers = len(self.layer_keys)
        self.total_shards = self.n_layers + len(self.other_keys)
        self.weight_map = {k: _shard_name(i, self.total_shards) for i, keys in enumerate(self.layer_keys) for k in keys}
        self.report = spec.new_report(ids)
        self.report.notes.append(f"streamed from {src} layer by layer ({self.dtype}, {self.dev})")
        self.partial = _partial_dir(out)
        self.saved: dict[str, Any] | None = None
        self.start = 0

    def open(self, resume: bool) -> None:
        """The partial output and its resumable state: resumed when it holds a run of the
        same settings and source content, else started over."""
        settings = {
            "source": self.ckpt.fingerprint(),
            **self.spec.record(),
            "calibration": None if self.ids is None else tensor_digest(self.ids),
            "dtype": str(self.dtype),
            "device": self.dev.type,
            "versions": versions(),
        }
        if settings["reconstruct"] is None:  # the same settings hash as before reconstruction existed
            del settings["reconstruct"]
        self.state = RunState(self.partial, settings)
        if self.partial.exists():
            if resume:
                self.saved = self.state.load()
            if self.saved is None:
                shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.state.start()
        if self.saved is not None:
            self.start = self.saved["next_layer"]
            _restore_report(self.report, self.saved, self.start, self.n_layers)
            self.state.check_source(self.saved, lambda key: source_digest(self.ckpt.read, self.layer_keys, key))

    def write_non_layer_tensors(self) -> None:
        """Embeddings, norms, the head: materialised on the device (the capture needs them)
        and written, one shard each."""
        for j, k in enumerate(self.other_keys):
            t = self.ckpt.read([k])[k]
            t = t.to(self.dtype) if t.is_floating_point() else t
            name = _shard_name(self.n_layers + j, self.total_shards)
            self.weight_map[k] = name
            if self.saved is None or not (self.partial / name).is_file():
                atomic_save_tensors(self.partial / name, {k: t.contiguous()}, SHARD_METADATA)
            self.state.record(k, tensors_digest({k: t}))
            set_tensor(self.model, k, t.to(self.dev))
            del t

    def capture(self, progress: bool):
        """The per-layer step and the activations entering the first layer to process
        (restored from the saved state when resuming); ``(None, None)`` without calibration."""
        from dass.io.checkpoint import CheckpointError

        if self.ids is None or self.start >= self.n_layers:
            return None, None
        t_cap = time.perf_counter()
        hidden_size = getattr(self.model.config, "hidden_size", None) or 0
        layer_bytes = sum(self.ckpt.nbytes(k, self.dtype) for k in self.layer_keys[0])
        store = self.spec.store(self.dev, self.ids, hidden_size, self.dtype, reserve=4 * layer_bytes)
        if store != self.dev:
            self.report.notes.append(f"calibration activations offloaded to {store}")
        step = self.spec.layer_step(self.report, self.dev, store, self.ids, self.plans, progress=progress,
                                    start=self.start, label=f"{self.spec.method.name} {self.spec.pattern} (streaming)")
        inputs = capture_inputs(self.model, calibration_batches(self.ids, self.spec.batch_size), self.dev, store,
                                False, restore=False)
        if self.saved is not None and self.start > 0:
            loaded = self.state.activations(self.saved)
            hidden = None if loaded is None else step.restore([_place(h, store) for h in loaded], len(inputs.hidden))
            if hidden is None:
                raise CheckpointError(f"{self.state.dir}: saved activations do not match the calibration batches")
            inputs.hidden = hidden
        self.report.capture_seconds = time.perf_counter() - t_cap
        return step, inputs

    def finish(self, t0: float, overwrite: bool, calibration_spec: dict | None,
               manifest_extra: dict | None) -> PruneReport:
        """Index, side files, the sealed manifest; rank 0 renames the output into place."""
        from dass.io.checkpoint import build_manifest, move_into_place
        from dass.io.manifest import seal

        total_size = sum(self.ckpt.nbytes(k, self.dtype) for k in self.ckpt.keys())
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        atomic_write_bytes(self.partial / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        _copy_side_files(self.src, self.partial, self.dtype, self.src_dtype)
        self.report.total_seconds = time.perf_counter() - t0
        ids = self.ids
        manifest = build_manifest(
            self.report,
            calibration=calibration_spec if calibration_spec is not None else ({} if ids is None else {"tokens": list(ids.shape)}),
            extra={"source_model": str(self.src), "streaming": True, **(manifest_extra or {})},
            model=self.model,
        )
        seal(self.partial, manifest)  # file hashes, then dass.json
        self.state.remove()
        ctx = distributed.current()
        if not ctx.is_main:
            shutil.rmtree(self.partial, ignore_errors=True)
            ctx.barrier()
            return self.report
        move_into_place(self.partial, self.out, overwrite=overwrite)
        ctx.barrier()
        return self.report


def _stream_layers(ckpt, model, plans, layer_keys, partial, total_shards, spec, report, state, inputs, step,
                   start, dev, dtype, checkpoint_seconds, after_layer) -> None:
    """Read each layer from the shards (one layer ahead, in a thread), run the step, write
    its shard (in another thread, at most one in flight: bounded host memory), drop it."""
    _, layers = decoder_layers(model)
    n_layers = len(layer_keys)
    last_commit = time.perf_counter()
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending: Future | None = None
        ahead: Future | None = reader.submit(read_and_digest, ckpt.read, layer_keys[start]) if start < n_layers else None
        for i in range(start, n_layers):
            ts = time.perf_counter()
            tensors, digest = ahead.result()  # type: ignore[union-attr]
            state.record(f"layer.{i}", digest)
            ahead = reader.submit(read_and_digest, ckpt.read, layer_keys[i + 1]) if i + 1 < n_layers else None
            for k, t in tensors.items():
                set_tensor(model, k, _cast(t, dev, dtype))
            del tensors
            move_module(layers[i], dev)  # buffers of the layer, if any
            if inputs is not None:
                step(plans[i], inputs.hidden, inputs.args[i])
            else:
                prune_layer(plans[i], {}, spec.method, spec.pattern, report)
            result = {k: get_tensor(model, k).detach().to("cpu").contiguous() for k in layer_keys[i]}
            for k in layer_keys[i]:  # drop the layer
                set_tensor(model, k, torch.empty_like(get_tensor(model, k), device="meta"))
            if pending is not None:
                pending.result()
            pending = writer.submit(atomic_save_tensors, partial / _shard_name(i, total_shards), result, SHARD_METADATA)
            del result
            release_host_memory()
            report.layer_seconds.append(time.perf_counter() - ts)
            done = i + 1
            if after_layer is not None:
                pending.result()
                after_layer(i)
            if done < n_layers and time.perf_counter() - last_commit >= checkpoint_seconds:
                pending.result()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                state.commit(done, step.activations(inputs.hidden) if inputs is not None else None,
                             _report_state(report))
                last_commit = time.perf_counter()
        if pending is not None:
            pending.result()


def _place(h: torch.Tensor, store: torch.device) -> torch.Tensor:
    if store.type == "cpu" and torch.cuda.is_available():
        return h.pin_memory()
    return h.to(store)
