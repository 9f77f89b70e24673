"""The search loop: ask/tell over a worker pool, with a ledger and checkpoints that make any crash resumable.

Determinism. With W = workers.num, the optimizer is told results in candidate order (a result that arrives early waits in
a buffer), and right after each tell it is asked for new candidates while fewer than W are asked and not told. The
sequence of asks and tells is then fixed by the config and seed alone: candidate k is asked after exactly the tells of
candidates 0 .. k - W, however fast the workers are. A CMA-ES generation comes out whole (ask gives [] until it is told)
and is dispatched whole. The budget is exact: candidates asked past it are never run (`budget.hours` ends the run at
the candidates run when the time is up, frozen as budget.trials: the config then remakes it). The price: a worker done
early waits while an earlier candidate runs. `workers.tell_order: arrival` tells results as they come instead, so TPE
and random search keep every worker busy; random search stays reproducible (its proposals ignore results), TPE does not.

Repeats. Different genomes can decode to the same recipe (an excluded DFS slot's scale, a clipped gene, a GA's copy):
a candidate whose recipe identity was scored already is not run; its ledger row is the earlier one's ("repeat of N").
Scoring is deterministic, so this changes no result, only the time.

Durability. Each result goes to the ledger first, then to the optimizer, then optimizer.pkl is rewritten (atomically).
Resume loads optimizer.pkl, tells it the ledger's results for the candidates it still waits for, runs the others, and
goes on. A ledger row is reused whenever the optimizer proposes its candidate again, so an unreadable optimizer.pkl is
replaced by a fresh optimizer that replays the whole ledger to the same state.

Objectives. The optimizer maximizes the fitness (the aggregate of the task scores: `evaluation.aggregate`), or, with
`evaluation.objectives`, the vector of those tasks' scores (a multi-objective optimizer, e.g. NSGA-II); failed: None.
It is told each document's score too (evaluate.docs.completed), which natural niches compete on.

Racing (`evaluation.racing`). Candidate k is scored against a threshold, the top_k-th best fitness (distinct recipes)
among the fully scored candidates 0 .. k - W; it is dispatched once those are in the ledger, so the threshold, and with
it the run, depends on the config and seed alone, and a resume recomputes it from the ledger. Fewer than top_k fully
scored: no threshold, scored in full. A stopped candidate's row is marked `estimated`; elites are fully scored ones.

After the budget: the top-k trials by search fitness are re-scored on `validation`, the winner (best on validation) is
scored once on `test`, and best/recipe.yaml + best/scores.json are written. Rows already in the ledger are never rerun,
except failed validation/test rows: those are tried again on resume. A held-out score that failed is listed in the
summary (`held_out_failures`); an elite without a validation score cannot win.
With several objectives the elites are the Pareto front of the search trials (best fitness first, at most top-k), and
scores.json lists that front too.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import numpy as np
import yaml

from evomerge.errors import EvomergeError
from evomerge.evaluate.docs import completed, count
from evomerge.optim import Optimizer, load_optimizer, make_optimizer, non_dominated, save_optimizer
from evomerge.recipe import recipe_from_dict, save_recipe, to_evomerge_yaml, write_text_atomic
from evomerge.run.checks import CheckedSpace, check_ray_address, check_space, check_workers
from evomerge.run.config import EvaluationConfig, Experiment
from evomerge.run.evaluation import objective_values
from evomerge.run.ledger import Ledger, Trial
from evomerge.run.memory import choose_sources, device_capacity
from evomerge.run.pool import Pool, RunnerSpec, Task, make_pool
from evomerge.run.rundir import RunDir

# (evaluation config, the worker's live base model) -> an evaluator with evaluate(model, split=)
EvaluatorFactory = Callable[[EvaluationConfig, str], Any]


@dataclass
class Summary:
    """The outcome of a finished run (also in best/scores.json)."""
    candidate: int  # the winner
    recipe_hash: str
    fitness: dict[str, float | None]  # split -> the winner's fitness
    trials: int
    failed: int
    held_out_failures: tuple[str, ...] = ()  # "validation of trial 3: <error>": retried by resume
    documents: int = 0  # documents scored on the search split, over all trials (repeats cost none)


def search(experiment: Experiment, run_dir, make_evaluator: EvaluatorFactory, *, pool: Pool | None = None,
           progress: bool = True, source: str = "<experiment>") -> Summary:
    """Run (or, for a run dir holding the same config, continue) the search of `experiment` in `run_dir`. `source`: the
    experiment file, named by the errors of the checks that run before the run dir is made."""
    checked = _check(experiment, source, pool)
    with RunDir(run_dir) as rd:
        return _run(rd, rd.freeze(_with_compute_dtype(experiment, checked)), checked, make_evaluator, pool, progress)


def resume(run_dir, make_evaluator: EvaluatorFactory, *, experiment: Experiment | None = None, pool: Pool | None = None,
           progress: bool = True) -> Summary:
    """Continue the run in `run_dir` from its files alone (`experiment`, if given, must match the frozen config)."""
    with RunDir(run_dir) as rd:
        frozen = rd.frozen()  # refuses a dir that holds no run
        checked = _check(frozen if experiment is None else experiment, str(rd.config), pool)
        experiment = frozen if experiment is None else rd.freeze(_with_compute_dtype(experiment, checked))
        return _run(rd, experiment, checked, make_evaluator, pool, progress)


def _with_compute_dtype(experiment: Experiment, checked: CheckedSpace) -> Experiment:
    """`workers.dtype` stated: when not given, the sources' common dtype (float32 for sources of several dtypes), so
    that layers of every source meet in one dtype in a worker's live models."""
    if experiment.workers.dtype is not None or checked.dtype is None:
        return experiment
    workers = experiment.workers.model_copy(update={"dtype": str(checked.dtype).removeprefix("torch.")})
    return experiment.model_copy(update={"workers": workers})


