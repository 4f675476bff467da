"""Issue 22 on the GPU: decoding a 7B-shaped model in the fastest dense loop, dense against
2:4 in that same loop, MLP scope and scope all; and greedy agreement of a really pruned
model, accelerated, with the same weights run dense.

The loop (``--loop``): ``fast`` (default), the lean greedy loop of
:mod:`dass.infer.decode_loop` (static cache, eager prefill, the 1-token decoding step
compiled with torch.compile(mode="reduce-overhead", fullgraph=True), no host sync between
steps); or ``compiled``, HF generate() with a static cache and the same compile settings
(``compile_config``), whose per-step host work (logits processors, stopping criteria, a
host read per step) the GPU waits on.

    # the speed table (about 5 minutes on an H200; rows past --budget-s are skipped, and said so)
    python benchmarks/gpu_generate.py --out benchmarks/results/h200_generate.json --budget-s 280
    # the same in generate()'s compiled loop
    python benchmarks/gpu_generate.py --loop compiled --out benchmarks/results/h200_generate_compiled.json
    # greedy agreement on the embedded model (a local GGUF file or checkpoint directory)
    python benchmarks/gpu_generate.py --check-greedy --model out/gpu/SmolLM2-135M-Instruct.Q4_1.gguf --out greedy.json
    # the whole script on the CPU with tiny shapes, in seconds (tests/test_gpu_generate_dry.py)
    python benchmarks/gpu_generate.py --dry-run --out /tmp/dry.json

How the speed table is made, and why that way (the GPU time is short):

- one model, built directly on the GPU in bf16 with random weights, pruned 2:4 in every
  scope at once (gate/up along the outputs as DaSS prunes them, down and the attention
  projections along the inputs): the dense runs use these weights in dense storage;
- dense compiled at every batch; then the MLPs are accelerated in place (scope mlp) and
  measured; then the attention projections too (scope all) and measured. No second copy
  of the model exists at any time, so peak memory compares what a user would hold;
- each (model, batch) is compiled once (``dynamic=False``) and reused for its timed runs;
  the 2:4 modules' paths at the batch's token count are decided before compiling
  (:func:`dass.infer.ops.prepare_compile`);
- the roofline fraction: bytes a decoding step must read (weights as stored, compressed for
  the 2:4 modules, plus the KV cache of the tokens so far) over the step time, against a
  device-to-device copy (read + write) measured at the start of the run.

Rows: {"scope", "batch", "loop", "dense_tok_s", "sparse_tok_s", "dense_roofline",
"sparse_roofline", "dense_peak_gb", "sparse_peak_gb"} plus the speed-up, times to first
token, step times and greedy agreement (random weights: near-ties make the latter
uninformative; --check-greedy is the real check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
]


def _cpu_reference_path() -> None:
    """Dry run without a GPU or triton: let the 2:4 modules be built on the CPU (their
    reference path, decompress + F.linear), as TRITON_INTERPRET=1 would with triton."""
    import dass.infer.device as device
    import dass.infer.nm24_linear as nl

    if not device.interpreting():
        device.interpreting = lambda: True
        nl.interpreting = lambda: True


class Budget:
    """The run's time box: phases share what is left; rows that do not fit are skipped."""

    def __init__(self, seconds: float | None):
        self.t0 = time.perf_counter()
        self.end = None if seconds is None else self.t0 + seconds
        self.last_row = 0.0  # seconds the last measured row took (compile + runs)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.perf_counter()


def _save(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1, default=str)


