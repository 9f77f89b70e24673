"""Every shipped experiment config validates (the real-model ones without touching the hub)."""

from pathlib import Path

import pytest

from evomerge.run.config import load_experiment

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_validates(path):
    experiment = load_experiment(path)
    assert experiment.budget.trials >= 1 and experiment.space


def test_objectives_name_tasks_the_evaluator_scores():
    """An objective is a per-task score, named as lm-eval names the (leaf) tasks of `evaluation.tasks`."""
    from evomerge.evaluate.tasks import load_tasks

    multi = [e for e in map(load_experiment, EXPERIMENTS) if e.evaluation.objectives]
    assert multi  # toy_nsga2.yaml
    for e in multi:
        leaves = load_tasks(e.evaluation.tasks, e.evaluation.task_dirs, network=e.evaluation.network)["tasks"]
        assert set(e.evaluation.objectives) <= set(leaves), e.name
