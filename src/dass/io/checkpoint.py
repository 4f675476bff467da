"""Saved checkpoints: the manifest, atomic writes, and verification.

A pruned checkpoint is an ordinary transformers directory (safetensors, config,
tokenizer) that loads without dass, plus ``dass.json``: how it was pruned and, for every
pruned matrix, its pattern, N:M orientation and sparsity, so that ``dass verify`` can
re-check the weights against it. Directories are written next to their destination under
a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from dass import __version__
from dass.core.patterns import nm_violations, parse_pattern, sparsity_of
from dass.errors import UserValueError
from dass.io.hf_registry import QUANT_METHOD, quantizer_entry

MANIFEST = "dass.json"
FORMAT = "dass/1"


class CheckpointError(UserValueError):
    """An output that exists, a missing manifest, or an unreadable checkpoint."""


def versions() -> dict[str, str]:
    import transformers

    return {
        "dass": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def build_manifest(report: Any, *, calibration: dict | None = None, extra: dict | None = None) -> dict:
    """The ``dass.json`` content for a :class:`~dass.run.report.PruneReport`."""
    rep = report.to_dict()
    matrices = {}
    for m in rep.pop("matrices"):
        pat = parse_pattern(m["pattern"])
        matrices[m["key"]] = {
            "name": m["name"],
            "role": m["role"],
            "shape": list(m["shape"]),
            "pattern": m["pattern"],
            "n": pat.n,
            "m": pat.m,
            "orientation": m["orientation"],
            "sparsity": m["sparsity"],
            "method": m["method"],
            # only for part of a tensor: one expert of a 3D weight, rows of a fused weight
            **({"expert": m["expert"]} if m["expert"] is not None else {}),
            **({"rows": list(m["rows"])} if m["rows"] else {}),
            **({"info": m["info"]} if m["info"] else {}),
        }
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        **rep,
        "calibration": calibration or {},
        "matrices": matrices,
    }
    if extra:
        manifest.update(extra)
    return manifest


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out_dir``; on success rename it to
    ``out_dir``. On any failure (exception, Ctrl-C) the temporary directory is removed and
    ``out_dir`` is untouched; a killed process leaves only a hidden ``.NAME.tmp-*``."""
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(done: Path, out: Path) -> None:
    """Rename the complete directory ``done`` to ``out``; an existing ``out`` (overwrite)
    is moved aside first and deleted only once the new one is in place."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(done, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(done, out)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_pruned(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    manifest: dict,
    *,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Write ``model`` (+ tokenizer and ``dass.json``) atomically to ``out_dir``."""
    out = Path(out_dir)
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, manifest)
    return out.resolve()


# --------------------------------------------------------------------------------------
# Reading and verification
# --------------------------------------------------------------------------------------


def read_manifest(ckpt: str | Path) -> dict:
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {MANIFEST}: not a checkpoint written by dass")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def tensor_files(ckpt: str | Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file that holds it."""
    ckpt = Path(ckpt)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: ckpt / v for k, v in weight_map.items()}
    single = ckpt / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{ckpt} has no model.safetensors or model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


@dataclass
class VerifyResult:
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _lookup(files: dict[str, Path], name: str) -> str | None:
    """The stored name of a parameter (transformers may drop or add a prefix)."""
    if name in files:
        return name
    for cand in files:
        if cand.endswith("." + name) or name.endswith("." + cand):
            return cand
    return None


