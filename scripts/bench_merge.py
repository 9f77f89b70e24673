"""Per-candidate merge time against the memory-bandwidth floor, for every method, as a search worker sees it.

    python scripts/bench_merge.py --shape tiny --threads 1 --repeats 7 --mergekit          # CPU: the toy zoo's shape
    python scripts/bench_merge.py --shape medium --threads 1 --warmup 1 --repeats 3        # CPU: hidden 1024, 4 layers
    # the GPU run of issue 5 (H100/H200; about 5 min, most of it mergekit):
    python scripts/bench_merge.py --shape llama-3.2-1b --device cuda --mergekit --mergekit-methods linear,slerp,ties,dare_ties --mergekit-repeats 1

A synthetic Llama-shaped state (random base, experts = base + small noise) is resident on the device; every candidate is
written into a live LlamaForCausalLM by the real planner and materializer (LiveMaterializer over ResidentSources), with
its per-tensor cache cleared so that every tensor is recomputed (the plan's layout and the live-parameter lookups stay
cached, as in a worker: only the parameter values change between candidates). One run measures the device copy
bandwidth, then per method: the median time per candidate, the bytes it must move (inputs read + output written, once
each), the floor (bytes / bandwidth), the ratio to it, the planner's and the method functions' share, and the peak
extra memory. With --mergekit (the bench extra) the same recipes also go through mergekit's in-process run_merge and
the `mergekit-yaml` CLI on an on-disk copy of the models. Writes benchmarks/results/<device>-<shape>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml

from evomerge.merge.materialize import LiveMaterializer, compute
from evomerge.merge.plan import plan_recipe
from evomerge.models.architectures import architecture_for
from evomerge.models.io import ModelDir, ModelWriter
try:
    from evomerge.models.sources import ResidentSources
except ImportError:  # a tree before the stores had their module (860ac2d, for scripts/bench_compare.py)
    from evomerge.merge.materialize import ResidentSources
from evomerge.recipe import recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama dimensions: hidden, layers, intermediate, attention heads, kv heads, vocab, tied embeddings
    "tiny": dict(hidden=128, layers=4, intermediate=512, heads=4, kv_heads=2, vocab=100, tied=False),
    "medium": dict(hidden=1024, layers=4, intermediate=4096, heads=16, kv_heads=4, vocab=32000, tied=False),
    "llama-3.2-1b": dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tied=True),
    "llama-3-8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256, tied=False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def recipe_doc(method: str, experts: list[str]) -> dict:
    """A mergekit-style recipe over base + experts, with the parameter values a search would propose."""
    e = experts
    weights = lambda names: [{"model": m, "parameters": {"weight": 1.0 / len(names)}} for m in names]  # noqa: E731
    family = {  # the task-arithmetic family's per-model parameters
        "task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
        "breadcrumbs": {"density": 0.5, "gamma": 0.01}, "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
        "della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.5, "epsilon": 0.1},
    }
    if method in family:
        models = [{"model": m, "parameters": {"weight": 0.5, **family[method]}} for m in e]
        return {"base_model": "base", "models": models}
    return {
        "linear": {"models": weights(["base", *e])},
        "slerp": {"base_model": "base", "models": [{"model": "base"}, {"model": e[0]}], "parameters": {"t": 0.4}},
        "nuslerp": {"base_model": "base", "models": weights(e[:2])},
        "nearswap": {"base_model": "base", "models": [{"model": "base"}, {"model": e[0]}], "parameters": {"t": 0.001}},
        "model_stock": {"base_model": "base", "models": [{"model": m} for m in e]},
        "sce": {"base_model": "base", "models": [{"model": m} for m in e], "parameters": {"select_topk": 0.5}},
        "passthrough": {"models": [{"model": e[0]}]},
        "multislerp": {"base_model": "base", "models": weights(e)},
        "karcher": {"models": [{"model": m} for m in ["base", *e]]},
        "arcee_fusion": {"base_model": "base", "models": [{"model": "base"}, {"model": e[0]}]},
        "ram": {"base_model": "base", "models": [{"model": m} for m in e]},
        "ramplus_tl": {"base_model": "base", "models": [{"model": m} for m in e], "parameters": {"r": 0.1, "alpha": 0.2}},
    }[method]


METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
           "della_linear", "sce", "slerp", "nuslerp", "nearswap", "model_stock", "passthrough", "multislerp", "karcher",
           "arcee_fusion", "ram", "ramplus_tl"]


# ---------------------------------------------------------------------------------------------------------------------
# the synthetic state


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                       intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                       tie_word_embeddings=shape["tied"], architectures=["LlamaForCausalLM"])


def live_model(config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The live target: a LlamaForCausalLM with uninitialised weights (every candidate overwrites them)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype).eval()
    model.tie_weights()
    return model


def synthetic_sources(config, names: list[str], device: str, dtype: torch.dtype, seed: int = 0) -> ResidentSources:
    """Model dirs without files (the planner reads shapes only) and resident tensors: base ~ N(0, 0.02^2), each
    expert = base + N(0, 0.002^2)."""
    model = live_model(config, "meta", dtype)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()
              if not (config.tie_word_embeddings and n.startswith("lm_head."))}
    conf = config.to_dict()
    arch = architecture_for(conf, source="bench")
    header = {n: {"shape": list(s), "dtype": "F32"} for n, s in shapes.items()}
    dirs = {m: ModelDir(Path(m), conf, arch, {}, header) for m in names}
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for n, s in shapes.items():
        base = torch.randn(s, generator=gen, device=device).mul_(0.02)
        tensors[("base", n)] = base.to(dtype)
        for m in names[1:]:
            tensors[(m, n)] = base.add(torch.randn(s, generator=gen, device=device), alpha=0.002).to(dtype)
    return ResidentSources.from_tensors(dirs, tensors)


# ---------------------------------------------------------------------------------------------------------------------
# measurements


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, dtype: torch.dtype, nbytes: int) -> float:
    """Bytes read + written per second by one large device-to-device copy."""
    src = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_time(lambda: dst.copy_(src), device, warmup=2, repeats=10)


def peak_extra_memory(fn, device: str) -> int | None:
    """Peak memory above what was in use before `fn`: the CUDA allocator's peak, or sampled RSS on CPU (psutil)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        import psutil
    except ImportError:
        return None
    proc, peak, done = psutil.Process(), [0], threading.Event()
    before = proc.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return max(0, max(peak[0], proc.memory_info().rss) - before)


