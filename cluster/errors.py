"""Errors a user can act on. Every stage raises these with a message that says what and where;
entry points print it as one line and exit non-zero instead of a traceback.
"""

from __future__ import annotations


class JobError(RuntimeError):
    """A job failed for a reason the user can act on; the message says what and where."""


class CorpusError(ValueError):
    """Bad corpus input; the message names the file (or source) and the reason."""