def _model_parameters(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """In-memory parameter names and values, via transformers. Needed when the stored
    names differ from the module names (transformers 5 stores fused MoE experts as
    per-expert ``w1``/``w2``/``w3`` tensors and converts them back on load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto")
    return dict(model.named_parameters())


def verify_checkpoint(ckpt: str | Path, tolerance: float = 1e-6) -> VerifyResult:
    """Re-read every pruned matrix and check it against the manifest: shape, N:M validity
    along the recorded orientation, and sparsity (at least the pattern's and the recorded
    value, which catches a matrix made denser)."""
    from safetensors import safe_open

    manifest = read_manifest(ckpt)
    entries = manifest.get("matrices", {})
    result = VerifyResult()
    handles: dict[Path, Any] = {}
    params: dict[str, torch.Tensor] | None = None
    if is_compressed(ckpt):  # decompressed (and validated) first
        files: dict[str, Path] = {}
        params = read_state_dict(ckpt)
        if any(e["name"] not in params for e in entries.values()):
            params = dict(load_pruned_model(ckpt).named_parameters())
    else:
        files = tensor_files(ckpt)
        if any(_lookup(files, e["name"]) is None for e in entries.values()):
            params = _model_parameters(ckpt)

    def fetch(name: str) -> torch.Tensor | None:
        if params is not None and name in params:
            return params[name].detach()
        stored = _lookup(files, name)
        if stored is None:
            return None
        path = files[stored]
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        return handles[path].get_tensor(stored)

    try:
        for key, entry in entries.items():
            w = fetch(entry["name"])
            if w is None:
                result.problems.append(f"{key}: tensor {entry['name']} is missing")
                continue
            if entry.get("expert") is not None:
                w = w[entry["expert"]]
            if entry.get("rows"):
                w = w[entry["rows"][0] : entry["rows"][1]]
            result.checked += 1
            if list(w.shape) != list(entry["shape"]):
                result.problems.append(f"{key}: shape {list(w.shape)} != manifest {entry['shape']}")
                continue
            pat = parse_pattern(entry["pattern"])
            actual = sparsity_of(w)
            if actual + tolerance < pat.sparsity:
                result.problems.append(f"{key}: sparsity {actual:.6f} below the pattern's {pat.sparsity:g}")
            if actual + tolerance < float(entry["sparsity"]):
                result.problems.append(f"{key}: sparsity {actual:.6f} below the recorded {entry['sparsity']:.6f}")
            if pat.is_nm:
                orient = entry.get("orientation")
                if orient not in ("input", "output"):
                    result.problems.append(f"{key}: N:M matrix without a recorded orientation")
                    continue
                bad = nm_violations(w, pat.n, pat.m, orient)
                if bad:
                    result.problems.append(f"{key}: {bad} group(s) of {pat.m} along the {orient} dimension hold more than {pat.n} nonzeros")
    finally:
        handles.clear()
    if result.checked == 0:
        result.problems.append("the manifest lists no pruned matrix")
    return result


# --------------------------------------------------------------------------------------
# Compressed checkpoints (values + bitmask per N:M matrix, see dass.io.sparse_format)
# --------------------------------------------------------------------------------------

COMPRESSED_FILE = "model.dass-nm.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_compressed(ckpt: str | Path) -> bool:
    return (Path(ckpt) / COMPRESSED_FILE).is_file()


def read_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded, possibly compressed) checkpoint, dense."""
    if is_compressed(ckpt):
        from dass.io.sparse_format import load_compressed

        return load_compressed(Path(ckpt) / COMPRESSED_FILE)
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(set(tensor_files(ckpt).values())):
        out.update(load_file(path))
    return out


def has_quantizer_entry(ckpt: str | Path) -> bool:
    """Whether ``config.json`` routes ``from_pretrained`` to dass' quantizer (compressed
    checkpoints written before it existed lack the entry and load through dass only)."""
    path = Path(ckpt) / "config.json"
    if not path.is_file():
        return False
    entry = json.loads(path.read_text()).get("quantization_config") or {}
    return entry.get("quant_method") == QUANT_METHOD


def _route_from_pretrained(config_path: Path) -> None:
    """Add the ``quantization_config`` that makes ``from_pretrained`` (with ``import
    dass``) rebuild the dense weights; see :mod:`dass.io.hf_quantizer`."""
    if not config_path.is_file():
        raise CheckpointError(f"{config_path.parent} has no config.json")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        raise CheckpointError(f"{config_path}: the model is already quantized ({config['quantization_config'].get('quant_method')})")
    config["quantization_config"] = quantizer_entry(COMPRESSED_FILE)
    write_json(config_path, config)


def compress_checkpoint(ckpt: str | Path, output: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Rewrite a pruned checkpoint with every N:M matrix stored as kept values plus a
    bitmask (orientation in the manifest); other files are copied, and ``config.json``
    gains the ``quantization_config`` that lets ``from_pretrained`` load it (with dass
    imported). ``output`` defaults to ``ckpt`` itself (replaced atomically). Returns the
    output directory."""
    from dass.io.sparse_format import save_compressed

    src = Path(ckpt)
    manifest = read_manifest(src)
    if is_compressed(src):
        raise CheckpointError(f"{src} is already compressed")
    out = Path(output) if output is not None else src
    state = read_state_dict(src)
    in_place = out.resolve() == src.resolve()
    with atomic_directory(out, overwrite=overwrite or in_place) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in WEIGHT_FILES and not (f.name.startswith("model-") and f.suffix == ".safetensors") and f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        report = save_compressed(state, manifest, tmp / COMPRESSED_FILE)
        _route_from_pretrained(tmp / "config.json")
        manifest["compressed"] = {
            "file": COMPRESSED_FILE,
            **{k: v for k, v in report.items() if k != "path" and not isinstance(v, (dict, list))},
        }
        write_json(tmp / MANIFEST, manifest)
    return out.resolve()


def load_pruned_model(ckpt: str | Path, dtype: Any = "auto") -> torch.nn.Module:
    """A model from a dass checkpoint, compressed or not (exact dense weights).

    Plain ``from_pretrained``: a compressed checkpoint goes through dass' registered
    quantizer (:mod:`dass.io.hf_quantizer`). Compressed checkpoints written before
    ``config.json`` carried its entry, or a transformers whose loading the quantizer does
    not fit, are rebuilt here from the compressed file instead."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not is_compressed(ckpt):
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
    if has_quantizer_entry(ckpt):
        from dass.io.hf_quantizer import UnsupportedTransformers, register

        register()  # done on import dass already; explicit, so this works however dass was imported
        try:
            return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
        except (UnsupportedTransformers, OSError):
            pass  # a transformers whose loading the quantizer does not fit: rebuilt below
    config = AutoConfig.from_pretrained(ckpt)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    state = read_state_dict(ckpt)
    first = next(t for t in state.values() if t.is_floating_point())
    model = AutoModelForCausalLM.from_config(config, dtype=first.dtype if dtype == "auto" else dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if really_missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: compressed weights do not fit the config (missing {really_missing[:3]}, unexpected {unexpected[:3]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
