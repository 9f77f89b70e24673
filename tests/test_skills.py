"""Keeping every skill: per-document scores (packing), skill-aware aggregates, racing's bound and stopping rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from evomerge.evaluate.docs import completed, count, pack, unpack
from evomerge.evaluate.racing import hypergeometric_pmf, mean_p_value, race, reachable, stage_ends
from evomerge.evaluate.result import GEOMETRIC_EPS, TaskScore, aggregate, weighted_fitness


def test_documents_pack_to_bits_or_half_floats_and_back():
    rng = np.random.default_rng(0)
    docs = {"a": rng.integers(0, 2, 1000).astype(float), "b": np.array([0.25, 0.5, 1.0]), "c": np.array([1.0, 0.0])}
    blob = pack(docs, {"a": 1000, "b": 5, "c": 2})
    back, sizes = unpack(blob)
    assert sizes == {"a": 1000, "b": 5, "c": 2} and list(back) == ["a", "b", "c"]
    for task in docs:
        np.testing.assert_array_equal(back[task], docs[task])  # 0.25, 0.5 are exact in float16
    header = blob.index(b"\0")
    assert len(blob) - header - 1 == 125 + 3 * 2 + 1  # 1000 bits, three float16, two bits in one byte
    # b: two documents never scored take its mean on the three scored, 7/12
    np.testing.assert_allclose(completed(blob)[1000:1005], [0.25, 0.5, 1.0, 7 / 12, 7 / 12], atol=1e-12)
    assert count(blob) == 1005 and count(None) == 0 and completed(None) is None
    perplexities = np.array([3.5, 1.25e6, 70000.5])  # past float16's range (65504): kept as float32
    back, _ = unpack(pack({"p": perplexities, "c": np.array([1.0, 0.0])}, {"p": 3, "c": 2}))
    np.testing.assert_array_equal(back["p"], perplexities.astype(np.float32))
    np.testing.assert_array_equal(back["c"], [1.0, 0.0])


def test_a_thousand_trials_of_a_thousand_documents_take_a_few_hundred_kb():
    blob = pack({"t": np.ones(1000)}, {"t": 1000})
    assert 1000 * len(blob) < 200_000


def test_aggregates_known_values():
    values, weights = {"a": 0.9, "b": 1.0, "c": 0.0}, {"a": 1.0, "b": 1.0, "c": 1.0}
    assert aggregate(values, weights) == pytest.approx(1.9 / 3)
    assert aggregate(values, weights, "min") == 0.0
    eps = GEOMETRIC_EPS
    assert aggregate(values, weights, "geometric") == pytest.approx(((0.9 + eps) * (1 + eps) * eps) ** (1 / 3) - eps)
    three = {"a": 0.71, "b": 0.45, "c": 1.0}  # every skill kept beats two whole skills under geometric, not under mean
    assert aggregate(three, weights, "geometric") > aggregate(values, weights, "geometric")
    assert aggregate({"a": 1.0, "b": 1.0, "c": 1.0}, weights, "geometric") == pytest.approx(1.0)
    assert aggregate(values, {"a": 1.0, "b": 3.0, "c": 0.0}, "min") == 0.9  # weight 0: not a skill asked for
    with pytest.raises(ValueError, match="aggregate must be one of mean, min, geometric"):
        aggregate(values, weights, "median")
    scores = {t: TaskScore(task=t, metric="exact_match", value=v, n=50) for t, v in values.items()}
    assert weighted_fitness(scores, weights, "min").fitness == 0.0


def test_stage_ends_double_from_the_first_slice():
    assert stage_ends(50, 0.25) == [13, 25, 50]
    assert stage_ends(100, 0.1) == [10, 20, 40, 80, 100]
    assert stage_ends(3, 0.25) == [1, 2, 3] and stage_ends(1, 0.25) == [1]


def _pmf(size: int, solved: int, scored: int, x: int) -> float:
    """P(x solved among `scored` documents drawn at random from `size` of which `solved` are), written plainly."""
    return math.comb(solved, x) * math.comb(size - solved, scored - x) / math.comb(size, scored)


def test_hypergeometric_pmf_is_the_counting_formula():
    for size, scored in ((1, 1), (12, 4), (50, 5), (300, 40)):
        want = np.array([[_pmf(size, k, scored, x) for x in range(scored + 1)] for k in range(size + 1)])
        np.testing.assert_allclose(hypergeometric_pmf(size, scored), want, rtol=1e-12, atol=1e-300)


def _p_value_by_enumeration(solved, scored, sizes, weights, threshold):
    """The mean test's p-value from its definition: every K whose weighted mean reaches the threshold, and every outcome
    of the scored documents whose weighted count (m_t = w_t / n_t, here in whole steps) is at most the observed one."""
    tasks = list(sizes)
    step = {t: round(weights[t] / scored[t] / min(weights[u] / scored[u] for u in tasks)) for t in tasks}
    observed = sum(step[t] * solved[t] for t in tasks)
    best = 0.0
    for ks in itertools.product(*(range(sizes[t] + 1) for t in tasks)):
        if sum(weights[t] * k / sizes[t] for t, k in zip(tasks, ks)) < threshold - 1e-12:
            continue
        p = sum(math.prod(_pmf(sizes[t], k, scored[t], x) for t, k, x in zip(tasks, ks, xs))
                for xs in itertools.product(*(range(scored[t] + 1) for t in tasks))
                if sum(step[t] * x for t, x in zip(tasks, xs)) <= observed)
        best = max(best, p)
    return best


@pytest.mark.parametrize("weights, scored", [({"a": 0.5, "b": 0.5}, {"a": 4, "b": 4}),
                                             ({"a": 0.75, "b": 0.25}, {"a": 3, "b": 5})])
def test_mean_p_value_equals_its_definition(weights, scored):
    sizes = {"a": 10, "b": 12}
    for solved_a, solved_b, threshold in ((0, 1, 0.5), (2, 2, 0.7), (3, 4, 0.4), (1, 0, 0.9), (3, 5, 1.0)):
        solved = {"a": min(solved_a, scored["a"]), "b": min(solved_b, scored["b"])}
        want = _p_value_by_enumeration(solved, scored, sizes, weights, threshold)
        assert mean_p_value(solved, scored, sizes, weights, threshold) == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert mean_p_value({"a": 4, "b": 4}, scored, sizes, weights, 1.01) == 0.0  # no outcome reaches it


def test_the_mean_test_stops_a_candidate_that_reaches_the_threshold_at_most_at_its_level():
    """For every population whose mean reaches the threshold, the chance (summed over every outcome of the scored
    documents) that the test stops it is <= its level: the guarantee, checked exactly."""
    sizes, scored, weights, level = {"a": 12, "b": 12}, {"a": 4, "b": 4}, {"a": 0.5, "b": 0.5}, 0.1
    for threshold in (0.3, 0.5, 0.75):
        stops = [(xa, xb) for xa in range(5) for xb in range(5)
                 if mean_p_value({"a": xa, "b": xb}, scored, sizes, weights, threshold) <= level]
        assert stops  # the test does stop somewhere
        for ka in range(13):
            for kb in range(13):
                if (ka + kb) / 24 >= threshold:
                    chance = sum(_pmf(12, ka, 4, xa) * _pmf(12, kb, 4, xb) for xa, xb in stops)
                    assert chance <= level + 1e-12


@pytest.mark.parametrize("n, widening", [(20, 0.034), (40, 0.047)])
def test_mean_p_value_in_cells_is_conservative_and_close(n, widening):
    """Too many K combinations for the budget: the K of a and b go in cells, each taken at its least K (and c's
    completing their largest). That can only raise the p-value, and by no more than lowering the threshold by the
    cells' width: 20 scored documents per task, 19 cells of 16 (41 count values): 2 x (1/3) x 15/300 = 0.033; 40 scored,
    14 cells of 22 (81 values; b's count in 3 chunks of x): 2 x (1/3) x 21/300 = 0.047."""
    sizes, scored, weights = {"a": 300, "b": 300, "c": 300}, dict.fromkeys("abc", n), dict.fromkeys("abc", 1 / 3)
    for solved in ({"a": 5, "b": 9, "c": 4}, {"a": 12, "b": 10, "c": 11}, {"a": 20, "b": 0, "c": 3}):
        solved = {t: k * n // 20 for t, k in solved.items()}
        exact = [mean_p_value(solved, scored, sizes, weights, threshold, budget=2**30)
                 for threshold in (0.6, 0.6 - widening)]
        cells = mean_p_value(solved, scored, sizes, weights, 0.6, budget=2**14)
        assert exact[0] <= cells <= exact[1]


def test_min_and_geometric_use_each_tasks_exact_upper_bound():
    one = {"a": np.array([1.0] * 6 + [0.0] * 4)}  # 6 solved of the first 10 of 40 documents
    tail = [sum(_pmf(40, k, 10, x) for x in range(7)) for k in range(41)]  # P(X <= 6) for K = 0 .. 40
    ucb = max(k for k in range(41) if tail[k] > 0.05) / 40
    for how in ("min", "geometric", "mean"):  # one task: every aggregate is its score, and the tests agree
        assert reachable(one, {"a": 40}, {"a": 1.0}, how, ucb, 0.05)
        assert not reachable(one, {"a": 40}, {"a": 1.0}, how, ucb + 1e-9, 0.05)
    two = {"a": one["a"], "b": np.array([1.0, 0.0] * 10)}  # b: 0.5 over all of its 20 documents (exact)
    sizes, weights = {"a": 40, "b": 20}, {"a": 3.0, "b": 1.0}
    ucb_a = max(k for k in range(41) if tail[k] > 0.05 / 2) / 40  # a union bound over two tasks
    assert reachable(two, sizes, weights, "min", 0.5, 0.05) and not reachable(two, sizes, weights, "min", 0.5 + 1e-9, 0.05)
    geometric = aggregate({"a": ucb_a, "b": 0.5}, weights, "geometric")
    assert reachable(two, sizes, weights, "geometric", geometric, 0.05)
    assert not reachable(two, sizes, weights, "geometric", geometric + 1e-9, 0.05)
    with pytest.raises(ValueError, match="0 or 1"):
        reachable({"a": np.array([0.5, 1.0])}, {"a": 4}, {"a": 1.0}, "mean", 0.5, 0.05)


def _scorer(truth: dict[str, np.ndarray], log: list):
    def score(indices):
        log.append({t: len(i) for t, i in indices.items()})
        return {t: truth[t][i] for t, i in indices.items()}
    return score


def test_race_stops_a_hopeless_candidate_and_scores_a_good_one_in_full():
    rng = np.random.default_rng(1)
    poor = {t: (rng.random(100) < 0.1).astype(float) for t in "ab"}  # ~0.1 per task
    good = {t: (rng.random(100) < 0.9).astype(float) for t in "ab"}
    mean = ({"a": 1.0, "b": 1.0}, "mean")
    log = []
    docs, stopped = race(_scorer(poor, log), {"a": 100, "b": 100}, 0.8, *mean, first=0.25, delta=0.05)
    assert stopped and log == [{"a": 25, "b": 25}] and {t: len(v) for t, v in docs.items()} == {"a": 25, "b": 25}
    np.testing.assert_array_equal(docs["a"], poor["a"][:25])
    log.clear()
    docs, stopped = race(_scorer(good, log), {"a": 100, "b": 100}, 0.8, *mean, first=0.25, delta=0.05)
    assert not stopped and [d["a"] for d in log] == [25, 25, 50]  # stages add 25, 25, 50 documents
    np.testing.assert_array_equal(docs["b"], good["b"])
    log.clear()
    race(_scorer(poor, log), {"a": 100, "b": 100}, None, *mean, first=0.25, delta=0.05)
    assert log == [{"a": 100, "b": 100}]  # no threshold: one stage, every document


def test_race_spends_delta_over_its_looks():
    """Stages of 25, 50, 100 of 100 documents: two looks, each tested at delta / 2, so delta holds over the whole race."""
    truth = {"a": np.array([1.0] * 10 + [0.0] * 15 + [1.0] * 75)}  # 10 solved of the first 25
    p_value = [sum(_pmf(100, k, 25, x) for x in range(11)) for k in range(101)]  # P(X <= 10) for K solved of 100
    k = next(k for k in range(101) if p_value[k] <= 0.05)  # the least K a test at delta rejects
    assert p_value[k] > 0.025  # ... which a test at delta / 2 does not
    log = []
    _, stopped = race(_scorer(truth, log), {"a": 100}, k / 100, {"a": 1.0}, "mean", first=0.25, delta=0.05)
    assert not stopped and [d["a"] for d in log] == [25, 25, 50]
    log.clear()
    k = next(k for k in range(101) if p_value[k] <= 0.025)
    _, stopped = race(_scorer(truth, log), {"a": 100}, k / 100, {"a": 1.0}, "mean", first=0.25, delta=0.05)
    assert stopped and log == [{"a": 25}]


def test_racing_keeps_the_candidates_that_reach_the_top_at_the_stated_rate():
    """Over many candidates whose full-set mean is above the threshold, racing stops at most delta of them."""
    rng = np.random.default_rng(2)
    stopped = 0
    for _ in range(400):
        truth = {"a": (rng.random(60) < 0.62).astype(float)}
        if truth["a"].mean() < 0.6:
            continue
        _, s = race(_scorer(truth, []), {"a": 60}, 0.6, {"a": 1.0}, "min", first=0.25, delta=0.05)
        stopped += s
    assert stopped <= 0.05 * 400


def test_a_ledger_from_before_per_document_scores_gains_their_columns(tmp_path):
    import sqlite3

    from evomerge.run.ledger import Ledger, Trial

    old = sqlite3.connect(tmp_path / "ledger.sqlite")
    old.executescript("""CREATE TABLE trials (id INTEGER PRIMARY KEY AUTOINCREMENT, candidate INTEGER NOT NULL,
        split TEXT NOT NULL, genome TEXT NOT NULL, recipe_hash TEXT NOT NULL, recipe TEXT NOT NULL, scores TEXT NOT NULL,
        fitness REAL, objectives TEXT, status TEXT NOT NULL, error TEXT, worker TEXT, t_merge REAL, t_eval REAL,
        t_total REAL, created REAL NOT NULL);
        INSERT INTO trials (candidate, split, genome, recipe_hash, recipe, scores, fitness, status, created)
        VALUES (0, 'search', '[0.5]', 'h0', 'r', '{}', 0.25, 'ok', 0);""")
    old.commit()
    old.close()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    blob = pack({"t": np.array([1.0, 0.0, 1.0])}, {"t": 3})
    ledger.append(Trial(candidate=1, split="search", genome=[0.1], recipe_hash="h1", recipe="r", fitness=0.5, docs=blob,
                        n_docs=3, estimated=True))
    first, second = ledger.trials("search")
    assert (first.docs, first.n_docs, first.estimated, first.fitness) == (None, 0, False, 0.25)
    assert (second.docs, second.n_docs, second.estimated) == (blob, 3, True)
    ledger.close()
