"""The experiment file: what to search (space), how (optimizer, budget, workers), and how to score (evaluation).

    name: toy_ps
    seed: 0
    space: {include: ../search_spaces/ties_per_model.yaml, base_model: zoo/base, models: [zoo/a, zoo/b]}
    optimizer: {name: cmaes, options: {sigma0: 0.2}}
    budget: {trials: 60}
    evaluation: {tasks: [skill_a, skill_b], limit: 64}   # read by the evaluator factory, not by the loop
    workers: {backend: ray, num: 2}
    validation: {top_k: 3}

Several objectives (a multi-objective optimizer: nsga2, tpe, random): `optimizer: {name: nsga2}` and
`evaluation: {tasks: [skill_a, skill_b], objectives: [skill_a, skill_b]}` (names as the evaluator's per-task scores).

Defaults live here. `load_experiment` resolves the space (includes, relative paths) so the frozen copy written into the
run directory stands alone: every relative path (models, `include`, a `merge` recipe file, `evaluation.task_dirs`) is
relative to the experiment file (or to the space file that writes it) and frozen absolute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import EvomergeError, did_you_mean, read_yaml
from evomerge.paths import absolute
from evomerge.recipe import format_validation_error


def batch_size(value: Any) -> int | str:
    """Documents per forward pass: 'auto' (lm-eval's probe) or a whole number >= 1 (also as text, from the CLI)."""
    number = int(value) if isinstance(value, str) and value.isdigit() else value
    if number == "auto" or (isinstance(number, int) and not isinstance(number, bool) and number >= 1):
        return number
    raise ValueError(f"must be a whole number >= 1 or auto, got {value!r}")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(_Schema):
    name: str = "cmaes"
    options: dict[str, Any] = Field(default_factory=dict)  # checked against the optimizer's own schema (optim.registry)


class BudgetConfig(_Schema):
    trials: int = Field(ge=1)  # search-split evaluations, exactly (a CMA-ES generation past the budget is cut)
    # Wall-clock hours after which a search (or a resume) asks for no new candidate: the trials in flight finish, and
    # budget.trials becomes the candidates run (frozen in the run dir, so the run is the one that budget makes).
    hours: float | None = Field(None, gt=0)
    # Stop the run (exit 2, resumable) when this many trials fail in a row: a cause outside the candidates (a package,
    # a data file, a service) fails them all alike. 0: never stop.
    max_consecutive_failures: int = Field(10, ge=0)


HELD_OUT = ("validation", "test")  # the splits the search never sees (see run.loop)


class RacingConfig(_Schema):
    """Score a search candidate on the first `first` of the documents, then twice that, ...; stop once an exact test
    says its full-set fitness is below the validation.top_k-th best fully scored one: a candidate that would reach
    that is stopped with probability <= delta over all the stages (evaluate.racing)."""
    first: float = Field(0.1, gt=0, lt=1)
    delta: float = Field(0.05, gt=0, lt=1)  # the README measures 0.05 and 0.2


class CutConfig(_Schema):
    """Each task's `split` (default: its own test split) cut into `search` and `validation` documents and the rest
    `test`, shuffled by `seed` (evaluate.tasks.cut_split): any lm-eval task, built-in ones included, without a copy.
    A count, or a share of the split below 1 (0.2: a fifth; for a group whose tasks differ in size)."""
    search: float
    validation: float
    seed: int = 0
    split: str | None = None

    @field_validator("search", "validation")
    @classmethod
    def _count_or_share(cls, n: float) -> int | float:
        if 0 < n < 1 or (n >= 1 and float(n).is_integer()):
            return n if n < 1 else int(n)
        raise ValueError(f"a number of documents (1, 2, ...) or a share of the split between 0 and 1, not {n}")


class EvaluationConfig(_Schema):
    tasks: list[str] = Field(default_factory=list)
    split: str = "search"
    limit: int | None = Field(None, ge=1)  # samples per task on the search split
    weights: dict[str, float] | None = None  # task weights; None: every task weighs 1
    # {task or group: "metric" or "metric,filter"} (lm-eval's result key): a task's score; default its first metric
    # under its first filter (e.g. gsm8k: exact_match,strict-match; "exact_match,flexible-extract" takes the other)
    metrics: dict[str, str] | None = None
    # fitness from the task scores: weighted mean; min (the weakest task with weight > 0); geometric (weighted geometric
    # mean of score + 0.01, less 0.01: evaluate.result.aggregate) -- min and geometric ask for every skill
    aggregate: Literal["mean", "min", "geometric"] = "mean"
    racing: RacingConfig | None = None  # None: every search candidate is scored on every document
    # Multi-objective search: each name is a task whose score (per-task scores, as the evaluator names them) is one
    # maximized objective. None: one objective, the fitness. Elites and winner still rank by fitness (see run.loop).
    objectives: list[str] | None = Field(None, min_length=1)
    task_dirs: list[str] = Field(default_factory=list)  # user lm-eval task dirs, besides evomerge's evals/
    network: bool = False  # allow lm-eval's built-in tasks (their data is downloaded: needs network)
    cut: CutConfig | None = None  # None: the tasks bring their search, validation and test splits
    # Documents per forward pass; auto: the largest lm-eval's probe fits (at most 64), found once per worker. Out of
    # memory inside an evaluation halves it and scores the candidate again (evaluate.harness).
    batch_size: int | Literal["auto"] = 64
    # Prompts through the chat template of the tokenizer the search scores with (the base's, which the winners ship),
    # as lm-eval's apply_chat_template; system_instruction: a system message first (plain text without a template).
    apply_chat_template: bool = False
    system_instruction: str | None = None
    # few-shot examples as turns of the conversation (lm-eval's); default: with apply_chat_template, as lm-eval's CLI
    fewshot_as_multiturn: bool | None = None

    @field_validator("split")
    @classmethod
    def _not_held_out(cls, split):
        if split in HELD_OUT:
            raise ValueError(f"the search cannot score on {split!r}: validation picks the winner and test scores it "
                             "once, so neither may guide the search (use search, or another split of your tasks)")
        return split

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value):
        return batch_size(value)

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, objectives):
        if objectives is not None and len(set(objectives)) != len(objectives):
            raise ValueError("a task is listed twice")
        return objectives


