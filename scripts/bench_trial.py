"""One search trial end to end, split into merge, evaluation and overhead (issue 5, item 5: "merge share of a GPU trial < 10%").

    python scripts/bench_trial.py --shape tiny --threads 1                                        # CPU, seconds
    python scripts/bench_trial.py --shape medium --threads 1 --tokens 2048 --batch-size 4 --warmup 1 --repeats 3  # CPU, 90 s
    # the GPU run of issue 5 (H100/H200, 1.24B Llama-3.2-1B shape, bf16, 32768 tokens; about a minute):
    python scripts/bench_trial.py --shape llama-3.2-1b --device cuda --dtype bfloat16

A trial is what a search pays per candidate, as evomerge.run does it: the driver decodes a genome of a PS space (default:
TIES over base + 2 experts, weight and density per model and per layer) into a Recipe (and its YAML, for the ledger); the
worker writes it into the resident live model with LiveMaterializer, as TrialRunner does (planning included), then scores the model
with a loglikelihood evaluation of a fixed token budget: --tokens random token ids (seeded) in sequences of --seq-len,
the summed log-probability of every next token, as lm-eval's loglikelihood scores a continuation (log-softmax in float32,
--batch-size sequences per forward pass, which bounds the logits' memory). Consecutive trials are CMA-ES-like samples
around the middle of the bounds (sigma --sigma in the unit cube), so every gene changes and no tensor is skipped by the
materializer's cache. The device is synchronized at each phase boundary. Reported: warm-up trials, then the trial with the
median total of --repeats; overhead = total - merge - eval (genome decode, the ledger's YAML dump, the fitness check).

Memory for the GPU run (1.24B shape, bf16, 1,235,814,400 params = 2.47 GB per model): base + 2 experts + the live model
9.9 GB; logits of one batch (8 x 512 x 128256, bf16 + float32 copy + float32 log-softmax) 5.3 GB; merge working space,
estimated as 8 float32 copies of the largest tensor (the 128256 x 2048 embeddings), 8.4 GB: about 24 GB in all, so it fits
an 80 GB H100 with room to spare (`memory_estimate` computes it; the GPU run also records the measured peak).
Writes benchmarks/results/trial-<device>-<shape>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import (DTYPES, SHAPES, device_name, live_model, llama_config, sync, synthetic_sources,  # noqa: E402
                         write_results)

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.merge.materialize import LiveMaterializer  # noqa: E402
from evomerge.merge.plan import plan_recipe  # noqa: E402
from evomerge.merge.registry import get_method  # noqa: E402
from evomerge.recipe import recipe_from_dict, to_evomerge_yaml  # noqa: E402
from evomerge.run.worker import keep_freed_host_memory  # noqa: E402
from evomerge.spaces.ps import ParameterSpace, PSConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def eval_model(config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """bench_merge's live target, with its rotary inverse frequencies computed (to_empty leaves buffers uninitialised)."""
    model = live_model(config, device, dtype)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config).to(device)
    return model


def token_batches(vocab: int, tokens: int, seq_len: int, seed: int, device: str) -> torch.Tensor:
    """[tokens // seq_len, seq_len] random token ids, the same for every trial."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (tokens // seq_len, seq_len), generator=gen).to(device)


@torch.inference_mode()
def loglikelihood(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """sum_s sum_{t>=1} log p(x_{s,t} | x_{s,<t}): log-softmax of the logits at t-1 gathered at token t, batch by batch."""
    total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    for batch in tokens.split(batch_size):
        logits = model(batch, use_cache=False).logits  # [b, T, V]: the only vocab-sized activation, bounded by batch_size
        targets = batch.roll(-1, dims=1)
        targets[:, -1] = -100  # the last position predicts nothing: ignored
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        total -= nll.double()
    return total.item()


def search_space(method: str, num_layers: int, experts: list[str], seed: int) -> ParameterSpace:
    """A PS space over base + experts with one gene per parameter, model and layer, as a search would set it up."""
    spec = get_method(method, source="--method", key="method")
    base = None if spec.base == "none" else "base"
    models = ([] if base else ["base"]) + experts
    numeric = [p for p in spec.params if p.kind is float]
    searched = [p for p in numeric if p.per_model] or numeric  # the space's default choice
    bounds = {p.name: (0.0, 1.0) for p in searched if p.low is None or p.high is None}  # e.g. weight
    config = PSConfig(method=method, base_model=base, models=models[: spec.max_models], layer_groups="all", bounds=bounds,
                      seed=seed)
    return ParameterSpace(config, num_layers={m: num_layers for m in config.referenced_models()}, source="--method")


def candidates(space: ParameterSpace, n: int, sigma: float, seed: int) -> list[np.ndarray]:
    """n genomes 0.5 + sigma N(0, I), clipped to the unit cube: consecutive CMA-ES candidates in mid-search (every gene
    differs, densities well below 1 so TIES trims), rather than around the space's start (the default merge)."""
    rng = np.random.default_rng(seed)
    return [np.clip(0.5 + sigma * rng.standard_normal(space.dim), 0.0, 1.0) for _ in range(n)]