def _check(experiment: Experiment, source: str, pool: Pool | None) -> CheckedSpace:
    """The up-front checks (run.checks); the workers' device, address and memory only when this search starts its
    pool (`workers.sources: device` that does not fit its device stops here, before any model is loaded)."""
    checked = check_space(experiment, source)
    if pool is None:
        check_workers(experiment.workers, source)
        choose_sources(experiment.workers.sources, checked.memory, device_capacity(experiment.workers), source=source)
    return checked


def memory_plan(experiment: Experiment, *, source: str, device_here: bool = True):
    """`evomerge plan`: the up-front checks of a search (no run dir, no trial), then (the memory plan, the device
    memory per worker it is held against). `device_here=False` plans for `workers.device_memory` without looking for
    the device on this machine (a Ray address is still checked)."""
    checked = check_space(experiment, source, headers_only=True)  # a hub model is not downloaded to be planned
    workers = experiment.workers
    if device_here:
        check_workers(workers, source)
    elif workers.backend == "ray" and workers.ray_address:
        check_ray_address(workers.ray_address, source)
    return checked.memory, device_capacity(workers)


def _run(rd: RunDir, experiment: Experiment, checked: CheckedSpace, make_evaluator: EvaluatorFactory,
         pool: Pool | None, progress: bool) -> Summary:
    models, space = checked.models, checked.space
    for warning in checked.warnings:
        _log(rd, warning, echo=True)
    ledger = rd.open_ledger()
    owned = pool is None
    try:
        optimizer = _optimizer(experiment, rd, space, ledger)
        _check_ledger(optimizer, ledger, rd, experiment.evaluation.split)
        if owned:
            workers, base = experiment.workers, checked.base
            spec = RunnerSpec(tuple(models), base, partial(make_evaluator, experiment.evaluation, base), workers.device,
                              workers.dtype, preflight_split=experiment.evaluation.split, sources=workers.sources,
                              path_models=checked.path_models, memory=checked.memory,
                              device_memory=device_capacity(workers), compile=workers.compile)
            pool = make_pool(spec, workers)
        loop = _Loop(experiment, rd, space, optimizer, ledger, pool, progress)
        loop.run()
        return loop.finish()
    finally:
        if owned and pool is not None:
            pool.close()
        ledger.close()


# optuna's CmaEsSampler keeps samples inside the box by drawing again (cmaes's rejection sampling, an O(genes^2) draw
# each time): measured per candidate, 2.8 s at 300 genes by the 24th, 10 s at 400 by the 12th, 50 s at 600 by the 8th.
OPTUNA_CMAES_MAX_DIM = 300


