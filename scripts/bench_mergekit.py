"""evomerge merge vs mergekit's in-process run_merge on the test models: max |diff| and time per merge, per method.

    python scripts/bench_mergekit.py [--hidden 64] [--layers 3] [--repeats 3]

Needs the bench extra (mergekit). Prints a Markdown table and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mergekit_harness import RANDOMIZED, build_zoo, load_dir, method_configs, run_evomerge, run_mergekit, write_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, models = build_zoo(tmp / "zoo", hidden=args.hidden, num_layers=args.layers)
        for name, config in method_configs(base, models).items():
            path = write_config(tmp / f"{name}.yaml", name, config)
            t_mk, t_evo = [], []
            for r in range(args.repeats):
                t_mk.append(run_mergekit(path, tmp / f"mk_{name}_{r}"))
                t_evo.append(run_evomerge(path, tmp / f"evo_{name}_{r}"))
            theirs, ours = load_dir(tmp / f"mk_{name}_0"), load_dir(tmp / f"evo_{name}_0")
            diff = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
            rows.append({"config": name, "max_abs_diff": diff, "randomized": name in RANDOMIZED,
                         "evomerge_s": statistics.median(t_evo), "mergekit_s": statistics.median(t_mk)})
    print("| config | max abs diff vs mergekit | evomerge s/merge | mergekit run_merge s/merge | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        note = " (random masks differ by design)" if r["randomized"] else ""
        print(f"| {r['config']} | {r['max_abs_diff']:.2e}{note} | {r['evomerge_s']:.3f} | {r['mergekit_s']:.3f} | "
              f"{r['mergekit_s'] / r['evomerge_s']:.1f}x |")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    (out / f"mergekit_compare_cpu_{stamp}.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "hidden": args.hidden, "layers": args.layers,
         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
