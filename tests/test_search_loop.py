"""The search loop end to end on tiny models, with an evaluator whose optimum is known.

fitness(theta) = -sum_params ||theta - target||^2 with target = base + 0.7 (ft1 - base) + 0.2 (ft2 - base): a
task_arithmetic merge with weights (0.7, 0.2) reaches fitness 0, so the search has a real optimum to find.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.optim import load_optimizer
from evomerge.recipe import load_recipe
from evomerge.run.config import experiment_from_dict, load_experiment
from evomerge.run.evaluation import Evaluation
from evomerge.run.ledger import Ledger
from evomerge.run.loop import resume, search
from evomerge.run.pool import LocalPool, RunnerSpec
from evomerge.run.rundir import RunDir

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny, make_variants  # noqa: E402

TARGET_WEIGHTS = (0.7, 0.2)


class DistanceEvaluator:
    """-||theta - target||^2 over the live model's parameters; optionally slow, or raising on chosen calls."""

    def __init__(self, base: str, experts: list[str], delay: float = 0.0, fail_calls: tuple[int, ...] = (),
                 die_once: str | None = None, weights: tuple[float, ...] = TARGET_WEIGHTS,
                 fail_splits: tuple[str, ...] = ()):
        from evomerge.models.io import ModelDir

        with ModelDir.open(base) as b:
            dirs = [ModelDir.open(e) for e in experts]
            self.target = {n: b.get(n).double() + sum(w * (d.get(n).double() - b.get(n).double())
                                                      for w, d in zip(weights, dirs)) for n in b.tensor_names}
        self.delay, self.fail_calls, self.die_once, self.calls = delay, fail_calls, die_once, 0
        self.fail_splits = fail_splits

    def evaluate(self, model, split: str, limit: int | None = None) -> Evaluation:
        self.calls += limit is None  # trials only, not the worker's preflight (limit=1)
        if self.calls in self.fail_calls:
            raise RuntimeError("boom")
        if split in self.fail_splits:
            raise FileNotFoundError(f"no {split} data")
        if self.die_once and self.calls == 2 and not os.path.exists(self.die_once):  # the worker process dies, once
            Path(self.die_once).touch()
            os._exit(1)
        time.sleep(self.delay)
        distance = sum(float(((p.detach().double() - self.target[n]) ** 2).sum()) for n, p in model.named_parameters())
        return Evaluation(-distance, {"distance": {"metric": distance}})


def evaluator_factory(models: dict, **kwargs):
    """make_evaluator(evaluation_config, base) for the loop."""
    return lambda evaluation, base: DistanceEvaluator(models["base"], models["experts"], **kwargs)


def experiment(models: dict, **overrides) -> dict:
    doc = {"name": "tiny", "seed": 3,
           "space": {"kind": "ps", "method": "task_arithmetic", "base_model": models["base"], "models": models["experts"],
                     "search": ["weight"], "bounds": {"weight": [0.0, 1.0]}},
           "optimizer": {"name": "cmaes", "options": {"sigma0": 0.3, "popsize": 6}},
           "budget": {"trials": 18}, "workers": {"num": 2}, "validation": {"top_k": 2}}
    for key, value in overrides.items():
        section, _, sub = key.partition(".")
        if sub:
            doc[section] = {**doc.get(section, {}), sub: value}
        else:
            doc[section] = value
    return doc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = build_tiny("llama", root / "base", num_layers=2, hidden=16)
    return {"base": str(base), "experts": [str(p) for p in make_variants(base, root, n=2, scale=0.05)]}


def genomes(run_dir) -> list[tuple[int, list[float]]]:
    ledger = Ledger(Path(run_dir) / "ledger.sqlite")
    rows = sorted((t.candidate, t.genome) for t in ledger.trials("search"))
    ledger.close()
    return rows


def run(models, run_dir, evaluator=None, pool_class=None, **overrides):
    exp = experiment_from_dict(experiment(models, **overrides))
    make = evaluator or evaluator_factory(models)
    pool = None
    if pool_class is not None:
        spec = RunnerSpec(tuple([models["base"], *models["experts"]]), models["base"], partial(make, exp.evaluation, models["base"]))
        pool = pool_class(spec, exp.workers.num)
    return search(exp, run_dir, make, pool=pool, progress=False)


def test_cmaes_search_finds_the_optimum_and_writes_the_run_dir(models, tmp_path):
    summary = run(models, tmp_path / "run", **{"budget.trials": 36})
    ledger = Ledger(tmp_path / "run" / "ledger.sqlite")
    trials = ledger.trials("search")
    assert sorted(t.candidate for t in trials) == list(range(36)) and all(t.ok for t in trials)
    first_generation = max(t.fitness for t in trials if t.candidate < 6)
    best = max(trials, key=lambda t: t.fitness)
    assert best.fitness > first_generation and best.fitness > 0.1 * first_generation  # 10x closer to the target
    assert len(ledger.trials("validation")) == 2 and len(ledger.trials("test")) == 1

    recipe = load_recipe(tmp_path / "run" / "best" / "recipe.yaml")
    weights = [m.parameters["weight"] for m in recipe.merge.models]
    assert np.allclose(weights, TARGET_WEIGHTS, atol=0.1)
    scores = json.loads((tmp_path / "run" / "best" / "scores.json").read_text())
    winner = next(t for t in trials if t.candidate == summary.candidate)
    assert scores["candidate"] == summary.candidate == recipe.provenance["trial"]
    # one fitness function on every split: the winner scores the same on search, validation and test
    assert scores["fitness"]["test"] == pytest.approx(winner.fitness, rel=1e-9)
    assert summary.fitness["validation"] == pytest.approx(winner.fitness, rel=1e-9)
    optimizer = load_optimizer(tmp_path / "run" / "optimizer.pkl")
    assert optimizer.n_told == 36 and optimizer.best.fitness[0] == pytest.approx(best.fitness)
    frozen = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert frozen["workers"] == {"backend": "local", "num": 2, "tell_order": "candidate", "device": "cpu", "cpus": 1,
                                 "dtype": "float32", "ray_address": None, "sources": "auto",
                                 "device_memory": None, "compile": False}  # the sources' dtype, stated
    assert frozen["space"]["kind"] == "ps" and frozen["space"]["layer_groups"] == 1  # resolved defaults frozen


