"""Expert review: a stratified sample of model answers per segment x domain, for people to rate.

::

    from adaptive_ft.review import review_export
    review_export("eval.json", "review.csv", store="adaptive_ft.duckdb", per_cell=3)

The sample is drawn from the per-example outputs ``evaluate`` wrote beside ``eval.json``: for each segment x
domain cell, up to ``per_cell`` of the test examples that segment asked, uniformly without replacement (seeded),
so a small segment or a rare domain gets as many rows as a big one — the point of a review is to see the cells
metrics can say little about. The CSV has the columns of docs/contracts.md with ``rating`` (1-5), ``reviewer``
and ``comment`` blank; ``adaptive-ft ingest --format review`` reads it back. An HTML page beside it shows the
same rows for reading.
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from adaptive_ft.artifacts.eval import check_eval
from adaptive_ft.errors import InputError, read_json
from adaptive_ft.store.traffic import load_traffic

COLUMNS = ["review_id", "example_id", "segment", "domain", "model", "prompt", "reference", "response", "rating",
           "reviewer", "comment"]


@dataclass
class ReviewResult:
    """What :func:`review_export` wrote."""

    csv: Path
    html: Path
    rows: int
    cells: int


def review_export(eval_path: str | Path, out: str | Path, store: str | Path | None = None,
                  models: list[str] | None = None, per_cell: int = 3, seed: int = 0,
                  query_events: tuple[str, ...] = ("impression",)) -> ReviewResult:
    """Write ``out`` (CSV) and ``out`` with ``.html``: ``per_cell`` answers per segment x domain and model."""
    eval_path, out = Path(eval_path), Path(out)
    outputs = _read_outputs(eval_path)
    data = json.loads(eval_path.read_text())
    models = models or [data.get("finetuned_model") or data["models"][-1]]
    missing = sorted(set(models) - set(outputs["model"].unique().to_list()))
    if missing:
        raise InputError(f"review export: {missing} not in {eval_path} (evaluated: {data['models']})")
    traffic = load_traffic(store, list(query_events)).select("example_id", "segment").unique()
    sample = stratified_sample(outputs.filter(pl.col("model").is_in(models)), traffic, per_cell, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    defuse_formulas(sample).write_csv(out)
    page = out.with_suffix(".html")
    page.write_text(render_html(sample, eval_path))
    return ReviewResult(csv=out, html=page, rows=sample.height,
                        cells=sample.select("segment", "domain").unique().height)


def _read_outputs(eval_path: Path) -> pl.DataFrame:
    data = read_json(eval_path, f"{eval_path}: no such eval.json; run `adaptive-ft evaluate ... --out {eval_path}` first")
    check_eval(data, eval_path, need=("models",))
    path = eval_path.parent / data.get("outputs", eval_path.stem + ".outputs.parquet")
    if not path.is_file():
        raise InputError(f"{path}: the per-example outputs evaluate writes beside eval.json are missing; re-run evaluate")
    return pl.read_parquet(path)


# A spreadsheet runs a cell starting with one of these as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
FREE_TEXT = ("model", "prompt", "reference", "response")  # not the ids, segment, domain ingest reads back as keys


def defuse_formulas(frame: pl.DataFrame, columns: tuple[str, ...] = FREE_TEXT) -> pl.DataFrame:
    """Prefix ``'`` to every cell of ``columns`` that starts like a formula, as OWASP's CSV-injection guidance says:
    a prompt such as ``=HYPERLINK(...)`` from the logs then shows as text in Excel or LibreOffice instead of running."""
    pattern = "^[" + "".join("\\" + c if c in "-^]\\" else c for c in FORMULA_STARTS) + "]"
    return frame.with_columns(
        pl.when(pl.col(c).str.contains(pattern)).then(pl.lit("'") + pl.col(c)).otherwise(pl.col(c)).alias(c)
        for c in columns if c in frame.columns and frame.schema[c] == pl.String)


def review_id(model: str, example_id: str, segment: str) -> str:
    """Stable id of one review row: the same answer to rate gets the same id on every export."""
    return hashlib.sha256(f"{model}\x1f{example_id}\x1f{segment}".encode()).hexdigest()[:16]


def stratified_sample(outputs: pl.DataFrame, traffic: pl.DataFrame, per_cell: int, seed: int) -> pl.DataFrame:
    """Up to ``per_cell`` rows per model x segment x domain, drawn uniformly (seeded) among the asked examples."""
    if traffic.height:
        rows = outputs.join(traffic, on="example_id", how="inner")
    else:  # no store: one stratum per domain
        rows = outputs.with_columns(segment=pl.lit("all"))
    rng = np.random.default_rng(seed)
    picked = []
    for _, group in sorted(rows.group_by("model", "segment", "domain"), key=lambda kv: tuple(map(str, kv[0]))):
        group = group.sort("example_id")
        take = rng.choice(group.height, size=min(per_cell, group.height), replace=False)
        picked.append(group[sorted(take.tolist())])
    if not picked:
        raise InputError("review export: no test example was asked by any segment; is --store the run's store?")
    sample = pl.concat(picked)
    return sample.with_columns(
        review_id=pl.struct("model", "example_id", "segment").map_elements(
            lambda r: review_id(r["model"], r["example_id"], r["segment"]), return_dtype=pl.String),
        rating=pl.lit(None, dtype=pl.Int64), reviewer=pl.lit(None, dtype=pl.String),
        comment=pl.lit(None, dtype=pl.String),
    ).select(COLUMNS)


def render_html(sample: pl.DataFrame, eval_path: Path) -> str:
    """A plain, self-contained page of the rows to rate (ratings go in the CSV)."""
    head = "".join(f"<th>{c}</th>" for c in COLUMNS[:8])
    body = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[c] if r[c] is not None else ''))}</td>" for c in COLUMNS[:8])
        + "</tr>" for r in sample.iter_rows(named=True))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>adaptive-ft review</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}}th{{background:#f3f3f3}}</style>
</head><body><h1>Expert review sample</h1>
<p>{sample.height} answers from {html.escape(str(eval_path))}, stratified by segment &times; domain.
Rate each in the CSV's <code>rating</code> column (1 = wrong or harmful, 5 = what an expert would answer), add
<code>reviewer</code> and an optional <code>comment</code>, then <code>adaptive-ft ingest --format review FILE</code>.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table></body></html>
"""
