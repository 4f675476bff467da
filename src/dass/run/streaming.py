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

import contextlib
import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dass.arch import decoder_layers
from dass.core.graphs import clear_graphs
from dass.errors import UserValueError
from dass.run import distributed
from dass.run.calibration import as_calibration_tensor, calibration_batches
from dass.run.capture import capture_inputs, move_module
from dass.run.layer import prune_layer
from dass.run.memory import release_host_memory
from dass.run.report import MatrixReport, PruneReport
from dass.run.claim import guarded_run
from dass.run.resume import (
    RunState, atomic_save_tensors, atomic_write_bytes, read_and_digest, source_digest, tensor_digest, tensors_digest,
)
from dass.run.spec import RunSpec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
NOT_COPIED = (INDEX, "pytorch_model.bin.index.json", "dass.json")
SHARD_METADATA = {"format": "pt"}


class StreamingError(UserValueError):
    """A checkpoint that cannot be streamed (no safetensors, keys that do not match)."""


# --------------------------------------------------------------------------------------
# Reading a sharded checkpoint
# --------------------------------------------------------------------------------------


class ShardedCheckpoint:
    """The tensors of a safetensors checkpoint directory, read one group at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            self.index_bytes = index.read_bytes()
            weight_map = json.loads(self.index_bytes)["weight_map"]
        elif (self.path / SINGLE).is_file():
            from safetensors import safe_open

            self.index_bytes = b""
            with safe_open(str(self.path / SINGLE), "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise StreamingError(f"{self.path} has no {INDEX} or {SINGLE}: streaming needs safetensors weights")
        self.weight_map: dict[str, str] = dict(weight_map)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU (each file is opened once and closed after)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for fname, names in by_file.items():
            with safe_open(str(self.path / fname), "pt", device="cpu") as f:
                for k in names:
                    out[k] = f.get_tensor(k)
        return {k: out[k] for k in keys}

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor."""
        from safetensors import safe_open

        names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        for k, fname in self.weight_map.items():
            with safe_open(str(self.path / fname), "pt") as f:
                dt = f.get_slice(k).get_dtype()
            if dt in names:
                return names[dt]
        return torch.float32

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source for resuming: its path, index, config and file sizes."""
        files = sorted(set(self.weight_map.values()))
        config = self.path / "config.json"
        return {
            "path": str(self.path.resolve()),
            "index": tensor_digest(torch.frombuffer(bytearray(self.index_bytes or b"-"), dtype=torch.uint8)),
            "config": config.read_text() if config.is_file() else None,
            "files": {f: (self.path / f).stat().st_size for f in files},
        }


# --------------------------------------------------------------------------------------
# The model skeleton
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the ``meta`` device at once (before
    the module initialises it), while buffers (rotary ``inv_freq``, embedding scales) are
    computed for real: the model costs no memory and no initialisation time."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``path``'s config with all parameters on ``meta``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``root`` by ``value``."""
    mod, leaf = _owner(root, name)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:  # pragma: no cover - checked before
        raise KeyError(name)


def get_tensor(root: nn.Module, name: str) -> torch.Tensor:
    mod, leaf = _owner(root, name)
    t = mod._parameters.get(leaf)
    return t if t is not None else mod._buffers[leaf]