class ShuffledPool(LocalPool):
    """Runs its queued tasks in a seeded random order: results reach the loop out of candidate order."""

    def next_task(self):
        rng = getattr(self, "rng", None) or np.random.default_rng(7)
        self.rng = rng
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        self.tasks.remove(task)
        return task


@pytest.mark.parametrize("optimizer", ["cmaes", "random"])
def test_completion_order_does_not_change_the_run(models, tmp_path, optimizer):
    options = {"sigma0": 0.3, "popsize": 4} if optimizer == "cmaes" else {}
    overrides = {"optimizer": {"name": optimizer, "options": options}, "workers.num": 3, "budget.trials": 10}
    ordered = run(models, tmp_path / "fifo", pool_class=LocalPool, **overrides)
    shuffled = run(models, tmp_path / "shuffled", pool_class=ShuffledPool, **overrides)
    rows = Ledger(tmp_path / "shuffled" / "ledger.sqlite").trials("search")
    assert [t.candidate for t in rows] != sorted(t.candidate for t in rows)  # results did arrive out of order
    assert genomes(tmp_path / "fifo") == genomes(tmp_path / "shuffled")
    assert ordered == shuffled


class StarvingPool(LocalPool):
    """Runs the newest task first (candidate 0 waits to the end) and records how many tasks it held at each wait."""

    def next_task(self):
        self.held = getattr(self, "held", []) + [len(self.tasks)]
        return self.tasks.pop()


@pytest.mark.parametrize("optimizer", ["random", "tpe"])
def test_arrival_order_keeps_every_worker_busy(models, tmp_path, optimizer):
    overrides = {"optimizer": {"name": optimizer}, "workers.num": 3, "budget.trials": 12, "validation.top_k": 0}
    pools = {}

    def pool_class(spec, slots):
        pools[len(pools)] = pool = StarvingPool(spec, slots)
        return pool

    run(models, tmp_path / "candidate", pool_class=pool_class, **overrides)
    run(models, tmp_path / "arrival", pool_class=pool_class, **{**overrides, "workers.tell_order": "arrival"})
    candidate_order, arrival = pools[0].held[:10], pools[1].held[:10]  # the search's waits, before the budget runs out
    assert min(candidate_order) < 3  # a finished worker waited for candidate 0
    assert arrival == [3] * 10  # never a worker idle
    assert [c for c, _ in genomes(tmp_path / "arrival")] == list(range(12))
    if optimizer == "random":  # its proposals ignore results: the same candidates in either order
        assert genomes(tmp_path / "arrival") == genomes(tmp_path / "candidate")


class Interrupted(Exception):
    pass


def interrupting_pool(after: int):
    """A ShuffledPool whose process 'dies' (raises) once it has returned `after` results: what is on disk remains."""

    class Pool(ShuffledPool):
        returned = 0

        def wait(self):
            if self.returned == after:
                raise Interrupted
            self.returned += 1
            return super().wait()

    return Pool


def test_interrupted_anywhere_and_resumed_equals_an_uninterrupted_run(models, tmp_path):
    overrides = {"workers.num": 3, "budget.trials": 14}
    reference = run(models, tmp_path / "reference", **overrides)
    for after in (0, 1, 5, 6, 7, 11, 13):  # popsize 6: generation boundaries at 6 and 12; 13 is the last but one
        run_dir = tmp_path / f"after{after}"
        with pytest.raises(Interrupted):
            run(models, run_dir, pool_class=interrupting_pool(after), **overrides)
        assert _rows(run_dir / "ledger.sqlite") == after
        assert resume(run_dir, evaluator_factory(models), progress=False) == reference
        assert genomes(run_dir) == genomes(tmp_path / "reference")


def _with_budget(models, trials: int, **overrides):
    return experiment_from_dict(experiment(models, **{**overrides, "budget.trials": trials}))


def test_a_new_trial_budget_on_resume_equals_a_run_started_with_it(models, tmp_path):
    """More trials continue a finished search (popsize 6: 14 cuts a generation that 20 finishes); fewer end a stopped
    one at once. Either run equals one started with that budget: same trials, same winner, same best/."""
    overrides = {"workers.num": 3}
    for trials in (14, 20, 26):
        run(models, tmp_path / f"fresh{trials}", **overrides, **{"budget.trials": trials})
    run(models, tmp_path / "grown", **overrides, **{"budget.trials": 14})
    for trials in (20, 26):
        summary = resume(tmp_path / "grown", evaluator_factory(models), experiment=_with_budget(models, trials, **overrides),
                         progress=False)
        assert summary == resume(tmp_path / f"fresh{trials}", evaluator_factory(models), progress=False)
        assert genomes(tmp_path / "grown") == genomes(tmp_path / f"fresh{trials}")
        assert load_experiment(tmp_path / "grown" / "config.yaml").budget.trials == trials  # frozen anew
        assert ((tmp_path / "grown" / "best" / "scores.json").read_text()
                == (tmp_path / f"fresh{trials}" / "best" / "scores.json").read_text())

    with pytest.raises(Interrupted):  # a run of 26 stopped after 9 results; a budget of the candidates it holds ends it
        run(models, tmp_path / "cut", pool_class=interrupting_pool(9), **overrides, **{"budget.trials": 26})
    held = max(c for c, _ in genomes(tmp_path / "cut")) + 1
    frozen = (tmp_path / "cut" / "config.yaml").read_text()
    with pytest.raises(EvomergeError, match=rf"budget.trials: {held - 1} is below the {held} candidates the ledger "):
        resume(tmp_path / "cut", evaluator_factory(models), experiment=_with_budget(models, held - 1, **overrides),
               progress=False)
    assert (tmp_path / "cut" / "config.yaml").read_text() == frozen  # refused: nothing changed
    summary = resume(tmp_path / "cut", evaluator_factory(models), experiment=_with_budget(models, held, **overrides),
                     progress=False)
    assert summary == run(models, tmp_path / f"fresh{held}", **overrides, **{"budget.trials": held})
    assert genomes(tmp_path / "cut") == genomes(tmp_path / f"fresh{held}")


