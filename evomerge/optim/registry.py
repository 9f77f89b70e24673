"""Optimizers by name; each constructor's keyword-only options (with their annotations) are its config schema."""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Mapping

from pydantic import ConfigDict, ValidationError, create_model

from evomerge.errors import EvomergeError, did_you_mean
from evomerge.optim.base import Optimizer
from evomerge.optim.cma_es import CMAES
from evomerge.optim.niches import NaturalNiches
from evomerge.optim.optuna_samplers import NSGA2, TPE, OptunaCMAES
from evomerge.optim.random_search import RandomSearch

OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (CMAES, TPE, OptunaCMAES, NSGA2, RandomSearch,
                                                                     NaturalNiches)}
COMMON = ("seed", "n_objectives", "x0", "anchors", "run_dir")  # given by the run, not by the optimizer's config


def options_schema(cls: type[Optimizer]):
    """A pydantic model of the options `cls` takes (its own and its parents' keyword-only parameters, less COMMON)."""
    fields = {}
    for klass in reversed(cls.__mro__):
        if "__init__" not in vars(klass) or not issubclass(klass, Optimizer):
            continue
        hints = typing.get_type_hints(klass.__init__, include_extras=True)
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in COMMON:
                fields[p.name] = (hints[p.name], p.default)
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid"), **fields)


def make_optimizer(name: str, lower, upper, *, seed: int = 0, n_objectives: int = 1, x0=None, anchors=(),
                   run_dir: str | os.PathLike | None = None, options: Mapping | None = None,
                   source: str | None = None) -> Optimizer:
    """`options` come from the user's config (checked, errors name `optimizer.<key>`); the rest from the run."""
    if name not in OPTIMIZERS:
        raise EvomergeError(f"unknown optimizer {name!r}; {did_you_mean(name, OPTIMIZERS)}", source=source, key="optimizer")
    cls = OPTIMIZERS[name]
    try:
        checked = options_schema(cls).model_validate(dict(options or {}))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown option" if first["type"] == "extra_forbidden" else first["msg"]
        raise EvomergeError(f"{msg} (options of {name}: {', '.join(options_schema(cls).model_fields) or 'none'})",
                            source=source, key=f"optimizer.{loc}") from None
    return cls(lower, upper, seed=seed, n_objectives=n_objectives, x0=x0, anchors=anchors, run_dir=run_dir,
               **dict(checked))
