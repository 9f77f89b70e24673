"""This tree's merge against another commit's, side by side: the same merged tensors, and the time per candidate.

    git worktree add /tmp/old860 860ac2d
    python scripts/bench_compare.py --old /tmp/old860 --shape tiny --threads 1
    python scripts/bench_compare.py --old /tmp/old860 --shape medium --methods ties,dare_ties --repeats 1 --rounds 1
    python scripts/bench_compare.py --old /tmp/old860 --trial      # whole toy trials (each tree's bench_trial.py)

Each side runs in a subprocess of its own with its tree first on the path (this file is that worker too, `--side`),
in rounds that alternate which side goes first, so both see the same load on a shared machine. A side times every
method as bench_merge.py does (the same synthetic sources, every tensor recomputed per candidate), set up as that tree's
search worker sets itself up (where it keeps draws and orders of |delta| across candidates, it does here too), then
writes the merged tensors of the last candidate, and those of every method over the toy zoo (zoo/) and over the test
models (tests/tiny_models.py: a 2-layer Llama and 2 variants). Per method the result is the median over rounds of
each side's time, their ratio, each side's ratio to the memory floor, and whether all merged tensors are equal (the
largest |difference| where not). With --trial each side's own scripts/bench_trial.py runs instead, --rounds times.
Writes benchmarks/results/compare-<device>-<shape>-<date>.{json,md} (compare-trial-... with --trial).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZOO_EXPERTS = ["expert_cipher", "expert_reverse", "expert_digits"]
# Both sides get the malloc thresholds this tree's CPU worker sets (run.worker.keep_freed_host_memory), as the
# environment variables glibc reads at start: the comparison is of the merge code, under one allocator behaviour.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def run_side(tree: Path, args: list[str]) -> dict:
    """This script as a worker over `tree`'s evomerge; its JSON answer."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT / 'scripts'}{os.pathsep}{ROOT / 'tests'}",
           **KEEP_FREED_MEMORY}
    out = subprocess.run([sys.executable, __file__, *args], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def side(args: argparse.Namespace) -> dict:
    """The worker: time the methods on the synthetic shape, and dump every merged tensor into args.dump."""
    import torch

    import bench_merge
    import evomerge
    from evomerge.merge.materialize import LiveMaterializer
    from bench_merge import ResidentSources  # noqa: I001 - from where that tree keeps it
    from evomerge.models.io import ModelDir, load_live_model
    from evomerge.recipe import recipe_from_dict

    torch.set_num_threads(args.threads)
    try:  # a tree whose worker keeps draws and orders across candidates (860ac2d)
        from evomerge.merge.rng import memoize_draws
        from evomerge.merge.sparsify import keep_orders
        from evomerge.run.worker import draw_memo_bytes
    except ImportError:
        memoize_draws = keep_orders = draw_memo_bytes = None

    def as_worker():
        if memoize_draws is not None:
            memoize_draws(draw_memo_bytes("cpu"))
            keep_orders(draw_memo_bytes("cpu"))

    dump = Path(args.dump)
    config = bench_merge.llama_config(bench_merge.SHAPES[args.shape])
    experts = ["expert1", "expert2"]
    sources = bench_merge.synthetic_sources(config, ["base", *experts], "cpu", torch.float32)
    target = bench_merge.live_model(config, "cpu", torch.float32)
    bandwidth = bench_merge.copy_bandwidth("cpu", torch.float32, 2**28)
    rows = {}
    for method in args.methods.split(","):
        as_worker()
        row = bench_merge.bench_method(method, target, sources, experts, "cpu", bandwidth, args.warmup, args.repeats,
                                       args.compile)
        rows[method] = {k: row[k] for k in ("seconds", "ratio_to_floor", "floor_seconds", "first_seconds")}
        if not args.no_dump:
            torch.save({n: p.detach().clone() for n, p in target.state_dict().items()}, dump / f"synthetic-{method}.pt")
    if not args.no_dump:
        for models, label in ((args.zoo, "zoo"), (args.test_models, "test")):
            base, *others = models.split(",")
            dirs = {m: ModelDir.open(m) for m in [base, *others]}
            for method in args.methods.split(","):
                as_worker()
                doc = bench_merge.recipe_doc(method, others)
                doc = json.loads(json.dumps(doc).replace('"base"', json.dumps(base)))
                live = LiveMaterializer(load_live_model(dirs[base], "cpu", torch.float32),
                                        ResidentSources(dirs, "cpu", torch.float32), **({"compile": True} if args.compile else {}))
                live.apply(recipe_from_dict([{"merge_method": method, "dtype": "float32", **doc}]))
                torch.save(dict(live.model.state_dict()), dump / f"{label}-{method}.pt")
    return {"evomerge": evomerge.__file__, "rows": rows}


def compare_dumps(old: Path, new: Path) -> dict[str, float]:
    """Per dump file: the largest |old - new| over its tensors (0.0: all equal)."""
    import torch

    diffs = {}
    for path in sorted(new.glob("*.pt")):
        a, b = torch.load(old / path.name), torch.load(path)
        diffs[path.stem] = max(0.0 if a[n].equal(b[n]) else (a[n].double() - b[n].double()).abs().max().item()
                               for n in b)
    return diffs


def test_models(root: Path) -> str:
    from tiny_models import build_tiny, make_variants

    base = build_tiny("llama", root / "base", num_layers=2, hidden=16)
    return ",".join(str(p) for p in [base, *make_variants(base, root, n=2)])


def markdown(result: dict) -> str:
    lines = [f"# bench_compare: {result['shape']}, {result['threads']} thread(s), {result['date']}", "",
             f"`{result['command']}`  ", f"old: {result['old']}; new: this tree; medians of {result['rounds']} "
             f"rounds of {result['repeats']} candidates", "",
             "| method | old ms | new ms | new / old | old x floor | new x floor | new first candidate s | equal "
             "(synthetic / zoo / test) |", "|---|---|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        same = " / ".join("yes" if d == 0 else f"max diff {d:.2g}" if d is not None else "-"
                          for d in (r["diff"].get(k) for k in ("synthetic", "zoo", "test")))
        lines.append(f"| {method} | {r['old_ms']:.2f} | {r['new_ms']:.2f} | {r['new_ms'] / r['old_ms']:.2f} | "
                     f"{r['old_floor']:.1f} | {r['new_floor']:.1f} | {r['new_first_s']:.1f} | {same} |")
    return "\n".join(lines) + "\n"


def compare_trials(args: argparse.Namespace) -> dict:
    totals = {"old": [], "new": []}
    merges = {"old": [], "new": []}
    for i in range(args.rounds):
        for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
            tree = Path(args.old) if name == "old" else ROOT
            with tempfile.TemporaryDirectory() as out:
                subprocess.run([sys.executable, str(tree / "scripts" / "bench_trial.py"), "--shape", args.shape,
                                "--threads", str(args.threads), "--out-dir", out], check=True, capture_output=True,
                               env={**os.environ, "PYTHONPATH": str(tree), **KEEP_FREED_MEMORY})
                [path] = Path(out).glob("trial-*.json")
                median = json.loads(path.read_text())["median"]
            totals[name].append(median["total_seconds"])
            merges[name].append(median["merge_seconds"])
    med = {k: statistics.median(v) for k, v in totals.items()}
    return {"old_total_s": med["old"], "new_total_s": med["new"], "ratio": med["new"] / med["old"],
            "old_merge_s": statistics.median(merges["old"]), "new_merge_s": statistics.median(merges["new"]),
            "rounds": totals | {"merge_" + k: v for k, v in merges.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="a worktree of the commit to compare with")
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all of bench_merge.METHODS)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trial", action="store_true", help="whole trials (each tree's bench_trial.py)")
    parser.add_argument("--no-dump", action="store_true", help="times only")
    parser.add_argument("--compile", action="store_true", help="this tree's side with the compile switch on")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--side", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    parser.add_argument("--zoo", help=argparse.SUPPRESS)
    parser.add_argument("--test-models", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(side(args)))
        return {}
    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
    import bench_merge

    args.methods = args.methods or ",".join(bench_merge.METHODS)
    date = datetime.date.today().isoformat()
    command = "python scripts/bench_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.trial:
        result = {"shape": args.shape, "threads": args.threads, "date": date, "command": command, "old": args.old,
                  **compare_trials(args)}
        stem = Path(args.out) / f"compare-trial-cpu{args.threads}t-{args.shape}-{date}"
        table = (f"# bench_compare --trial: {args.shape}, {args.threads} thread(s), {date}\n\n`{command}`\n\n"
                 f"| | old | new | new / old |\n|---|---|---|---|\n"
                 f"| trial s | {result['old_total_s']:.3f} | {result['new_total_s']:.3f} | {result['ratio']:.2f} |\n"
                 f"| merge s | {result['old_merge_s']:.3f} | {result['new_merge_s']:.3f} | "
                 f"{result['new_merge_s'] / result['old_merge_s']:.2f} |\n")
    else:
        times = {"old": [], "new": []}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            zoo = ",".join(str(ROOT / "zoo" / m) for m in ["base", *ZOO_EXPERTS[:2]])
            models = test_models(tmp / "models")
            for i in range(args.rounds):
                for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
                    (tmp / name).mkdir(exist_ok=True)
                    flags = ["--side", name, "--dump", str(tmp / name), "--zoo", zoo, "--test-models", models,
                             "--shape", args.shape, "--methods", args.methods, "--threads", str(args.threads),
                             "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
                    if args.no_dump or i > 0:
                        flags.append("--no-dump")
                    if args.compile and name == "new":
                        flags.append("--compile")
                    times[name].append(run_side(Path(args.old) if name == "old" else ROOT, flags)["rows"])
            diffs = {} if args.no_dump else compare_dumps(tmp / "old", tmp / "new")
        rows = {}
        for method in args.methods.split(","):
            med = {k: {f: statistics.median(r[method][f] for r in v) for f in ("seconds", "ratio_to_floor")}
                   for k, v in times.items()}
            rows[method] = {"old_ms": 1e3 * med["old"]["seconds"], "new_ms": 1e3 * med["new"]["seconds"],
                            "new_first_s": times["new"][0][method]["first_seconds"],  # the first round's: compiling
                            "old_floor": med["old"]["ratio_to_floor"], "new_floor": med["new"]["ratio_to_floor"],
                            "diff": {k: diffs[f"{k}-{method}"] for k in ("synthetic", "zoo", "test")
                                     if f"{k}-{method}" in diffs}}
        result = {"shape": args.shape, "threads": args.threads, "date": date, "command": command, "old": args.old,
                  "rounds": args.rounds, "repeats": args.repeats, "methods": rows}
        stem = Path(args.out) / f"compare-cpu{args.threads}t-{args.shape}-{date}"
        table = markdown(result)
    bench_merge.write_results(stem, result, table)
    return result


if __name__ == "__main__":
    main()
