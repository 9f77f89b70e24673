"""Where a worker keeps its sources (`workers.sources`), measured: host memory per node and merge time per candidate.

    python benchmarks/bench_sources.py                       # ~125M-param Llama shape, base + 3 experts, 2 Ray workers
    python benchmarks/bench_sources.py --shape small --candidates 3 --json out.json --md out.md

Builds a synthetic Llama (random weights, stored in float32 or `--stored-dtype`, transformers' save_pretrained) and
three experts (base + noise) in a temp dir. Then, one mode after the other, starts two Ray workers on this node
(RayPool, one CPU and one torch thread each), has each merge `--candidates` candidates (`--method`: task_arithmetic,
whose little math leaves reading the inputs the larger part, or TIES) that change every tensor (new weights per model),
and reads the workers' /proc/<pid>/smaps once both are done, before and after each worker's malloc_trim(0) (a CPU
worker keeps the heap its merges freed, run.worker.keep_freed_host_memory; the difference is the heap kept):

- sources PSS: the proportional set size of the sources, summed over the workers: the Pss of the mappings of the
  source files (disk and host map them; so does transformers' from_pretrained, which device loads with, when the
  stored dtype is the compute dtype), plus for device and host the anonymous Pss above the disk run's (their private
  copies: device's converted live models, host's converted tensors; the other anonymous memory, the live model and
  torch, is the same in every mode; a negative excess, noise, counts 0).
- x one copy: sources PSS over the sources' bytes (the files' sizes): 1.0 is one copy per node, 2.0 one per worker.
- merge s: the median over every worker's candidates of the time to write a candidate into the live model (TrialResult
  t_merge: planning, reading the inputs, the methods, writing); x device: over device's, from the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's evomerge, in the script and its workers

SHAPES = {  # LlamaConfig sizes
    "medium": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                   num_key_value_heads=12, vocab_size=32000),  # 134M params, 537 MB a model in float32
    "small": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=8000),  # 2.8M params, 11 MB a model
}
MODES = ("device", "host", "disk")


def build_models(root: Path, shape: str, experts: int = 3, seed: int = 0, dtype: str = "float32") -> list[str]:
    """[base, expert_1, ...]: model dirs of a random Llama of `shape` and copies of it plus N(0, 0.02^2) noise, stored
    in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    paths = [root / "base"] + [root / f"expert_{i}" for i in range(1, experts + 1)]
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for i, path in enumerate(paths):
        with torch.no_grad():
            for name, param in model.state_dict().items():
                param.copy_(original[name] + (0.02 * torch.randn_like(param) if i else 0))
        model.save_pretrained(path)
    return [str(p) for p in paths]


class PidEvaluator:
    """Scores nothing: reports the worker's process id, so the driver can read its memory map."""

    def evaluate(self, model, split: str, limit: int | None = None, threshold: float | None = None):
        from evomerge.run.evaluation import Evaluation

        return Evaluation(0.0, {"pid": {"value": os.getpid()}})


def make_evaluator() -> PidEvaluator:
    return PidEvaluator()


def smaps(pid: int, files: set[str]) -> dict[str, int]:
    """Bytes of Pss of one process: in mappings of `files`, in anonymous mappings, in all."""
    pss = {"files": 0, "anonymous": 0, "total": 0}
    path = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not line[0].isupper() or not head[0].endswith(":"):  # a mapping's header line: its address range first
                path = head[5] if len(head) > 5 else ""
            elif head[0] == "Pss:":
                kb = int(head[1]) * 1024
                pss["total"] += kb
                if path in files:
                    pss["files"] += kb
                elif path in ("", "[heap]"):
                    pss["anonymous"] += kb
    return pss


def candidate(models: list[str], k: int, method: str = "task_arithmetic"):
    """A recipe whose per-model weights (and TIES densities) depend on k: every tensor's task changes each candidate."""
    from evomerge.recipe import recipe_from_dict

    base, experts = models[0], models[1:]

    def parameters(i: int) -> dict:
        weight = {"weight": 0.3 + 0.1 * ((k + i) % 5)}
        return {**weight, "density": 0.4 + 0.1 * ((k * 3 + i) % 5)} if method == "ties" else weight

    return recipe_from_dict([{"merge_method": method, "base_model": base, "dtype": "float32",
                              "models": [{"model": m, "parameters": parameters(i)} for i, m in enumerate(experts)]}])


