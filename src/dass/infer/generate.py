"""``dass generate``: Hugging Face ``generate()`` on a 2:4 model with ``dass.infer.accelerate``,
against the same weights run dense: tokens/s, time to first token, peak memory.

Two ways to call it:

- ``dass generate DIR --prompt "..."``: a pruned checkpoint (dense-with-zeros or compressed)
  and its tokenizer; the prompt is repeated for each sequence of a batch;
- ``dass generate --synthetic 7b --layers 32``: a LLaMA-shaped model built from a
  ``LlamaConfig`` with random weights, pruned 2:4 by magnitude (gate/up along the outputs as
  DaSS prunes them, or along the inputs as Wanda does; ``--scope all`` prunes attention too).

Each batch size runs in two modes: ``graphs`` (static KV cache, every decoding step replayed
from a CUDA graph, :mod:`dass.infer.decode_graphs`) and ``eager`` (plain ``generate()``,
dynamic cache). The dense model runs first; then the same model is accelerated in place and
runs again; greedy tokens of the two are compared.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from typing import Any

import torch

from dass.errors import DassError

__all__ = ["main", "synthetic_model", "prune_24", "measure", "compare"]

SIZES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
}


def synthetic_model(size: str = "7b", layers: int = 32, dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                    seed: int = 0) -> torch.nn.Module:
    """A LlamaForCausalLM of the given shape with random weights, built directly in ``dtype``
    on ``device`` (a 7B model in bf16 is 13.5 GB: building it in fp32 first would double that)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **SIZES[size])
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval()


def _magnitude24(W: torch.Tensor, orientation: str) -> None:
    """Keep the 2 largest |w| of each group of 4 along ``orientation``, in place."""
    N, K = W.shape
    g = W.view(N, K // 4, 4) if orientation == "input" else W.view(N // 4, 4, K)
    dim = 2 if orientation == "input" else 1
    drop = g.abs().topk(2, dim=dim, largest=False).indices
    g.scatter_(dim, drop, 0)


@torch.no_grad()
def prune_24(model: torch.nn.Module, scope: str = "mlp", orientation: str = "dass") -> int:
    """Prune 2:4 by magnitude, in place: GLU gate/up along the outputs (``dass``) or the
    inputs (``wanda``), down along the inputs; with ``scope="all"`` also every attention
    linear (inputs). Returns the number of matrices pruned."""
    from dass.arch import attention_module, decoder_layers, glu_children, mlp_module

    n = 0
    for layer in decoder_layers(model)[1]:
        found = mlp_module(layer)
        kids = glu_children(found[1]) if found else None
        if kids is not None:
            mlp = found[1]
            go = "output" if orientation == "dass" else "input"
            for name, o in ((kids.gate, go), (kids.up, go), (kids.down, "input")):
                _magnitude24(getattr(mlp, name).weight, o)
                n += 1
        att = attention_module(layer) if scope == "all" else None
        if att is not None:
            for mod in att[1].modules():
                if isinstance(mod, torch.nn.Linear):
                    _magnitude24(mod.weight, "input")
                    n += 1
    return n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _run(model, ids, new_tokens: int, mode: str, state: dict) -> torch.Tensor:
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)
    if mode == "graphs":
        from transformers import StaticCache

        key = ids.shape[0]
        cache = state.setdefault("caches", {}).get(key)
        if cache is None:
            cache = state["caches"][key] = StaticCache(config=model.config, max_cache_len=state["max_len"])
        else:
            cache.reset()
        kw[_cache_kw(model)] = cache
        kw["disable_compile"] = True
    return model.generate(ids, **kw)