def test_a_time_budget_ends_the_run_at_the_trials_it_ran_frozen_as_its_budget(models, tmp_path):
    """budget.hours: no new candidate after the deadline; the trials run become budget.trials, so the run is the one a
    search with that trial budget makes, and `resume` with more trials goes on from it."""
    slow = evaluator_factory(models, delay=0.1)
    overrides = {"workers.num": 2, "budget.hours": 0.6 / 3600}
    summary = run(models, tmp_path / "timed", evaluator=slow, **overrides, **{"budget.trials": 60})
    ran = summary.trials
    assert 2 <= ran < 60 and [c for c, _ in genomes(tmp_path / "timed")] == list(range(ran))
    assert load_experiment(tmp_path / "timed" / "config.yaml").budget.trials == ran
    assert f"the run ends at {ran} trials" in (tmp_path / "timed" / "logs" / "search.log").read_text()
    assert summary == run(models, tmp_path / "fresh", **{"workers.num": 2, "budget.trials": ran})
    assert genomes(tmp_path / "timed") == genomes(tmp_path / "fresh")
    more = _with_budget(models, ran + 7, **{"workers.num": 2})  # and no time budget
    assert resume(tmp_path / "timed", evaluator_factory(models), experiment=more, progress=False) == \
        run(models, tmp_path / "fresh_more", **{"workers.num": 2, "budget.trials": ran + 7})
    assert genomes(tmp_path / "timed") == genomes(tmp_path / "fresh_more")


def test_a_local_search_runs_torch_on_workers_cpus_threads_and_gives_them_back(models, tmp_path):
    seen = []

    class ThreadsSeen(DistanceEvaluator):
        def evaluate(self, model, split: str, limit: int | None = None) -> Evaluation:
            seen.append(torch.get_num_threads())
            return super().evaluate(model, split, limit)

    before = torch.get_num_threads()
    cpus = 3 if before != 3 else 2
    make = lambda evaluation, base: ThreadsSeen(models["base"], models["experts"])  # noqa: E731
    search(experiment_from_dict(experiment(models, **{"budget.trials": 4, "workers.num": 1, "workers.cpus": cpus})),
           tmp_path / "run", make, progress=False)
    assert seen[1:] == [cpus] * (len(seen) - 1) and len(seen) > 4  # the trials; seen[0]: the worker's preflight
    assert torch.get_num_threads() == before