def check_memory(config, device: str, dtype: torch.dtype, experts: int) -> None:
    """Stop early, with a message, when base + experts + the live target (+ 10% working space) cannot fit."""
    if not device.startswith("cuda"):
        return
    s = config
    per_layer = 2 * s.hidden_size**2 + 2 * s.hidden_size * s.head_dim * s.num_key_value_heads \
        + 3 * s.hidden_size * s.intermediate_size
    params = s.num_hidden_layers * per_layer + s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2)
    need = 1.1 * (experts + 2) * params * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise SystemExit(f"this shape needs about {need / 2**30:.0f} GiB on {device}, {free / 2**30:.0f} GiB are free")


def bench_method(method: str, target, sources: ResidentSources, experts: list[str], device: str, bandwidth: float,
                 warmup: int, repeats: int, compile: bool = False) -> dict:
    recipe = recipe_from_dict([{"merge_method": method, **recipe_doc(method, experts)}])
    materializer = LiveMaterializer(target, sources, **({"compile": True} if compile else {}))  # older trees: no switch

    def candidate():
        materializer.applied.clear()  # a new candidate: every tensor is recomputed
        materializer.apply(recipe)

    plan = plan_recipe(recipe, sources.dirs)
    nbytes = 0
    for task in plan.tasks:
        refs = ([task.base] if task.base else []) + list(task.inputs)
        out = sources.get(*refs[0])
        nbytes += sum(sources.get(*r).nbytes for r in refs) + out.nbytes
    t_first = median_time(candidate, device, 0, 1)  # with compile: the compilation
    t = median_time(candidate, device, warmup, repeats)
    t_plan = median_time(lambda: plan_recipe(recipe, sources.dirs, layouts=materializer.layouts), "cpu", 1, repeats)

    def kernels():  # the method functions alone: no planning, no writing into the target
        for task in plan.tasks:
            compute(task, sources, *([materializer.compiled] if compile else []))

    t_kernels = median_time(kernels, device, warmup, repeats)
    floor = nbytes / bandwidth
    return {"method": method, "seconds": t, "first_seconds": t_first, "plan_seconds": t_plan,
            "kernel_seconds": t_kernels, "bytes": nbytes, "floor_seconds": floor, "ratio_to_floor": t / floor,
            "tensors": len(plan.tasks), "peak_extra_bytes": peak_extra_memory(candidate, device)}