def _measure_phase(model, name: str, batches: list[int], make_ids, args, bw: float, budget: Budget,
                   phases_left: int, skipped: list[str], dense_done: set[int] | None, log) -> dict[int, dict]:
    """``args.loop`` at each batch; a phase may use its share of the time left."""
    from dass.infer.generate import measure, release_state, reset_compiled

    out: dict[int, dict] = {}
    stop = budget.left() / max(phases_left, 1)
    start = time.perf_counter()
    state: dict[str, Any] = {"bandwidth": bw, "backend": args.compile_backend, "nested_layers": args.nested_layers}
    for B in batches:
        if dense_done is not None and B not in dense_done:
            continue
        used = time.perf_counter() - start
        guess = budget.last_row  # a row costs about what the last one did (mostly its compile)
        if used + guess > stop or budget.left() < max(5.0, guess):
            skipped.append(f"{name} B={B}: time box (--budget-s {args.budget_s}; phase used {used:.0f} of {stop:.0f} s, "
                           f"a row took {guess:.0f} s)")
            log(f"  {name} B={B}: skipped, time box")
            continue
        try:
            t = time.perf_counter()
            r = measure(model, make_ids(B), args.new_tokens, args.loop, args.reps, state)
            r["seconds"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 -- one failing row must not stop the others
            skipped.append(f"{name} B={B}: {type(e).__name__}: {str(e)[:300]}")
            log(f"  !! {name} B={B}: {type(e).__name__}: {str(e)[:300]}")
            continue
        budget.last_row = r["seconds"]
        r.pop("all_total_ms", None)
        if r.get("cudagraph_skips") or r.get("cudagraph_recorded_in_timed_runs"):
            log(f"  !! {name} B={B}: CUDA graphs: {r.get('cudagraph_skips')} skips so far, recorded during the timed "
                f"runs: {r.get('cudagraph_recorded_in_timed_runs')} (the step should only replay after its warm-up)")
        out[B] = r
        log(f"  {name:10} B={B:<3} {r['tokens_per_s']:9.1f} tok/s  ttft {r['ttft_ms']:7.1f} ms  step {r['decode_step_ms']:7.2f} ms"
            f"  roofline {100 * (r['roofline'] or 0):5.1f}%  peak {r['peak_mem_gb'] or 0:6.2f} GB  ({r['seconds']:.0f} s)")
    release_state(state)  # the fast loop's compiled step and static caches, before the collection
    reset_compiled(model)
    return out


def _row(scope: str, d: dict, s: dict) -> dict[str, Any]:
    same = [a == b for da, sa in zip(d["tokens"], s["tokens"]) for a, b in zip(da, sa)]
    return {"scope": scope, "batch": d["batch"], "loop": s["loop"], "dense_loop": d["loop"],
            "dense_tok_s": d["tokens_per_s"], "sparse_tok_s": s["tokens_per_s"],
            "speedup": s["tokens_per_s"] / d["tokens_per_s"],
            "dense_roofline": d["roofline"], "sparse_roofline": s["roofline"],
            "dense_peak_gb": d["peak_mem_gb"], "sparse_peak_gb": s["peak_mem_gb"],
            "dense_ttft_ms": d["ttft_ms"], "sparse_ttft_ms": s["ttft_ms"],
            "dense_step_ms": d["decode_step_ms"], "sparse_step_ms": s["decode_step_ms"],
            "dense_step_gb": d["step_bytes"]["total"] / 1e9, "sparse_step_gb": s["step_bytes"]["total"] / 1e9,
            "dense_weights_stored_gb": d["step_bytes"]["weights_stored"] / 1e9,
            "sparse_weights_stored_gb": s["step_bytes"]["weights_stored"] / 1e9,
            "graph_breaks": s.get("graph_breaks"), "same_greedy_tokens": sum(same) / max(len(same), 1)}


def print_rows(rows: list[dict], out=sys.stdout) -> None:
    print("scope batch | dense tok/s | 2:4 tok/s | speed-up | roofline dense / 2:4 | peak GB dense / 2:4 | TTFT ms dense / 2:4",
          file=out)
    for r in sorted(rows, key=lambda r: (r["scope"], r["batch"])):
        pk = "-" if r["dense_peak_gb"] is None else f"{r['dense_peak_gb']:.2f} / {r['sparse_peak_gb']:.2f}"
        rf = ("-" if r["dense_roofline"] is None or r["sparse_roofline"] is None
              else f"{100 * r['dense_roofline']:.0f}% / {100 * r['sparse_roofline']:.0f}%")
        print(f"{r['scope']:5} {r['batch']:5} | {r['dense_tok_s']:11.1f} | {r['sparse_tok_s']:9.1f} | {r['speedup']:7.2f}x | "
              f"{rf:>20} | {pk:>19} | {r['dense_ttft_ms']:7.1f} / {r['sparse_ttft_ms']:7.1f}", file=out, flush=True)
    for loop in sorted({r["loop"] for r in rows}):
        print(f"  loop: {loop}", file=out)


def run_table(args, log=print) -> dict[str, Any]:
    from dass.infer.accelerate import accelerate, clear_graphs
    from dass.infer.generate import prune_24, scope_manifest, synthetic_model
    from dass.infer.roofline import copy_bandwidth

    budget = Budget(args.budget_s)
    dev = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    res: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "rows": [], "skipped": [],
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    try:
        import transformers

        res["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    t = time.perf_counter()
    model = synthetic_model(args.size, args.layers, torch.bfloat16, args.device)
    orientation = "dass" if (dev.type == "cuda" or _has_triton()) else "wanda"  # output orientation needs triton
    res["pruned_matrices"] = prune_24(model, "all", orientation)
    res["orientation"] = orientation
    res["build_seconds"] = time.perf_counter() - t
    bw = copy_bandwidth(dev)
    res["copy_bandwidth_gbs"] = bw / 1e9
    log(f"model: {args.size} x {args.layers} layers built and pruned in {res['build_seconds']:.1f} s; "
        f"copy bandwidth {bw / 1e9:.0f} GB/s; batches {batches}, scopes {scopes}, loop {args.loop}, "
        f"budget {args.budget_s} s")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, model.config.vocab_size, (1, args.prompt_len), generator=gen)

    def make_ids(B):
        return prompt.expand(B, -1).contiguous().to(dev)

    phases = 1 + len(scopes)
    dense = _measure_phase(model, "dense", batches, make_ids, args, bw, budget, phases, res["skipped"], None, log)
    res["dense"] = list(dense.values())
    _save(args.out, res)
    done_scopes: list[str] = []
    for i, scope in enumerate(scopes):
        want = "mlp" if scope == "mlp" else ("attn" if "mlp" in done_scopes else "all")
        if scope == "mlp" and done_scopes:
            res["skipped"].append("scope mlp after scope all: the model cannot be de-accelerated; list mlp first")
            continue
        t = time.perf_counter()
        from dass.infer.accelerate import AccelerateConfig

        rep = accelerate(model, manifest=scope_manifest(model, want), config=AccelerateConfig(fuse_qkv=args.fuse_qkv))
        res.setdefault("accelerate", {})[scope] = {"seconds": time.perf_counter() - t, "replaced": len(rep["replaced"]),
                                                   "skipped": rep["skipped"], "fused_gate_up": len(rep["fused_gate_up"]),
                                                   "fused_qkv": len(rep["fused_qkv"])}
        log(f"scope {scope}: accelerated {len(rep['replaced'])} more matrices in {time.perf_counter() - t:.1f} s")
        sparse = _measure_phase(model, f"2:4 {scope}", batches, make_ids, args, bw, budget, phases - 1 - i,
                                res["skipped"], set(dense), log)
        res.setdefault("sparse", {})[scope] = list(sparse.values())
        res["rows"] += [_row(scope, dense[B], sparse[B]) for B in batches if B in sparse]
        done_scopes.append(scope)
        clear_graphs()
        _save(args.out, res)
    from dass.infer.accelerate import tuning_log

    res["tuning"] = tuning_log()
    res["seconds"] = budget.elapsed()
    _save(args.out, res)
    print_rows(res["rows"])
    if res["skipped"]:
        print(f"skipped ({len(res['skipped'])}):", *res["skipped"], sep="\n  ")
    return res


def _has_triton() -> bool:
    from dass.infer.device import triton_ok

    return triton_ok()


# --------------------------------------------------------------------------- greedy check
def _load(args):
    from dass.io.models import load_model

    if args.dry_run:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=256, tie_word_embeddings=True)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval(), None
    return load_model(args.model, dtype=torch.float32, device="cpu")


