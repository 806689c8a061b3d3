"""``adaptive-ft loop``: one turn of the loop, from the deployed v1's logs to a v2 audited against v1."""

from __future__ import annotations

from pathlib import Path

import click

from adaptive_ft.cli.common import config_option, overrides_argument, store_option
from adaptive_ft.config import load_config
from adaptive_ft.files import refuse_overwrite


@click.command("loop")
@store_option
@click.option("--v1", "v1", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The deployed model's train RUN (its logs are in --store); v2 continues its adapter.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for plan.json, v2/ (a RUN), eval.json and report.html.")
@click.option("--models", default="", help="Comma list of more models to score beside v1 and v2 (e.g. base).")
@click.option("--no-report", is_flag=True, help="Skip the HTML report.")
@config_option
@overrides_argument
def loop_cmd(store: str, v1: Path, out: Path, models: str, no_report: bool, config_path: str | None,
             overrides: tuple[str, ...]) -> None:
    """Prioritize v1's own logs, train v2 from v1's adapter on the plan, and evaluate v1 vs v2.

    The store holds the logs of v1 answering users (e.g. `adaptive-ft simulate --responder V1` and
    `ingest`). prioritize reads where v1 failed; v2 trains on v1's layers starting from v1's adapter
    (train --init-adapter); evaluate scores v1 and v2 on the same held-out test split per segment and
    domain, with paired intervals against v1; the report gets the v1 -> v2 view.

    \b
    Examples:
      adaptive-ft simulate --out v1.jsonl --responder runs/v1 && adaptive-ft ingest v1.jsonl --store v1.duckdb
      adaptive-ft loop --store v1.duckdb --v1 runs/v1 --out loop1 train.max_steps=60
      adaptive-ft loop --store v1.duckdb --v1 runs/v1 --out loop1 --models base prioritize.replay=0.5
    """
    from adaptive_ft.loop import run_loop  # deferred: the stage imports torch; --help stays fast

    written = [out / name for name in ("plan.json", "eval.json", "eval.outputs.parquet", "report.html", "report.md",
                                       "report.json", "v2", "export")]
    refuse_overwrite(written, {"--store": store, "--v1": v1, "--config": config_path})
    cfg = load_config(config_path, overrides)
    extra = [m.strip() for m in models.split(",") if m.strip()]
    result = run_loop(store, v1, out, cfg, extra_models=extra, report=not no_report, echo=click.echo,
                      progress=True)
    click.echo("")
    for line in result.summary:
        click.echo("  " + line)
    if result.report:
        click.secho(f"Report: {result.report}", bold=True)


COMMANDS = [loop_cmd]
