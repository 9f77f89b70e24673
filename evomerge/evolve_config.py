"""mergekit-evolve's configuration (`evol_merge_config.yml`) as an evomerge experiment: `evomerge import-evolve`.

mergekit-evolve searches one genome (a weight, and a density for TIES and DARE, per model, layer group and filter) by
CMA-ES and scores it on each lm-eval task's own evaluation split. The experiment searches the same genome with the same
defaults (CMA-ES from sigma 1/6, 100 evaluations, normalize on for ties, dare_ties and linear, bfloat16 merges);
since evomerge picks and scores its winner on documents the search never saw, each task is cut into search /
validation / test (`evaluation.cut`). Keys with no evomerge form are listed in the notes above the experiment.
"""

from __future__ import annotations

import os
from typing import Callable

from evomerge.errors import EvomergeError
from evomerge.paths import model_ref

SEARCHED = {"linear": ["weight"], "task_arithmetic": ["weight"], "ties": ["weight", "density"],
            "dare_ties": ["weight", "density"]}  # mergekit-evolve's genome per method
NORMALIZED = ("ties", "dare_ties", "linear")  # its `normalize` when the config leaves it unset
DEFAULT_CUT = {"search": 0.5, "validation": 0.25}  # of each task's evaluation split; the rest is test
ELSEWHERE = {  # keys evomerge takes elsewhere or not at all
    "num_fewshot": "set num_fewshot in the task YAML, with fewshot_split: search",
    "shuffle": "evaluation.cut shuffles the documents it cuts",
    "random_init": "the search begins at the default merge (or at space.start, a recipe)",
}


def experiment_from_evolve(doc: dict, *, num_layers: Callable[[str], int], source: str, base_dir: str | os.PathLike,
                           cut: dict | None = None) -> tuple[dict, list[str]]:
    """(experiment document, notes) for a mergekit-evolve config `doc`, its model paths relative to `base_dir` (the
    working directory, where mergekit-evolve reads them) written absolute. `num_layers(model)`: a model's layer count
    (for `layer_granularity`); `cut`: `evaluation.cut` (default DEFAULT_CUT)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("genome"), dict) or not doc.get("tasks"):
        raise EvomergeError("not a mergekit-evolve config: it needs a `genome` mapping and `tasks`", source=source)
    genome = doc["genome"]
    method, base = genome.get("merge_method"), genome.get("base_model")
    base = model_ref(base, base_dir) if isinstance(base, str) else base
    if method not in SEARCHED:
        raise EvomergeError(f"merge_method {method!r}: mergekit-evolve's genome has an evomerge form for "
                            f"{', '.join(SEARCHED)} (its slerp picks the two heaviest models per group)",
                            source=source, key="genome.merge_method")
    if genome.get("tokenizer_source"):
        raise EvomergeError("a search scores and ships its base model's tokenizer; merge with tokenizer_source after "
                            "the search (evomerge merge)", source=source, key="genome.tokenizer_source")
    if method != "linear" and base is None:
        raise EvomergeError(f"{method} needs a base_model", source=source, key="genome.base_model")
    if method == "linear" and base is not None:
        raise EvomergeError("linear takes no base_model: list every model under models", source=source,
                            key="genome.base_model")
    models = genome.get("models") or []
    if not all(isinstance(m, str) for m in models):
        raise EvomergeError("give each model as a path or a hub id", source=source, key="genome.models")
    models = [m for m in (model_ref(m, base_dir) for m in models) if m != base]  # the base adds nothing to a merge
    if not models:
        raise EvomergeError("no model to merge into the base", source=source, key="genome.models")
    low = -1.0 if genome.get("allow_negative_weights") else 0.0  # without, mergekit-evolve takes |weight|
    bounds = {"weight": [low, 1.0], **({"density": [0.0, 1.0]} if "density" in SEARCHED[method] else {})}
    space = {"kind": "ps", "method": method, **({"base_model": base} if base else {}), "models": models,
             "search": SEARCHED[method], "bounds": bounds, "dtype": "bfloat16"}
    granularity = genome.get("layer_granularity") or 0
    if not isinstance(granularity, int) or granularity < 0:
        raise EvomergeError(f"{granularity!r} is not a number of layers", source=source, key="genome.layer_granularity")
    if granularity > 0:
        layers = num_layers(base or models[0])
        if layers % granularity:
            raise EvomergeError(f"{layers} layers do not split into groups of {granularity}", source=source,
                                key="genome.layer_granularity")
        space["layer_groups"] = layers // granularity
    normalize = genome.get("normalize")
    space["fixed"] = {"normalize": bool(method in NORMALIZED if normalize is None else normalize)}
    if genome.get("filters"):
        space["split"] = list(genome["filters"])
    if genome.get("smooth"):
        space["smooth"] = True
    tasks = [{"name": t} if isinstance(t, str) else t for t in doc["tasks"]]
    if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks):
        raise EvomergeError("each task is a name or a mapping with a name", source=source, key="tasks")
    evaluation = {"tasks": [t["name"] for t in tasks], "cut": cut or DEFAULT_CUT,
                  "metrics": {t["name"]: t.get("metric", "acc,none") for t in tasks},
                  "apply_chat_template": bool(doc.get("apply_chat_template", True))}
    if evaluation["apply_chat_template"]:  # its default on, as evomerge's with a chat template; no effect without one
        evaluation["fewshot_as_multiturn"] = bool(doc.get("fewshot_as_multiturn", True))
    if any(float(t.get("weight", 1.0)) != 1.0 for t in tasks):
        evaluation["weights"] = {t["name"]: float(t.get("weight", 1.0)) for t in tasks}
    if doc.get("limit"):
        evaluation["limit"] = int(doc["limit"])
    notes = [f"{key}: {doc[key]} -- {why}" for key, why in ELSEWHERE.items() if doc.get(key)]
    return {"name": "evolve", "seed": 0, "space": space, "optimizer": {"name": "cmaes", "options": {"sigma0": 1 / 6}},
            "budget": {"trials": 100}, "evaluation": evaluation}, notes
