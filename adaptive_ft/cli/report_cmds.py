"""``adaptive-ft report``: one page (HTML, plus Markdown and JSON) from whichever artifacts exist."""

from __future__ import annotations

from pathlib import Path

import click

from adaptive_ft.files import refuse_overwrite


@click.command("report")
@click.option("--store", type=click.Path(dir_okay=False, path_type=Path), default=None, envvar="ADAPTIVE_FT_STORE",
              help="DuckDB store: adds the interaction-data section (env ADAPTIVE_FT_STORE).")
@click.option("--plan", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="plan.json: what was chosen and why, layers, recommender quality.")
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Train run folder: loss curves and the early-stopping point.")
@click.option("--eval", "eval_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="eval.json: per-segment and per-domain results, flags, representation.")
@click.option("--export", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Export folder: size, speed and quality of each variant.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="report.html to write (report.md and report.json go beside it), or a folder.")
@click.option("--title", default="", help="Page title (default: made from the inputs, e.g. 'smollm2 fine-tune r1').")
@click.option("--no-plots", is_flag=True, help="Tables and numbers only (faster, smaller page).")
def report_cmd(store: Path | None, plan: Path | None, run: Path | None, eval_path: Path | None,
               export: Path | None, out: Path, title: str, no_plots: bool) -> None:
    """Write a self-contained HTML report (and the same as Markdown and JSON).

    Give any subset of the inputs; each adds its sections, and a plot whose data is missing is left out.
    The HTML inlines its styles and plots and loads nothing from the network, so it can be mailed or
    attached to a CI run as one file.

    \b
    Examples:
      adaptive-ft report --plan plan.json --run runs/r1 --eval eval.json --out report.html
      adaptive-ft report --store logs.duckdb --plan plan.json --out reports/plan.html
      adaptive-ft report --eval eval.json --export export/ --out report.html --title "v2 vs base"
    """
    from adaptive_ft.report import ReportInputs, build_report  # deferred: the stage imports torch; --help stays fast
    from adaptive_ft.report.build import report_paths

    refuse_overwrite(report_paths(out), {"--store": store, "--plan": plan, "--run": run, "--eval": eval_path,
                                         "--export": export})
    inputs = ReportInputs(store=store, plan=plan, run=run, eval=eval_path, export=export, title=title)
    result = build_report(inputs, out, draw=not no_plots)
    for line in result.bullets:
        click.echo(f"- {line}")
    click.echo(f"wrote {result.html} ({len(result.sections)} sections, {result.figures} plots), "
               f"{result.markdown.name}, {result.json.name}")


COMMANDS = [report_cmd]
