"""Optimizers: one suite over every registry entry (determinism, resume, failures, progress), then per-backend details."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.optim import OPTIMIZERS, load_optimizer, make_optimizer, save_optimizer

DIM = 4
CENTRE = np.array([0.2, 0.7, 0.4, 0.9])
SMALL = {"cmaes": {"popsize": 6}, "optuna_cmaes": {"popsize": 6}, "nsga2": {"population_size": 6}, "tpe": {}, "random": {},
         "niches": {"archive_size": 6}}


def quadratic(genome):
    return -float(np.sum((genome - CENTRE) ** 2))


def make(name, tmp_path=None, seed=0, n_objectives=1, **options):
    if tmp_path is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
    return make_optimizer(name, np.zeros(DIM), np.ones(DIM), seed=seed, x0=np.full(DIM, 0.5),
                          options={**SMALL[name], **options}, run_dir=tmp_path, n_objectives=n_objectives)


def fitness(candidate):
    """The quadratic, with every 5th candidate failing (NaN) to exercise failure handling everywhere."""
    return float("nan") if candidate.id % 5 == 4 else quadratic(candidate.genome)


def drive(opt, n_tells, queue=None, checkpoint=None):
    """Keep up to 3 candidates out and tell the newest first (results out of order), like busy workers would.

    With `checkpoint`, the optimizer is saved after every third tell and reloaded from the file, as a resumed run does; the
    queue is rebuilt from the optimizer's pending candidates. Returns every genome asked, in order, and the optimizer.
    """
    asked, queue = [], list(queue or [])
    while opt.n_told < n_tells:
        while len(queue) < 3 and (batch := opt.ask()):
            asked += [c.genome for c in batch]
            queue += batch
        candidate = queue.pop()
        opt.tell(candidate.id, fitness(candidate))
        if checkpoint and opt.n_told % 3 == 0:
            save_optimizer(opt, checkpoint)
            opt = load_optimizer(checkpoint)
            queue = sorted(opt.pending.values(), key=lambda c: c.id)
    return asked, opt


@pytest.fixture(params=sorted(OPTIMIZERS))
def name(request):
    return request.param


def test_same_seed_same_genomes(name):
    first, _ = drive(make(name), 14)  # optuna: in memory (SQLite in the resume test)
    second, _ = drive(make(name), 14)
    other, _ = drive(make(name, seed=1), 14)
    np.testing.assert_array_equal(np.array(first), np.array(second))
    assert not np.array_equal(np.array(first), np.array(other))
    assert all(np.all((g >= 0) & (g <= 1)) for g in first)


RESUME = """
import pickle, sys
import numpy as np
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_optim import drive, load_optimizer, make, save_optimizer
run_dir, name, told = Path({run_dir!r}), {name!r}, {told}
if told == 0:  # the first part: run until `stop` tells, checkpoint, exit with candidates still pending
    asked, opt = drive(make(name, run_dir, **{options!r}), {stop})
    save_optimizer(opt, run_dir / "opt.pkl")
    queue = [c.id for c in sorted(opt.pending.values(), key=lambda c: c.id)]
else:  # the resume, in another process: the queue rebuilt from the checkpoint
    opt = load_optimizer(run_dir / "opt.pkl")
    queue = [opt.pending[i] for i in pickle.loads((run_dir / "part.pkl").read_bytes())[1]]
    asked, opt = drive(opt, told, queue=queue, checkpoint=run_dir / "opt.pkl")
    queue = [opt.n_told, opt.n_failed]
