"""Ask/tell optimizers over a box with explicit, picklable state: CMA-ES (pycma), Optuna samplers, random search."""

from evomerge.optim.base import Candidate, Optimizer, Result, load_optimizer, non_dominated, save_optimizer
from evomerge.optim.registry import OPTIMIZERS, make_optimizer, options_schema

__all__ = ["Candidate", "Optimizer", "Result", "OPTIMIZERS", "make_optimizer", "options_schema", "load_optimizer",
           "save_optimizer", "non_dominated"]
