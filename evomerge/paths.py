"""Paths written in a file mean paths relative to that file: resolved once, when the file is read, to absolute ones.

So a frozen config names the same files from any working directory. A model reference that names nothing there and
reads as a Hugging Face Hub repo id (`org/name`, or `org/name@revision`: a branch, tag or commit) stays as written: it is
fetched from the hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?(@[^@\s]+)?")  # org/name, pinned as org/name@revision (mergekit's)


def absolute(path: str | os.PathLike, base_dir: str | os.PathLike) -> str:
    """`path` against `base_dir` (an absolute path stays), normalized; `~` expanded."""
    return os.path.normpath(os.path.abspath(Path(base_dir) / Path(path).expanduser()))


def model_ref(ref: str, base_dir: str | os.PathLike) -> str:
    """A model as written in a file in `base_dir`: an absolute local path, or a hub repo id; `model+adapter` (a LoRA
    adapter applied to the model, models/lora.py) each part so."""
    local = absolute(ref, base_dir)
    if "+" in ref and not Path(local).exists():
        model, adapter = ref.rsplit("+", 1)
        return f"{model_ref(model, base_dir)}+{model_ref(adapter, base_dir)}"
    if Path(ref).expanduser().is_absolute() or Path(local).exists() or not HUB_ID.fullmatch(ref):
        return local
    return ref
