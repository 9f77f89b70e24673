"""Natural niches vs CMA-ES vs random search on the toy zoo: mean and skill-aware fitness, racing on and off, seeds.

    python scripts/compare_search.py                         # 3 optimizers x 2 aggregates x racing off/on x 3 seeds
    python scripts/compare_search.py --seeds 0 --optimizers niches cmaes --aggregates geometric --racing off
    python scripts/compare_search.py --configs niches-mean-off cmaes-mean-on       # chosen configurations only

Every search is `experiments/toy_niches.yaml` (DARE-TIES weight + density per model and per layer, 128 trials, 50
documents per task on the search split) with the optimizer, `evaluation.aggregate` and `evaluation.racing` replaced:
niches with the file's options, cmaes as toy_ps_dare.yaml (sigma0 0.25, popsize 16), random. Runs go to
runs/compare/<config>-s<seed>/ (a finished run is re-read, an interrupted one continues). The table is the winners'
scores on the test split (200 documents per task, 95% intervals) and the documents scored on the search split;
it is printed and written to benchmarks/results/compare-search-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZER_OPTIONS = {"cmaes": {"sigma0": 0.25, "popsize": 16}, "random": {}}  # niches: the experiment file's
RACING = {"first": 0.1, "delta": 0.05}
SKILL = 0.4  # a skill counts as kept at a test score >= this


def config_name(optimizer: str, aggregate: str, racing: str, settings: dict = RACING) -> str:
    other = racing == "on" and settings != RACING  # racing with other settings than the defaults: named by them
    return f"{optimizer}-{aggregate}-racing_{racing}" + (f"_first{settings['first']:g}_delta{settings['delta']:g}"
                                                         if other else "")


def experiment(base: dict, base_dir: Path, optimizer: str, aggregate: str, racing: str, seed: int, trials: int,
               settings: dict = RACING, limit: int | None = None):
    """`base` (an experiment file's mapping, its relative paths relative to `base_dir`) with this row's settings."""
    from evomerge.run.config import experiment_from_dict

    doc = json.loads(json.dumps(base))
    doc["name"], doc["seed"] = config_name(optimizer, aggregate, racing, settings), seed
    doc["budget"] = {"trials": trials}
    if optimizer != "niches":
        doc["optimizer"] = {"name": optimizer, "options": OPTIMIZER_OPTIONS[optimizer]}
    doc["evaluation"] = {**doc["evaluation"], "aggregate": aggregate, "racing": settings if racing == "on" else None}
    if limit is not None:
        doc["evaluation"]["limit"] = limit
    return experiment_from_dict(doc, source="compare_search", base_dir=base_dir)


def run_one(exp, run_dir: Path) -> dict:
    """Search (or continue, or re-read) and return the row's numbers."""
    from evomerge.evaluate.result import mean_ci95
    from evomerge.run.evaluation import SplitEvaluator, check_tasks
    from evomerge.run.loop import search

    from evomerge.run.ledger import Ledger

    check_tasks(exp.evaluation, "compare_search")
    summary = search(exp, run_dir, SplitEvaluator, progress=False)
    ledger = Ledger(run_dir / "ledger.sqlite")
    seconds = sum(t.t_total for t in ledger.trials(exp.evaluation.split))  # merge + scoring, without start-up
    ledger.close()
    scores = json.loads((run_dir / "best" / "scores.json").read_text())
    test = scores["scores"]["test"]
    values = [s["value"] for s in test.values()]
    return {"config": exp.name, "seed": exp.seed, "winner": summary.candidate, "fitness": summary.fitness,
            "test": {t: {"value": s["value"], "n": s["n"], "ci95": s["ci95"]} for t, s in test.items()},
            "test_mean": sum(values) / len(values), "test_mean_ci95": list(mean_ci95(values, [s["n"] for s in test.values()])),
            "documents": scores["documents"], "trials": summary.trials, "trial_s": round(seconds, 1),
            "documents_in_full": exp.evaluation.limit * len(test) * summary.trials}  # every search document, every trial


def table(rows: list[dict]) -> str:
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)
    lines = ["| optimizer | aggregate | racing | test mean per seed [95% CI] | mean | skills (cipher / reverse / digits) "
             "per seed | every skill >= 0.4 | documents scored per run (share) | trial s per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by_config.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        optimizer, aggregate, racing = name.split("-")
        means = "; ".join(f"{r['test_mean']:.3f} [{r['test_mean_ci95'][0]:.2f},{r['test_mean_ci95'][1]:.2f}]" for r in runs)
        skills = "; ".join(" / ".join(f"{s['value']:.2f}" for s in r["test"].values()) for r in runs)
        kept = sum(min(s["value"] for s in r["test"].values()) >= SKILL for r in runs)
        docs = sum(r["documents"]["search"] for r in runs) / len(runs)
        full = sum(r["documents_in_full"] for r in runs) / len(runs)
        seconds = sum(r["trial_s"] for r in runs) / len(runs)
        racing = racing.removeprefix("racing_").replace("_first", " (first ").replace("_delta", ", delta ")
        racing += ")" if "(" in racing else ""
        lines.append(f"| {optimizer} | {aggregate} | {racing} | {means} | "
                     f"{sum(r['test_mean'] for r in runs) / len(runs):.3f} | {skills} | {kept}/{len(runs)} | "
                     f"{docs:,.0f} ({docs / full:.0%}) | {seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(ROOT / "experiments" / "toy_niches.yaml"))
    parser.add_argument("--optimizers", nargs="+", default=["niches", "cmaes", "random"])
    parser.add_argument("--aggregates", nargs="+", default=["mean", "geometric"])
    parser.add_argument("--racing", nargs="+", default=["off", "on"])
    parser.add_argument("--configs", nargs="+", default=None,
                        help="optimizer-aggregate-racing triples (e.g. niches-geometric-on) instead of the full grid")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluation.limit: search documents per task (the experiment file's 50 by default)")
    parser.add_argument("--racing-first", type=float, default=RACING["first"], help="evaluation.racing.first")
    parser.add_argument("--racing-delta", type=float, default=RACING["delta"], help="evaluation.racing.delta")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "compare"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"compare-search-{datetime.date.today()}"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    base, base_dir = yaml.safe_load(Path(args.experiment).read_text()), Path(args.experiment).resolve().parent
    grid = [(o, a, r) for o in args.optimizers for a in args.aggregates for r in args.racing]
    configs = [tuple(c.split("-")) for c in args.configs] if args.configs else grid
    rows = []
    for seed in args.seeds:  # seed-major: after the first pass every configuration has a row
        for optimizer, aggregate, racing in configs:
            settings = {"first": args.racing_first, "delta": args.racing_delta}
            exp = experiment(base, base_dir, optimizer, aggregate, racing, seed, args.trials, settings, args.limit)
            rows.append(run_one(exp, Path(args.runs) / f"{exp.name}-s{seed}"))
            print(json.dumps({k: rows[-1][k] for k in ("config", "seed", "test_mean", "documents", "trial_s")}),
                  file=sys.stderr, flush=True)
            Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows)
    limit = args.limit or base["evaluation"]["limit"]
    Path(args.out + ".md").write_text(f"Test split (n = 200 per task), {args.trials} trials per search, search split "
                                      f"{limit} documents per task.\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
