"""``adaptive-ft prioritize`` (write plan.json from the store) and ``adaptive-ft plan show`` (read one)."""

from __future__ import annotations

from pathlib import Path

import click

from adaptive_ft.artifacts.plan import Plan, render_plan
from adaptive_ft.cli.common import config_option, flag_overrides, overrides_argument, store_option
from adaptive_ft.config import load_config
from adaptive_ft.files import refuse_overwrite


@click.command("prioritize")
@store_option
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="plan.json to write.")
@click.option("--model", default=None,
              help="Also probe and select adapter layers on this model ('smollm2', HF id, folder or .gguf).")
@click.option("--seed", type=int, default=None, help="Random seed (overrides the config's seed).")
@click.option("--quiet", is_flag=True, help="Only print the plan's path.")
@config_option
@overrides_argument
def prioritize_cmd(store: str, out: Path, model: str | None, seed: int | None, quiet: bool, config_path: str | None,
                   overrides: tuple[str, ...]) -> None:
    """Score domains, examples (and layers) by collaborative filtering; write plan.json.

    Demand comes from an implicit-feedback factorization of the user x example matrix, failure from
    negative feedback smoothed over look-alike examples; priority = sum over segments of weight x demand x
    failure. With --model, a fraction of the domain x layer cells is probed and the rest completed.

    \b
    Examples:
      adaptive-ft prioritize --out plan.json
      adaptive-ft prioritize --store logs.duckdb --out plan.json prioritize.algorithm=bpr
      adaptive-ft prioritize --out plan.json --model smollm2 prioritize.layers_k=6
      adaptive-ft plan show plan.json
    """
    from adaptive_ft.prioritize import prioritize  # deferred: the stage imports torch; --help stays fast

    refuse_overwrite([out, out.with_suffix(".examples.parquet")],
                     {"--store": store, "--config": config_path, "--model": model})
    cfg = load_config(config_path, flag_overrides({"seed": seed}, overrides))
    result = prioritize(store, cfg, out, model=model, progress=not quiet)
    if quiet:
        click.echo(str(result.path))
        return
    click.echo(render_plan(result.plan, top=10))
    for note in result.notes:
        click.echo(f"note: {note}")
    took = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    click.echo(f"wrote {result.path} ({took})")


@click.group("plan")
def plan_group() -> None:
    """Read plan.json files.

    \b
    Examples:
      adaptive-ft plan show plan.json
    """


@plan_group.command("show")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top", type=int, default=0, show_default=True, help="Show only the first N domains (0 = all).")
def plan_show(path: Path, top: int) -> None:
    """Print a plan as a table: domains with priority, demand, failure, share and why; layers; metrics.

    \b
    Examples:
      adaptive-ft plan show plan.json
      adaptive-ft plan show plan.json --top 5
    """
    click.echo(render_plan(Plan.load(path), top=top))


COMMANDS = [prioritize_cmd, plan_group]