def measure(models: list[str], mode: str, *, workers: int = 2, candidates: int = 4,
            method: str = "task_arithmetic") -> dict:
    """One mode: `workers` Ray workers on this node each merge `candidates` candidates; then their memory maps."""
    from evomerge.run.pool import RayPool, RunnerSpec, Task

    spec = RunnerSpec(tuple(models), models[0], make_evaluator, dtype="float32", sources=mode)
    start = time.perf_counter()
    pool = RayPool(spec, workers, cpus=1)
    try:
        started = time.perf_counter() - start
        results, k = [], 0
        while len(results) < workers * candidates:
            while pool.idle and k < workers * candidates:
                pool.submit(Task(k, candidate(models, k, method), "search"))
                k += 1
            results += pool.wait()
        failed = [r.error for r in results if r.status != "ok"]
        if failed:
            raise RuntimeError(f"{mode}: {failed[0]}")
        pids = {int(r.scores["pid"]["value"]) for r in results}
        files = {str(Path(m, "model.safetensors").resolve()) for m in models}
        kept = sum(smaps(pid, files)["anonymous"] for pid in pids)
        # the heap a CPU worker keeps for reuse (run.worker.keep_freed_host_memory) goes back to the kernel before
        # the memory is read: what is left is what the workers hold
        import ray

        ray.get([actor.__ray_call__.remote(lambda _: ctypes.CDLL(None).malloc_trim(0)) for actor in pool.actors])
        memory = [smaps(pid, files) for pid in pids]
    finally:
        pool.close()
    return {"mode": mode, "workers": len(pids), "start s": started,
            "merge s": statistics.median(r.t_merge for r in results),
            **{f"{kind} pss": sum(m[kind] for m in memory) for kind in ("files", "anonymous", "total")},
            "kept heap": kept - sum(m["anonymous"] for m in memory)}


def table(rows: list[dict], one_copy: int) -> list[dict]:
    """Adds sources PSS (see the module doc), its ratio to one copy, and merge time over device's."""
    by_mode = {r["mode"]: r for r in rows}
    baseline = by_mode["disk"]["anonymous pss"] if "disk" in by_mode else 0
    for r in rows:
        anonymous = r["anonymous pss"] - baseline if r["mode"] != "disk" else 0
        r["sources pss"] = r["files pss"] + max(anonymous, 0)
        r["x one copy"] = r["sources pss"] / one_copy
        if "device" in by_mode:
            r["x device"] = r["merge s"] / by_mode["device"]["merge s"]
    return rows


def markdown(rows: list[dict], one_copy: int, header: str) -> str:
    mb = 2**20
    lines = [header, "", f"one copy of the sources: {one_copy / mb:.0f} MiB", "",
             "| sources | sources PSS MiB | x one copy | merge s / candidate | x device | file-mapped PSS MiB | "
             "anonymous PSS MiB | total PSS MiB | heap kept for reuse MiB | start s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['sources pss'] / mb:.0f} | {r['x one copy']:.2f} | {r['merge s']:.3f} | "
                     f"{r.get('x device', float('nan')):.2f} | {r['files pss'] / mb:.0f} | "
                     f"{r['anonymous pss'] / mb:.0f} | {r['total pss'] / mb:.0f} | {r['kept heap'] / mb:.0f} | "
                     f"{r['start s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="medium")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--stored-dtype", default="float32", help="the models' dtype on disk (merged in float32)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=4, help="candidates each worker merges")
    parser.add_argument("--method", choices=["task_arithmetic", "ties"], default="task_arithmetic",
                        help="task_arithmetic: little math, so reading the inputs weighs most")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (workers: 1 each)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="bench_sources_") as tmp:
        models = build_models(Path(tmp), args.shape, args.experts, dtype=args.stored_dtype)
        one_copy = sum(Path(m, "model.safetensors").stat().st_size for m in models)
        rows = [measure(models, mode, workers=args.workers, candidates=args.candidates, method=args.method)
                for mode in args.modes.split(",")]
    rows = table(rows, one_copy)
    header = (f"bench_sources: shape {args.shape}, base + {args.experts} experts stored in {args.stored_dtype} (merged "
              f"in float32), {args.workers} Ray workers "
              f"on one node, {args.candidates} {args.method} candidates each, {time.strftime('%Y-%m-%d')}")
    text = markdown(rows, one_copy, header)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "one copy": one_copy, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
