"""Keeping every skill: per-document scores (packing), skill-aware aggregates, racing's bound and stopping rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.evaluate.docs import completed, count, pack, unpack
from evomerge.evaluate.racing import race, stage_ends, upper_bound
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


def test_serfling_upper_bounds_known_values():
    one = {"a": np.array([1.0] * 6 + [0.0] * 4)}  # mean 0.6 over 10 of 40 documents
    want = 0.6 + math.sqrt((1 - 9 / 40) * math.log(1 / 0.05) / 20)
    for how in ("mean", "min", "geometric"):  # one task: every aggregate is its score
        assert upper_bound(one, {"a": 40}, {"a": 1.0}, how, 0.05) == pytest.approx(want)
    assert upper_bound(one, {"a": 10}, {"a": 1.0}, "mean", 0.05) == pytest.approx(0.6)  # all scored: the mean itself
    two = {"a": one["a"], "b": np.array([1.0, 0.0] * 10)}  # b: 0.5 over 20 of 20 (exact)
    sizes, weights = {"a": 40, "b": 20}, {"a": 3.0, "b": 1.0}
    mean = 0.75 * 0.6 + 0.25 * 0.5 + math.sqrt(math.log(20) / 2 * 0.75 ** 2 * (1 - 9 / 40) / 10)
    assert upper_bound(two, sizes, weights, "mean", 0.05) == pytest.approx(mean)
    ucb_a = 0.6 + math.sqrt(math.log(2 / 0.05) * (1 - 9 / 40) / 20)  # union bound over two tasks
    assert upper_bound(two, sizes, weights, "min", 0.05) == pytest.approx(min(ucb_a, 0.5))
    assert upper_bound(two, sizes, weights, "geometric", 0.05) == pytest.approx(
        aggregate({"a": ucb_a, "b": 0.5}, weights, "geometric"))
    assert upper_bound({"a": np.ones(5)}, {"a": 50}, {"a": 1.0}, "mean", 0.05) == 1.0


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
    """Stages of 25, 50, 100 of 100 documents: two looks, each bound at delta / 2, so delta holds over the whole race."""
    truth = {"a": np.array([1.0] * 10 + [0.0] * 15 + [1.0] * 75)}  # 0.4 over the first 25
    margin = lambda d: math.sqrt(math.log(1 / d) / 2 * (1 - 24 / 100) / 25)  # noqa: E731
    assert 0.4 + margin(0.05) < 0.625 < 0.4 + margin(0.025)  # stopped by a bound at delta, not at delta / 2
    log = []
    _, stopped = race(_scorer(truth, log), {"a": 100}, 0.625, {"a": 1.0}, "mean", first=0.25, delta=0.05)
    assert not stopped and [d["a"] for d in log] == [25, 25, 50]
    log.clear()
    _, stopped = race(_scorer(truth, log), {"a": 100}, 0.4 + margin(0.025) + 1e-9, {"a": 1.0}, "mean", first=0.25,
                      delta=0.05)
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