def _encode(tok, prompts: list[str], vocab: int) -> list[torch.Tensor]:
    if tok is None:
        g = torch.Generator().manual_seed(1)
        return [torch.randint(1, vocab, (1, 5 + i), generator=g) for i in range(len(prompts))]
    return [tok(p, return_tensors="pt").input_ids for p in prompts]


def _greedy(model, ids: torch.Tensor, n: int, loop: str, state: dict) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the per-step logits (``loop``: eager, compiled or fast)."""
    from dass.infer.generate import _cache_kw, _prepare_compiled

    if loop == "fast":
        from dass.infer.decode_loop import FastGreedy

        fg = FastGreedy(model, max_len=ids.shape[1] + n + 8, backend=state.get("backend"))
        toks, scores = fg.generate(ids, n, scores=True)
        return toks[0].tolist(), scores[:, 0].float()

    kw: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    if loop == "compiled":
        from transformers import StaticCache

        _prepare_compiled(model, state, ids.device, ids.shape[0])
        kw[_cache_kw(model)] = StaticCache(config=model.config, max_cache_len=ids.shape[1] + n + 8)
        kw["compile_config"] = state["compile_config"]
    out = model.generate(ids, **kw)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(list(out.scores))[:, 0].float()


def _why(dense_scores: torch.Tensor, sparse_scores: torch.Tensor, pos: int) -> dict[str, Any]:
    """At the first divergence: the dense model's top-2 margin there, against how far the two
    models' logits were apart on the common prefix (a margin inside that distance is a
    near-tie that rounding, not a wrong product, decides)."""
    top = dense_scores[pos].topk(2).values
    margin = float(top[0] - top[1])
    prefix = (dense_scores[: pos + 1] - sparse_scores[: pos + 1]).abs().amax().item()
    return {"dense_top2_margin": margin, "max_logit_diff_on_prefix": prefix,
            "near_tie": margin <= 2 * prefix,
            "why": ("near-tie: the top two dense logits are closer than the dense/2:4 logit difference; bf16 products "
                    "summed in another order flip it" if margin <= 2 * prefix
                    else "the logits differ by more than rounding explains: look at the kernels")}


def check_greedy(args, log=print) -> dict[str, Any]:
    """Prune the embedded model, run it dense and accelerated (same pruned bf16 weights),
    greedy decoding in the eager and the compiled loop; report where tokens diverge."""
    import copy

    import dass
    from dass.infer.accelerate import accelerate

    t0 = time.perf_counter()
    dev = torch.device(args.device)
    model, tok = _load(args)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (8, 64 if args.dry_run else 128), generator=torch.Generator().manual_seed(0))
    orientation = "dass" if (dev.type == "cuda" or _has_triton()) else "wanda"
    method = args.method if orientation == "dass" or args.method != "dass" else "wanda"
    rep = dass.prune(model, method, "2:4", args.scope, calibration=calib, batch_size=4, progress=False,
                     device=args.device)
    model = model.to(device=dev, dtype=torch.bfloat16).eval()
    dense = copy.deepcopy(model)
    acc = accelerate(model)
    log(f"pruned ({method}, scope {args.scope}) and accelerated {len(acc['replaced'])} matrices "
        f"({len(acc['fused_gate_up'])} gate/up stacks) in {time.perf_counter() - t0:.1f} s")
    res: dict[str, Any] = {"model": args.model, "method": method, "scope": args.scope, "prune": rep.summary().splitlines()[0],
                           "replaced": len(acc["replaced"]), "skipped": acc["skipped"], "prompts": [],
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    loops = [lp.strip() for lp in args.greedy_loops.split(",") if lp.strip()]
    with torch.no_grad():
        for text, ids in zip(PROMPTS[: args.prompts], _encode(tok, PROMPTS, vocab)):
            ids = ids.to(dev)
            entry: dict[str, Any] = {"prompt": text if tok is not None else ids[0].tolist()}
            for loop in loops:
                sd, st = {}, {}
                try:
                    d_tok, d_sc = _greedy(dense, ids, args.greedy_tokens, loop, sd)
                    s_tok, s_sc = _greedy(model, ids, args.greedy_tokens, loop, st)
                except Exception as e:  # noqa: BLE001
                    entry[loop] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    continue
                finally:
                    from dass.infer.generate import reset_compiled

                    if loop in ("compiled", "fast"):
                        reset_compiled(dense)
                        reset_compiled(model)
                diverge = next((i for i, (a, b) in enumerate(zip(d_tok, s_tok)) if a != b), None)
                e = {"same": diverge is None, "first_divergence": diverge, "dense_tokens": d_tok, "sparse_tokens": s_tok}
                if diverge is not None:
                    e.update(_why(d_sc, s_sc, diverge))
                if tok is not None:
                    e["dense_text"] = tok.decode(d_tok, skip_special_tokens=True)
                    e["sparse_text"] = tok.decode(s_tok, skip_special_tokens=True)
                entry[loop] = e
                log(f"  {loop:8} {str(entry['prompt'])[:40]!r:44} "
                    + ("same tokens" if diverge is None else f"diverge at {diverge}: {e['why'][:60]}"))
            res["prompts"].append(entry)
    res["all_same"] = all(p[lp].get("same", False) for p in res["prompts"] for lp in loops)
    res["seconds"] = time.perf_counter() - t0
    _save(args.out, res)
    print(f"greedy agreement: {'all prompts identical' if res['all_same'] else 'divergence (see JSON)'} "
          f"in {res['seconds']:.0f} s")
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON path (written as rows complete)")
    p.add_argument("--budget-s", type=float, default=280, help="end within this many seconds (rows past it are skipped)")
    p.add_argument("--batches", default="1,16,4,64", help="run order; the table is sorted")
    p.add_argument("--scopes", default="mlp,all", help="mlp then all (the model is accelerated in place)")
    p.add_argument("--size", default="7b")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=2, help="timed calls of the loop per row (median), after one warm-up")
    p.add_argument("--loop", choices=["fast", "compiled"], default="fast",
                   help="the loop dense and 2:4 are both measured in: fast (dass.infer.decode_loop: static cache, eager "
                        "prefill, compiled 1-token step, no host sync per step) or compiled (HF generate(), static "
                        "cache, compile_config)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor, reduce-overhead)")
    p.add_argument("--nested-layers", action="store_true",
                   help="fast loop, experimental: each decoder layer a torch.compiler.nested_compile_region "
                        "(shorter compiles; off by default)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--fuse-qkv", action="store_true", help="AccelerateConfig(fuse_qkv=True): attention q/k/v as one product")
    p.add_argument("--check-greedy", action="store_true", help="greedy agreement on a pruned real model instead")
    p.add_argument("--model", default="default", help="--check-greedy: a GGUF file or checkpoint directory")
    p.add_argument("--method", default="wanda", help="--check-greedy: pruning method (random-token calibration)")
    p.add_argument("--scope", default="all", choices=["mlp", "all"], help="--check-greedy: which matrices are 2:4")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--greedy-loops", default="eager,compiled,fast",
                   help="--check-greedy: comma list of eager, compiled (generate() compiled), fast (dass.infer.decode_loop)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, seconds: checks the code paths only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.dry_run:
        args.device, args.size, args.layers = "cpu", "tiny", min(args.layers, 2)
        args.prompt_len, args.new_tokens, args.reps = min(args.prompt_len, 8), min(args.new_tokens, 4), 1
        args.batches = ",".join(b for b in args.batches.split(",") if int(b) <= 4) or "1"
        args.prompts, args.greedy_tokens = min(args.prompts, 2), min(args.greedy_tokens, 4)
        _cpu_reference_path()
    elif not torch.cuda.is_available():
        print("gpu_generate.py needs a CUDA GPU (use --dry-run to check the code paths on the CPU)", file=sys.stderr)
        return 2
    if args.check_greedy:
        res = check_greedy(args)
        return 0 if res["prompts"] else 1
    run_table(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