def measure(model, ids: torch.Tensor, new_tokens: int, mode: str, reps: int = 3, state: dict | None = None) -> dict[str, Any]:
    """Time ``generate()`` (median of ``reps`` after one warm-up) and its first token."""
    from dass.infer.decode_graphs import DecodeGraphs, cuda_capture

    dev = ids.device
    state = state if state is not None else {}
    state.setdefault("max_len", ids.shape[1] + new_tokens + 8)
    dg = None
    if mode == "graphs":
        dg = state.get("graphs")
        if dg is None:
            dg = state["graphs"] = DecodeGraphs(model, capture=cuda_capture if dev.type == "cuda" else (lambda fn: fn))
    try:
        out = _run(model, ids, new_tokens, mode, state)  # warm-up: compile, tune, capture
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        firsts, totals = [], []
        for _ in range(reps):
            _sync(dev)
            t = time.perf_counter()
            _run(model, ids, 1, mode, state)
            _sync(dev)
            firsts.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = _run(model, ids, new_tokens, mode, state)
            _sync(dev)
            totals.append(time.perf_counter() - t)
    finally:
        if dg is not None:
            state["log"] = list(dg.log)
    B = ids.shape[0]
    ttft, total = statistics.median(firsts), statistics.median(totals)
    return {
        "batch": B, "mode": mode, "new_tokens": new_tokens, "prompt_len": ids.shape[1],
        "ttft_ms": ttft * 1e3, "total_ms": total * 1e3, "tokens_per_s": B * new_tokens / total,
        "decode_tokens_per_s": B * (new_tokens - 1) / max(total - ttft, 1e-9),
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "all_total_ms": [x * 1e3 for x in totals], "tokens": out[:, ids.shape[1]:].tolist(),
    }