def _optimizer(experiment: Experiment, rd: RunDir, space, ledger: Ledger) -> Optimizer:
    if experiment.optimizer.name == "optuna_cmaes" and space.dim > OPTUNA_CMAES_MAX_DIM:
        _log(rd, f"optuna_cmaes over {space.dim} genes: its bound handling redraws samples, seconds to minutes a "
                 f"candidate past {OPTUNA_CMAES_MAX_DIM} genes; optimizer cmaes (pycma) transforms bounds instead",
             echo=True)
    if rd.optimizer.exists():
        try:
            return load_optimizer(rd.optimizer)
        except EvomergeError as err:
            _log(rd, f"{err}; rebuilding the optimizer and replaying the ledger", echo=True)
    elif ledger.trials(experiment.evaluation.split):
        _log(rd, "no optimizer.pkl; rebuilding the optimizer and replaying the ledger", echo=True)
    try:
        return make_optimizer(experiment.optimizer.name, *space.bounds, seed=experiment.seed, x0=space.x0,
                              anchors=space.anchors, n_objectives=len(experiment.evaluation.objectives or [None]),
                              run_dir=rd.path,
                              options=experiment.optimizer.options, source=str(rd.config))
    except EvomergeError as err:
        if not rd.optimizer.exists():
            raise
        raise EvomergeError(f"optimizer.pkl is unreadable and a fresh optimizer cannot replay the ledger ({err}); move "
                            "the optimizer's storage (optuna.sqlite3) aside and resume again", source=str(rd.path)) from None


def _check_ledger(optimizer: Optimizer, ledger: Ledger, rd: RunDir, split: str) -> None:
    """The ledger is the source of truth: every result the optimizer checkpoint was told must have its row there."""
    recorded = {t.candidate for t in ledger.trials(split)}
    lost = sorted(r.id for r in optimizer.results if r.id not in recorded)
    if lost:
        shown = ", ".join(map(str, lost[:8])) + (", ..." if len(lost) > 8 else "")
        raise EvomergeError(f"the ledger lacks {len(lost)} trial(s) that optimizer.pkl has seen (candidates {shown}): "
                            "it was emptied, replaced, or copied without ledger.sqlite-wal; restore both files from "
                            "the original run dir, or start a new run dir", source=str(rd.ledger))