def run_trial(genome: np.ndarray, space: ParameterSpace, materializer: LiveMaterializer, tokens: torch.Tensor,
              batch_size: int, device: str) -> dict:
    """One candidate: decode and dump for the ledger (driver), materialize (worker, as TrialRunner.run), evaluate, check
    the fitness."""
    sync(device)
    start = time.perf_counter()
    recipe = space.decode(genome)
    recipe_yaml = to_evomerge_yaml(recipe)
    t_decode = time.perf_counter()
    applied = materializer.apply(recipe)
    sync(device)
    t_merge = time.perf_counter()
    fitness = loglikelihood(materializer.model, tokens, batch_size) / tokens[:, 1:].numel()  # mean logprob per token
    sync(device)
    t_eval = time.perf_counter()
    if not math.isfinite(fitness):
        raise SystemExit(f"non-finite fitness {fitness}: the synthetic model is broken")
    end = time.perf_counter()
    merge, evaluation, total = t_merge - t_decode, t_eval - t_merge, end - start
    return {"merge_seconds": merge, "eval_seconds": evaluation, "overhead_seconds": total - merge - evaluation,
            "total_seconds": total, "decode_seconds": t_decode - start,
            "tensors": applied["tensors"], "recomputed": applied["computed"], "fitness": fitness, "recipe": recipe_yaml}


def memory_estimate(config, experts: int, dtype: torch.dtype, batch_size: int, seq_len: int) -> dict[str, int]:
    """Bytes on the device: resident sources + live model, one batch of logits (model dtype + float32 copy + float32
    log-softmax), and merge working space taken as 8 float32 copies of the largest tensor (TIES on CPU peaks near 7)."""
    meta = live_model(config, "meta", dtype)
    params = sum(p.numel() for p in meta.parameters())  # a tied lm_head is counted once
    largest = max(p.numel() for p in meta.parameters())
    out = {"params": params, "models": (experts + 2) * params * dtype.itemsize,
           "logits": batch_size * seq_len * config.vocab_size * (dtype.itemsize + 8), "merge_work": 8 * 4 * largest}
    return {**out, "total": out["models"] + out["logits"] + out["merge_work"]}


