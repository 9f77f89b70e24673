"""The `evomerge` command. Each verb parses its options, builds components and calls one function."""

from __future__ import annotations

import functools
import sys

import click

from evomerge.errors import EvomergeError

SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500M', '1024' -> bytes."""
    number = text.rstrip("KMGBkmgb")
    unit = text[len(number):].upper()
    try:
        return int(float(number) * SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise EvomergeError(f"not a size: {text!r} (examples: 500MB, 5GB)", key="--out-shard-size") from None


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


if __name__ == "__main__":
    main()
