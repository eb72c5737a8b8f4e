"""What every entry point shares: parse `--config/--set`, print the resolved config, connect to
Ray, run, write summary.json and print its path as the last line. Known bad input exits non-zero
with one clear message instead of a traceback."""

from __future__ import annotations


class JobError(RuntimeError):
    """A job failed for a reason the user can act on; the message says what and where."""


class CorpusError(ValueError):
    """Bad corpus input; the message names the file (or source) and the reason."""
