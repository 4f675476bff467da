"""Saved checkpoints: the manifest, atomic writes, compression; verification in
:mod:`dass.io.verify`.

A pruned checkpoint is an ordinary transformers directory (safetensors, config,
tokenizer) that loads without dass, plus ``dass.json``: how it was pruned and, for every
pruned matrix, its pattern, N:M orientation, sparsity and exact count of nonzeros, and the
hash of every file written (:mod:`dass.io.manifest`), so that ``dass verify`` can re-check
the content against it. Directories are written next to their destination under a
temporary name and renamed into place only when complete, under the output's lock
(:mod:`dass.io.outputs`).
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from dass import __version__
from dass.core.patterns import parse_pattern
from dass.io import outputs
from dass.io.hf_registry import QUANT_METHOD, quantizer_entry
from dass.io.manifest import read_manifest, seal
from dass.io.outputs import MANIFEST, CheckpointError

__all__ = [
    "MANIFEST", "FORMAT", "CheckpointError", "build_manifest", "atomic_directory", "move_into_place",
    "save_pruned", "read_manifest", "tensor_files", "verify_checkpoint", "is_compressed", "read_state_dict",
    "compress_checkpoint", "load_pruned_model", "write_json", "has_quantizer_entry",
]

FORMAT = "dass/1"


def versions() -> dict[str, str]:
    import transformers

    return {
        "dass": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def build_manifest(
    report: Any, *, calibration: dict | None = None, extra: dict | None = None, model: torch.nn.Module | None = None
) -> dict:
    """The ``dass.json`` content for a :class:`~dass.run.report.PruneReport`. ``model``
    (or its skeleton) lets the manifest mark matrices stored transposed (GPT-2's Conv1D
    keeps ``[in, out]``; the manifest's shapes and orientations are ``[out, in]``)."""
    from dass.arch import transposed_weights

    transposed = transposed_weights(model) if model is not None else set()
    rep = report.to_dict()
    matrices = {}
    for m in rep.pop("matrices"):
        pat = parse_pattern(m["pattern"])
        numel = int(m["shape"][0]) * int(m["shape"][1])
        matrices[m["key"]] = {
            "name": m["name"],
            "role": m["role"],
            "shape": list(m["shape"]),
            "pattern": m["pattern"],
            "n": pat.n,
            "m": pat.m,
            "orientation": m["orientation"],
            "sparsity": m["sparsity"],
            # exact: the sparsity is zeros / numel in double precision
            "nonzeros": numel - round(m["sparsity"] * numel),
            "method": m["method"],
            # only for part of a tensor: one expert of a 3D weight, rows of a fused weight
            **({"expert": m["expert"]} if m["expert"] is not None else {}),
            **({"rows": list(m["rows"])} if m["rows"] else {}),
            **({"transposed": True} if m["name"] in transposed else {}),
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
def atomic_directory(
    out_dir: str | Path, overwrite: bool = False, sources: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out_dir``; on success rename it to
    ``out_dir``. The output's lock is held throughout and the output is checked before
    and again at the rename (:func:`dass.io.outputs.check_output`: only an empty folder
    or a dass output is replaced, and only under ``overwrite``; never one that contains
    a source or the current directory). On any failure (exception, Ctrl-C) the temporary
    directory is removed and ``out_dir`` is untouched; a killed process leaves only a
    hidden ``.NAME.tmp-*``, which the next run on that output removes."""
    with outputs.claim(out_dir) as out:
        outputs.check_output(out_dir, overwrite=overwrite, sources=sources)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            outputs.replace_dir(tmp, out, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def move_into_place(done: Path, out: Path, overwrite: bool = False) -> None:
    """Rename the complete directory ``done`` to ``out`` (see :func:`dass.io.outputs.replace_dir`)."""
    outputs.replace_dir(done, Path(out), overwrite=overwrite)


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
    sources: Iterable[str | Path | None] = (),
) -> Path:
    """Write ``model`` (+ tokenizer and the sealed ``dass.json``) atomically to ``out_dir``.
    ``sources``: folders the output must not contain (the source model)."""
    from dass.arch import transposed_weights

    out = Path(out_dir)
    flagged = transposed_weights(model)
    for entry in manifest.get("matrices", {}).values():
        if entry.get("name") in flagged:
            entry["transposed"] = True
    with atomic_directory(out, overwrite, sources) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        seal(tmp, manifest)
    return out.resolve()


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def tensor_files(ckpt: str | Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file that holds it."""
    ckpt = Path(ckpt)
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: ckpt / v for k, v in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index") from None
    single = ckpt / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{ckpt} has no model.safetensors or model.safetensors.index.json")
    from dass.io.hashing import read_header

    _, header = read_header(single)
    return {k: single for k in header if k != "__metadata__"}


def verify_checkpoint(ckpt: str | Path, tolerance: float = 1e-6):
    """See :func:`dass.io.verify.verify_checkpoint` (kept here for existing imports)."""
    from dass.io.verify import verify_checkpoint as verify

    return verify(ckpt, tolerance)


# --------------------------------------------------------------------------------------
# Compressed checkpoints (values + bitmask per N:M matrix, see dass.io.sparse_format)
# --------------------------------------------------------------------------------------

COMPRESSED_FILE = "model.dass-nm.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_compressed(ckpt: str | Path) -> bool:
    return (Path(ckpt) / COMPRESSED_FILE).is_file()


def read_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded, possibly compressed) checkpoint, dense."""
    from dass.io.hashing import read_header

    if is_compressed(ckpt):
        from dass.io.sparse_format import load_compressed

        return load_compressed(Path(ckpt) / COMPRESSED_FILE)
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(set(tensor_files(ckpt).values())):
        read_header(path)  # a truncated or corrupt file: one line, not the library's panic
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


def _is_weight_file(name: str) -> bool:
    return name in WEIGHT_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def compress_checkpoint(ckpt: str | Path, output: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """Rewrite a pruned checkpoint with every N:M matrix stored as kept values plus a
    bitmask (orientation in the manifest); the other files dass wrote are copied, and
    ``config.json`` gains the ``quantization_config`` that lets ``from_pretrained`` load it
    (with dass imported).
    ``output`` defaults to ``ckpt`` itself (replaced atomically). The source's recorded
    hashes are checked first, so a changed checkpoint is not given a fresh seal.
    Returns the output directory."""
    from dass.io.sparse_format import save_compressed
    from dass.io.verify import changed_files

    src = Path(ckpt)
    manifest = read_manifest(src)
    if is_compressed(src):
        raise CheckpointError(f"{src} is already compressed")
    changed = changed_files(src, manifest)
    if changed:
        raise CheckpointError(f"{src} changed since dass wrote it ({changed[0]}); see dass verify {src}")
    out = Path(output) if output is not None else src
    in_place = out.resolve() == src.resolve()
    sources = () if in_place else (src,)
    with outputs.claim(out):
        outputs.check_output(out, overwrite=overwrite or in_place, sources=sources)  # before the work
        listed = manifest.get("files")
        state = read_state_dict(src)
        with atomic_directory(out, overwrite=overwrite or in_place, sources=sources) as tmp:
            for f in src.iterdir():
                wanted = f.name in listed if isinstance(listed, dict) else not f.name.startswith(".")
                if f.is_file() and wanted and not _is_weight_file(f.name) and f.name != MANIFEST:
                    shutil.copy2(f, tmp / f.name)
            report = save_compressed(state, manifest, tmp / COMPRESSED_FILE)
            _route_from_pretrained(tmp / "config.json")
            manifest["compressed"] = {
                "file": COMPRESSED_FILE,
                **{k: v for k, v in report.items() if k != "path" and not isinstance(v, (dict, list))},
            }
            seal(tmp, manifest)
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
