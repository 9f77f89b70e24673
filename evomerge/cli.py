"""The `evomerge` command. Each verb parses its options, builds components and calls one function."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from evomerge.errors import EvomergeError

def parse_size(text: str) -> int:
    """'5GB', '500M', '1024' -> bytes."""
    from evomerge.sizes import parse_size as parse

    try:
        return parse(text)
    except ValueError as err:
        raise EvomergeError(str(err), key="--out-shard-size") from None


def user_errors(fn):
    """EvomergeError -> one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EvomergeError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.version_option(package_name="evomerge")
def main():
    """Evolutionary search over model-merge recipes."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", default=None, help="compute and output dtype (float32, bfloat16, float16, float64)")
@click.option("--out-shard-size", default="5GB", show_default=True, help="largest safetensors shard")
@click.option("--seed", type=int, default=None, help="seed for DARE/DELLA masks (overrides the recipe's)")
@click.option("--force", is_flag=True, help="overwrite a non-empty OUT")
@click.option("--allow-nonfinite", is_flag=True, help="merge models that hold NaN/inf weights")
@user_errors
def merge(recipe, out, device, dtype, out_shard_size, seed, force, allow_nonfinite):
    """Materialize RECIPE (evomerge or mergekit YAML) into the Hugging Face model dir OUT."""
    from evomerge.merge.materialize import merge_to_dir
    from evomerge.recipe import load_recipe

    loaded = load_recipe(recipe)
    if seed is not None and loaded.merge:
        loaded = loaded.model_copy(update={"merge": loaded.merge.model_copy(update={"seed": seed})})
    plan = merge_to_dir(loaded, out, source=recipe, device=device, dtype=dtype, out_shard_bytes=parse_size(out_shard_size),
                        force=force, allow_nonfinite=allow_nonfinite)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {out} ({len(plan.tasks)} tensors, {plan.num_layers} layers)")


@main.group()
def zoo():
    """The toy model zoo: a base, skill experts, a distractor and a multi-task reference, trained here on CPU."""


@zoo.command("build")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=1, show_default=True, help="1: the committed zoo")
@click.option("--size", type=click.Choice(["tiny", "default"]), default="default", show_default=True)
@user_errors
def zoo_build(out, seed, size):
    """Train the zoo into OUT (ordinary Hugging Face model dirs and a zoo.json manifest); deterministic by seed."""
    from evomerge.zoo.numerics import pin_before_torch_import

    pin_before_torch_import()  # the same bits on every x86-64 CPU (numerics.py); torch is not imported before this
    from evomerge.zoo.build import build_zoo

    build_zoo(out, seed=seed, size=size)


def _load_target(target: str, device: str = "cpu", dtype=None):
    """A model dir, or a recipe (merged into a temp dir first), on `device` in `dtype` (None: as stored)."""

    from evomerge.evaluate.table import load_model_dir

    if Path(target).is_file():
        import tempfile

        from evomerge.merge.materialize import merge_to_dir
        from evomerge.recipe import load_recipe

        with tempfile.TemporaryDirectory() as tmp:
            merge_to_dir(load_recipe(target), Path(tmp) / "merged", source=target, progress=False)
            return load_model_dir(Path(tmp) / "merged", device=device, dtype=dtype)
    return load_model_dir(target, device=device, dtype=dtype)


def _check_target(target: str) -> None:
    """What `_load_target` will need, checked before any target is scored: a recipe plans over its models' headers."""
    from evomerge.evaluate.table import check_loads, check_model_dir

    if Path(target).is_file():
        from evomerge.merge.materialize import open_model_dirs
        from evomerge.merge.plan import plan_recipe
        from evomerge.recipe import load_recipe

        recipe = load_recipe(target)
        dirs = open_model_dirs(recipe, target)
        plan = plan_recipe(recipe, dirs, target)
        if plan.tokenizer_from:  # the merged model gets its tokenizer files as they are
            check_loads(dirs[plan.tokenizer_from].path, "tokenizer", source=target)
    else:
        check_model_dir(target)