(run_dir / ("part.pkl" if told == 0 else "rest.pkl")).write_bytes(pickle.dumps((np.array(asked), queue)))
"""


def _in_a_process(hash_seed: int, **fields):
    """Run RESUME in a fresh interpreter whose str/bytes hashes are salted with `hash_seed`."""
    script = RESUME.format(tests=str(Path(__file__).parent), **fields)
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_in_a_new_process_equals_an_uninterrupted_run(name, tmp_path):
    """Checkpoint and resume in two processes with different hash seeds; CMA-ES with its step so wide that most
    samples leave the box, so cma repairs them (its genotypes differ from the genomes it sends)."""
    options = {"sigma0": 0.8} if name == "cmaes" else {}
    straight, reference = drive(make(name, tmp_path / "a", **options), 13)  # optuna: SQLite in the run dir
    straight = np.array(straight)
    if name == "cmaes":
        assert np.sum(np.minimum(straight, 1 - straight) < 0.05) >= 5  # cma's bound transform is not the identity there
    fields = {"run_dir": str(tmp_path / "b"), "name": name, "options": options, "stop": 5}
    _in_a_process(1, told=0, **fields)
    part, queue = pickle.loads((tmp_path / "b" / "part.pkl").read_bytes())
    assert queue, "the checkpoint must hold pending candidates"
    _in_a_process(2, told=13, **fields)
    rest, (n_told, n_failed) = pickle.loads((tmp_path / "b" / "rest.pkl").read_bytes())
    np.testing.assert_array_equal(straight, np.concatenate([part, rest]))
    assert n_told == 13 and n_failed == reference.n_failed > 0


def test_failures_are_recorded_and_never_best(name):
    opt = make(name)  # optuna: in memory
    _, opt = drive(opt, 10)
    failed = [r for r in opt.results if not r.ok]
    assert len(failed) == opt.n_failed == 2 and {r.id % 5 for r in failed} == {4}
    batch = opt.ask() or [next(iter(opt.pending.values()))]
    opt.tell(batch[0].id, None)
    assert opt.best.ok and opt.best.fitness[0] == max(r.fitness[0] for r in opt.results if r.ok)
    with pytest.raises(KeyError):
        opt.tell(batch[0].id, 1.0)  # told already


def test_each_optimizer_improves_on_a_quadratic(name):
    _, opt = drive(make(name), 60)
    first = max(r.fitness[0] for r in opt.results[:6] if r.ok)  # the first generation (popsize 6)
    assert -opt.best.fitness[0] < 0.5 * -first, (first, opt.best.fitness)


# ---------------------------------------------------------------------------------------------------------------------
# interface details


def test_fitness_values_and_objectives(tmp_path):
    opt = make("random", tmp_path, n_objectives=2)
    pairs = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.4, 0.4), (float("inf"), 2.0)]
    for f in pairs:
        opt.tell(opt.ask()[0].id, f)
    assert [r.fitness for r in opt.pareto_front()] == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]  # inf is a failure
    with pytest.raises(ValueError, match="expected 2 fitness"):
        opt.tell(opt.ask()[0].id, 1.0)
    with pytest.raises(ValueError, match="no single best"):
        opt.best
    for single in ("cmaes", "optuna_cmaes"):
        with pytest.raises(EvomergeError, match=f"optimizer {single} takes one objective"):
            make(single, tmp_path / single, n_objectives=2)
    nsga = make("nsga2", tmp_path / "nsga", n_objectives=2)
    for _ in range(12):
        c = nsga.ask()[0]
        nsga.tell(c.id, [c.genome[0], 1 - c.genome[0] ** 2])
    assert len(nsga.pareto_front()) >= 1


def test_registry_errors_name_the_key():
    with pytest.raises(EvomergeError, match="optimizer: unknown optimizer 'cma'; did you mean 'cmaes'"):
        make_optimizer("cma", np.zeros(2), np.ones(2))
    with pytest.raises(EvomergeError, match=r"optimizer.sigma: unknown option \(options of cmaes: sigma0, popsize, diagonal\)"):
        make_optimizer("cmaes", np.zeros(2), np.ones(2), options={"sigma": 0.3})
    with pytest.raises(EvomergeError, match="optimizer.popsize: Input should be greater than or equal to 2"):
        make_optimizer("cmaes", np.zeros(2), np.ones(2), options={"popsize": 1})
    with pytest.raises(EvomergeError, match="optimizer.n_startup_trials"):
        make_optimizer("tpe", np.zeros(2), np.ones(2), options={"n_startup_trials": "many"})


def test_cmaes_asks_by_generation_and_penalizes_failures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    opt = make("cmaes")
    generation = opt.ask()
    assert len(generation) == 6 and opt.ask() == []  # nothing more until the generation is told
    assert np.random.rand() == expected  # cma ran on its own RNG state, not numpy's global one
    losses = {}
    for c in reversed(generation):  # out of order
        f = None if c.id in (1, 3) else quadratic(c.genome)
        opt.tell(c.id, f)
        if f is not None:
            losses[c.id] = -f
    assert opt.generation == 1 and len(opt.ask()) == 6
    told = np.sort(opt.es.fit.fit)  # what cma was told, sorted
    np.testing.assert_allclose(told[:4], np.sort(list(losses.values())))
    np.testing.assert_allclose(told[4:], max(losses.values()) + 1.0)  # the penalty: worse than the worst seen
    assert not (tmp_path / "outcmaes").exists()


def test_cmaes_over_many_genes_takes_a_diagonal_covariance_that_fits_in_memory_and_still_learns():
    """20,000 genes (the N^2 scales of a DFS over two 70-layer models): a full covariance holds several 20,000^2 float64
    matrices (~3.7 GB at 12,000 genes); the default takes the diagonal above 5,000 genes, and sep-CMA-ES still
    improves on a quadratic (asked for by `diagonal: true` at the suite's size)."""
    import tracemalloc

    n = 20000
    tracemalloc.start()
    try:
        opt = make_optimizer("cmaes", np.zeros(n), np.ones(n), seed=0, x0=np.full(n, 0.5))
        for _ in range(2):
            for c in opt.ask():
                opt.tell(c.id, -float(np.sum(c.genome)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert opt.generation == 2 and peak < 200 * 2**20, peak
    _, opt = drive(make("cmaes", diagonal=True), 60)
    first = max(r.fitness[0] for r in opt.results[:6] if r.ok)
    assert -opt.best.fitness[0] < 0.5 * -first, (first, opt.best.fitness)


def test_optuna_storage_lives_in_the_run_dir_and_survives_a_crash(tmp_path):
    opt = make("tpe", tmp_path)
    assert opt.storage == f"sqlite:///{tmp_path.resolve() / 'optuna.sqlite3'}" and (tmp_path / "optuna.sqlite3").exists()
    with pytest.raises(EvomergeError, match="study 'evomerge' already exists"):
        make("tpe", tmp_path)
    _, opt = drive(opt, 12)
    save_optimizer(opt, tmp_path / "opt.pkl")
    lost = opt.ask()[0]  # asked after the checkpoint, then the process dies
    resumed = load_optimizer(tmp_path / "opt.pkl")
    again = resumed.ask()[0]
    np.testing.assert_array_equal(again.genome, lost.genome)  # the same proposal, from the saved sampler state
    states = {t.number: t.state.name for t in resumed.study.get_trials()}
    assert states[opt._trial_of[lost.id]] == "FAIL" and states[resumed._trial_of[again.id]] == "RUNNING"


@pytest.mark.parametrize("optuna_name", ["tpe", "nsga2"])
def test_optuna_tell_first_after_loading_reaches_the_storage(tmp_path, optuna_name):
    """A resumed run's first call is a tell (of a result in the ledger): its trial is still pending, not lost."""
    opt = make(optuna_name, tmp_path)
    first = opt.ask()[0]
    save_optimizer(opt, tmp_path / "opt.pkl")
    resumed = load_optimizer(tmp_path / "opt.pkl")
    resumed.tell(first.id, quadratic(first.genome))
    [trial] = resumed.study.get_trials()
    assert trial.state.name == "COMPLETE" and trial.values == [quadratic(first.genome)]


def test_optuna_sqlalchemy_url_and_in_memory(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    opt = make_optimizer("nsga2", np.zeros(2), np.ones(2), options={"storage": url, "study_name": "s1"})
    assert opt.storage == url and opt.study.study_name == "s1"
    memory = make_optimizer("tpe", np.zeros(2), np.ones(2))
    assert memory.storage is None
    c = memory.ask()[0]
    copy = pickle.loads(pickle.dumps(memory))
    copy.tell(c.id, 1.0)
    assert copy.best.fitness == (1.0,) and len(copy.study.trials) == 1


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "opt.pkl").write_bytes(b"\x80\x05garbage")
    with pytest.raises(EvomergeError, match="opt.pkl: cannot load the optimizer checkpoint"):
        load_optimizer(tmp_path / "opt.pkl")
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"not": "an optimizer"}))
    with pytest.raises(EvomergeError, match="not an optimizer checkpoint"):
        load_optimizer(tmp_path / "other.pkl")