class WorkersConfig(_Schema):
    backend: Literal["local", "ray"] = "local"
    num: int = Field(1, ge=1)  # candidates in flight; part of the search's determinism (see loop)
    # candidate: results are told in candidate order (reproducible; a worker can wait for an earlier, slower candidate);
    # arrival: told as they come, so no worker waits on TPE or random search (TPE's run then depends on worker timing)
    tell_order: Literal["candidate", "arrival"] = "candidate"
    device: str = "cpu"
    cpus: int = Field(1, ge=1)  # CPU cores a Ray worker reserves; torch runs that many threads in each worker
    dtype: str | None = None  # compute dtype of the live models; None: the sources' (float32 if they differ), frozen
    ray_address: str | None = None  # join a running cluster; None starts a local one
    # Where a worker keeps the merge's source tensors (run.memory): device (resident on it), host (in host memory, each
    # tensor's inputs copied to the device as the merge reaches it), disk (the memory-mapped files, read per tensor: the
    # workers of a node share one copy through the page cache), auto (device when it fits, else host; on CPU host).
    sources: Literal["device", "host", "disk", "auto"] = "auto"
    # The memory of one worker's device the plan assumes, e.g. 40GB (K, M, G = powers of 2); None: measured (CUDA: the
    # device's total memory; CPU: this machine's RAM shared equally by the workers).
    device_memory: int | None = None
    compile: bool = False  # the merge's element-wise math under torch.compile (evomerge/merge/compiled.py)

    @field_validator("device_memory", mode="before")
    @classmethod
    def _size(cls, value):
        from evomerge.sizes import parse_size

        return None if value is None else parse_size(value)


