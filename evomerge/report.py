"""Plots and a summary from a run directory alone: fitness over trials, the winner's per-layer parameters, its layer path.

    evomerge report runs/ps   ->  runs/ps/report/{fitness.png, parameters.png, path.png, pareto.png, summary.md}
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evomerge.errors import EvomergeError  # noqa: E402
from evomerge.evaluate.docs import unpack  # noqa: E402
from evomerge.recipe import MERGED, Recipe, load_recipe, resolve, write_text_atomic  # noqa: E402
from evomerge.run.ledger import Ledger  # noqa: E402

# Tensor names that stand for a layer's attention and MLP when reading filtered parameters (Llama-style naming).
PROBES = {"attn": "model.layers.{i}.self_attn.q_proj.weight", "mlp": "model.layers.{i}.mlp.up_proj.weight"}


def per_layer_parameters(recipe: Recipe, num_layers: int) -> dict[str, np.ndarray]:
    """{"model / param [attn|mlp]": values per layer} for the parameter-space stage, as the planner resolves them."""
    stage = recipe.merge
    rows: dict[str, np.ndarray] = {}
    if stage is None or stage.models is None:
        return rows
    names = sorted({p for m in stage.models for p in m.parameters} | set(stage.parameters))
    for entry in stage.models:
        for name in names:
            values = {}
            for block, probe in PROBES.items():
                values[block] = np.array([
                    np.nan if (v := resolve(name, [entry.parameters, stage.parameters], probe.format(i=i),
                                            i / (num_layers - 1) if num_layers > 1 else 1.0)) is None or isinstance(v, bool)
                    else float(v) for i in range(num_layers)])
            label = f"{Path(entry.model).name} / {name}"
            if np.allclose(values["attn"], values["mlp"], equal_nan=True):
                rows[label] = values["attn"]
            else:
                rows.update({f"{label} [{b}]": v for b, v in values.items()})
    return {k: v for k, v in rows.items() if not np.isnan(v).all()}


def plot_fitness(trials, path: Path) -> None:
    ok = [(t.candidate, t.fitness) for t in trials if t.ok]
    failed = [t.candidate for t in trials if not t.ok]
    fig, ax = plt.subplots(figsize=(7, 4))
    if ok:
        x, y = zip(*sorted(ok))
        ax.scatter(x, y, s=12, alpha=0.5, label="trial")
        ax.plot(x, np.maximum.accumulate(y), color="C1", label="best so far")
    if failed:
        ax.scatter(failed, [min((f for _, f in ok), default=0)] * len(failed), marker="x", color="C3", label="failed")
    ax.set(xlabel="trial", ylabel="fitness (search split)", title="Search progress")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_parameters(rows: dict[str, np.ndarray], path: Path) -> None:
    labels = list(rows)
    matrix = np.stack([rows[k] for k in labels])
    fig, ax = plt.subplots(figsize=(max(5, matrix.shape[1] * 0.5 + 3), 0.45 * len(labels) + 1.5))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set(yticks=range(len(labels)), yticklabels=labels, xticks=range(matrix.shape[1]), xlabel="layer",
           title="Winner's merge parameters per layer")
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_path(recipe: Recipe, path: Path) -> None:
    """The layer path as in Fig. 3 of the paper: position in the path vs (source, layer), colour = hidden-state scale."""
    sources = list(dict.fromkeys(s.source for s in recipe.layers))
    fig, ax = plt.subplots(figsize=(max(6, len(recipe.layers) * 0.35 + 2), 3.5))
    for k, slot in enumerate(recipe.layers):
        y = sources.index(slot.source)
        ax.scatter(k, y, c=[slot.scale], cmap="coolwarm", vmin=0.5, vmax=1.5, s=120, edgecolors="k")
        ax.text(k, y, str(slot.layer), ha="center", va="center", fontsize=7)
    ax.plot(range(len(recipe.layers)), [sources.index(s.source) for s in recipe.layers], color="gray", lw=0.8, zorder=0)
    ax.set(yticks=range(len(sources)), yticklabels=[s if s == MERGED else Path(s).name for s in sources],
           xlabel="position in the path (number = source layer, colour = scale)", title="Winner's layer path")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scores_table(scores: dict) -> list[str]:
    lines = ["| split | task | score | 95% CI | chance |", "|---|---|---|---|---|"]
    for split, tasks in scores.items():
        if not isinstance(tasks, dict):
            continue
        for task, s in tasks.items():
            if isinstance(s, dict) and "value" in s:
                ci = s.get("ci95") or [None, None]
                ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci and not np.isnan(ci).any() else ""
                chance = s.get("chance")
                lines.append(f"| {split} | {task} | {s['value']:.3f} | {ci_text} | {'' if chance is None else f'{chance:.3f}'} |")
    return lines if len(lines) > 2 else []


def solved_documents(rows, shown: int = 40) -> list[str]:
    """Which documents the winner solves (score 1) on each split it was scored on: a count and the unsolved indices
    (tasks whose documents score 0 or 1; a perplexity's are not solved or not)."""
    lines = ["### Documents the winner solves", "", "| split | task | solved | documents not solved (index in the split) |",
             "|---|---|---|---|"]
    for trial in rows:
        docs, _ = unpack(trial.docs)
        for task, values in docs.items():
            if not np.isin(values, (0.0, 1.0)).all():
                continue
            missed = np.flatnonzero(values < 1).tolist()
            text = ", ".join(map(str, missed[:shown])) + (f", ... ({len(missed) - shown} more)" if len(missed) > shown else "")
            lines.append(f"| {trial.split} | {task} | {int((values >= 1).sum())}/{len(values)} | {text or 'none'} |")
    return lines + [""] if len(lines) > 4 else []


def plot_pareto(trials, front: list[dict], winner: int, path: Path) -> None:
    """Several objectives: every trial as a line across the objectives (parallel coordinates), the Pareto front coloured."""
    names = list(front[0]["objectives"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4))
    x = np.arange(len(names))
    for t in trials:
        if t.ok and t.objectives is not None:
            ax.plot(x, t.objectives, color="0.8", lw=0.6, zorder=0)
    for k, member in enumerate(front):
        is_winner = member["candidate"] == winner
        ax.plot(x, [member["objectives"][n] for n in names], marker="o", lw=2.5 if is_winner else 1.2,
                color="C3" if is_winner else f"C{k % 3}", label=f"trial {member['candidate']}" + (" (winner)" if is_winner
                                                                                               else ""))
    ax.set(xticks=x, xticklabels=names, ylabel="score (search split)", title="Pareto front (grey: all trials)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pareto_table(front: list[dict], winner: int) -> list[str]:
    names = list(front[0]["objectives"])
    lines = ["## Pareto front (search split)", "", "| trial | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {m['candidate']}{' (winner)' if m['candidate'] == winner else ''} | "
              + " | ".join(f"{m['objectives'][n]:.3f}" for n in names) + " |" for m in front]
    return lines + [""]


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "ledger.sqlite").exists():
        raise EvomergeError("not a run directory (no ledger.sqlite)", source=str(run_dir))
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    ledger = Ledger(run_dir / "ledger.sqlite")
    trials = ledger.trials("search")
    held_out = ledger.trials("validation") + ledger.trials("test")
    ledger.close()
    plot_fitness(trials, out / "fitness.png")
    lines = [f"# Run {run_dir.name}", "", f"Trials: {len(trials)} ({sum(not t.ok for t in trials)} failed).", ""]
    if trials:
        t = np.array([[x.t_merge, x.t_eval, x.t_total] for x in trials])
        merge, evaluate, total = np.median(t, axis=0)
        lines += [f"Median time per trial: {total:.2f} s (merge {merge:.3f} s, evaluation {evaluate:.2f} s, "
                  f"other {max(total - merge - evaluate, 0):.3f} s).", ""]
    ok = [x for x in trials if x.ok]
    if ok:
        lines += [f"Best search fitness: {max(x.fitness for x in ok):.4f}.", ""]
    scored = sum(x.n_docs for x in trials)
    if scored:
        lines += [f"Documents scored (search split): {scored:,} in all, {scored / len(trials):.1f} per trial; "
                  f"{sum(x.estimated for x in trials)} trials stopped early by racing (fitness estimated).", ""]
    best = run_dir / "best" / "recipe.yaml"
    if best.exists():
        recipe = load_recipe(best)
        if recipe.merge and recipe.merge.models:
            n = max((len(v) for m in recipe.merge.models for v in m.parameters.values() if isinstance(v, list)), default=1)
            rows = per_layer_parameters(recipe, max(n, 1))
            if rows:
                plot_parameters(rows, out / "parameters.png")
                lines += ["![parameters](parameters.png)", ""]
        if recipe.layers:
            plot_path(recipe, out / "path.png")
            lines += ["![path](path.png)", ""]
    scores_file = run_dir / "best" / "scores.json"
    if scores_file.exists():
        try:
            scores = json.loads(scores_file.read_text())
            winner = scores["candidate"]
        except (ValueError, KeyError, TypeError) as err:
            raise EvomergeError(f"unreadable winner's scores ({type(err).__name__}: {err}); `evomerge resume "
                                f"{run_dir}` writes them again", source=str(scores_file)) from None
        lines += ["## Winner", ""] + _scores_table(scores.get("scores", {})) + [""]
        rows = [t for t in trials + held_out if t.candidate == winner and t.docs is not None]
        lines += solved_documents(list({t.split: t for t in rows}.values()))
        if scores.get("pareto_front"):
            plot_pareto(trials, scores["pareto_front"], winner, out / "pareto.png")
            lines += _pareto_table(scores["pareto_front"], winner) + ["![pareto](pareto.png)", ""]
    lines += ["![fitness](fitness.png)", ""]
    write_text_atomic(out / "summary.md", "\n".join(lines))
    return out
