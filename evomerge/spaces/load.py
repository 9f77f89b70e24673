"""Space files: reading, composition (`include`), validation, and building a SearchSpace.

Composition: a mapping (a space file, or the `space:` block of an experiment file) may say `include: other.yaml`; the
included file's top-level keys are read first and this mapping's keys replace them whole (no deeper merge). Relative paths
(`include`, a `merge` recipe file, models) are relative to the file that writes them, made absolute (evomerge.paths).

Error keys: for a space inside another file (the `space:` block of an experiment), `key="space"` makes every error name
its key as written there (`space.bounds.weight`), so the user finds it in that file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Union

from pydantic import ValidationError

from evomerge.errors import EvomergeError, did_you_mean, read_yaml
from evomerge.paths import absolute, model_ref
from evomerge.recipe import MERGED, format_validation_error
from evomerge.spaces.base import SearchSpace
from evomerge.spaces.dfs import DataFlowSpace, DFSConfig, merge_stage
from evomerge.spaces.ps import ParameterSpace, PSConfig

SpaceConfig = Union[PSConfig, DFSConfig]
KINDS = {"ps": (PSConfig, ParameterSpace), "dfs": (DFSConfig, DataFlowSpace)}


def _read(path: Path, source: str, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in seen:
        raise EvomergeError(f"include cycle through {path}", source=source, key="include")
    doc = read_yaml(path, f"space file {path}", source)
    if not isinstance(doc, dict):
        raise EvomergeError("a space file must be a mapping", source=str(path))
    return _compose(doc, path.parent, source, seen + (path.resolve(),))


def _compose(doc: Mapping, base_dir: Path, source: str, seen: tuple[Path, ...] = ()) -> dict:
    doc = _absolute_models(doc, base_dir)
    for key in ("include", "merge", "start"):
        if isinstance(doc.get(key), str):
            doc[key] = absolute(doc[key], base_dir)
    if "include" in doc:
        included = doc.pop("include")
        doc = {**_read(Path(included), source, seen), **doc}
    return doc


def _absolute_models(doc: Mapping, base_dir: Path) -> dict:
    """The model references of a space or inline recipe document (`base_model`, `models`, `pin`, mergekit's `model`
    and `slices`, an inline `merge`) resolved against `base_dir`; `merged` and tokenizer choices stay."""
    out = dict(doc)
    for key, value in doc.items():
        words = (MERGED, "base", "union") if key == "tokenizer_source" else (MERGED,)  # a model dir may be named base
        if key in ("base_model", "model", "pin", "tokenizer_source") and isinstance(value, str) and value not in words:
            out[key] = model_ref(value, base_dir)
        elif key in ("models", "slices", "sources") and isinstance(value, list):
            out[key] = [_absolute_models(v, base_dir) if isinstance(v, Mapping) else
                        model_ref(v, base_dir) if isinstance(v, str) and v != MERGED else v for v in value]
        elif key == "merge" and isinstance(value, Mapping):
            out[key] = _absolute_models(value, base_dir)
    return out


def load_space_config(spec: str | os.PathLike | Mapping, *, source: str | None = None,
                      base_dir: str | os.PathLike = ".", key: str | None = None) -> SpaceConfig:
    """A validated space config from a file path, or from a mapping whose relative paths are relative to `base_dir`.
    `key`: where the space sits in `source` (see the module doc)."""
    source = source or ("<space>" if isinstance(spec, Mapping) else str(spec))
    with keys_under(key, source):
        doc = _compose(spec, Path(base_dir), source) if isinstance(spec, Mapping) else _read(Path(spec), source)
        kind = doc.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            raise EvomergeError(f"unknown space kind {kind!r}; {did_you_mean(str(kind), KINDS)}", source=source,
                                key="kind")
    try:
        return KINDS[kind][0].model_validate(doc)
    except ValidationError as err:  # located under `key` here: all errors at once, each at its own key
        raise format_validation_error(err, source, key=key, fields=KINDS[kind][0].model_fields) from None


def build_space(config: SpaceConfig, *, num_layers: Mapping[str, int], source: str = "<space>",
                key: str | None = None) -> SearchSpace:
    """`num_layers`: the layer count of every model the space names (see `space_models`), read from the models."""
    with keys_under(key, source):
        return KINDS[config.kind][1](config, num_layers=num_layers, source=source)


def space_models(config: SpaceConfig, *, source: str = "<space>", key: str | None = None) -> list[str]:
    """The models whose layer counts `build_space` needs (a PS+DFS space: also those of its merge stage)."""
    if isinstance(config, PSConfig):
        return config.referenced_models()
    with keys_under(key, source):
        stage = merge_stage(config, source)
    names = [m for m in config.models if m != MERGED] + (stage.referenced_models() if stage else [])
    return list(dict.fromkeys(names))


@contextmanager
def keys_under(key: str | None, source: str):
    """Errors about `source` name their keys under `key` (`bounds.weight` -> `space.bounds.weight`); others pass."""
    try:
        yield
    except EvomergeError as err:
        if not key or err.source != source:
            raise
        raise EvomergeError(err.message, source=source, key=f"{key}.{err.key}" if err.key else key) from None


def space_from_yaml(path: str | os.PathLike, *, num_layers: Mapping[str, int]) -> SearchSpace:
    return build_space(load_space_config(path), num_layers=num_layers, source=str(path))


def space_from_dict(doc: Mapping, *, num_layers: Mapping[str, int], source: str = "<space>",
                    base_dir: str | os.PathLike = ".", key: str | None = None) -> SearchSpace:
    config = load_space_config(doc, source=source, base_dir=base_dir, key=key)
    return build_space(config, num_layers=num_layers, source=source, key=key)