class ValidationConfig(_Schema):
    top_k: int = Field(3, ge=0)  # elites re-scored on validation; 0: the winner is the best on search


class Experiment(_Schema):
    name: str = Field(min_length=1)
    seed: int = 0
    space: dict[str, Any]  # a space document (see evomerge.spaces.load); resolved by load_experiment
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: BudgetConfig
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# Settings of where the search runs, not of what it finds: a resume may change them.
RUNTIME_KEYS = ("workers.backend", "workers.device", "workers.cpus", "workers.ray_address", "workers.sources",
                "workers.device_memory")


def experiment_from_dict(doc: Any, *, source: str = "<experiment>", base_dir: str | os.PathLike = ".") -> Experiment:
    """A validated experiment whose space is resolved: includes read, relative paths made absolute, defaults filled in."""
    from evomerge.spaces import load_space_config

    if not isinstance(doc, dict):
        raise EvomergeError("an experiment file must be a mapping", source=source)
    try:
        experiment = Experiment.model_validate(doc)
    except ValidationError as err:
        raise format_validation_error(err, source) from None
    space = load_space_config(experiment.space, source=source, base_dir=base_dir, key="space")
    _check_optimizer(experiment.optimizer, source)
    _check_objectives(experiment, source)
    task_dirs = [absolute(d, base_dir) for d in experiment.evaluation.task_dirs]  # relative to the file, as models
    evaluation = experiment.evaluation.model_copy(update={"task_dirs": task_dirs})
    return experiment.model_copy(update={"space": space.model_dump(mode="json"), "evaluation": evaluation})


def _check_optimizer(config: OptimizerConfig, source: str) -> None:
    """Name and options, now rather than when the search starts (messages as make_optimizer's)."""
    from evomerge.optim import OPTIMIZERS, options_schema

    if config.name not in OPTIMIZERS:
        raise EvomergeError(f"unknown optimizer {config.name!r}; {did_you_mean(config.name, OPTIMIZERS)}", source=source,
                            key="optimizer.name")
    schema = options_schema(OPTIMIZERS[config.name])
    try:
        schema.model_validate(config.options)
    except ValidationError as err:
        first = err.errors()[0]
        msg = "unknown option" if first["type"] == "extra_forbidden" else first["msg"]
        raise EvomergeError(f"{msg} (options of {config.name}: {', '.join(schema.model_fields) or 'none'})", source=source,
                            key="optimizer.options." + ".".join(str(p) for p in first["loc"])) from None


def _check_objectives(experiment: Experiment, source: str) -> None:
    from evomerge.optim import OPTIMIZERS

    name = experiment.optimizer.name
    if experiment.evaluation.objectives and not OPTIMIZERS[name].multi_objective:
        multi = sorted(n for n, cls in OPTIMIZERS.items() if cls.multi_objective)
        raise EvomergeError(f"optimizer {name} takes one objective; use one of {', '.join(multi)}, or drop objectives "
                            "(the search then maximizes the fitness)", source=source, key="evaluation.objectives")
    if experiment.evaluation.objectives and experiment.evaluation.racing is not None:
        raise EvomergeError("racing stops a candidate whose fitness cannot reach the top k, but with objectives one "
                            "below them may be on the Pareto front; drop racing or objectives", source=source,
                            key="evaluation.racing")


def load_experiment(path: str | os.PathLike) -> Experiment:
    path = Path(path)
    doc = read_yaml(path, "experiment file")
    return experiment_from_dict(doc, source=str(path), base_dir=path.parent)


def differences(a: Experiment, b: Experiment, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ, as 'key: a -> b'."""

    def flat(value, prefix=""):
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: value}

    fa, fb = flat(a.model_dump(mode="json")), flat(b.model_dump(mode="json"))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(fa.keys() | fb.keys())
            if k not in ignore and fa.get(k) != fb.get(k)]