def markdown(result: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    mem = result["memory_estimate"]
    lines = [f"# bench_trial: {result['shape']} on {result['device']} ({result['dtype']}, {result['method']} over base + "
             f"{result['experts']} experts)", "", f"`{result['command']}`  ",
             f"{mem['params'] / 1e6:.1f}M params per model; {result['space_dim']} genes; evaluation: {result['eval_tokens']} "
             f"tokens in {result['sequences']} sequences of {result['seq_len']}, batch {result['batch_size']}; "
             f"{result['tensors']} tensors merged per trial; estimated device memory {mem['total'] / 1e9:.2f} GB"
             + (f", measured peak {result['peak_bytes'] / 1e9:.1f} GB" if result["peak_bytes"] else "")
             + f"; torch {result['torch']}; {result['date']}", "",
             "| trial | merge ms | eval ms | overhead ms | total ms | merge share % | eval tokens/s |", "|---" * 7 + "|"]
    rows = [(str(i + 1), t) for i, t in enumerate(result["trials"])] + [("**median**", result["median"])]
    for name, t in rows:
        lines.append(f"| {name} | {ms(t['merge_seconds'])} | {ms(t['eval_seconds'])} | {ms(t['overhead_seconds'])} | "
                     f"{ms(t['total_seconds'])} | {100 * t['merge_seconds'] / t['total_seconds']:.1f} | "
                     f"{result['eval_tokens'] / t['eval_seconds']:.0f} |")
    lines += ["", f"Median trial (by total); merge includes planning ({ms(result['plan_seconds'])} ms alone). "
              f"Overhead: genome decode + YAML dump {ms(result['median']['decode_seconds'])} ms, the rest "
              f"{ms(result['median']['overhead_seconds'] - result['median']['decode_seconds'])} ms."]
    return "\n".join(lines) + "\n"


def command_line(args: argparse.Namespace) -> str:
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out_dir"]
    return " ".join(["python scripts/bench_trial.py", *flags])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--method", default="ties")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32768, help="evaluation token budget per trial")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--sigma", type=float, default=0.1, help="spread of the candidates in the unit cube")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); use 1 on a shared CPU")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.tokens < args.seq_len or args.seq_len < 2 or args.batch_size < 1 or args.repeats < 1:
        parser.error("need --tokens >= --seq-len >= 2, --batch-size >= 1 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.device.startswith("cuda"):  # as a CPU search worker does (run.worker)
        keep_freed_host_memory()
    dtype = DTYPES[args.dtype]
    experts = [f"expert{i + 1}" for i in range(args.experts)]
    config = llama_config(SHAPES[args.shape])
    memory = memory_estimate(config, len(experts), dtype, args.batch_size, args.seq_len)
    if args.device.startswith("cuda") and memory["total"] > torch.cuda.mem_get_info(args.device)[0]:
        raise SystemExit(f"this run needs about {memory['total'] / 2**30:.0f} GiB on {args.device}")

    space = search_space(args.method, config.num_hidden_layers, experts, args.seed)
    sources = synthetic_sources(config, ["base", *experts], args.device, dtype, seed=args.seed)
    materializer = LiveMaterializer(eval_model(config, args.device, dtype), sources)
    tokens = token_batches(config.vocab_size, args.tokens, args.seq_len, args.seed, args.device)
    genomes = candidates(space, args.warmup + args.repeats, args.sigma, args.seed)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for genome in genomes[: args.warmup]:
        run_trial(genome, space, materializer, tokens, args.batch_size, args.device)
    trials = [run_trial(g, space, materializer, tokens, args.batch_size, args.device) for g in genomes[args.warmup:]]
    median = sorted(trials, key=lambda t: t["total_seconds"])[(len(trials) - 1) // 2]
    recipe = recipe_from_dict([yaml.safe_load(median["recipe"])])
    plan_seconds = statistics.median(_timed(lambda: plan_recipe(recipe, sources.dirs)) for _ in range(5))

    date = datetime.date.today().isoformat()
    result = {"shape": args.shape, "dims": SHAPES[args.shape], "device": device_name(args.device), "dtype": args.dtype,
              "method": args.method, "experts": len(experts), "space_dim": space.dim, "tensors": median["tensors"],
              "eval_tokens": tokens.numel(), "sequences": tokens.shape[0], "seq_len": args.seq_len,
              "batch_size": args.batch_size, "attention": materializer.model.config._attn_implementation, "date": date,
              "torch": torch.__version__, "command": command_line(args), "memory_estimate": memory,
              "peak_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
              "plan_seconds": plan_seconds, "median": median, "trials": trials}
    write_results(Path(args.out_dir) / f"trial-{result['device']}-{args.shape}-{date}", result, markdown(result))
    return result


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    try:
        main()
    except EvomergeError as err:  # e.g. a method with nothing to search (model_stock)
        raise SystemExit(f"error: {err}")