# -- natural niches --------------------------------------------------------------------------------------------------


def test_shared_fitness_known_values():
    from evomerge.optim.niches import shared_fitness

    scores = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    shares, fit = shared_fitness(scores, alpha=1.0)  # doc 0 solved by two members, doc 1 by one, doc 2 by none
    np.testing.assert_allclose(shares, [[0.5, 1.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(fit, [1.5, 0.5, 0.0])
    np.testing.assert_allclose(shared_fitness(scores, alpha=0.0)[1], [2.0, 1.0, 0.0])  # alpha 0: the plain sum
    np.testing.assert_allclose(shared_fitness(scores, alpha=0.5)[1], [1 / np.sqrt(2) + 1, 1 / np.sqrt(2), 0.0])


def _niches_after(rows, alpha):
    opt = make_optimizer("niches", np.zeros(2), np.ones(2), options={"archive_size": 3, "alpha": alpha})
    for row in rows:
        c = opt.ask()[0]
        opt.tell(c.id, float(np.mean(row)), docs=row)
    return sorted(map(tuple, opt.scores))


def test_a_specialist_survives_competition_for_documents():
    generalist, specialist, newcomer = [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 0]
    rows = [generalist, specialist, generalist, newcomer]  # archive of 3 full; the newcomer (mean 5/6) competes
    # alpha 1: fitness = generalists 4/3 each, specialist 1/2 + 1, newcomer 4/3 + 1/2 -> a generalist leaves
    assert _niches_after(rows, 1.0) == sorted([tuple(generalist), tuple(specialist), tuple(newcomer)])
    # alpha 0 (plain sum): generalists 4, specialist 2, newcomer 5 -> the specialist leaves
    assert _niches_after(rows, 0.0) == sorted([tuple(generalist), tuple(generalist), tuple(newcomer)])


def test_niches_asks_its_anchors_first_then_crosses_at_a_split_point():
    anchors = [np.full(DIM, 0.5), np.zeros(DIM), np.ones(DIM)]
    opt = make_optimizer("niches", np.zeros(DIM), np.ones(DIM), anchors=anchors, options={"mutation": 0.0})
    for want in anchors:
        c = opt.ask()[0]
        np.testing.assert_array_equal(c.genome, want)
        opt.tell(c.id, quadratic(c.genome))
    for _ in range(5):  # gene k of a child of 0 and 1 is v_k: w before the split point, 1 - w from it on
        child = opt._cross(np.zeros(DIM), np.ones(DIM))
        split = int(np.argmax(~np.isclose(child, child[0]))) or DIM
        assert np.allclose(child[:split], child[0]) and np.allclose(child[split:], 1 - child[0])
    c = opt.ask()[0]  # a child of two members: inside the box they span (no mutation)
    assert np.all((c.genome >= 0) & (c.genome <= 1))


def test_niches_needs_document_scores_for_all_results_or_none():
    opt = make_optimizer("niches", np.zeros(2), np.ones(2))
    c = opt.ask()[0]
    opt.tell(c.id, 0.5, docs=[1.0, 0.0])
    with pytest.raises(ValueError, match="per-document scores for every result, or for none"):
        opt.tell(opt.ask()[0].id, 0.5)
    with pytest.raises(ValueError, match="3 document scores; the archive's members have 2"):
        opt.tell(opt.ask()[0].id, 0.5, docs=[1.0, 0.0, 1.0])
