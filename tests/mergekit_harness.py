"""Run the same mergekit YAML through mergekit (in process) and through evomerge, and compare every tensor.

Used by tests/test_conformance.py and scripts/bench_mergekit.py (mergekit is a test/bench dependency only).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tiny_models import build_tiny, make_variants

# One mergekit YAML per method both tools have, with gradient lists and filters where the method takes per-model params.
GRADIENT = [0.3, 0.9, 0.5]
FILTERED = [{"filter": "self_attn", "value": 0.6}, {"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.7}]


def method_configs(base: str, models: list[str]) -> dict[str, dict]:
    a, b, c = models[:3]
    ta = lambda extra_a, extra_b, params=None: {  # noqa: E731
        "base_model": base,
        "models": [{"model": a, "parameters": {"weight": GRADIENT, **extra_a}},
                   {"model": b, "parameters": {"weight": FILTERED, **extra_b}}],
        **({"parameters": params} if params else {}),
    }
    return {
        "linear": {"models": [{"model": a, "parameters": {"weight": GRADIENT}}, {"model": b, "parameters": {"weight": FILTERED}},
                              {"model": base, "parameters": {"weight": 0.4}}]},
        "slerp": {"base_model": base, "models": [{"model": base}, {"model": a}], "parameters": {"t": FILTERED}},
        "nuslerp": {"models": [{"model": a, "parameters": {"weight": GRADIENT}}, {"model": b, "parameters": {"weight": 0.5}}]},
        "nuslerp_base": {"base_model": base, "models": [{"model": a, "parameters": {"weight": 0.3}},
                                                        {"model": b, "parameters": {"weight": 0.7}}],
                         "parameters": {"nuslerp_row_wise": True, "nuslerp_flatten": False}},
        "nearswap": {"base_model": base, "models": [{"model": base}, {"model": a}], "parameters": {"t": 0.002}},
        "task_arithmetic": ta({}, {}, {"lambda": 0.8}),
        "ties": ta({"density": [0.2, 0.8]}, {"density": 0.5}),
        "breadcrumbs": ta({"density": 0.6, "gamma": 0.05}, {"density": 0.7, "gamma": 0.0}),
        "breadcrumbs_ties": ta({"density": 0.6, "gamma": 0.05}, {"density": 0.7, "gamma": 0.01}, {"normalize": True}),
        "model_stock": {"base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}]},
        "model_stock_filter_wise": {"base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}],
                                    "parameters": {"filter_wise": True}},
        "sce": {"base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}], "parameters": {"select_topk": 0.5}},
        "sce_all": {"base_model": base, "models": [{"model": a}, {"model": b}]},
        "multislerp": {"models": [{"model": a, "parameters": {"weight": GRADIENT}}, {"model": b, "parameters": {"weight": 0.5}},
                                  {"model": c, "parameters": {"weight": FILTERED}}]},
        "multislerp_base": {"base_model": base, "models": [{"model": a, "parameters": {"weight": 0.3}},
                                                           {"model": b, "parameters": {"weight": 0.7}}],
                            "parameters": {"normalize_weights": False}},
        "karcher": {"models": [{"model": a}, {"model": b}, {"model": base}], "parameters": {"max_iter": 5}},
        "arcee_fusion": {"base_model": base, "models": [{"model": base}, {"model": a}]},
        "ram": {"base_model": base, "models": [{"model": a}, {"model": b}, {"model": c}], "parameters": {"epsilon": 0.02}},
        "ramplus_tl": {"base_model": base, "models": [{"model": a}, {"model": b}],
                       "parameters": {"epsilon": 0.02, "r": GRADIENT, "alpha": 0.5}},
        "passthrough": {"slices": [{"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"scale": FILTERED}}]},
                                   {"sources": [{"model": b, "layer_range": [1, 3]}]}]},
        "slices_ties": {"base_model": base, "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": a, "layer_range": [0, 2],
                                                                   "parameters": {"weight": 0.8, "density": GRADIENT}}]},
            {"sources": [{"model": base, "layer_range": [1, 3]}, {"model": b, "layer_range": [1, 3],
                                                                   "parameters": {"weight": 1.1, "density": 0.4}}],
             "parameters": {"normalize": False}}]},
        # randomized: compared by statistics, not element by element
        "dare_linear": ta({"density": 0.5}, {"density": 0.3}),
        "dare_ties": ta({"density": 0.5}, {"density": 0.7}),
        "della": ta({"density": 0.5, "epsilon": 0.1}, {"density": 0.6, "epsilon": 0.2}),
        "della_linear": ta({"density": 0.4, "epsilon": 0.1}, {"density": 0.6, "epsilon": 0.05}),
    }


def method_name(config_name: str) -> str:
    for suffix in ("_base", "_filter_wise", "_all"):
        config_name = config_name.removesuffix(suffix)
    return "ties" if config_name == "slices_ties" else config_name


RANDOMIZED = {"dare_linear", "dare_ties", "della", "della_linear"}


def build_zoo(root: Path, *, hidden: int = 64, num_layers: int = 3, dtype=torch.float32) -> tuple[str, list[str]]:
    base = build_tiny("llama", root / "base", hidden=hidden, num_layers=num_layers, vocab=96, dtype=dtype)
    variants = make_variants(base, root, n=3, scale=0.02)
    return str(base), [str(v) for v in variants]


def write_config(path: Path, name: str, config: dict, dtype: str = "float32") -> Path:
    doc = {"merge_method": method_name(name), "dtype": dtype, **config}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_mergekit(config_path: Path, out: Path) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
    start = time.perf_counter()
    run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                                     lazy_unpickle=False, random_seed=0,
                                                     lora_merge_cache=str(out) + ".lora_cache"))  # model+adapter
    return time.perf_counter() - start


def run_evomerge(config_path: Path, out: Path) -> float:
    from evomerge.merge.materialize import merge_to_dir
    from evomerge.recipe import load_recipe

    recipe = load_recipe(config_path)
    start = time.perf_counter()
    merge_to_dir(recipe, out, source=str(config_path), progress=False)
    return time.perf_counter() - start


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors
