"""The ``dass`` console script. Thin: parses arguments, calls the library, prints.

Every error a user can cause (a bad pattern, a missing file, an output that exists, a
model without a GLU MLP) ends in one line on stderr and exit status 2, with no traceback;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from dass.errors import DassError, UserValueError

DEFAULT_METHODS = "dense,dass,wanda,sparsegpt,magnitude,dass+reconstruct"
#: ``dass compare``'s reconstruction for rows named METHOD+reconstruct, sized like its other
#: defaults for a 2-core CPU (docs/ablation.md, "Reconstruction"); ``dass prune
#: --reconstruct`` defaults to the full setting (500 steps of 4096 tokens).
COMPARE_RECONSTRUCT = "steps=25,batch_tokens=1024"
ZEROSHOT_TASKS = "piqa,hellaswag,winogrande,arc_easy,arc_challenge"


class UsageError(UserValueError):
    """A command-line mistake."""


#: OS errors a user causes by naming files: shown as one line like :class:`DassError`.
USER_FILE_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _user_facing(exc: BaseException) -> bool:
    """Every error a user can cause derives from :class:`dass.errors.DassError` (or is a
    file the user named that is missing, exists or cannot be written); anything else is
    a bug and keeps its traceback."""
    return isinstance(exc, (DassError, *USER_FILE_ERRORS))


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where the default is "not
    given" (None, False): those say in their own words what happens without them. The
    epilog (the list of methods and their options) keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "%(default)" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


#: What ``dass compress`` and ``prune --compress`` store, said once for both.
COMPRESSED_FORMAT = "kept values + a one-bit-per-weight mask"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'default' (the embedded SmolLM2-135M-Instruct, dequantized from a 4-bit GGUF), "
                                 "a local checkpoint directory (dense or compressed), or a hub id")
    p.add_argument("--gguf-file", help="GGUF file name inside MODEL (a directory); without it the safetensors are read")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load the weights in; auto keeps the checkpoint's own, float32 for 'default' on CPU")
    p.add_argument("--device", help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _add_calibration_args(p: argparse.ArgumentParser, nsamples: int = 128, seqlen: int = 2048) -> None:
    p.add_argument("--calibration", default="default",
                   help="calibration text: default (the embedded Wikipedia text's calibration split), "
                        "FILE.txt, FILE.jsonl (a 'text' field per line), or c4 / wikitext2 (need the hub)")
    p.add_argument("--nsamples", type=int, default=nsamples, help="calibration sequences; the paper uses 128")
    p.add_argument("--seqlen", type=int, default=seqlen, help="tokens per calibration sequence; the paper uses 2048")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows' positions")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")


def methods_help() -> str:
    """Every registered method, one line each, with its options and their real defaults
    (read from the options objects themselves)."""
    from dass.methods import available_methods, method_class

    lines = ["methods (--method NAME or NAME:key=value,key=value; lists use '/', e.g. alpha_candidates=0/0.5/1):"]
    for name in available_methods():
        cls = method_class(name)
        lines.append(f"  {name:<10} {cls.summary}")
        for opt, default, text in cls.Options.describe():
            lines.append(f"      {opt}={default}  {text}")
    from dass.run.reconstruct import ReconstructOptions

    lines.append("reconstruction (--reconstruct, or --reconstruct key=value,...; any method):")
    for opt, default, text in ReconstructOptions.describe():
        lines.append(f"      {opt}={default}  {text}")
    return "\n".join(lines)


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scope", default="mlp", choices=["mlp", "all"],
                   help="mlp: gate/up/down only (the paper's protocol); all: attention projections too")
    p.add_argument("--alpha", default=None,
                   help="shortcut for the method's alpha option (dass: a number or 'auto'; dass-obs: a number)")
    p.add_argument("--rescale", default=None, metavar="{none,down,all}",
                   help="shortcut for the method's rescale option (dass, wanda): multiply each pruned row by its "
                        "least-squares factor on calibration rows")
    p.add_argument("--reconstruct", nargs="?", const="", default=None, metavar="KEY=VALUE,...",
                   help="after each layer's masks are applied, refit the kept weights of every pruned block to the "
                        "dense block's output (masks fixed); optional settings, e.g. steps=200,lr=0.05 (see below)")


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


def _add_eval_args(p: argparse.ArgumentParser, eval_seqlen: int = 2048, eval_tokens: int | None = None) -> None:
    p.add_argument("--ppl", default="default",
                   help="perplexity text: default (the embedded Wikipedia text's held-out split), "
                        "wikitext2 (test split, needs the hub), FILE, or none (no perplexity)")
    p.add_argument("--eval-seqlen", type=int, default=eval_seqlen,
                   help="perplexity window in tokens (non-overlapping windows); the paper uses 2048")
    p.add_argument("--eval-tokens", type=int, default=eval_tokens,
                   help="use only the first N evaluation tokens (unset or 0: all of them, slow on a CPU)")
    p.add_argument("--zeroshot", default=None, help=f"comma-separated tasks, e.g. {ZEROSHOT_TASKS} (unset: none)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: the first N items per task (unset: all)")
    p.add_argument("--zeroshot-batch-size", type=int, default=None, help="default 64 on CUDA, 8 on CPU")


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


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dass import __version__

    parser = argparse.ArgumentParser(prog="dass", description="One-shot pruning of GLU language models.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"dass {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save the checkpoint", epilog=methods_help(),
                       formatter_class=HelpFormatter)
    _add_model_args(p)
    p.add_argument("--method", default="dass", metavar="NAME[:KEY=VALUE,...]",
                   help="pruning method and its options (listed below), e.g. dass:alpha=auto")
    p.add_argument("--pattern", default="2:4", help="N:M (2:4, 4:8, ...) or an unstructured ratio (0.5)")
    _add_prune_args(p)
    _add_calibration_args(p)
    p.add_argument("--output", "-o", required=True, help="output directory (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--compress", action="store_true",
                   help=f"also store every N:M matrix as {COMPRESSED_FORMAT} (as dass compress does)")
    p.add_argument("--stream", action="store_true", help="stream layers from disk (bounded memory, resumable)")
    p.add_argument("--no-resume", action="store_true", help="with --stream: start over instead of resuming")
    p.add_argument("--activations", default="auto", choices=["auto", "device", "cpu"],
                   help="where calibration activations live between layers")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy", formatter_class=HelpFormatter)
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--accelerate", action="store_true", help="run 2:4 matrices with sparse GPU kernels (CUDA only)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("verify", help="check a saved checkpoint against its manifest", formatter_class=HelpFormatter)
    p.add_argument("dir", help="a checkpoint written by dass prune (dense or compressed): every pruned matrix "
                               "is checked against dass.json (shape, sparsity, N:M groups)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compare", help="dense vs methods x patterns, one table", epilog=methods_help(),
                       formatter_class=HelpFormatter)
    _add_model_args(p)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="methods separated by ';' or ',' (a method's own options with ':', e.g. "
                        "'dense;dass:alpha=auto;wanda'); 'dense' adds the unpruned row; NAME+reconstruct a row "
                        "whose blocks are refitted with --reconstruct's settings")
    p.add_argument("--patterns", default="2:4", help="comma-separated patterns")
    _add_prune_args(p)
    p.set_defaults(reconstruct=COMPARE_RECONSTRUCT)  # for the +reconstruct rows: CPU-sized, see README
    _add_calibration_args(p, nsamples=16, seqlen=512)  # CPU-sized defaults: see README
    _add_eval_args(p, eval_seqlen=512, eval_tokens=16384)
    p.add_argument("--out", default="runs/compare", help="directory for results.json, results.md, the plot")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("compress", help=f"store a checkpoint's N:M matrices as {COMPRESSED_FORMAT}",
                       formatter_class=HelpFormatter)
    p.add_argument("dir", help="a checkpoint written by dass prune; the result still loads with "
                               "from_pretrained after import dass, and with dass eval / verify")
    p.add_argument("--output", "-o", help="write the compressed checkpoint here (default: replace DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("bench", help="speed of dense vs 2:4 kernels (GPU); options: dass bench --help", add_help=False)
    p.set_defaults(func=None)

    p = sub.add_parser("generate", help="generate() on a 2:4 model, accelerated vs dense (GPU); options: dass generate --help",
                       add_help=False)
    p.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        return cmd_bench(argparse.Namespace(), argv[1:])
    if argv and argv[0] == "generate":
        return cmd_generate(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:  # transformers >= 5.2x draws a "Loading weights" bar that ignores TQDM_DISABLE
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:
            pass
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dass: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not _user_facing(exc):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"dass: error: {msg}", file=sys.stderr)
        return 2
    finally:
        from dass.io.outputs import release_all

        release_all()  # the output locks this command took


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
