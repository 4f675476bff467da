"""Pre-flight: everything a command can check before it loads a model or does any work.

A mistake found after an hour of pruning costs the hour; found here it costs a line.
Each check raises a :class:`~dass.errors.DassError` whose first line says what is wrong
and what to do, so the CLI prints ``dass: error: ...`` and exits 2 with no traceback and
nothing written. Checks read only headers and small files: the device, the model folder
(config, weight files' headers, no pickle-only weights), the output (may it be written or
replaced, is its folder writable), the calibration or evaluation text (readable, long
enough in tokens), and window lengths against the model's positions.

The ``check_*(args)`` functions take the CLI's parsed arguments (their attribute names
are the options'); the others take plain values, for library use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dass.errors import UserRuntimeError, UserValueError
from dass.io import outputs
from dass.io.hashing import read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COMPRESSED = "model.dass-nm.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class PreflightError(UserValueError):
    """Something the run would fail on later, found before it starts."""


class DeviceError(UserRuntimeError):
    """A compute device that does not exist or is not available here."""


# --------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------


def check_device(spec: str | None) -> None:
    """``spec`` names a device torch knows and this machine has (None: chosen later)."""
    if not spec:
        return
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {spec}: not a device; use cpu or cuda (cuda:N for one GPU)") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {spec} requested but no CUDA GPU is available")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"--device {spec}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
        return
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if dev.type == "mps":
        available = torch.backends.mps.is_available
    if not (callable(available) and available()):
        raise DeviceError(f"--device {spec}: {dev.type} is not available on this machine; use cpu or cuda")


# --------------------------------------------------------------------------------------
# Model folder
# --------------------------------------------------------------------------------------


def local_model_dir(spec: str) -> Path | None:
    """The folder a model argument names, if it is local (``default``: the converted
    embedded model once it exists); None for hub ids and a not yet converted default."""
    if spec == "default":
        from dass.io.models import cache_dir

        path = cache_dir() / "smollm2-135m-instruct"
        return path if (path / "config.json").is_file() else None
    from dass.io.models import looks_like_path

    if looks_like_path(spec):
        return Path(spec).expanduser()
    return None


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files the folder's index (or single file) names; checked headers."""
    if (path / COMPRESSED).is_file():
        return [path / COMPRESSED]
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) for n in names):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PreflightError(f"{index}: not a valid safetensors index (no weight_map of file names)") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise PreflightError(f"{path}: weight file {missing[0]} named by {INDEX} is missing")
        return [path / n for n in names]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    return []


def check_model_dir(spec: str, *, stream: bool = False, gguf_file: str | None = None) -> Path | None:
    """Check a model argument's folder without loading it; return the folder (None for a
    hub id). Refused: a missing path, a folder without config.json or with one that is
    not a model config, weight files that are truncated or corrupt (headers only), and
    weights stored only as pickles (loading a pickle can run code)."""
    path = local_model_dir(spec)
    if path is None:
        if stream and spec != "default":
            raise PreflightError(f"--stream needs a local checkpoint folder (or 'default'), got {spec!r}")
        return None
    if not path.exists():
        raise PreflightError(f"model path not found: {spec}")
    if path.is_file():
        if stream or path.suffix != ".gguf":
            raise PreflightError(f"{spec}: a model must be a checkpoint folder (or, without --stream, a .gguf file)")
        return path
    ggufs = sorted(path.glob("*.gguf"))
    config = path / "config.json"
    if gguf_file is not None or (not config.is_file() and len(ggufs) == 1):
        if stream:
            raise PreflightError(f"--stream reads safetensors checkpoints; {spec} holds a GGUF file (prune it without --stream)")
        return path
    if not config.is_file():
        raise PreflightError(f"{spec} is not a model folder: it has no config.json (and not exactly one .gguf file)")
    load_config(path)
    files = _weight_files(path)
    if not files:
        from dass.io.models import refuse_pickle_only

        refuse_pickle_only(path)
        raise PreflightError(f"{spec} has no weights: no {SINGLE} or {INDEX}")
    if stream and files[0].name == COMPRESSED:
        raise PreflightError(f"--stream reads plain safetensors checkpoints; {spec} is compressed (dass compress)")
    for f in files:
        read_header(f)
    return path


def load_config(path: Path) -> Any:
    """The transformers config of a model folder, or one line saying why not."""
    config = path / "config.json"
    try:
        data = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PreflightError(f"{config} is not valid JSON") from None
    if not isinstance(data, dict):
        raise PreflightError(f"{config} is not a model config (a JSON {type(data).__name__}, not an object)")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError, ... for bad configs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreflightError(f"{config} is not a usable model config: {first[:300]}") from None