def bench_mergekit(methods: list[str], sources: ResidentSources, config, experts: list[str], dtype_name: str,
                   device: str, repeats: int, cli_methods: list[str]) -> dict[str, dict]:
    """Median seconds per merge of mergekit's in-process run_merge (after one warm-up run), and of the `mergekit-yaml`
    CLI (one run each, start-up included: what a search driving the CLI pays per candidate)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cuda = device.startswith("cuda")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {m: str(tmp / m) for m in ["base", *experts]}
        for m, path in paths.items():
            with ModelWriter(path) as writer:
                for (model, name), tensor in sources.tensors.items():
                    if model == m:
                        writer.add(name, tensor.cpu())
                writer.write_config(config.to_dict())
        for method in methods:
            doc = yaml.safe_load(yaml.safe_dump({"merge_method": method, "dtype": dtype_name,
                                                 **recipe_doc(method, experts)}))
            doc = json.loads(json.dumps(doc), object_hook=lambda d: {k: paths.get(v, v) if k in ("model", "base_model")
                                                                         else v for k, v in d.items()})
            options = MergeOptions(cuda=cuda, copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)

            def run_once(out=tmp / "out"):
                run_merge(MergeConfiguration.model_validate(doc), str(out), options=options)

            row = {"run_merge_seconds": median_time(run_once, device, warmup=1, repeats=repeats)}
            if method in cli_methods:
                path = tmp / f"{method}.yaml"
                path.write_text(yaml.safe_dump(doc))
                cmd = ["mergekit-yaml", str(path), str(tmp / "cli_out"), "--quiet", "--no-copy-tokenizer"]
                start = time.perf_counter()
                subprocess.run(cmd + (["--cuda"] if cuda else []), check=True, capture_output=True)
                row["cli_seconds"] = time.perf_counter() - start
            results[method] = row
    return results


# ---------------------------------------------------------------------------------------------------------------------
# report


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")
    return f"cpu{torch.get_num_threads()}t-{platform.machine()}"


def markdown(result: dict) -> str:
    ms = lambda s: f"{s * 1e3:.2f}" if s is not None else "-"  # noqa: E731
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"  # noqa: E731
    lines = [f"# bench_merge: {result['shape']} on {result['device']} ({result['dtype']}, base + {result['experts']} experts)",
             "", f"`{result['command']}`  ", f"{result['params'] / 1e6:.1f}M params per model; copy bandwidth "
             f"{result['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s (read + write); torch {result['torch']}; {result['date']}", "",
             "| method | ms / candidate | first candidate s | plan ms | kernels ms | MB moved | floor ms | x floor | peak extra MiB |"
             + (" mergekit run_merge ms | speed-up | mergekit-yaml s | speed-up |" if result["mergekit"] else ""),
             "|---" * (9 + 4 * bool(result["mergekit"])) + "|"]
    for r in result["rows"]:
        line = (f"| {r['method']} | {ms(r['seconds'])} | {r['first_seconds']:.1f} | {ms(r['plan_seconds'])} | "
                f"{ms(r['kernel_seconds'])} | {r['bytes'] / 1e6:.1f} | {ms(r['floor_seconds'])} | "
                f"{r['ratio_to_floor']:.1f} | {mib(r['peak_extra_bytes'])} |")
        mk = result["mergekit"].get(r["method"]) if result["mergekit"] else None
        if mk:
            cli = mk.get("cli_seconds")
            line += (f" {ms(mk['run_merge_seconds'])} | {mk['run_merge_seconds'] / r['seconds']:.0f}x | "
                     + (f"{cli:.2f} | {cli / r['seconds']:.0f}x |" if cli else "- | - |"))
        elif result["mergekit"]:
            line += " - | - | - | - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def command_line(args: argparse.Namespace) -> str:
    """The options of this run, defaults resolved, as a command that repeats it."""
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
             if v not in (None, False) and k not in ("out", "methods")]
    return " ".join(["python scripts/bench_merge.py", *flags])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mergekit", action="store_true", help="also time mergekit run_merge and mergekit-yaml")
    parser.add_argument("--mergekit-methods", help="methods timed with run_merge (default: --methods)")
    parser.add_argument("--mergekit-repeats", type=int, default=3)
    parser.add_argument("--cli-methods", default="linear,slerp,ties,dare_ties", help="methods timed with mergekit-yaml")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); use 1 on a shared CPU")
    parser.add_argument("--compile", action="store_true", help="the materializer's compile switch (merge/compiled.py)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.device.startswith("cuda"):  # as a CPU search worker does
        from evomerge.run.worker import keep_freed_host_memory

        keep_freed_host_memory()
    args.dtype = dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = DTYPES[dtype_name]
    methods = args.methods.split(",")
    experts = [f"expert{i + 1}" for i in range(max(args.experts, 2))]  # model_stock and nuslerp need two

    config = llama_config(SHAPES[args.shape])
    check_memory(config, args.device, dtype, len(experts))
    sources = synthetic_sources(config, ["base", *experts], args.device, dtype)
    target = live_model(config, args.device, dtype)
    params = sum(t.numel() for (m, _), t in sources.tensors.items() if m == "base")
    bandwidth = copy_bandwidth(args.device, dtype, 2**30 if args.device.startswith("cuda") else 2**28)  # past caches
    date = datetime.date.today().isoformat()
    result = {"shape": args.shape, "dims": SHAPES[args.shape], "device": device_name(args.device), "dtype": dtype_name,
              "experts": len(experts), "params": params, "date": date, "torch": torch.__version__,
              "command": command_line(args),
              "bandwidth_bytes_per_s": bandwidth, "rows": [], "mergekit": {}}
    stem = Path(args.out) / f"{result['device']}-{args.shape}-{date}"
    for method in methods:
        result["rows"].append(r := bench_method(method, target, sources, experts, args.device, bandwidth, args.warmup,
                                                args.repeats, args.compile))
        print(f"{method}: {r['seconds'] * 1e3:.2f} ms ({r['ratio_to_floor']:.1f}x floor)", flush=True)
        write_results(stem, result, markdown(result), show=False)  # so far: a run cut short keeps what it measured
    if args.mergekit:
        result["mergekit"] = bench_mergekit((args.mergekit_methods or args.methods).split(","), sources, config,
                                            experts, dtype_name, args.device, args.mergekit_repeats,
                                            args.cli_methods.split(","))
    write_results(stem, result, markdown(result))
    return result


def write_results(stem: Path, result: dict, table: str, show: bool = True) -> None:
    """STEM.json and STEM.md (the table, printed if `show`), each replaced whole."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((f"{stem}.json", json.dumps(result, indent=2)), (f"{stem}.md", table)):
        Path(f"{path}.tmp").write_text(text)
        Path(f"{path}.tmp").replace(path)
    if show:
        print(table)


if __name__ == "__main__":
    main()
