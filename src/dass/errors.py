"""The one base class of every error a user can cause.

The CLI catches :class:`DassError` and prints its first line as ``dass: error: ...`` with
exit status 2; anything else is a bug and keeps its traceback. Each layer defines its own
subclasses (``PatternError`` in the maths, ``MethodError`` in the methods, ...), so a caller
can catch one kind or all of them. Subclasses also derive from ``ValueError`` or
``RuntimeError`` where they did before, so code that caught those keeps working.
"""

from __future__ import annotations


class DassError(Exception):
    """Base of every error caused by the user's input, files or machine (not by a bug)."""


class UserValueError(DassError, ValueError):
    """A bad value given by the user (an option, a pattern, a file's content)."""


class UserRuntimeError(DassError, RuntimeError):
    """The machine or the environment cannot do what was asked (no GPU, solver failure)."""
