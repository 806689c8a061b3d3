"""``adaptive-ft export``, ``adaptive-ft evaluate`` and ``adaptive-ft review export``: ship the model, prove it."""

from __future__ import annotations

from pathlib import Path

import click

from adaptive_ft.artifacts.eval import EvalView
from adaptive_ft.cli.common import config_option, flag_overrides, overrides_argument, store_option
from adaptive_ft.config import load_config
from adaptive_ft.files import refuse_overwrite


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@click.command("export")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="EXPORT folder to write.")
@click.option("--variants", default=None, help="Comma list of merged,int8,nf4,gguf (default: the config's).")
@config_option
@overrides_argument
def export_cmd(run: Path, out: Path, variants: str | None, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Merge RUN's adapter and write deployable variants, each measured.

    merged (fp32 safetensors), int8 and nf4 (bitsandbytes; reload with from_pretrained), and GGUF files
    (Q8_0, F16) with the tokenizer and chat template. EXPORT/manifest.json records per variant its size,
    load time, CPU ms per generated token and top-1 agreement with the merged model on a probe set.

    \b
    Examples:
      adaptive-ft export runs/r1 --out export/r1
      adaptive-ft export runs/r1 --out export/r1 --variants merged,gguf export.gguf_types=q8_0
    """
    from adaptive_ft.export import export  # deferred: the stage imports torch; --help stays fast

    cfg = load_config(config_path, flag_overrides({"export.variants": _split(variants) or None}, overrides)).export
    result = export(run, out, cfg)
    click.echo("\n".join(variant_table(result.variants)))
    click.echo(f"wrote {result.manifest_path}")


def variant_table(variants: list) -> list[str]:
    """The export's figures per variant, with what llama.cpp made of each GGUF file (``verified_by``,
    ``answer_agreement``, ``verify_error`` in the manifest)."""
    lines = [f"{'variant':<11} {'size':>10} {'load s':>7} {'ms/token':>9} {'agreement':>9}  llama.cpp answers"]
    for v in variants:
        if v.verify_error:
            llama = f"could not load: {v.verify_error}"
        elif v.answer_agreement is not None:
            llama = f"{100 * v.answer_agreement:.1f}% of {v.answer_prompts} equal merged's"
        else:
            llama = "—" if v.format != "gguf" else "not checked (llama-cpp-python not installed)"
        lines.append(f"{v.name:<11} {_mb(v.size_bytes):>10} {v.load_seconds:>7.2f} {v.ms_per_token:>9.2f} "
                     f"{100 * v.agreement:>8.1f}%  {llama}")
    return lines


@click.command("evaluate")
@store_option
@click.option("--models", required=True,
              help="Comma list: base, RUN folders, EXPORT (= all its variants), EXPORT/<variant>, .gguf files.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="eval.json to write.")
@click.option("--run", "run", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Train run whose test split and base model to use (default: found from --models).")
@config_option
@overrides_argument
def evaluate_cmd(store: str, models: str, out: Path, run: Path | None, config_path: str | None,
                 overrides: tuple[str, ...]) -> None:
    """Score every model on the run's held-out test split, per segment and domain, with 95% CIs.

    A segment's metric counts each test example as often as that segment's users asked it. Writes
    eval.json (docs/contracts.md) and the answers beside it (eval.outputs.parquet).

    \b
    Examples:
      adaptive-ft evaluate --models base,runs/r1,export/r1/int8,export/r1/nf4 --out eval.json
      adaptive-ft evaluate --store logs.duckdb --models base,runs/r1 --out eval.json evaluate.bootstrap=2000
      adaptive-ft evaluate --models base,runs/r1,export/r1 --out eval.json   # every exported variant
    """
    from adaptive_ft.evaluate import evaluate  # deferred: the stage imports torch; --help stays fast

    given = _split(models) or []
    refuse_overwrite([out, out.with_name(out.stem + ".outputs.parquet")],
                     {"--store": store, "--run": run, "--config": config_path,
                      **{f"--models {m}": m for m in given if m != "base"}})
    cfg = load_config(config_path, overrides).evaluate
    result = evaluate(store, given, out, cfg, run=run)
    data = result.data
    primary = data["primary_metric"]
    click.echo(f"{data['n_test_examples']} test examples, {data['n_test_queries']} queries; {primary}:")
    view = EvalView(data)
    for model in view.models:
        row = view.cell(model, "overall")
        if row and row.get("value") is not None:
            click.echo(f"  {model:<40} {row['value']:.4f}  [{row['ci_low']:.4f}, {row['ci_high']:.4f}]")
    if data.get("worst_segment"):
        w = data["worst_segment"]
        click.echo(f"worst segment ({w['model']}): {w['segment']} {w['value']:.4f}")
    for f in data["flags"]:
        click.echo(f"FLAG {f['segment']}: {f['model']} {f['delta']:+.4f} [{f['ci_low']:+.4f}, {f['ci_high']:+.4f}]")
    click.echo(f"wrote {result.path}")


@click.group("review")
def review_group() -> None:
    """Expert review: sample answers for people to rate; ratings come back via ingest --format review.

    \b
    Examples:
      adaptive-ft review export --eval eval.json --out review.csv
      adaptive-ft ingest --format review review.csv
    """


@review_group.command("export")
@store_option
@click.option("--eval", "eval_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="eval.json written by adaptive-ft evaluate.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV to write (an .html page is written beside it).")
@click.option("--models", default=None, help="Comma list of evaluated models to sample (default: the fine-tuned one).")
@click.option("--per-cell", type=int, default=3, show_default=True, help="Answers per segment x domain x model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
def review_export_cmd(store: str, eval_path: Path, out: Path, models: str | None, per_cell: int, seed: int) -> None:
    """Write a stratified sample of model answers per segment x domain as a CSV with blank ratings.

    Columns: review_id, example_id, segment, domain, model, prompt, reference, response, rating, reviewer,
    comment. Fill in rating (1-5), reviewer and comment, then ingest the file.

    \b
    Examples:
      adaptive-ft review export --eval eval.json --out review.csv
      adaptive-ft review export --eval eval.json --out review.csv --models base,runs/r1 --per-cell 5
    """
    from adaptive_ft.review import review_export  # deferred: the stage imports torch; --help stays fast

    refuse_overwrite([out, out.with_suffix(".html")],
                     {"--eval": eval_path, "--store": store,
                      "the eval outputs": eval_path.with_name(eval_path.stem + ".outputs.parquet")})
    result = review_export(eval_path, out, store=store, models=_split(models), per_cell=per_cell, seed=seed)
    click.echo(f"wrote {result.csv} ({result.rows} rows over {result.cells} segment x domain cells) and {result.html}")


COMMANDS = [export_cmd, evaluate_cmd, review_group]
