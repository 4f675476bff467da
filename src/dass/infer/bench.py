"""``dass bench``: time dense vs 2:4 sparse matrix products, MLP blocks, the dispatcher's
choices over token counts, a LLaMA-shaped model, and ``generate()``.

Timing (:mod:`dass.infer.bench_timing`): CUDA events around a loop of calls, median over
repetitions, after warm-up; "eager" = plain Python calls, "graph" = CUDA-graph replay of the
same loop (GPU time). ``--dry-run`` checks the code paths on the CPU with tiny shapes in
seconds (no GPU numbers).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import torch

from dass.infer.bench_timing import Timer, safe

SHAPES = {"7b": (4096, 11008), "13b": (5120, 13824), "70b": (8192, 28672)}
TOKENS = [1, 16, 128, 1024, 4096, 16384]
SWEEP_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384]
DRY_SHAPES = "256x704"
DRY_TOKENS = "1,16"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WHATS = ("ceilings", "host", "kernels", "gemv", "matrix", "mlp", "dispatch", "e2e", "cslt", "generate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dass bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None,
                   help="comma list of 7b,13b,70b or dxD (e.g. 256x704); default 7b,13b,70b (--dry-run: 256x704)")
    p.add_argument("--tokens", default=None,
                   help=f"comma list of token counts; default {','.join(map(str, TOKENS))} "
                        f"(dispatch: {','.join(map(str, SWEEP_TOKENS))}; --dry-run: {DRY_TOKENS})")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--what", default="matrix,mlp", help=f"comma list of {','.join(WHATS)}")
    p.add_argument("--e2e-layers", type=int, default=8)
    p.add_argument("--e2e-prefill", default="2048")
    p.add_argument("--e2e-decode-ctx", type=int, default=512)
    p.add_argument("--e2e-decode-batches", default="1,16")
    p.add_argument("--gen-layers", type=int, default=32, help="generate: decoder layers of the 7B-shaped model")
    p.add_argument("--gen-batches", default="1,4,16,64")
    p.add_argument("--gen-new-tokens", type=int, default=64)
    p.add_argument("--gen-modes", default="fast,compiled,graphs,eager",
                   help="generate: loops (fast, compiled, graphs, eager; see dass generate --help)")
    p.add_argument("--gen-scope", choices=["mlp", "all"], default="mlp", help="generate and e2e: which matrices are 2:4")
    p.add_argument("--gen-prompt-len", type=int, default=64)
    p.add_argument("--target-ms", type=float, default=25.0, help="time per measured loop")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    p.add_argument("--keep-dense", action="store_true",
                   help="dispatch: accelerate with AccelerateConfig(keep_dense=True) (cuBLAS on a dense copy is a path)")
    p.add_argument("--dry-run", action="store_true", help="run on CPU with tiny shapes (checks the code paths only)")
    return p


def _parse_shapes(s: str):
    out = []
    for tok in s.split(","):
        tok = tok.strip().lower()
        if tok in SHAPES:
            out.append((tok, *SHAPES[tok]))
        elif "x" in tok:
            a, b = tok.split("x")
            out.append((tok, int(a), int(b)))
        elif tok:
            raise SystemExit(f"dass bench: unknown shape {tok!r}")
    return out


def _us(v):
    return f"{v * 1e3:9.1f}" if isinstance(v, (int, float)) else f"{'-':>9}"


def _x(a, b):
    return f"{a / b:5.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else "    - "


def _fmt_matrix_row(shape, kind, r):
    de, dg = r.get("dense_eager_ms"), r.get("dense_graph_ms")
    cols = [f"{shape:>4} {kind:<5} {r['N']:>5}x{r['K']:<5} T={r['T']:<5}", _us(de), _us(dg)]
    for key in ("cslt_eager_ms", "cslt_graph_ms", "triton_input_graph_ms", "triton_output_graph_ms",
                "decomp_output_graph_ms", "module_input_eager_ms", "module_output_eager_ms"):
        v = r.get(key)
        cols.append(f"{_us(v)} {_x(de if 'eager' in key else dg, v)}")
    return " ".join(cols)


MATRIX_HEADER = ("shape kind  N x K       T        dense_e   dense_g |  cslt_eager      |  cslt_graph      "
                 "| triton_in_graph  | triton_out_graph | decomp_out_graph | module_in_eager  | module_out_eager  "
                 "(us; ratio = dense/variant, eager vs dense eager, graph vs dense graph)")


def _run_generate(args, res: dict, errors: list) -> None:
    from dass.infer import generate

    argv = ["--synthetic", "7b", "--layers", str(args.gen_layers), "--batches", args.gen_batches,
            "--new-tokens", str(args.gen_new_tokens), "--modes", args.gen_modes, "--scope", args.gen_scope,
            "--prompt-len", str(args.gen_prompt_len),
            "--dtype", args.dtype]
    out = (args.out + ".generate.json") if args.out else None
    if out:
        argv += ["--out", out]
    rc = safe(lambda: generate.main(argv), errors, "generate")
    res["generate"] = {"argv": argv, "rc": rc, "json": out}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        device = "cpu"
    elif not torch.cuda.is_available():
        print("dass bench needs a CUDA GPU (use --dry-run to check the code paths on CPU)", file=sys.stderr)
        return 2
    else:
        device = "cuda"
    dtype = DTYPES[args.dtype]
    what = {w.strip() for w in args.what.split(",") if w.strip()}
    unknown = what - set(WHATS)
    if unknown:
        print(f"dass bench: unknown --what {sorted(unknown)}; choose from {','.join(WHATS)}", file=sys.stderr)
        return 2
    shapes = _parse_shapes(args.shapes or (DRY_SHAPES if args.dry_run else "7b,13b,70b"))
    default_tokens = DRY_TOKENS if args.dry_run else None
    tok_arg = args.tokens or default_tokens
    tokens = [int(t) for t in (tok_arg or ",".join(map(str, TOKENS))).split(",") if t.strip()]
    sweep_tokens = [int(t) for t in tok_arg.split(",")] if tok_arg else SWEEP_TOKENS
    timer = Timer(device, args.target_ms if not args.dry_run else 1.0, args.reps if not args.dry_run else 1)
    errors: list[str] = []
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": args.dtype, "argv": sys.argv if argv is None else argv,
        "shapes": [list(s) for s in shapes], "tokens": tokens,
        "timing": f"CUDA events; median of {args.reps} loops of back-to-back calls; eager = plain calls, graph = CUDA-graph replay",
    }
    try:
        import triton

        res["triton"] = triton.__version__
    except Exception:
        res["triton"] = None
    t0 = time.time()

    def dump():
        res["errors"] = errors
        res["seconds"] = time.time() - t0
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1, default=str)

    gpu_only = {"ceilings", "host", "kernels", "gemv", "dispatch", "cslt", "generate"}
    if device != "cuda" and what & gpu_only:
        res["skipped_without_gpu"] = sorted(what & gpu_only)
        print(f"(no GPU: skipping {', '.join(sorted(what & gpu_only))})", flush=True)
        what -= gpu_only
    _run_parts(args, what, shapes, tokens, sweep_tokens, timer, dtype, device, errors, res, dump)
    if device == "cuda":
        from dass.infer.accelerate import tuning_log

        res["tuning_log"] = tuning_log()
    dump()
    if args.out:
        print(f"wrote {args.out}")
    if errors:
        print(f"{len(errors)} variant(s) failed; see 'errors' in the JSON", file=sys.stderr)
    return 0


def _run_parts(args, what, shapes, tokens, sweep_tokens, timer, dtype, device, errors, res, dump) -> None:
    from dass.infer import bench_kernels as bk
    from dass.infer import bench_models as bm

    if "ceilings" in what:
        res["ceilings"] = safe(lambda: bk.ceilings(timer, device), errors, "ceilings")
        print("ceilings:", res["ceilings"], flush=True)
    if "host" in what:
        res["host"] = bm.bench_host([1, 4, 16, 64], dtype, device, errors, log=lambda s: print(s, flush=True))
        dump()
    for name, d, D in shapes:
        if what & {"kernels", "gemv"}:
            toks = [1] if "kernels" not in what else sweep_tokens
            rows = bm.bench_kernels(timer, d, D, [t for t in toks if t <= 1024], dtype, device, errors,
                                    log=lambda s: print(s, flush=True))
            res.setdefault("kernels", []).extend(dict(r, shape=name) for r in rows)
            dump()
        if "dispatch" in what:
            print(f"dispatch {name} (d={d}, D={D}), GPU time of the MLP block (CUDA graph):", flush=True)
            def keep(r, name=name):
                res.setdefault("dispatch", []).append(dict(r, shape=name))
                dump()
            bm.bench_dispatch(timer, d, D, sweep_tokens, dtype, device, errors, log=lambda s: print(s, flush=True),
                              on_row=keep, keep_dense=args.keep_dense)
        if "matrix" in what:
            print(MATRIX_HEADER, flush=True)
            for kind, N, K, ors in (("gate", D, d, ["input", "output"]), ("down", d, D, ["input"])):
                for T in tokens:
                    r = bk.bench_matrix(timer, N, K, T, ors, dtype, device, errors)
                    r.update(shape=name, kind=kind)
                    res.setdefault("matrix", []).append(r)
                    print(_fmt_matrix_row(name, kind, r), flush=True)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                dump()
        if "mlp" in what:
            for r in bm.bench_mlp(timer, d, D, tokens, dtype, device, errors, log=lambda s: print(s, flush=True)):
                res.setdefault("mlp", []).append(dict(r, shape=name))
            dump()
        if "cslt" in what:
            res.setdefault("cslt", []).extend(bk.cslt_layouts(timer, [(name, d, D)], [t for t in tokens if t >= 16],
                                                               dtype, device, errors))
            dump()
        if device == "cuda":
            from dass.infer.accelerate import clear_graphs

            clear_graphs()
            torch.cuda.empty_cache()
    if "e2e" in what:
        res["e2e"] = bm.bench_e2e(timer, args.e2e_layers, [int(p) for p in args.e2e_prefill.split(",") if p],
                                  args.e2e_decode_ctx if not args.dry_run else 8,
                                  [int(b) for b in args.e2e_decode_batches.split(",")],
                                  dtype, device, errors, tiny=args.dry_run, log=lambda s: print(s, flush=True),
                                  scope=args.gen_scope)
        dump()
    if "generate" in what:
        _run_generate(args, res, errors)


if __name__ == "__main__":
    raise SystemExit(main())