@main.command("eval")
@click.argument("targets", nargs=-1, required=True)
@click.option("--tasks", required=True, help="comma-separated lm-eval tasks or groups (evomerge's: toy, toy_gen, ...)")
@click.option("--split", default="test", show_default=True, help="search, validation or test")
@click.option("--limit", type=int, default=None, help="score only the first N documents of each task")
@click.option("--task-dir", "task_dirs", multiple=True, help="a directory of your own lm-eval task YAMLs")
@click.option("--metric", "metrics", multiple=True, metavar="TASK=METRIC[,FILTER]",
              help="what a task (or group) scores, e.g. gsm8k=exact_match,flexible-extract (default: its first metric "
                   "under its first filter)")
@click.option("--network", is_flag=True, help="allow lm-eval's built-in tasks (downloads their data)")
@click.option("--cut", default=None, metavar="search=N,validation=M[,seed=S][,split=NAME]",
              help="cut each task's split (default: its test split) as a search's evaluation.cut does")
@click.option("--output-json", type=click.Path(dir_okay=False), default=None)
@click.option("--output-md", type=click.Path(dir_okay=False), default=None, help="also write the table as Markdown")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", default=None, help="load the models in this dtype (float32, bfloat16, ...; default: as stored)")
@click.option("--batch-size", default="64", show_default=True,
              help="documents per forward pass, or auto (lm-eval's probe); halved when the device runs out of memory")
@click.option("--apply-chat-template", is_flag=True, help="prompts through each model's chat template (lm-eval's)")
@click.option("--system-instruction", default=None, help="a system message before every prompt")
@click.option("--fewshot-as-multiturn/--no-fewshot-as-multiturn", default=None,
              help="few-shot examples as turns of the chat (default: on with --apply-chat-template, as lm-eval's)")
@user_errors
def evaluate(targets, tasks, split, limit, task_dirs, metrics, network, cut, output_json, output_md, device, dtype,
             batch_size, apply_chat_template, system_instruction, fewshot_as_multiturn):
    """Score model dirs, hub ids or recipes (TARGETS) on lm-eval tasks: per-task scores, 95% CIs, chance levels."""
    from evomerge.evaluate.table import evaluate_targets
    from evomerge.models.io import check_device, parse_dtype

    check_device(device)
    dtype = parse_dtype(dtype, key="--dtype")
    load = functools.partial(_load_target, device=device, dtype=dtype)
    try:
        report = evaluate_targets(list(targets), tasks.split(","), split=split, limit=limit, task_dirs=task_dirs,
                                  metrics=_metrics(metrics), network=network, cut=_cut(cut),
                                  batch_size=_batch_size(batch_size),
                                  load=load, check=_check_target, apply_chat_template=apply_chat_template,
                                  system_instruction=system_instruction, fewshot_as_multiturn=fewshot_as_multiturn,
                                  output_json=output_json,
                                  output_markdown=output_md, echo=click.echo)
    except EvomergeError as err:  # the evaluator names the experiment's keys (metrics.TASK, cut): the options here
        option = next((o for k, o in (("metrics", "--metric"), ("cut", "--cut"), ("fewshot", "--fewshot-as-multiturn"))
                       if (err.key or "").startswith(k)), None)
        if option is None:
            raise
        raise EvomergeError(err.message, key=option) from None
    failed = [r["target"] for r in report["results"] if r["status"] != "ok"]
    if failed:  # the table is written with their rows marked; a script must still see that they failed
        click.echo(f"error: {len(failed)} of {len(report['results'])} target(s) failed: {', '.join(failed)}", err=True)
        sys.exit(1)


@main.command("import-evolve")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="file to write (default: stdout)")
@click.option("--cut", default=None, metavar="search=N,validation=M[,seed=S]",
              help="how each task's evaluation split is cut (default: search=0.5,validation=0.25)")
@user_errors
def import_evolve(config, output, cut):
    """An evomerge experiment from mergekit-evolve's CONFIG (evol_merge_config.yml): the same genome, tasks and defaults,
    each task cut into search / validation / test. Then: evomerge search EXPERIMENT --run-dir RUN."""
    import yaml

    from evomerge.errors import read_yaml
    from evomerge.evolve_config import experiment_from_evolve
    from evomerge.models.io import ModelDir
    from evomerge.recipe import write_text_atomic

    doc = read_yaml(config, "mergekit-evolve config")
    experiment, notes = experiment_from_evolve(doc, source=config, cut=_cut(cut), base_dir=Path.cwd(),
                                               num_layers=lambda m: ModelDir.open(m, headers_only=True).num_layers)
    text = (f"# from mergekit-evolve's {config} (evomerge import-evolve)\n" + "".join(f"# {n}\n" for n in notes)
            + yaml.safe_dump(experiment, sort_keys=False))
    if output:
        write_text_atomic(output, text)
    else:
        click.echo(text, nl=False)