def model_tensor_names(root: nn.Module) -> set[str]:
    names = {n for n, _ in root.named_parameters(remove_duplicate=False)}
    return names | {n for n, _ in root.named_buffers(remove_duplicate=False)}


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
    from dass.io.checkpoint import CheckpointError, build_manifest, move_into_place
    from dass.io.manifest import seal

    src, out = Path(src_dir), Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists; pass overwrite=True (--overwrite) to replace it")
    if isinstance(method, RunSpec):
        spec = method
    else:
        spec = RunSpec.create(method, pattern, scope, calibration_ids, batch_size=batch_size, device=device,
                              activations=activations, reconstruct=reconstruct, **method_options)
    ckpt = ShardedCheckpoint(src)
    src_dtype = ckpt.dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or src_dtype
    dev = spec.compute_device()
    ids = None
    if spec.method.needs_calibration or calibration_ids is not None:
        ids = as_calibration_tensor(calibration_ids)

    model = build_skeleton(src, dtype)
    plans = spec.plan(model)  # shapes only: works on meta tensors
    layer_keys, other_keys = _layer_keys(ckpt, model, src)
    n_layers = len(layer_keys)
    report = spec.new_report(ids)
    report.notes.append(f"streamed from {src} layer by layer ({dtype}, {dev})")
    settings = {
        "source": ckpt.fingerprint(),
        **spec.record(),
        "calibration": None if ids is None else tensor_digest(ids),
        "dtype": str(dtype),
        "device": dev.type,
        "versions": _versions(),
    }
    if settings["reconstruct"] is None:  # the same settings hash as before reconstruction existed
        del settings["reconstruct"]
    partial = _partial_dir(out)
    state = RunState(partial, settings)
    saved = None
    if partial.exists():
        if resume:
            saved = state.load()
        if saved is None:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    state.start()
    start = 0
    if saved is not None:
        start = saved["next_layer"]
        _restore_report(report, saved, start, n_layers)
        state.check_source(saved, lambda key: source_digest(ckpt.read, layer_keys, key))

    total_shards = n_layers + len(other_keys)
    weight_map = {k: _shard_name(i, total_shards) for i, keys in enumerate(layer_keys) for k in keys}
    # non-layer tensors: materialised on the device (the capture needs them) and written
    for j, k in enumerate(other_keys):
        t = ckpt.read([k])[k]
        t = t.to(dtype) if t.is_floating_point() else t
        name = _shard_name(n_layers + j, total_shards)
        weight_map[k] = name
        if saved is None or not (partial / name).is_file():
            atomic_save_tensors(partial / name, {k: t.contiguous()}, SHARD_METADATA)
        state.record(k, tensors_digest({k: t}))
        set_tensor(model, k, t.to(dev))
        del t
    total_size = sum(_nbytes(ckpt, k, dtype) for k in ckpt.keys())

    store = dev
    inputs = None
    step = None
    if ids is not None and start < n_layers:
        t_cap = time.perf_counter()
        hidden_size = getattr(model.config, "hidden_size", None) or 0
        layer_bytes = sum(_nbytes(ckpt, k, dtype) for k in layer_keys[0])
        store = spec.store(dev, ids, hidden_size, dtype, reserve=4 * layer_bytes)
        if store != dev:
            report.notes.append(f"calibration activations offloaded to {store}")
        step = spec.layer_step(report, dev, store, ids, plans, progress=progress, start=start,
                               label=f"{spec.method.name} {spec.pattern} (streaming)")
        inputs = capture_inputs(model, calibration_batches(ids, spec.batch_size), dev, store, False, restore=False)
        if saved is not None and start > 0:
            loaded = state.activations(saved)
            if loaded is None or len(loaded) != len(inputs.hidden):
                raise CheckpointError(f"{state.dir}: saved activations do not match the calibration batches")
            inputs.hidden = [_place(h, store) for h in loaded]
        report.capture_seconds = time.perf_counter() - t_cap
    try:
        _stream_layers(ckpt, model, plans, layer_keys, partial, total_shards, spec, report, state, inputs, step,
                       start, dev, dtype, checkpoint_seconds, after_layer)
    finally:
        if step is not None and step.progress is not None:
            step.progress.close()

    del inputs
    clear_graphs()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(partial / INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    _copy_side_files(src, partial, dtype, src_dtype)
    report.total_seconds = time.perf_counter() - t0
    manifest = build_manifest(
        report,
        calibration=calibration_spec if calibration_spec is not None else ({} if ids is None else {"tokens": list(ids.shape)}),
        extra={"source_model": str(src), "streaming": True, **(manifest_extra or {})},
        model=model,
    )
    seal(partial, manifest)  # file hashes, then dass.json
    state.remove()
    ctx = distributed.current()
    if not ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        ctx.barrier()
        return report
    move_into_place(partial, out, overwrite=overwrite)
    ctx.barrier()
    return report


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
                state.commit(done, inputs.hidden if inputs is not None else None, _report_state(report))
                last_commit = time.perf_counter()
        if pending is not None:
            pending.result()


def _place(h: torch.Tensor, store: torch.device) -> torch.Tensor:
    if store.type == "cpu" and torch.cuda.is_available():
        return h.pin_memory()
    return h.to(store)


def _nbytes(ckpt: ShardedCheckpoint, key: str, dtype: torch.dtype) -> int:
    from safetensors import safe_open

    with safe_open(str(ckpt.path / ckpt.weight_map[key]), "pt") as f:
        sl = f.get_slice(key)
        shape, dt = sl.get_shape(), sl.get_dtype()
    numel = 1
    for s in shape:
        numel *= s
    size = dtype.itemsize if dt in ("F64", "F32", "F16", "BF16") else {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}.get(dt, 4)
    return numel * size


def _versions() -> dict[str, str]:
    import transformers

    from dass import __version__

    return {"dass": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
