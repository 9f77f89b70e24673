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


def test_the_paper_experiment_scores_mgsm_ja_on_three_disjoint_splits(monkeypatch):
    """The paper config's task, lm-eval's own mgsm_direct_ja, passes the checks of `evomerge search`: the hub's MGSM-ja
    (stood in by a local dataset of its schema: the hub is not reachable here) has its 250 test questions cut by
    `evaluation.cut` into search / validation / test of 100 / 50 / 100 disjoint questions, as the numpy permutation of
    seed 0 orders them, with mgsm_direct_ja's prompt and target, scored by the answer's last number."""
    import datasets
    import numpy as np

    from evomerge.evaluate.harness import HarnessEvaluator
    from evomerge.run.evaluation import check_tasks

    def questions(numbers):
        return datasets.Dataset.from_list([{"question": f"りんごが{i}個あります。", "answer": None, "answer_number": i,
                                            "equation_solution": None} for i in numbers])

    hub = datasets.DatasetDict({"train": questions(range(1000, 1008)), "test": questions(range(250))})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: asked.append(kwargs) or hub)
    path = Path(__file__).parents[1] / "experiments" / "paper_mistral7b_ps.yaml"
    experiment = load_experiment(path)
    c = experiment.evaluation
    check_tasks(c, str(path), experiment.optimizer.name)
    assert (asked[0]["path"], asked[0]["name"]) == ("juletxara/mgsm", "ja")
    evaluator = HarnessEvaluator(c.tasks, None, split="search", network=c.network, cut=c.cut.model_dump(),
                                 metrics=c.metrics)
    task = evaluator.tasks["mgsm_direct_ja"]
    order = np.random.default_rng(0).permutation(250)
    for split, indices in {"search": order[:100], "validation": order[100:150], "test": order[150:]}.items():
        assert [d["answer_number"] for d in task.dataset[split]] == indices.tolist(), split
    doc = next(iter(task.eval_docs))
    assert task.doc_to_text(doc) == f"問題： りんごが{doc['answer_number']}個あります。\nAnswer:"
    assert task.doc_to_target(doc) == str(doc["answer_number"])
    assert evaluator.metrics == {"mgsm_direct_ja": ("exact_match", "flexible-extract")}  # the answer's last number