"""`evomerge eval TARGET... --tasks toy`: score several models on the same tasks, print a table, write JSON.

A target is a Hugging Face model dir by default; `load` (a callable target -> (model, tokenizer)) lets the CLI pass
recipes too (materialized into a live model). Tasks are loaded once and reused for every target.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

from evomerge.errors import EvomergeError
from evomerge.evaluate.harness import HarnessEvaluator
from evomerge.evaluate.result import EvalResult, mean_ci95
from evomerge.models.io import (VOCAB_FILES, ModelDir, load_causal_lm, load_failure, load_live_model, read_header,
                                resolve_model, tokenizer_config)
from evomerge.models.lora import split_reference
from evomerge.recipe import write_text_atomic


def load_model_dir(path: str | os.PathLike, *, device: str = "cpu", dtype=None):
    """(model, tokenizer) from a Hugging Face model dir of any architecture, or a hub id (fetched); a missing dir or
    tokenizer is a one-line EvomergeError."""
    from transformers import AutoTokenizer

    local = check_model_dir(path)
    if split_reference(str(path)):  # model+adapter: the model with the adapter's weights written over its own
        return load_live_model(ModelDir.open(str(path)), device, dtype), AutoTokenizer.from_pretrained(str(local))
    return load_causal_lm(local, dtype).to(device).eval(), AutoTokenizer.from_pretrained(str(local))


def check_model_dir(path: str | os.PathLike) -> Path:
    """What `load_model_dir` needs of a dir: a config.json and a tokenizer, which transformers reads (its config,
    generation config and tokenizer are loaded here: cheap, and a broken file fails before any model is scored), and
    whole safetensors files. Returns the local dir (a hub id's snapshot; for `model+adapter`, the model's, the adapter
    read and checked too)."""
    if pair := split_reference(str(path)):
        local = check_model_dir(pair[0])
        ModelDir.open(str(path)).close()  # what the adapter holds, and what cannot be applied refused
        return local
    path = resolve_model(str(path))
    if not (path / "config.json").is_file():
        raise EvomergeError("not a model directory (no config.json)", source=str(path))
    if not any((path / f).is_file() for f in VOCAB_FILES):
        raise EvomergeError(f"model has no tokenizer (none of {', '.join(VOCAB_FILES)}); copy the base model's "
                            f"tokenizer files in, or set tokenizer_source in the recipe", source=str(path))
    if (path / "tokenizer_config.json").is_file():
        tokenizer_config(path / "tokenizer_config.json")
    for weights in sorted(path.glob("*.safetensors")):
        read_header(weights)  # a file cut short fails here, not in the middle of scoring a list of models
    check_loads(path, "config.json", "tokenizer", "generation_config.json")
    return path


def check_loads(path: Path, *files: str, source: str | None = None) -> None:
    """transformers loads these of the model dir at `path` (config.json, tokenizer, generation_config.json when
    present); else one line naming it (and `source`, the recipe that names it)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    loaders = {"config.json": AutoConfig, "tokenizer": AutoTokenizer, "generation_config.json": GenerationConfig}
    for what in files:
        if what == "generation_config.json" and not (path / what).is_file():
            continue
        try:
            loaders[what].from_pretrained(str(path))
        except Exception as err:  # transformers raises OSError, ValueError, KeyError, TypeError, ... for a bad file
            message = f"transformers cannot load its {what} ({load_failure(err)})"
            if source:
                raise EvomergeError(f"{path}: {message}", source=source) from None
            raise EvomergeError(message, source=str(path)) from None