def max_positions(path: Path | None) -> tuple[int, str] | None:
    """(positions, config key) of a local model, if its config states them."""
    if path is None or not path.is_dir() or not (path / "config.json").is_file():
        return None
    cfg = load_config(path)
    raw = json.loads((path / "config.json").read_text())
    raw = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for source in (raw.get, lambda k: getattr(text, k, None)):  # named as config.json names it (GPT-2: n_positions)
        for key in POSITION_KEYS:
            value = source(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, key
    return None


def check_window(value: int, option: str, limit: tuple[int, str] | None) -> None:
    """A sequence length option: at least 1 and within the model's positions (a longer
    window indexes past a learned position table, or runs a rotary model where it was
    never trained: an error, or numbers that mean nothing)."""
    if value < 1:
        raise PreflightError(f"{option} must be at least 1, got {value}")
    if limit is not None and value > limit[0]:
        raise PreflightError(
            f"{option} {value} exceeds the model's {limit[0]} positions ({limit[1]} in config.json); use {option} {limit[0]} or less"
        )


# --------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------


def check_text(source: str, *, tokenizer_dir: Path | None, min_tokens: int, what: str) -> None:
    """A calibration or evaluation text: obtainable, readable, and (for a local file with
    a local tokenizer) at least ``min_tokens`` tokens long."""
    from dass.io import data

    name = os.fspath(source)
    path = data.source_file(name)  # named sources: only whether they can be obtained
    if path is None:
        return
    if path.is_dir():
        raise PreflightError(f"{what} {name} is a folder, not a .txt or .jsonl file")
    try:
        text = data.load_text_source(name)
    except UnicodeDecodeError:
        raise PreflightError(f"{what} {name} is not UTF-8 text") from None
    except PermissionError:
        raise PreflightError(f"{what} {name} cannot be read (permission denied)") from None
    if not text.strip():
        raise PreflightError(f"{what} {name} is empty")
    if tokenizer_dir is None or not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # tokenizers raise many kinds; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreflightError(f"{tokenizer_dir}: the tokenizer cannot be loaded: {first[:300]}") from None
    n = data.tokenize_text(tokenizer, text).numel()
    if n < min_tokens:
        raise PreflightError(f"{what} {name} has {n} tokens; need at least {min_tokens}")


# --------------------------------------------------------------------------------------
# Per command
# --------------------------------------------------------------------------------------


def _positive(value: int | None, option: str, zero_ok: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise PreflightError(f"{option} must be {'0 or more' if zero_ok else 'at least 1'}, got {value}")


def check_prune(args: Any) -> None:
    """``dass prune``: device, model folder, output, counts, window, calibration text."""
    from dass.methods import get_method

    check_device(getattr(args, "device", None))
    stream = bool(getattr(args, "stream", False))
    path = check_model_dir(args.model, stream=stream, gguf_file=getattr(args, "gguf_file", None))
    outputs.check_output(args.output, overwrite=bool(getattr(args, "overwrite", False)), sources=[path])
    outputs.check_writable(args.output)
    _positive(getattr(args, "nsamples", None), "--nsamples")
    _positive(getattr(args, "batch_size", None), "--batch-size")
    method = get_method(getattr(args, "method", "dass"))
    if not method.needs_calibration:
        return
    seqlen = getattr(args, "seqlen", 2048)
    check_window(seqlen, "--seqlen", max_positions(path))
    check_text(getattr(args, "calibration", "default"), tokenizer_dir=path, min_tokens=seqlen + 1, what="calibration text")


def check_eval(args: Any) -> None:
    """``dass eval``: device, model folder, window and token counts, evaluation text, --json."""
    device = getattr(args, "device", None)
    check_device(device)
    if getattr(args, "accelerate", False):
        import torch

        if not torch.cuda.is_available() or (device and not device.startswith("cuda")):
            raise DeviceError("--accelerate runs 2:4 kernels on a CUDA GPU; none is available here (or --device is not cuda)")
    path = check_model_dir(args.model, gguf_file=getattr(args, "gguf_file", None))
    _positive(getattr(args, "limit", None), "--limit")
    _positive(getattr(args, "zeroshot_batch_size", None), "--zeroshot-batch-size")
    ppl = getattr(args, "ppl", None)
    if ppl and ppl != "none":  # the window matters only for perplexity
        eval_seqlen = getattr(args, "eval_seqlen", 2048)
        check_window(eval_seqlen, "--eval-seqlen", max_positions(path))
        eval_tokens = getattr(args, "eval_tokens", None)
        _positive(eval_tokens, "--eval-tokens", zero_ok=True)
        if eval_tokens and eval_tokens < eval_seqlen:
            raise PreflightError(f"--eval-tokens {eval_tokens} is less than one --eval-seqlen window ({eval_seqlen})")
        check_text(ppl, tokenizer_dir=path, min_tokens=eval_seqlen, what="evaluation text")
    js = getattr(args, "json", None)
    if js:
        target = Path(js)
        if target.is_dir():
            raise PreflightError(f"--json {js} is a folder; name a file")
        outputs.check_writable(target)


def check_verify(args: Any) -> None:
    """``dass verify``: a folder with a well-formed manifest."""
    from dass.io.manifest import read_manifest

    read_manifest(args.dir)


def check_compress(args: Any) -> None:
    """``dass compress``: a dass checkpoint, not yet compressed; an output it may write."""
    from dass.io.manifest import read_manifest

    read_manifest(args.dir)
    if (Path(args.dir) / COMPRESSED).is_file():
        raise PreflightError(f"{args.dir} is already compressed")
    out = getattr(args, "output", None)
    if out and outputs.resolve(out) != outputs.resolve(args.dir):
        outputs.check_output(out, overwrite=bool(getattr(args, "overwrite", False)), sources=[args.dir])
        outputs.check_writable(out)
    else:
        outputs.check_writable(args.dir)
