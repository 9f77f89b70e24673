"""Every shipped experiment config validates (the real-model ones without touching the hub)."""

from pathlib import Path

import pytest

from evomerge.run.config import load_experiment

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_validates(path):
    experiment = load_experiment(path)
    assert experiment.budget.trials >= 1 and experiment.space


def model_refs(node) -> list[str]:
    """Every `base_model` and `models` entry in a (dumped) config."""
    if isinstance(node, list):
        return [ref for item in node for ref in model_refs(item)]
    if not isinstance(node, dict):
        return []
    refs = [node["base_model"]] if isinstance(node.get("base_model"), str) else []
    for model in node.get("models") or []:
        refs.append(model if isinstance(model, str) else model["model"])
    return refs + [ref for key, value in node.items() if key not in ("base_model", "models") for ref in model_refs(value)]


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if p.name.startswith("toy_")], ids=lambda p: p.name)
def test_toy_experiment_names_the_zoo_relative_to_its_file(path):
    """A path is relative to the file that writes it, so `evomerge search experiments/x.yaml` works from any directory
    (a path that names nothing would be taken for a hub id)."""
    refs = [r for r in model_refs(load_experiment(path).model_dump()) if r != "merged"]
    assert refs and all(Path(r).is_absolute() and (Path(r) / "config.json").is_file() for r in refs), refs


def test_objectives_name_tasks_the_evaluator_scores():
    """An objective is a per-task score, named as lm-eval names the (leaf) tasks of `evaluation.tasks`."""
    from evomerge.evaluate.tasks import load_tasks

    multi = [e for e in map(load_experiment, EXPERIMENTS) if e.evaluation.objectives]
    assert multi  # toy_nsga2.yaml
    for e in multi:
        leaves = load_tasks(e.evaluation.tasks, e.evaluation.task_dirs, network=e.evaluation.network)["tasks"]
        assert set(e.evaluation.objectives) <= set(leaves), e.name
