"""The ``dass`` console script. Thin: parses arguments, calls the library, prints.

Every error a user can cause (a bad pattern, a missing file, an output that exists, a
model without a GLU MLP) ends in one line on stderr and exit status 2, with no traceback;
``--debug`` shows the traceback.

The package: :mod:`~dass.cli.args` builds the parser, :mod:`~dass.cli.commands` runs each
subcommand, and :func:`main` (here) ties them together; ``dass.cli`` re-exports the names
both define.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from dass.cli.args import (
    COMPARE_RECONSTRUCT,
    COMPRESSED_FORMAT,
    DEFAULT_METHODS,
    ZEROSHOT_TASKS,
    HelpFormatter,
    build_parser,
    methods_help,
)
from dass.cli.commands import (
    cmd_bench,
    cmd_compare,
    cmd_compress,
    cmd_eval,
    cmd_generate,
    cmd_prune,
    cmd_verify,
    method_from_args,
)
from dass.errors import DassError, UserValueError

__all__ = [
    "COMPARE_RECONSTRUCT",
    "COMPRESSED_FORMAT",
    "DEFAULT_METHODS",
    "USER_FILE_ERRORS",
    "ZEROSHOT_TASKS",
    "HelpFormatter",
    "UsageError",
    "build_parser",
    "cmd_bench",
    "cmd_compare",
    "cmd_compress",
    "cmd_eval",
    "cmd_generate",
    "cmd_prune",
    "cmd_verify",
    "main",
    "method_from_args",
    "methods_help",
]

# The private helpers, for code that took them from the single-module CLI.
from dass.cli.args import _add_calibration_args, _add_eval_args, _add_model_args, _add_prune_args  # noqa: E402,F401
from dass.cli.commands import (  # noqa: E402,F401
    _calibration_spec,
    _device,
    _evaluate,
    _load,
    _log,
    _prune_streaming,
    _reconstruct,
)


class UsageError(UserValueError):
    """A command-line mistake."""


#: OS errors a user causes by naming files: shown as one line like :class:`DassError`.
USER_FILE_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _user_facing(exc: BaseException) -> bool:
    """Every error a user can cause derives from :class:`dass.errors.DassError` (or is a
    file the user named that is missing, exists or cannot be written); anything else is
    a bug and keeps its traceback."""
    return isinstance(exc, (DassError, *USER_FILE_ERRORS))


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
