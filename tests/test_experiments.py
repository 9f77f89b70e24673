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
    """The paper config's own task (experiments/tasks/mgsm_ja_split.yaml) passes the checks of `evomerge search`: the
    hub's MGSM-ja test split (stood in by a local dataset of its schema: the hub is not reachable here) is cut into
    search / validation / test of 100 / 50 / 100 disjoint questions, the same cut on every load, with lm-eval's
    mgsm_direct_ja prompt and target."""
    import datasets

    from evomerge.evaluate.harness import HarnessEvaluator
    from evomerge.run.evaluation import check_tasks

    hub = datasets.Dataset.from_list([{"question": f"りんごが{i}個あります。", "answer": None, "answer_number": i,
                                       "equation_solution": None} for i in range(250)])
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: asked.append((args, kwargs)) or hub)
    path = Path(__file__).parents[1] / "experiments" / "paper_mistral7b_ps.yaml"
    experiment = load_experiment(path)
    check_tasks(experiment.evaluation, str(path), experiment.optimizer.name)
    assert asked[0] == (("juletxara/mgsm", "ja"), {"split": "test"})
    c = experiment.evaluation
    numbers = {}
    for split in ("search", "validation", "test"):
        evaluator = HarnessEvaluator(c.tasks, None, split=split, task_dirs=c.task_dirs)
        task = evaluator.tasks["mgsm_ja_split"]
        docs = list(task.eval_docs)
        numbers[split] = [d["answer_number"] for d in docs]
        assert task.doc_to_text(docs[0]) == f"問題： りんごが{docs[0]['answer_number']}個あります。\nAnswer:"
        assert task.doc_to_target(docs[0]) == str(docs[0]["answer_number"])
    assert {s: len(n) for s, n in numbers.items()} == {"search": 100, "validation": 50, "test": 100}
    assert sorted(sum(numbers.values(), [])) == list(range(250))  # disjoint, and every question used
    again = HarnessEvaluator(c.tasks, None, split="search", task_dirs=c.task_dirs, metrics=c.metrics)
    assert [d["answer_number"] for d in again.tasks["mgsm_ja_split"].eval_docs] == numbers["search"]
    assert again.metrics == {"mgsm_ja_split": ("exact_match", "flexible-extract")}  # the answer's last number