def _metrics(options: tuple[str, ...]) -> dict[str, str]:
    """--metric TASK=METRIC[,FILTER], repeated: the experiment's `evaluation.metrics`."""
    metrics = {}
    for option in options:
        task, sep, metric = option.partition("=")
        if not (sep and task.strip() and metric.strip()):
            raise EvomergeError(f"{option!r}: expected TASK=METRIC or TASK=METRIC,FILTER", key="--metric")
        metrics[task.strip()] = metric.strip()
    return metrics


def _cut(text: str | None) -> dict | None:
    """--cut search=N,validation=M[,seed=S][,split=NAME]: the experiment's `evaluation.cut`."""
    from pydantic import ValidationError

    from evomerge.run.config import CutConfig

    if text is None:
        return None
    try:
        return CutConfig.model_validate(dict(part.split("=", 1) for part in text.split(","))).model_dump()
    except (ValueError, ValidationError) as err:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()) \
            if isinstance(err, ValidationError) else "expected key=value pairs"
        raise EvomergeError(f"{text!r}: {detail}", key="--cut") from None


def _batch_size(text: str) -> int | str:
    """--batch-size, read as the experiment's `evaluation.batch_size`."""
    from evomerge.run.config import batch_size

    try:
        return batch_size(text)
    except ValueError as err:
        raise EvomergeError(str(err), key="--batch-size") from None


def _evaluator_factory(experiment, source: str):
    """lm-eval scoring (run.evaluation.SplitEvaluator); the tasks are checked first, so that a wrong name stops the run
    before it starts."""
    from evomerge.run.evaluation import SplitEvaluator, check_tasks

    check_tasks(experiment.evaluation, source, experiment.optimizer.name)
    return SplitEvaluator


def _run_and_print(run_dir, start) -> None:
    """Run `start()` (a search or a resume) and print its summary; Ctrl-C says how the run goes on."""
    try:
        summary = start()
    except KeyboardInterrupt:
        started = (Path(run_dir) / "config.yaml").exists()
        click.echo("\ninterrupted" + (f": the trials scored are in the ledger; `evomerge resume {run_dir}` goes on, "
                                      f"`evomerge resume {run_dir} --trials N` ends the search at N trials" if started
                                      else ""), err=True)
        sys.exit(130)
    _print_summary(run_dir, summary)


def _print_summary(run_dir, summary) -> None:
    """The winner; exit code 1 when a validation or test score failed (the run is not done until resume scores it)."""
    fitness = ", ".join(f"{split} {value:.4f}" for split, value in summary.fitness.items() if value is not None)
    click.echo(f"winner: trial {summary.candidate} ({fitness}); {summary.trials} trials, {summary.failed} failed")
    click.echo(f"best recipe: {run_dir}/best/recipe.yaml   report: evomerge report {run_dir}")
    for failure in summary.held_out_failures:
        click.echo(f"error: {failure}", err=True)
    if summary.held_out_failures:
        click.echo(f"error: {len(summary.held_out_failures)} held-out score(s) failed (logs/search.log); fix the cause "
                   f"and run `evomerge resume {run_dir}` to score them", err=True)
        sys.exit(1)


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="where the run's files go")
@click.option("--ray-address", default=None, help="join a running Ray cluster (e.g. 127.0.0.1:6379)")
@click.option("--seed", type=int, default=None, help="replace the experiment's seed (frozen into the run dir)")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="replace budget.trials")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="replace budget.hours: ask for no new candidate after this many hours")
@user_errors
def search(experiment, run_dir, ray_address, seed, trials, hours):
    """Run the evolutionary search of EXPERIMENT (YAML) into RUN_DIR."""
    from evomerge.run.config import load_experiment
    from evomerge.run.loop import search as run_search

    config = _with_budget(_on_ray(load_experiment(experiment), ray_address), trials, hours)
    if seed is not None:
        config = config.model_copy(update={"seed": seed})
    make_evaluator = _evaluator_factory(config, experiment)
    _run_and_print(run_dir, lambda: run_search(config, run_dir, make_evaluator, source=experiment))


