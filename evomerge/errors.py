"""User-facing errors: one line that names the file and the key or value at fault.

The CLI prints `str(error)` and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """Bad input from the user (config, recipe, model dir, run dir)."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.message, self.source, self.key = message, source, key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


def did_you_mean(name: str, options) -> str:
    """'did you mean X? available: a, b, c' for a wrong registry name."""
    import difflib

    options = sorted(options)
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}available: {', '.join(options)}"
