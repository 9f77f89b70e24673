"""The append-only trial ledger (SQLite in the run dir): every evaluated candidate, never rewritten.

A row is written (and committed) as soon as a result comes back, before the optimizer is told, so a crash at any point
loses no evaluated trial: resume re-tells the optimizer from here. Re-scoring on other splits appends rows too.

SQLite in WAL mode: committed rows live in `ledger.sqlite-wal` until SQLite folds them into `ledger.sqlite` (at the
latest when the search closes the ledger), so a copy of a run dir must take both files. Opening checks the whole file
(`PRAGMA quick_check`): an unreadable ledger is a one-line error, never a silently shorter one.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate INTEGER NOT NULL,        -- the optimizer's candidate id
    split TEXT NOT NULL,               -- search, validation or test
    genome TEXT NOT NULL,              -- JSON list of floats
    recipe_hash TEXT NOT NULL,
    recipe TEXT NOT NULL,              -- evomerge YAML
    scores TEXT NOT NULL,              -- JSON {task: {metric, stderr, chance}}
    fitness REAL,                      -- NULL when failed
    objectives TEXT,                   -- JSON list: the scores of evaluation.objectives (multi-objective runs)
    status TEXT NOT NULL,              -- ok or failed
    error TEXT,
    worker TEXT,
    t_merge REAL, t_eval REAL, t_total REAL,
    created REAL NOT NULL,
    docs BLOB,                         -- per-document scores, packed (evaluate.docs: 1 bit per 0/1 score)
    n_docs INTEGER NOT NULL DEFAULT 0, -- documents scored for this row (0 for a repeat)
    estimated INTEGER NOT NULL DEFAULT 0  -- 1: racing stopped it; fitness is the estimate from n_docs documents
);
CREATE INDEX IF NOT EXISTS trials_candidate ON trials(candidate, split);
"""


ADDED = (("docs", "BLOB"), ("n_docs", "INTEGER NOT NULL DEFAULT 0"), ("estimated", "INTEGER NOT NULL DEFAULT 0"))


@dataclass
class Trial:
    candidate: int
    split: str
    genome: list[float]
    recipe_hash: str
    recipe: str
    scores: dict[str, Any] = field(default_factory=dict)
    fitness: float | None = None
    objectives: list[float] | None = None
    status: str = "ok"
    error: str | None = None
    worker: str | None = None
    t_merge: float = 0.0
    t_eval: float = 0.0
    t_total: float = 0.0
    docs: bytes | None = None
    n_docs: int = 0
    estimated: bool = False
    id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.fitness is not None and math.isfinite(self.fitness)


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: each insert is durable on return
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            problem = self.db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as err:  # garbage bytes, a file cut short
            problem = str(err)
        if problem != "ok":
            self.db.close()
            raise EvomergeError(f"unreadable ledger ({problem}); restore ledger.sqlite together with ledger.sqlite-wal "
                                "from a copy of the run dir, or start a new run dir", source=str(self.path))
        self._add_columns()

    def _add_columns(self) -> None:
        """A ledger written before per-document scores gets their columns (empty), so its run can resume."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(trials)")}
        for name, kind in ADDED:
            if name not in have:
                self.db.execute(f"ALTER TABLE trials ADD COLUMN {name} {kind}")

    def append(self, trial: Trial) -> int:
        cur = self.db.execute(
            "INSERT INTO trials (candidate, split, genome, recipe_hash, recipe, scores, fitness, objectives, status, error,"
            " worker, t_merge, t_eval, t_total, created, docs, n_docs, estimated)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (trial.candidate, trial.split, json.dumps(trial.genome), trial.recipe_hash, trial.recipe,
             json.dumps(trial.scores), trial.fitness if trial.ok else None,
             None if trial.objectives is None else json.dumps(trial.objectives), trial.status, trial.error,
             trial.worker, trial.t_merge, trial.t_eval, trial.t_total, time.time(), trial.docs, trial.n_docs,
             int(trial.estimated)))
        trial.id = cur.lastrowid
        return trial.id

    def trials(self, split: str = "search") -> list[Trial]:
        rows = self.db.execute(
            "SELECT id, candidate, split, genome, recipe_hash, recipe, scores, fitness, objectives, status, error, worker,"
            " t_merge, t_eval, t_total, docs, n_docs, estimated FROM trials WHERE split = ? ORDER BY id",
            (split,)).fetchall()
        return [Trial(id=r[0], candidate=r[1], split=r[2], genome=json.loads(r[3]), recipe_hash=r[4], recipe=r[5],
                      scores=json.loads(r[6]), fitness=r[7], objectives=None if r[8] is None else json.loads(r[8]),
                      status=r[9], error=r[10], worker=r[11], t_merge=r[12], t_eval=r[13], t_total=r[14], docs=r[15],
                      n_docs=r[16], estimated=bool(r[17])) for r in rows]

    def close(self) -> None:
        self.db.close()
