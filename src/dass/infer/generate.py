"""``dass generate``: Hugging Face ``generate()`` on a 2:4 model with ``dass.infer.accelerate``,
against the same weights run dense: tokens/s, time to first token, peak memory.

Two ways to call it:

- ``dass generate DIR --prompt "..."``: a pruned checkpoint (dense-with-zeros or compressed)
  and its tokenizer; the prompt is repeated for each sequence of a batch;
- ``dass generate --synthetic 7b --layers 32``: a LLaMA-shaped model built from a
  ``LlamaConfig`` with random weights, pruned 2:4 by magnitude (gate/up along the outputs as
  DaSS prunes them, or along the inputs as Wanda does; ``--scope all`` prunes attention too).

Each batch size runs in up to four loops ("modes"), dense and 2:4 in the same one:

- ``fast``: a lean greedy loop (:mod:`dass.infer.decode_loop`): static KV cache, eager
  prefill, the 1-token decoding step compiled the same way as ``compiled``'s, and no host
  synchronisation between steps (tokens stay on the device; no logits processors, no
  stopping checks). What a user who wants speed writes (gpt-fast style): ``generate()``'s
  per-step host work is outside the CUDA graph and the GPU waits for it;
- ``compiled``: static KV cache and the forward compiled by ``generate()`` itself
  (``compile_config``: ``torch.compile(mode="reduce-overhead", fullgraph=True, dynamic=False)``,
  so each decoding step is one CUDA graph of Inductor's kernels; the accelerated modules are
  custom operators there, :mod:`dass.infer.ops`). What a user who wants speed runs dense;
- ``graphs``: static KV cache, every decoding step replayed from a CUDA graph
  (:mod:`dass.infer.decode_graphs`), no compiler;
- ``eager``: plain ``generate()``, dynamic cache.

The dense model runs first; then the same model is accelerated in place (``--scope``'s
matrices) and runs again; greedy tokens of the two are compared. Every row also gives the
fraction of the memory roofline a decoding step reaches (:mod:`dass.infer.roofline`: the
bytes it must read, weights as stored plus the KV cache, over its time, against a
device-to-device copy measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from dass.errors import DassError
from dass.infer.decode_loop import cache_kwarg, raise_recompile_limit

__all__ = ["main", "synthetic_model", "prune_24", "measure", "compare", "scope_manifest", "MODES"]

MODES = ("fast", "compiled", "graphs", "eager")

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


def scope_manifest(model: torch.nn.Module, scope: str) -> dict[str, dict[str, Any]]:
    """A manifest naming only ``scope``'s 2:4 linears (``"mlp"``: the GLU MLPs; ``"attn"``: the
    attention projections; ``"all"``: both), with their detected orientation. Why: a model
    pruned in every scope can then be accelerated one scope at a time (``accelerate(model,
    manifest)``) and measured in each, with no second copy of a 7B model."""
    from dass.arch import attention_module, decoder_layers, mlp_module
    from dass.io.nm_codec import detect_orientation

    path, layers = decoder_layers(model)
    out: dict[str, dict[str, Any]] = {}
    for i, layer in enumerate(layers):
        parts = []
        if scope in ("mlp", "all"):
            parts.append(mlp_module(layer))
        if scope in ("attn", "all"):
            parts.append(attention_module(layer))
        for found in parts:
            if found is None:
                continue
            for name, mod in found[1].named_modules():
                if type(mod) is torch.nn.Linear:
                    o = detect_orientation(mod.weight.detach(), 2, 4)
                    if o is not None:
                        out[f"{path}.{i}.{found[0]}.{name}.weight"] = {"pattern": "2:4", "orientation": o}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_cache_kw = cache_kwarg  # the name other modules and tests import


def _fast(model, state: dict):
    """The fast loop of this measurement state (one per model phase: its compiled step and
    its static caches, one per batch size, live as long as the state)."""
    from dass.infer.decode_loop import FastGreedy

    fg = state.get("fast")
    if fg is None:
        fg = state["fast"] = FastGreedy(model, max_len=state["max_len"], backend=state.get("backend"),
                                        nested_layers=bool(state.get("nested_layers")))
    return fg


def release_state(state: dict) -> None:
    """Drop what a measurement state holds (the fast loop's compiled step, its static caches,
    its per-layer compile regions), before :func:`reset_compiled` collects the memory."""
    fg = state.get("fast")
    if fg is not None:
        fg.reset()
    state.clear()


def _run(model, ids, new_tokens: int, mode: str, state: dict) -> torch.Tensor:
    """One timed call in ``mode``: the full sequences ``[B, prompt + new_tokens]``, except
    ``fast``, which gives only the new tokens (no concatenation inside the timed call)."""
    if mode == "fast":
        return _fast(model, state).generate(ids, new_tokens)
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              attention_mask=torch.ones_like(ids), pad_token_id=0)
    if mode in ("graphs", "compiled"):
        from transformers import StaticCache

        # what cache_implementation="static" builds, kept across calls: a new cache per call
        # would move the tensors the compiled step's CUDA graph reads (a re-recording per call)
        key = ids.shape[0]
        cache = state.setdefault("caches", {}).get(key)
        if cache is None:
            cache = state["caches"][key] = StaticCache(config=model.config, max_cache_len=state["max_len"])
        else:
            cache.reset()
        kw[_cache_kw(model)] = cache
        if mode == "graphs":
            kw["disable_compile"] = True
        else:
            kw["compile_config"] = state["compile_config"]
    return model.generate(ids, **kw)


def compile_config(device: torch.device, backend: str | None = None):
    """The ``CompileConfig`` of the ``compiled`` loop: reduce-overhead (CUDA graphs), one
    graph per step (``fullgraph``), static shapes (one compile per batch size: decoding
    shapes do not change within a batch). Off the GPU (dry runs) ``aot_eager``, asked for
    explicitly since ``generate()`` compiles only on accelerators by default."""
    from transformers import CompileConfig

    if backend is None:
        backend = "inductor" if device.type == "cuda" else "aot_eager"
    cfg = CompileConfig(fullgraph=True, dynamic=False, backend=backend,
                        mode="reduce-overhead" if backend == "inductor" else None)
    if device.type != "cuda":
        cfg._compile_all_devices = True
    return cfg


def _prepare_compiled(model, state: dict, device: torch.device, batch: int) -> None:
    """Before the compiled loop's first call at ``batch``: the compile settings, room for one
    graph per batch size and model, and the accelerated modules' decisions at ``batch``
    tokens made now, outside the compiled region (:func:`dass.infer.ops.prepare_compile`)."""
    from dass.infer.ops import prepare_compile

    raise_recompile_limit()
    if "compile_config" not in state:
        state["compile_config"] = compile_config(device, state.get("backend"))
    state.setdefault("prepared", {})[batch] = prepare_compile(model, [batch])


def reset_compiled(model) -> None:
    """Forget ``generate()``'s compiled forward and Dynamo's caches, which hold the fast
    loop's compiled steps too (between the dense and the accelerated phase: the model's
    modules change in place)."""
    import gc

    import torch._dynamo

    for attr in ("_compiled_call", "_last_compile_config"):
        if attr in vars(model):
            delattr(model, attr)
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(model, ids: torch.Tensor, new_tokens: int, mode: str, reps: int = 3, state: dict | None = None) -> dict[str, Any]:
    """Time the loop ``mode`` (``generate()``, or the fast loop; median of ``reps`` after
    one warm-up) and its first token (a run with one new token: the prefill)."""
    from dass.infer.decode_graphs import DecodeGraphs, cuda_capture

    dev = ids.device
    state = state if state is not None else {}
    state.setdefault("max_len", ids.shape[1] + new_tokens + 8)
    dg = None
    if mode == "compiled":
        _prepare_compiled(model, state, dev, ids.shape[0])
    if mode == "fast":
        _fast(model, state).prepare(ids.shape[0])
    if mode == "graphs":
        dg = state.get("graphs")
        if dg is None:
            dg = state["graphs"] = DecodeGraphs(model, capture=cuda_capture if dev.type == "cuda" else (lambda fn: fn))
    try:
        out = _run(model, ids, new_tokens, mode, state)  # warm-up: compile, tune, capture
        compiled = mode in ("compiled", "fast")
        if compiled:  # Dynamo's counters (the other loops never import torch._dynamo)
            from torch._dynamo.utils import counters

            recorded0 = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
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
    step_s = (total - ttft) / max(new_tokens - 1, 1)  # <= 0 only in noisy dry runs: no roofline then
    from dass.infer.roofline import roofline_fraction, step_bytes

    nbytes = step_bytes(model, B, ids.shape[1], new_tokens)
    bw = state.get("bandwidth")
    res = {
        "batch": B, "mode": mode, "loop": _loop_name(model, mode, state), "new_tokens": new_tokens, "prompt_len": ids.shape[1],
        "ttft_ms": ttft * 1e3, "total_ms": total * 1e3, "tokens_per_s": B * new_tokens / total,
        "decode_tokens_per_s": B * (new_tokens - 1) / max(total - ttft, 1e-9), "decode_step_ms": step_s * 1e3,
        "step_bytes": nbytes, "copy_bandwidth_gbs": bw / 1e9 if bw else None,
        "roofline": roofline_fraction(nbytes["total"], step_s, bw) if bw and step_s > 0 else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "all_total_ms": [x * 1e3 for x in totals],
        "tokens": (out if mode == "fast" else out[:, ids.shape[1]:]).tolist(),
    }
    if compiled:
        res["graph_breaks"] = sum(counters["graph_break"].values())
        # CUDA graph health (cudagraph trees, mode=reduce-overhead): skips so far in this
        # process, and whether graphs were recorded during the timed runs (each recording
        # counts its non-static inputs; after the warm-up a step should only replay)
        res["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        res["cudagraph_recorded_in_timed_runs"] = counters["inductor"]["cudagraph_recorded_non_static_inputs"] > recorded0
        res["compiled"] = ("_compiled_call" in vars(model) if mode == "compiled"
                           else state["fast"].compile and counters["stats"]["unique_graphs"] > 0)
    return res


def _loop_name(model, mode: str, state: dict | None = None) -> str:
    """What ran, in words: the loop and, for ``compiled``, whether generate() did compile."""
    if mode == "fast":
        fg = (state or {}).get("fast")
        return fg.name() if fg is not None else "fast loop (dass.infer.decode_loop)"
    if mode == "compiled":
        cfg = getattr(model, "_last_compile_config", None)
        if "_compiled_call" not in vars(model) or cfg is None:
            return "compiled requested, generate() did not compile (eager)"
        return f"generate() static cache, torch.compile({cfg.backend}, mode={cfg.mode}, fullgraph={cfg.fullgraph})"
    return {"graphs": "generate() static cache, decode-step CUDA graphs (dass.infer.decode_graphs)",
            "eager": "generate() dynamic cache, eager"}.get(mode, mode)


def compare(model, make_ids, batches: list[int], new_tokens: int, modes: list[str], reps: int = 3,
            accelerate_kw: dict | None = None, deadline: float | None = None, log=print,
            backend: str | None = None, nested_layers: bool = False) -> dict[str, Any]:
    """Dense then accelerated (in place) ``generate()`` at each batch size and mode (loop);
    ``backend``: the compiled and fast loops' torch.compile backend (default: inductor on
    CUDA); ``nested_layers``: the fast loop's experimental per-layer compile region."""
    from dass.infer.accelerate import accelerate, tuning_log

    from dass.infer.roofline import copy_bandwidth

    res: dict[str, Any] = {"dense": [], "sparse": [], "skipped": []}
    dev = next(model.parameters()).device
    res["copy_bandwidth_gbs"] = (bw := copy_bandwidth(dev)) / 1e9
    log(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
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
            state: dict = {"bandwidth": bw, "backend": backend, "nested_layers": nested_layers}
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
                log(f"  {phase:6} {mode:8} B={B:<3} {r['tokens_per_s']:9.1f} tok/s  ttft {r['ttft_ms']:8.2f} ms  "
                    f"peak {r['peak_mem_gb'] or 0:6.2f} GB  roofline {100 * (r['roofline'] or 0):5.1f}%  [{r['loop']}]")
            if state.get("log"):
                res.setdefault("graph_log", {})[f"{phase} {mode}"] = state["log"]
            if state.get("graphs") is not None:
                state["graphs"].remove()
            if mode in ("compiled", "fast"):
                release_state(state)
                reset_compiled(model)
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
                     "dense_roofline": d.get("roofline"), "sparse_roofline": s.get("roofline"),
                     "dense_loop": d.get("loop"), "sparse_loop": s.get("loop"),
                     "same_tokens": sum(same) / max(len(same), 1)})
    return rows


