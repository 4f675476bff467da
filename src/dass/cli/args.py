"""The ``dass`` command line's arguments: the parser, its subcommands and their options,
and the help text listing every method. Kept apart from what the commands do
(:mod:`dass.cli.commands`) so each file stays short.
"""

from __future__ import annotations

import argparse

from dass.cli.commands import cmd_compare, cmd_compress, cmd_eval, cmd_prune, cmd_verify

DEFAULT_METHODS = "dense,dass,wanda,sparsegpt,magnitude,dass+reconstruct"
#: ``dass compare``'s reconstruction for rows named METHOD+reconstruct, sized like its other
#: defaults for a 2-core CPU (docs/ablation.md, "Reconstruction"); ``dass prune
#: --reconstruct`` defaults to the full setting (500 steps of 4096 tokens).
COMPARE_RECONSTRUCT = "steps=25,batch_tokens=1024"
ZEROSHOT_TASKS = "piqa,hellaswag,winogrande,arc_easy,arc_challenge"


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
