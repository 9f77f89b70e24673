"""Every shipped experiment config validates (the real-model ones without touching the hub)."""

from pathlib import Path

import pytest

from evomerge.run.config import load_experiment

EXPERIMENTS = sorted((Path(__file__).parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_validates(path):
    experiment = load_experiment(path)
    assert experiment.budget.trials >= 1 and experiment.space
