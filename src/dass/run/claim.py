"""Claiming an output for a whole run, in one process or under torchrun.

:func:`claim_output` checks the output (:func:`dass.io.outputs.check_output`) and takes
its lock before any work. Under torch.distributed only rank 0 takes the lock (it covers
the other ranks' ``OUT.rankN.partial`` folders too); rank 0's verdict is broadcast, so
every rank fails at once, with the same line, when another run holds the output.
:func:`guarded_run` applies the same to a function that takes a source and an output
(:func:`dass.run.streaming.prune_checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Any, Callable, Iterable, Iterator, TypeVar

from dass.errors import DassError
from dass.io import outputs
from dass.run import distributed

F = TypeVar("F", bound=Callable[..., Any])


class ClaimError(outputs.OutputError):
    """Rank 0 could not claim the output (the other ranks' view of its error)."""


def claim_output(out: str | os.PathLike, *, overwrite: bool, sources: Iterable[Any] = ()) -> None:
    """Check ``out`` and take its lock (rank 0), or raise on every rank. Held until
    :func:`release_output` or :func:`dass.io.outputs.release_all` (or process exit)."""
    ctx = distributed.current()
    error: DassError | None = None
    if ctx.is_main:
        try:
            outputs.acquire(out)  # first: the check below then sees what no other run can change
        except DassError as exc:
            error = exc
        else:
            try:
                outputs.check_output(out, overwrite=overwrite, sources=list(sources))
            except DassError as exc:
                outputs.release(out)
                error = exc
    if ctx.enabled:
        import torch.distributed as dist

        verdict = [None if error is None else str(error)]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None and error is None:
            error = ClaimError(verdict[0])
    if error is not None:
        raise error


def release_output(out: str | os.PathLike) -> None:
    if distributed.current().is_main:
        outputs.release(out)


@contextlib.contextmanager
def claimed(out: str | os.PathLike, *, overwrite: bool, sources: Iterable[Any] = ()) -> Iterator[None]:
    claim_output(out, overwrite=overwrite, sources=sources)
    try:
        yield
    finally:
        release_output(out)


def guarded_run(source: str, output: str, overwrite: str = "overwrite", stream: bool = True) -> Callable[[F], F]:
    """Decorate a run taking a source model folder (parameter ``source``) and an output
    (``output``): the source is checked (:func:`dass.run.preflight.check_model_dir`), the
    output checked and claimed for the duration of the call."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            from dass.run.preflight import check_model_dir

            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            src, out = bound.arguments[source], bound.arguments[output]
            check_model_dir(os.fspath(src), stream=stream)
            with claimed(out, overwrite=bool(bound.arguments[overwrite]), sources=[src]):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