def print_table(rows: list[dict[str, Any]], out=sys.stdout) -> None:
    print("mode     batch | dense tok/s | 2:4 tok/s | speed-up | TTFT dense / 2:4 (ms) | peak GB dense / 2:4 "
          "| roofline dense / 2:4 | same greedy tokens", file=out)
    for r in rows:
        pk = (f"{r['dense_peak_gb']:.2f} / {r['sparse_peak_gb']:.2f}" if r["dense_peak_gb"] is not None else "-")
        rf = (f"{100 * r['dense_roofline']:.0f}% / {100 * r['sparse_roofline']:.0f}%"
              if r.get("dense_roofline") is not None and r.get("sparse_roofline") is not None else "-")
        print(f"{r['mode']:8} {r['batch']:5} | {r['dense_tok_s']:11.1f} | {r['sparse_tok_s']:9.1f} | {r['speedup']:7.2f}x | "
              f"{r['dense_ttft_ms']:9.2f} / {r['sparse_ttft_ms']:9.2f} | {pk:>19} | {rf:>20} | {100 * r['same_tokens']:.0f}%",
              file=out, flush=True)
    loops = sorted({(r["mode"], r.get("dense_loop"), r.get("sparse_loop")) for r in rows}, key=str)
    for mode, dl, sl in loops:
        print(f"  {mode}: dense ran {dl}; 2:4 ran {sl}", file=out, flush=True)


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
    p.add_argument("--modes", default="fast,compiled,graphs,eager",
                   help="comma list of loops: fast (lean greedy loop: static cache, eager prefill, compiled 1-token step, "
                        "no host sync per step; dass.infer.decode_loop), compiled (generate() with compile_config), "
                        "graphs (generate(), decode-step CUDA graphs), eager (plain generate())")
    p.add_argument("--compile-backend", default=None,
                   help="fast and compiled loops: torch.compile backend (default inductor with mode=reduce-overhead "
                        "on CUDA, aot_eager on CPU)")
    p.add_argument("--nested-layers", action="store_true",
                   help="fast loop, experimental: each decoder layer a torch.compiler.nested_compile_region "
                        "(one layer traced and reused: shorter compiles; off by default)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per case (median)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--keep-dense", action="store_true", help="AccelerateConfig(keep_dense=True): memory for speed")
    p.add_argument("--fuse-qkv", action="store_true",
                   help="AccelerateConfig(fuse_qkv=True): attention's q, k, v as one 2:4 product (new, off by default)")
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
    acc_kw: dict[str, Any] = {"config": AccelerateConfig(keep_dense=args.keep_dense, fuse_qkv=args.fuse_qkv)}
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
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"dass generate: unknown mode(s) {bad}; choose from {','.join(MODES)}", file=sys.stderr)
        return 2
    res = compare(model, make_ids, batches, args.new_tokens, modes, args.reps, acc_kw, deadline,
                  log=lambda s: print(s, flush=True), backend=args.compile_backend,
                  nested_layers=args.nested_layers)
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