class LogitsEvaluator:
    """-mean squared distance of the model's logits on fixed tokens to those of a target model (a function of the path)."""

    def __init__(self, target: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.tokens = torch.arange(4, 20).reshape(2, 8)
        with torch.no_grad():
            self.target = AutoModelForCausalLM.from_pretrained(target)(self.tokens).logits

    def evaluate(self, model, split: str, limit: int | None = None) -> Evaluation:
        import torch

        with torch.no_grad():
            distance = float(((model(self.tokens).logits - self.target) ** 2).mean())
        return Evaluation(-distance, {"logits": {"metric": distance}})


def test_a_data_flow_search_runs_layer_paths(models, tmp_path):
    space = {"kind": "dfs", "models": [models["base"], models["experts"][0]], "repeats": 1, "scale": "slot"}
    summary = run(models, tmp_path / "run", evaluator=lambda evaluation, base: LogitsEvaluator(models["experts"][0]),
                  space=space, optimizer={"name": "random"}, **{"budget.trials": 6})
    trials = Ledger(tmp_path / "run" / "ledger.sqlite").trials("search")
    assert len(trials) == 6 and all(t.ok for t in trials) and len({t.recipe_hash for t in trials}) == 6
    recipe = load_recipe(tmp_path / "run" / "best" / "recipe.yaml")
    assert recipe.layers and {s.source for s in recipe.layers} <= {models["base"], models["experts"][0]}
    assert summary.fitness["test"] == pytest.approx(max(t.fitness for t in trials), rel=1e-6)


def _in_bfloat16(model: str, out: Path) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    tensors = {n: t.to(torch.bfloat16) for n, t in load_file(out / "model.safetensors").items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    return str(out)


def test_sources_of_two_dtypes_meet_in_one_stated_in_the_run_config(models, tmp_path):
    from safetensors.torch import load_file

    from evomerge.merge.materialize import merge_to_dir

    half = _in_bfloat16(models["experts"][0], tmp_path / "half")
    spaces = {"dfs": {"kind": "dfs", "models": [models["base"], half], "repeats": 1, "scale": "slot"},
              "ps": {**experiment(models)["space"], "models": [half, models["experts"][1]]}}
    for kind, space in spaces.items():
        run(models, tmp_path / kind, evaluator=lambda evaluation, base: LogitsEvaluator(models["experts"][0]),
            space=space, optimizer={"name": "random"}, **{"budget.trials": 6, "validation.top_k": 1})
        trials = Ledger(tmp_path / kind / "ledger.sqlite").trials("search")
        assert len(trials) == 6 and all(t.ok for t in trials), [t.error for t in trials]
        assert yaml.safe_load((tmp_path / kind / "config.yaml").read_text())["workers"]["dtype"] == "float32"
        merge_to_dir(load_recipe(tmp_path / kind / "best" / "recipe.yaml"), tmp_path / f"{kind}_out", progress=False)
        [dtype] = {t.dtype for t in load_file(tmp_path / f"{kind}_out" / "model.safetensors").values()}  # one dtype
        assert json.loads((tmp_path / f"{kind}_out" / "config.json").read_text())["torch_dtype"] == \
            str(dtype).removeprefix("torch.")
    path = tmp_path / "path.yaml"
    path.write_text(yaml.safe_dump({"layers": [{"source": models["base"], "layer": 0}, {"source": half, "layer": 1}]}))
    merge_to_dir(load_recipe(path), tmp_path / "path_out", progress=False)
    assert {t.dtype for t in load_file(tmp_path / "path_out" / "model.safetensors").values()} == {torch.float32}
    assert json.loads((tmp_path / "path_out" / "config.json").read_text())["torch_dtype"] == "float32"


class CountingLogitsEvaluator(LogitsEvaluator):
    calls: list = []

    def evaluate(self, model, split: str, limit: int | None = None) -> Evaluation:
        if limit is None:  # trials only, not the worker's preflight
            self.calls.append(split)
        return super().evaluate(model, split)


def test_a_candidate_that_repeats_a_scored_recipe_is_not_run_again(models, tmp_path):
    # 4 slots and no scale genes: 16 layer paths, so 14 random genomes must repeat some
    space = {"kind": "dfs", "models": [models["base"], models["experts"][0]], "repeats": 1, "scale": "none"}
    CountingLogitsEvaluator.calls.clear()
    summary = run(models, tmp_path / "run", evaluator=lambda evaluation, base: CountingLogitsEvaluator(models["experts"][0]),
                  space=space, optimizer={"name": "random"}, **{"budget.trials": 14, "validation.top_k": 3})
    trials = sorted(Ledger(tmp_path / "run" / "ledger.sqlite").trials("search"), key=lambda t: t.candidate)
    first = {}
    for t in trials:
        first.setdefault(t.recipe_hash, t)
    repeats = [t for t in trials if t is not first[t.recipe_hash]]
    assert len(trials) == 14 and repeats and CountingLogitsEvaluator.calls.count("search") == len(first)
    for t in repeats:
        twin = first[t.recipe_hash]
        assert t.worker == f"repeat of {twin.candidate}" and t.fitness == twin.fitness and t.scores == twin.scores
        assert t.genome != twin.genome and t.t_total == 0.0
    validated = Ledger(tmp_path / "run" / "ledger.sqlite").trials("validation")
    assert len(validated) == 3 and len({t.recipe_hash for t in validated}) == 3  # three distinct recipes
    assert summary.trials == 14


RESUMABLE = """
import sys
sys.path.insert(0, {tests!r})
from test_search_loop import evaluator_factory, experiment
from evomerge.run.config import experiment_from_dict
from evomerge.run.loop import resume, search
models, run_dir, overrides = {models!r}, {run_dir!r}, {overrides!r}
if {resume!r}:
    resume(run_dir, evaluator_factory(models), progress=False)
else:
    search(experiment_from_dict(experiment(models, **overrides)), run_dir, evaluator_factory(models, delay=0.15),
           progress=False)
"""
# The optimum (weight 0.7 for the first expert) on the box's bound, and a wide step: many samples leave the box
WIDE = {"optimizer": {"name": "cmaes", "options": {"sigma0": 0.5, "popsize": 6}}, "space.bounds": {"weight": [0.0, 0.7]}}


def _script(models, run_dir, resume: bool, hash_seed: int, overrides: dict = WIDE, **popen):
    """RESUMABLE in a fresh interpreter whose str/bytes hashes are salted with `hash_seed`."""
    script = RESUMABLE.format(tests=str(Path(__file__).parent), models=models, run_dir=str(run_dir), overrides=overrides,
                              resume=resume)
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, env=env, **popen)


@pytest.mark.parametrize("optimizer", ["cmaes", "niches"])
def test_resume_after_sigkill_mid_generation_equals_an_uninterrupted_run(models, tmp_path, optimizer):
    niches = {"optimizer": {"name": "niches", "options": {"archive_size": 4}}, "space.bounds": WIDE["space.bounds"]}
    overrides = WIDE if optimizer == "cmaes" else niches
    reference = run(models, tmp_path / "reference", **overrides)
    if optimizer == "cmaes":
        weights = np.array([g for _, g in genomes(tmp_path / "reference")])
        assert np.sum(np.minimum(weights, 0.7 - weights) < 0.035) >= 3  # where cma's bound transform is not the identity
    killed = tmp_path / "killed"
    proc = _script(models, killed, resume=False, hash_seed=1, overrides=overrides)
    deadline = time.time() + 300  # start-up on a loaded machine
    while _rows(killed / "ledger.sqlite") < 9:  # popsize 6: candidate 8 is in the second generation
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    no_wal = tmp_path / "no_wal"  # copied before any reader's close folds the WAL into ledger.sqlite
    shutil.copytree(killed, no_wal, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
    assert 9 <= _rows(killed / "ledger.sqlite") < 12  # killed in the second generation
    corrupt = tmp_path / "corrupt"
    shutil.copytree(killed, corrupt)
    (corrupt / "optimizer.pkl").write_bytes(b"\x80\x05not a pickle")
    with pytest.raises(EvomergeError, match=r"no_wal/ledger.sqlite: the ledger lacks \d+ trial\(s\) that optimizer.pkl "
                                            r"has seen \(candidates 0, 1, 2, 3, 4, 5.*\): .* copied without "
                                            r"ledger.sqlite-wal"):
        resume(no_wal, evaluator_factory(models), progress=False)

    for run_dir in (killed, corrupt):
        proc = _script(models, run_dir, resume=True, hash_seed=2, overrides=overrides)
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
        assert genomes(run_dir) == genomes(tmp_path / "reference")
        assert json.loads((run_dir / "best" / "scores.json").read_text()) == \
            json.loads((tmp_path / "reference" / "best" / "scores.json").read_text())
    assert resume(killed, evaluator_factory(models), progress=False) == reference  # finished: only re-read
    assert "rebuilding the optimizer and replaying the ledger" in (corrupt / "logs" / "search.log").read_text()
    assert not (killed / "logs" / "search.log").exists()  # resumed from optimizer.pkl


def _rows(path: Path) -> int:
    try:
        with closing(sqlite3.connect(path)) as db:
            return db.execute("SELECT count(*) FROM trials").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_optuna_cmaes_over_many_genes_is_warned_about(models, tmp_path, capsys):
    """A DFS space of 480 genes (240 slots and their scales): optuna's CmaEsSampler would take seconds to minutes per
    candidate there, and the run says so (on stderr and in its log) and names the optimizer that does not."""
    space = {"kind": "dfs", "models": models["experts"], "repeats": 60, "scale": "slot"}
    run(models, tmp_path / "run", evaluator=lambda evaluation, base: LogitsEvaluator(models["experts"][0]), space=space,
        optimizer={"name": "optuna_cmaes", "options": {"popsize": 4}},
        **{"budget.trials": 2, "workers.num": 1, "validation.top_k": 1})
    warning = ("optuna_cmaes over 480 genes: its bound handling redraws samples, seconds to minutes a candidate past "
               "300 genes; optimizer cmaes (pycma) transforms bounds instead")
    assert f"warning: {warning}" in capsys.readouterr().err
    assert warning in (tmp_path / "run" / "logs" / "search.log").read_text()
    run(models, tmp_path / "small", optimizer={"name": "optuna_cmaes", "options": {"popsize": 4}},
        **{"budget.trials": 2, "workers.num": 1, "validation.top_k": 1})
    assert "optuna_cmaes over" not in capsys.readouterr().err


def test_a_damaged_ledger_stops_resume_with_one_line(models, tmp_path):
    run(models, tmp_path / "run", **{"budget.trials": 12})
    size = (tmp_path / "run" / "ledger.sqlite").stat().st_size
    damage = {"emptied": b"", "garbage": b"this is not a database" * 500,
              "truncated": (tmp_path / "run" / "ledger.sqlite").read_bytes()[:size // 2]}
    for name, content in damage.items():
        shutil.copytree(tmp_path / "run", tmp_path / name)
        (tmp_path / name / "ledger.sqlite").write_bytes(content)
        expected = (r"the ledger lacks 12 trial\(s\) that optimizer.pkl has seen \(candidates 0, 1, 2, 3, 4, 5, 6, 7, "
                    r"\.\.\.\)" if name == "emptied" else r"unreadable ledger \(.*\); restore ledger.sqlite together with")
        with pytest.raises(EvomergeError, match=rf"^{tmp_path / name}/ledger.sqlite: {expected}"):
            resume(tmp_path / name, evaluator_factory(models), progress=False)
    shutil.copytree(tmp_path / "run", tmp_path / "missing", ignore=shutil.ignore_patterns("ledger.sqlite*"))
    for _ in range(2):  # refused, and not made empty (which would read as "emptied" the second time)
        with pytest.raises(EvomergeError, match=rf"^{tmp_path / 'missing'}: no ledger.sqlite, though optimizer.pkl "
                                                r"has seen trials: restore ledger.sqlite"):
            resume(tmp_path / "missing", evaluator_factory(models), progress=False)
        assert not (tmp_path / "missing" / "ledger.sqlite").exists()
    assert _rows(tmp_path / "run" / "ledger.sqlite") == 12 + 2 + 1  # search, validation, test


def test_relative_paths_are_relative_to_the_experiment_file_and_frozen_absolute(models, tmp_path, monkeypatch):
    """Models (in the experiment and in an included space file), includes and task dirs; then a run started in one
    working directory resumes from another."""
    exp_dir, elsewhere = tmp_path / "exp", tmp_path / "elsewhere"
    (exp_dir / "spaces").mkdir(parents=True), (exp_dir / "tasks").mkdir(), elsewhere.mkdir()
    space = {**experiment(models)["space"], "models": [os.path.relpath(m, exp_dir / "spaces") for m in models["experts"]]}
    (exp_dir / "spaces" / "s.yaml").write_text(yaml.safe_dump(space))
    doc = experiment(models, **{"workers.num": 3, "budget.trials": 14, "evaluation.task_dirs": ["tasks"]})
    doc["space"] = {"include": "spaces/s.yaml", "base_model": os.path.relpath(models["base"], exp_dir)}
    (exp_dir / "e.yaml").write_text(yaml.safe_dump(doc))
    monkeypatch.chdir(elsewhere)  # neither the experiment's dir, nor the space file's, nor the models'
    loaded = load_experiment(Path("..") / "exp" / "e.yaml")
    assert loaded.space["base_model"] == models["base"] and loaded.space["models"] == models["experts"]
    assert loaded.evaluation.task_dirs == [str(exp_dir / "tasks")]
    reference = run(models, tmp_path / "reference", **{"workers.num": 3, "budget.trials": 14})
    make = partial(evaluator_factory(models), loaded.evaluation, models["base"])
    with pytest.raises(Interrupted):
        search(loaded, tmp_path / "run", evaluator_factory(models), progress=False,
               pool=interrupting_pool(5)(RunnerSpec((models["base"], *models["experts"]), models["base"], make), 3))
    frozen = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert frozen["space"]["base_model"] == models["base"]
    assert frozen["evaluation"]["task_dirs"] == [str(exp_dir / "tasks")]
    monkeypatch.chdir(exp_dir / "spaces")
    assert resume(Path("../../run"), evaluator_factory(models), progress=False) == reference
    assert genomes(tmp_path / "run") == genomes(tmp_path / "reference")


def test_run_dir_in_use_and_config_mismatch_are_refused(models, tmp_path):
    with RunDir(tmp_path / "run"):
        with pytest.raises(EvomergeError, match="run dir in use"):
            run(models, tmp_path / "run", **{"budget.trials": 4})
    run(models, tmp_path / "run", **{"budget.trials": 4})
    changed = experiment_from_dict(experiment(models, seed=4, **{"budget.trials": 4}))
    with pytest.raises(EvomergeError, match=r"different config \(seed: 3 -> 4\)"):
        resume(tmp_path / "run", evaluator_factory(models), experiment=changed, progress=False)
    with pytest.raises(EvomergeError, match="different config"):
        search(changed, tmp_path / "run", evaluator_factory(models), progress=False)
    # where the run runs may change on resume; the finished run is then only re-read
    moved = experiment_from_dict(experiment(models, **{"budget.trials": 4, "workers.device": "cpu:0"}))
    assert resume(tmp_path / "run", evaluator_factory(models), experiment=moved, progress=False).trials == 4


def test_a_candidate_that_raises_is_recorded_failed_and_the_run_goes_on(models, tmp_path):
    summary = run(models, tmp_path / "run", evaluator=evaluator_factory(models, fail_calls=(2,)), **{"budget.trials": 6})
    trials = sorted(Ledger(tmp_path / "run" / "ledger.sqlite").trials("search"), key=lambda t: t.candidate)
    assert [t.status for t in trials] == ["ok", "failed", "ok", "ok", "ok", "ok"]
    assert trials[1].fitness is None and trials[1].error == "RuntimeError: boom"
    assert summary.failed == 1 and summary.trials == 6 and summary.candidate != 1
    assert "candidate 1 (search) failed: RuntimeError: boom" in (tmp_path / "run" / "logs" / "search.log").read_text()


def test_a_run_whose_trials_keep_failing_stops_and_resume_goes_on_after_the_fix(models, tmp_path):
    failing = evaluator_factory(models, fail_calls=tuple(range(3, 100)))  # from the third trial on: a cause outside
    overrides = {"budget.trials": 12, "budget.max_consecutive_failures": 4, "workers.num": 1}
    with pytest.raises(EvomergeError, match=r"stopped after 4 failed trials in a row; the last, candidate 5: "
                                            r"RuntimeError: boom\. Fix the cause and continue with `evomerge resume "):
        run(models, tmp_path / "run", evaluator=failing, **overrides)
    trials = sorted(Ledger(tmp_path / "run" / "ledger.sqlite").trials("search"), key=lambda t: t.candidate)
    assert [t.status for t in trials] == ["ok", "ok", "failed", "failed", "failed", "failed"]

    summary = resume(tmp_path / "run", evaluator_factory(models), progress=False)  # fixed: the budget is spent
    assert summary.trials == 12 and summary.failed == 4
    assert len(Ledger(tmp_path / "run" / "ledger.sqlite").trials("search")) == 12


def test_held_out_failures_are_reported_and_retried_by_resume(models, tmp_path):
    overrides = {"budget.trials": 6, "workers.num": 1}
    reference = run(models, tmp_path / "reference", **overrides)
    broken = run(models, tmp_path / "run", evaluator=evaluator_factory(models, fail_splits=("validation", "test")),
                 **overrides)
    assert broken.fitness["validation"] is None and broken.fitness["test"] is None
    assert len(broken.held_out_failures) == 3  # two elites on validation, the winner on test
    assert broken.held_out_failures[0].startswith("validation of trial ")
    assert broken.held_out_failures[-1] == f"test of trial {broken.candidate}: FileNotFoundError: no test data"
    scores = json.loads((tmp_path / "run" / "best" / "scores.json").read_text())
    assert scores["held_out_failures"] == list(broken.held_out_failures)
    fixed = resume(tmp_path / "run", evaluator_factory(models), progress=False)  # the data is back: tried again
    assert fixed == reference and fixed.held_out_failures == ()
    ledger = Ledger(tmp_path / "run" / "ledger.sqlite")
    assert [t.ok for t in ledger.trials("validation")] == [False, False, True, True]
    assert [t.ok for t in ledger.trials("test")] == [False, True]


def test_the_search_split_is_never_a_held_out_one(models, tmp_path):
    for split in ("validation", "test"):
        with pytest.raises(EvomergeError, match=rf"evaluation.split: the search cannot score on '{split}'"):
            experiment_from_dict(experiment(models, **{"evaluation.split": split}), source="exp.yaml")


def test_experiment_errors_name_the_file_and_key(models, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(models, workers={"num": 2, "gpus": 1})))
    with pytest.raises(EvomergeError, match=r"exp.yaml: workers.gpus: unknown key"):
        load_experiment(path)
    path.write_text(yaml.safe_dump(experiment(models, budget={"trials": 0})))
    with pytest.raises(EvomergeError, match=r"budget.trials: Input should be greater than or equal to 1"):
        load_experiment(path)
    path.write_text(yaml.safe_dump(experiment(models, optimizer={"name": "cmaes", "options": {"sigma": 0.1}})))
    with pytest.raises(EvomergeError, match=r"optimizer.options.sigma: unknown option \(options of cmaes: sigma0, popsize, diagonal\)"):
        load_experiment(path)
    path.write_text(yaml.safe_dump(experiment(models, optimizer={"name": "cma"})))
    with pytest.raises(EvomergeError, match=r"optimizer.name: unknown optimizer 'cma'; did you mean 'cmaes'\?"):
        load_experiment(path)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(experiment(models)["space"]))
    path.write_text(yaml.safe_dump(experiment(models, space={"include": "space.yaml", "bounds": {"weight": [1, 0]}})))
    with pytest.raises(EvomergeError, match=r"exp.yaml: space.bounds.weight: low 1.0 must be below high 0.0"):
        load_experiment(path)
    # a space error found when the search builds the space names the experiment's key, before any run dir is made
    exp = experiment_from_dict(experiment(models, space={**experiment(models)["space"], "search": ["wieght"],
                                                         "bounds": {}}))
    with pytest.raises(EvomergeError, match=r"exp.yaml: space.search: method task_arithmetic has no parameter "
                                            r"'wieght'; did you mean 'weight'\?"):
        search(exp, tmp_path / "run", evaluator_factory(models), progress=False, source=str(path))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # ~20-30 s on 2 busy cores: Ray and two worker processes start, and one is restarted
def test_ray_pool_with_two_workers_matches_the_local_run(models, tmp_path):
    pytest.importorskip("ray")
    overrides = {"budget.trials": 8, "optimizer": {"name": "cmaes", "options": {"sigma0": 0.3, "popsize": 4}}}
    local = run(models, tmp_path / "local", **overrides)
    died = tmp_path / "died"
    on_ray = run(models, tmp_path / "ray", evaluator=evaluator_factory(models, die_once=str(died)), **overrides,
                 workers={"backend": "ray", "num": 2})
    assert died.exists()  # a worker died mid-trial; it was replaced and its candidate retried
    assert on_ray == local and genomes(tmp_path / "ray") == genomes(tmp_path / "local")
    workers = {t.worker for t in Ledger(tmp_path / "ray" / "ledger.sqlite").trials("search")}
    assert workers == {"ray-0", "ray-1"}


# -- several objectives --------------------------------------------------------------------------------------------------

OTHER_WEIGHTS = (0.2, 0.7)


def test_a_ray_worker_runs_torch_on_its_reserved_cores(models):
    from evomerge.run.pool import _RayRunner

    threads = torch.get_num_threads()
    try:
        spec = RunnerSpec(tuple([models["base"], *models["experts"]]), models["base"],
                          partial(evaluator_factory(models), None, None))
        for cpus in (1, 3):
            runner = _RayRunner(spec, "ray-0", cpus)  # the actor class, built in process
            assert torch.get_num_threads() == cpus and runner.ready() is None  # None: ready for trials
    finally:
        torch.set_num_threads(threads)


class TwoTargetEvaluator:
    """Two tasks: `near_a` scores -||theta - target_a||^2, `near_b` the same for a second target; fitness is their mean.
    The Pareto front is the set of merges between the two targets."""

    def __init__(self, base: str, experts: list[str]):
        self.a = DistanceEvaluator(base, experts)
        self.b = DistanceEvaluator(base, experts, weights=OTHER_WEIGHTS)

    def evaluate(self, model, split: str, limit: int | None = None) -> Evaluation:
        a, b = (ev.evaluate(model, split).fitness for ev in (self.a, self.b))
        return Evaluation((a + b) / 2, {"near_a": {"value": a, "higher_is_better": True}, "near_b": {"value": b}})


def two_targets(models: dict):
    return lambda evaluation, base: TwoTargetEvaluator(models["base"], models["experts"])


NSGA2 = {"optimizer": {"name": "nsga2", "options": {"population_size": 4}}, "evaluation.objectives": ["near_a", "near_b"]}


def test_multi_objective_search_tells_score_vectors_and_validates_the_pareto_front(models, tmp_path):
    summary = run(models, tmp_path / "run", evaluator=two_targets(models), **NSGA2, **{"budget.trials": 12})
    ledger = Ledger(tmp_path / "run" / "ledger.sqlite")
    trials = sorted(ledger.trials("search"), key=lambda t: t.candidate)
    assert [t.candidate for t in trials] == list(range(12)) and all(t.ok for t in trials)
    for t in trials:  # the objectives are the tasks' scores, in the configured order; the fitness is their mean
        assert t.objectives == [t.scores["near_a"]["value"], t.scores["near_b"]["value"]]
        assert t.fitness == pytest.approx(sum(t.objectives) / 2, rel=1e-12)
    front = [t for t in trials if not any(all(np.array(u.objectives) >= t.objectives) and
                                          any(np.array(u.objectives) > t.objectives) for u in trials)]
    assert len(front) >= 2  # the two tasks do conflict
    optimizer = load_optimizer(tmp_path / "run" / "optimizer.pkl")
    assert optimizer.n_objectives == 2 and [r.id for r in optimizer.pareto_front()] == [t.candidate for t in front]
    scores = json.loads((tmp_path / "run" / "best" / "scores.json").read_text())
    assert scores["pareto_front"] == [{"candidate": t.candidate, "objectives": {"near_a": t.objectives[0],
                                                                                "near_b": t.objectives[1]}} for t in front]
    elites = sorted(front, key=lambda t: -t.fitness)[:2]  # top_k 2 of the front, by fitness
    assert [e["candidate"] for e in scores["elites"]] == [t.candidate for t in elites]
    assert sorted(t.candidate for t in ledger.trials("validation")) == sorted(t.candidate for t in elites)
    assert summary.candidate == max(elites, key=lambda t: t.fitness).candidate  # validation = search here

    from evomerge.report import write_report

    summary_md = (write_report(tmp_path / "run") / "summary.md").read_text()
    assert (tmp_path / "run" / "report" / "pareto.png").stat().st_size > 0
    table = summary_md.split("## Pareto front (search split)")[1].split("![pareto]")[0].strip().splitlines()
    assert table[0] == "| trial | near_a | near_b |" and len(table) == 2 + len(front)
    assert table[2] == f"| {front[0].candidate}{' (winner)' if front[0].candidate == summary.candidate else ''} | " \
                       f"{front[0].objectives[0]:.3f} | {front[0].objectives[1]:.3f} |"


def test_objectives_need_a_multi_objective_optimizer_and_known_tasks(models, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(models, **{"evaluation.objectives": ["near_a", "near_b"]})))
    with pytest.raises(EvomergeError, match=r"exp.yaml: evaluation.objectives: optimizer cmaes takes one objective; use "
                                            r"one of nsga2, random, tpe"):
        load_experiment(path)
    path.write_text(yaml.safe_dump(experiment(models, **NSGA2, evaluation={"objectives": ["near_a", "near_a"]})))
    with pytest.raises(EvomergeError, match=r"exp.yaml: evaluation.objectives: a task is listed twice"):
        load_experiment(path)
    path.write_text(yaml.safe_dump(experiment(models, **NSGA2, evaluation={"objectives": ["near_a", "near_b"],
                                                                          "racing": {"first": 0.25}})))
    with pytest.raises(EvomergeError, match=r"exp.yaml: evaluation.racing: racing stops a candidate whose fitness cannot "
                                            r"reach the top k, but with objectives one below them may be on the Pareto"):
        load_experiment(path)
    with pytest.raises(EvomergeError, match=r"run/config.yaml: evaluation.objectives: no score for task 'near_c'; did "
                                            r"you mean 'near_b'\? available: near_a, near_b; start a new run dir"):
        run(models, tmp_path / "run", evaluator=two_targets(models), **{**NSGA2, "evaluation.objectives": ["near_c"]})
    assert _rows(tmp_path / "run" / "ledger.sqlite") == 0  # caught at the first result, before anything is recorded


@pytest.mark.parametrize("optimizer", ["tpe", "nsga2"])
def test_optuna_run_interrupted_anywhere_and_resumed_equals_an_uninterrupted_run(models, tmp_path, optimizer):
    if optimizer == "tpe":
        overrides = {"optimizer": {"name": "tpe", "options": {"n_startup_trials": 4}}}
        make = evaluator_factory(models)
    else:
        overrides, make = NSGA2, two_targets(models)
    overrides = {**overrides, "workers.num": 3, "budget.trials": 11}
    reference = run(models, tmp_path / "reference", evaluator=make, **overrides)
    expected = json.loads((tmp_path / "reference" / "best" / "scores.json").read_text())
    for after in (1, 4, 9):  # tpe: before and after the startup trials; nsga2 (population 4): in generations 1 and 3
        run_dir = tmp_path / f"after{after}"
        with pytest.raises(Interrupted):
            run(models, run_dir, evaluator=make, pool_class=interrupting_pool(after), **overrides)
        assert resume(run_dir, make, progress=False) == reference
        assert genomes(run_dir) == genomes(tmp_path / "reference")
        assert json.loads((run_dir / "best" / "scores.json").read_text()) == expected


# -- per-document scores, natural niches, racing ---------------------------------------------------------------------

DOCS = 40  # documents per task


class DocumentsEvaluator:
    """Two tasks of DOCS documents each; document j of a task is solved when the model's distance to that task's target
    (DistanceEvaluator) is below the document's cutoff (shuffled cutoffs, so no slice is easier than another). With a
    threshold, it races (evaluate.racing), as the lm-eval evaluator does."""

    def __init__(self, base: str, experts: list[str]):
        self.targets = {"near_a": DistanceEvaluator(base, experts), "near_b": DistanceEvaluator(base, experts,
                                                                                                weights=OTHER_WEIGHTS)}
        far = -self.targets["near_a"].evaluate(_base_model(base), "search").fitness
        rng = np.random.default_rng(0)
        self.cutoffs = {t: rng.permutation(np.linspace(0.02, 1.2, DOCS)) * far for t in self.targets}

    def evaluate(self, model, split: str, limit: int | None = None, threshold: float | None = None) -> Evaluation:
        from evomerge.evaluate.docs import pack
        from evomerge.evaluate.racing import race

        distance = {t: -ev.evaluate(model, split).fitness for t, ev in self.targets.items()}

        def score(indices):
            return {t: (distance[t] < self.cutoffs[t][i]).astype(float) for t, i in indices.items()}

        docs, stopped = race(score, {t: DOCS for t in self.targets}, threshold, {t: 1.0 for t in self.targets}, "mean",
                             first=0.25, delta=0.05)
        values = {t: float(v.mean()) for t, v in docs.items()}
        return Evaluation(sum(values.values()) / 2, {t: {"value": v} for t, v in values.items()},
                          docs=pack(docs, {t: DOCS for t in docs}), estimated=stopped)


def _base_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def documents(models: dict):
    return lambda evaluation, base: DocumentsEvaluator(models["base"], models["experts"])


RACING = {"evaluation.racing": {"first": 0.25, "delta": 0.05}, "optimizer": {"name": "random"}, "budget.trials": 16}


def test_per_document_scores_reach_the_ledger_the_optimizer_and_the_report(models, tmp_path):
    from evomerge.evaluate.docs import unpack
    from evomerge.report import write_report

    summary = run(models, tmp_path / "run", evaluator=documents(models),
                  **{"optimizer": {"name": "niches", "options": {"archive_size": 4}}, "budget.trials": 10})
    trials = sorted(Ledger(tmp_path / "run" / "ledger.sqlite").trials("search"), key=lambda t: t.candidate)
    for t in trials:
        docs, sizes = unpack(t.docs)
        assert sizes == {"near_a": DOCS, "near_b": DOCS} and t.n_docs == 2 * DOCS and not t.estimated
        assert {k: float(v.mean()) for k, v in docs.items()} == {k: s["value"] for k, s in t.scores.items()}
    optimizer = load_optimizer(tmp_path / "run" / "optimizer.pkl")
    assert [len(row) for row in optimizer.scores] == [2 * DOCS] * 4  # the archive competes on the 80 documents
    assert summary.documents == 10 * 2 * DOCS
    text = (write_report(tmp_path / "run") / "summary.md").read_text()
    ledger = Ledger(tmp_path / "run" / "ledger.sqlite")
    for split in ("search", "validation", "test"):  # every split the winner was scored on, in this order
        winner = next(t for t in ledger.trials(split) if t.candidate == summary.candidate)
        docs, sizes = unpack(winner.docs)
        assert f"| {split} | near_a | {int(docs['near_a'].sum())}/{sizes['near_a']} |" in text
    assert text.index("| search | near_a") < text.index("| validation | near_a") < text.index("| test | near_a")
    assert "Documents scored (search split): 800 in all" in text


def test_racing_stops_candidates_below_the_top_k_and_keeps_elites_fully_scored(models, tmp_path):
    summary = run(models, tmp_path / "race", evaluator=documents(models), **RACING)
    full = run(models, tmp_path / "full", evaluator=documents(models), **{**RACING, "evaluation.racing": None})
    raced = {t.candidate: t for t in Ledger(tmp_path / "race" / "ledger.sqlite").trials("search")}
    scored = {t.candidate: t for t in Ledger(tmp_path / "full" / "ledger.sqlite").trials("search")}
    stopped = [c for c, t in raced.items() if t.estimated]
    assert stopped and all(raced[c].n_docs < 2 * DOCS for c in stopped)
    for c, t in raced.items():
        if not t.estimated:  # scored in full: the same as without racing
            assert t.fitness == scored[c].fitness and t.n_docs == 2 * DOCS
    threshold_at = {}  # candidate k's threshold: the top_k (2)-th best fully scored fitness among 0 .. k - W (W = 2)
    for c in stopped:
        basis = sorted((raced[b].fitness for b in range(c - 1) if not raced[b].estimated), reverse=True)
        threshold_at[c] = basis[1]
        assert scored[c].fitness < threshold_at[c]  # this toy's stopped candidates were all truly below it
    validated = [t.candidate for t in Ledger(tmp_path / "race" / "ledger.sqlite").trials("validation")]
    assert not set(validated) & set(stopped) and summary.candidate == full.candidate
    scores = json.loads((tmp_path / "race" / "best" / "scores.json").read_text())
    assert scores["documents"] == {"search": sum(t.n_docs for t in raced.values()), "per_trial": summary.documents / 16,
                                   "estimated": len(stopped)}
    assert summary.documents < full.documents == 16 * 2 * DOCS


def test_a_racing_run_interrupted_anywhere_and_resumed_equals_an_uninterrupted_run(models, tmp_path):
    reference = run(models, tmp_path / "reference", evaluator=documents(models), **RACING)
    for after in (3, 8, 13):
        run_dir = tmp_path / f"after{after}"
        with pytest.raises(Interrupted):
            run(models, run_dir, evaluator=documents(models), pool_class=interrupting_pool(after), **RACING)
        assert resume(run_dir, documents(models), progress=False) == reference
        assert genomes(run_dir) == genomes(tmp_path / "reference")
        assert [t.estimated for t in sorted(Ledger(run_dir / "ledger.sqlite").trials("search"),
                                            key=lambda t: t.candidate)] == \
            [t.estimated for t in sorted(Ledger(tmp_path / "reference" / "ledger.sqlite").trials("search"),
                                         key=lambda t: t.candidate)]


def test_aggregate_and_racing_errors_name_the_key(models, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(models, evaluation={"aggregate": "median"})))
    with pytest.raises(EvomergeError, match=r"exp.yaml: evaluation.aggregate: Input should be 'mean', 'min' or 'geometric'"):
        load_experiment(path)
    path.write_text(yaml.safe_dump(experiment(models, evaluation={"racing": {"first": 1.5}})))
    with pytest.raises(EvomergeError, match=r"exp.yaml: evaluation.racing.first: Input should be less than 1"):
        load_experiment(path)
