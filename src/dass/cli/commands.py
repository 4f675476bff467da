"""What each ``dass`` subcommand does once its arguments are parsed: load, call the
library, print. Kept apart from the argument definitions (:mod:`dass.cli.args`) so each
file stays short; the parser points each subcommand at its ``cmd_*`` function here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _load(args: argparse.Namespace):
    from dass.io.models import load_model

    return load_model(args.model, dtype=args.dtype, device="cpu", gguf_file=getattr(args, "gguf_file", None))


def _device(args: argparse.Namespace) -> str:
    from dass.run.devices import resolve_device

    return resolve_device(args.device)


def _calibration_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {"source": args.calibration, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}


def method_from_args(args: argparse.Namespace, spec: str | None = None, strict: bool = True):
    """The method of ``--method`` (or ``spec``) with the ``--alpha``/``--rescale`` shortcuts
    folded into its options object; ``strict``: a shortcut the method does not take is an
    error (with several methods, as in ``dass compare``, it applies to those that take it)."""
    from dass.methods.base import get_method_with

    extra = {"alpha": getattr(args, "alpha", None), "rescale": getattr(args, "rescale", None)}
    return get_method_with(spec or args.method, extra, strict=strict, label=lambda k: f"--{k}")


def _reconstruct(args: argparse.Namespace):
    from dass.run.reconstruct import reconstruct_options

    value = getattr(args, "reconstruct", None)
    return None if value is None else reconstruct_options(value or True)


# --------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> int:
    from dass.core.patterns import parse_pattern
    from dass.io.checkpoint import build_manifest, save_pruned
    from dass.io.data import sample_calibration
    from dass.run import distributed
    from dass.run.claim import claim_output
    from dass.run.preflight import check_prune
    from dass.run.prune import prune
    from dass.run.spec import RunSpec

    out = Path(args.output)
    check_prune(args)  # device, model folder, output, window, calibration text: before any work
    ctx, device = distributed.init_from_env(args.device)  # torchrun: one process per GPU
    claim_output(args.output, overwrite=args.overwrite, sources=[args.model])  # one run per output
    device = device or _device(args)
    spec = RunSpec(
        method=method_from_args(args),
        pattern=parse_pattern(args.pattern),
        scope=args.scope,
        calibration=None,  # sampled below, once the tokenizer is loaded
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        activations=args.activations,
        reconstruct=_reconstruct(args),
    )
    quiet = args.quiet or not ctx.is_main
    t0 = time.perf_counter()
    if args.stream:
        return _prune_streaming(args, spec, quiet, t0)
    model, tokenizer = _load(args)
    spec.plan(model)  # fail before the calibration forward
    ids = None
    if spec.method.needs_calibration:
        ids = sample_calibration(tokenizer, args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    report = prune(model, dataclasses.replace(spec, calibration=ids), progress=not quiet)
    if not ctx.is_main:  # every rank holds the same pruned model; rank 0 writes it
        ctx.barrier()
        return 0
    manifest = build_manifest(
        report,
        calibration=_calibration_spec(args) if ids is not None else {},
        extra={"source_model": args.model, "world_size": ctx.world},
    )
    path = save_pruned(model, tokenizer, out, manifest, overwrite=args.overwrite)
    if args.compress:
        from dass.io.checkpoint import compress_checkpoint

        compress_checkpoint(path)
    ctx.barrier()
    print(f"{report.summary()} -> {path} ({time.perf_counter() - t0:.1f} s in all)")
    return 0


def _prune_streaming(args, spec, quiet, t0) -> int:
    """``--stream``: read each layer from the safetensors shards, prune it, write it, free
    it; resumable (same command again continues from the last saved layer)."""
    from transformers import AutoTokenizer

    from dass.io.data import sample_calibration
    from dass.io.models import ModelError, default_model_dir
    from dass.run import distributed
    from dass.run.streaming import prune_checkpoint

    src = default_model_dir() if args.model == "default" else Path(args.model)
    if not src.is_dir():
        raise ModelError(f"--stream needs a local checkpoint directory (or 'default'), got {args.model!r}")
    ids = None
    if spec.method.needs_calibration:
        tokenizer = AutoTokenizer.from_pretrained(src)
        ids = sample_calibration(tokenizer, args.calibration, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    report = prune_checkpoint(
        src,
        args.output,
        spec,
        calibration_ids=ids,
        dtype=None if args.dtype == "auto" else args.dtype,
        resume=not args.no_resume,
        progress=not quiet,
        overwrite=args.overwrite,
        calibration_spec=_calibration_spec(args) if ids is not None else {},
        manifest_extra={"world_size": distributed.current().world},
    )
    if distributed.current().is_main:
        if args.compress:
            from dass.io.checkpoint import compress_checkpoint

            compress_checkpoint(args.output)
        print(f"{report.summary()} -> {Path(args.output).resolve()} ({time.perf_counter() - t0:.1f} s in all)")
    return 0


# --------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------


def _evaluate(model, tokenizer, args: argparse.Namespace, device: str) -> dict[str, Any]:
    from dass.evaluation.evaluate import evaluate_model

    tasks = [t.strip() for t in args.zeroshot.split(",") if t.strip()] if args.zeroshot else []
    return evaluate_model(model, tokenizer, device, ppl=args.ppl, eval_seqlen=args.eval_seqlen,
                          eval_tokens=args.eval_tokens, zeroshot_tasks=tasks, limit=args.limit,
                          zeroshot_batch_size=args.zeroshot_batch_size, progress=not args.quiet)


def cmd_eval(args: argparse.Namespace) -> int:
    from dass.evaluation.evaluate import headline
    from dass.run.preflight import check_eval

    check_eval(args)  # device, model folder, window, evaluation text, --json: before loading
    device = _device(args)
    model, tokenizer = _load(args)
    if args.accelerate:
        from dass.infer.accelerate import accelerate
        from dass.io.checkpoint import MANIFEST, read_manifest

        manifest = read_manifest(args.model) if (Path(args.model) / MANIFEST).is_file() else None
        model.to(device)
        done = accelerate(model, manifest)
        _log(args, f"accelerated {len(done.get('replaced', []))} matrices, left {len(done.get('skipped', []))} dense")
    result = _evaluate(model, tokenizer, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    ppl = result.get("perplexity", {}).get("ppl")
    parts = [f"perplexity {ppl:.3f}"] if ppl is not None else []
    for task, r in result.get("zeroshot", {}).items():
        parts.append(f"{task} {headline(r):.4f}")
    print(f"{args.model}: " + ", ".join(parts))
    return 0


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    from dass.io.checkpoint import verify_checkpoint
    from dass.run.preflight import check_verify

    check_verify(args)  # a folder with a well-formed dass.json
    res = verify_checkpoint(args.dir)
    for note in res.notes:
        print(f"{args.dir}: note: {note}", file=sys.stderr)
    if res.ok:
        files = f" and {res.files} files' hashes" if res.files else ""
        print(f"{args.dir}: OK, {res.checked} pruned matrices{files} match the manifest")
        return 0
    for p in res.problems[:50]:
        print(f"{args.dir}: {p}", file=sys.stderr)
    print(f"{args.dir}: FAILED, {len(res.problems)} problem(s) in {res.checked} matrices", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    from dass.evaluation.compare import run_compare

    return run_compare(args)


# --------------------------------------------------------------------------------------
# passthroughs to other modules
# --------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    from dass.infer.bench import main as bench_main

    return int(bench_main(rest) or 0)


def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    from dass.infer.generate import main as generate_main

    return int(generate_main(rest) or 0)


def cmd_compress(args: argparse.Namespace) -> int:
    from dass.io.checkpoint import compress_checkpoint, read_manifest
    from dass.run.preflight import check_compress

    check_compress(args)  # a dass checkpoint, an output it may write
    out = compress_checkpoint(Path(args.dir), Path(args.output) if args.output else None, overwrite=args.overwrite)
    info = read_manifest(out).get("compressed", {})
    sizes = ", ".join(f"{k} {v}" for k, v in info.items() if "bytes" in k or "ratio" in k)
    print(f"{out}: compressed ({sizes})")
    return 0