@main.command("plan")
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--device-memory", default=None,
              help="plan for devices of this memory (e.g. 80GB, sets workers.device_memory); the device is then not "
                   "looked for on this machine")
@user_errors
def plan(experiment, device_memory):
    """Check EXPERIMENT as `search` does (no run dir, no trial) and print its memory plan for each workers.sources."""
    from evomerge.run.config import load_experiment
    from evomerge.run.loop import memory_plan
    from evomerge.run.memory import choose_sources, describe
    from evomerge.sizes import parse_size

    config = load_experiment(experiment)
    if device_memory is not None:
        try:
            size = parse_size(device_memory)
        except ValueError as err:
            raise EvomergeError(str(err), key="--device-memory") from None
        config = config.model_copy(update={"workers": config.workers.model_copy(update={"device_memory": size})})
    _evaluator_factory(config, experiment)  # the tasks, as search checks them
    memory, capacity = memory_plan(config, source=experiment, device_here=device_memory is None)
    click.echo(f"{config.name} ({experiment}): the checks of `evomerge search` passed; memory plan from the models' "
               "headers:")
    click.echo(describe(memory, config.workers, capacity))
    choose_sources(config.workers.sources, memory, capacity, source=experiment)  # device that does not fit: exit 2


def _with_budget(config, trials: int | None, hours: float | None):
    """The experiment with the budget given on the command line (None: as configured)."""
    budget = {key: value for key, value in (("trials", trials), ("hours", hours)) if value is not None}
    return config.model_copy(update={"budget": config.budget.model_copy(update=budget)}) if budget else config


def _on_ray(config, ray_address: str | None):
    """The experiment with its workers on the Ray cluster at `ray_address` (None: as configured)."""
    if not ray_address:
        return config
    return config.model_copy(update={"workers": config.workers.model_copy(
        update={"backend": "ray", "ray_address": ray_address})})


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--ray-address", default=None, help="continue on a running Ray cluster (e.g. 127.0.0.1:6379)")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="a new trial budget: more continues a finished search, fewer ends a stopped one sooner (not below "
                   "the trials already scored); the run then equals one started with it")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="a new time budget: ask for no new candidate this many hours from now (budget.hours)")
@user_errors
def resume(run_dir, ray_address, trials, hours):
    """Continue the search in RUN_DIR from its files alone (after Ctrl-C, kill -9, a reboot or a lost node)."""
    from evomerge.run.loop import resume as run_resume
    from evomerge.run.rundir import RunDir

    config = RunDir(run_dir).frozen()
    make_evaluator = _evaluator_factory(config, str(Path(run_dir) / "config.yaml"))
    changed = _with_budget(_on_ray(config, ray_address), trials, hours)
    experiment = None if changed is config else changed  # None: the frozen config as it is
    _run_and_print(run_dir, lambda: run_resume(run_dir, make_evaluator, experiment=experiment))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["evomerge", "mergekit"]), default="evomerge", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="file to write (default: stdout)")
@user_errors
def export(run_dir, fmt, output):
    """Write the winning recipe of RUN_DIR as evomerge or mergekit YAML (PS+DFS: a mergekit-multi document)."""

    from evomerge.export import export_text
    from evomerge.recipe import load_recipe, write_text_atomic

    best = Path(run_dir) / "best" / "recipe.yaml"
    if not best.exists():
        raise EvomergeError("no winner yet (best/recipe.yaml is written when the search budget is spent; "
                            f"`evomerge resume {run_dir} --trials N` ends a stopped search at N trials)", source=run_dir)
    text, warnings = export_text(load_recipe(best), fmt)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if output:
        write_text_atomic(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@user_errors
def report(run_dir):
    """Write RUN_DIR/report/: fitness over trials, the winner's per-layer parameters and layer path, summary.md."""
    from evomerge.report import write_report

    out = write_report(run_dir)
    click.echo(f"wrote {out}/summary.md")


if __name__ == "__main__":
    main()