def _log(rd: RunDir, message: str, echo: bool = False) -> None:
    if echo:
        print(f"warning: {message}", file=sys.stderr)
    rd.logs.mkdir(parents=True, exist_ok=True)
    with open(rd.logs / "search.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


class _Loop:
    def __init__(self, experiment: Experiment, rd: RunDir, space, optimizer: Optimizer, ledger: Ledger, pool: Pool,
                 progress: bool):
        self.experiment, self.rd, self.space, self.opt, self.ledger, self.pool = experiment, rd, space, optimizer, ledger, pool
        self.width, self.budget = experiment.workers.num, experiment.budget.trials
        self.split, self.objectives = experiment.evaluation.split, experiment.evaluation.objectives
        self.recorded: dict[int, Trial] = {}  # search-split results in the ledger, by candidate
        self.by_recipe: dict[str, Trial] = {}  # the first successful trial of each recipe identity
        for trial in ledger.trials(self.split):
            self.recorded.setdefault(trial.candidate, trial)
            if trial.ok:
                self.by_recipe.setdefault(trial.recipe_hash, trial)
        self.failed_in_a_row = 0  # trials run by this process (see budget.max_consecutive_failures)
        self.results: dict[int, tuple] = {}  # arrived, not yet told: (fitness, per-document scores)
        self.in_flight: dict[int, tuple[str, str]] = {}  # candidate -> its recipe (evomerge YAML, identity)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.budget, desc=experiment.name, unit="trial", dynamic_ncols=True)
            self._update_bar()

    # -- the search ---------------------------------------------------------------------------------------------------
    def run(self) -> None:
        self._fill()
        save_optimizer(self.opt, self.rd.optimizer)
        hours = self.experiment.budget.hours
        deadline = time.monotonic() + 3600 * hours if hours else None
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    self._end_at_deadline()
                    deadline = None
                self._dispatch()
                if self._advance():
                    continue
                if not self.in_flight:
                    break
                for result in self.pool.wait():
                    self._record(result)
        finally:  # before any error's line, so that line comes last
            if self.bar is not None:
                self.bar.close()
        missing = [i for i in range(min(self.budget, self.opt.n_asked)) if i in self.opt.pending]
        if missing:  # the scheduler's invariant; a failure here is a bug, not bad input
            raise RuntimeError(f"search ended with candidates never told: {missing}")

    def _end_at_deadline(self) -> None:
        """budget.hours have passed: the candidates run or running become budget.trials, frozen into config.yaml, so
        that the run is the one a search with that budget makes; the trials in flight finish."""
        ran = max(1, max([*self.recorded, *self.in_flight, *self.results], default=-1) + 1)
        if ran >= self.budget:
            return
        self.experiment = self.rd.set_budget(ran, self.experiment.budget.hours).model_copy(
            update={"workers": self.experiment.workers})  # this process's workers, as resumed
        self.budget = ran
        _log(self.rd, f"budget.hours ({self.experiment.budget.hours:g} h) passed: no new candidates, the run ends at "
                      f"{ran} trials (budget.trials in config.yaml; `evomerge resume {self.rd.path} --trials N` goes on)",
             echo=True)
        if self.bar is not None:
            self.bar.total = ran

    def _fill(self) -> None:
        """Ask while fewer than `width` candidates are out (called only right after a tell, or at the start)."""
        while self.opt.n_asked < self.budget and self.opt.n_asked - self.opt.n_told < self.width:
            if not self.opt.ask():
                break  # e.g. a CMA-ES generation still out

    def _dispatch(self) -> None:
        """Send waiting candidates to idle workers, in candidate order; a candidate in the ledger is not run again."""
        for cid in sorted(self.opt.pending):
            if cid >= self.budget or cid in self.in_flight or cid in self.results:
                continue
            candidate = self.opt.pending[cid]
            if cid in self.recorded:
                trial = self.recorded[cid]
                if not np.array_equal(np.asarray(trial.genome), candidate.genome):
                    raise EvomergeError(f"the ledger's candidate {cid} differs from the one the optimizer proposes: "
                                        "the run dir was edited, or its optimizer is not deterministic; start a new run "
                                        "dir", source=str(self.rd.ledger))
                self.results[cid] = self._told(trial)
                continue
            if not self.pool.idle or not self._race_ready(cid):
                continue  # later candidates may still be in the ledger
            recipe = self.space.decode(candidate.genome)
            if recipe.identity in self.by_recipe:  # these weights were scored already (genomes can decode alike)
                self._record_repeat(cid, candidate.genome, self.by_recipe[recipe.identity])
                continue
            self.in_flight[cid] = (to_evomerge_yaml(recipe), recipe.identity)  # for the ledger
            self.pool.submit(Task(cid, recipe, self.split, self._race_threshold(cid)))

    # -- racing -------------------------------------------------------------------------------------------------------
    def _race_basis(self, cid: int) -> range:
        """The candidates whose results set candidate cid's threshold: 0 .. cid - W (fixed by cid alone)."""
        return range(max(0, cid - self.width + 1))

    def _race_ready(self, cid: int) -> bool:
        return self.experiment.evaluation.racing is None or all(c in self.recorded for c in self._race_basis(cid))

    def _race_threshold(self, cid: int) -> float | None:
        """The top_k-th best fitness of distinct recipes fully scored in the basis; None (score in full) without racing
        or with fewer of them."""
        if self.experiment.evaluation.racing is None:
            return None
        full = {t.recipe_hash: t.fitness for c in self._race_basis(cid) if (t := self.recorded[c]).ok and not t.estimated}
        k = max(1, self.experiment.validation.top_k)
        return sorted(full.values(), reverse=True)[k - 1] if len(full) >= k else None

    def _record(self, result) -> None:
        cid = result.candidate
        trial = self._append(result, self.opt.pending[cid].genome, *self.in_flight.pop(cid))
        self.recorded[cid] = trial
        self.results[cid] = self._told(trial)
        if trial.ok:
            self.by_recipe.setdefault(trial.recipe_hash, trial)
        self._update_bar()
        self._stop_if_failing(trial)

    def _stop_if_failing(self, trial: Trial) -> None:
        """Stop the run, resumable, after `budget.max_consecutive_failures` failed trials in a row."""
        self.failed_in_a_row = 0 if trial.ok else self.failed_in_a_row + 1
        limit = self.experiment.budget.max_consecutive_failures
        if limit and self.failed_in_a_row >= limit:
            raise EvomergeError(f"stopped after {limit} failed trials in a row; the last, candidate {trial.candidate}: "
                                f"{trial.error}. Fix the cause and continue with `evomerge resume {self.rd.path}`",
                                source=str(self.rd.path))

    def _record_repeat(self, cid: int, genome, twin: Trial) -> None:
        """A candidate whose recipe was scored before: scoring is deterministic, so its row is the twin's (worker
        "repeat of N"), written without running it."""
        trial = replace(twin, candidate=cid, genome=[float(g) for g in genome], worker=f"repeat of {twin.candidate}",
                        t_merge=0.0, t_eval=0.0, t_total=0.0, n_docs=0, id=None)
        self.ledger.append(trial)
        self.recorded[cid] = trial
        self.results[cid] = self._told(trial)
        self._update_bar()

    def _told(self, trial: Trial) -> tuple:
        """What the optimizer learns of a trial: (its fitness, or its objectives vector; None when it failed) and its
        per-document scores (estimates where racing stopped it)."""
        if not trial.ok:
            return None, None
        return trial.objectives if self.objectives else trial.fitness, completed(trial.docs)

    def _advance(self) -> bool:
        """Tell the buffered results that are next (in candidate or arrival order), asking after each tell; checkpoint."""
        told = False
        while (cid := self._next_to_tell()) is not None:
            self.opt.tell(cid, *self.results.pop(cid))
            self._fill()
            told = True
        if told:
            save_optimizer(self.opt, self.rd.optimizer)
        return told

    def _next_to_tell(self) -> int | None:
        if self.experiment.workers.tell_order == "arrival":
            return next(iter(self.results), None)  # dicts keep insertion (arrival) order
        first = min(self.opt.pending, default=None)
        return first if first in self.results else None

    def _append(self, result, genome, recipe_yaml: str, recipe_hash: str) -> Trial:
        """The ledger row of a result: written before anything else learns of it."""
        trial = Trial(candidate=result.candidate, split=result.split, genome=[float(g) for g in genome],
                      recipe_hash=recipe_hash, recipe=recipe_yaml, scores=result.scores, fitness=result.fitness,
                      status=result.status, error=result.error, worker=result.worker,
                      t_merge=result.t_merge, t_eval=result.t_eval, t_total=result.t_total,
                      docs=result.docs, n_docs=count(result.docs), estimated=result.estimated)
        if self.objectives and trial.ok:
            try:
                trial.objectives = objective_values(result.scores, self.objectives)
            except EvomergeError as err:  # a wrong task name: every trial would fail alike, so stop now
                raise EvomergeError(f"{err}; start a new run dir with a corrected config",
                                    source=str(self.rd.config)) from None
            if not all(math.isfinite(v) for v in trial.objectives):
                trial.error = f"non-finite objective(s) {trial.objectives}"
                trial.fitness, trial.objectives = None, None
        for note in result.notes:  # e.g. out of memory: scored again at a smaller batch
            _log(self.rd, f"candidate {result.candidate} ({result.split}, {result.worker}): {note}", echo=True)
        if not trial.ok:
            trial.status = "failed"
            _log(self.rd, f"candidate {result.candidate} ({result.split}) failed: {trial.error}")
        self.ledger.append(trial)
        return trial

    def _update_bar(self) -> None:
        if self.bar is None:
            return
        done = [t for cid, t in self.recorded.items() if cid < self.budget]
        best = max((t.fitness for t in done if t.ok), default=None)
        self.bar.n = len(done)
        self.bar.set_postfix_str(f"best {best:.4g}" if best is not None else "best -", refresh=False)
        self.bar.refresh()

    # -- fitness hygiene: validation, test, best/ ---------------------------------------------------------------------
    def finish(self) -> Summary:
        searched = [t for cid, t in sorted(self.recorded.items()) if cid < self.budget]
        front = self._pareto_front(searched) if self.objectives else None
        candidates = searched if front is None else front
        ranked = sorted((t for t in candidates if t.ok and not t.estimated), key=lambda t: (-t.fitness, t.candidate))
        ranked = _first_of_each_recipe(ranked)  # validate distinct recipes, not one recipe top_k times
        if not ranked:
            raise EvomergeError(f"all {len(searched)} trials failed; the errors are in the ledger and logs/search.log",
                                source=str(self.rd.path))
        top_k = self.experiment.validation.top_k
        elites = ranked[:top_k] if top_k else ranked[:1]
        validation = self._score(elites, "validation") if top_k else {}
        if top_k:
            winner = max(elites, key=lambda t: (_fitness(validation[t.candidate]), -t.candidate))
        else:
            winner = elites[0]
        test = self._score([winner], "test")[winner.candidate]
        return self._write_best(winner, elites, validation, test, searched, front)

    def _pareto_front(self, trials: list[Trial]) -> list[Trial]:
        """The successful trials whose objectives no other trial's dominate, in candidate order, each recipe once."""
        ok = [t for t in trials if t.ok]
        return _first_of_each_recipe([ok[i] for i in non_dominated([t.objectives for t in ok])])

    def _score(self, trials: list[Trial], split: str) -> dict[int, Trial]:
        """Each trial's row on `split`: from the ledger, else evaluated now (on as many workers as are idle)."""
        scored = {t.candidate: t for t in self.ledger.trials(split) if t.ok}  # a failed row is tried again
        todo = [t for t in trials if t.candidate not in scored]
        by_id = {t.candidate: t for t in todo}
        pending = 0
        while todo or pending:
            while todo and self.pool.idle:
                t = todo.pop(0)
                self.pool.submit(Task(t.candidate, recipe_from_dict([yaml.safe_load(t.recipe)]), split))
                pending += 1
            for result in self.pool.wait():
                pending -= 1
                searched = by_id[result.candidate]
                scored[result.candidate] = self._append(result, searched.genome, searched.recipe, searched.recipe_hash)
        return scored

    def _write_best(self, winner: Trial, elites, validation, test: Trial, searched, front) -> Summary:
        fitness = {self.split: winner.fitness, "validation": validation[winner.candidate].fitness if validation else None,
                   "test": test.fitness}
        recipe = recipe_from_dict([yaml.safe_load(winner.recipe)]).with_provenance(
            run=self.experiment.name, trial=winner.candidate, fitness=fitness)
        self.rd.best.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, self.rd.best / "recipe.yaml")
        from evomerge.export import export_text

        mergekit_yaml, warnings = export_text(recipe, "mergekit")
        write_text_atomic(self.rd.best / "recipe.mergekit.yaml", "".join(f"# warning: {w}\n" for w in warnings) + mergekit_yaml)
        held_out = [validation[t.candidate] for t in elites if validation] + [test]
        failures = tuple(f"{t.split} of trial {t.candidate}: {t.error}" for t in held_out if not t.ok)
        summary = Summary(winner.candidate, winner.recipe_hash, fitness, len(searched), sum(not t.ok for t in searched),
                          failures, sum(t.n_docs for t in searched))
        scores = {"candidate": winner.candidate, "recipe_hash": winner.recipe_hash, "fitness": fitness,
                  "scores": {self.split: winner.scores, "validation": validation[winner.candidate].scores if validation
                             else None, "test": test.scores},
                  "elites": [{"candidate": t.candidate, self.split: t.fitness,
                              "validation": validation[t.candidate].fitness if validation else None} for t in elites],
                  "trials": summary.trials, "failed": summary.failed, "held_out_failures": list(failures),
                  "documents": {"search": summary.documents, "per_trial": summary.documents / max(1, summary.trials),
                                "estimated": sum(t.estimated for t in searched)}}
        if front is not None:
            scores["pareto_front"] = [{"candidate": t.candidate, "objectives": dict(zip(self.objectives, t.objectives))}
                                      for t in front]
        write_text_atomic(self.rd.best / "scores.json", json.dumps(scores, indent=2) + "\n")
        return summary


def _first_of_each_recipe(trials: list[Trial]) -> list[Trial]:
    first: dict[str, Trial] = {}
    for trial in trials:
        first.setdefault(trial.recipe_hash, trial)
    return list(first.values())


def _fitness(trial: Trial) -> float:
    return trial.fitness if trial.ok else -math.inf
