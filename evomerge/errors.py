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


def read_yaml(path, what: str, source: str | None = None, *, documents: bool = False):
    """The document in the YAML file `path` (`documents`: the list of all of them). A file that cannot be read is
    "cannot read {what} (...)" under `source` (default: the file); one that does not parse, "invalid YAML: ..."."""
    from pathlib import Path

    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise EvomergeError(f"cannot read {what} ({err.strerror})", source=source or str(path)) from None
    try:
        return list(yaml.safe_load_all(text)) if documents else yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise EvomergeError(f"invalid YAML: {str(err).splitlines()[0]}", source=str(path)) from None
