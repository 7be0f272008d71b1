"""The one base class of prolip's user-facing errors (importable without torch).

Every error that means "your input or environment is wrong" derives from :class:`ProlipError` (and keeps the
built-in class it always had, so ``except ValueError`` and the like still catch it); its message names the file,
class or value at fault. The CLI shows a ``ProlipError`` as one line, with the option that fixes it when the error
declares one; any other exception is a bug.
"""

from __future__ import annotations


class ProlipError(Exception):
    """Bad input or environment, said in one line that names what is at fault."""

    option: str | None = None  # the command-line option that fixes it, when exactly one does

    def __init__(self, *args: object, option: str | None = None):
        super().__init__(*args)
        if option is not None:  # else the class's own (CacheError: --cache-dir)
            self.option = option


class RunError(ProlipError, ValueError):
    """A run directory that is missing, incomplete, damaged or of an unknown format, or a run applied where it does
    not fit (other weights, a method without what is asked of it); names the file and key. Here rather than in
    :mod:`prolip.run` because applying a run (:mod:`prolip.inference`) raises it too, and ``Run`` calls that."""