def compare(model, make_ids, batches: list[int], new_tokens: int, modes: list[str], reps: int = 3,
            accelerate_kw: dict | None = None, deadline: float | None = None, log=print) -> dict[str, Any]:
    """Dense then accelerated (in place) ``generate()`` at each batch size and mode."""
    from dass.infer.accelerate import accelerate, tuning_log

    res: dict[str, Any] = {"dense": [], "sparse": [], "skipped": []}
    start = time.perf_counter()
    for phase in ("dense", "sparse"):
        # the dense phase may use at most 45% of the time box, so the accelerated one always runs
        stop = None if deadline is None else (start + 0.45 * (deadline - start) if phase == "dense" else deadline)
        if phase == "sparse":
            t = time.perf_counter()
            rep = accelerate(model, **(accelerate_kw or {}))
            res["accelerate"] = {"seconds": time.perf_counter() - t, "replaced": len(rep["replaced"]),
                                 "skipped": rep["skipped"], "fused_gate_up": len(rep["fused_gate_up"])}
            log(f"accelerated {len(rep['replaced'])} matrices ({len(rep['fused_gate_up'])} gate/up stacks) "
                f"in {res['accelerate']['seconds']:.1f} s")
        for mode in modes:
            state: dict = {}
            for B in batches:
                if stop is not None and time.perf_counter() > stop:
                    res["skipped"].append(f"{phase} {mode} B={B}: time box")
                    continue
                if phase == "sparse" and not any((r["mode"], r["batch"]) == (mode, B) for r in res["dense"]):
                    continue  # nothing to compare with
                try:
                    r = measure(model, make_ids(B), new_tokens, mode, reps, state)
                except Exception as e:  # noqa: BLE001 -- one failing case must not stop the others
                    res["skipped"].append(f"{phase} {mode} B={B}: {type(e).__name__}: {str(e)[:300]}")
                    log(f"  !! {phase} {mode} B={B}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                res[phase].append(r)
                log(f"  {phase:6} {mode:6} B={B:<3} {r['tokens_per_s']:9.1f} tok/s  ttft {r['ttft_ms']:8.2f} ms  "
                    f"peak {r['peak_mem_gb'] or 0:6.2f} GB")
            if state.get("log"):
                res.setdefault("graph_log", {})[f"{phase} {mode}"] = state["log"]
            if state.get("graphs") is not None:
                state["graphs"].remove()
    res["tuning"] = tuning_log()
    res["table"] = table(res)
    return res


def table(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows joining dense and sparse by (mode, batch): ratios and whether greedy tokens match."""
    dense = {(r["mode"], r["batch"]): r for r in res["dense"]}
    rows = []
    for s in res["sparse"]:
        d = dense.get((s["mode"], s["batch"]))
        if d is None:
            continue
        same = [a == b for da, sa in zip(d["tokens"], s["tokens"]) for a, b in zip(da, sa)]
        rows.append({"mode": s["mode"], "batch": s["batch"], "dense_tok_s": d["tokens_per_s"], "sparse_tok_s": s["tokens_per_s"],
                     "speedup": s["tokens_per_s"] / d["tokens_per_s"], "dense_ttft_ms": d["ttft_ms"], "sparse_ttft_ms": s["ttft_ms"],
                     "dense_peak_gb": d["peak_mem_gb"], "sparse_peak_gb": s["peak_mem_gb"],
                     "same_tokens": sum(same) / max(len(same), 1)})
    return rows


def print_table(rows: list[dict[str, Any]], out=sys.stdout) -> None:
    print("mode    batch | dense tok/s | 2:4 tok/s | speed-up | TTFT dense / 2:4 (ms) | peak GB dense / 2:4 | same greedy tokens",
          file=out)
    for r in rows:
        pk = (f"{r['dense_peak_gb']:.2f} / {r['sparse_peak_gb']:.2f}" if r["dense_peak_gb"] is not None else "-")
        print(f"{r['mode']:7} {r['batch']:5} | {r['dense_tok_s']:11.1f} | {r['sparse_tok_s']:9.1f} | {r['speedup']:7.2f}x | "
              f"{r['dense_ttft_ms']:9.2f} / {r['sparse_ttft_ms']:9.2f} | {pk:>19} | {100 * r['same_tokens']:.0f}%",
              file=out, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dass generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="pruned checkpoint directory (omit with --synthetic)")
    p.add_argument("--prompt", default="The capital of France is", help="prompt text (with a checkpoint directory)")
    p.add_argument("--synthetic", choices=sorted(SIZES), help="random LLaMA-shaped model instead of a checkpoint")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the synthetic model")
    p.add_argument("--scope", choices=["mlp", "all"], default="mlp", help="synthetic: which matrices are 2:4")
    p.add_argument("--orientation", choices=["dass", "wanda"], default="dass", help="synthetic: gate/up 2:4 along outputs or inputs")
    p.add_argument("--batches", default="1,4,16,64", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=64, help="synthetic: prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--modes", default="graphs,eager", help="comma list of graphs,eager")
    p.add_argument("--reps", type=int, default=3, help="timed runs per case (median)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--keep-dense", action="store_true", help="AccelerateConfig(keep_dense=True): memory for speed")
    p.add_argument("--max-seconds", type=float, default=None, help="skip the remaining cases after this long")
    p.add_argument("--out", default=None, help="write every number as JSON here")
    return p


def _load_dir(path: str, dtype: torch.dtype, device: str):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dass.io.checkpoint import (
        MANIFEST,
        is_compressed,
        load_pruned_model,
        read_manifest,
    )

    model = (load_pruned_model(path, dtype=dtype) if is_compressed(path)
             else AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    manifest = read_manifest(path) if (Path(path) / MANIFEST).is_file() else None
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path), manifest


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except DassError as e:
        print(f"dass generate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


def _main(args) -> int:
    from dass.infer.accelerate import AccelerateConfig
    from dass.infer.device import check_device

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    check_device(None if args.device == "cpu" else args.device)
    t0 = time.perf_counter()
    deadline = t0 + args.max_seconds if args.max_seconds else None
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    info: dict[str, Any] = {"args": vars(args), "torch": torch.__version__,
                            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    acc_kw: dict[str, Any] = {"config": AccelerateConfig(keep_dense=args.keep_dense)}
    if args.synthetic:
        model = synthetic_model(args.synthetic, args.layers, dtype, args.device)
        info["pruned_matrices"] = prune_24(model, args.scope, args.orientation)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(1, vocab, (1, args.prompt_len), generator=gen)

        def make_ids(B):
            return prompt.expand(B, -1).contiguous().to(args.device)
        tok = None
    elif args.model:
        model, tok, manifest = _load_dir(args.model, dtype, args.device)
        acc_kw["manifest"] = manifest
        enc = tok(args.prompt, return_tensors="pt").input_ids

        def make_ids(B):
            return enc.expand(B, -1).contiguous().to(args.device)
    else:
        print("dass generate: give a checkpoint directory or --synthetic SIZE", file=sys.stderr)
        return 2
    info["build_seconds"] = time.perf_counter() - t0
    print(f"model ready in {info['build_seconds']:.1f} s; batches {batches}, modes {modes}, {args.new_tokens} new tokens",
          flush=True)
    res = compare(model, make_ids, batches, args.new_tokens, modes, args.reps, acc_kw, deadline,
                  log=lambda s: print(s, flush=True))
    res.update(info)
    print_table(res["table"])
    if tok is not None and res["sparse"]:
        print("2:4 output:", tok.decode(res["sparse"][0]["tokens"][0], skip_special_tokens=True), flush=True)
    res["seconds"] = time.perf_counter() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"wrote {args.out}")
    return 0