def evaluate_targets(targets: Sequence[str], tasks: Sequence[str], *, split: str | None = "test",
                     limit: int | None = None, task_dirs: Sequence[str] = (), metrics: Mapping[str, str] | None = None,
                     network: bool = False, cut: Mapping | None = None,
                     load: Callable[[str], tuple[object, object]] | None = None,
                     check: Callable[[str], None] | None = None, batch_size: int | str = 64,
                     apply_chat_template: bool = False, system_instruction: str | None = None,
                     fewshot_as_multiturn: bool | None = None, output_json: str | os.PathLike | None = None,
                     output_markdown: str | os.PathLike | None = None,
                     echo: Callable[[str], None] | None = print) -> dict:
    """Evaluate every target on `tasks`; returns (and optionally writes) {split, tasks, chance, results}.
    `check(target)`, for every target before any is scored, raises on one that cannot be loaded. `batch_size`: documents
    per forward pass, or "auto" (HarnessEvaluator: halved on out of memory, and kept so for the later targets)."""
    load = load or load_model_dir
    for out in (output_json, output_markdown):  # before hours of scoring, not after
        if out and not Path(out).parent.is_dir():
            raise EvomergeError(f"cannot write (no such directory: {Path(out).parent})", source=str(out))
    for target in targets:
        (check or check_model_dir)(target)
    evaluator, results = None, []
    for target in targets:
        model, tokenizer = load(target)
        if evaluator is None:
            evaluator = HarnessEvaluator(tasks, tokenizer, split=split, limit=limit, task_dirs=task_dirs,
                                         metrics=metrics, network=network, cut=cut, batch_size=batch_size,
                                         apply_chat_template=apply_chat_template,
                                         system_instruction=system_instruction,
                                         fewshot_as_multiturn=fewshot_as_multiturn)
        result = evaluator.evaluate(model, tokenizer=tokenizer)
        results.append({"target": str(target), **result.to_dict()})
        if echo:
            echo(f"{target}: {_summary(result)}")
    report = {"split": split, "limit": limit, "tasks": list(evaluator.tasks), "n": evaluator.sizes,
              "chance": evaluator.chance, "results": results}
    if output_json:
        write_text_atomic(output_json, json.dumps(report, indent=2) + "\n")
    if output_markdown:
        write_text_atomic(output_markdown, format_table(report, markdown=True) + "\n")
    if echo:
        echo(format_table(report))
    return report


def format_table(report: dict, markdown: bool = False) -> str:
    """Targets as rows, tasks as columns: 'score [95% CI]', then a chance row; fitness = mean of the tasks (a score
    where lower is better, such as a perplexity, negated: the column is then called fitness)."""
    tasks = report["tasks"]
    prefix = os.path.commonprefix(tasks) if len(tasks) > 1 else ""
    negated = any(not s.get("higher_is_better", True) for r in report["results"] for s in r["scores"].values())
    header = ["model", *(t[len(prefix):] or t for t in tasks), "fitness" if negated else "mean"]
    rows = []
    for r in report["results"]:
        if r["status"] != "ok":
            rows.append([r["target"], f"failed: {r['error']}"] + [""] * (len(tasks) - 1) + [""])
            continue
        cells = []
        for t in tasks:
            s = r["scores"][t]
            lo, hi = s["ci95"]
            cells.append(f"{s['value']:.2f} [{lo:.2f},{hi:.2f}]" if not math.isnan(lo) else f"{s['value']:.4g}")
        rows.append([_short(r["target"]), *cells, f"{r['fitness']:.4g}" if negated
                     else f"{r['fitness']:.3f}{_mean_interval(r['scores'], tasks)}"])
    chance = [report["chance"].get(t) for t in tasks]
    rows.append(["chance", *("-" if c is None else f"{c:.2f}" if c >= 0.01 else f"{c:.0e}" for c in chance),
                 "-" if None in chance else f"{sum(chance) / len(chance):.3f}"])
    proportions = all(s.get("proportion", True) for r in report["results"] for s in r["scores"].values())
    intervals = "95% Wilson intervals (mean: normal approximation, Agresti-Coull variances)" if proportions else \
        "95% intervals: Wilson for scores of 0 or 1, +- 1.96 standard errors for others"
    note = f"split={report['split']}, n={_sizes(report['n'])}, {intervals}" \
        + ("; fitness: the mean with lower-is-better scores negated" if negated else "")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + f"\n\n{note}"
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), *map(fmt, rows), note])


def _summary(result: EvalResult) -> str:
    if not result.ok:
        return f"failed: {result.error}"
    return f"fitness {result.fitness:.3f} ({result.seconds:.1f}s)"


def _mean_interval(scores: dict, tasks: list[str]) -> str:
    """' [lo,hi]' around the mean of proportions (`mean_ci95`); '' when a task is not a proportion."""
    if not all(scores[t].get("proportion") for t in tasks):
        return ""
    lo, hi = mean_ci95([scores[t]["value"] for t in tasks], [scores[t]["n"] for t in tasks])
    return f" [{lo:.2f},{hi:.2f}]"


def _short(target: str) -> str:
    """A row label: the model dir's or recipe's name; a search winner (RUN/best/recipe.yaml) by its run's name;
    `model+adapter` by both names."""
    if pair := split_reference(target):
        return "+".join(_short(part) for part in pair)
    path = Path(target)
    if path.name == "recipe.yaml" and path.parent.name == "best":
        return f"{path.parent.parent.name} (winner)"
    return (path.stem if path.suffix in (".yaml", ".yml") else path.name) or target


def _sizes(n: dict) -> str:
    values = sorted(set(n.values()))
    return str(values[0]) if len(values) == 1 else "/".join(map(str, values))
